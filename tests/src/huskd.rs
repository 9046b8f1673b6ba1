//! A real `huskd` process for CRI tests and benchmarks: a config in a temp
//! dir (root, state and socket in temp dirs, the local registry insecure,
//! a second handler `big`), started and stopped by signal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::cni::TestCniNetwork;
use crate::TestEnv;

/// Guest memory and vCPUs of the `big` handler.
pub const BIG_MEMORY_MIB: u32 = 512;
pub const BIG_VCPUS: u32 = 2;
/// The console log cap of the test huskd: small, so a flood test passes it quickly.
pub const CONSOLE_LOG_MAX_BYTES: u64 = 65536;

/// The directories of one huskd instance; they outlive restarts.
#[derive(Debug)]
pub struct HuskdDirs {
    /// Holds root, config, logs.
    pub top: tempfile::TempDir,
    /// The state dir sits in /run with a short name: sandbox sockets are
    /// `STATE/sandboxes/<64 hex>/vhost-vsock.sock` and must fit in 107 bytes.
    pub state: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The pods' CNI network.
    pub net: TestCniNetwork,
}

impl HuskdDirs {
    /// Fails unless no pod sandbox is left: nothing under the sandboxes
    /// directory (processes, mounts, sockets), and no directory either.
    pub fn assert_sandboxes_gone(&self) -> Result<()> {
        let sandboxes = self.state.path().join("sandboxes");
        assert_nothing_left(&sandboxes)?;
        ensure!(
            std::fs::read_dir(&sandboxes)?.count() == 0,
            "sandbox dirs left"
        );
        self.assert_networks_gone()
    }

    /// Fails unless no pod network is left: no network namespace under the
    /// state dir, no IP allocated, no veth on the test bridge.
    pub fn assert_networks_gone(&self) -> Result<()> {
        let netns = self.state.path().join("netns");
        // `.cni` holds huskd's records of set-up networks; it may stay,
        // empty.
        let records = std::fs::read_dir(netns.join(".cni"))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default();
        ensure!(records.is_empty(), "CNI records left: {records:?}");
        let left: Vec<_> = std::fs::read_dir(&netns)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| n != ".cni")
                    .collect()
            })
            .unwrap_or_default();
        ensure!(
            left.is_empty(),
            "network namespaces left in {}: {left:?}",
            netns.display()
        );
        self.net.assert_released()
    }

    /// Writes the config. `insecure`: registries as `host:port`.
    pub fn new(env: &TestEnv, insecure: &[&str]) -> Result<Self> {
        let top = tempfile::Builder::new().prefix("husk-cri-").tempdir()?;
        let state = tempfile::Builder::new().prefix("hc").tempdir_in("/run")?;
        let root = top.path().join("root");
        let socket = state.path().join("husk.sock");
        let config = top.path().join("config.toml");
        let log = top.path().join("huskd.log");
        let kernel = &env.guest.kernel;
        let initrd = &env.guest.initrd;
        let hv = &env.hypervisor_choice;
        let handler = |vcpus: u32, mem: u32| {
            format!(
                "hypervisor = {hv:?}\nvcpus = {vcpus}\nmemory_mib = {mem}\nkernel = {kernel:?}\ninitrd = {initrd:?}\n"
            )
        };
        let text = format!(
            "root = {root:?}\nstate = {state:?}\nlisten = {socket:?}\nlog_level = \"info,husk_runtime=debug\"\n\
             virtiofsd = {virtiofsd:?}\nqemu = {qemu:?}\nhusk_vsock = {vsock:?}\n\
             sandbox_ready_timeout_secs = 120\nconsole_log_max_bytes = {CONSOLE_LOG_MAX_BYTES}\n\
             [registry]\ninsecure = {insecure:?}\n\
             [handlers.husk]\n{default}\n[handlers.big]\n{big}host_namespaces = \"refuse\"\n\
             [handlers.os]\nhypervisor = \"none\"\n",
            state = state.path(),
            virtiofsd = env.virtiofsd,
            qemu = env.qemu.qemu,
            vsock = env.qemu.husk_vsock,
            default = handler(1, 256),
            big = handler(BIG_VCPUS, BIG_MEMORY_MIB),
        );
        let net = TestCniNetwork::new(&top.path().join("cni"))?;
        std::fs::write(&config, format!("{text}\n{}", net.toml()))?;
        Ok(Self {
            top,
            state,
            config,
            socket,
            log,
            net,
        })
    }

    pub fn root(&self) -> PathBuf {
        self.top.path().join("root")
    }

    /// SIGKILLs every process that names the state dir (pod VMs outlive
    /// huskd by design, so a test that failed before removing its pods
    /// leaves them) and unmounts what is left under it. Returns what it
    /// killed.
    pub fn kill_leftovers(&self) -> Vec<String> {
        let dir = self.state.path();
        let left = processes_mentioning(dir);
        for l in &left {
            if let Some(pid) = l.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !processes_mentioning(dir).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = husk_runtime::mounts::unmount_all_under(dir);
        left
    }
}

