//! CRI RuntimeService: pods, containers, exec, status.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use husk_proto::agent::{StdioConfig, UpdateContainerRequest};
use husk_proto::GUEST_SHARE_DIR;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::spec::{self, GuestMount, SpecInputs};
use super::status::{image_error, sandbox_error, state_error};
use super::validation;
use super::{now_ns, pod_network, Husk, LiveContainer};
use crate::hypervisor::builtin::{self, BuiltinFiles};
use crate::logs::{copy_to_log, LogFile, Stream, DEFAULT_MAX_LINE};
use crate::network::{self, PodNetwork};
use crate::sandbox::{AdoptBackend, AdoptConfig, ExitInfo, Rootfs, Sandbox, SandboxConfig};
use crate::state::{ContainerRecord, ContainerState, PodRecord, PodState, Resolved};

/// Most output ExecSync keeps per stream (as containerd).
const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;
/// StopContainer's wait after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long an exit waits for the container's output to reach its log.
const IO_DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Reason of containers lost with their VM.
const REASON_LOST: &str = "SandboxLost";

/// The RuntimeService implementation.
#[derive(Debug, Clone)]
pub struct CriRuntime {
    pub husk: Arc<Husk>,
}

/// Runs one CRI call inside a span carrying the method and the ids, and
/// logs failures.
async fn traced<T>(
    method: &'static str,
    pod: &str,
    container: &str,
    fut: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    // Empty until known: a field recorded later (the pod of a container
    // call, a new id) would otherwise appear twice in the log line.
    let span = tracing::info_span!(
        "cri",
        method,
        pod = tracing::field::Empty,
        container = tracing::field::Empty
    );
    if !pod.is_empty() {
        span.record("pod", validation::printable(pod).as_str());
    }
    if !container.is_empty() {
        span.record("container", validation::printable(container).as_str());
    }
    let started = std::time::Instant::now();
    let r = fut.instrument(span.clone()).await;
    let _e = span.enter();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match &r {
        Ok(_) => tracing::debug!(elapsed_ms = ms, "ok"),
        Err(s) => {
            tracing::info!(elapsed_ms = ms, code = ?s.code(), message = %s.message(), "failed")
        }
    }
    r.map(Response::new)
}

fn record_pod_field(pod: &str) {
    tracing::Span::current().record("pod", pod);
}

