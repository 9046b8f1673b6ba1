//! husk's ttrpc client against husk's ttrpc server, and each of them against
//! a hand-driven (possibly hostile) peer.

mod common;

use std::time::Duration;

use common::*;
use husk_proto::agent::*;
use husk_proto::ttrpc::{self, wire, Client, Code, Error};
use husk_proto::AGENT_VERSION;
use prost::Message;
use tokio::io::AsyncWriteExt;

const T: Option<Duration> = Some(Duration::from_secs(10));
const SVC: &str = "husk.agent.v1.Agent";

/// A client and a served TestAgent over an in-memory pipe.
fn connected() -> (
    AgentClient,
    std::sync::Arc<TestAgent>,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let agent = TestAgent::new();
    let server = server(agent.clone());
    let serving = tokio::spawn(async move { server.serve(b).await });
    (AgentClient::new(Client::new(a)), agent, serving)
}

#[tokio::test]
async fn health_and_error_status_round_trip() {
    let (client, _agent, _serving) = connected();
    let h = client.health(HealthRequest {}, T).await.unwrap();
    assert_eq!(h.agent_version, AGENT_VERSION);
    assert_eq!(h.uptime_ms, 42);

    let stats = client
        .container_stats(
            ContainerRef {
                container_id: "c1".into(),
            },
            T,
        )
        .await
        .unwrap();
    assert_eq!(stats.pids, 3);

    let err = client
        .container_stats(
            ContainerRef {
                container_id: "nope".into(),
            },
            T,
        )
        .await
        .unwrap_err();
    let status = err.status().expect("a status error");
    assert_eq!(status.code, Code::NotFound);
    assert_eq!(status.message, "container nope not found");
    assert_eq!(err.code(), Some(Code::NotFound));
}

#[tokio::test]
async fn concurrent_calls_are_answered_out_of_order() {
    let (client, agent, _serving) = connected();
    const N: i64 = 20;
    let mut calls = Vec::new();
    for n in 0..N {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client.wait_process(wait_req(n), T).await
        }));
    }
    // Release the calls last-issued first; each must get its own answer
    // while the earlier ones are still waiting.
    for n in (0..N).rev() {
        // The handler may not have subscribed yet; releasing is idempotent.
        agent.release(n);
        let resp = calls.pop().unwrap().await.unwrap().unwrap();
        assert_eq!(resp.exit_code as i64, n);
        for other in &calls {
            assert!(!other.is_finished(), "call answered before its release");
        }
    }
    // Interleaved with plain calls on the same connection.
    assert!(client.health(HealthRequest {}, T).await.is_ok());
}

#[tokio::test]
async fn many_concurrent_calls_on_one_connection() {
    let (client, _agent, _serving) = connected();
    let calls: Vec<_> = (0..500)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.health(HealthRequest {}, T).await })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().agent_version, AGENT_VERSION);
    }
}

#[tokio::test]
async fn timeout_fails_the_call_and_the_connection_stays_usable() {
    let (client, agent, _serving) = connected();
    let started = tokio::time::Instant::now();
    let err = client
        .wait_process(wait_req(7), Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(format!("{:?}", client.inner()).contains("pending: 0"));
    // The late answer, for a call nobody waits for any more, is ignored.
    agent.release(7);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!client.inner().is_closed());
    assert!(client.health(HealthRequest {}, T).await.is_ok());
}

#[tokio::test]
async fn dropped_call_future_removes_its_pending_entry() {
    let (client, _agent, _serving) = connected();
    let call = client.wait_process(wait_req(9), None);
    // Poll it once so it registers, then drop it.
    let _ = tokio::time::timeout(Duration::from_millis(20), call).await;
    assert!(format!("{:?}", client.inner()).contains("pending: 0"));
}

