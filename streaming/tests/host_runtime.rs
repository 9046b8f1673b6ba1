//! The streaming server with a Runtime that runs commands and connects on
//! the host (the pod-VM path is tested end to end in husk-tests).
//!
//! Interoperability with the Go libraries kubelet's clients use
//! (moby/spdystream and gorilla/websocket, from Debian):
//! `tests/go/stream-client`, a small exec and port-forward client written
//! for husk, is built with Debian's Go and run against this server, whose
//! Runtime here runs commands and connects on the host. The pod-VM path is
//! tested end to end in husk-tests; this one checks the wire: handshakes,
//! zlib header blocks both ways, stream replies, data, FIN, resize
//! messages, the v4 status, WebSocket channels in binary and base64, the
//! v5 stdin close, SPDY tunnelled in WebSocket, TLS.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;

use husk_streaming::{
    BoxFuture, ExecRequest, Process, ProcessIo, Runtime, Server, ServerConfig, Started, TermSize,
};

/// Runs commands on the host with pipes; remembers resize messages.
struct HostRuntime {
    resizes: Arc<Mutex<Vec<TermSize>>>,
}

struct HostProcess {
    child: tokio::sync::Mutex<tokio::process::Child>,
    resizes: Arc<Mutex<Vec<TermSize>>>,
}

impl Runtime for HostRuntime {
    fn attach(
        &self,
        _req: husk_streaming::AttachRequest,
    ) -> BoxFuture<'_, Result<Started, String>> {
        Box::pin(async { Err("this runtime has no containers to attach to".to_string()) })
    }

    fn port_forward(
        &self,
        _pod: String,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn husk_streaming::Duplex>, String>> {
        Box::pin(async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|s| Box::new(s) as _)
                .map_err(|e| e.to_string())
        })
    }

    fn exec(&self, req: ExecRequest) -> BoxFuture<'_, Result<Started, String>> {
        Box::pin(async move {
            let mut child = tokio::process::Command::new(&req.cmd[0])
                .args(&req.cmd[1..])
                .stdin(if req.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("executable {:?}: {e}", req.cmd[0]))?;
            let io = ProcessIo {
                stdin: child.stdin.take().map(|s| Box::new(s) as _),
                stdout: child.stdout.take().map(|s| Box::new(s) as _),
                stderr: child.stderr.take().map(|s| Box::new(s) as _),
            };
            Ok(Started {
                io,
                process: Arc::new(HostProcess {
                    child: tokio::sync::Mutex::new(child),
                    resizes: self.resizes.clone(),
                }),
            })
        })
    }
}

impl Process for HostProcess {
    fn wait(&self) -> BoxFuture<'_, Result<i32, String>> {
        Box::pin(async move {
            let st = self
                .child
                .lock()
                .await
                .wait()
                .await
                .map_err(|e| e.to_string())?;
            Ok(st.code().unwrap_or(137))
        })
    }

    fn resize(&self, size: TermSize) -> BoxFuture<'_, ()> {
        self.resizes.lock().unwrap().push(size);
        Box::pin(async {})
    }

    fn kill(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.child.lock().await.start_kill();
        })
    }
}

async fn run_go(url: &str, flags: &[&str], stdin: &[u8]) -> std::process::Output {
    husk_testkit::go::run_stream_client(url, flags, stdin).await
}