fn pod_state_cri(s: PodState) -> i32 {
    match s {
        PodState::Ready => cri::PodSandboxState::SandboxReady as i32,
        PodState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn container_state_cri(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

/// Resolves a pod id (or unique prefix) that must exist.
fn find_pod(h: &Husk, field: &str, id: &str) -> Result<PodRecord, Status> {
    validation::id(field, id)?;
    match h.state.resolve_pod(id) {
        Resolved::Found(full) => h
            .state
            .pod(&full)
            .ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found"))),
        Resolved::NotFound => Err(Status::not_found(format!(
            "{field}: pod sandbox {id} not found"
        ))),
        Resolved::Ambiguous(n) => Err(Status::invalid_argument(format!(
            "{field}: {id} matches {n} pod sandboxes"
        ))),
    }
}

/// Like [`find_pod`], `None` for an unknown id (stop/remove succeed then).
fn find_pod_opt(h: &Husk, field: &str, id: &str) -> Result<Option<PodRecord>, Status> {
    match find_pod(h, field, id) {
        Ok(p) => Ok(Some(p)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

fn find_container(h: &Husk, id: &str) -> Result<ContainerRecord, Status> {
    validation::id("container_id", id)?;
    match h.state.resolve_container(id) {
        Resolved::Found(full) => h
            .state
            .container(&full)
            .ok_or_else(|| Status::not_found(format!("container {id} not found"))),
        Resolved::NotFound => Err(Status::not_found(format!(
            "container_id: container {id} not found"
        ))),
        Resolved::Ambiguous(n) => Err(Status::invalid_argument(format!(
            "container_id: {id} matches {n} containers"
        ))),
    }
}

fn find_container_opt(h: &Husk, id: &str) -> Result<Option<ContainerRecord>, Status> {
    match find_container(h, id) {
        Ok(c) => Ok(Some(c)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

fn label_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The VM size of a pod: the handler's, raised to hold the pod's declared
/// resources plus overhead when kubelet sends them.
pub fn pod_size(handler: &super::HandlerConfig, config: &cri::PodSandboxConfig) -> (u32, u32) {
    let linux = config.linux.as_ref();
    let cpus = |r: Option<&cri::LinuxContainerResources>| -> u64 {
        r.filter(|r| r.cpu_quota > 0 && r.cpu_period > 0)
            .map(|r| (r.cpu_quota as u64).div_ceil(r.cpu_period as u64))
            .unwrap_or(0)
    };
    let mib = |r: Option<&cri::LinuxContainerResources>| -> u64 {
        r.filter(|r| r.memory_limit_in_bytes > 0)
            .map(|r| (r.memory_limit_in_bytes as u64).div_ceil(1 << 20))
            .unwrap_or(0)
    };
    let res = linux.and_then(|l| l.resources.as_ref());
    let ovh = linux.and_then(|l| l.overhead.as_ref());
    let want_cpus = cpus(res) + cpus(ovh);
    let want_mib = mib(res) + mib(ovh);
    let vcpus = (handler.vcpus as u64).max(want_cpus).min(255) as u32;
    let memory_mib = (handler.memory_mib as u64).max(want_mib).min(1 << 20) as u32;
    (vcpus, memory_mib)
}

/// The host name of a pod that has none in its config: its name cut the
/// way kubelet cuts pod names (63 bytes, no trailing '-' or '.'). The name
/// is free-form (critest's are 68 bytes), so other bytes become '-'.
fn hostname_from_name(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    h.trim_matches(|c| c == '-' || c == '.').to_string()
}

/// Host names the guest kernel accepts (RFC 1123, at most 63 bytes).
fn pod_hostname(
    config: &cri::PodSandboxConfig,
    meta: &cri::PodSandboxMetadata,
) -> Result<String, Status> {
    let h = if config.hostname.is_empty() {
        hostname_from_name(&meta.name)
    } else {
        config.hostname.clone()
    };
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(h)
    } else {
        Err(Status::invalid_argument(format!(
            "config.hostname {:?} is not a valid host name",
            validation::printable(&h)
        )))
    }
}

/// The pod-wide files shared into the guest: /etc/hosts, resolv.conf,
/// hostname.
fn write_pod_files(
    share: &Path,
    config: &cri::PodSandboxConfig,
    hostname: &str,
) -> std::io::Result<()> {
    let dir = share.join("pod");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("hostname"), format!("{hostname}\n"))?;
    std::fs::write(
        dir.join("hosts"),
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
    )?;
    let mut resolv = String::new();
    if let Some(dns) = &config.dns_config {
        for s in &dns.servers {
            resolv.push_str(&format!("nameserver {s}\n"));
        }
        if !dns.searches.is_empty() {
            resolv.push_str(&format!("search {}\n", dns.searches.join(" ")));
        }
        if !dns.options.is_empty() {
            resolv.push_str(&format!("options {}\n", dns.options.join(" ")));
        }
    }
    std::fs::write(dir.join("resolv.conf"), resolv)?;
    Ok(())
}

/// Validates the parts of a CRI config that end up in files, commands or
/// the guest, before anything is created.
fn check_pod_config(config: &cri::PodSandboxConfig) -> Result<&cri::PodSandboxMetadata, Status> {
    let meta = config
        .metadata
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("config.metadata is missing"))?;
    validation::name("config.metadata.name", &meta.name)?;
    validation::name("config.metadata.namespace", &meta.namespace)?;
    validation::name("config.metadata.uid", &meta.uid)?;
    validation::log_directory(&config.log_directory)?;
    if let Some(dns) = &config.dns_config {
        for (f, list) in [
            ("servers", &dns.servers),
            ("searches", &dns.searches),
            ("options", &dns.options),
        ] {
            if list
                .iter()
                .any(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(Status::invalid_argument(format!(
                    "config.dns_config.{f}: empty entry or whitespace"
                )));
            }
        }
    }
    Ok(meta)
}

pub(crate) async fn run_pod(
    h: &Husk,
    req: cri::RunPodSandboxRequest,
) -> Result<cri::RunPodSandboxResponse, Status> {
    let config = req
        .config
        .ok_or_else(|| Status::invalid_argument("config is missing"))?;
    let meta = check_pod_config(&config)?.clone();
    pod_network::refuse_host_network(&config)?;
    let Some((handler_name, handler_cfg)) = h.config.handler(&req.runtime_handler) else {
        return Err(Status::invalid_argument(format!(
            "runtime_handler {:?} is not configured; known handlers: {}",
            validation::printable(&req.runtime_handler),
            h.config.handler_names().join(", ")
        )));
    };
    let handler = &h.handlers[handler_name];
    let hostname = pod_hostname(&config, &meta)?;
    let sysctl_params = match config.linux.as_ref() {
        Some(l) => validation::sysctl_kernel_params(&l.sysctls)?,
        None => Vec::new(),
    };
    // The same pod attempt twice is a caller error (kubelet retries with a
    // new attempt number).
    if let Some(p) = h
        .state
        .pods()
        .into_iter()
        .find(|p| p.config.metadata.as_ref() == Some(&meta))
    {
        return Err(Status::already_exists(format!(
            "pod sandbox for {}/{} (uid {}, attempt {}) already exists: {}",
            meta.namespace, meta.name, meta.uid, meta.attempt, p.id
        )));
    }
    let hypervisor = handler.hypervisor.clone().map_err(|e| {
        Status::failed_precondition(format!(
            "runtime handler {handler_name:?} cannot run VMs: {e}"
        ))
    })?;
    let guest = Husk::guest_image(&handler.config)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let virtiofsd = h
        .virtiofsd
        .clone()
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let (vcpus, memory_mib) = pod_size(handler_cfg, &config);

    let id = super::new_id();
    record_pod_field(&id);
    let net_req = pod_network::request(&id, &config)?;
    let lock = h.pod_lock(&id);
    let _g = lock.lock().await;
    // The network comes first: the VMM starts inside the pod's namespace.
    let t_net = std::time::Instant::now();
    let net = network::setup(&h.cni, &net_req)
        .await
        .map_err(|e| pod_network::network_error(&id, &e))?;
    let mut sc = SandboxConfig::new(id.clone(), hypervisor.clone(), guest, virtiofsd);
    sc.network = Some(pod_network::sandbox_network(&net, t_net.elapsed()));
    sc.hostname = hostname.clone();
    sc.vcpus = vcpus;
    sc.memory_mib = memory_mib;
    sc.kernel_params = handler_cfg.kernel_params.clone();
    sc.kernel_params.extend(sysctl_params);
    sc.state_dir = h.sandbox_state_dir();
    sc.ready_timeout = Duration::from_secs(h.config.sandbox_ready_timeout_secs);
    let created_at_ns = now_ns();
    let sandbox = match Sandbox::start(sc).await {
        Ok(sb) => Arc::new(sb),
        Err(e) => {
            release_network(h, &id, Some(&net)).await;
            return Err(sandbox_error(&e));
        }
    };

    let finish = async {
        write_pod_files(sandbox.share_dir(), &config, &hostname)
            .map_err(|e| Status::internal(format!("writing the pod's hosts/resolv.conf: {e}")))?;
        let rec = PodRecord {
            id: id.clone(),
            config: config.clone(),
            runtime_handler: handler_name.to_string(),
            state: PodState::Ready,
            created_at_ns,
            vcpus,
            memory_mib,
            hypervisor: sandbox.hypervisor().to_string(),
            pids: sandbox
                .pids()
                .iter()
                .map(|(r, p)| (r.to_string(), *p))
                .collect(),
            sandbox_dir: sandbox.dir().to_path_buf(),
            reason: String::new(),
            network: Some(net.clone()),
            processes: sandbox.processes().to_vec(),
        };
        h.state.put_pod(rec).map_err(|e| state_error(&e))
    };
    if let Err(s) = finish.await {
        // Never leave a half-created sandbox: the VM goes again.
        if let Err(e) = sandbox.stop().await {
            tracing::error!(error = %e, "stopping a sandbox whose creation failed");
        }
        release_network(h, &id, Some(&net)).await;
        return Err(s);
    }
    let t = sandbox.timings();
    tracing::info!(
        handler = handler_name,
        vcpus,
        memory_mib,
        total_ms = t.total.as_millis() as u64,
        guest_boot_ms = t.guest_boot.as_millis() as u64,
        ips = ?net.pod_ips(),
        "pod sandbox ready"
    );
    h.insert_sandbox(sandbox);
    Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
}

/// Stops a pod: its containers are killed, their rootfs and mounts
/// released, the VM stopped. The record stays (NotReady). Never fails:
/// what cannot be cleaned is logged and retried by RemovePodSandbox.
pub(crate) async fn stop_pod_inner(h: &Husk, pod_id: &str, reason: &str) {
    let containers = h.state.containers_of(pod_id);
    let sandbox = h.sandbox(pod_id);
    for c in &containers {
        if c.state == ContainerState::Running {
            if let Some(sb) = &sandbox {
                let _ = sb.signal(&c.id, "", libc::SIGKILL).await;
                wait_exit(h, &c.id, Duration::from_secs(5)).await;
            }
        }
    }
    for c in &containers {
        release_container_host(h, c, sandbox.as_deref());
        if matches!(c.state, ContainerState::Running | ContainerState::Created) {
            let _ = h.state.update_container(&c.id, |r| {
                if matches!(r.state, ContainerState::Running | ContainerState::Created) {
                    r.exit_code = if r.state == ContainerState::Created {
                        0
                    } else {
                        137
                    };
                    r.state = ContainerState::Exited;
                    r.finished_at_ns = now_ns();
                    r.reason = "PodStopped".into();
                    r.message = reason.into();
                }
            });
        }
    }
    match h.take_sandbox(pod_id) {
        Some(sb) => {
            if let Err(e) = sb.stop().await {
                tracing::error!(error = %e, "stopping the pod VM");
            }
        }
        None => {
            // No live VM (huskd restarted): reap what a previous huskd left.
            if let Some(p) = h.state.pod(pod_id) {
                cleanup_orphan_dir(&p.sandbox_dir).await;
            }
        }
    }
    // After the VM: its VMM holds the tap open until it exits.
    let net = h.state.pod(pod_id).and_then(|p| p.network);
    release_network(h, pod_id, net.as_ref()).await;
    if let Err(e) = h.state.update_pod(pod_id, |p| {
        p.state = PodState::NotReady;
        if p.reason.is_empty() {
            p.reason = reason.into();
        }
        p.pids.clear();
        p.processes.clear();
    }) {
        tracing::error!(error = %e, "persisting the stopped pod");
    }
}

/// Releases pod networks that a previous huskd left behind: a network
/// namespace file exists exactly while a pod's network is set up, so one
/// without a ready pod is left from a crash (between CNI ADD and the pod
/// record, or in the middle of a stop) or from a VM lost with huskd.
pub(crate) async fn recover_networks(h: &Husk) {
    let Ok(rd) = std::fs::read_dir(&h.cni.netns_dir) else {
        return;
    };
    for e in rd.flatten() {
        // Dot entries are the network module's own (its record dir).
        let Some(pod_id) = e
            .file_name()
            .to_str()
            .filter(|n| !n.starts_with('.'))
            .map(str::to_owned)
        else {
            continue;
        };
        let rec = h.state.pod(&pod_id);
        if rec.as_ref().is_some_and(|p| p.state == PodState::Ready) {
            continue;
        }
        tracing::warn!(pod = %pod_id, "releasing a pod network left by a previous huskd");
        release_network(h, &pod_id, rec.as_ref().and_then(|p| p.network.as_ref())).await;
    }
}

/// CNI DEL and the namespace, tap and filters gone. Never fails: a network
/// that cannot be released is logged, and RemovePodSandbox (or the next
/// huskd start) tries again; CNI DEL is idempotent.
pub(crate) async fn release_network(h: &Husk, pod_id: &str, net: Option<&PodNetwork>) {
    if let Err(e) = network::teardown(&h.cni, pod_id, net).await {
        tracing::error!(error = %e, "releasing the pod network");
    }
}

/// How long a husk-vmm left by a previous huskd gets to shut down through
/// its control socket before it is killed.
const ORPHAN_VMM_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops processes a previous huskd left for a sandbox directory, then
/// unmounts and removes the directory.
///
/// A husk-vmm (builtin backend, recognised by its `vm.json`) is asked to
/// shut down through its control socket first: it outlives huskd by design
/// (own session), and a clean exit lets it tear down its VM and remove its
/// socket and pid file itself. Whatever still names the directory after
/// that (virtiofsd, a husk-vmm that was not reachable, QEMU and husk-vsock)
/// is SIGKILLed.
async fn cleanup_orphan_dir(dir: &Path) {
    if dir.as_os_str().is_empty() {
        return;
    }
    if BuiltinFiles::in_dir(dir).config.exists() {
        match builtin::stop_orphan(dir, ORPHAN_VMM_STOP_TIMEOUT).await {
            Ok(Some(pid)) => {
                tracing::info!(pid, dir = %dir.display(), "stopped a husk-vmm left from a previous huskd")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "stopping a leftover husk-vmm; killing what uses the directory")
            }
        }
    }
    let pids = super::processes_using(dir);
    if !pids.is_empty() {
        tracing::warn!(?pids, dir = %dir.display(), "killing processes left from a previous huskd");
        super::kill_and_wait(&pids).await;
    }
    if dir.exists() {
        match crate::mounts::unmount_all_under(dir) {
            Ok(left) if left.is_empty() => {
                if let Err(e) = std::fs::remove_dir_all(dir) {
                    tracing::error!(error = %e, dir = %dir.display(), "removing a stale sandbox directory");
                }
            }
            Ok(left) => tracing::error!(
                ?left,
                "mounts left under a stale sandbox directory; keeping it"
            ),
            Err(e) => tracing::error!(error = %e, "reading mountinfo"),
        }
    }
}

/// How long adopting one pod may take in all (process checks, agent
/// connect and Health, stream re-attach); pods are adopted concurrently, so
/// this bounds how long a restarted huskd waits before serving.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Each step of an adoption (control socket, agent connect, Health).
const ADOPT_STEP_TIMEOUT: Duration = Duration::from_secs(2);

/// Startup reconciliation. Pod VMs outlive huskd: each pod recorded Ready
/// is adopted ([`adopt_pod`]) if its recorded processes still run and its
/// agent answers. Pods that cannot be adopted are marked NotReady and their
/// containers Exited (SandboxLost), leftover processes and directories are
/// cleaned, and the records stay so that kubelet sees them and
/// stops/removes them.
pub(crate) async fn recover(h: &Arc<Husk>) {
    let mut tasks = tokio::task::JoinSet::new();
    for p in h.state.pods() {
        if p.state != PodState::Ready {
            continue;
        }
        let h = h.clone();
        tasks.spawn(async move {
            let t0 = std::time::Instant::now();
            let r = match tokio::time::timeout(ADOPT_TIMEOUT, adopt_pod(&h, &p)).await {
                Ok(r) => r,
                Err(_) => Err(format!("not adopted within {ADOPT_TIMEOUT:?}")),
            };
            (p.id, r, t0.elapsed())
        });
    }
    let mut lost: HashMap<String, String> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((id, Ok(()), took)) => {
                tracing::info!(pod = %id, took_ms = took.as_millis() as u64, "pod VM adopted")
            }
            Ok((id, Err(why), _)) => {
                tracing::warn!(pod = %id, %why, "pod VM not adopted; marking it NotReady");
                lost.insert(id, why);
            }
            Err(e) => tracing::error!(error = %e, "a pod adoption task failed"),
        }
    }
    let adopted = |pod_id: &str| h.sandbox(pod_id).is_some();
    for c in h.state.containers() {
        if adopted(&c.pod_id) {
            continue;
        }
        if matches!(c.state, ContainerState::Running | ContainerState::Created) {
            let message = match lost.get(&c.pod_id) {
                Some(why) => format!("the pod VM was lost when huskd restarted: {why}"),
                None => "the pod VM was lost when huskd restarted".to_string(),
            };
            let _ = h.state.update_container(&c.id, |r| {
                r.state = ContainerState::Exited;
                r.exit_code = if c.state == ContainerState::Running {
                    255
                } else {
                    0
                };
                r.finished_at_ns = now_ns();
                r.reason = REASON_LOST.into();
                r.message = message;
            });
        }
        // Rootfs overlays and bind mounts live under the sandbox directory,
        // removed below; the image store forgets its rootfs record.
        if h.images
            .rootfs_mounts()
            .iter()
            .any(|m| m.container_id == c.id)
        {
            if let Err(e) = h.images.release_rootfs(&c.id) {
                tracing::warn!(container = %c.id, error = %e, "releasing a stale rootfs");
            }
        }
    }
    let known: Vec<PathBuf> = h
        .state
        .pods()
        .iter()
        .map(|p| p.sandbox_dir.clone())
        .collect();
    for p in h.state.pods() {
        if adopted(&p.id) {
            continue;
        }
        if p.state == PodState::Ready {
            let reason = match lost.get(&p.id) {
                Some(why) => format!("the pod VM was lost when huskd restarted: {why}"),
                None => "the pod VM was lost when huskd restarted".to_string(),
            };
            let _ = h.state.update_pod(&p.id, |r| {
                r.state = PodState::NotReady;
                r.reason = reason;
                r.pids.clear();
                r.processes.clear();
            });
        }
        cleanup_orphan_dir(&p.sandbox_dir).await;
    }
    // Sandbox directories without a record: a start interrupted by a crash.
    if let Ok(rd) = std::fs::read_dir(h.sandbox_state_dir()) {
        for e in rd.flatten() {
            let dir = e.path();
            if !known.contains(&dir) {
                tracing::warn!(dir = %dir.display(), "removing a sandbox directory without a record");
                cleanup_orphan_dir(&dir).await;
            }
        }
    }
    // Rootfs records of containers that no longer exist.
    for m in h.images.rootfs_mounts() {
        if h.state.container(&m.container_id).is_none() {
            let _ = h.images.release_rootfs(&m.container_id);
        }
    }
}

/// Takes over a pod whose VM a previous huskd started ([`Sandbox::adopt`])
/// and re-creates its containers' live state: the output streams of Running
/// and Created containers are attached again (the agent replaces the old
/// connection; output written meanwhile waits in the pipe) and appended to
/// the same CRI log, and Running containers get their exit watcher again.
/// All fallible steps come first: the sandbox and containers become live
/// only when everything worked. On error (or when the caller's timeout drops
/// this future) the half-adopted sandbox is dropped, which kills its
/// processes; the caller cleans up the rest.
async fn adopt_pod(h: &Arc<Husk>, p: &PodRecord) -> Result<(), String> {
    if p.processes.is_empty() {
        return Err("the record has no process identities (written by an older huskd)".into());
    }
    let backend = if p.processes.iter().any(|x| x.role == "husk-vmm") {
        AdoptBackend::Builtin
    } else {
        AdoptBackend::Qemu
    };
    let sandbox = Sandbox::adopt(AdoptConfig {
        id: p.id.clone(),
        dir: p.sandbox_dir.clone(),
        backend,
        processes: p.processes.clone(),
        hypervisor: p.hypervisor.clone(),
        timeout: ADOPT_STEP_TIMEOUT,
        // As SandboxConfig::new's defaults, which RunPodSandbox keeps.
        rpc_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
        stop_timeout: Duration::from_secs(5),
    })
    .await
    .map_err(|e| e.to_string())?;
    let sandbox = Arc::new(sandbox);
    let mut lives = Vec::new();
    for c in h.state.containers_of(&p.id) {
        if !matches!(c.state, ContainerState::Running | ContainerState::Created) {
            continue;
        }
        let log = if c.log_path.as_os_str().is_empty() {
            None
        } else {
            Some(LogFile::open(&c.log_path).map_err(|e| {
                format!(
                    "container {}: opening log {}: {e}",
                    c.id,
                    c.log_path.display()
                )
            })?)
        };
        let stdio = StdioConfig {
            stdin: c.config.stdin,
            terminal: c.config.tty,
        };
        let live = attach_output(&sandbox, &c.id, stdio, log)
            .await
            .map_err(|s| {
                format!(
                    "container {}: re-attaching its output: {}",
                    c.id,
                    s.message()
                )
            })?;
        lives.push((c, live));
    }
    // From here on nothing fails or waits.
    h.insert_sandbox(sandbox.clone());
    for (c, mut live) in lives {
        if c.state == ContainerState::Running {
            let (tx, rx) = watch::channel(None);
            live.exit = rx;
            let io_done = live.io_done.clone();
            h.set_live(&c.id, live);
            watch_exit(h.clone(), sandbox.clone(), &c, io_done, tx);
        } else {
            h.set_live(&c.id, live);
        }
    }
    Ok(())
}

/// Unmounts a container's CRI bind mounts and its rootfs, and removes its
/// directory in the share. Idempotent.
fn release_container_host(h: &Husk, c: &ContainerRecord, sandbox: Option<&Sandbox>) {
    for m in &c.host_mounts {
        if let Err(e) = crate::mounts::unmount(m, crate::mounts::WhenBusy::Detach) {
            tracing::warn!(mount = %m.display(), error = %e, "unmounting a container mount");
        }
    }
    if h.images
        .rootfs_mounts()
        .iter()
        .any(|m| m.container_id == c.id)
    {
        if let Err(e) = h.images.release_rootfs(&c.id) {
            tracing::error!(container = %c.id, error = %e, "releasing the container rootfs");
        }
    }
    if let Some(sb) = sandbox {
        let dir = sb.share_dir().join("containers").join(&c.id);
        if dir.exists() {
            match crate::mounts::unmount_all_under(&dir) {
                Ok(left) if left.is_empty() => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Ok(left) => {
                    tracing::error!(?left, "mounts left in the container directory; keeping it")
                }
                Err(e) => tracing::error!(error = %e, "reading mountinfo"),
            }
        }
    }
}

/// Waits until the container's init process is known to have exited.
async fn wait_exit(h: &Husk, container_id: &str, timeout: Duration) -> bool {
    let Some(mut live) = h.live(container_id) else {
        return true;
    };
    let r = tokio::time::timeout(timeout, live.exit.wait_for(|e| e.is_some())).await;
    matches!(r, Ok(Ok(_)))
}

/// Makes the CRI mounts visible in the guest: each host path is bind-mounted
/// below the container's directory in the share.
fn bind_cri_mounts(
    share_cdir: &Path,
    guest_cdir: &str,
    mounts: &[cri::Mount],
    host_mounts: &mut Vec<PathBuf>,
) -> Result<Vec<GuestMount>, Status> {
    let mut out = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let field = format!("config.mounts[{i}]");
        if !m.container_path.starts_with('/') || m.container_path.split('/').any(|c| c == "..") {
            return Err(Status::invalid_argument(format!(
                "{field}.container_path {:?} must be an absolute path without '..'",
                validation::printable(&m.container_path)
            )));
        }
        let src = Path::new(&m.host_path);
        if !src.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "{field}.host_path {:?} is not absolute",
                validation::printable(&m.host_path)
            )));
        }
        let meta = std::fs::metadata(src).map_err(|e| {
            Status::invalid_argument(format!(
                "{field}.host_path {}: {e}",
                validation::printable(&m.host_path)
            ))
        })?;
        let target = share_cdir.join("mounts").join(i.to_string());
        let mk = if meta.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            std::fs::create_dir_all(target.parent().unwrap_or(share_cdir))
                .and_then(|_| std::fs::File::create(&target).map(|_| ()))
        };
        mk.map_err(|e| Status::internal(format!("{field}: creating {}: {e}", target.display())))?;
        crate::mounts::bind(src, &target).map_err(|e| {
            Status::internal(format!("{field}: bind-mounting {}: {e}", m.host_path))
        })?;
        host_mounts.push(target);
        out.push(GuestMount {
            destination: m.container_path.clone(),
            source: format!("{guest_cdir}/mounts/{i}"),
            readonly: m.readonly,
        });
    }
    Ok(out)
}