#[tokio::test]
async fn connection_loss_fails_pending_and_later_calls_with_closed() {
    let (client, _agent, serving) = connected();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { client.wait_process(wait_req(1), None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!pending.is_finished());
    // Aborting the server task drops its end of the pipe.
    serving.abort();
    let err = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("pending call not failed after the connection dropped")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
    assert!(client.inner().is_closed());
    let err = client.health(HealthRequest {}, None).await.unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
}

#[tokio::test]
async fn explicit_close_fails_pending_calls() {
    let (client, _agent, serving) = connected();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { client.wait_process(wait_req(1), None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.inner().close();
    let err = pending.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
    // The server sees the connection end cleanly.
    let served = tokio::time::timeout(Duration::from_secs(5), serving).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
}

#[tokio::test]
async fn dropping_the_last_client_ends_the_connection() {
    let (client, _agent, serving) = connected();
    let clone = client.clone();
    client.health(HealthRequest {}, T).await.unwrap();
    drop(client);
    clone.health(HealthRequest {}, T).await.unwrap();
    drop(clone);
    let served = tokio::time::timeout(Duration::from_secs(5), serving).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
}

#[tokio::test]
async fn unknown_service_and_method_are_unimplemented() {
    let (client, _agent, _serving) = connected();
    let raw = client.inner();
    let err = raw
        .call("no.such.Service", "Health", vec![], T)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unimplemented), "{err:?}");
    let err = raw.call(SVC, "NoSuchMethod", vec![], T).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unimplemented), "{err:?}");
    assert!(client.health(HealthRequest {}, T).await.is_ok());
}

#[tokio::test]
async fn undecodable_request_is_invalid_argument() {
    let (client, _agent, _serving) = connected();
    // Field 1 with wire type 7, which does not exist.
    let err = client
        .inner()
        .call(SVC, "ContainerStats", vec![0x0f, 0x00], T)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err:?}");
}

#[tokio::test]
async fn handler_panic_is_internal_and_the_server_survives() {
    let (client, _agent, _serving) = connected();
    let err = client
        .create_sandbox(
            CreateSandboxRequest {
                hostname: "panic".into(),
                ..Default::default()
            },
            T,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Internal), "{err:?}");
    assert!(client.health(HealthRequest {}, T).await.is_ok());
}

#[tokio::test]
async fn oversized_request_is_refused_before_sending() {
    let (client, _agent, _serving) = connected();
    let payload = vec![0u8; ttrpc::MESSAGE_LENGTH_MAX];
    let err = client
        .inner()
        .call(SVC, "Health", payload, T)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err:?}");
    assert!(client.health(HealthRequest {}, T).await.is_ok());
}

#[tokio::test]
async fn large_payload_below_the_limit_round_trips() {
    // A big (but legal) request; Health ignores the unknown field, which
    // proves the whole frame went through intact enough to decode.
    let (client, _agent, _serving) = connected();
    let mut payload = Vec::new();
    // Field 15, length-delimited, 3 MiB.
    prost::encoding::bytes::encode(15, &vec![0xabu8; 3 << 20], &mut payload);
    let resp = client
        .inner()
        .call(SVC, "Health", payload, T)
        .await
        .unwrap();
    let h = HealthResponse::decode(&resp[..]).unwrap();
    assert_eq!(h.agent_version, AGENT_VERSION);
}

// ---- the client against a hand-driven server ----

/// A client on one end of a pipe; the test plays the server on the other.
fn client_and_raw_server() -> (Client, tokio::io::DuplexStream) {
    let (a, b) = tokio::io::duplex(1 << 20);
    (Client::new(a), b)
}

fn ok_response(payload: &[u8]) -> Vec<u8> {
    wire::Response {
        status: Some(wire::Status::default()),
        payload: payload.to_vec().into(),
    }
    .encode_to_vec()
}

#[tokio::test]
async fn client_sends_containerd_compatible_requests() {
    let (client, mut server) = client_and_raw_server();
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call(
                    SVC,
                    "Health",
                    b"abc".to_vec(),
                    Some(Duration::from_millis(1500)),
                )
                .await
        }
    });
    let (h, payload) = read_raw_frame(&mut server).await;
    assert_eq!(h.msg_type, ttrpc::MESSAGE_TYPE_REQUEST);
    assert_eq!(h.flags, 0);
    assert_eq!(h.stream_id, 1);
    assert_eq!(h.length as usize, payload.len());
    let req = wire::Request::decode(&payload[..]).unwrap();
    assert_eq!(req.service, SVC);
    assert_eq!(req.method, "Health");
    assert_eq!(&req.payload[..], b"abc");
    assert_eq!(req.timeout_nano, 1_500_000_000);

    write_raw(
        &mut server,
        &frame(1, ttrpc::MESSAGE_TYPE_RESPONSE, &ok_response(b"xyz")),
    )
    .await;
    assert_eq!(call.await.unwrap().unwrap(), b"xyz");

    // The next call uses the next odd stream id; no timeout means 0.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call(SVC, "Health", vec![], None).await }
    });
    let (h, payload) = read_raw_frame(&mut server).await;
    assert_eq!(h.stream_id, 3);
    assert_eq!(wire::Request::decode(&payload[..]).unwrap().timeout_nano, 0);
    // A response without any status field is a success too (old servers).
    let resp = wire::Response {
        status: None,
        payload: b"ok".to_vec().into(),
    }
    .encode_to_vec();
    write_raw(&mut server, &frame(3, ttrpc::MESSAGE_TYPE_RESPONSE, &resp)).await;
    assert_eq!(call.await.unwrap().unwrap(), b"ok");
}