fn exec(cmd: &[&str], stdin: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_spdystream_client_interoperates() {
    let (server, resizes) = host_server(ServerConfig::default()).await;
    cat_round_trip(&server, &["-i"]).await;

    let url = server.get_exec(exec(&["true"], false, false)).unwrap();
    let out = run_go(&url, &[], b"").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A terminal session sends its size on the resize stream.
    // (The command outlives the resize message: one sent after the exit
    // is moot.)
    let url = server
        .get_exec(exec(&["sh", "-c", "sleep 1; echo hi"], true, true))
        .unwrap();
    let out = run_go(&url, &["-i", "-t"], b"").await;
    assert_eq!(out.stdout, b"hi\n", "{out:?}");
    assert_eq!(out.status.code(), Some(0));
    for _ in 0..50 {
        if !resizes.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        resizes.lock().unwrap().first(),
        Some(&TermSize {
            width: 100,
            height: 40
        })
    );

    // A start failure reaches the client as the v4 status message.
    let url = server
        .get_exec(exec(&["/no/such/binary"], false, false))
        .unwrap();
    let out = run_go(&url, &[], b"").await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/binary"), "{err}");

    // The token was used; a replay is refused by the server.
    let out = run_go(&url, &[], b"").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
}

/// Port-forward: a host TCP server stands in for the pod's; 8 MiB through
/// it and back byte-exact, several connections of one session at once, and
/// a port nobody listens on answered on that request's error stream while
/// the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_relays_and_reports_refusals() {
    use husk_streaming::{client, PortForwardRequest};
    let server = Server::start(
        ServerConfig::default(),
        Arc::new(HostRuntime {
            resizes: Default::default(),
        }),
    )
    .await
    .unwrap();
    let port = echo_server().await;
    let url = |ports: Vec<u16>| {
        server
            .get_port_forward(PortForwardRequest {
                pod_sandbox_id: "p".into(),
                ports,
            })
            .unwrap()
    };
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    let (back, err) = client::port_forward(&url(vec![port]), port, &data)
        .await
        .unwrap();
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    assert_eq!(back.len(), data.len());
    assert!(back == data);

    let mut conns = Vec::new();
    for i in 0..5u8 {
        let u = url(vec![]);
        conns.push(tokio::spawn(async move {
            client::port_forward(&u, port, &[i; 1000]).await.unwrap()
        }));
    }
    for (i, c) in conns.into_iter().enumerate() {
        assert_eq!(c.await.unwrap().0, vec![i as u8; 1000]);
    }

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (back, err) = client::port_forward(&url(vec![]), closed, b"x")
        .await
        .unwrap();
    assert!(back.is_empty());
    let err = String::from_utf8_lossy(&err);
    assert!(
        err.contains(&format!("forwarding {closed}")) && err.contains("refused"),
        "{err}"
    );
    // A port outside the request's list is not served.
    assert!(client::port_forward(&url(vec![port]), closed, b"x")
        .await
        .is_err());
}

