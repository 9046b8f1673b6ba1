//! A minimal SPDY exec and port-forward client, for husk's own tests and
//! benchmarks: the
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

/// Connects to `url` and upgrades to SPDY with `protocol`.
async fn upgrade(
    url: &str,
    protocol: &str,
) -> Result<
    (
        tokio::io::ReadHalf<TcpStream>,
        tokio::io::WriteHalf<TcpStream>,
    ),
    ClientError,
> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Protocol(format!("not an http URL: {url}")))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut tcp = TcpStream::connect(host).await?;
    tcp.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
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
    Ok(tokio::io::split(r.into_inner()))
}

fn syn(
    codec: &mut HeaderCodec,
    id: u32,
    headers: &[(&str, &str)],
    out: &mut Vec<u8>,
) -> Result<(), ClientError> {
    let block = codec
        .encode(headers)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    Frame::Control(ControlFrame::SynStream {
        stream_id: id,
        associated_to: 0,
        priority: 0,
        flags: 0,
        header_block: block.into(),
    })
    .encode(out);
    Ok(())
}

fn data_frames(id: u32, data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(32 * 1024) {
        Frame::Data {
            stream_id: id,
            flags: 0,
            data: Bytes::copy_from_slice(chunk),
        }
        .encode(out);
    }
    Frame::Data {
        stream_id: id,
        flags: FLAG_FIN,
        data: Bytes::new(),
    }
    .encode(out);
}

/// Forwards one connection to `port` through the port-forward session
/// behind `url`: sends `data`, closes its side, and returns what came back
/// on the data stream and the error stream.
pub async fn port_forward(
    url: &str,
    port: u16,
    data: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), ClientError> {
    let (rd, mut wr) = upgrade(url, "portforward.k8s.io").await?;
    let mut frames = FrameReader::new(rd, 1 << 24);
    let mut codec = HeaderCodec::new();
    let port = port.to_string();
    let mut out = Vec::new();
    syn(
        &mut codec,
        1,
        &[("streamtype", "error"), ("port", &port), ("requestid", "0")],
        &mut out,
    )?;
    syn(
        &mut codec,
        3,
        &[("streamtype", "data"), ("port", &port), ("requestid", "0")],
        &mut out,
    )?;
    wr.write_all(&out).await?;
    // Sent from a task: the server may answer before all of it is read.
    let data = data.to_vec();
    let sender = tokio::spawn(async move {
        let mut out = Vec::new();
        data_frames(3, &data, &mut out);
        let _ = wr.write_all(&out).await;
        wr
    });
    let (mut back, mut error) = (Vec::new(), Vec::new());
    let (mut data_done, mut error_done) = (false, false);
    while !(data_done && error_done) {
        let frame = frames
            .next()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        match frame {
            None => break,
            Some(Frame::Data {
                stream_id,
                data,
                flags,
            }) => {
                let fin = flags & FLAG_FIN != 0;
                match stream_id {
                    1 => {
                        error.extend_from_slice(&data);
                        error_done |= fin;
                    }
                    3 => {
                        back.extend_from_slice(&data);
                        data_done |= fin;
                    }
                    _ => {}
                }
            }
            Some(Frame::Control(ControlFrame::SynReply { header_block, .. })) => {
                codec
                    .decode(&header_block)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
            }
            Some(Frame::Control(ControlFrame::RstStream { stream_id, .. })) => {
                return Err(ClientError::Protocol(format!("stream {stream_id} reset")));
            }
            Some(_) => {}
        }
    }
    drop(sender.await);
    Ok((back, error))
}

/// Runs the exec session behind `url` (`http://host:port/exec/TOKEN`) over
/// SPDY with `v4.channel.k8s.io`, stdin and stdout (and stderr unless
/// `tty`).
pub async fn exec(url: &str, stdin: Option<&[u8]>, tty: bool) -> Result<ExecOutput, ClientError> {
    let (rd, mut wr) = upgrade(url, "v4.channel.k8s.io").await?;
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
        syn(&mut codec, *id, &[("streamtype", kind)], &mut out)?;
    }
    if let Some(data) = stdin {
        data_frames(5, data, &mut out);
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

/// Runs the exec session behind `url` over WebSocket with
/// `v5.channel.k8s.io`: sends all of `stdin` and closes it with the v5
/// signal, collects stdout, stderr and the status until the server closes.
pub async fn exec_websocket(url: &str, stdin: Option<&[u8]>) -> Result<ExecOutput, ClientError> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let ws_url = url
        .strip_prefix("http://")
        .map(|rest| format!("ws://{rest}"))
        .ok_or_else(|| ClientError::Protocol(format!("not an http URL: {url}")))?;
    let host = ws_url["ws://".len()..]
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    req.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static("v5.channel.k8s.io"),
    );
    let tcp = TcpStream::connect(host).await?;
    let (ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .map_err(|e| ClientError::Refused(e.to_string()))?;
    let (mut sink, mut stream) = ws.split();
    let stdin = stdin.map(<[u8]>::to_vec);
    let sender = tokio::spawn(async move {
        if let Some(data) = stdin {
            for chunk in data.chunks(32 * 1024) {
                let mut m = vec![0u8];
                m.extend_from_slice(chunk);
                sink.send(Message::Binary(m.into())).await?;
            }
            sink.send(Message::Binary(vec![255u8, 0].into())).await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(sink)
    });
    let mut result = ExecOutput::default();
    while let Some(msg) = stream.next().await {
        match msg.map_err(|e| ClientError::Protocol(e.to_string()))? {
            Message::Binary(b) if !b.is_empty() => match b[0] {
                1 => result.stdout.extend_from_slice(&b[1..]),
                2 => result.stderr.extend_from_slice(&b[1..]),
                3 => result.status.extend_from_slice(&b[1..]),
                _ => {}
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
    drop(sender.await);
    Ok(result)
}
