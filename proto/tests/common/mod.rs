//! A small `Agent` implementation shared by the integration tests.

#![allow(dead_code)]

use std::sync::Arc;

use husk_proto::agent::*;
use husk_proto::ttrpc::{self, Status};
use husk_proto::AGENT_VERSION;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// - `Health` answers with [`AGENT_VERSION`].
/// - `WaitProcess` with exec id N (a number) blocks until the test releases
///   N with [`TestAgent::release`], then answers exit code N.
/// - `ContainerStats` answers `NotFound` except for container "c1".
/// - `CreateSandbox` panics when the hostname is "panic".
/// - everything else is `Unimplemented`.
pub struct TestAgent {
    released: watch::Sender<i64>,
}

impl TestAgent {
    pub fn new() -> Arc<Self> {
        Arc::new(TestAgent {
            released: watch::Sender::new(-1),
        })
    }

    pub fn release(&self, n: i64) {
        self.released.send_replace(n);
    }
}

#[async_trait::async_trait]
impl Agent for TestAgent {
    async fn health(&self, _req: HealthRequest) -> Result<HealthResponse, Status> {
        Ok(HealthResponse {
            agent_version: AGENT_VERSION.to_owned(),
            kernel_release: "test".to_owned(),
            uptime_ms: 42,
        })
    }

    async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<Empty, Status> {
        if req.hostname == "panic" {
            panic!("test handler panics on purpose");
        }
        Ok(Empty {})
    }

    async fn destroy_sandbox(&self, _req: DestroySandboxRequest) -> Result<Empty, Status> {
        Err(Status::unimplemented("destroy_sandbox"))
    }

    async fn create_container(&self, _req: CreateContainerRequest) -> Result<Empty, Status> {
        Err(Status::unimplemented("create_container"))
    }

    async fn start_container(&self, _req: ContainerRef) -> Result<Empty, Status> {
        Err(Status::unimplemented("start_container"))
    }

    async fn remove_container(&self, _req: RemoveContainerRequest) -> Result<Empty, Status> {
        Err(Status::unimplemented("remove_container"))
    }

    async fn update_container(&self, _req: UpdateContainerRequest) -> Result<Empty, Status> {
        Err(Status::unimplemented("update_container"))
    }

    async fn container_stats(&self, req: ContainerRef) -> Result<ContainerStatsResponse, Status> {
        if req.container_id != "c1" {
            return Err(Status::not_found(format!(
                "container {} not found",
                req.container_id
            )));
        }
        Ok(ContainerStatsResponse {
            pids: 3,
            ..Default::default()
        })
    }

    async fn exec_process(&self, _req: ExecProcessRequest) -> Result<Empty, Status> {
        Err(Status::unimplemented("exec_process"))
    }

    async fn signal_process(&self, _req: SignalProcessRequest) -> Result<Empty, Status> {
        Err(Status::unimplemented("signal_process"))
    }

    async fn wait_process(&self, req: ProcessRef) -> Result<WaitProcessResponse, Status> {
        let n: i64 = req
            .exec_id
            .parse()
            .map_err(|_| Status::invalid_argument("exec id must be a number"))?;
        let mut rx = self.released.subscribe();
        rx.wait_for(|v| *v == n)
            .await
            .map_err(|_| Status::unavailable("agent gone"))?;
        Ok(WaitProcessResponse {
            exit_code: n as i32,
            ..Default::default()
        })
    }

    async fn resize_terminal(&self, _req: ResizeTerminalRequest) -> Result<Empty, Status> {
        Err(Status::unimplemented("resize_terminal"))
    }
}

pub fn server(agent: Arc<TestAgent>) -> ttrpc::Server {
    ttrpc::Server::new().register(agent_service(agent))
}

pub fn wait_req(n: i64) -> ProcessRef {
    ProcessRef {
        container_id: "c1".to_owned(),
        exec_id: n.to_string(),
    }
}

/// Encodes one raw ttrpc frame.
pub fn frame(stream_id: u32, msg_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ttrpc::FrameHeader {
        length: payload.len() as u32,
        stream_id,
        msg_type,
        flags: 0,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(payload);
    v
}

/// Reads one raw ttrpc frame (test side, trusted input).
pub async fn read_raw_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> (ttrpc::FrameHeader, Vec<u8>) {
    let mut hdr = [0u8; ttrpc::MESSAGE_HEADER_LENGTH];
    r.read_exact(&mut hdr)
        .await
        .expect("reading a frame header");
    let h = ttrpc::FrameHeader::decode(&hdr);
    let mut payload = vec![0u8; h.length as usize];
    r.read_exact(&mut payload).await.expect("reading a payload");
    (h, payload)
}

pub async fn write_raw<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) {
    w.write_all(bytes).await.expect("writing raw bytes");
    w.flush().await.expect("flushing");
}
