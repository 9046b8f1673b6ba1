//! The host side of the agent connection, over the hybrid vsock socket of
//! the sandbox's VMM:
//! - READY: a listener on `<uds>_1023`; the agent connects out and sends one
//!   `ReadyNotice` when it is serving, so the host never polls a booting
//!   guest.
//! - TTRPC: `CONNECT 1024`, then the multiplexed ttrpc client.
//! - STREAM: `CONNECT 1025` per stdio stream: `StreamHello` out,
//!   `StreamAccept` in, then raw bytes.
//!
//! Everything read from the guest is bounded in size and time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_proto::agent::{
    AgentClient, ProcessRef, ReadyNotice, StreamAccept, StreamHello, StreamKind,
};
use husk_proto::ports::{READY_PORT, STREAM_PORT, TTRPC_PORT};
use husk_proto::stream::{read_msg, write_msg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Bound on the hybrid `OK <port>\n` answer line.
const MAX_HANDSHAKE_LINE: usize = 32;
/// Bound on a ReadyNotice or StreamAccept.
const MAX_SMALL_MSG: usize = 4096;
/// How long one ready connection may take to deliver its notice.
const READY_READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("hybrid vsock handshake for port {port}: {detail}")]
    Handshake { port: u32, detail: String },
    #[error("agent refused the {kind:?} stream of {container_id}/{exec_id}: {reason}")]
    StreamRefused {
        container_id: String,
        exec_id: String,
        kind: StreamKind,
        reason: String,
    },
    #[error("port-forward to port {port} in the pod: {reason}")]
    PortRefused { port: u16, reason: String },
    #[error("agent rpc {method}: {source}")]
    Rpc {
        method: &'static str,
        source: husk_proto::ttrpc::Error,
    },
}

impl AgentError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// `<uds>_<port>`: where the VMM forwards guest connections to `port`.
pub fn guest_to_host_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to guest `port` through the hybrid socket `uds`: writes
/// `CONNECT <port>\n`, expects `OK <hostport>\n`, and returns the stream,
/// positioned at the first byte from the guest.
pub async fn hybrid_connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, AgentError> {
    let what = format!("CONNECT {port} via {}", uds.display());
    tokio::time::timeout(timeout, async {
        let mut s = UnixStream::connect(uds)
            .await
            .map_err(|e| AgentError::io(what.clone(), e))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| AgentError::io(what.clone(), e))?;
        let line = read_line_bounded(&mut s, MAX_HANDSHAKE_LINE)
            .await
            .map_err(|e| AgentError::Handshake { port, detail: e })?;
        parse_ok_line(&line).map_err(|detail| AgentError::Handshake { port, detail })?;
        Ok(s)
    })
    .await
    .map_err(|_| AgentError::Timeout {
        what: what.clone(),
        timeout,
    })?
}

/// Reads up to and including '\n', one byte at a time: what follows belongs
/// to the connection's payload.
async fn read_line_bounded(s: &mut UnixStream, max: usize) -> Result<String, String> {
    let mut line = Vec::with_capacity(16);
    loop {
        let b = match s.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(format!(
                    "connection closed after {:?} (no guest listener on that port?)",
                    String::from_utf8_lossy(&line)
                ))
            }
            Err(e) => return Err(e.to_string()),
        };
        if b == b'\n' {
            return String::from_utf8(line).map_err(|_| "answer is not UTF-8".to_string());
        }
        if line.len() >= max {
            return Err(format!("answer longer than {max} bytes"));
        }
        line.push(b);
    }
}

/// Accepts `OK <u32>` (without the newline); returns the host port.
pub fn parse_ok_line(line: &str) -> Result<u32, String> {
    let port = line
        .strip_prefix("OK ")
        .ok_or_else(|| format!("unexpected answer {line:?}"))?;
    port.trim_end_matches('\r')
        .parse::<u32>()
        .map_err(|_| format!("bad port in answer {line:?}"))
}

