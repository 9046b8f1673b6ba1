//! Kubernetes' port-forward protocol over SPDY (`portforward.k8s.io`): for
//! every connection the client forwards it opens two streams carrying the
//! same `requestID` and `port` headers, `streamType: error` and
//! `streamType: data`. Once both are open the server connects to the
//! port inside the pod and copies the data stream both ways; a failure
//! (nothing listens there) is written on that request's error stream and
//! ends only that request, never the session.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::channel::OutChannel;

use crate::spdy::{Connection, IncomingStream, StreamReader, StreamWriter};
use crate::{PortForwardRequest, Runtime};

pub const PROTOCOL: &str = "portforward.k8s.io";

/// Requests half-open (one stream of the pair) at once: a client that
/// opens only error streams cannot grow the table without end.
const MAX_PENDING: usize = 128;

#[derive(Default)]
struct Pair {
    error: Option<StreamWriter>,
    data: Option<(StreamReader, StreamWriter)>,
}

/// Serves one port-forward session until the client closes it.
pub async fn serve(mut conn: Connection, req: PortForwardRequest, runtime: Arc<dyn Runtime>) {
    let mut pending: HashMap<String, (u16, Pair)> = HashMap::new();
    while let Some(s) = conn.accept().await {
        let Some((id, port, kind)) = parse(&s, &req) else {
            s.writer.reset().await;
            continue;
        };
        if !pending.contains_key(&id) && pending.len() >= MAX_PENDING {
            s.writer.reset().await;
            continue;
        }
        let entry = pending.entry(id.clone()).or_insert((port, Pair::default()));
        if entry.0 != port {
            s.writer.reset().await;
            continue;
        }
        let IncomingStream { reader, writer, .. } = s;
        match kind {
            Kind::Error if entry.1.error.is_none() => entry.1.error = Some(writer),
            Kind::Data if entry.1.data.is_none() => entry.1.data = Some((reader, writer)),
            _ => {
                writer.reset().await;
                continue;
            }
        }
        if entry.1.error.is_some() && entry.1.data.is_some() {
            if let Some((
                port,
                Pair {
                    error: Some(e),
                    data: Some(d),
                },
            )) = pending.remove(&id)
            {
                tokio::spawn(forward(
                    runtime.clone(),
                    req.pod_sandbox_id.clone(),
                    port,
                    e,
                    d,
                ));
            }
        }
    }
    tracing::debug!("port-forward session ended");
}

enum Kind {
    Error,
    Data,
}

fn parse(s: &IncomingStream, req: &PortForwardRequest) -> Option<(String, u16, Kind)> {
    let kind = match s.header("streamtype")? {
        "error" => Kind::Error,
        "data" => Kind::Data,
        _ => return None,
    };
    let port: u16 = s.header("port")?.parse().ok().filter(|p| *p != 0)?;
    if !req.ports.is_empty() && !req.ports.contains(&port) {
        return None;
    }
    let id = s.header("requestid")?;
    if id.is_empty() || id.len() > 64 {
        return None;
    }
    Some((id.to_string(), port, kind))
}

async fn forward(
    runtime: Arc<dyn Runtime>,
    pod: String,
    port: u16,
    error: StreamWriter,
    (from_client, to_client): (StreamReader, StreamWriter),
) {
    relay(runtime, pod, port, from_client, &to_client, &error, true).await;
    let _ = to_client.close().await;
    let _ = error.close().await;
}

/// Connects to `port` in the pod and copies both ways until the pod's side
/// ends (and, where the client can half-close, until the client's side
/// does too). A connection failure is written on `error`.
pub async fn relay(
    runtime: Arc<dyn Runtime>,
    pod: String,
    port: u16,
    mut from_client: impl AsyncRead + Unpin,
    to_client: &dyn OutChannel,
    error: &dyn OutChannel,
    client_half_closes: bool,
) {
    let target = match runtime.port_forward(pod.clone(), port).await {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("an error occurred forwarding {port} -> {port}: {e}");
            tracing::info!(%pod, port, "{msg}");
            let _ = error.write(msg.as_bytes()).await;
            return;
        }
    };
    let (mut from_pod, mut to_pod) = tokio::io::split(target);
    let upstream = async {
        let _ = tokio::io::copy(&mut from_client, &mut to_pod).await;
        let _ = to_pod.shutdown().await;
    };
    let downstream = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_pod.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_client.write(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    if client_half_closes {
        tokio::join!(upstream, downstream);
    } else {
        // The client's side ends only with its connection: the pod's
        // closing ends the forward.
        tokio::select! {
            () = upstream => {}
            () = downstream => {}
        }
    }
}
