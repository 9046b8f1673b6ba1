//! Kubernetes' remote command protocol over SPDY (`v4.channel.k8s.io`, and
//! `v3`/`v2`): the client opens one stream per channel, each named by its
//! `streamType` header (`error`, `stdin`, `stdout`, `stderr`, `resize`);
//! once all the request needs are open the process runs, its output goes
//! out on `stdout`/`stderr`, terminal sizes come in on `resize` as a run of
//! JSON objects, and the outcome is written on `error`: in v4 a
//! `metav1.Status` (`Success`, or `Failure` with reason `NonZeroExitCode`
//! and the code as an `ExitCode` cause, exactly what kubectl parses), in
//! v2/v3 plain text on failure only.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::channel::OutChannel;
use crate::spdy::{Connection, IncomingStream, StreamReader, StreamWriter};
use crate::{AttachRequest, ExecRequest, Process, Runtime, Started, TermSize};

pub const PROTOCOL_HEADER: &str = "x-stream-protocol-version";

/// Supported protocols, most preferred first.
pub const PROTOCOLS: [&str; 3] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
];

/// How long output may keep flowing after the process has exited (a child
/// it left behind holding the pipe must not hold the session forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

/// The first protocol of the client's that this server speaks.
pub fn negotiate(offered: &[String]) -> Option<&'static str> {
    offered
        .iter()
        .find_map(|o| PROTOCOLS.iter().find(|p| **p == o.as_str()).copied())
}

#[derive(Default)]
struct Streams {
    error: Option<StreamWriter>,
    stdin: Option<StreamReader>,
    stdout: Option<StreamWriter>,
    stderr: Option<StreamWriter>,
    resize: Option<StreamReader>,
}

struct Wanted {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    resize: bool,
}

impl Streams {
    fn complete(&self, w: &Wanted) -> bool {
        self.error.is_some()
            && (!w.stdin || self.stdin.is_some())
            && (!w.stdout || self.stdout.is_some())
            && (!w.stderr || self.stderr.is_some())
            && (!w.resize || self.resize.is_some())
    }

    /// Takes `s` into its slot; false for an unknown or repeated type.
    fn take(&mut self, s: IncomingStream) -> bool {
        let IncomingStream {
            headers,
            reader,
            writer,
            ..
        } = s;
        let kind = headers
            .iter()
            .find(|(n, _)| n == "streamtype")
            .map(|(_, v)| v.as_str());
        match kind {
            Some("error") if self.error.is_none() => self.error = Some(writer),
            Some("stdin") if self.stdin.is_none() => self.stdin = Some(reader),
            Some("stdout") if self.stdout.is_none() => self.stdout = Some(writer),
            Some("stderr") if self.stderr.is_none() => self.stderr = Some(writer),
            Some("resize") if self.resize.is_none() => self.resize = Some(reader),
            _ => return false,
        }
        true
    }
}

async fn wait_streams(conn: &mut Connection, w: &Wanted) -> Option<Streams> {
    let mut streams = Streams::default();
    while !streams.complete(w) {
        let s = conn.accept().await?;
        let writer = s.writer.clone();
        if !streams.take(s) {
            writer.reset().await;
        }
    }
    Some(streams)
}

/// What a remote command session runs.
pub enum Session {
    Exec(ExecRequest),
    Attach(AttachRequest),
}

impl Session {
    /// (tty, stdin, stdout, stderr)
    pub(crate) fn stdio(&self) -> (bool, bool, bool, bool) {
        match self {
            Session::Exec(r) => (r.tty, r.stdin, r.stdout, r.stderr),
            Session::Attach(r) => (r.tty, r.stdin, r.stdout, r.stderr),
        }
    }
}

