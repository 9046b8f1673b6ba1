use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, trace};

use super::frame::{encode_frame, read_frame, FrameHeader, Payload};
use super::{
    wire, Code, Error, Status, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE,
};

/// Frames queued for the writer task before callers wait.
const WRITE_QUEUE: usize = 64;

type Reply = Result<Vec<u8>, Error>;

/// A ttrpc client over one connection. Calls are multiplexed: any number may
/// be in flight at once, from clones of the same client, and their answers
/// may arrive in any order.
///
/// The connection is served by two tasks (reader and writer) spawned on the
/// current tokio runtime. It closes when the peer closes it, on an I/O or
/// framing error, on [`Client::close`], or when the last clone is dropped;
/// pending calls then fail with [`Error::Closed`], and so do later ones.
///
/// The peer may be untrusted (a guest): nothing it sends can make the client
/// panic or allocate more than [`MESSAGE_LENGTH_MAX`] per frame.
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Owned by the clones of a `Client` only (the tasks hold `Shared`), so
/// dropping the last clone shuts the connection down.
struct Handle {
    tx: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close("client dropped");
    }
}

struct Shared {
    calls: Mutex<Calls>,
    next_id: AtomicU32,
    /// Becomes true once; both tasks stop when it does.
    shutdown: watch::Sender<bool>,
}

struct Calls {
    pending: HashMap<u32, oneshot::Sender<Reply>>,
    closed: bool,
}

impl Shared {
    fn calls(&self) -> MutexGuard<'_, Calls> {
        // Nothing that holds this lock can panic halfway through an update,
        // so a poisoned lock still guards consistent data.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, reply: oneshot::Sender<Reply>) -> Result<u32, Error> {
        let mut calls = self.calls();
        if calls.closed {
            return Err(Error::Closed);
        }
        // Client stream ids are odd and increasing; after 2^31 calls the
        // counter wraps, so skip ids still in use.
        let id = loop {
            let id = self.next_id.fetch_add(2, Ordering::Relaxed);
            if !calls.pending.contains_key(&id) {
                break id;
            }
        };
        calls.pending.insert(id, reply);
        Ok(id)
    }

    fn take(&self, id: u32) -> Option<oneshot::Sender<Reply>> {
        self.calls().pending.remove(&id)
    }

    fn close(&self, reason: &str) {
        let pending = {
            let mut calls = self.calls();
            if calls.closed {
                return;
            }
            calls.closed = true;
            std::mem::take(&mut calls.pending)
        };
        debug!(
            reason,
            pending = pending.len(),
            "ttrpc client connection closed"
        );
        for (_, reply) in pending {
            let _ = reply.send(Err(Error::Closed));
        }
        self.shutdown.send_replace(true);
    }
}

/// Resolves once the connection is shutting down.
async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means shut down.
    let _ = rx.wait_for(|closed| *closed).await;
}

/// Removes a call's entry when the call ends in any way (answer, timeout,
/// or the caller dropping the future).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.take(self.id);
    }
}

