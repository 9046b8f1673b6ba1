//! The tonic RuntimeService: each call is traced ([`traced`]) and
//! delegated to its own module, as containerd's `internal/cri/server`
//! keeps one file per CRI call.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use super::instrument::traced;
use super::*;

/// The RuntimeService implementation.
#[derive(Debug, Clone)]
pub struct CriRuntime {
    pub husk: Arc<Husk>,
}

/// The pod and container id filters of a list call, for its span.
trait SpanIds {
    fn span_ids(&self) -> (String, String);
}

impl SpanIds for Option<cri::ContainerFilter> {
    fn span_ids(&self) -> (String, String) {
        self.as_ref()
            .map(|f| (f.pod_sandbox_id.clone(), f.id.clone()))
            .unwrap_or_default()
    }
}

impl SpanIds for Option<cri::ContainerStatsFilter> {
    fn span_ids(&self) -> (String, String) {
        self.as_ref()
            .map(|f| (f.pod_sandbox_id.clone(), f.id.clone()))
            .unwrap_or_default()
    }
}

#[tonic::async_trait]
impl RuntimeService for CriRuntime {
    type GetContainerEventsStream = events::ContainerEventStream;

    async fn version(
        &self,
        req: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        let req = req.into_inner();
        traced("Version", "", "", runtime_status::version(&self.husk, req)).await
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let req = req.into_inner();
        traced(
            "RunPodSandbox",
            "",
            "",
            sandbox_run::run_pod_sandbox(&self.husk, req),
        )
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let req = req.into_inner();
        let pod = req.pod_sandbox_id.clone();

        traced(
            "StopPodSandbox",
            &pod,
            "",
            sandbox_stop::stop_pod_sandbox(&self.husk, req),
        )
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let req = req.into_inner();
        let pod = req.pod_sandbox_id.clone();

        traced(
            "RemovePodSandbox",
            &pod,
            "",
            sandbox_remove::remove_pod_sandbox(&self.husk, req),
        )
        .await
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let req = req.into_inner();
        let pod = req.pod_sandbox_id.clone();

        traced(
            "PodSandboxStatus",
            &pod,
            "",
            sandbox_status::pod_sandbox_status(&self.husk, req),
        )
        .await
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let req = req.into_inner();
        traced(
            "ListPodSandbox",
            "",
            "",
            sandbox_list::list_pod_sandbox(&self.husk, req),
        )
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
            container_create::create_container(&self.husk, req),
        )
        .await
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "StartContainer",
            "",
            &ctr,
            container_start::start_container_call(&self.husk, req),
        )
        .await
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "StopContainer",
            "",
            &ctr,
            container_stop::stop_container_call(&self.husk, req),
        )
        .await
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "RemoveContainer",
            "",
            &ctr,
            container_remove::remove_container_call(&self.husk, req),
        )
        .await
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let req = req.into_inner();
        let (pod, ctr) = req.filter.span_ids();
        traced(
            "ListContainers",
            &pod,
            &ctr,
            container_list::list_containers(&self.husk, req),
        )
        .await
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "ContainerStatus",
            "",
            &ctr,
            container_status::container_status(&self.husk, req),
        )
        .await
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "UpdateContainerResources",
            "",
            &ctr,
            container_update::update_container_resources(&self.husk, req),
        )
        .await
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "ReopenContainerLog",
            "",
            &ctr,
            container_log::reopen_container_log(&self.husk, req),
        )
        .await
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "ExecSync",
            "",
            &ctr,
            container_exec_sync::exec_sync(&self.husk, req),
        )
        .await
    }

    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced("Exec", "", &ctr, streaming::exec(&self.husk, req)).await
    }

    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced("Attach", "", &ctr, streaming::attach(&self.husk, req)).await
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let req = req.into_inner();
        let pod = req.pod_sandbox_id.clone();

        traced(
            "PortForward",
            &pod,
            "",
            streaming::port_forward(&self.husk, req),
        )
        .await
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "ContainerStats",
            "",
            &ctr,
            stats::container_stats(&self.husk, req),
        )
        .await
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let req = req.into_inner();
        let (pod, ctr) = req.filter.span_ids();
        traced(
            "ListContainerStats",
            &pod,
            &ctr,
            stats::list_container_stats(&self.husk, req),
        )
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let req = req.into_inner();
        let pod = req.pod_sandbox_id.clone();

        traced(
            "PodSandboxStats",
            &pod,
            "",
            stats::pod_sandbox_stats(&self.husk, req),
        )
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let req = req.into_inner();
        traced(
            "ListPodSandboxStats",
            "",
            "",
            stats::list_pod_sandbox_stats(&self.husk, req),
        )
        .await
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let req = req.into_inner();
        traced(
            "UpdateRuntimeConfig",
            "",
            "",
            runtime_status::update_runtime_config(&self.husk, req),
        )
        .await
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let req = req.into_inner();
        traced("Status", "", "", runtime_status::status(&self.husk, req)).await
    }

    async fn checkpoint_container(
        &self,
        req: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        let req = req.into_inner();
        let ctr = req.container_id.clone();

        traced(
            "CheckpointContainer",
            "",
            &ctr,
            container_checkpoint::checkpoint_container(&self.husk, req),
        )
        .await
    }

    async fn get_container_events(
        &self,
        req: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let req = req.into_inner();
        traced(
            "GetContainerEvents",
            "",
            "",
            events::get_container_events(&self.husk, req),
        )
        .await
    }

    async fn list_metric_descriptors(
        &self,
        req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        let req = req.into_inner();
        traced(
            "ListMetricDescriptors",
            "",
            "",
            metrics::list_metric_descriptors(&self.husk, req),
        )
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        let req = req.into_inner();
        traced(
            "ListPodSandboxMetrics",
            "",
            "",
            metrics::list_pod_sandbox_metrics(&self.husk, req),
        )
        .await
    }

    async fn runtime_config(
        &self,
        req: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        let req = req.into_inner();
        traced(
            "RuntimeConfig",
            "",
            "",
            runtime_status::runtime_config(&self.husk, req),
        )
        .await
    }
}
