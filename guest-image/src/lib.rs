//! Builds husk's guest kernel and initramfs.
//!
//! The kernel is Debian's cloud kernel, fetched with apt and verified against
//! apt's index. The initramfs holds exactly what the agent needs: `/init` (the
//! static husk-agent), the kernel modules husk uses (decompressed, so the agent
//! loads them with `finit_module`), `/etc/husk/modules.load` listing them in
//! load order, and the empty mount points. Output is deterministic and cached
//! under a key hashed from every input, then installed into an output
//! directory that `huskd` reads with [`installed`].
//!
//! The unpacked kernel package itself (bzImage, ELF `vmlinux`, modules) is
//! cached too and shared with tests and husk-vmm through [`kernel_tree`].

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod apt;
pub mod initramfs;
pub mod kernel;
pub mod modules;

pub use initramfs::Compression;
pub use kernel::{extract_vmlinux, kernel_tree, KernelOptions, KernelTree};
pub use modules::DEFAULT_MODULES;

/// Bump when the image layout or anything else the key does not capture
/// changes, so old cache entries are not reused.
pub const FORMAT_VERSION: u32 = 1;

/// Default apt package for the guest kernel (a meta package).
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-6.12-cloud-amd64";
/// Default cache directory; `.deb`s go to `debs/`, unpacked kernels to
/// `kernels/`, images to `images/<key>/`.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/husk";
/// Default install directory read by huskd.
pub const DEFAULT_OUT_DIR: &str = "/var/lib/husk/guest";
/// Compression chosen by booting each variant under QEMU TCG with a 5.3 MB
/// stand-in agent (tests/image.rs `boot_time_by_compression`, 22 boots each
/// over three runs on a loaded 2-core host): uncompressed unpacks fastest
/// (~0.1-0.3 s less guest time than gzip/zstd; QEMU CPU 0.02-0.17 s less),
/// zstd is next and beats gzip in both time and size, and the end-to-end
/// difference between none and zstd is within the noise. zstd makes the
/// initrd 3.5x smaller (1.85 vs 6.43 MB) and each VM ~6 MiB smaller in QEMU
/// RSS (QEMU keeps the initrd for the VM's life and the guest touches its
/// pages), so it wins. Determinism holds for a given build of this tool:
/// the zstd library version is pinned by Cargo.lock.
pub const DEFAULT_COMPRESSION: Compression = Compression::Zstd;

/// Guest path of the module load list.
pub const MODULES_LOAD_PATH: &str = "/etc/husk/modules.load";

