//! Exec and attach over WebSocket: the channels kubelet defines (stdin 0,
//! stdout 1, stderr 2, error 3, resize 4), the session logic shared with
//! SPDY.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;

use super::channels::ChannelConn;
use super::Channels;
use crate::channel::OutChannel;
use crate::remotecommand::{run_session, ClientIo, Session};
use crate::Runtime;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// Serves one exec or attach session on an upgraded WebSocket connection.
pub async fn serve<S>(
    ws: WebSocketStream<S>,
    protocol: Channels,
    session: Session,
    runtime: Arc<dyn Runtime>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tty, stdin, stdout, stderr) = session.stdio();
    let (mut conn, mut readers) = ChannelConn::start(ws, protocol.framing, &[STDIN, RESIZE]);
    // The client learns the session is up from an empty message on the
    // lowest channel it reads (kubelet does the same).
    let first = if stdout {
        STDOUT
    } else if stderr {
        STDERR
    } else {
        ERROR
    };
    let _ = conn.channel(first).write_message(&[]).await;
    let boxed = |r: Option<tokio::io::DuplexStream>| {
        r.map(|r| Box::new(r) as Box<dyn AsyncRead + Send + Unpin>)
    };
    let out =
        |wanted: bool, ch: u8| wanted.then(|| Box::new(conn.channel(ch)) as Box<dyn OutChannel>);
    let io = ClientIo {
        stdin: boxed(readers.remove(&STDIN).filter(|_| stdin)),
        resize: boxed(readers.remove(&RESIZE).filter(|_| tty)),
        stdout: out(stdout, STDOUT),
        stderr: out(stderr && !tty, STDERR),
    };
    let error = Box::new(conn.channel(ERROR));
    run_session(
        io,
        error,
        &session,
        runtime,
        protocol.structured_status,
        conn.gone(),
    )
    .await;
    conn.close().await;
}
