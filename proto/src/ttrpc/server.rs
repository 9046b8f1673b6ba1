use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, trace, warn};

use super::frame::{encode_frame, read_frame, FrameHeader, Payload};
use super::{
    wire, Code, Error, Status, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE,
};

/// Responses queued for the connection's writer.
const WRITE_QUEUE: usize = 64;

/// A ttrpc service: routes a method name and an encoded request to a handler.
/// Generated code implements it for each service of the .proto (see
/// [`crate::agent::agent_service`]).
pub trait Service: Send + Sync + 'static {
    /// Full service name, e.g. `husk.agent.v1.Agent`.
    fn name(&self) -> &str;
    /// Handles one call. Unknown methods answer `Unimplemented`.
    fn call(&self, method: &str, payload: Bytes) -> BoxFuture<'static, Result<Vec<u8>, Status>>;
}

/// A ttrpc server: a set of services, served on any number of connections.
/// Cloning is cheap and shares the services.
#[derive(Clone, Default)]
pub struct Server {
    services: Arc<HashMap<String, Arc<dyn Service>>>,
}

impl Server {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a service, replacing one registered under the same name.
    pub fn register(mut self, svc: Arc<dyn Service>) -> Self {
        Arc::make_mut(&mut self.services).insert(svc.name().to_owned(), svc);
        self
    }

    /// Serves one connection until the client closes it (`Ok`) or it fails
    /// (I/O error, broken framing, a request on an even stream id).
    ///
    /// Each request runs in its own task, so calls proceed concurrently and
    /// answers go out in the order they finish. Handlers that are still
    /// running when the connection ends run to completion (they are not
    /// cancelled halfway through an operation); their answers are dropped.
    /// A request's `timeout_nano` is informational only.
    pub async fn serve<S>(&self, stream: S) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut r, w) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let reader = async {
            while let Some((header, payload)) = read_frame(&mut r).await? {
                self.dispatch(header, payload, &tx)?;
            }
            Ok(())
        };
        let result = tokio::select! {
            r = reader => r,
            w = write_loop(w, rx) => w,
        };
        if let Err(e) = &result {
            warn!("ttrpc server connection failed: {e}");
        }
        result
    }

    fn dispatch(
        &self,
        header: FrameHeader,
        payload: Payload,
        tx: &mpsc::Sender<Vec<u8>>,
    ) -> Result<(), Error> {
        let id = header.stream_id;
        if header.msg_type != MESSAGE_TYPE_REQUEST {
            // Unary only: stream data and unknown message types are skipped.
            debug!(
                stream = id,
                msg_type = header.msg_type,
                "ttrpc server: ignoring a frame that is not a request"
            );
            return Ok(());
        }
        if id % 2 == 0 {
            return Err(Error::Protocol(format!(
                "request on stream {id}: client stream ids must be odd"
            )));
        }
        let call: BoxFuture<'static, Result<Vec<u8>, Status>> = match payload {
            Payload::Oversized => {
                let status = Status::resource_exhausted(format!(
                    "request of {} bytes exceeds the ttrpc limit of {MESSAGE_LENGTH_MAX}",
                    header.length
                ));
                Box::pin(async move { Err(status) })
            }
            Payload::Data(bytes) => match wire::Request::decode(bytes) {
                Err(e) => {
                    let status = Status::invalid_argument(format!("malformed ttrpc request: {e}"));
                    Box::pin(async move { Err(status) })
                }
                Ok(req) => self.route(id, req),
            },
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = AssertUnwindSafe(call)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(Status::internal("the rpc handler panicked")));
            if let Err(status) = &result {
                debug!(stream = id, %status, "ttrpc call failed");
            }
            // The connection may be gone; then nobody waits for the answer.
            let _ = tx.send(encode_response(id, result)).await;
        });
        Ok(())
    }

    fn route(&self, id: u32, req: wire::Request) -> BoxFuture<'static, Result<Vec<u8>, Status>> {
        trace!(
            stream = id,
            service = %req.service,
            method = %req.method,
            timeout_nano = req.timeout_nano,
            "ttrpc request"
        );
        let Some(service) = self.services.get(&req.service) else {
            let status = Status::unimplemented(format!("service {} is not served", req.service));
            return Box::pin(async move { Err(status) });
        };
        // A Service's synchronous part must not take the connection down
        // with it either.
        let method = req.method;
        let payload = req.payload;
        match std::panic::catch_unwind(AssertUnwindSafe(|| service.call(&method, payload))) {
            Ok(fut) => fut,
            Err(_) => {
                Box::pin(
                    async move { Err(Status::internal(format!("the {method} handler panicked"))) },
                )
            }
        }
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn encode_response(id: u32, result: Result<Vec<u8>, Status>) -> Vec<u8> {
    let ok = wire::Status {
        code: Code::Ok.as_i32(),
        ..Default::default()
    };
    let failed = |s: Status| wire::Response {
        status: Some(wire::Status {
            code: s.code.as_i32(),
            message: s.message,
            details: Vec::new(),
        }),
        payload: Bytes::new(),
    };
    let mut resp = match result {
        Ok(payload) => wire::Response {
            status: Some(ok),
            payload: payload.into(),
        },
        Err(s) => failed(s),
    };
    let mut body = resp.encode_to_vec();
    if body.len() > MESSAGE_LENGTH_MAX {
        resp = failed(Status::resource_exhausted(format!(
            "response of {} bytes exceeds the ttrpc limit of {MESSAGE_LENGTH_MAX}",
            body.len()
        )));
        body = resp.encode_to_vec();
    }
    // The status message is ours or the handler's; keep even a huge one
    // within the limit rather than break the connection.
    if body.len() > MESSAGE_LENGTH_MAX {
        body = failed(Status::internal("error message too long")).encode_to_vec();
    }
    encode_frame(id, MESSAGE_TYPE_RESPONSE, 0, &body)
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> Result<(), Error> {
    while let Some(frame) = rx.recv().await {
        w.write_all(&frame).await?;
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    Ok(())
}
