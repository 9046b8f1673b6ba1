//! Listeners (vsock in the VM, unix sockets in host tests) and the ready
//! notice.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, Result};
use husk_proto::agent::{agent_service, ReadyNotice};
use husk_proto::ports::{READY_PORT, STREAM_PORT, TTRPC_PORT};
use husk_proto::ttrpc::Server;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::service::{boottime_ms, AgentService};

pub enum Listen {
    Vsock,
    /// DIR/ttrpc.sock, DIR/stream.sock; ready notice to DIR/ready.sock.
    Unix(PathBuf),
}

const READY_ATTEMPTS: u32 = 50;
const READY_RETRY: Duration = Duration::from_millis(100);

fn serve_ttrpc<S>(server: &Server, conn: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let server = server.clone();
    tokio::spawn(async move {
        // Errors are logged by the server; the containers outlive the connection.
        let _ = server.serve(conn).await;
        info!("ttrpc connection closed");
    });
}

fn serve_stream<S>(svc: &Arc<AgentService>, conn: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let svc = Arc::clone(svc);
    tokio::spawn(async move { svc.handle_stream(Box::pin(conn)).await });
}

/// A listener the agent serves on: vsock in the VM, unix sockets in host tests.
trait Listener {
    type Conn;
    fn poll_accept_conn(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<Self::Conn>>;
}

impl Listener for tokio_vsock::VsockListener {
    type Conn = tokio_vsock::VsockStream;
    fn poll_accept_conn(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<Self::Conn>> {
        self.poll_accept(cx).map_ok(|(c, _)| c)
    }
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    fn poll_accept_conn(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<Self::Conn>> {
        self.poll_accept(cx).map_ok(|(c, _)| c)
    }
}

/// Hands every connection `listener` accepts to `serve`, forever. Backs off
/// after accept errors (e.g. EMFILE) instead of spinning.
async fn accept_forever<L: Listener>(
    listener: L,
    what: &str,
    serve: impl Fn(L::Conn),
) -> Infallible {
    loop {
        match std::future::poll_fn(|cx| listener.poll_accept_conn(cx)).await {
            Ok(c) => serve(c),
            Err(e) => {
                warn!("accept on {what}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn serve(svc: Arc<AgentService>, listen: Listen) -> Result<()> {
    let server = Server::new().register(agent_service(Arc::clone(&svc)));
    match listen {
        Listen::Vsock => {
            use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY, VMADDR_CID_HOST};
            let ttrpc = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, TTRPC_PORT))
                .with_context(|| format!("binding vsock port {TTRPC_PORT}"))?;
            let stream = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, STREAM_PORT))
                .with_context(|| format!("binding vsock port {STREAM_PORT}"))?;
            let svc2 = Arc::clone(&svc);
            tokio::spawn(accept_forever(stream, "stream", move |c| {
                serve_stream(&svc2, c)
            }));
            info!("serving on vsock ports {TTRPC_PORT} (ttrpc) and {STREAM_PORT} (streams)");
            tokio::spawn(async move {
                for attempt in 1..=READY_ATTEMPTS {
                    match tokio_vsock::VsockStream::connect(VsockAddr::new(
                        VMADDR_CID_HOST,
                        READY_PORT,
                    ))
                    .await
                    {
                        Ok(mut c) => return send_ready(&mut c).await,
                        Err(e) if attempt == READY_ATTEMPTS => {
                            warn!("ready notice: {e}; giving up")
                        }
                        Err(_) => tokio::time::sleep(READY_RETRY).await,
                    }
                }
            });
            match accept_forever(ttrpc, "ttrpc", |c| serve_ttrpc(&server, c)).await {}
        }
        Listen::Unix(dir) => {
            use tokio::net::{UnixListener, UnixStream};
            let bind = |name: &str| -> Result<UnixListener> {
                let path = dir.join(name);
                let _ = std::fs::remove_file(&path);
                UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))
            };
            let ttrpc = bind("ttrpc.sock")?;
            let stream = bind("stream.sock")?;
            let svc2 = Arc::clone(&svc);
            tokio::spawn(accept_forever(stream, "stream", move |c| {
                serve_stream(&svc2, c)
            }));
            info!("serving on {}/{{ttrpc,stream}}.sock", dir.display());
            let ready = dir.join("ready.sock");
            if ready.exists() {
                match UnixStream::connect(&ready).await {
                    Ok(mut c) => send_ready(&mut c).await,
                    Err(e) => warn!("ready notice to {}: {e}", ready.display()),
                }
            }
            match accept_forever(ttrpc, "ttrpc", |c| serve_ttrpc(&server, c)).await {}
        }
    }
}

async fn send_ready<W: AsyncWrite + Unpin>(w: &mut W) {
    let notice = ReadyNotice {
        agent_version: husk_proto::AGENT_VERSION.to_owned(),
        boot_to_ready_ms: boottime_ms(),
    };
    match husk_proto::stream::write_msg(w, &notice).await {
        Ok(()) => info!(
            boot_to_ready_ms = notice.boot_to_ready_ms,
            "ready notice sent"
        ),
        Err(e) => warn!("writing the ready notice: {e}"),
    }
}
