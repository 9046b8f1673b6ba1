//! Shared harness of husk's end-to-end tests and benchmarks: where the
//! binaries and the guest image are (environment variables with defaults;
//! anything missing is an error, never a skip), OCI specs, and checks that
//! a stopped sandbox left nothing behind.
//!
//! Environment:
//! - `HUSK_GUEST_DIR` (default /var/lib/husk/guest): vmlinuz + initrd.img
//! - `HUSK_VSOCK_BIN`, `HUSK_QEMU_BIN`, `HUSK_VIRTIOFSD_BIN`: explicit binaries
//!   (else PATH, `HUSK_BIN_DIR` and the usual locations)
//! - `HUSK_TEST_STATE_DIR` (default /run/husk/test-sandboxes)
//! - `HUSK_TEST_HYPERVISOR`: the backend every sandbox and huskd handler of
//!   the suite uses: `auto` (default: the builtin husk-vmm where the host
//!   has hardware virtualization, QEMU otherwise), `qemu` or `builtin`
//!   (which fails at once, naming the reason, on a host without VT-x/SVM).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use husk_proto::agent::StdioConfig;
use husk_runtime::components::{GuestImage, DEFAULT_GUEST_DIR};
use husk_runtime::hypervisor::{self, HypervisorChoice, QemuPaths};
use husk_runtime::{Hypervisor, Rootfs, Sandbox, SandboxConfig};
use husk_testkit::{env_path, read_all};

pub mod cni;
pub mod cpio;
pub mod cri_client;
pub mod huskd;
pub mod pods;
pub use husk_testkit::registry;

/// Everything a test needs to start sandboxes.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub hypervisor: Arc<dyn Hypervisor>,
    /// `HUSK_TEST_HYPERVISOR` as written in huskd handler configs.
    pub hypervisor_choice: String,
    pub qemu: QemuPaths,
    pub guest: GuestImage,
    pub virtiofsd: PathBuf,
    pub state_dir: PathBuf,
}

impl TestEnv {
    /// Resolves every part; the error names what is missing and how to get it.
    pub fn from_env() -> Result<Self> {
        init_tracing();
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the end-to-end tests need root (mounts, QEMU, virtiofsd)");
        }
        let guest_dir = env_path("HUSK_GUEST_DIR").unwrap_or_else(|| DEFAULT_GUEST_DIR.into());
        let guest = GuestImage::from_dir(&guest_dir)?;
        let qemu = QemuPaths::resolve(
            env_path("HUSK_QEMU_BIN").as_deref(),
            None,
            env_path("HUSK_VSOCK_BIN").as_deref(),
        )?;
        let virtiofsd =
            husk_runtime::virtiofsd::find_virtiofsd(env_path("HUSK_VIRTIOFSD_BIN").as_deref())?;
        let choice_name = std::env::var("HUSK_TEST_HYPERVISOR")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "auto".into());
        let choice: HypervisorChoice = choice_name
            .parse()
            .with_context(|| format!("HUSK_TEST_HYPERVISOR={choice_name:?}"))?;
        let q = qemu.clone();
        let hypervisor: Arc<dyn Hypervisor> = hypervisor::select(choice, || Ok(q))
            .with_context(|| format!("HUSK_TEST_HYPERVISOR={choice_name}"))?
            .into();
        // Said once per test binary, so a log shows which backend ran.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            eprintln!(
                "husk tests: HUSK_TEST_HYPERVISOR={choice_name}: {}",
                hypervisor.description()
            )
        });
        let state_dir =
            env_path("HUSK_TEST_STATE_DIR").unwrap_or_else(|| "/run/husk/test-sandboxes".into());
        Ok(Self {
            hypervisor,
            hypervisor_choice: choice_name,
            qemu,
            guest,
            virtiofsd,
            state_dir,
        })
    }

    /// A sandbox config with the test defaults.
    pub fn sandbox_config(&self, id: &str) -> SandboxConfig {
        let mut c = SandboxConfig::new(
            id,
            self.hypervisor.clone(),
            self.guest.clone(),
            self.virtiofsd.clone(),
        );
        c.state_dir = self.state_dir.clone();
        c
    }
}