/// A TCP server on the host that sends back what it gets; its port.
async fn echo_server() -> u16 {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

async fn host_server(config: ServerConfig) -> (Server, Arc<Mutex<Vec<TermSize>>>) {
    let resizes = Arc::new(Mutex::new(Vec::new()));
    let runtime = Arc::new(HostRuntime {
        resizes: resizes.clone(),
    });
    (Server::start(config, runtime).await.unwrap(), resizes)
}

/// 1 MiB through `cat`, byte-exact, plus stderr and the exit code.
async fn cat_round_trip(server: &Server, flags: &[&str]) {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let url = server
        .get_exec(exec(
            &["sh", "-c", "cat; echo to-stderr >&2; exit 3"],
            true,
            false,
        ))
        .unwrap();
    let out = run_go(&url, flags, &data).await;
    assert_eq!(
        out.stdout.len(),
        data.len(),
        "{flags:?}: {}",
        stderr_of(&out)
    );
    assert!(out.stdout == data, "{flags:?}: stdout differs");
    assert_eq!(out.stderr, b"to-stderr\n");
    assert_eq!(out.status.code(), Some(3));
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exec over WebSocket with gorilla/websocket, in each channel protocol
/// kubelet serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_websocket_client_interoperates() {
    let (server, resizes) = host_server(ServerConfig::default()).await;

    // v5: stdin ends with the close signal, so `cat` ends.
    cat_round_trip(&server, &["-i", "-ws", "v5.channel.k8s.io"]).await;

    // base64 text messages, with the v4 status.
    let url = server
        .get_exec(exec(&["sh", "-c", "echo hi; exit 2"], false, false))
        .unwrap();
    let out = run_go(&url, &["-ws", "v4.base64.channel.k8s.io"], b"").await;
    assert_eq!(out.stdout, b"hi\n", "{}", stderr_of(&out));
    assert_eq!(out.status.code(), Some(2));

    // A terminal: the size arrives on the resize channel.
    let url = server
        .get_exec(exec(&["sh", "-c", "sleep 1; echo tty"], true, true))
        .unwrap();
    let out = run_go(&url, &["-i", "-t", "-ws", "v5.channel.k8s.io"], b"").await;
    assert_eq!(out.stdout, b"tty\n", "{}", stderr_of(&out));
    assert_eq!(out.status.code(), Some(0));
    assert!(resizes.lock().unwrap().contains(&TermSize {
        width: 100,
        height: 40
    }));

    // The unversioned protocol reports a failure as plain text.
    let url = server
        .get_exec(exec(&["sh", "-c", "exit 4"], false, false))
        .unwrap();
    let out = run_go(&url, &["-ws", "channel.k8s.io"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("non-zero exit code"),
        "{}",
        stderr_of(&out)
    );

    // A start failure, at once and named.
    let url = server
        .get_exec(exec(&["/no/such/binary"], false, false))
        .unwrap();
    let out = run_go(&url, &["-ws", "v5.channel.k8s.io"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("/no/such/binary"));

    // A protocol the server does not speak is refused, and the token is
    // spent.
    let url = server.get_exec(exec(&["true"], false, false)).unwrap();
    let out = run_go(&url, &["-ws", "v9.channel.k8s.io"], b"").await;
    assert!(stderr_of(&out).contains("403"), "{}", stderr_of(&out));
    let out = run_go(&url, &["-ws", "v5.channel.k8s.io"], b"").await;
    assert!(stderr_of(&out).contains("404"), "{}", stderr_of(&out));
}

/// Port-forward with Go's SPDY client, directly and tunnelled through
/// WebSocket (`SPDY/3.1+portforward.k8s.io`, what crictl's and client-go's
/// WebSocket port-forward speak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_port_forward_over_spdy_and_websocket() {
    use husk_streaming::PortForwardRequest;
    let (server, _) = host_server(ServerConfig::default()).await;
    let port = echo_server().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 247) as u8).collect();
    for ws in [false, true] {
        let url = || {
            server
                .get_port_forward(PortForwardRequest {
                    pod_sandbox_id: "p".into(),
                    ports: vec![],
                })
                .unwrap()
        };
        let mut flags = vec!["-port".to_string(), port.to_string()];
        if ws {
            flags.push("-ws=tunnel".into());
        }
        let f: Vec<&str> = flags.iter().map(String::as_str).collect();
        let out = run_go(&url(), &f, &data).await;
        assert_eq!(out.status.code(), Some(0), "ws={ws}: {}", stderr_of(&out));
        assert!(out.stdout == data, "ws={ws}: data differs");

        let closed_port = closed.to_string();
        let mut f = vec!["-port", closed_port.as_str()];
        if ws {
            f.push("-ws=tunnel");
        }
        let out = run_go(&url(), &f, b"x").await;
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr_of(&out).contains("refused"), "{}", stderr_of(&out));
    }
}