async fn create_container(
    h: &Husk,
    req: cri::CreateContainerRequest,
) -> Result<cri::CreateContainerResponse, Status> {
    let pod = find_pod(h, "pod_sandbox_id", &req.pod_sandbox_id)?;
    record_pod_field(&pod.id);
    let config = req
        .config
        .ok_or_else(|| Status::invalid_argument("config is missing"))?;
    let meta = config
        .metadata
        .clone()
        .ok_or_else(|| Status::invalid_argument("config.metadata is missing"))?;
    validation::name("config.metadata.name", &meta.name)?;
    let image_ref = config
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default();
    if image_ref.is_empty() {
        return Err(Status::invalid_argument("config.image.image is empty"));
    }
    let log_dir = validation::log_directory(&pod.config.log_directory)?;
    let log_path = validation::log_path(log_dir.as_deref(), &config.log_path)?;
    let lock = h.pod_lock(&pod.id);
    let _g = lock.lock().await;
    let pod = h
        .state
        .pod(&pod.id)
        .ok_or_else(|| Status::not_found(format!("pod sandbox {} was removed", pod.id)))?;
    let sandbox = match (pod.state, h.sandbox(&pod.id)) {
        (PodState::Ready, Some(sb)) => sb,
        _ => {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )))
        }
    };
    if let Some(c) = h.state.containers_of(&pod.id).into_iter().find(|c| {
        c.config
            .metadata
            .as_ref()
            .is_some_and(|m| m.name == meta.name && m.attempt == meta.attempt)
    }) {
        return Err(Status::already_exists(format!(
            "container {} (attempt {}) already exists in pod {}: {}",
            meta.name, meta.attempt, pod.id, c.id
        )));
    }
    let image = h
        .images
        .status(&image_ref)
        .map_err(|e| image_error(&e))?
        .ok_or_else(|| {
            Status::not_found(format!(
                "config.image.image: image {image_ref:?} is not present; pull it first"
            ))
        })?;

    let id = super::new_id();
    tracing::Span::current().record("container", id.as_str());
    let share_cdir = sandbox.share_dir().join("containers").join(&id);
    let guest_cdir = format!("{GUEST_SHARE_DIR}/containers/{id}");
    let rootfs = sandbox
        .container_rootfs(&id)
        .map_err(|e| sandbox_error(&e))?;
    let mut rec = ContainerRecord {
        id: id.clone(),
        pod_id: pod.id.clone(),
        config: config.clone(),
        image_ref: image_ref.clone(),
        image_id: image.id.0.clone(),
        state: ContainerState::Created,
        created_at_ns: now_ns(),
        started_at_ns: 0,
        finished_at_ns: 0,
        exit_code: 0,
        reason: String::new(),
        message: String::new(),
        log_path: log_path.clone().unwrap_or_default(),
        host_mounts: Vec::new(),
    };

    let mut agent_created = false;
    let r: Result<LiveContainer, Status> = async {
        let mut mounts = bind_cri_mounts(
            &share_cdir,
            &guest_cdir,
            &config.mounts,
            &mut rec.host_mounts,
        )?;
        for (f, dest) in [
            ("hosts", "/etc/hosts"),
            ("resolv.conf", "/etc/resolv.conf"),
            ("hostname", "/etc/hostname"),
        ] {
            if !mounts.iter().any(|m| m.destination == dest) {
                let readonly = f != "hosts";
                mounts.push(GuestMount {
                    destination: dest.into(),
                    source: format!("{GUEST_SHARE_DIR}/pod/{f}"),
                    readonly,
                });
            }
        }
        h.images
            .prepare_rootfs(&image.id.0, &id, &rootfs)
            .map_err(|e| image_error(&e))?;
        let user = spec::resolve_user(&config, &image.config, &rootfs)?;
        let oci = spec::build(&SpecInputs {
            config: &config,
            image: &image.config,
            user,
            mounts: &mounts,
        })?;
        let stdio = StdioConfig {
            stdin: config.stdin,
            terminal: config.tty,
        };
        let log =
            match &log_path {
                Some(p) => {
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| {
                            Status::internal(format!(
                                "creating log directory {}: {e}",
                                parent.display()
                            ))
                        })?;
                    }
                    Some(LogFile::open(p).map_err(|e| {
                        Status::internal(format!("opening log {}: {e}", p.display()))
                    })?)
                }
                None => None,
            };
        sandbox
            .create_container(&id, oci, Rootfs::InShare, stdio)
            .await
            .map_err(|e| sandbox_error(&e))?;
        agent_created = true;
        attach_output(&sandbox, &id, stdio, log).await
    }
    .await;

    let live = match r {
        Ok(l) => l,
        Err(s) => {
            if agent_created {
                let _ = sandbox.remove_container(&id, true).await;
            }
            release_container_host(h, &rec, Some(&sandbox));
            return Err(s);
        }
    };
    if let Err(e) = h.state.put_container(rec.clone()) {
        let _ = sandbox.remove_container(&id, true).await;
        release_container_host(h, &rec, Some(&sandbox));
        return Err(state_error(&e));
    }
    h.set_live(&id, live);
    Ok(cri::CreateContainerResponse { container_id: id })
}

