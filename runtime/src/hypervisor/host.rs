//! The host backend: pods as OS containers on the host kernel, no VM
//! (frakti's hybrid runtime). It serves the pods a VM cannot hold (host
//! network, PID or IPC namespace) and handlers with `hypervisor = "none"`,
//! and it is what huskd's fast unit tests run on.
//!
//! The real `husk-agent` runs on the host in its unix-socket mode
//! (`--listen-unix`) as the pod's supervisor, creating containers with
//! libcontainer exactly as it does in a guest. A small hybrid-vsock shim on
//! the sandbox's vsock socket maps `CONNECT 1024` / `CONNECT 1025` to the
//! agent's ttrpc and stream sockets, as a VMM's hybrid vsock maps them to
//! guest ports, so every code path above the backend is the VM pods' one.
//! The agent's ready notice reaches the sandbox's ready listener through a
//! symlink.
//!
//! The agent runs in its own mount namespace (a slave of the host's) with
//! the share bind-mounted at the guest's path; in the pod's network
//! namespace unless the pod uses the host's; in a private IPC namespace
//! unless the pod uses the host's, and with a private UTS namespace named
//! after the pod unless it uses the host's network. Containers get a PID
//! namespace each unless the pod uses the host's (the container spec
//! says which).
//!
//! The shim runs as a task of the process that launched or adopted the
//! pod; the agent is the recorded process.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_proto::ports::{READY_PORT, STREAM_PORT, TTRPC_PORT};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use super::adopted::{AdoptedControl, AdoptedVm};
use super::{Backend, Hypervisor, HypervisorError, Vm, VmConfig, VmRecord};
use crate::agent::guest_to_host_path;
use crate::process::ManagedChild;
use crate::sandbox::SandboxPaths;

const ROLE_AGENT: &str = "husk-agent";
/// Parent of every host pod's container cgroups (`<root>/<sandbox id>`).
pub const CGROUP_ROOT: &str = "husk-host";