/// A WebSocket client (tokio-tungstenite) for the cases the Go client does
/// not cover: kubelet's port-forward channel protocol and refusals.
async fn ws_connect(
    url: &str,
    protocol: Option<&str>,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        Option<String>,
    ),
    String,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut req = ws_url.as_str().into_client_request().unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let host = ws_url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, res)) => {
            let p = res
                .headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.to_str().unwrap().to_string());
            Ok((ws, p))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(format!(
            "{} {}",
            res.status(),
            String::from_utf8_lossy(res.body().as_deref().unwrap_or_default())
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// kubelet's WebSocket port-forward: ports in the query, each channel
/// announced with its port, data on `2i`, errors on `2i+1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_port_forward_channels() {
    use futures_util::{SinkExt, StreamExt};
    use husk_streaming::PortForwardRequest;
    use tokio_tungstenite::tungstenite::Message;
    let (server, _) = host_server(ServerConfig::default()).await;
    let port = echo_server().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = server
        .get_port_forward(PortForwardRequest {
            pod_sandbox_id: "p".into(),
            ports: vec![],
        })
        .unwrap();
    let (mut ws, proto) = ws_connect(
        &format!("{url}?port={port}&port={closed}"),
        Some("v4.channel.k8s.io"),
    )
    .await
    .unwrap();
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    let mut msg = vec![0u8];
    msg.extend_from_slice(&payload);
    ws.send(Message::Binary(msg.into())).await.unwrap();
    let (mut announced, mut echoed, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    while echoed.len() < payload.len() || errors.is_empty() {
        let m = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next())
            .await
            .expect("messages")
            .unwrap()
            .unwrap();
        let Message::Binary(b) = m else { continue };
        let (ch, data) = (b[0], &b[1..]);
        if announced.len() < 4 {
            announced.push((ch, data.to_vec()));
            continue;
        }
        match ch {
            0 => echoed.extend_from_slice(data),
            3 => errors.extend_from_slice(data),
            _ => panic!("data on channel {ch}"),
        }
    }
    let le = |p: u16| p.to_le_bytes().to_vec();
    assert_eq!(
        announced,
        vec![
            (0, le(port)),
            (1, le(port)),
            (2, le(closed)),
            (3, le(closed))
        ]
    );
    assert!(echoed == payload);
    let errors = String::from_utf8_lossy(&errors);
    assert!(errors.contains(&format!("forwarding {closed}")), "{errors}");
}

/// What the server refuses before the upgrade, and a message over the
/// size bound ending the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_refusals() {
    use futures_util::{SinkExt, StreamExt};
    use husk_streaming::PortForwardRequest;
    use tokio_tungstenite::tungstenite::Message;
    let (server, _) = host_server(ServerConfig::default()).await;
    let pf = || {
        server
            .get_port_forward(PortForwardRequest {
                pod_sandbox_id: "p".into(),
                ports: vec![80],
            })
            .unwrap()
    };
    let err = ws_connect(&pf(), Some("v4.channel.k8s.io"))
        .await
        .unwrap_err();
    assert!(err.contains("400") && err.contains("port"), "{err}");
    let err = ws_connect(&format!("{}?port=81", pf()), Some("v4.channel.k8s.io"))
        .await
        .unwrap_err();
    assert!(err.contains("400") && err.contains("81"), "{err}");
    let exec_url = || server.get_exec(exec(&["cat"], true, false)).unwrap();
    let err = ws_connect(&exec_url(), Some("v4.portforward.k8s.io"))
        .await
        .unwrap_err();
    assert!(err.contains("403"), "{err}");
    let bogus = format!("{}/exec/0123456789abcdef", server.base_url());
    let err = ws_connect(&bogus, Some("v5.channel.k8s.io"))
        .await
        .unwrap_err();
    assert!(err.contains("404"), "{err}");

    // A client naming no protocol gets the unversioned binary one; a 2 MiB
    // message is over the bound and ends the session (the process is
    // killed, nothing is buffered).
    let (mut ws, proto) = ws_connect(&exec_url(), None).await.unwrap();
    assert_eq!(proto, None);
    let mut big = vec![0u8; 2 << 20];
    big[0] = 0;
    let _ = ws.send(Message::Binary(big.into())).await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the session did not end");
}

/// TLS: the URLs are https, both transports work for a client that
/// trusts the CA, and a plain-HTTP client gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_both_transports() {
    let dir = std::env::temp_dir().join(format!("husk-streaming-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args([
            "-subj",
            "/CN=husk-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl (scripts/install-deps installs it)");
    assert!(st.success());
    let config = ServerConfig {
        tls: Some(husk_streaming::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        ..Default::default()
    };
    let (server, _) = host_server(config).await;
    assert!(server.base_url().starts_with("https://"));
    let ca = cert.to_str().unwrap();
    for ws in [None, Some("v5.channel.k8s.io")] {
        let url = server
            .get_exec(exec(&["sh", "-c", "echo secure; exit 5"], false, false))
            .unwrap();
        let mut flags = vec!["-ca", ca];
        if let Some(p) = ws {
            flags.extend(["-ws", p]);
        }
        let out = run_go(&url, &flags, b"").await;
        assert_eq!(out.stdout, b"secure\n", "{ws:?}: {}", stderr_of(&out));
        assert_eq!(out.status.code(), Some(5));
    }
    // Not trusted: the handshake fails.
    let url = server.get_exec(exec(&["true"], false, false)).unwrap();
    let out = run_go(&url, &[], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("certificate"),
        "{}",
        stderr_of(&out)
    );
    // Plain HTTP to the TLS port.
    let plain = url.replacen("https://", "http://", 1);
    let out = run_go(&plain, &[], b"").await;
    assert_eq!(out.status.code(), Some(1));

    // Bad files are named.
    std::fs::write(&key, "not a key").unwrap();
    let err = Server::start(
        ServerConfig {
            tls: Some(husk_streaming::TlsFiles {
                cert,
                key: key.clone(),
            }),
            ..Default::default()
        },
        Arc::new(HostRuntime {
            resizes: Default::default(),
        }),
    )
    .await
    .err()
    .expect("a bad key is refused");
    assert!(err.to_string().contains(key.to_str().unwrap()), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
