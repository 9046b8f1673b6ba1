//! ListMetricDescriptors and ListPodSandboxMetrics (kubelet's
//! PodAndContainerStatsFromCRI): not served yet.

use k8s_cri::v1 as cri;
use tonic::Status;

use super::Husk;

pub(super) async fn list_metric_descriptors(
    _h: &Husk,
    _req: cri::ListMetricDescriptorsRequest,
) -> Result<cri::ListMetricDescriptorsResponse, Status> {
    Err(Status::unimplemented(
        "ListMetricDescriptors is not implemented by husk yet",
    ))
}

pub(super) async fn list_pod_sandbox_metrics(
    _h: &Husk,
    _req: cri::ListPodSandboxMetricsRequest,
) -> Result<cri::ListPodSandboxMetricsResponse, Status> {
    Err(Status::unimplemented(
        "ListPodSandboxMetrics is not implemented by husk yet",
    ))
}