#[tokio::test]
async fn client_survives_a_confused_server() {
    let (client, mut server) = client_and_raw_server();
    let spawn_call = |client: &Client| {
        let client = client.clone();
        tokio::spawn(async move { client.call(SVC, "X", vec![], T).await })
    };

    let call = spawn_call(&client);
    let (h, _) = read_raw_frame(&mut server).await;
    // Noise: a response for a stream nobody opened, stream data, a request,
    // an unknown message type. All ignored.
    write_raw(
        &mut server,
        &frame(
            h.stream_id + 100,
            ttrpc::MESSAGE_TYPE_RESPONSE,
            &ok_response(b"?"),
        ),
    )
    .await;
    write_raw(
        &mut server,
        &frame(h.stream_id, ttrpc::MESSAGE_TYPE_DATA, b"data"),
    )
    .await;
    write_raw(&mut server, &frame(2, ttrpc::MESSAGE_TYPE_REQUEST, b"req")).await;
    write_raw(&mut server, &frame(h.stream_id, 0x7f, b"???")).await;
    // A status with a code from the future maps to Unknown.
    let resp = wire::Response {
        status: Some(wire::Status {
            code: 99,
            message: "new".into(),
            details: vec![],
        }),
        payload: Default::default(),
    }
    .encode_to_vec();
    write_raw(
        &mut server,
        &frame(h.stream_id, ttrpc::MESSAGE_TYPE_RESPONSE, &resp),
    )
    .await;
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(Code::Unknown), "{err:?}");

    // An undecodable response fails that call only.
    let call = spawn_call(&client);
    let (h, _) = read_raw_frame(&mut server).await;
    write_raw(
        &mut server,
        &frame(h.stream_id, ttrpc::MESSAGE_TYPE_RESPONSE, &[0x0f, 0x00]),
    )
    .await;
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Decode(_)), "{err:?}");

    // An oversized response is skipped without being held; that call fails
    // with ResourceExhausted and the connection goes on.
    let call = spawn_call(&client);
    let (h, _) = read_raw_frame(&mut server).await;
    let big = ttrpc::MESSAGE_LENGTH_MAX + 10;
    let hdr = ttrpc::FrameHeader {
        length: big as u32,
        stream_id: h.stream_id,
        msg_type: ttrpc::MESSAGE_TYPE_RESPONSE,
        flags: 0,
    };
    server.write_all(&hdr.encode()).await.unwrap();
    server.write_all(&vec![0u8; big]).await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err:?}");

    let call = spawn_call(&client);
    let (h, _) = read_raw_frame(&mut server).await;
    write_raw(
        &mut server,
        &frame(
            h.stream_id,
            ttrpc::MESSAGE_TYPE_RESPONSE,
            &ok_response(b"fine"),
        ),
    )
    .await;
    assert_eq!(call.await.unwrap().unwrap(), b"fine");
    assert!(!client.is_closed());
}

#[tokio::test]
async fn truncated_frame_closes_the_client_connection() {
    let (client, mut server) = client_and_raw_server();
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call(SVC, "X", vec![], None).await }
    });
    let (h, _) = read_raw_frame(&mut server).await;
    let full = frame(
        h.stream_id,
        ttrpc::MESSAGE_TYPE_RESPONSE,
        &ok_response(b"never"),
    );
    write_raw(&mut server, &full[..full.len() - 3]).await;
    drop(server);
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
    assert!(client.is_closed());
}

#[tokio::test]
async fn huge_claimed_frame_length_does_not_hang_or_allocate() {
    let (client, mut server) = client_and_raw_server();
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call(SVC, "X", vec![], None).await }
    });
    let (h, _) = read_raw_frame(&mut server).await;
    let hdr = ttrpc::FrameHeader {
        length: u32::MAX,
        stream_id: h.stream_id,
        msg_type: ttrpc::MESSAGE_TYPE_RESPONSE,
        flags: 0,
    };
    write_raw(&mut server, &hdr.encode()).await;
    write_raw(&mut server, &[1u8; 1000]).await;
    drop(server);
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
}