impl Drop for HuskdDirs {
    /// Runs after the test's huskd is gone (declared after the dirs, so
    /// dropped first): nothing of its pods may outlive the test.
    fn drop(&mut self) {
        let left = self.kill_leftovers();
        if !left.is_empty() {
            eprintln!("killed pod processes left by the test: {left:?}");
        }
    }
}

/// The huskd binary: `HUSK_HUSKD_BIN`, else the husk binary directories.
pub fn huskd_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HUSK_HUSKD_BIN").filter(|v| !v.is_empty()) {
        return Ok(p.into());
    }
    let dirs = husk_runtime::components::husk_binary_dirs();
    dirs.iter()
        .map(|d| d.join("huskd"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "huskd not found in {dirs:?}: cargo build -p husk-runtime --bin huskd, or set HUSK_HUSKD_BIN"
            )
        })
}

/// A running huskd. Tests stop it with [`Huskd::terminate`] to check
/// the clean path; dropping it terminates it as well. Pod VMs outlive huskd
/// (the next huskd adopts them): [`HuskdDirs`] kills what is left.
#[derive(Debug)]
pub struct Huskd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Huskd {
    /// Starts huskd on `dirs` and waits for its socket to answer Version.
    pub async fn start(dirs: &HuskdDirs) -> Result<Huskd> {
        let bin = huskd_bin()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&dirs.log)?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&dirs.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut h = Huskd {
            child: Some(child),
            socket: dirs.socket.clone(),
            log: dirs.log.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(st))) = h.child.as_mut().map(|c| c.try_wait()) {
                h.child = None;
                bail!("huskd exited at start: {st}\n{}", h.log_tail(40));
            }
            if h.socket.exists() {
                if let Ok((mut rt, _)) = h.clients().await {
                    if rt
                        .version(k8s_cri::v1::VersionRequest::default())
                        .await
                        .is_ok()
                    {
                        return Ok(h);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("huskd did not answer in 30 s\n{}", h.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub async fn clients(
        &self,
    ) -> Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>)> {
        crate::cri_client::clients(&self.socket)
            .await
            .with_context(|| format!("connecting to {}", self.socket.display()))
    }

    /// The last `n` lines of huskd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL (a crash): huskd gets no chance to clean anything up.
    pub fn kill(&mut self) -> Result<()> {
        let mut c = self.child.take().context("huskd is not running")?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("huskd is not running");
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "huskd did not exit {timeout:?} after SIGTERM\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends a run whose result is `r`: on failure shows the last
    /// `log_lines` of huskd's log (the likely cause), then terminates huskd
    /// either way and requires a clean exit once `r` passed.
    pub async fn finish(&mut self, r: Result<()>, log_lines: usize) -> Result<()> {
        if r.is_err() {
            eprintln!("--- huskd log ---\n{}", self.log_tail(log_lines));
        }
        let st = self.terminate(Duration::from_secs(60)).await?;
        r?;
        ensure!(st.success(), "huskd exited with {st}");
        Ok(())
    }
}

impl Drop for Huskd {
    /// SIGTERM first so that huskd exits cleanly; SIGKILL after 30 s.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Processes whose command line mentions `dir` (VMMs, virtiofsd,
/// husk-vsock of pods under a huskd state dir).
pub fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&needle) {
                    v.push(format!("{pid}: {cmd}"));
                }
            }
        }
    }
    v
}

/// Fails naming leftovers under `dir`: processes mentioning it, mounts, and
/// sockets.
pub fn assert_nothing_left(dir: &Path) -> Result<()> {
    let mut problems = processes_mentioning(dir);
    let mounts = husk_runtime::mounts::mounts_under(dir)?;
    if !mounts.is_empty() {
        problems.push(format!("mounts left: {mounts:?}"));
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            use std::os::unix::fs::FileTypeExt;
            if ft.is_socket() {
                problems.push(format!("socket left: {}", e.path().display()));
            } else if ft.is_dir() {
                stack.push(e.path());
            }
        }
    }
    ensure!(
        problems.is_empty(),
        "left behind under {}:\n  {}",
        dir.display(),
        problems.join("\n  ")
    );
    Ok(())
}
