//! Mapping of library errors to gRPC statuses for the CRI services.

use tonic::codegen::http;
use tonic::{Code, Status};

use crate::state::StateError;
use husk_runtime::agent::AgentError;
use husk_runtime::image;
use husk_runtime::sandbox::SandboxError;

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

/// Makes a call whose gRPC deadline (`grpc-timeout`) passes end with
/// `DeadlineExceeded`, as Go gRPC servers (containerd, CRI-O) answer and
/// critest checks. tonic's server enforces the header itself but answers
/// `Cancelled`, and its timer sits outside every user layer; this layer's
/// timer is armed in `call`, which tonic runs before arming its own, and is
/// polled first, so it fires first for the same deadline.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<RB>, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let fut = self.inner.call(req);
        match deadline {
            None => Box::pin(fut),
            Some(d) => {
                let timed = tokio::time::timeout(d, fut);
                Box::pin(async move {
                    match timed.await {
                        Ok(r) => r,
                        Err(_) => Ok(Status::deadline_exceeded(format!(
                            "the call's deadline ({d:?}) passed before huskd finished it"
                        ))
                        .into_http()),
                    }
                })
            }
        }
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H M S m u n).
/// `None` for anything else, which leaves the call without a deadline, as
/// tonic does.
fn parse_grpc_timeout(v: &[u8]) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        use std::time::Duration;
        assert_eq!(
            parse_grpc_timeout(b"999u"),
            Some(Duration::from_micros(999))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        for bad in [&b""[..], b"S", b"123456789m", b"1x", b"-1S", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    /// A handler slower than the deadline ends as DeadlineExceeded inside
    /// tonic's own timeout (the order a real server has).
    #[tokio::test]
    async fn deadline_is_deadline_exceeded() {
        use tower::{Layer, Service, ServiceExt};
        let slow = tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("late")))
        });
        let mut svc = DeadlineLayer.layer(slow);
        let req = http::Request::builder()
            .header("grpc-timeout", "20m")
            .body(())
            .unwrap();
        let started = std::time::Instant::now();
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let status = Status::from_header_map(resp.headers()).expect("a grpc-status");
        assert_eq!(status.code(), Code::DeadlineExceeded);
    }

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