/// File names inside an image or install directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// Initramfs file name.
pub const INITRD_FILE: &str = "initrd.img";
/// Manifest file name.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Everything that can go wrong; each variant names the file, tool or package.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{tool}` is not installed (Debian package `{package}`); run `scripts/install-deps`")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("`{tool}` failed: {detail}")]
    ToolFailed { tool: &'static str, detail: String },
    #[error(
        "kernel package `{package}` not found in apt's package lists; run `scripts/install-deps` \
         (it configures bookworm-backports) and `apt-get update`"
    )]
    PackageNotFound { package: String },
    #[error("apt index entry for `{package}` is unusable: {detail}")]
    BadPackageIndex { package: String, detail: String },
    #[error("downloading `{package}` with apt-get failed: {detail}")]
    DownloadFailed { package: String, detail: String },
    #[error("{path}: SHA256 {actual} does not match {expected}")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent binary {path}: {reason}")]
    BadAgent { path: PathBuf, reason: String },
    #[error("kernel package {package}: {detail}")]
    BadKernelPackage { package: String, detail: String },
    #[error("bzImage {path}: {detail}")]
    BadBzImage { path: PathBuf, detail: String },
    #[error("modules.dep line {line} is malformed: `{text}`")]
    BadModulesDep { line: usize, text: String },
    #[error("kernel module `{module}` is neither a module nor built into kernel {release}")]
    ModuleNotFound { module: String, release: String },
    #[error("module `{module}` depends on `{dependency}`, which modules.dep does not list")]
    BadModuleDependency { module: String, dependency: String },
    #[error("module dependency cycle: {chain}")]
    ModuleCycle { chain: String },
    #[error("cannot decompress module {path}: {source}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid path in initramfs: `{0}`")]
    BadArchivePath(String),
    #[error("initramfs path added twice with different content: `{0}`")]
    DuplicateArchivePath(String),
    #[error("file too large for a newc archive (4 GiB limit): `{0}`")]
    FileTooLarge(String),
    #[error("writing the cpio archive: {0}")]
    Archive(#[source] std::io::Error),
    #[error("compressing the initramfs: {0}")]
    Compress(#[source] std::io::Error),
    #[error("unknown compression `{0}` (expected gzip, zstd or none)")]
    BadCompression(String),
    #[error("manifest {path}: {detail}")]
    BadManifest { path: PathBuf, detail: String },
    #[error(
        "no guest image installed in {dir}: {missing} is missing; `make guest-image` builds it"
    )]
    NotInstalled { dir: PathBuf, missing: String },
    #[error(
        "guest image in {dir} is inconsistent ({detail}); an install was interrupted or files \
         were changed; `make guest-image` rebuilds it"
    )]
    InconsistentInstall { dir: PathBuf, detail: String },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What to build and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The static husk-agent binary; becomes `/init`.
    pub agent: PathBuf,
    /// Cache root: `debs/` and `images/` live here.
    pub cache_dir: PathBuf,
    /// Install directory (`vmlinuz`, `initrd.img`, `manifest.json`).
    pub out_dir: PathBuf,
    /// apt package to resolve (a meta package is followed to the real one).
    pub kernel_package: String,
    /// Initramfs compression.
    pub compression: Compression,
    /// Modules to include (dependencies are added); built-in ones are skipped.
    pub modules: Vec<String>,
}

impl BuildOptions {
    /// Defaults for everything but the agent.
    pub fn new(agent: impl Into<PathBuf>) -> Self {
        BuildOptions {
            agent: agent.into(),
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            out_dir: PathBuf::from(DEFAULT_OUT_DIR),
            kernel_package: DEFAULT_KERNEL_PACKAGE.to_string(),
            compression: DEFAULT_COMPRESSION,
            modules: DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Size and digest of an output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub size: u64,
    pub sha256: String,
}

/// The kernel an image was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// Package asked for (e.g. the meta package `linux-image-6.12-cloud-amd64`).
    pub requested_package: String,
    /// Package that holds the kernel, e.g. `linux-image-6.12.117+deb12-cloud-amd64`.
    pub package: String,
    /// Debian version of that package.
    pub version: String,
    /// SHA256 of the .deb (as in apt's index, verified after download).
    pub deb_sha256: String,
    /// Kernel release (`uname -r` in the guest), e.g. `6.12.117+deb12-cloud-amd64`.
    pub release: String,
}

/// One module in the initramfs, in load order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestModule {
    pub name: String,
    /// Absolute guest path of the uncompressed `.ko`.
    pub path: String,
}

/// Describes one built image; stored as `manifest.json` next to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Cache key (hex SHA-256 over every input); names the cache directory.
    pub key: String,
    pub kernel: KernelInfo,
    /// SHA256 of the agent binary used as `/init`.
    pub agent_sha256: String,
    pub compression: Compression,
    /// Modules in the order the agent loads them (as in `/etc/husk/modules.load`).
    pub modules: Vec<ManifestModule>,
    /// Requested modules that are built into this kernel.
    pub builtin_modules: Vec<String>,
    /// Size of the uncompressed cpio archive.
    pub initrd_uncompressed_size: u64,
    pub vmlinuz: FileInfo,
    pub initrd: FileInfo,
}

/// A built (or found) image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Path of the kernel (in the install directory).
    pub kernel: PathBuf,
    /// Path of the initramfs (in the install directory).
    pub initrd: PathBuf,
    pub manifest: Manifest,
    /// True when the cache already held this image and nothing was built.
    pub cached: bool,
}

