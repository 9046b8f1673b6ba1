//! The streaming server with a Runtime that runs commands and connects on
//! the host (the pod-VM path is tested end to end in husk-tests).
//!
//! Interoperability with the Go SPDY implementation kubelet's clients use
//! (moby/spdystream, from Debian's golang-github-docker-spdystream-dev):
//! `tests/go/spdy-exec`, a small v4 exec client written for husk, is built
//! with Debian's Go and run against this server, whose Runtime here runs
//! commands on the host. The pod-VM path is tested end to end in
//! husk-tests; this one checks the wire: handshake, zlib header blocks
//! both ways, stream replies, data, FIN, resize messages, the v4 status.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use husk_streaming::{
    BoxFuture, ExecRequest, Process, ProcessIo, Runtime, Server, ServerConfig, Started, TermSize,
};
use tokio::io::AsyncWriteExt;

/// Builds the Go client once per test binary; fails loudly without Go or
/// the spdystream package (scripts/install-deps installs both).
fn go_client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/go/spdy-exec");
            let out = std::env::temp_dir().join(format!("husk-spdy-exec-{}", std::process::id()));
            let st = std::process::Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(&src)
                .env("GO111MODULE", "off")
                .env("GOPATH", "/usr/share/gocode")
                .env("GOCACHE", std::env::temp_dir().join("husk-go-cache"))
                .status()
                .expect("`go` (Debian golang-go) is needed: run scripts/install-deps");
            assert!(
                st.success(),
                "building tests/go/spdy-exec failed (needs golang-github-docker-spdystream-dev)"
            );
            out
        })
        .clone()
}

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
    let mut child = tokio::process::Command::new(go_client())
        .args(flags)
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    tokio::spawn(async move {
        let _ = w.write_all(&data).await;
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the Go client finished")
        .unwrap()
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
    let resizes = Arc::new(Mutex::new(Vec::new()));
    let server = Server::start(
        ServerConfig::default(),
        Arc::new(HostRuntime {
            resizes: resizes.clone(),
        }),
    )
    .await
    .unwrap();

    // 1 MiB through cat, byte-exact, plus stderr and the exit code.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let url = server
        .get_exec(exec(
            &["sh", "-c", "cat; echo to-stderr >&2; exit 3"],
            true,
            false,
        ))
        .unwrap();
    let out = run_go(&url, &["-i"], &data).await;
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "stdout differs");
    assert_eq!(out.stderr, b"to-stderr\n");
    assert_eq!(out.status.code(), Some(3));

    let url = server.get_exec(exec(&["true"], false, false)).unwrap();
    let out = run_go(&url, &[], b"").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A terminal session sends its size on the resize stream.
    let url = server.get_exec(exec(&["echo", "hi"], true, true)).unwrap();
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
