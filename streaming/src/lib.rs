//! husk's CRI streaming server: what `Exec`, `Attach` and `PortForward`
//! hand to kubelet is a URL of this server, and kubectl, crictl or the API
//! server's proxy then speak SPDY/3.1 (or WebSocket) to it.
//!
//! The server knows nothing of pods or VMs: huskd implements [`Runtime`],
//! which starts a process and hands back its streams, and this crate does
//! the protocols, the tokens and the copying.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

mod channel;
pub mod client;
mod portforward;
mod remotecommand;
mod server;
pub mod spdy;
pub mod tokens;
mod websocket;

pub use server::{Server, ServerConfig, TlsFiles};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A CRI `ExecRequest`, as cached behind its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// A CRI `AttachRequest`, as cached behind its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// The terminal size a client reports (kubelet's `TerminalSize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// A started process's streams, as requested (`None` where not).
#[derive(Default)]
pub struct ProcessIo {
    pub stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
}

/// A process started for a streaming session.
pub trait Process: Send + Sync {
    /// Its exit code once it has exited (128 + signal when killed), or why
    /// it could not be waited for.
    fn wait(&self) -> BoxFuture<'_, Result<i32, String>>;
    fn resize(&self, size: TermSize) -> BoxFuture<'_, ()>;
    /// Kills it: the client went away.
    fn kill(&self) -> BoxFuture<'_, ()>;
}

/// A CRI `PortForwardRequest`, as cached behind its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardRequest {
    pub pod_sandbox_id: String,
    /// The ports the client may forward; empty: any.
    pub ports: Vec<u16>,
}

/// A bidirectional byte stream (a forwarded connection).
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// What the server asks of the container runtime.
pub trait Runtime: Send + Sync + 'static {
    /// A connection to `localhost:port` inside the pod. An error is a
    /// message for the client ("connection refused").
    fn port_forward(
        &self,
        pod_sandbox_id: String,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn Duplex>, String>>;

    /// Starts `req.cmd` in the container with the requested stdio. An error
    /// is a message for the client ("container ... is not running",
    /// "executable file not found ...").
    fn exec(&self, req: ExecRequest) -> BoxFuture<'_, Result<Started, String>>;

    /// Connects to the running container's own stdio. The process's
    /// `wait` resolves when the container exits, its `kill` detaches (the
    /// container goes on).
    fn attach(&self, req: AttachRequest) -> BoxFuture<'_, Result<Started, String>>;
}

/// A process [`Runtime::exec`] started.
pub struct Started {
    pub io: ProcessIo,
    pub process: Arc<dyn Process>,
}

/// A request that cannot be served, for the CRI call that asked.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Token(#[from] tokens::TokenError),
}
