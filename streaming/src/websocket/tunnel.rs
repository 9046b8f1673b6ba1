//! SPDY tunnelled through WebSocket (`SPDY/3.1+portforward.k8s.io`): the
//! client writes its SPDY byte stream as binary messages and reads the
//! server's the same way, with no SPDY upgrade request inside. Two tasks
//! bridge the messages to a bounded in-memory pipe, and the SPDY
//! port-forward server runs on the pipe's other end unchanged.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::{portforward, spdy, PortForwardRequest, Runtime};

const PIPE_BYTES: usize = 64 * 1024;

/// Serves one tunnelled port-forward session until either side ends it.
pub async fn serve<S>(ws: WebSocketStream<S>, req: PortForwardRequest, runtime: Arc<dyn Runtime>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (spdy_side, bridge_side) = tokio::io::duplex(PIPE_BYTES);
    let (mut from_spdy, mut to_spdy) = tokio::io::split(bridge_side);
    let inbound = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) if to_spdy.write_all(&b).await.is_err() => break,
                Message::Binary(_) => {}
                Message::Close(_) => break,
                // Pings are answered by tungstenite; text has no place here.
                Message::Text(_) => break,
                _ => {}
            }
        }
        // EOF for the SPDY reader: the session ends.
        let _ = to_spdy.shutdown().await;
    });
    let mut outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_spdy.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
    });
    let conn = spdy::Connection::serve(spdy_side, spdy::Limits::default());
    portforward::serve(conn, req, runtime).await;
    // The SPDY connection is dropped: its pipe end closes, the outbound
    // bridge sends the close; a client that stopped reading is cut.
    let bound = std::time::Duration::from_secs(5);
    if tokio::time::timeout(bound, &mut outbound).await.is_err() {
        outbound.abort();
    }
    inbound.abort();
}