/// Ends what a host pod leaves once its agent is gone: in a VM
/// the containers die with the guest, here they are host processes in
/// the cgroups below `<CGROUP_ROOT>/<id>`. They are SIGKILLed, then the
/// cgroups removed, in every hierarchy.
fn remove_cgroups(id: &str) {
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let parents: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path().join(CGROUP_ROOT).join(id))
        .filter(|p| p.is_dir())
        .collect();
    let children = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    for _ in 0..50 {
        let mut alive = false;
        for p in &parents {
            for c in children(p) {
                let procs = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                    alive = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &parents {
        for c in children(p) {
            let _ = std::fs::remove_dir(c);
        }
        let _ = std::fs::remove_dir(p);
    }
}

/// The host backend's entry points for adoption and orphan cleanup.
pub static BACKEND: Backend = Backend {
    name: "host",
    adopt: |record, id, _timeout| Box::pin(adopt(record, id)),
    // The agent names the sandbox directory on its command line: the
    // caller's kill of what names the directory stops it.
    reap_orphan: |_dir, _timeout| Box::pin(async {}),
};

/// The host backend's part of a [`VmRecord`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HostState {
    uds: PathBuf,
    agent_dir: PathBuf,
    log: PathBuf,
}

/// Runs `husk-agent` on the host instead of booting a VM.
#[derive(Debug)]
pub struct HostBackend {
    agent: PathBuf,
}

impl HostBackend {
    pub fn new(agent: PathBuf) -> Self {
        Self { agent }
    }
}

#[async_trait::async_trait]
impl Hypervisor for HostBackend {
    fn name(&self) -> &'static str {
        BACKEND.name
    }

    fn description(&self) -> &str {
        "host: OS containers on the host kernel, husk-agent as the pod's supervisor (no VM)"
    }

    fn boots_guest(&self) -> bool {
        false
    }

    async fn launch(&self, config: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError> {
        // One letter: DIR/stream.sock must fit a unix socket address, as
        // the hybrid vsock path does (VmConfig::validate).
        let agent_dir = config.sandbox_dir.join("a");
        std::fs::create_dir_all(&agent_dir)
            .map_err(|e| HypervisorError::io(format!("create {}", agent_dir.display()), e))?;
        // The agent sends its ready notice to DIR/ready.sock; the sandbox
        // listens where a VMM would forward the guest's port 1023.
        std::os::unix::fs::symlink(
            guest_to_host_path(&config.vsock.uds, READY_PORT),
            agent_dir.join("ready.sock"),
        )
        .map_err(|e| HypervisorError::io("link the ready socket", e))?;
        let shim = Shim::start(&config.vsock.uds, &agent_dir)?;
        let log = config.sandbox_dir.join("agent.log");
        let share = SandboxPaths::new(&config.sandbox_dir).share;
        // The agent finds container root filesystems and pod files under
        // GUEST_SHARE_DIR, as in a VM: it runs in its own mount namespace
        // (a slave of the host's) with the share bind-mounted there, and
        // the share is a shared mount (sandbox::share::create), so overlays
        // huskd mounts in it later appear in the agent's view as they do
        // through virtio-fs.
        let mut script = format!(
            "mkdir -p {guest} && mount --bind \"$0\" {guest}",
            guest = husk_proto::GUEST_SHARE_DIR
        );
        let mut unshare = vec!["--mount", "--propagation", "slave"];
        if !config.host.ipc {
            unshare.push("--ipc");
        }
        // The hostname travels as an argument, never inside the script:
        // what the CRI layer checked is not re-trusted here. Empty (the
        // host's UTS namespace): the host's name is left alone.
        let hostname = if config.host.network {
            ""
        } else {
            unshare.push("--uts");
            config.host.hostname.as_str()
        };
        script.push_str(" && { [ -z \"$1\" ] || hostname \"$1\"; } && shift && exec \"$@\"");
        let cgroup_parent = format!("{CGROUP_ROOT}/{}", config.id);
        // The pod's network namespace, unless it has the host's: the agent
        // and so its containers join it.
        let (program, mut args): (&Path, Vec<std::ffi::OsString>) =
            match config.net.as_ref().filter(|_| !config.host.network) {
                Some(net) => (
                    Path::new("/usr/bin/nsenter"),
                    vec![
                        format!("--net={}", net.netns.display()).into(),
                        "/usr/bin/unshare".into(),
                    ],
                ),
                None => (Path::new("/usr/bin/unshare"), Vec::new()),
            };
        args.extend(unshare.into_iter().map(Into::into));
        args.extend(
            [
                "sh".as_ref(),
                "-c".as_ref(),
                script.as_ref(),
                share.as_os_str(),
                hostname.as_ref(),
                self.agent.as_os_str(),
                "--listen-unix".as_ref(),
                agent_dir.as_os_str(),
                "--cgroup-parent".as_ref(),
                std::ffi::OsStr::new(&cgroup_parent),
            ]
            .map(Into::into),
        );
        let agent = ManagedChild::spawn(ROLE_AGENT, program, args, &log)?;
        let record = VmRecord {
            backend: BACKEND.name.into(),
            processes: agent.identity(ROLE_AGENT).into_iter().collect(),
            state: serde_json::json!(HostState {
                uds: config.vsock.uds.clone(),
                agent_dir,
                log: log.clone(),
            }),
        };
        Ok(Box::new(HostVm {
            id: config.id.clone(),
            agent,
            shim,
            log,
            record,
            launched_at: Instant::now(),
        }))
    }
}

/// The hybrid-vsock shim: `CONNECT <port>\n`, `OK <port>\n`, then bytes
/// to and from the agent's socket for that port.
#[derive(Debug)]
struct Shim {
    task: JoinHandle<()>,
    uds: PathBuf,
}

impl Shim {
    fn start(uds: &Path, agent_dir: &Path) -> Result<Self, HypervisorError> {
        let _ = std::fs::remove_file(uds);
        let l = UnixListener::bind(uds)
            .map_err(|e| HypervisorError::io(format!("bind {}", uds.display()), e))?;
        let agent_dir = agent_dir.to_path_buf();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let agent_dir = agent_dir.clone();
                tokio::spawn(async move {
                    let _ = Self::forward(s, &agent_dir).await;
                });
            }
        });
        Ok(Self {
            task,
            uds: uds.to_path_buf(),
        })
    }

    async fn forward(s: UnixStream, agent_dir: &Path) -> std::io::Result<()> {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await?;
        let port: u32 = line
            .trim()
            .strip_prefix("CONNECT ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad CONNECT line"))?;
        let target = match port {
            TTRPC_PORT => agent_dir.join("ttrpc.sock"),
            STREAM_PORT => agent_dir.join("stream.sock"),
            _ => return Ok(()),
        };
        let mut agent = UnixStream::connect(target).await?;
        let mut s = r.into_inner();
        s.write_all(format!("OK {port}\n").as_bytes()).await?;
        tokio::io::copy_bidirectional(&mut s, &mut agent).await?;
        Ok(())
    }

    fn stop(&self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// A pod's husk-agent on the host, where a VM would be.
#[derive(Debug)]
pub struct HostVm {
    id: String,
    agent: ManagedChild,
    shim: Shim,
    log: PathBuf,
    record: VmRecord,
    launched_at: Instant,
}

#[async_trait::async_trait]
impl Vm for HostVm {
    fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![(ROLE_AGENT, self.agent.pid())]
    }

    fn launched_at(&self) -> Instant {
        self.launched_at
    }

    fn log_file(&self) -> Option<PathBuf> {
        Some(self.log.clone())
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>, HypervisorError> {
        self.agent
            .try_wait()
            .map_err(|e| HypervisorError::io("reap husk-agent", e))
    }

    async fn wait(&mut self) -> Result<ExitStatus, HypervisorError> {
        self.agent
            .wait()
            .await
            .map_err(|e| HypervisorError::io("wait for husk-agent", e))
    }

    async fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, HypervisorError> {
        let s = self
            .agent
            .terminate(timeout)
            .await
            .map_err(|e| HypervisorError::io("stop husk-agent", e));
        self.shim.stop();
        remove_cgroups(&self.id);
        s
    }

    async fn kill(&mut self) -> Result<ExitStatus, HypervisorError> {
        self.shim.stop();
        let s = self
            .agent
            .kill()
            .await
            .map_err(|e| HypervisorError::io("kill husk-agent", e));
        remove_cgroups(&self.id);
        s
    }

    fn detach(self: Box<Self>) {
        // The shim task keeps serving until this process exits.
        self.agent.detach();
    }

    fn record(&self) -> VmRecord {
        self.record.clone()
    }
}

async fn adopt(record: &VmRecord, id: &str) -> Result<Box<dyn Vm>, HypervisorError> {
    let st: HostState = record.state()?;
    let shim = Shim::start(&st.uds, &st.agent_dir)?;
    let vm = AdoptedVm::adopt(
        id,
        record,
        ROLE_AGENT,
        &[],
        Box::new(HostControl {
            shim: Mutex::new(Some(shim)),
            pid: record.processes.first().map_or(0, |p| p.pid),
            id: id.to_string(),
        }),
        st.log,
    )?;
    Ok(Box::new(vm))
}

/// An adopted host pod: quitting is SIGTERM to the agent (checked to be
/// the recorded process when it was adopted); the shim goes with it.
#[derive(Debug)]
struct HostControl {
    shim: Mutex<Option<Shim>>,
    pid: u32,
    id: String,
}

#[async_trait::async_trait]
impl AdoptedControl for HostControl {
    async fn quit(&self, _timeout: Duration) -> Result<(), HypervisorError> {
        if let Some(s) = self.shim.lock().unwrap_or_else(|e| e.into_inner()).take() {
            s.stop();
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| HypervisorError::io("SIGTERM husk-agent", e.into()))?;
        // The cgroup can go once the agent (its last user) has exited.
        let (pid, id) = (self.pid, self.id.clone());
        tokio::spawn(async move {
            for _ in 0..250 {
                if !crate::procfs::is_alive(pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            remove_cgroups(&id);
        });
        Ok(())
    }
}