/// Serves one exec or attach session on an upgraded SPDY connection.
pub async fn serve(
    mut conn: Connection,
    protocol: &'static str,
    session: Session,
    runtime: Arc<dyn Runtime>,
    creation_timeout: Duration,
) {
    let (tty, stdin, stdout, stderr) = session.stdio();
    let wanted = Wanted {
        stdin,
        stdout,
        stderr: stderr && !tty,
        resize: tty && protocol != "v2.channel.k8s.io",
    };
    let streams =
        match tokio::time::timeout(creation_timeout, wait_streams(&mut conn, &wanted)).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::debug!("client left before opening its streams");
                return;
            }
            Err(_) => {
                tracing::info!(?creation_timeout, "client did not open its streams in time");
                conn.close().await;
                return;
            }
        };
    let Some(error) = streams.error else {
        return;
    };
    let out = |w: Option<StreamWriter>| w.map(|w| Box::new(w) as Box<dyn OutChannel>);
    let io = ClientIo {
        stdin: streams.stdin.map(|r| Box::new(r) as Reader),
        resize: streams.resize.map(|r| Box::new(r) as Reader),
        stdout: out(streams.stdout),
        stderr: out(streams.stderr),
    };
    let structured = protocol == "v4.channel.k8s.io";
    run_session(
        io,
        Box::new(error),
        &session,
        runtime,
        structured,
        client_gone(&mut conn),
    )
    .await;
    conn.close().await;
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// The client's side of a session, whatever the transport.
pub struct ClientIo {
    pub stdin: Option<Reader>,
    pub resize: Option<Reader>,
    pub stdout: Option<Box<dyn OutChannel>>,
    pub stderr: Option<Box<dyn OutChannel>>,
}

/// Runs the session to its end and reports the outcome on the error
/// channel: a `metav1.Status` if `structured` (v4 and later), plain text on
/// failure otherwise. `gone` resolves when the client can send nothing more.
pub async fn run_session(
    io: ClientIo,
    error: Box<dyn OutChannel>,
    session: &Session,
    runtime: Arc<dyn Runtime>,
    structured: bool,
    gone: impl std::future::Future<Output = ()>,
) {
    let outcome = run(io, session, runtime, gone).await;
    let outcome = match (session, outcome) {
        // An attach ends when the container's output does; it reports no
        // exit code (kubelet's neither).
        (Session::Attach(_), Outcome::Exited(_)) => Outcome::Exited(0),
        (_, o) => o,
    };
    let cmd = match session {
        Session::Exec(r) => r.cmd.as_slice(),
        Session::Attach(_) => &[],
    };
    if let Some(status) = status_message(structured, cmd, &outcome) {
        let _ = error.write(&status).await;
    }
    let _ = error.close().await;
}

enum Outcome {
    Exited(i32),
    Failed(String),
    ClientGone,
}

async fn run(
    client: ClientIo,
    session: &Session,
    runtime: Arc<dyn Runtime>,
    gone: impl std::future::Future<Output = ()>,
) -> Outcome {
    let started = match session {
        Session::Exec(r) => runtime.exec(r.clone()).await,
        Session::Attach(r) => runtime.attach(r.clone()).await,
    };
    let Started { io, process } = match started {
        Ok(p) => p,
        Err(msg) => return Outcome::Failed(msg),
    };
    let stdin = match (client.stdin, io.stdin) {
        (Some(mut from), Some(mut to)) => Some(tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from, &mut to).await;
            // The client's FIN (or v5 close signal) closes the process's
            // stdin.
            let _ = to.shutdown().await;
        })),
        _ => None,
    };
    let resize = client
        .resize
        .map(|r| tokio::spawn(resize_loop(r, process.clone())));
    let mut outputs = Vec::new();
    for (from, to) in [(io.stdout, client.stdout), (io.stderr, client.stderr)] {
        if let Some(from) = from {
            outputs.push(tokio::spawn(copy_out(from, to)));
        }
    }
    let outcome = tokio::select! {
        r = process.wait() => match r {
            Ok(code) => Outcome::Exited(code),
            Err(e) => Outcome::Failed(e),
        },
        () = gone => Outcome::ClientGone,
    };
    if matches!(outcome, Outcome::ClientGone) {
        tracing::info!("client went away; ending the session (an exec process is killed)");
        process.kill().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), process.wait()).await;
    }
    let drain = futures_util::future::join_all(outputs.iter_mut());
    if tokio::time::timeout(DRAIN_AFTER_EXIT, drain).await.is_err() {
        tracing::info!("output still open {DRAIN_AFTER_EXIT:?} after the exit; cutting it");
    }
    for t in outputs.iter().chain(stdin.iter()).chain(resize.iter()) {
        t.abort();
    }
    outcome
}