/// Attaches the init process's streams and copies its output to the CRI log
/// (appending: after a huskd restart the same file continues). Without a
/// log the output is drained so that the process never blocks on a full
/// pipe. The exit channel of the result is a placeholder until the exit
/// watcher ([`watch_exit`]) replaces it.
async fn attach_output(
    sandbox: &Sandbox,
    id: &str,
    stdio: StdioConfig,
    log: Option<LogFile>,
) -> Result<LiveContainer, Status> {
    let streams = sandbox
        .attach_stdio(id, "", stdio)
        .await
        .map_err(|e| sandbox_error(&e))?;
    let outs = [
        (Stream::Stdout, Some(streams.stdout)),
        (Stream::Stderr, streams.stderr),
    ];
    let mut copiers = Vec::new();
    for (kind, s) in outs {
        let Some(s) = s else { continue };
        copiers.push(match &log {
            Some(l) => {
                let l = l.clone();
                tokio::spawn(async move {
                    copy_to_log(s, kind, l, DEFAULT_MAX_LINE).await;
                })
            }
            None => tokio::spawn(async move {
                let mut s = s;
                let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
            }),
        });
    }
    let (io_tx, io_done) = watch::channel(false);
    tokio::spawn(async move {
        for c in copiers {
            let _ = c.await;
        }
        let _ = io_tx.send(true);
    });
    // CRI stdin (attach) is not served; the stream stays open (a
    // process reading stdin blocks as under other runtimes) until the
    // container is removed and its live entry dropped.
    let stdin = streams.stdin.map(Arc::new);
    let (_tx, rx) = watch::channel(None);
    Ok(LiveContainer {
        log,
        exit: rx,
        io_done,
        stdin,
    })
}

