//! Interoperability with the `ttrpc` crate (containerd's Rust ttrpc, built on
//! rust-protobuf) over a unix socket: husk's client against its server, and
//! its client against husk's server.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use husk_proto::agent::*;
use husk_proto::ttrpc::{Client, Code, Error};
use husk_proto::AGENT_VERSION;
use prost::Message;

const T: Option<Duration> = Some(Duration::from_secs(10));
const SVC: &str = "husk.agent.v1.Agent";

/// A unique socket path, removed again on drop.
struct SocketPath(PathBuf);

impl SocketPath {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "husk-proto-{name}-{}-{:?}.sock",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&p);
        SocketPath(p)
    }

    fn uri(&self) -> String {
        format!("unix://{}", self.0.display())
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---- husk client -> ttrpc crate server ----

/// Serves part of the Agent service with the ttrpc crate's low-level API:
/// - Health: reports the request's timeout_nano as `kernel_release`.
/// - ContainerStats: NotFound.
/// - WaitProcess: sleeps exec_id milliseconds, answers exit code exec_id.
struct OracleMethod(&'static str);

#[async_trait::async_trait]
impl ttrpc::r#async::MethodHandler for OracleMethod {
    async fn handler(
        &self,
        ctx: ttrpc::r#async::TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let mut resp = ttrpc::Response::new();
        match self.0 {
            "Health" => {
                HealthRequest::decode(&req.payload[..])
                    .map_err(|e| ttrpc::Error::Others(e.to_string()))?;
                let h = HealthResponse {
                    agent_version: "oracle".into(),
                    kernel_release: ctx.timeout_nano.to_string(),
                    uptime_ms: 1,
                };
                resp.set_payload(h.encode_to_vec());
                resp.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
            }
            "ContainerStats" => {
                let r = ContainerRef::decode(&req.payload[..])
                    .map_err(|e| ttrpc::Error::Others(e.to_string()))?;
                resp.set_status(ttrpc::get_status(
                    ttrpc::Code::NOT_FOUND,
                    format!("no container {}", r.container_id),
                ));
            }
            "WaitProcess" => {
                let r = ProcessRef::decode(&req.payload[..])
                    .map_err(|e| ttrpc::Error::Others(e.to_string()))?;
                let ms: u64 = r.exec_id.parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let w = WaitProcessResponse {
                    exit_code: ms as i32,
                    ..Default::default()
                };
                resp.set_payload(w.encode_to_vec());
                resp.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
            }
            other => unreachable!("method {other} is not registered"),
        }
        Ok(resp)
    }
}

#[tokio::test]
async fn husk_client_calls_ttrpc_crate_server() {
    let sock = SocketPath::new("oracle-server");
    let mut methods: HashMap<String, Box<dyn ttrpc::r#async::MethodHandler + Send + Sync>> =
        HashMap::new();
    for m in ["Health", "ContainerStats", "WaitProcess"] {
        methods.insert(m.to_owned(), Box::new(OracleMethod(m)));
    }
    let service = ttrpc::r#async::Service {
        methods,
        streams: HashMap::new(),
    };
    let mut server = ttrpc::r#async::Server::new()
        .bind(&sock.uri())
        .expect("binding the ttrpc crate's server")
        .register_service(HashMap::from([(SVC.to_owned(), service)]));
    server
        .start()
        .await
        .expect("starting the ttrpc crate's server");

    let stream = tokio::net::UnixStream::connect(&sock.0).await.unwrap();
    let client = AgentClient::new(Client::new(stream));

    // Payload both ways, and our timeout arrives as timeout_nano.
    let h = client
        .health(HealthRequest {}, Some(Duration::from_millis(2500)))
        .await
        .unwrap();
    assert_eq!(h.agent_version, "oracle");
    assert_eq!(h.kernel_release, "2500000000");

    // Error statuses.
    let err = client
        .container_stats(
            ContainerRef {
                container_id: "x1".into(),
            },
            T,
        )
        .await
        .unwrap_err();
    let status = err.status().expect("a status");
    assert_eq!(status.code, Code::NotFound);
    assert_eq!(status.message, "no container x1");
    let err = client
        .signal_process(SignalProcessRequest::default(), T)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unimplemented), "{err:?}");
    let err = client
        .inner()
        .call("no.Such", "Health", vec![], T)
        .await
        .unwrap_err();
    assert!(err.status().is_some(), "{err:?}");

    // Concurrent calls on one connection, answered out of order.
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let calls: Vec<_> = [400i64, 300, 200, 100, 0]
        .into_iter()
        .map(|ms| {
            let client = client.clone();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let r = client.wait_process(wait_req(ms), T).await.unwrap();
                assert_eq!(r.exit_code as i64, ms);
                done_tx.send(ms).unwrap();
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(900),
        "calls were not concurrent: {elapsed:?}"
    );
    drop(done_tx);
    let mut order = Vec::new();
    while let Some(ms) = done_rx.recv().await {
        order.push(ms);
    }
    assert_eq!(order, [0, 100, 200, 300, 400]);

    // Our timeout while their server is still working.
    let err = client
        .wait_process(wait_req(2000), Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    assert!(client.health(HealthRequest {}, T).await.is_ok());

    drop(client);
    server
        .shutdown()
        .await
        .expect("stopping the ttrpc crate's server");
}

// ---- ttrpc crate client -> husk server ----

fn oracle_request(method: &str, payload: Vec<u8>) -> ttrpc::Request {
    let mut req = ttrpc::Request::new();
    req.service = SVC.to_owned();
    req.method = method.to_owned();
    req.payload = payload;
    req.timeout_nano = 10_000_000_000;
    req
}

#[tokio::test]
async fn ttrpc_crate_client_calls_husk_server() {
    let sock = SocketPath::new("husk-server");
    let listener = tokio::net::UnixListener::bind(&sock.0).unwrap();
    let agent = TestAgent::new();
    let server = server(agent.clone());
    let accepting = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        server.serve(stream).await
    });

    let client = ttrpc::r#async::Client::connect(&sock.uri()).await.unwrap();

    let resp = client
        .request(oracle_request("Health", HealthRequest {}.encode_to_vec()))
        .await
        .unwrap();
    let h = HealthResponse::decode(&resp.payload[..]).unwrap();
    assert_eq!(h.agent_version, AGENT_VERSION);

    let ref_nope = ContainerRef {
        container_id: "nope".into(),
    };
    match client
        .request(oracle_request("ContainerStats", ref_nope.encode_to_vec()))
        .await
    {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
            assert_eq!(s.message(), "container nope not found");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    match client.request(oracle_request("Bogus", vec![])).await {
        Err(ttrpc::Error::RpcStatus(s)) => assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED),
        other => panic!("expected Unimplemented, got {other:?}"),
    }

    // Concurrent calls from their client, answered by us in reverse order.
    const N: i64 = 10;
    let mut calls = Vec::new();
    for n in 0..N {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .request(oracle_request("WaitProcess", wait_req(n).encode_to_vec()))
                .await
        }));
    }
    for n in (0..N).rev() {
        agent.release(n);
        let resp = calls.pop().unwrap().await.unwrap().unwrap();
        let w = WaitProcessResponse::decode(&resp.payload[..]).unwrap();
        assert_eq!(w.exit_code as i64, n);
        for other in &calls {
            assert!(!other.is_finished());
        }
    }

    // Their client going away ends our serve() cleanly.
    drop(client);
    let served = tokio::time::timeout(Duration::from_secs(10), accepting)
        .await
        .expect("serve() did not return after the ttrpc crate's client closed")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
}
