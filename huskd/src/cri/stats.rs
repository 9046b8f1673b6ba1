//! ContainerStats, ListContainerStats; pod-level stats are not served yet.

use k8s_cri::v1 as cri;
use tonic::Status;

use super::helpers::{find_container, label_match, record_pod_field};
use super::{now_ns, Husk};
use crate::state::{ContainerRecord, ContainerState};

pub(super) async fn container_stats(
    h: &Husk,
    req: cri::ContainerStatsRequest,
) -> Result<cri::ContainerStatsResponse, Status> {
    let c = find_container(h, &req.container_id)?;
    record_pod_field(&c.pod_id);
    Ok(cri::ContainerStatsResponse {
        stats: Some(container_stats_of(h, &c).await),
    })
}

pub(super) async fn list_container_stats(
    h: &Husk,
    req: cri::ListContainerStatsRequest,
) -> Result<cri::ListContainerStatsResponse, Status> {
    let filter = req.filter.unwrap_or_default();
    let mut stats = Vec::new();
    // Running containers only, as containerd: kubelet asks every few
    // seconds and exited containers use nothing.
    for c in h.state.containers() {
        if c.state != ContainerState::Running
            || !(filter.id.is_empty() || c.id.starts_with(&filter.id))
            || !(filter.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&filter.pod_sandbox_id))
            || !label_match(&c.config.labels, &filter.label_selector)
        {
            continue;
        }
        stats.push(container_stats_of(h, &c).await);
    }
    Ok(cri::ListContainerStatsResponse { stats })
}

pub(super) async fn pod_sandbox_stats(
    _h: &Husk,
    _req: cri::PodSandboxStatsRequest,
) -> Result<cri::PodSandboxStatsResponse, Status> {
    Err(Status::unimplemented(
        "PodSandboxStats is not implemented by husk yet",
    ))
}

pub(super) async fn list_pod_sandbox_stats(
    _h: &Husk,
    _req: cri::ListPodSandboxStatsRequest,
) -> Result<cri::ListPodSandboxStatsResponse, Status> {
    Err(Status::unimplemented(
        "ListPodSandboxStats is not implemented by husk yet",
    ))
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