async fn start_container(h: &Arc<Husk>, id: &str) -> Result<(), Status> {
    let c = find_container(h, id)?;
    record_pod_field(&c.pod_id);
    let lock = h.pod_lock(&c.pod_id);
    let _g = lock.lock().await;
    let c = h
        .state
        .container(&c.id)
        .ok_or_else(|| Status::not_found(format!("container {id} was removed")))?;
    if c.state != ContainerState::Created {
        return Err(Status::failed_precondition(format!(
            "container {} is {:?}, not Created",
            c.id, c.state
        )));
    }
    let sandbox = h.sandbox(&c.pod_id).ok_or_else(|| {
        Status::failed_precondition(format!("pod sandbox {} is not running", c.pod_id))
    })?;
    // A fresh exit channel: the waiter below owns the sender.
    let (tx, rx) = watch::channel(None);
    let Some(live) = h.live(&c.id) else {
        return Err(Status::failed_precondition(format!(
            "container {}: its output streams are gone (huskd restarted since CreateContainer)",
            c.id
        )));
    };
    let io_done = live.io_done.clone();
    h.set_live(
        &c.id,
        LiveContainer {
            log: live.log,
            exit: rx,
            io_done: live.io_done,
            stdin: live.stdin,
        },
    );
    sandbox
        .start_container(&c.id)
        .await
        .map_err(|e| sandbox_error(&e))?;
    h.state
        .update_container(&c.id, |r| {
            r.state = ContainerState::Running;
            r.started_at_ns = now_ns();
        })
        .map_err(|e| state_error(&e))?;
    watch_exit(h.clone(), sandbox, &c, io_done, tx);
    Ok(())
}

/// Waits (WaitProcess) for the container's init process in the background,
/// then records the exit and sends it on `tx`. WaitProcess answers at once
/// for a process that exited while huskd was down.
fn watch_exit(
    h2: Arc<Husk>,
    sandbox: Arc<Sandbox>,
    c: &ContainerRecord,
    mut io_done: watch::Receiver<bool>,
    tx: watch::Sender<Option<ExitInfo>>,
) {
    let cid = c.id.clone();
    let span = tracing::info_span!("container_wait", pod = %c.pod_id, container = %c.id);
    tokio::spawn(
        async move {
            let r = sandbox.wait(&cid, "").await;
            let (exit, reason, message) = match r {
                Ok(e) => {
                    let reason = if e.oom_killed {
                        "OOMKilled"
                    } else if e.exit_code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    };
                    (e, reason.to_string(), String::new())
                }
                Err(e) => (
                    ExitInfo {
                        exit_code: 255,
                        oom_killed: false,
                        exited_at_unix_nanos: now_ns() as u64,
                    },
                    "Unknown".to_string(),
                    format!("waiting for the container failed: {e}"),
                ),
            };
            // The last output reaches the log before the exit is reported
            // (kubelet reads the log of an exited container once). Bounded:
            // a background process may hold the streams open.
            if tokio::time::timeout(IO_DRAIN_WAIT, io_done.wait_for(|d| *d))
                .await
                .is_err()
            {
                tracing::warn!("output streams still open after the exit; reporting it anyway");
            }
            tracing::info!(exit_code = exit.exit_code, %reason, "container exited");
            let _ = h2.state.update_container(&cid, |r| {
                if r.state == ContainerState::Running {
                    r.state = ContainerState::Exited;
                    r.exit_code = exit.exit_code;
                    // The host's clock, not the guest's: the guest clock
                    // is untrusted and drifts from the host's (an exit
                    // before the start was seen), and CRI times must be
                    // comparable with created/started, which are host times.
                    r.finished_at_ns = now_ns().max(r.started_at_ns);
                    r.reason = reason;
                    r.message = message;
                }
            });
            let _ = tx.send(Some(exit));
        }
        .instrument(span),
    );
}

async fn stop_container(h: &Husk, id: &str, timeout_s: i64) -> Result<(), Status> {
    let Some(c) = find_container_opt(h, id)? else {
        return Ok(());
    };
    record_pod_field(&c.pod_id);
    if c.state != ContainerState::Running {
        return Ok(());
    }
    let Some(sandbox) = h.sandbox(&c.pod_id) else {
        return Ok(());
    };
    let timeout = Duration::from_secs(timeout_s.max(0) as u64);
    if !timeout.is_zero() {
        match sandbox.signal(&c.id, "", libc::SIGTERM).await {
            Ok(()) => {}
            Err(e) if sandbox_error(&e).code() == tonic::Code::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "SIGTERM failed"),
        }
        if wait_exit(h, &c.id, timeout).await {
            return Ok(());
        }
        tracing::info!(timeout_s, "container did not stop in time; SIGKILL");
    }
    match sandbox.signal(&c.id, "", libc::SIGKILL).await {
        Ok(()) => {}
        Err(e) if sandbox_error(&e).code() == tonic::Code::NotFound => {}
        Err(e) => return Err(sandbox_error(&e)),
    }
    if !wait_exit(h, &c.id, KILL_WAIT).await {
        return Err(Status::deadline_exceeded(format!(
            "container {} did not exit after SIGKILL",
            c.id
        )));
    }
    Ok(())
}

async fn remove_container(h: &Husk, id: &str) -> Result<(), Status> {
    let Some(c) = find_container_opt(h, id)? else {
        return Ok(());
    };
    record_pod_field(&c.pod_id);
    if c.state == ContainerState::Running {
        stop_container(h, &c.id, 0).await?;
    }
    let lock = h.pod_lock(&c.pod_id);
    let _g = lock.lock().await;
    let sandbox = h.sandbox(&c.pod_id);
    if let Some(sb) = &sandbox {
        if let Err(e) = sb.remove_container(&c.id, true).await {
            let s = sandbox_error(&e);
            if s.code() != tonic::Code::NotFound {
                return Err(s);
            }
        }
    }
    release_container_host(h, &c, sandbox.as_deref());
    h.state
        .remove_container(&c.id)
        .map_err(|e| state_error(&e))?;
    h.drop_live(&c.id);
    Ok(())
}

fn container_status_of(
    h: &Husk,
    c: &ContainerRecord,
    verbose: bool,
) -> cri::ContainerStatusResponse {
    let image_spec = c.config.image.clone();
    let status = cri::ContainerStatus {
        id: c.id.clone(),
        metadata: c.config.metadata.clone(),
        state: container_state_cri(c.state),
        created_at: c.created_at_ns,
        started_at: c.started_at_ns,
        finished_at: c.finished_at_ns,
        exit_code: c.exit_code,
        image: image_spec,
        image_ref: c.image_id.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
        mounts: c.config.mounts.clone(),
        log_path: c.log_path.display().to_string(),
        resources: c
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|r| cri::ContainerResources {
                linux: Some(r),
                ..Default::default()
            }),
        image_id: c.image_id.clone(),
        ..Default::default()
    };
    let mut info = HashMap::new();
    if verbose {
        let live = h.live(&c.id).is_some();
        let v = serde_json::json!({
            "sandboxID": c.pod_id,
            "imageRef": c.image_ref,
            "hostMounts": c.host_mounts,
            "logAttached": live,
            "config": c.config,
        });
        info.insert("info".to_string(), v.to_string());
    }
    cri::ContainerStatusResponse {
        status: Some(status),
        info,
    }
}

