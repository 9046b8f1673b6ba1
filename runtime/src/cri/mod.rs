//! The CRI v1 server of huskd: RuntimeService and ImageService over gRPC
//! on a unix socket.
//!
//! [`Husk`] holds everything the services share: the configuration, the
//! persisted pod/container records ([`crate::state`]), the image store, the
//! live sandboxes and the hypervisor chosen for each runtime handler.

pub mod client;
pub mod config;
pub mod image_service;
pub mod pod_network;
pub mod runtime_service;
pub mod spec;
pub mod status;
pub mod validation;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::components::{GuestImage, MissingComponent};
use crate::hypervisor::{self, AccelProbe, Hypervisor, HypervisorChoice, QemuPaths};
use crate::image::{ImageStore, ImageStoreConfig};
use crate::logs::LogFile;
use crate::sandbox::{ExitInfo, Sandbox};
use crate::state::{LoadReport, StateStore};

pub use config::{HandlerConfig, HuskdConfig, DEFAULT_HANDLER};

/// The runtime name reported by Version.
pub const RUNTIME_NAME: &str = "husk";
/// CRI API version implemented.
pub const CRI_API_VERSION: &str = "v1";

/// A configured runtime handler and the backend it resolved to.
#[derive(Debug)]
pub struct Handler {
    pub name: String,
    pub config: HandlerConfig,
    /// The backend, or why it cannot be used (reported by Status and by
    /// RunPodSandbox).
    pub hypervisor: Result<Arc<dyn Hypervisor>, String>,
}

/// Host-side state of a created container that is not persisted.
#[derive(Debug, Clone)]
pub struct LiveContainer {
    pub log: Option<LogFile>,
    /// `Some` once the init process has exited.
    pub exit: watch::Receiver<Option<ExitInfo>>,
    /// `true` once stdout and stderr reached EOF and are in the log.
    pub io_done: watch::Receiver<bool>,
    /// The container's stdin (`stdin: true`), held open while it exists.
    pub stdin: Option<Arc<tokio::net::UnixStream>>,
}

