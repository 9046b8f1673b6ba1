//! GetContainerEvents (kubelet's evented PLEG): not served yet, so kubelet
//! keeps polling (generic PLEG).

use std::pin::Pin;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::Husk;

/// The stream type of GetContainerEvents.
pub type ContainerEventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

pub(super) async fn get_container_events(
    _h: &Husk,
    _req: cri::GetEventsRequest,
) -> Result<ContainerEventStream, Status> {
    Err(Status::unimplemented(
        "GetContainerEvents (evented PLEG) is not implemented by husk yet",
    ))
}
