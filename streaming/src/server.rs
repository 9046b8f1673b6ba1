//! The HTTP side: a listener, `/exec/{token}`, `/attach/{token}` and
//! `/portforward/{token}`, the protocol handshake and the upgrade.
//!
//! Nothing else is served: an unknown path, a used, unknown or expired
//! token all get 404, so the server tells a scanner nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::portforward;
use crate::remotecommand;
use crate::spdy;
use crate::tokens::RequestCache;
use crate::websocket;
use crate::{AttachRequest, ExecRequest, PortForwardRequest, RequestError, Runtime};

/// What kubelet's streaming library and containerd use.
const TOKEN_TTL: Duration = Duration::from_secs(60);
const MAX_PENDING: usize = 1000;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen; port 0 picks a free one (containerd's default).
    pub addr: SocketAddr,
    /// How long a client has to open its streams after the upgrade.
    pub stream_creation_timeout: Duration,
    /// Serve HTTPS with this certificate chain and key (PEM files);
    /// plain HTTP when `None`.
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stream_creation_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

enum Cached {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

struct Shared {
    cache: RequestCache<Cached>,
    runtime: Arc<dyn Runtime>,
    config: ServerConfig,
}

/// A running streaming server. Dropping it stops accepting connections;
/// sessions in progress run to their end.
pub struct Server {
    shared: Arc<Shared>,
    base_url: String,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Server {
    pub async fn start(config: ServerConfig, runtime: Arc<dyn Runtime>) -> std::io::Result<Server> {
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = TcpListener::bind(config.addr).await?;
        let local = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{local}");
        let shared = Arc::new(Shared {
            cache: RequestCache::new(TOKEN_TTL, MAX_PENDING),
            runtime,
            config,
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%e, "streaming server: accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Some(tls) = tls else {
                        return serve_http(tcp, peer, s).await;
                    };
                    // A client that never finishes its handshake holds a
                    // task, not the server.
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_http(stream, peer, s).await,
                        Ok(Err(e)) => tracing::debug!(%peer, %e, "TLS handshake"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tracing::info!(url = %base_url, "streaming server listening");
        Ok(Server {
            shared,
            base_url,
            accept,
        })
    }

    /// `http://host:port` (`https://` with TLS) of the server.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Validates and caches an exec request; the URL to give the client.
    pub fn get_exec(&self, req: ExecRequest) -> Result<String, RequestError> {
        if req.cmd.is_empty() {
            return Err(RequestError::Invalid("cmd is empty".into()));
        }
        check_stdio(req.tty, req.stdin, req.stdout, req.stderr)?;
        let token = self.shared.cache.insert(Cached::Exec(req))?;
        Ok(format!("{}/exec/{token}", self.base_url))
    }
}

impl Server {
    /// Validates and caches an attach request; the URL to give the client.
    pub fn get_attach(&self, req: AttachRequest) -> Result<String, RequestError> {
        check_stdio(req.tty, req.stdin, req.stdout, req.stderr)?;
        let token = self.shared.cache.insert(Cached::Attach(req))?;
        Ok(format!("{}/attach/{token}", self.base_url))
    }

    /// Caches a port-forward request; the URL to give the client.
    pub fn get_port_forward(&self, req: PortForwardRequest) -> Result<String, RequestError> {
        if req.pod_sandbox_id.is_empty() {
            return Err(RequestError::Invalid("pod_sandbox_id is empty".into()));
        }
        let token = self.shared.cache.insert(Cached::PortForward(req))?;
        Ok(format!("{}/portforward/{token}", self.base_url))
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_http<T>(io: T, peer: SocketAddr, s: Arc<Shared>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let s = s.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(s, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, %e, "streaming connection");
    }
}

/// The TLS side of the server, from PEM files; an error names the file.
fn tls_acceptor(files: &TlsFiles) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let invalid = |path: &std::path::Path, e: &dyn std::fmt::Display| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: {e}", path.display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(&files.cert, &e))?;
    if certs.is_empty() {
        return Err(invalid(&files.cert, &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| invalid(&files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| invalid(&files.key, &e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// kubelet's rules for a streaming request's stdio.
fn check_stdio(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<(), RequestError> {
    if !(stdin || stdout || stderr) {
        return Err(RequestError::Invalid(
            "one of stdin, stdout, or stderr must be set".into(),
        ));
    }
    if tty && stderr {
        return Err(RequestError::Invalid(
            "tty and stderr cannot both be true (a terminal has one output)".into(),
        ));
    }
    Ok(())
}

fn reply(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(format!("{msg}\n"))))
        .unwrap_or_default()
}

async fn handle(s: Arc<Shared>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let not_found = || reply(StatusCode::NOT_FOUND, "404 page not found");
    if req.method() != Method::GET && req.method() != Method::POST {
        return not_found();
    }
    let path = req.uri().path().to_string();
    let (kind, token) = match path.split_once('/').map(|(_, rest)| rest.split_once('/')) {
        Some(Some((kind @ ("exec" | "attach" | "portforward"), token))) => (kind, token),
        _ => return not_found(),
    };
    if token.is_empty() || token.contains('/') {
        return not_found();
    }
    let cached = match (kind, s.cache.consume(token)) {
        (_, None) => return not_found(),
        ("exec", Some(c @ Cached::Exec(_)))
        | ("attach", Some(c @ Cached::Attach(_)))
        | ("portforward", Some(c @ Cached::PortForward(_))) => c,
        // A token is good for the call that made it only.
        _ => return not_found(),
    };
    if websocket::is_upgrade(req.headers()) {
        return upgrade_websocket(req, cached, s.runtime.clone());
    }
    if !header_has(&req, header::UPGRADE, "spdy/3.1") {
        return reply(
            StatusCode::BAD_REQUEST,
            "this endpoint speaks SPDY/3.1 or WebSocket (Upgrade: SPDY/3.1 or websocket)",
        );
    }
    let offered = client_protocols(&req);
    let protocol = match &cached {
        Cached::Exec(_) | Cached::Attach(_) => remotecommand::negotiate(&offered),
        Cached::PortForward(_) => offered
            .iter()
            .any(|p| p == portforward::PROTOCOL)
            .then_some(portforward::PROTOCOL),
    };
    let Some(protocol) = protocol else {
        return reply(
            StatusCode::FORBIDDEN,
            &format!("no supported stream protocol among {offered:?}"),
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let timeout = s.config.stream_creation_timeout;
    let runtime = s.runtime.clone();
    tokio::spawn(async move {
        let io = match upgrade.await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(%e, "SPDY upgrade failed");
                return;
            }
        };
        let conn = spdy::Connection::serve(TokioIo::new(io), spdy::Limits::default());
        match cached {
            Cached::Exec(exec) => {
                let session = remotecommand::Session::Exec(exec);
                let span = session_span(&session);
                remotecommand::serve(conn, protocol, session, runtime, timeout)
                    .instrument(span)
                    .await
            }
            Cached::Attach(attach) => {
                let session = remotecommand::Session::Attach(attach);
                let span = session_span(&session);
                remotecommand::serve(conn, protocol, session, runtime, timeout)
                    .instrument(span)
                    .await
            }
            Cached::PortForward(pf) => {
                let span = tracing::info_span!("port_forward", pod = %pf.pod_sandbox_id);
                portforward::serve(conn, pf, runtime).instrument(span).await
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1")
        .header(remotecommand::PROTOCOL_HEADER, protocol)
        .body(Full::new(Bytes::new()))
        .unwrap_or_default()
}

/// What a WebSocket session serves, once its protocol is agreed.
enum WsSession {
    RemoteCommand(websocket::Channels, remotecommand::Session),
    PortForward(websocket::Channels, PortForwardRequest, Vec<u16>),
    Tunnel(PortForwardRequest),
}

fn upgrade_websocket(
    mut req: Request<Incoming>,
    cached: Cached,
    runtime: Arc<dyn Runtime>,
) -> Response<Full<Bytes>> {
    let accept = match websocket::accept_key(req.headers()) {
        Ok(k) => k,
        Err(msg) => return reply(StatusCode::BAD_REQUEST, msg),
    };
    let offered = websocket::offered(req.headers());
    let remote = |session| {
        websocket::negotiate_remote_command(&offered)
            .map(|c| (c.name, WsSession::RemoteCommand(c, session)))
    };
    let agreed = match cached {
        Cached::Exec(r) => remote(remotecommand::Session::Exec(r)),
        Cached::Attach(r) => remote(remotecommand::Session::Attach(r)),
        Cached::PortForward(pf) => match websocket::negotiate_port_forward(&offered) {
            Some(websocket::PortForwardProtocol::Tunnel) => {
                Some((websocket::TUNNEL_PORTFORWARD, WsSession::Tunnel(pf)))
            }
            Some(websocket::PortForwardProtocol::Channels(c)) => {
                match websocket::query_ports(req.uri().query(), &pf.ports) {
                    Ok(ports) => Some((c.name, WsSession::PortForward(c, pf, ports))),
                    Err(msg) => return reply(StatusCode::BAD_REQUEST, &msg),
                }
            }
            None => None,
        },
    };
    let Some((protocol, session)) = agreed else {
        return reply(
            StatusCode::FORBIDDEN,
            &format!("no supported WebSocket protocol among {offered:?}"),
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let io = match upgrade.await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(%e, "WebSocket upgrade failed");
                return;
            }
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(io),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            Some(websocket::config()),
        )
        .await;
        match session {
            WsSession::RemoteCommand(channels, session) => {
                let span = session_span(&session);
                websocket::serve_remote_command(ws, channels, session, runtime)
                    .instrument(span)
                    .await
            }
            WsSession::PortForward(channels, pf, ports) => {
                let span = tracing::info_span!("port_forward", pod = %pf.pod_sandbox_id);
                websocket::serve_port_forward(ws, channels, pf.pod_sandbox_id, ports, runtime)
                    .instrument(span)
                    .await
            }
            WsSession::Tunnel(pf) => {
                let span = tracing::info_span!("port_forward", pod = %pf.pod_sandbox_id);
                websocket::serve_tunnel(ws, pf, runtime)
                    .instrument(span)
                    .await
            }
        }
    });
    let mut res = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if !protocol.is_empty() {
        res = res.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    res.body(Full::new(Bytes::new())).unwrap_or_default()
}

fn session_span(session: &remotecommand::Session) -> tracing::Span {
    match session {
        remotecommand::Session::Exec(r) => {
            tracing::info_span!("stream_exec", container = %r.container_id)
        }
        remotecommand::Session::Attach(r) => {
            tracing::info_span!("attach", container = %r.container_id)
        }
    }
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// The client's `X-Stream-Protocol-Version` values, in its order of
/// preference (several headers, or one comma-separated list).
fn client_protocols(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get_all(remotecommand::PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_rules() {
        assert!(check_stdio(false, false, false, false).is_err());
        assert!(check_stdio(true, true, true, true).is_err());
        assert!(check_stdio(true, true, true, false).is_ok());
        assert!(check_stdio(false, false, true, true).is_ok());
    }
}