/// The inputs hashed into the cache key. Serialised as JSON (fixed field
/// order) and hashed, so adding a field changes every key, as it should.
#[derive(Serialize)]
struct KeyInputs<'a> {
    format_version: u32,
    kernel_deb_sha256: &'a str,
    agent_sha256: &'a str,
    modules: &'a [String],
    compression: Compression,
}

/// Cache key for a set of inputs.
pub fn cache_key(
    kernel_deb_sha256: &str,
    agent_sha256: &str,
    modules: &[String],
    compression: Compression,
) -> String {
    let inputs = KeyInputs {
        format_version: FORMAT_VERSION,
        kernel_deb_sha256,
        agent_sha256,
        modules,
        compression,
    };
    // Serialising a struct of strings cannot fail.
    let json = serde_json::to_vec(&inputs).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Reads the agent and checks it can run as `/init` in an initramfs that has
/// no dynamic loader: an ELF executable without a `PT_INTERP` segment.
fn read_agent(path: &Path) -> Result<Vec<u8>, Error> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::BadAgent {
        path: path.to_path_buf(),
        reason,
    };
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&data[..])
        .map_err(|e| bad(format!("not a 64-bit ELF executable ({e})")))?;
    use object::read::elf::ProgramHeader;
    use object::read::Object;
    let endian = elf.endian();
    let dynamic = elf
        .elf_program_headers()
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP);
    if dynamic {
        return Err(bad(
            "dynamically linked (has an ELF interpreter); the initramfs has no libc, \
             build the agent statically (e.g. -C target-feature=+crt-static)"
                .to_string(),
        ));
    }
    if elf.kind() != object::ObjectKind::Executable && elf.kind() != object::ObjectKind::Dynamic {
        return Err(bad("not an executable".to_string()));
    }
    Ok(data)
}