/// `timings`: how the live VM's start was spent (absent after a restart).
/// The pod's IPs while it is ready: the first is the primary (IPv4 when
/// the CNI result has both families, as kubelet expects).
fn pod_network_status(p: &PodRecord) -> cri::PodSandboxNetworkStatus {
    let ips: Vec<String> = match (&p.network, p.state) {
        (Some(n), PodState::Ready) => n.pod_ips().iter().map(|ip| ip.to_string()).collect(),
        _ => Vec::new(),
    };
    let mut it = ips.into_iter();
    cri::PodSandboxNetworkStatus {
        ip: it.next().unwrap_or_default(),
        additional_ips: it.map(|ip| cri::PodIp { ip }).collect(),
    }
}

fn pod_status_of(
    p: &PodRecord,
    verbose: bool,
    timings: Option<crate::sandbox::SandboxTimings>,
) -> cri::PodSandboxStatusResponse {
    let status = cri::PodSandboxStatus {
        id: p.id.clone(),
        metadata: p.config.metadata.clone(),
        state: pod_state_cri(p.state),
        created_at: p.created_at_ns,
        network: Some(pod_network_status(p)),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: p
                    .config
                    .linux
                    .as_ref()
                    .and_then(|l| l.security_context.as_ref())
                    .and_then(|s| s.namespace_options.clone()),
            }),
        }),
        labels: p.config.labels.clone(),
        annotations: p.config.annotations.clone(),
        runtime_handler: p.runtime_handler.clone(),
    };
    let mut info = HashMap::new();
    if verbose {
        let v = serde_json::json!({
            "runtimeHandler": p.runtime_handler,
            "hypervisor": p.hypervisor,
            "vcpus": p.vcpus,
            "memoryMiB": p.memory_mib,
            "pids": p.pids,
            "sandboxDir": p.sandbox_dir,
            "reason": p.reason,
            "config": p.config,
            "startTimingsMs": timings.map(|t| {
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                serde_json::json!({
                    "hostSetup": ms(t.host_setup),
                    "guestBoot": ms(t.guest_boot),
                    "guestBootToReady": ms(t.guest_boot_to_ready),
                    "agentSetup": ms(t.agent_setup),
                    "networkSetup": ms(t.network_setup),
                    "total": ms(t.total),
                })
            }),
        });
        info.insert("info".to_string(), v.to_string());
    }
    cri::PodSandboxStatusResponse {
        status: Some(status),
        info,
        ..Default::default()
    }
}

async fn exec_sync(h: &Husk, req: cri::ExecSyncRequest) -> Result<cri::ExecSyncResponse, Status> {
    let c = find_container(h, &req.container_id)?;
    record_pod_field(&c.pod_id);
    if req.cmd.is_empty() {
        return Err(Status::invalid_argument("cmd is empty"));
    }
    if c.state != ContainerState::Running {
        return Err(Status::failed_precondition(format!(
            "container {} is not running",
            c.id
        )));
    }
    let sandbox = h.sandbox(&c.pod_id).ok_or_else(|| {
        Status::failed_precondition(format!("pod sandbox {} is not running", c.pod_id))
    })?;
    let image = h
        .images
        .status(&c.image_id)
        .ok()
        .flatten()
        .map(|i| i.config)
        .unwrap_or_default();
    let rootfs = sandbox
        .container_rootfs(&c.id)
        .map_err(|e| sandbox_error(&e))?;
    let user = spec::resolve_user(&c.config, &image, &rootfs)?;
    let process = spec::exec_process(&c.config, &image, &user, &req.cmd)?;
    let exec_id = format!("exec-{}", &super::new_id()[..16]);
    let stdio = StdioConfig {
        stdin: false,
        terminal: false,
    };
    sandbox
        .exec(&c.id, &exec_id, &process, stdio)
        .await
        .map_err(|e| sandbox_error(&e))?;
    let run = async {
        let streams = sandbox
            .attach_stdio(&c.id, &exec_id, stdio)
            .await
            .map_err(|e| sandbox_error(&e))?;
        let read = |s: Option<tokio::net::UnixStream>| async move {
            let mut out = Vec::new();
            if let Some(s) = s {
                let _ = s.take(EXEC_OUTPUT_LIMIT as u64).read_to_end(&mut out).await;
            }
            out
        };
        let (stdout, stderr, exit) = tokio::join!(
            read(Some(streams.stdout)),
            read(streams.stderr),
            sandbox.wait(&c.id, &exec_id)
        );
        let exit = exit.map_err(|e| sandbox_error(&e))?;
        Ok::<_, Status>(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code: exit.exit_code,
        })
    };
    if req.timeout > 0 {
        match tokio::time::timeout(Duration::from_secs(req.timeout as u64), run).await {
            Ok(r) => r,
            Err(_) => {
                let _ = sandbox.signal(&c.id, &exec_id, libc::SIGKILL).await;
                Err(Status::deadline_exceeded(format!(
                    "ExecSync in container {}: command timed out after {}s",
                    c.id, req.timeout
                )))
            }
        }
    } else {
        run.await
    }
}

/// CPU and memory of a running container, from the agent (the guest's
/// cgroup of the container). Without a live VM, or if the agent cannot
/// answer, only the attributes are set: kubelet treats missing usage as
/// unknown, while an error would fail its whole stats listing.
async fn container_stats_of(h: &Husk, c: &ContainerRecord) -> cri::ContainerStats {
    let mut out = cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
        }),
        ..Default::default()
    };
    if c.state != ContainerState::Running {
        return out;
    }
    let Some(sb) = h.sandbox(&c.pod_id) else {
        return out;
    };
    match sb.stats(&c.id).await {
        Ok(s) => {
            // The host's clock: the guest's is untrusted and drifts.
            let ts = now_ns();
            let v = |value: u64| Some(cri::UInt64Value { value });
            out.cpu = Some(cri::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: v(s.cpu_usage_ns),
                usage_nano_cores: None,
            });
            out.memory = Some(cri::MemoryUsage {
                timestamp: ts,
                working_set_bytes: v(s.memory_working_set_bytes),
                usage_bytes: v(s.memory_usage_bytes),
                rss_bytes: v(s.memory_rss_bytes),
                ..Default::default()
            });
        }
        Err(e) => tracing::warn!(container = %c.id, error = %e, "container stats"),
    }
    out
}

/// A Ready pod whose VM exited on its own becomes NotReady (kubelet's
/// PLEG learns it from ListPodSandbox, then stops and recreates the pod).
async fn refresh_pod(h: &Husk, p: PodRecord) -> Result<PodRecord, Status> {
    if p.state != PodState::Ready {
        return Ok(p);
    }
    let Some(sb) = h.sandbox(&p.id) else {
        return Ok(p);
    };
    if !sb.is_stopped().await {
        return Ok(p);
    }
    tracing::warn!(pod = %p.id, "pod VM exited on its own; pod NotReady");
    Ok(h.state
        .update_pod(&p.id, |r| {
            if r.state == PodState::Ready {
                r.state = PodState::NotReady;
                r.reason = "the pod VM exited".into();
            }
        })
        .map_err(|e| state_error(&e))?
        .unwrap_or(p))
}

