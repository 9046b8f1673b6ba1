//! Exec, Attach and PortForward: the CRI streaming calls, which answer
//! with a URL of a streaming server. husk has no streaming server yet;
//! ExecSync serves exec probes.

use k8s_cri::v1 as cri;
use tonic::Status;

use super::Husk;

pub(super) async fn exec(_h: &Husk, _req: cri::ExecRequest) -> Result<cri::ExecResponse, Status> {
    Err(Status::unimplemented(
        "Exec (streaming) is not implemented by husk yet; ExecSync is",
    ))
}

pub(super) async fn attach(
    _h: &Husk,
    _req: cri::AttachRequest,
) -> Result<cri::AttachResponse, Status> {
    Err(Status::unimplemented(
        "Attach is not implemented by husk yet",
    ))
}

pub(super) async fn port_forward(
    _h: &Husk,
    _req: cri::PortForwardRequest,
) -> Result<cri::PortForwardResponse, Status> {
    Err(Status::unimplemented(
        "PortForward is not implemented by husk yet (no streaming server)",
    ))
}