/// Listens for the agent's ReadyNotice on `<uds>_1023`. Bind it before the
/// VM starts; the socket file is removed on drop.
#[derive(Debug)]
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    pub fn bind(uds: &Path) -> Result<Self, AgentError> {
        let path = guest_to_host_path(uds, READY_PORT);
        let listener = UnixListener::bind(&path)
            .map_err(|e| AgentError::io(format!("bind {}", path.display()), e))?;
        Ok(Self { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for a connection that delivers a valid notice.
    /// A connection that sends garbage or nothing is dropped and the wait
    /// goes on: the guest is not trusted to get this right.
    pub async fn accept_ready(&self, timeout: Duration) -> Result<ReadyNotice, AgentError> {
        let what = format!("agent ready notice on {}", self.path.display());
        tokio::time::timeout(timeout, async {
            loop {
                let (mut s, _) = self
                    .listener
                    .accept()
                    .await
                    .map_err(|e| AgentError::io(what.clone(), e))?;
                match tokio::time::timeout(
                    READY_READ_TIMEOUT,
                    read_msg::<_, ReadyNotice>(&mut s, MAX_SMALL_MSG),
                )
                .await
                {
                    Ok(Ok(n)) => return Ok(n),
                    Ok(Err(e)) => tracing::warn!(%e, "bad ready notice, waiting for another"),
                    Err(_) => tracing::warn!("ready connection sent nothing, waiting for another"),
                }
            }
        })
        .await
        .map_err(|_| AgentError::Timeout {
            what: what.clone(),
            timeout,
        })?
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A connected agent: the ttrpc client and the way to open stdio streams.
#[derive(Debug, Clone)]
pub struct AgentConn {
    client: AgentClient,
    uds: PathBuf,
    connect_timeout: Duration,
}

impl AgentConn {
    /// Opens the ttrpc connection (`CONNECT 1024`).
    pub async fn connect(uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let s = hybrid_connect(uds, TTRPC_PORT, timeout).await?;
        let client = AgentClient::new(husk_proto::ttrpc::Client::new(s));
        Ok(Self {
            client,
            uds: uds.to_path_buf(),
            connect_timeout: timeout,
        })
    }

    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Opens one stdio stream of a process (`CONNECT 1025` + handshake).
    /// STDIN: write, then `shutdown()` to close the process's stdin.
    /// STDOUT/STDERR: read to EOF.
    pub async fn open_stream(
        &self,
        container_id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, AgentError> {
        let hello = StreamHello {
            process: Some(ProcessRef {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
            }),
            kind: kind as i32,
            port: 0,
        };
        let what = format!("stream {kind:?} of {container_id}/{exec_id}");
        let (s, accept) = self.stream_handshake(&hello, what).await?;
        if !accept.error.is_empty() {
            return Err(AgentError::StreamRefused {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
                kind,
                reason: accept.error.chars().take(512).collect(),
            });
        }
        Ok(s)
    }

    /// A connection to `localhost:port` in the pod's network namespace,
    /// made by the agent; refused at once when nothing listens there.
    pub async fn port_forward(&self, port: u16) -> Result<UnixStream, AgentError> {
        let hello = StreamHello {
            process: None,
            kind: StreamKind::PortForward as i32,
            port: port.into(),
        };
        let what = format!("port-forward to port {port}");
        let (s, accept) = self.stream_handshake(&hello, what).await?;
        if !accept.error.is_empty() {
            return Err(AgentError::PortRefused {
                port,
                reason: accept.error.chars().take(512).collect(),
            });
        }
        Ok(s)
    }

    /// Connects to the agent's stream port and trades hello for accept.
    async fn stream_handshake(
        &self,
        hello: &StreamHello,
        what: String,
    ) -> Result<(UnixStream, StreamAccept), AgentError> {
        let timeout = self.connect_timeout;
        let mut s = hybrid_connect(&self.uds, STREAM_PORT, timeout).await?;
        let accept: StreamAccept = tokio::time::timeout(timeout, async {
            write_msg(&mut s, hello).await?;
            read_msg(&mut s, MAX_SMALL_MSG).await
        })
        .await
        .map_err(|_| AgentError::Timeout {
            what: what.clone(),
            timeout,
        })?
        .map_err(|e| AgentError::io(what, e))?;
        Ok((s, accept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[test]
    fn ok_line() {
        assert_eq!(parse_ok_line("OK 1073741824"), Ok(1073741824));
        assert!(parse_ok_line("OK").is_err());
        assert!(parse_ok_line("ERR 1").is_err());
        assert!(parse_ok_line("OK -1").is_err());
        assert_eq!(
            guest_to_host_path(Path::new("/run/x/vsock"), 1023),
            PathBuf::from("/run/x/vsock_1023")
        );
    }

    /// A fake VMM hybrid socket: answers CONNECT, then echoes bytes; the
    /// client must see the payload right after the OK line, nothing lost.
    #[tokio::test]
    async fn connect_handshake_against_fake_vmm() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("vsock");
        let l = UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = tokio::io::BufReader::new(r);
                    let mut line = String::new();
                    r.read_line(&mut line).await.unwrap();
                    match line.as_str() {
                        "CONNECT 1024\n" => {
                            // OK line and payload in one write.
                            w.write_all(b"OK 99\npayload").await.unwrap();
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        "CONNECT 7\n" => w.write_all(b"garbage\n").await.unwrap(),
                        _ => {} // no listener: close
                    }
                });
            }
        });
        let mut s = hybrid_connect(&uds, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"payload");
        let e = hybrid_connect(&uds, 7, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Handshake { port: 7, .. }), "{e}");
        let e = hybrid_connect(&uds, 8, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("connection closed"), "{e}");
        let e = hybrid_connect(&d.path().join("none"), 8, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Io { .. }), "{e}");
    }

    #[tokio::test]
    async fn ready_listener_skips_garbage() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("vsock");
        let l = ReadyListener::bind(&uds).unwrap();
        let p = l.path().to_path_buf();
        assert!(p.ends_with("vsock_1023"));
        let p2 = p.clone();
        tokio::spawn(async move {
            let mut bad = UnixStream::connect(&p2).await.unwrap();
            bad.write_all(&[0xff; 11]).await.unwrap();
            drop(bad);
            let mut good = UnixStream::connect(&p2).await.unwrap();
            let n = ReadyNotice {
                agent_version: "0.1.0".into(),
                boot_to_ready_ms: 42,
            };
            write_msg(&mut good, &n).await.unwrap();
        });
        let n = l.accept_ready(Duration::from_secs(5)).await.unwrap();
        assert_eq!(n.boot_to_ready_ms, 42);
        let e = l.accept_ready(Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }));
        drop(l);
        assert!(!p.exists());
    }
}
