//! Mapping of library errors to gRPC statuses for the CRI services.

use tonic::{Code, Status};

use crate::agent::AgentError;
use crate::image;
use crate::sandbox::SandboxError;
use crate::state::StateError;

/// An image store error, with its message unchanged (it names the image and
/// registry already).
pub fn image_error(e: &image::Error) -> Status {
    use image::ErrorKind as K;
    let code = match e.kind() {
        K::InvalidArgument => Code::InvalidArgument,
        K::NotFound => Code::NotFound,
        K::AlreadyExists => Code::AlreadyExists,
        K::Unavailable => Code::Unavailable,
        K::Unauthenticated => Code::Unauthenticated,
        K::PermissionDenied => Code::PermissionDenied,
        K::DataLoss => Code::DataLoss,
        K::FailedPrecondition => Code::FailedPrecondition,
        K::Unimplemented => Code::Unimplemented,
        K::Internal => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn ttrpc_code(c: husk_proto::ttrpc::Code) -> Code {
    Code::from_i32(c as i32)
}

/// A sandbox error. Agent statuses keep their code (the agent says
/// NotFound for an unknown process, for example) with the message prefixed
/// by what huskd was doing; the agent's text is the guest's and is only
/// quoted.
pub fn sandbox_error(e: &SandboxError) -> Status {
    let code = match e {
        SandboxError::InvalidId { .. } => Code::InvalidArgument,
        SandboxError::Exists(_) => Code::AlreadyExists,
        SandboxError::Missing(_) => Code::FailedPrecondition,
        SandboxError::Stopped { .. } => Code::FailedPrecondition,
        SandboxError::Agent { source, .. } => match source {
            AgentError::Rpc { source, .. } => match source.code() {
                Some(c) => ttrpc_code(c),
                None if matches!(source, husk_proto::ttrpc::Error::Timeout) => {
                    Code::DeadlineExceeded
                }
                None => Code::Unavailable,
            },
            AgentError::Timeout { .. } => Code::DeadlineExceeded,
            _ => Code::Unavailable,
        },
        SandboxError::BootTimeout { .. } => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

pub fn state_error(e: &StateError) -> Status {
    Status::internal(format!("persisting huskd state: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_pass_through() {
        let e = SandboxError::Agent {
            id: "p".into(),
            source: AgentError::Rpc {
                method: "SignalProcess",
                source: husk_proto::ttrpc::Error::Status(husk_proto::ttrpc::Status {
                    code: husk_proto::ttrpc::Code::NotFound,
                    message: "no such process".into(),
                }),
            },
        };
        let s = sandbox_error(&e);
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("SignalProcess"), "{}", s.message());
        let e = SandboxError::Agent {
            id: "p".into(),
            source: AgentError::Rpc {
                method: "Health",
                source: husk_proto::ttrpc::Error::Closed,
            },
        };
        assert_eq!(sandbox_error(&e).code(), Code::Unavailable);
    }

    #[test]
    fn image_codes() {
        let e = image::Error::InvalidReference {
            reference: "A:B:C".into(),
            reason: "bad".into(),
        };
        assert_eq!(image_error(&e).code(), Code::InvalidArgument);
        assert_eq!(
            image_error(&image::Error::ImageNotFound("x".into())).code(),
            Code::NotFound
        );
    }
}
