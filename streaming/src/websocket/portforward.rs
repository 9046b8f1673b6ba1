//! kubelet's WebSocket port-forward: the ports come in the query, port `i`
//! gets data channel `2i` and error channel `2i+1`, and each channel's
//! first message is its port, two bytes little-endian. One connection per
//! port per session (the SPDY protocol, also tunnelled through WebSocket,
//! is the one that multiplexes many).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio_tungstenite::WebSocketStream;

use super::channels::{ChannelConn, ChannelWriter};
use super::Channels;
use crate::portforward::relay;
use crate::Runtime;

/// Serves one port-forward session on an upgraded WebSocket connection:
/// ends when every port's connection has ended or the client goes away.
pub async fn serve<S>(
    ws: WebSocketStream<S>,
    protocol: Channels,
    pod: String,
    ports: Vec<u16>,
    runtime: Arc<dyn Runtime>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let data_channels: Vec<u8> = (0..ports.len()).map(|i| (2 * i) as u8).collect();
    let (mut conn, mut readers) = ChannelConn::start(ws, protocol.framing, &data_channels);
    let mut forwards = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let data = conn.channel((2 * i) as u8);
        let error = conn.channel((2 * i + 1) as u8);
        let prefix = port.to_le_bytes();
        let _ = data.write_message(&prefix).await;
        let _ = error.write_message(&prefix).await;
        let Some(from_client) = readers.remove(&((2 * i) as u8)) else {
            continue;
        };
        forwards.push(tokio::spawn(forward(
            runtime.clone(),
            pod.clone(),
            *port,
            from_client,
            data,
            error,
        )));
    }
    let all = futures_util::future::join_all(forwards.iter_mut());
    tokio::select! {
        _ = all => {}
        () = conn.gone() => tracing::debug!("port-forward client went away"),
    }
    for f in &forwards {
        f.abort();
    }
    conn.close().await;
}

async fn forward(
    runtime: Arc<dyn Runtime>,
    pod: String,
    port: u16,
    from_client: DuplexStream,
    to_client: ChannelWriter,
    error: ChannelWriter,
) {
    relay(runtime, pod, port, from_client, &to_client, &error, false).await;
}