/// Shared state of the CRI services.
pub struct Husk {
    pub config: HuskdConfig,
    pub state: StateStore,
    pub images: ImageStore,
    pub probe: AccelProbe,
    pub handlers: BTreeMap<String, Handler>,
    pub virtiofsd: Result<PathBuf, MissingComponent>,
    /// Where pod networks come from.
    pub cni: crate::network::CniConfig,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    live: Mutex<HashMap<String, LiveContainer>>,
    /// Serializes lifecycle calls on one pod (and its containers).
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Husk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Husk")
            .field("config", &self.config)
            .field("probe", &self.probe)
            .field("handlers", &self.handlers)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HuskError {
    #[error("creating {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the image store under {root}: {source}")]
    Images {
        root: PathBuf,
        source: crate::image::Error,
    },
    #[error("loading pod and container records: {0}")]
    State(#[from] crate::state::StateError),
}

impl Husk {
    /// Opens the stores, resolves each handler's hypervisor and reconciles
    /// records from a previous run: pod VMs still running are adopted (see
    /// [`runtime_service::recover`]).
    pub async fn open(config: HuskdConfig) -> Result<(Arc<Self>, LoadReport), HuskError> {
        for d in [&config.root, &config.state, &config.state.join("sandboxes")] {
            std::fs::create_dir_all(d).map_err(|source| HuskError::Dir {
                path: d.clone(),
                source,
            })?;
        }
        let images = ImageStore::open(ImageStoreConfig {
            root: config.root.clone(),
            mirrors: config.registry.mirrors.clone().into_iter().collect(),
            insecure: config.registry.insecure.clone(),
            max_concurrent_downloads: config.registry.max_concurrent_downloads,
        })
        .map_err(|source| HuskError::Images {
            root: config.root.clone(),
            source,
        })?;
        let (state, report) = StateStore::open(&config.root)?;
        let probe = hypervisor::probe_accel();
        let mut handlers = BTreeMap::new();
        for (name, h) in &config.handlers {
            let hv = h
                .hypervisor
                .parse::<HypervisorChoice>()
                .map_err(|e| e.to_string())
                .and_then(|choice| {
                    hypervisor::select(choice, || {
                        QemuPaths::resolve(config.qemu_path(), None, config.husk_vsock_path())
                    })
                    .map_err(|e| e.to_string())
                })
                .map(Arc::from);
            if let Err(e) = &hv {
                tracing::warn!(handler = %name, error = %e, "runtime handler has no usable hypervisor");
            }
            handlers.insert(
                name.clone(),
                Handler {
                    name: name.clone(),
                    config: h.clone(),
                    hypervisor: hv,
                },
            );
        }
        let virtiofsd = crate::virtiofsd::find_virtiofsd(config.virtiofsd_path());
        if let Err(e) = &virtiofsd {
            tracing::warn!(error = %e, "virtiofsd not found; pods cannot start");
        }
        let cni = crate::network::CniConfig {
            conf_dir: config.cni.conf_dir.clone(),
            bin_dirs: config.cni.bin_dirs.clone(),
            netns_dir: config.state.join("netns"),
        };
        let husk = Arc::new(Self {
            cni,
            config,
            state,
            images,
            probe,
            handlers,
            virtiofsd,
            sandboxes: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            pod_locks: Mutex::new(HashMap::new()),
        });
        runtime_service::recover(&husk).await;
        runtime_service::recover_networks(&husk).await;
        Ok((husk, report))
    }

    /// The guest image of a handler, checked to exist.
    pub fn guest_image(h: &HandlerConfig) -> Result<GuestImage, MissingComponent> {
        const HINT: &str =
            "run `make guest-image` or set kernel/initrd of the handler in the huskd config";
        Ok(GuestImage {
            kernel: crate::components::require_file("guest kernel", &h.kernel, HINT)?,
            initrd: crate::components::require_file("guest initrd", &h.initrd, HINT)?,
        })
    }

    pub fn sandbox_state_dir(&self) -> PathBuf {
        self.config.state.join("sandboxes")
    }

    fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn sandbox(&self, pod_id: &str) -> Option<Arc<Sandbox>> {
        Self::lock_map(&self.sandboxes).get(pod_id).cloned()
    }

    fn insert_sandbox(&self, sb: Arc<Sandbox>) {
        Self::lock_map(&self.sandboxes).insert(sb.id().to_string(), sb);
    }

    fn take_sandbox(&self, pod_id: &str) -> Option<Arc<Sandbox>> {
        Self::lock_map(&self.sandboxes).remove(pod_id)
    }

    pub fn live(&self, container_id: &str) -> Option<LiveContainer> {
        Self::lock_map(&self.live).get(container_id).cloned()
    }

    fn set_live(&self, container_id: &str, l: LiveContainer) {
        Self::lock_map(&self.live).insert(container_id.to_string(), l);
    }

    fn drop_live(&self, container_id: &str) {
        Self::lock_map(&self.live).remove(container_id);
    }

    /// The lifecycle lock of a pod.
    pub fn pod_lock(&self, pod_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        Self::lock_map(&self.pod_locks)
            .entry(pod_id.to_string())
            .or_default()
            .clone()
    }

    fn forget_pod_lock(&self, pod_id: &str) {
        Self::lock_map(&self.pod_locks).remove(pod_id);
    }

    /// Leaves every live sandbox running and forgets it (huskd exits): the
    /// VMs, their helpers and their state on disk stay for the next huskd
    /// to adopt, as containerd's shims outlive containerd.
    pub async fn detach_all(&self) {
        let all: Vec<Arc<Sandbox>> = Self::lock_map(&self.sandboxes)
            .drain()
            .map(|(_, sb)| sb)
            .collect();
        for sb in all {
            sb.detach().await;
        }
    }

    /// Stops every live sandbox.
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Sandbox>> = Self::lock_map(&self.sandboxes).values().cloned().collect();
        for sb in all {
            let id = sb.id().to_string();
            runtime_service::stop_pod_inner(self, &id, "huskd shut down").await;
        }
    }
}

/// Nanoseconds since the epoch, as CRI timestamps are.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A new 64-hex-digit id (32 random bytes).
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if ok.is_err() {
        // Not expected on Linux; fall back to time and a counter (ids only
        // need to be unique on this host).
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let t =
            now_ns() as u64 ^ (N.fetch_add(1, Ordering::Relaxed) << 48) ^ std::process::id() as u64;
        b[..8].copy_from_slice(&t.to_le_bytes());
    }
    hex::encode(b)
}

/// Host processes whose command line mentions `dir` (a sandbox directory):
/// the VMM and helpers a previous huskd left behind.
pub fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| !needle.is_empty() && c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// SIGKILLs `pids` and waits (bounded) for them to disappear.
pub async fn kill_and_wait(pids: &[u32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..50 {
        if pids.iter().all(|p| !crate::procfs::is_alive(*p)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_id();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }

    #[tokio::test]
    async fn finds_and_kills_processes_by_dir() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("sandbox-x");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("X", "1")
            .arg0_marker(&marker)
            .spawn()
            .unwrap();
        // Until the child has exec'd, its cmdline is still this test
        // binary's: wait (bounded) for the marker to show up.
        let mut pids = processes_using(&marker);
        for _ in 0..100 {
            if !pids.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            pids = processes_using(&marker);
        }
        assert_eq!(pids, vec![child.id()]);
        kill_and_wait(&pids).await;
        let st = child.wait().unwrap();
        assert!(!st.success());
        assert!(processes_using(&marker).is_empty());
    }

    trait Arg0Marker {
        fn arg0_marker(&mut self, p: &Path) -> &mut Self;
    }
    impl Arg0Marker for std::process::Command {
        fn arg0_marker(&mut self, p: &Path) -> &mut Self {
            use std::os::unix::process::CommandExt;
            self.arg0(p)
        }
    }
}
