//! PodSandboxStatus, and the refresh that turns a pod whose VM exited on
//! its own NotReady (also used by ListPodSandbox).

use std::collections::HashMap;
use std::time::Duration;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::errors::state_error;
use super::helpers::{find_pod, pod_state_cri};
use super::Husk;
use crate::state::{PodRecord, PodState};

pub(super) async fn pod_sandbox_status(
    h: &Husk,
    req: cri::PodSandboxStatusRequest,
) -> Result<cri::PodSandboxStatusResponse, Status> {
    let p = find_pod(h, "pod_sandbox_id", &req.pod_sandbox_id)?;
    let timings = h.sandbox(&p.id).map(|sb| sb.timings());
    let p = refresh_pod(h, p).await?;
    Ok(pod_status_of(&p, req.verbose, timings))
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
    timings: Option<husk_runtime::sandbox::SandboxTimings>,
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
            // "host" for a pod run as OS containers on the host.
            "backend": p.sandbox.as_ref().map(|s| s.vm.backend.as_str()),
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

/// A Ready pod whose VM exited on its own becomes NotReady (kubelet's
/// PLEG learns it from ListPodSandbox, then stops and recreates the pod).
pub(super) async fn refresh_pod(h: &Husk, p: PodRecord) -> Result<PodRecord, Status> {
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
