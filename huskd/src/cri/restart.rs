//! Restart recovery: pod VMs outlive huskd, and a starting huskd adopts
//! them, releases what belongs to no live pod (orphan processes,
//! directories, networks, rootfs records) and marks the rest lost.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use husk_proto::agent::StdioConfig;
use husk_runtime::sandbox::{reap_orphan_dir, AdoptConfig, Sandbox};
use tokio::sync::watch;

use super::container_io::{attach_output, watch_exit};
use super::pod_network::release_network;
use super::{now_ns, Husk};
use crate::logs::LogFile;
use crate::state::{ContainerState, PodRecord, PodState};

/// Reason of containers lost with their VM.
const REASON_LOST: &str = "SandboxLost";

/// Releases pod networks that a previous huskd left behind: a network
/// namespace file exists exactly while a pod's network is set up, so one
/// without a ready pod is left from a crash (between CNI ADD and the pod
/// record, or in the middle of a stop) or from a VM lost with huskd.
pub(super) async fn recover_networks(h: &Husk) {
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
pub(super) async fn recover(h: &Arc<Husk>) {
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
                r.sandbox = None;
            });
        }
        reap_orphan_dir(&p.sandbox_dir).await;
    }
    // Sandbox directories without a record: a start interrupted by a crash.
    if let Ok(rd) = std::fs::read_dir(h.sandbox_state_dir()) {
        for e in rd.flatten() {
            let dir = e.path();
            if !known.contains(&dir) {
                tracing::warn!(dir = %dir.display(), "removing a sandbox directory without a record");
                reap_orphan_dir(&dir).await;
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
    let Some(record) = p.sandbox.clone() else {
        return Err("the record has no sandbox record (written by an older huskd)".into());
    };
    let sandbox = Sandbox::adopt(AdoptConfig {
        id: p.id.clone(),
        dir: p.sandbox_dir.clone(),
        record,
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