#[tonic::async_trait]
impl RuntimeService for CriRuntime {
    async fn version(
        &self,
        _req: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        traced("Version", "", "", async {
            Ok(cri::VersionResponse {
                version: "0.1.0".into(),
                runtime_name: super::RUNTIME_NAME.into(),
                runtime_version: env!("CARGO_PKG_VERSION").into(),
                runtime_api_version: super::CRI_API_VERSION.into(),
            })
        })
        .await
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let req = req.into_inner();
        traced("RunPodSandbox", "", "", run_pod(&self.husk, req)).await
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        let h = &self.husk;
        traced("StopPodSandbox", &id, "", async {
            let Some(p) = find_pod_opt(h, "pod_sandbox_id", &id)? else {
                return Ok(cri::StopPodSandboxResponse {});
            };
            let lock = h.pod_lock(&p.id);
            let _g = lock.lock().await;
            stop_pod_inner(h, &p.id, "stopped by StopPodSandbox").await;
            Ok(cri::StopPodSandboxResponse {})
        })
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        let h = &self.husk;
        traced("RemovePodSandbox", &id, "", async {
            let Some(p) = find_pod_opt(h, "pod_sandbox_id", &id)? else {
                return Ok(cri::RemovePodSandboxResponse {});
            };
            let lock = h.pod_lock(&p.id);
            {
                let _g = lock.lock().await;
                // CRI: removing a running pod stops it forcibly first.
                stop_pod_inner(h, &p.id, "removed by RemovePodSandbox").await;
                for c in h.state.containers_of(&p.id) {
                    release_container_host(h, &c, None);
                    h.state
                        .remove_container(&c.id)
                        .map_err(|e| state_error(&e))?;
                    h.drop_live(&c.id);
                }
                cleanup_orphan_dir(&p.sandbox_dir).await;
                release_network(h, &p.id, p.network.as_ref()).await;
                h.state.remove_pod(&p.id).map_err(|e| state_error(&e))?;
            }
            h.forget_pod_lock(&p.id);
            Ok(cri::RemovePodSandboxResponse {})
        })
        .await
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let req = req.into_inner();
        traced("PodSandboxStatus", &req.pod_sandbox_id, "", async {
            let p = find_pod(&self.husk, "pod_sandbox_id", &req.pod_sandbox_id)?;
            let timings = self.husk.sandbox(&p.id).map(|sb| sb.timings());
            let p = refresh_pod(&self.husk, p).await?;
            Ok(pod_status_of(&p, req.verbose, timings))
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        traced("ListPodSandbox", "", "", async {
            let mut pods = Vec::new();
            for p in self.husk.state.pods() {
                pods.push(refresh_pod(&self.husk, p).await?);
            }
            let items = pods
                .into_iter()
                .filter(|p| filter.id.is_empty() || p.id.starts_with(&filter.id))
                .filter(|p| {
                    filter
                        .state
                        .as_ref()
                        .is_none_or(|s| s.state == pod_state_cri(p.state))
                })
                .filter(|p| label_match(&p.config.labels, &filter.label_selector))
                .map(|p| cri::PodSandbox {
                    id: p.id.clone(),
                    metadata: p.config.metadata.clone(),
                    state: pod_state_cri(p.state),
                    created_at: p.created_at_ns,
                    labels: p.config.labels.clone(),
                    annotations: p.config.annotations.clone(),
                    runtime_handler: p.runtime_handler.clone(),
                })
                .collect();
            Ok(cri::ListPodSandboxResponse { items })
        })
        .await
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let req = req.into_inner();
        let pod = req.pod_sandbox_id.clone();
        traced(
            "CreateContainer",
            &pod,
            "",
            create_container(&self.husk, req),
        )
        .await
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        traced("StartContainer", "", &id, async {
            start_container(&self.husk, &id).await?;
            Ok(cri::StartContainerResponse {})
        })
        .await
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = req.into_inner();
        traced("StopContainer", "", &req.container_id, async {
            stop_container(&self.husk, &req.container_id, req.timeout).await?;
            Ok(cri::StopContainerResponse {})
        })
        .await
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        traced("RemoveContainer", "", &id, async {
            remove_container(&self.husk, &id).await?;
            Ok(cri::RemoveContainerResponse {})
        })
        .await
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        traced(
            "ListContainers",
            &filter.pod_sandbox_id,
            &filter.id,
            async {
                let containers = self
                    .husk
                    .state
                    .containers()
                    .into_iter()
                    .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
                    .filter(|c| {
                        filter.pod_sandbox_id.is_empty()
                            || c.pod_id.starts_with(&filter.pod_sandbox_id)
                    })
                    .filter(|c| {
                        filter
                            .state
                            .as_ref()
                            .is_none_or(|s| s.state == container_state_cri(c.state))
                    })
                    .filter(|c| label_match(&c.config.labels, &filter.label_selector))
                    .map(|c| cri::Container {
                        id: c.id.clone(),
                        pod_sandbox_id: c.pod_id.clone(),
                        metadata: c.config.metadata.clone(),
                        image: c.config.image.clone(),
                        image_ref: c.image_id.clone(),
                        state: container_state_cri(c.state),
                        created_at: c.created_at_ns,
                        labels: c.config.labels.clone(),
                        annotations: c.config.annotations.clone(),
                        image_id: c.image_id.clone(),
                    })
                    .collect();
                Ok(cri::ListContainersResponse { containers })
            },
        )
        .await
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let req = req.into_inner();
        traced("ContainerStatus", "", &req.container_id, async {
            let c = find_container(&self.husk, &req.container_id)?;
            record_pod_field(&c.pod_id);
            Ok(container_status_of(&self.husk, &c, req.verbose))
        })
        .await
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let req = req.into_inner();
        let h = &self.husk;
        traced("UpdateContainerResources", "", &req.container_id, async {
            let c = find_container(h, &req.container_id)?;
            record_pod_field(&c.pod_id);
            let Some(linux) = req.linux else {
                return Ok(cri::UpdateContainerResourcesResponse {});
            };
            if !matches!(c.state, ContainerState::Created | ContainerState::Running) {
                return Err(Status::failed_precondition(format!(
                    "container {} is not running",
                    c.id
                )));
            }
            let sandbox = h.sandbox(&c.pod_id).ok_or_else(|| {
                Status::failed_precondition(format!("pod sandbox {} is not running", c.pod_id))
            })?;
            let json = spec::resources_json(&linux).to_string().into_bytes();
            sandbox
                .agent()
                .client()
                .update_container(
                    UpdateContainerRequest {
                        container_id: c.id.clone(),
                        resources_json: json,
                    },
                    Some(Duration::from_secs(30)),
                )
                .await
                .map_err(|e| {
                    sandbox_error(&crate::sandbox::SandboxError::Agent {
                        id: c.pod_id.clone(),
                        source: crate::agent::AgentError::Rpc {
                            method: "UpdateContainer",
                            source: e,
                        },
                    })
                })?;
            h.state
                .update_container(&c.id, |r| {
                    r.config
                        .linux
                        .get_or_insert_with(Default::default)
                        .resources = Some(linux);
                })
                .map_err(|e| state_error(&e))?;
            Ok(cri::UpdateContainerResourcesResponse {})
        })
        .await
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = req.into_inner().container_id;
        traced("ReopenContainerLog", "", &id, async {
            let c = find_container(&self.husk, &id)?;
            record_pod_field(&c.pod_id);
            if c.state != ContainerState::Running {
                return Err(Status::failed_precondition(format!(
                    "container {} is not running",
                    c.id
                )));
            }
            let log = self.husk.live(&c.id).and_then(|l| l.log).ok_or_else(|| {
                Status::failed_precondition(format!("container {} has no log file attached", c.id))
            })?;
            log.reopen().map_err(|e| {
                Status::internal(format!("reopening {}: {e}", log.path().display()))
            })?;
            Ok(cri::ReopenContainerLogResponse {})
        })
        .await
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = req.into_inner();
        let cid = req.container_id.clone();
        traced("ExecSync", "", &cid, exec_sync(&self.husk, req)).await
    }

    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let id = req.into_inner().container_id;
        traced("Exec", "", &id, async {
            Err(Status::unimplemented(
                "Exec (streaming) is not implemented by husk yet; ExecSync is",
            ))
        })
        .await
    }

    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let id = req.into_inner().container_id;
        traced("Attach", "", &id, async {
            Err(Status::unimplemented(
                "Attach is not implemented by husk yet",
            ))
        })
        .await
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        traced("PortForward", &id, "", async {
            Err(Status::unimplemented(
                "PortForward is not implemented by husk yet (no pod networking)",
            ))
        })
        .await
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = req.into_inner().container_id;
        traced("ContainerStats", "", &id, async {
            let c = find_container(&self.husk, &id)?;
            record_pod_field(&c.pod_id);
            Ok(cri::ContainerStatsResponse {
                stats: Some(container_stats_of(&self.husk, &c).await),
            })
        })
        .await
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        traced(
            "ListContainerStats",
            &filter.pod_sandbox_id,
            &filter.id,
            async {
                let mut stats = Vec::new();
                // Running containers only, as containerd: kubelet asks every
                // few seconds and exited containers use nothing.
                for c in self.husk.state.containers() {
                    if c.state != ContainerState::Running
                        || !(filter.id.is_empty() || c.id.starts_with(&filter.id))
                        || !(filter.pod_sandbox_id.is_empty()
                            || c.pod_id.starts_with(&filter.pod_sandbox_id))
                        || !label_match(&c.config.labels, &filter.label_selector)
                    {
                        continue;
                    }
                    stats.push(container_stats_of(&self.husk, &c).await);
                }
                Ok(cri::ListContainerStatsResponse { stats })
            },
        )
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        traced("PodSandboxStats", &id, "", async {
            Err(Status::unimplemented(
                "PodSandboxStats is not implemented by husk yet",
            ))
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        _req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        traced("ListPodSandboxStats", "", "", async {
            Err(Status::unimplemented(
                "ListPodSandboxStats is not implemented by husk yet",
            ))
        })
        .await
    }

    async fn update_runtime_config(
        &self,
        _req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        // kubelet sends the pod CIDR here; husk has no pod networking to
        // apply it to yet, and accepting it changes nothing.
        traced("UpdateRuntimeConfig", "", "", async {
            Ok(cri::UpdateRuntimeConfigResponse {})
        })
        .await
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = req.into_inner().verbose;
        traced("Status", "", "", async {
            Ok(runtime_status(&self.husk, verbose))
        })
        .await
    }

    async fn checkpoint_container(
        &self,
        req: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        traced("CheckpointContainer", "", &id, async {
            Err(Status::unimplemented(
                "CheckpointContainer is not supported by husk",
            ))
        })
        .await
    }

    type GetContainerEventsStream = Pin<
        Box<dyn tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>,
    >;

    async fn get_container_events(
        &self,
        _req: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        traced("GetContainerEvents", "", "", async {
            Err(Status::unimplemented(
                "GetContainerEvents (evented PLEG) is not implemented by husk yet",
            ))
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        traced("ListMetricDescriptors", "", "", async {
            Err(Status::unimplemented(
                "ListMetricDescriptors is not implemented by husk yet",
            ))
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        traced("ListPodSandboxMetrics", "", "", async {
            Err(Status::unimplemented(
                "ListPodSandboxMetrics is not implemented by husk yet",
            ))
        })
        .await
    }

    async fn runtime_config(
        &self,
        _req: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        // The guest runs cgroup v2 under its own systemd-less agent; kubelet
        // asks which driver to use for the host, where husk creates no
        // per-container cgroups.
        traced("RuntimeConfig", "", "", async {
            Ok(cri::RuntimeConfigResponse {
                linux: Some(cri::LinuxRuntimeConfiguration {
                    cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
                }),
            })
        })
        .await
    }
}

/// The Status response: runtime readiness with the hypervisor and why it
/// was chosen, network readiness, and the handlers.
pub fn runtime_status(h: &Husk, verbose: bool) -> cri::StatusResponse {
    let usable: Vec<&str> = h
        .handlers
        .values()
        .filter(|x| x.hypervisor.is_ok())
        .map(|x| x.name.as_str())
        .collect();
    let default_ok = h
        .handlers
        .get(super::DEFAULT_HANDLER)
        .is_some_and(|x| x.hypervisor.is_ok());
    let runtime_ready = default_ok && h.virtiofsd.is_ok();
    let hv_desc = h
        .handlers
        .get(super::DEFAULT_HANDLER)
        .map(|x| match &x.hypervisor {
            Ok(hv) => hv.description().to_string(),
            Err(e) => format!("unavailable: {e}"),
        })
        .unwrap_or_default();
    let runtime_msg = if runtime_ready {
        hv_desc.clone()
    } else if let Err(e) = &h.virtiofsd {
        format!("{e}; hypervisor: {hv_desc}")
    } else {
        format!("hypervisor {hv_desc}")
    };
    let conditions = vec![
        cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: runtime_ready,
            reason: if runtime_ready {
                "Hypervisor".into()
            } else {
                "HypervisorUnavailable".into()
            },
            message: runtime_msg,
        },
        match network::configured_network(&h.cni) {
            Ok(name) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: "CniConfigured".into(),
                message: format!("CNI network {name:?}"),
            },
            // kubelet's own reason for this state, as containerd reports it.
            Err(e) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: e.to_string(),
            },
        },
    ];
    let mut runtime_handlers: Vec<cri::RuntimeHandler> = h
        .handlers
        .values()
        .map(|x| cri::RuntimeHandler {
            name: x.name.clone(),
            features: Some(cri::RuntimeHandlerFeatures {
                recursive_read_only_mounts: false,
                user_namespaces: false,
            }),
        })
        .collect();
    // "" names the default handler.
    runtime_handlers.push(cri::RuntimeHandler {
        name: String::new(),
        features: Some(cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: false,
            user_namespaces: false,
        }),
    });
    let mut info = HashMap::new();
    if verbose {
        let handlers: serde_json::Map<String, serde_json::Value> = h
            .handlers
            .values()
            .map(|x| {
                (
                    x.name.clone(),
                    serde_json::json!({
                        "hypervisor": match &x.hypervisor { Ok(hv) => hv.description().to_string(), Err(e) => format!("unavailable: {e}") },
                        "vcpus": x.config.vcpus,
                        "memoryMiB": x.config.memory_mib,
                        "kernel": x.config.kernel,
                        "initrd": x.config.initrd,
                    }),
                )
            })
            .collect();
        let v = serde_json::json!({
            "accel": h.probe.accel.as_str(),
            // The default handler's backend says why it was chosen in its
            // own words (the probe's reason is QEMU's wording).
            "accelReason": h
                .handlers
                .get(super::DEFAULT_HANDLER)
                .and_then(|x| x.hypervisor.as_ref().ok())
                .map_or(h.probe.reason.as_str(), |hv| hv.description()),
            "usableHandlers": usable,
            "handlers": handlers,
            "virtiofsd": match &h.virtiofsd { Ok(p) => p.display().to_string(), Err(e) => e.to_string() },
            "root": h.config.root,
            "state": h.config.state,
        });
        info.insert("info".to_string(), v.to_string());
    }
    cri::StatusResponse {
        status: Some(cri::RuntimeStatus { conditions }),
        info,
        runtime_handlers,
        features: Some(cri::RuntimeFeatures {
            supplemental_groups_policy: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_size_raised_by_resources_and_overhead() {
        let h = super::super::HandlerConfig::default();
        let mut cfg = cri::PodSandboxConfig::default();
        assert_eq!(pod_size(&h, &cfg), (1, 256));
        cfg.linux = Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_quota: 150_000,
                cpu_period: 100_000,
                memory_limit_in_bytes: 512 << 20,
                ..Default::default()
            }),
            overhead: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: (64 << 20) + 1,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(pod_size(&h, &cfg), (2, 512 + 65));
        // Smaller than the handler: the handler wins.
        cfg.linux
            .as_mut()
            .unwrap()
            .resources
            .as_mut()
            .unwrap()
            .memory_limit_in_bytes = 1 << 20;
        cfg.linux.as_mut().unwrap().overhead = None;
        assert_eq!(pod_size(&h, &cfg).1, 256);
    }

    #[test]
    fn hostnames() {
        let meta = cri::PodSandboxMetadata {
            name: "web-0".into(),
            ..Default::default()
        };
        let mut cfg = cri::PodSandboxConfig::default();
        assert_eq!(pod_hostname(&cfg, &meta).unwrap(), "web-0");
        let long = cri::PodSandboxMetadata {
            name: format!("create-PodSandbox_{}-", "9".repeat(44)),
            ..Default::default()
        };
        assert_eq!(
            pod_hostname(&cfg, &long).unwrap(),
            format!("create-PodSandbox-{}", "9".repeat(44))
        );
        cfg.hostname = "bad_host".into();
        assert!(pod_hostname(&cfg, &meta)
            .unwrap_err()
            .message()
            .contains("config.hostname"));
    }

    #[test]
    fn pod_config_checks() {
        let mut cfg = cri::PodSandboxConfig::default();
        assert!(check_pod_config(&cfg)
            .unwrap_err()
            .message()
            .contains("config.metadata"));
        cfg.metadata = Some(cri::PodSandboxMetadata {
            name: "p".into(),
            uid: "u".into(),
            namespace: "".into(),
            attempt: 0,
        });
        assert!(check_pod_config(&cfg)
            .unwrap_err()
            .message()
            .contains("config.metadata.namespace"));
        cfg.metadata.as_mut().unwrap().namespace = "ns".into();
        cfg.log_directory = "relative".into();
        assert!(check_pod_config(&cfg)
            .unwrap_err()
            .message()
            .contains("log_directory"));
        cfg.log_directory = "/var/log/pods/x".into();
        cfg.dns_config = Some(cri::DnsConfig {
            servers: vec!["1.1.1.1\nnameserver 6.6.6.6".into()],
            ..Default::default()
        });
        assert!(check_pod_config(&cfg)
            .unwrap_err()
            .message()
            .contains("dns_config.servers"));
        cfg.dns_config = None;
        assert!(check_pod_config(&cfg).is_ok());
    }

    #[test]
    fn pod_files() {
        let d = tempfile::tempdir().unwrap();
        let cfg = cri::PodSandboxConfig {
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            ..Default::default()
        };
        write_pod_files(d.path(), &cfg, "web-0").unwrap();
        let r = std::fs::read_to_string(d.path().join("pod/resolv.conf")).unwrap();
        assert_eq!(r, "nameserver 10.0.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n");
        assert!(std::fs::read_to_string(d.path().join("pod/hosts"))
            .unwrap()
            .contains("web-0"));
    }
}
