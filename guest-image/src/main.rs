//! `husk-guest-image`: builds and shows husk's guest kernel + initramfs.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use husk_guest_image::{
    BuildOptions, Compression, DEFAULT_CACHE_DIR, DEFAULT_KERNEL_PACKAGE, DEFAULT_OUT_DIR,
    MANIFEST_FILE,
};

#[derive(Parser)]
#[command(
    name = "husk-guest-image",
    version,
    about = "Builds husk's guest kernel and initramfs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or reuse from the cache) the guest image and install it.
    Build {
        /// The statically linked husk-agent binary; becomes /init.
        #[arg(long)]
        agent: PathBuf,
        /// Cache directory (.debs in debs/, images in images/<key>/).
        #[arg(long, default_value = DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Install directory for vmlinuz, initrd.img, manifest.json.
        #[arg(long, default_value = DEFAULT_OUT_DIR)]
        out: PathBuf,
        /// apt package of the kernel (a meta package is followed).
        #[arg(long, default_value = DEFAULT_KERNEL_PACKAGE)]
        kernel_package: String,
        /// Initramfs compression: gzip, zstd or none.
        #[arg(long, default_value_t = husk_guest_image::DEFAULT_COMPRESSION)]
        compression: Compression,
    },
    /// Print the manifest of the installed image.
    Show {
        /// Install directory.
        #[arg(long, default_value = DEFAULT_OUT_DIR)]
        out: PathBuf,
    },
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Build {
            agent,
            cache_dir,
            out,
            kernel_package,
            compression,
        } => {
            let started = Instant::now();
            let opts = BuildOptions {
                cache_dir,
                out_dir: out,
                kernel_package,
                compression,
                ..BuildOptions::new(agent)
            };
            let img = husk_guest_image::build(&opts).with_context(|| {
                format!(
                    "building the guest image (agent {}, kernel package {})",
                    opts.agent.display(),
                    opts.kernel_package
                )
            })?;
            let m = &img.manifest;
            println!("{}", if img.cached { "cached" } else { "built" });
            println!(
                "kernel:    {} {} (release {})",
                m.kernel.package, m.kernel.version, m.kernel.release
            );
            println!(
                "modules:   {} ({})",
                m.modules.len(),
                m.modules
                    .iter()
                    .map(|x| x.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            if !m.builtin_modules.is_empty() {
                println!("built in:  {}", m.builtin_modules.join(" "));
            }
            println!(
                "initramfs: {} ({}, {} uncompressed) {}",
                mib(m.initrd.size),
                m.compression,
                mib(m.initrd_uncompressed_size),
                img.initrd.display()
            );
            println!(
                "vmlinuz:   {} {}",
                mib(m.vmlinuz.size),
                img.kernel.display()
            );
            println!("key:       {}", m.key);
            println!("time:      {:.2} s", started.elapsed().as_secs_f64());
        }
        Cmd::Show { out } => {
            let img = husk_guest_image::installed(&out)
                .with_context(|| format!("reading the guest image in {}", out.display()))?;
            let path = out.join(MANIFEST_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            print!("{text}");
            tracing::debug!(key = %img.manifest.key, "manifest verified");
        }
    }
    Ok(())
}
