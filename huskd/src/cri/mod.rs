//! The CRI v1 server of huskd: RuntimeService and ImageService over gRPC
//! on a unix socket.
//!
//! [`Husk`] holds everything the services share: the configuration, the
//! persisted pod/container records ([`crate::state`]), the image store, the
//! live sandboxes and the hypervisor chosen for each runtime handler.

pub mod errors;
pub mod image_service;
pub mod pod_network;
pub mod runtime_service;
pub mod spec;
pub mod validation;

// One module per CRI call (or family of calls), as containerd's
// internal/cri/server; `runtime_service` only traces and delegates.
mod container_checkpoint;
mod container_create;
mod container_exec_sync;
mod container_io;
mod container_list;
mod container_log;
mod container_remove;
mod container_start;
mod container_status;
mod container_stop;
mod container_update;
mod events;
mod helpers;
mod instrument;
mod metrics;
mod restart;
mod runtime_status;
mod sandbox_list;
mod sandbox_remove;
mod sandbox_run;
mod sandbox_status;
mod sandbox_stop;
mod seccomp;
mod stats;
mod streaming;

#[cfg(test)]
mod fake_backend_tests;

pub use runtime_status::runtime_status;
pub use sandbox_run::pod_size;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::logs::LogFile;
use crate::state::{LoadReport, StateStore};
use husk_runtime::hypervisor::{self, AccelProbe, Hypervisor, HypervisorChoice};
use husk_runtime::image::{ImageStore, ImageStoreConfig};
use husk_runtime::sandbox::{ExitInfo, Sandbox};
use husk_runtime::{GuestImage, MissingComponent};

pub use crate::config::{HandlerConfig, HuskdConfig, DEFAULT_HANDLER};

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
    /// RunPodSandbox). The host backend for `hypervisor = "none"`.
    pub hypervisor: Result<Arc<dyn Hypervisor>, String>,
    /// The host backend, for this handler's pods that share a host
    /// namespace (shared by all handlers).
    pub host: Result<Arc<dyn Hypervisor>, String>,
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
    /// Copies of the container's output for Attach sessions, next to the
    /// CRI log (which gets every byte whatever the subscribers do).
    pub output: container_io::OutputTaps,
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
    pub cni: husk_runtime::network::CniConfig,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    live: Mutex<HashMap<String, LiveContainer>>,
    /// Serializes lifecycle calls on one pod (and its containers).
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The CRI streaming server (started once `Husk` exists: its runtime
    /// refers back to it).
    streaming: std::sync::OnceLock<husk_streaming::Server>,
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
        source: husk_runtime::image::Error,
    },
    #[error("starting the streaming server on {addr}: {source}")]
    Streaming {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("loading pod and container records: {0}")]
    State(#[from] crate::state::StateError),
}

impl Husk {
    /// Opens the stores, resolves each handler's hypervisor and reconciles
    /// records from a previous run: pod VMs still running are adopted (see
    /// [`restart::recover`]).
    pub async fn open(config: HuskdConfig) -> Result<(Arc<Self>, LoadReport), HuskError> {
        Self::open_with(config, None).await
    }