/// Resolves when the client can send nothing more: its connection ended.
/// Streams it opens meanwhile are not part of the protocol and are reset.
async fn client_gone(conn: &mut Connection) {
    while let Some(s) = conn.accept().await {
        s.writer.reset().await;
    }
}

async fn copy_out(mut from: Reader, to: Option<Box<dyn OutChannel>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(to) = &to {
            if to.write(&buf[..n]).await.is_err() {
                // The client is gone; keep draining so the process never
                // blocks on a full pipe.
                continue;
            }
        }
    }
    if let Some(to) = to {
        let _ = to.close().await;
    }
}

/// Reads the run of JSON `TerminalSize` objects on the resize stream.
async fn resize_loop(mut r: Reader, process: Arc<dyn Process>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut it = serde_json::Deserializer::from_slice(&pending).into_iter::<TermSize>();
        let mut used = 0;
        while let Some(size) = it.next() {
            match size {
                Ok(s) => {
                    used = it.byte_offset();
                    process.resize(s).await;
                }
                Err(e) if e.is_eof() => break,
                Err(e) => {
                    tracing::debug!(%e, "bad resize message; ignoring the stream");
                    return;
                }
            }
        }
        pending.drain(..used);
        if pending.len() > 4096 {
            return;
        }
    }
}

/// What goes on the error stream, if anything.
fn status_message(structured: bool, cmd: &[String], outcome: &Outcome) -> Option<Vec<u8>> {
    let v4 = structured;
    let failure = |message: String, reason: &str, causes: serde_json::Value| {
        if v4 {
            let mut s = json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "details": {"causes": causes},
            });
            if reason == "InternalError" {
                s["code"] = json!(500);
            }
            serde_json::to_vec(&s).ok()
        } else {
            Some(message.into_bytes())
        }
    };
    match outcome {
        Outcome::Exited(0) => v4.then(|| br#"{"metadata":{},"status":"Success"}"#.to_vec()),
        Outcome::Exited(code) => failure(
            format!(
                "command terminated with non-zero exit code: command {cmd:?} exited with {code}"
            ),
            "NonZeroExitCode",
            json!([{"reason": "ExitCode", "message": code.to_string()}]),
        ),
        Outcome::Failed(msg) => failure(msg.clone(), "InternalError", json!([{"message": msg}])),
        Outcome::ClientGone => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_clients_order() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            negotiate(&o(&["v5.channel.k8s.io", "v4.channel.k8s.io"])),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            negotiate(&o(&["v2.channel.k8s.io", "v4.channel.k8s.io"])),
            Some("v2.channel.k8s.io")
        );
        assert_eq!(negotiate(&o(&["channel.k8s.io"])), None);
    }

    /// The exact shapes kubectl's v4 client decodes.
    #[test]
    fn v4_status() {
        let cmd = vec!["sh".to_string()];
        let ok = status_message(true, &cmd, &Outcome::Exited(0)).unwrap();
        assert_eq!(ok, br#"{"metadata":{},"status":"Success"}"#);
        let s: serde_json::Value =
            serde_json::from_slice(&status_message(true, &cmd, &Outcome::Exited(3)).unwrap())
                .unwrap();
        assert_eq!(s["status"], "Failure");
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        let v2 = status_message(false, &cmd, &Outcome::Failed("nope".into()));
        assert_eq!(v2.unwrap(), b"nope");
        assert!(status_message(false, &cmd, &Outcome::Exited(0)).is_none());
    }
}
