//! A minimal SPDY exec client, for husk's own tests and benchmarks: the
//! clients users run (kubectl, crictl, the API server) are Go and are
//! tested end to end separately. It runs one command to completion: sends
//! all of `stdin` and closes it, collects stdout, stderr and the status.

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::spdy::{ControlFrame, Frame, FrameReader, HeaderCodec, FLAG_FIN};

/// What one exec session produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The raw content of the error stream (a v4 `Status` as JSON).
    pub status: Vec<u8>,
}

impl ExecOutput {
    /// The exit code the v4 status carries (0 for `Success`), if any.
    pub fn exit_code(&self) -> Option<i32> {
        let v: serde_json::Value = serde_json::from_slice(&self.status).ok()?;
        if v["status"] == "Success" {
            return Some(0);
        }
        v["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the server answered {0}")]
    Refused(String),
    #[error("{0}")]
    Protocol(String),
}

/// Runs the exec session behind `url` (`http://host:port/exec/TOKEN`) over
/// SPDY with `v4.channel.k8s.io`, stdin and stdout (and stderr unless
/// `tty`).
pub async fn exec(url: &str, stdin: Option<&[u8]>, tty: bool) -> Result<ExecOutput, ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Protocol(format!("not an http URL: {url}")))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut tcp = TcpStream::connect(host).await?;
    tcp.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut r = BufReader::new(tcp);
    let mut status_line = String::new();
    r.read_line(&mut status_line).await?;
    let mut body_len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            body_len = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    if !status_line.contains(" 101 ") {
        let mut body = vec![0u8; body_len.min(4096)];
        let _ = tokio::io::AsyncReadExt::read_exact(&mut r, &mut body).await;
        return Err(ClientError::Refused(format!(
            "{} {}",
            status_line.trim(),
            String::from_utf8_lossy(&body).trim()
        )));
    }
    if !r.buffer().is_empty() {
        return Err(ClientError::Protocol("data before the first frame".into()));
    }
    let (rd, mut wr) = tokio::io::split(r.into_inner());
    let mut frames = FrameReader::new(rd, 1 << 24);
    let mut codec = HeaderCodec::new();
    let mut kinds = vec![(1u32, "error"), (3, "stdout")];
    if stdin.is_some() {
        kinds.push((5, "stdin"));
    }
    if tty {
        kinds.push((7, "resize"));
    } else {
        kinds.push((9, "stderr"));
    }
    let mut out = Vec::new();
    for (id, kind) in &kinds {
        let block = codec
            .encode(&[("streamtype", kind)])
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Frame::Control(ControlFrame::SynStream {
            stream_id: *id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            header_block: block.into(),
        })
        .encode(&mut out);
    }
    if let Some(data) = stdin {
        for chunk in data.chunks(32 * 1024) {
            Frame::Data {
                stream_id: 5,
                flags: 0,
                data: Bytes::copy_from_slice(chunk),
            }
            .encode(&mut out);
        }
        Frame::Data {
            stream_id: 5,
            flags: FLAG_FIN,
            data: Bytes::new(),
        }
        .encode(&mut out);
    }
    wr.write_all(&out).await?;

    let mut result = ExecOutput::default();
    loop {
        let frame = frames
            .next()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        match frame {
            None => return Ok(result),
            Some(Frame::Data {
                stream_id, data, ..
            }) => match stream_id {
                1 => result.status.extend_from_slice(&data),
                3 => result.stdout.extend_from_slice(&data),
                9 => result.stderr.extend_from_slice(&data),
                _ => {}
            },
            Some(Frame::Control(ControlFrame::SynReply { header_block, .. })) => {
                codec
                    .decode(&header_block)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
            }
            Some(Frame::Control(ControlFrame::GoAway { .. })) => return Ok(result),
            Some(_) => {}
        }
    }
}