fn read_manifest(path: &Path) -> Result<Manifest, Error> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::BadManifest {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Checks that `dir` holds the image `manifest` describes, byte for byte.
fn verify_files(dir: &Path, manifest: &Manifest) -> Result<(), String> {
    for (file, info) in [
        (KERNEL_FILE, &manifest.vmlinuz),
        (INITRD_FILE, &manifest.initrd),
    ] {
        let path = dir.join(file);
        let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() != info.size {
            return Err(format!(
                "{} is {} bytes, manifest says {}",
                path.display(),
                meta.len(),
                info.size
            ));
        }
        let sum = apt::sha256_file(&path).map_err(|e| e.to_string())?;
        if sum != info.sha256 {
            return Err(format!(
                "{} SHA256 {sum} does not match the manifest",
                path.display()
            ));
        }
    }
    Ok(())
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), Error> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(data).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Assembles the initramfs tree and returns it with the module list.
fn initramfs_tree(
    agent: Vec<u8>,
    kernel: &KernelTree,
    requested: &[String],
) -> Result<(initramfs::Tree, Vec<ManifestModule>, Vec<String>), Error> {
    let release = &kernel.release;
    let resolved = kernel.resolve_modules(requested)?;

    let mut tree = initramfs::Tree::new();
    tree.file("init", 0o755, agent)?;
    let mut listed = Vec::new();
    let mut load = String::new();
    for m in &resolved.load_order {
        let data = kernel.read_module(m)?;
        let guest = format!("/lib/modules/{release}/{}", m.rel);
        tree.file(&guest, 0o644, data)?;
        load.push_str(&guest);
        load.push('\n');
        listed.push(ManifestModule {
            name: m.name.clone(),
            path: guest,
        });
    }
    tree.file(MODULES_LOAD_PATH, 0o644, load.into_bytes())?;
    for d in ["proc", "sys", "dev", "run", "etc"] {
        tree.dir(d, 0o755)?;
    }
    tree.dir("tmp", 0o1777)?;
    // Without /dev/console the kernel starts /init with fds 0-2 closed, and
    // anything the agent prints before it mounts devtmpfs (including a Rust
    // panic message) is lost.
    tree.char_dev("dev/console", 0o600, 5, 1)?;
    Ok((tree, listed, resolved.builtin))
}

/// Builds the image into a fresh directory under `images/`, renamed into
/// place only when complete.
fn build_into_cache(
    opts: &BuildOptions,
    pkg: &apt::KernelPackage,
    agent: Vec<u8>,
    agent_sha256: &str,
    key: &str,
    images: &Path,
) -> Result<Manifest, Error> {
    let kernel = kernel::tree_for(pkg, &opts.cache_dir)?;
    let (tree, listed, builtin) = initramfs_tree(agent, &kernel, &opts.modules)?;
    let cpio = tree.to_cpio()?;
    let initrd = initramfs::compress(&cpio, opts.compression)?;
    let vmlinuz = std::fs::read(&kernel.vmlinuz).map_err(|e| Error::io(&kernel.vmlinuz, e))?;

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        key: key.to_string(),
        kernel: KernelInfo {
            requested_package: pkg.requested.clone(),
            package: pkg.package.clone(),
            version: pkg.version.clone(),
            deb_sha256: pkg.sha256.clone(),
            release: kernel.release.clone(),
        },
        agent_sha256: agent_sha256.to_string(),
        compression: opts.compression,
        modules: listed,
        builtin_modules: builtin,
        initrd_uncompressed_size: cpio.len() as u64,
        vmlinuz: FileInfo {
            size: vmlinuz.len() as u64,
            sha256: sha256_bytes(&vmlinuz),
        },
        initrd: FileInfo {
            size: initrd.len() as u64,
            sha256: sha256_bytes(&initrd),
        },
    };

    let staging = tempfile::Builder::new()
        .prefix(&format!(".build-{key}-"))
        .tempdir_in(images)
        .map_err(|e| Error::io(images, e))?;
    write_synced(&staging.path().join(KERNEL_FILE), &vmlinuz)?;
    write_synced(&staging.path().join(INITRD_FILE), &initrd)?;
    write_synced(
        &staging.path().join(MANIFEST_FILE),
        &manifest_json(&manifest),
    )?;
    sync_dir(staging.path())?;
    let final_dir = images.join(key);
    let staged = staging.keep();
    match std::fs::rename(&staged, &final_dir) {
        Ok(()) => sync_dir(images)?,
        Err(e) => {
            // Another build of the same key won the race; its result is
            // byte-identical, so ours is discarded.
            let _ = std::fs::remove_dir_all(&staged);
            if !final_dir.join(MANIFEST_FILE).is_file() {
                return Err(Error::io(&final_dir, e));
            }
        }
    }
    Ok(manifest)
}

fn manifest_json(m: &Manifest) -> Vec<u8> {
    // Serialising plain data cannot fail.
    let mut v = serde_json::to_vec_pretty(m).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Copies the cached image into the install directory.
///
/// Copies, not symlinks: `/var/cache` may be wiped at any time (FHS), and the
/// installed image must survive that. Each file is written to a temporary
/// name and renamed; the manifest is removed first and written last, so an
/// interrupted install leaves no manifest (reported as "not installed"), and
/// [`installed`] verifies both files against the manifest's digests.
fn install(image_dir: &Path, out_dir: &Path, manifest: &Manifest) -> Result<(), Error> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    if let Ok(current) = read_manifest(&out_dir.join(MANIFEST_FILE)) {
        if current == *manifest && verify_files(out_dir, manifest).is_ok() {
            return Ok(());
        }
    }
    let manifest_path = out_dir.join(MANIFEST_FILE);
    match std::fs::remove_file(&manifest_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&manifest_path, e)),
    }
    for file in [KERNEL_FILE, INITRD_FILE, MANIFEST_FILE] {
        let src = image_dir.join(file);
        // A unique temp name per installer, removed if anything fails.
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{file}."))
            .tempfile_in(out_dir)
            .map_err(|e| Error::io(out_dir, e))?;
        let mut from = std::fs::File::open(&src).map_err(|e| Error::io(&src, e))?;
        std::io::copy(&mut from, tmp.as_file_mut()).map_err(|e| Error::io(tmp.path(), e))?;
        tmp.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| Error::io(tmp.path(), e))?;
        let dst = out_dir.join(file);
        tmp.persist(&dst).map_err(|e| Error::io(&dst, e.error))?;
        if file == INITRD_FILE {
            // The manifest must not become visible before the data it names.
            sync_dir(out_dir)?;
        }
    }
    sync_dir(out_dir)
}