/// A short unique id: sandbox paths must fit in a unix socket address.
pub fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A default OCI spec running `args` without a terminal.
pub fn spec_for(args: &[&str]) -> Result<oci_spec::runtime::Spec> {
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec
        .process()
        .clone()
        .context("default spec has a process")?;
    process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    Ok(spec)
}

/// An OCI process for exec.
pub fn process_for(args: &[&str]) -> Result<oci_spec::runtime::Process> {
    let mut p = oci_spec::runtime::Spec::default()
        .process()
        .clone()
        .context("default process")?;
    p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    p.set_terminal(Some(false));
    Ok(p)
}

/// A short-lived container `c1` on `rootfs`: its stdout, its stderr and
/// its exit code each arrive, and it can be removed.
pub async fn run_short_lived_container(sb: &Sandbox, rootfs: &Path) -> Result<()> {
    let stdio = StdioConfig {
        stdin: false,
        terminal: false,
    };
    let spec = spec_for(&["sh", "-c", "echo hello; echo oops >&2; exit 3"])?;
    sb.create_container("c1", spec, Rootfs::Bind(rootfs.into()), stdio)
        .await?;
    let io = sb.attach_stdio("c1", "", stdio).await?;
    sb.start_container("c1").await?;
    let (out, err) = tokio::try_join!(read_all(Some(io.stdout)), read_all(io.stderr))?;
    let exit = tokio::time::timeout(Duration::from_secs(60), sb.wait("c1", "")).await??;
    ensure!(
        out == b"hello\n",
        "stdout {:?}",
        String::from_utf8_lossy(&out)
    );
    ensure!(
        err == b"oops\n",
        "stderr {:?}",
        String::from_utf8_lossy(&err)
    );
    ensure!(exit.exit_code == 3, "exit {exit:?}");
    sb.remove_container("c1", false).await?;
    Ok(())
}

/// After a failed test, the end of the guest's console: where a cause
/// inside the VM shows.
pub fn show_console_if_failed<T>(sb: &Sandbox, r: &Result<T>) {
    if r.is_err() {
        eprintln!(
            "--- console of {} ---\n{}",
            sb.id(),
            husk_runtime::sandbox::console_tail(&sb.console_log(), 60)
        );
    }
}

/// What a sandbox must not leave behind once stopped.
#[derive(Debug, Clone)]
pub struct LeakProbe {
    pub dir: PathBuf,
    pub pids: Vec<(&'static str, u32)>,
}

impl LeakProbe {
    pub fn of(sb: &Sandbox) -> Self {
        Self {
            dir: sb.dir().to_path_buf(),
            pids: sb.pids().to_vec(),
        }
    }

    /// Fails naming every leftover: a process of the sandbox (by pid, or any
    /// process whose command line mentions the sandbox directory), a mount
    /// under it, or the directory itself (with its sockets).
    pub fn assert_clean(&self) -> Result<()> {
        let mut problems = Vec::new();
        for (role, pid) in &self.pids {
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                problems.push(format!("{role} pid {pid} still exists: {}", stat.trim()));
            }
        }
        let needle = self.dir.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc")?.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&needle) {
                    problems.push(format!("process {pid} mentions the sandbox dir: {cmd}"));
                }
            }
        }
        let mounts = husk_runtime::mounts::mounts_under(&self.dir)?;
        if !mounts.is_empty() {
            problems.push(format!("mounts left: {mounts:?}"));
        }
        if self.dir.exists() {
            let entries: Vec<_> = std::fs::read_dir(&self.dir)?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            problems.push(format!("{} still exists: {entries:?}", self.dir.display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("sandbox left things behind:\n  {}", problems.join("\n  "))
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so no data set is needed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub use husk_testkit::sha256_hex;
