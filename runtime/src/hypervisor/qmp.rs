//! A minimal QMP (QEMU Machine Protocol) client: line-delimited JSON over a
//! unix socket. Only what the runtime uses: the capabilities handshake and
//! single commands. QMP instead of signals because `quit` is acknowledged
//! (we know QEMU heard us), and pause/resume/snapshot/hotplug will need the
//! same channel.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::HypervisorError;

/// QEMU's replies are small; a line longer than this is not QMP.
const MAX_LINE: usize = 1 << 20;

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, HypervisorError> {
        tokio::time::timeout(timeout, async {
            let s = UnixStream::connect(path)
                .await
                .map_err(|e| HypervisorError::io(format!("connect {}", path.display()), e))?;
            let (r, w) = s.into_split();
            let mut q = Qmp {
                reader: BufReader::new(r),
                writer: w,
            };
            let greeting = q.read_msg().await?;
            if greeting.get("QMP").is_none() {
                return Err(HypervisorError::Qmp(format!(
                    "unexpected greeting {greeting}"
                )));
            }
            q.execute_inner("qmp_capabilities").await?;
            Ok(q)
        })
        .await
        .map_err(|_| HypervisorError::Qmp(format!("no QMP handshake within {timeout:?}")))?
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        cmd: &str,
        timeout: Duration,
    ) -> Result<Value, HypervisorError> {
        tokio::time::timeout(timeout, self.execute_inner(cmd))
            .await
            .map_err(|_| HypervisorError::Qmp(format!("{cmd}: no answer within {timeout:?}")))?
    }

    async fn execute_inner(&mut self, cmd: &str) -> Result<Value, HypervisorError> {
        let mut line = json!({ "execute": cmd }).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| HypervisorError::io("QMP write", e))?;
        loop {
            let msg = self.read_msg().await?;
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                return Err(HypervisorError::Qmp(format!("{cmd}: {e}")));
            }
            // Asynchronous events (SHUTDOWN, ...) may come first.
        }
    }

    async fn read_msg(&mut self) -> Result<Value, HypervisorError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .map_err(|e| HypervisorError::io("QMP read", e))?;
        if n == 0 {
            return Err(HypervisorError::Qmp("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| HypervisorError::Qmp(format!("bad JSON: {e}")))
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn handshake_and_quit_against_fake_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&p).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let mut cmds = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap() > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                let c = v["execute"].as_str().unwrap().to_string();
                line.clear();
                if c == "quit" {
                    w.write_all(b"{\"event\": \"SHUTDOWN\"}\n").await.unwrap();
                }
                w.write_all(b"{\"return\": {}}\n").await.unwrap();
                cmds.push(c);
            }
            cmds
        });
        let mut q = Qmp::connect(&p, Duration::from_secs(5)).await.unwrap();
        q.execute("quit", Duration::from_secs(5)).await.unwrap();
        drop(q);
        assert_eq!(server.await.unwrap(), vec!["qmp_capabilities", "quit"]);
    }
}