impl Client {
    /// Starts a client on an established connection. Must be called from
    /// within a tokio runtime.
    pub fn new<S>(stream: S) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let shared = Arc::new(Shared {
            calls: Mutex::new(Calls {
                pending: HashMap::new(),
                closed: false,
            }),
            next_id: AtomicU32::new(1),
            shutdown: watch::Sender::new(false),
        });
        tokio::spawn(read_loop(r, Arc::clone(&shared)));
        tokio::spawn(write_loop(w, rx, Arc::clone(&shared)));
        Client {
            handle: Arc::new(Handle { tx, shared }),
        }
    }

    /// Calls `service`/`method` with an encoded request and returns the
    /// encoded response. `timeout` of `None` waits forever; otherwise it
    /// bounds the whole call and is sent to the server as `timeout_nano`.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, Error> {
        let request = wire::Request {
            service: service.to_owned(),
            method: method.to_owned(),
            payload: payload.into(),
            timeout_nano: timeout.map_or(0, |t| i64::try_from(t.as_nanos()).unwrap_or(i64::MAX)),
            metadata: Vec::new(),
        };
        let body = request.encode_to_vec();
        if body.len() > MESSAGE_LENGTH_MAX {
            return Err(Status::resource_exhausted(format!(
                "{service}/{method}: request of {} bytes exceeds the ttrpc limit of {MESSAGE_LENGTH_MAX}",
                body.len()
            ))
            .into());
        }

        let shared = &self.handle.shared;
        let (reply_tx, reply_rx) = oneshot::channel();
        let id = shared.register(reply_tx)?;
        let _guard = PendingGuard { shared, id };
        let frame = encode_frame(id, MESSAGE_TYPE_REQUEST, 0, &body);
        drop(body);
        trace!(id, service, method, "ttrpc call");

        let exchange = async {
            self.handle
                .tx
                .send(frame)
                .await
                .map_err(|_| Error::Closed)?;
            reply_rx.await.unwrap_or(Err(Error::Closed))
        };
        match timeout {
            None => exchange.await,
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .unwrap_or(Err(Error::Timeout)),
        }
    }

    /// [`Client::call`] with prost messages.
    pub async fn unary<Req, Resp>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, Error>
    where
        Req: Message,
        Resp: Message + Default,
    {
        let payload = self
            .call(service, method, req.encode_to_vec(), timeout)
            .await?;
        Ok(Resp::decode(&payload[..])?)
    }

    /// Whether the connection is closed; calls on a closed client fail at
    /// once with [`Error::Closed`].
    pub fn is_closed(&self) -> bool {
        self.handle.shared.calls().closed
    }

    /// Closes the connection: pending calls fail with [`Error::Closed`].
    pub fn close(&self) {
        self.handle.shared.close("closed by the caller");
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let calls = self.handle.shared.calls();
        f.debug_struct("Client")
            .field("closed", &calls.closed)
            .field("pending", &calls.pending.len())
            .finish()
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut r: R, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let reason = loop {
        let frame = tokio::select! {
            _ = shutting_down(&mut shutdown) => return,
            frame = read_frame(&mut r) => frame,
        };
        match frame {
            Ok(Some((header, payload))) => handle_frame(&shared, header, payload),
            Ok(None) => break "the peer closed the connection".to_owned(),
            Err(e) => break format!("reading from the connection: {e}"),
        }
    };
    shared.close(&reason);
}

fn handle_frame(shared: &Shared, header: FrameHeader, payload: Payload) {
    if header.msg_type != MESSAGE_TYPE_RESPONSE {
        // Servers send only responses to unary calls; anything else
        // (stream data, future message types) is skipped.
        debug!(
            stream = header.stream_id,
            msg_type = header.msg_type,
            "ttrpc client: ignoring a frame that is not a response"
        );
        return;
    }
    let Some(reply) = shared.take(header.stream_id) else {
        // Normal after a timeout; also what a confused peer gets.
        debug!(
            stream = header.stream_id,
            "ttrpc client: response for no pending call"
        );
        return;
    };
    let result = match payload {
        Payload::Oversized => Err(Status::resource_exhausted(format!(
            "response of {} bytes exceeds the ttrpc limit of {MESSAGE_LENGTH_MAX}",
            header.length
        ))
        .into()),
        Payload::Data(bytes) => match wire::Response::decode(bytes) {
            Err(e) => Err(Error::Decode(e)),
            Ok(resp) => match resp.status {
                Some(status) if status.code != Code::Ok.as_i32() => Err(Error::Status(Status {
                    code: Code::from_i32(status.code),
                    message: status.message,
                })),
                _ => Ok(Vec::from(resp.payload)),
            },
        },
    };
    let _ = reply.send(result);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let frame = tokio::select! {
            biased;
            _ = shutting_down(&mut shutdown) => break,
            frame = rx.recv() => frame,
        };
        let Some(frame) = frame else {
            shared.close("client dropped");
            break;
        };
        let written = tokio::select! {
            _ = shutting_down(&mut shutdown) => break,
            written = async {
                w.write_all(&frame).await?;
                // Batch frames that are already queued into one flush.
                if rx.is_empty() {
                    w.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            } => written,
        };
        if let Err(e) = written {
            shared.close(&format!("writing to the connection: {e}"));
            break;
        }
    }
    // Tell the peer we are done; bounded because a peer that stopped
    // reading must not keep this task alive.
    let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
}
