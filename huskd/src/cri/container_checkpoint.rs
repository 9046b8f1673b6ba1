//! CheckpointContainer: not supported (a VM pod's container cannot be
//! checkpointed apart from its VM).

use k8s_cri::v1 as cri;
use tonic::Status;

use super::Husk;

pub(super) async fn checkpoint_container(
    _h: &Husk,
    _req: cri::CheckpointContainerRequest,
) -> Result<cri::CheckpointContainerResponse, Status> {
    Err(Status::unimplemented(
        "CheckpointContainer is not supported by husk",
    ))
}