    /// As [`open`](Self::open), with every handler on `backend` instead of
    /// the hypervisor its configuration names (tests: the fake backend).
    pub async fn open_with(
        config: HuskdConfig,
        backend: Option<Arc<dyn Hypervisor>>,
    ) -> Result<(Arc<Self>, LoadReport), HuskError> {
        // Records (with the environment kubelet fills from Secrets), image
        // layers and container root filesystems live below these: root's
        // alone, whatever the umask.
        for d in [&config.root, &config.state, &config.state.join("sandboxes")] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)))
                .map_err(|source| HuskError::Dir {
                    path: d.clone(),
                    source,
                })?;
        }
        let images = ImageStore::open(ImageStoreConfig {
            root: config.root.clone(),
            mirrors: config.registry.mirrors.clone().into_iter().collect(),
            insecure: config.registry.insecure.clone(),
            max_concurrent_downloads: config.registry.max_concurrent_downloads,
            limits: config.registry.image_limits(),
        })
        .map_err(|source| HuskError::Images {
            root: config.root.clone(),
            source,
        })?;
        let (state, report) = StateStore::open(&config.root)?;
        let probe = hypervisor::probe_accel();
        let binaries = hypervisor::ConfiguredBinaries {
            qemu: config.qemu_path().map(Into::into),
            husk_vsock: config.husk_vsock_path().map(Into::into),
        };
        let host: Result<Arc<dyn Hypervisor>, String> = match &backend {
            Some(b) => Ok(b.clone()),
            None => husk_runtime::components::find_binary(
                "husk-agent",
                "husk-agent",
                config.husk_agent_path(),
                &husk_runtime::components::husk_binary_dirs(),
                husk_runtime::components::HINT_MAKE_BUILD,
            )
            .map(|agent| Arc::new(hypervisor::host::HostBackend::new(agent)) as Arc<dyn Hypervisor>)
            .map_err(|e| e.to_string()),
        };
        if let Err(e) = &host {
            tracing::warn!(error = %e, "no host backend: pods sharing a host namespace cannot start");
        }
        let mut handlers = BTreeMap::new();
        for (name, h) in &config.handlers {
            let hv = match &backend {
                Some(b) => Ok(b.clone()),
                None if h.is_host_only() => host.clone(),
                None => h
                    .hypervisor
                    .parse::<HypervisorChoice>()
                    .map_err(|e| e.to_string())
                    .and_then(|choice| {
                        hypervisor::select_configured(choice, &binaries).map_err(|e| e.to_string())
                    })
                    .map(Arc::from),
            };
            if let Err(e) = &hv {
                tracing::warn!(handler = %name, error = %e, "runtime handler has no usable hypervisor");
            }
            handlers.insert(
                name.clone(),
                Handler {
                    name: name.clone(),
                    config: h.clone(),
                    hypervisor: hv,
                    host: host.clone(),
                },
            );
        }
        let virtiofsd = husk_runtime::virtiofsd::find_virtiofsd(config.virtiofsd_path());
        if let Err(e) = &virtiofsd {
            tracing::warn!(error = %e, "virtiofsd not found; pods cannot start");
        }
        let cni = husk_runtime::network::CniConfig {
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
            streaming: std::sync::OnceLock::new(),
        });
        let addr =
            std::net::SocketAddr::new(husk.config.streaming.address, husk.config.streaming.port);
        let server = husk_streaming::Server::start(
            husk_streaming::ServerConfig {
                addr,
                tls: husk.config.streaming.tls(),
                ..Default::default()
            },
            Arc::new(streaming::StreamRuntime::new(&husk)),
        )
        .await
        .map_err(|source| HuskError::Streaming { addr, source })?;
        let _ = husk.streaming.set(server);
        restart::recover(&husk).await;
        restart::recover_networks(&husk).await;
        Ok((husk, report))
    }

    /// The guest image of a handler, checked to exist.
    pub fn guest_image(h: &HandlerConfig) -> Result<GuestImage, MissingComponent> {
        const HINT: &str =
            "run `make guest-image` or set kernel/initrd of the handler in the huskd config";
        Ok(GuestImage {
            kernel: husk_runtime::components::require_file("guest kernel", &h.kernel, HINT)?,
            initrd: husk_runtime::components::require_file("guest initrd", &h.initrd, HINT)?,
        })
    }

    /// The streaming server (always set once `open` returned).
    pub fn streaming(&self) -> Result<&husk_streaming::Server, tonic::Status> {
        self.streaming
            .get()
            .ok_or_else(|| tonic::Status::unavailable("the streaming server is not running"))
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
            sandbox_stop::stop_pod_inner(self, &id, "huskd shut down").await;
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
}