// ---- the server against a hand-driven client ----

/// A served TestAgent on one end of a pipe; the test plays the client.
fn server_and_raw_client() -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let server = server(TestAgent::new());
    (a, tokio::spawn(async move { server.serve(b).await }))
}

fn request(method: &str, payload: &[u8]) -> Vec<u8> {
    wire::Request {
        service: SVC.into(),
        method: method.into(),
        payload: payload.to_vec().into(),
        timeout_nano: 0,
        metadata: vec![wire::KeyValue {
            key: "k".into(),
            value: "v".into(),
        }],
    }
    .encode_to_vec()
}

async fn read_response(client: &mut tokio::io::DuplexStream) -> (u32, wire::Response) {
    let (h, payload) = read_raw_frame(client).await;
    assert_eq!(h.msg_type, ttrpc::MESSAGE_TYPE_RESPONSE);
    (h.stream_id, wire::Response::decode(&payload[..]).unwrap())
}

#[tokio::test]
async fn server_answers_with_containerd_compatible_responses() {
    let (mut client, _serving) = server_and_raw_client();
    write_raw(
        &mut client,
        &frame(5, ttrpc::MESSAGE_TYPE_REQUEST, &request("Health", &[])),
    )
    .await;
    let (id, resp) = read_response(&mut client).await;
    assert_eq!(id, 5);
    // Success carries an explicit OK status, as containerd's servers do.
    assert_eq!(resp.status.unwrap().code, 0);
    let h = HealthResponse::decode(resp.payload).unwrap();
    assert_eq!(h.agent_version, AGENT_VERSION);
}

#[tokio::test]
async fn server_survives_a_confused_client() {
    let (mut client, serving) = server_and_raw_client();
    // Stream data and unknown message types are ignored.
    write_raw(&mut client, &frame(1, ttrpc::MESSAGE_TYPE_DATA, b"data")).await;
    write_raw(&mut client, &frame(1, 0x42, b"?")).await;
    write_raw(&mut client, &frame(1, ttrpc::MESSAGE_TYPE_RESPONSE, b"")).await;
    // A broken envelope answers InvalidArgument on its stream.
    write_raw(
        &mut client,
        &frame(3, ttrpc::MESSAGE_TYPE_REQUEST, &[0x0f, 0x00]),
    )
    .await;
    let (id, resp) = read_response(&mut client).await;
    assert_eq!(id, 3);
    assert_eq!(resp.status.unwrap().code, Code::InvalidArgument as i32);
    // An oversized request is skipped and answered ResourceExhausted.
    let big = ttrpc::MESSAGE_LENGTH_MAX + 1;
    let hdr = ttrpc::FrameHeader {
        length: big as u32,
        stream_id: 7,
        msg_type: ttrpc::MESSAGE_TYPE_REQUEST,
        flags: 0,
    };
    client.write_all(&hdr.encode()).await.unwrap();
    client.write_all(&vec![0u8; big]).await.unwrap();
    let (id, resp) = read_response(&mut client).await;
    assert_eq!(id, 7);
    assert_eq!(resp.status.unwrap().code, Code::ResourceExhausted as i32);
    // And the connection still works.
    write_raw(
        &mut client,
        &frame(9, ttrpc::MESSAGE_TYPE_REQUEST, &request("Health", &[])),
    )
    .await;
    let (id, resp) = read_response(&mut client).await;
    assert_eq!(id, 9);
    assert_eq!(resp.status.unwrap().code, 0);
    assert!(!serving.is_finished());
}

#[tokio::test]
async fn server_rejects_even_stream_ids() {
    let (mut client, serving) = server_and_raw_client();
    write_raw(
        &mut client,
        &frame(2, ttrpc::MESSAGE_TYPE_REQUEST, &request("Health", &[])),
    )
    .await;
    let served = tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(served, Err(Error::Protocol(_))), "{served:?}");
}

#[tokio::test]
async fn server_reports_a_truncated_frame() {
    let (mut client, serving) = server_and_raw_client();
    let f = frame(1, ttrpc::MESSAGE_TYPE_REQUEST, &request("Health", &[]));
    write_raw(&mut client, &f[..f.len() - 1]).await;
    drop(client);
    let served = tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(served, Err(Error::Protocol(_))), "{served:?}");
}