/// Removes work directories and temp files left behind by builds that were
/// killed (they are removed on every other exit path). Only old ones, so a build
/// running concurrently in another process keeps its own.
fn sweep_stale(dir: &Path, prefixes: &[&str]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            tracing::info!(path = %entry.path().display(), "removing a stale build directory");
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// A build takes seconds; anything this old was left by a killed build.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Builds (or finds in the cache) the guest image for `opts` and installs it
/// into `opts.out_dir`.
pub fn build(opts: &BuildOptions) -> Result<BuiltImage, Error> {
    let started = Instant::now();
    // Work directories of builds before the kernel tree had its own cache.
    sweep_stale(&opts.cache_dir, &[".unpack-"]);
    sweep_stale(&opts.cache_dir.join("images"), &[".build-"]);
    sweep_stale(&opts.cache_dir.join("debs"), &[".download-"]);
    sweep_stale(
        &opts.out_dir,
        &[".vmlinuz.", ".initrd.img.", ".manifest.json."],
    );
    let agent = read_agent(&opts.agent)?;
    let agent_sha256 = sha256_bytes(&agent);
    let pkg = apt::resolve(&opts.kernel_package)?;
    let key = cache_key(&pkg.sha256, &agent_sha256, &opts.modules, opts.compression);
    tracing::info!(package = %pkg.package, version = %pkg.version, %key, "guest image inputs");

    let images = opts.cache_dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let image_dir = images.join(&key);

    let cached = match read_manifest(&image_dir.join(MANIFEST_FILE)) {
        Ok(m) if m.key == key => match verify_files(&image_dir, &m) {
            Ok(()) => Some(m),
            Err(why) => {
                tracing::warn!(dir = %image_dir.display(), %why, "cached image is damaged; rebuilding");
                None
            }
        },
        _ => None,
    };
    let (manifest, was_cached) = match cached {
        Some(m) => (m, true),
        None => {
            if image_dir.exists() {
                std::fs::remove_dir_all(&image_dir).map_err(|e| Error::io(&image_dir, e))?;
            }
            let m = build_into_cache(opts, &pkg, agent, &agent_sha256, &key, &images)?;
            (m, false)
        }
    };
    install(&image_dir, &opts.out_dir, &manifest)?;
    tracing::info!(
        cached = was_cached,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "guest image ready"
    );
    Ok(BuiltImage {
        kernel: opts.out_dir.join(KERNEL_FILE),
        initrd: opts.out_dir.join(INITRD_FILE),
        manifest,
        cached: was_cached,
    })
}

/// Reads the image installed in `out_dir`, verifying the kernel and initrd
/// against the manifest's sizes and digests.
pub fn installed(out_dir: impl AsRef<Path>) -> Result<BuiltImage, Error> {
    let out_dir = out_dir.as_ref();
    let not_installed = |missing: &str| Error::NotInstalled {
        dir: out_dir.to_path_buf(),
        missing: missing.to_string(),
    };
    let manifest_path = out_dir.join(MANIFEST_FILE);
    if !manifest_path.is_file() {
        return Err(not_installed(MANIFEST_FILE));
    }
    for file in [KERNEL_FILE, INITRD_FILE] {
        if !out_dir.join(file).is_file() {
            return Err(not_installed(file));
        }
    }
    let manifest = read_manifest(&manifest_path)?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(Error::InconsistentInstall {
            dir: out_dir.to_path_buf(),
            detail: format!(
                "manifest format {} but this husk reads format {FORMAT_VERSION}",
                manifest.format_version
            ),
        });
    }
    verify_files(out_dir, &manifest).map_err(|detail| Error::InconsistentInstall {
        dir: out_dir.to_path_buf(),
        detail,
    })?;
    Ok(BuiltImage {
        kernel: out_dir.join(KERNEL_FILE),
        initrd: out_dir.join(INITRD_FILE),
        manifest,
        cached: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mods(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cache_key_is_stable_and_covers_every_input() {
        let base = cache_key("aa", "bb", &mods(&["x", "y"]), Compression::Gzip);
        assert_eq!(
            base,
            cache_key("aa", "bb", &mods(&["x", "y"]), Compression::Gzip)
        );
        assert_eq!(base.len(), 64);
        let variants = [
            cache_key("ab", "bb", &mods(&["x", "y"]), Compression::Gzip),
            cache_key("aa", "bc", &mods(&["x", "y"]), Compression::Gzip),
            cache_key("aa", "bb", &mods(&["y", "x"]), Compression::Gzip),
            cache_key("aa", "bb", &mods(&["x"]), Compression::Gzip),
            cache_key("aa", "bb", &mods(&["xy"]), Compression::Gzip),
            cache_key("aa", "bb", &mods(&["x", "y"]), Compression::Zstd),
            cache_key("aa", "bb", &mods(&["x", "y"]), Compression::None),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(&base, v, "variant {i}");
            for w in &variants[i + 1..] {
                assert_ne!(v, w);
            }
        }
    }

    #[test]
    fn agent_must_be_a_static_elf() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let err = read_agent(&script).unwrap_err().to_string();
        assert!(err.contains("not a 64-bit ELF"), "{err}");
        // /bin/sh on Debian is dynamically linked.
        let err = read_agent(Path::new("/bin/sh")).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        // busybox-static is the stand-in the brief names.
        read_agent(Path::new("/bin/busybox")).expect("busybox-static is a static ELF");
        let err = read_agent(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }

    fn fake_manifest(vmlinuz: &[u8], initrd: &[u8]) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            key: "k".into(),
            kernel: KernelInfo {
                requested_package: "m".into(),
                package: "p".into(),
                version: "v".into(),
                deb_sha256: "d".into(),
                release: "r".into(),
            },
            agent_sha256: "a".into(),
            compression: Compression::None,
            modules: vec![],
            builtin_modules: vec![],
            initrd_uncompressed_size: initrd.len() as u64,
            vmlinuz: FileInfo {
                size: vmlinuz.len() as u64,
                sha256: sha256_bytes(vmlinuz),
            },
            initrd: FileInfo {
                size: initrd.len() as u64,
                sha256: sha256_bytes(initrd),
            },
        }
    }

    #[test]
    fn install_then_installed_round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        let out = dir.path().join("out");
        std::fs::create_dir(&image).unwrap();
        let m = fake_manifest(b"kernel", b"initrd");
        std::fs::write(image.join(KERNEL_FILE), b"kernel").unwrap();
        std::fs::write(image.join(INITRD_FILE), b"initrd").unwrap();
        std::fs::write(image.join(MANIFEST_FILE), manifest_json(&m)).unwrap();

        let err = installed(&out).unwrap_err().to_string();
        assert!(
            err.contains("manifest.json") && err.contains("make guest-image"),
            "{err}"
        );

        install(&image, &out, &m).unwrap();
        let got = installed(&out).unwrap();
        assert_eq!(got.manifest, m);
        assert_eq!(got.kernel, out.join(KERNEL_FILE));
        // Copies, not links: removing the cache keeps the install valid.
        std::fs::remove_dir_all(&image).unwrap();
        installed(&out).unwrap();

        std::fs::write(out.join(INITRD_FILE), b"initrX").unwrap();
        let err = installed(&out).unwrap_err();
        assert!(matches!(err, Error::InconsistentInstall { .. }), "{err}");
        std::fs::remove_file(out.join(KERNEL_FILE)).unwrap();
        let err = installed(&out).unwrap_err().to_string();
        assert!(err.contains("vmlinuz is missing"), "{err}");
    }
}
