//! A container's output streams and exit: copying output to the CRI log,
//! watching for the init process's exit, waiting for it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use husk_proto::agent::StdioConfig;
use husk_runtime::sandbox::{ExitInfo, Sandbox};
use tokio::sync::watch;
use tonic::Status;
use tracing::Instrument;

use super::errors::sandbox_error;
use super::{now_ns, Husk, LiveContainer};
use crate::logs::{copy_to_log, LogFile, Stream, DEFAULT_MAX_LINE};
use crate::state::{ContainerRecord, ContainerState};

/// How long an exit waits for the container's output to reach its log.
const IO_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Waits until the container's init process is known to have exited.
pub(super) async fn wait_exit(h: &Husk, container_id: &str, timeout: Duration) -> bool {
    let Some(mut live) = h.live(container_id) else {
        return true;
    };
    let r = tokio::time::timeout(timeout, live.exit.wait_for(|e| e.is_some())).await;
    matches!(r, Ok(Ok(_)))
}

/// Attaches the init process's streams and copies its output to the CRI log
/// (appending: after a huskd restart the same file continues). Without a
/// log the output is drained so that the process never blocks on a full
/// pipe. The exit channel of the result is a placeholder until the exit
/// watcher ([`watch_exit`]) replaces it.
pub(super) async fn attach_output(
    sandbox: &Sandbox,
    id: &str,
    stdio: StdioConfig,
    log: Option<LogFile>,
) -> Result<LiveContainer, Status> {
    let streams = sandbox
        .attach_stdio(id, "", stdio)
        .await
        .map_err(|e| sandbox_error(&e))?;
    let outs = [
        (Stream::Stdout, Some(streams.stdout)),
        (Stream::Stderr, streams.stderr),
    ];
    let mut taps = OutputTaps::default();
    let mut copiers = Vec::new();
    for (kind, s) in outs {
        let Some(s) = s else { continue };
        let (tap, _) = broadcast::channel(TAP_CHUNKS);
        let weak = Some(tap.downgrade());
        match kind {
            Stream::Stdout => taps.stdout = weak,
            Stream::Stderr => taps.stderr = weak,
        }
        let s = Tee { inner: s, tap };
        copiers.push(match &log {
            Some(l) => {
                let l = l.clone();
                tokio::spawn(async move {
                    copy_to_log(s, kind, l, DEFAULT_MAX_LINE).await;
                })
            }
            None => tokio::spawn(async move {
                let mut s = s;
                let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
            }),
        });
    }
    let (io_tx, io_done) = watch::channel(false);
    tokio::spawn(async move {
        for c in copiers {
            let _ = c.await;
        }
        let _ = io_tx.send(true);
    });
    // Attach sessions write to the container's stdin; it stays open (a
    // process reading stdin blocks as under other runtimes) until the
    // container is removed, or the first session ends with `stdin_once`.
    let stdin = streams.stdin.map(Arc::new);
    let (_tx, rx) = watch::channel(None);
    Ok(LiveContainer {
        log,
        exit: rx,
        io_done,
        stdin,
        output: taps,
    })
}

/// Waits (WaitProcess) for the container's init process in the background,
/// then records the exit and sends it on `tx`. WaitProcess answers at once
/// for a process that exited while huskd was down.
pub(super) fn watch_exit(
    h2: Arc<Husk>,
    sandbox: Arc<Sandbox>,
    c: &ContainerRecord,
    mut io_done: watch::Receiver<bool>,
    tx: watch::Sender<Option<ExitInfo>>,
) {
    let cid = c.id.clone();
    let span = tracing::info_span!("container_wait", pod = %c.pod_id, container = %c.id);
    tokio::spawn(
        async move {
            let r = sandbox.wait(&cid, "").await;
            let (exit, reason, message) = match r {
                Ok(e) => {
                    let reason = if e.oom_killed {
                        "OOMKilled"
                    } else if e.exit_code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    };
                    (e, reason.to_string(), String::new())
                }
                Err(e) => (
                    ExitInfo {
                        exit_code: 255,
                        oom_killed: false,
                        exited_at_unix_nanos: now_ns() as u64,
                    },
                    "Unknown".to_string(),
                    format!("waiting for the container failed: {e}"),
                ),
            };
            // The last output reaches the log before the exit is reported
            // (kubelet reads the log of an exited container once). Bounded:
            // a background process may hold the streams open.
            if tokio::time::timeout(IO_DRAIN_WAIT, io_done.wait_for(|d| *d))
                .await
                .is_err()
            {
                tracing::warn!("output streams still open after the exit; reporting it anyway");
            }
            tracing::info!(exit_code = exit.exit_code, %reason, "container exited");
            let _ = h2.state.update_container(&cid, |r| {
                if r.state == ContainerState::Running {
                    r.state = ContainerState::Exited;
                    r.exit_code = exit.exit_code;
                    // The host's clock, not the guest's: the guest clock
                    // is untrusted and drifts from the host's (an exit
                    // before the start was seen), and CRI times must be
                    // comparable with created/started, which are host times.
                    r.finished_at_ns = now_ns().max(r.started_at_ns);
                    r.reason = reason;
                    r.message = message;
                }
            });
            let _ = tx.send(Some(exit));
        }
        .instrument(span),
    );
}

/// Chunks of a container's output kept for Attach sessions. A session that
/// falls this far behind loses its output stream (it sees an error), never
/// the log and never the other sessions.
const TAP_CHUNKS: usize = 256;

/// Subscriptions to a container's output streams. Only the copiers hold
/// the senders, so a subscription ends (EOF) when the container's stream
/// does.
#[derive(Clone, Default)]
pub struct OutputTaps {
    stdout: Option<broadcast::WeakSender<Bytes>>,
    stderr: Option<broadcast::WeakSender<Bytes>>,
}

impl std::fmt::Debug for OutputTaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputTaps").finish_non_exhaustive()
    }
}

impl OutputTaps {
    /// A reader of what the container writes on `kind` from now on; EOF at
    /// once if that stream has ended (or never existed).
    pub fn subscribe(&self, kind: Stream) -> TapReader {
        let weak = match kind {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let rx = match weak.as_ref().and_then(|w| w.upgrade()) {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        };
        TapReader {
            rx: BroadcastStream::new(rx),
            buf: Bytes::new(),
        }
    }
}

/// Passes reads through and sends a copy of each to the attach sessions.
struct Tee<R> {
    inner: R,
    tap: broadcast::Sender<Bytes>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Tee<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            if !new.is_empty() && self.tap.receiver_count() > 0 {
                let _ = self.tap.send(Bytes::copy_from_slice(new));
            }
        }
        r
    }
}

pub struct TapReader {
    rx: BroadcastStream<Bytes>,
    buf: Bytes,
}

impl AsyncRead for TapReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match self.rx.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(b))) => self.buf = b,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => {
                    return Poll::Ready(Err(std::io::Error::other(format!(
                        "attach session fell {n} chunks behind the container's output"
                    ))))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.buf.len().min(out.remaining());
        let chunk = self.buf.split_to(n);
        out.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}
