//! The WebSocket transport (RFC 6455, through tungstenite): exec and
//! attach with kubelet's channel protocols (`v5.channel.k8s.io`,
//! `v4.channel.k8s.io`, `v4.base64.channel.k8s.io` and the older
//! unversioned ones), port-forward with kubelet's WebSocket protocol
//! (ports in the query, two channels per port) and with SPDY tunnelled
//! through WebSocket (`SPDY/3.1+portforward.k8s.io`, KEP-4006, what
//! client-go's and crictl's WebSocket port-forward speak).

use http::{header, HeaderMap};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

mod channels;
mod portforward;
mod remotecommand;
mod tunnel;

pub use channels::{Codec, Framing};
pub use portforward::serve as serve_port_forward;
pub use remotecommand::serve as serve_remote_command;
pub use tunnel::serve as serve_tunnel;

/// client-go's SPDY-over-WebSocket port-forward.
pub const TUNNEL_PORTFORWARD: &str = "SPDY/3.1+portforward.k8s.io";

/// A negotiated channel protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channels {
    /// As answered in `Sec-WebSocket-Protocol` ("" when the client named
    /// none).
    pub name: &'static str,
    pub framing: Framing,
    /// The outcome is a `metav1.Status` (v4 and later), not plain text.
    pub structured_status: bool,
}

const fn channels(name: &'static str, codec: Codec, v5: bool, v4: bool) -> Channels {
    Channels {
        name,
        framing: Framing {
            codec,
            stream_close: v5,
        },
        structured_status: v4,
    }
}

/// Exec and attach, as kubelet serves them.
const REMOTE_COMMAND: [Channels; 5] = [
    channels("v5.channel.k8s.io", Codec::Binary, true, true),
    channels("v4.channel.k8s.io", Codec::Binary, false, true),
    channels("v4.base64.channel.k8s.io", Codec::Base64, false, true),
    channels("channel.k8s.io", Codec::Binary, false, false),
    channels("base64.channel.k8s.io", Codec::Base64, false, false),
];

/// Port-forward with ports in the query, as kubelet serves it.
const PORT_FORWARD: [Channels; 2] = [
    channels("v4.channel.k8s.io", Codec::Binary, false, false),
    channels("v4.base64.channel.k8s.io", Codec::Base64, false, false),
];

/// Bounds on what one client's messages can make the server hold.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Whether the request asks for a WebSocket upgrade.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    header_tokens(headers, header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"))
}

/// The `Sec-WebSocket-Accept` answer to a well-formed version 13
/// handshake.
pub fn accept_key(headers: &HeaderMap) -> Result<String, &'static str> {
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err("WebSocket version 13 is required (Sec-WebSocket-Version: 13)");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("Sec-WebSocket-Key is missing")?;
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// The client's `Sec-WebSocket-Protocol` values, in its order.
pub fn offered(headers: &HeaderMap) -> Vec<String> {
    header_tokens(headers, header::SEC_WEBSOCKET_PROTOCOL)
        .map(str::to_string)
        .collect()
}

/// The exec/attach protocol to answer: the client's first that husk
/// speaks; the unversioned binary one if it named none.
pub fn negotiate_remote_command(offered: &[String]) -> Option<Channels> {
    negotiate(&REMOTE_COMMAND, offered)
}

/// What a WebSocket port-forward speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortForwardProtocol {
    Tunnel,
    Channels(Channels),
}

pub fn negotiate_port_forward(offered: &[String]) -> Option<PortForwardProtocol> {
    for o in offered {
        if o == TUNNEL_PORTFORWARD {
            return Some(PortForwardProtocol::Tunnel);
        }
        if let Some(c) = PORT_FORWARD.iter().find(|c| c.name == o) {
            return Some(PortForwardProtocol::Channels(*c));
        }
    }
    negotiate(&PORT_FORWARD, offered).map(PortForwardProtocol::Channels)
}

fn negotiate(supported: &[Channels], offered: &[String]) -> Option<Channels> {
    if offered.is_empty() {
        return Some(channels("", Codec::Binary, false, false));
    }
    offered
        .iter()
        .find_map(|o| supported.iter().find(|c| c.name == o).copied())
}

fn header_tokens(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The ports of a WebSocket port-forward, from its query
/// (`?port=80&port=8080`): at least one, each in 1..=65535, each allowed by
/// the request (`allowed` empty: any).
pub fn query_ports(query: Option<&str>, allowed: &[u16]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        let Some(v) = pair.strip_prefix("port=") else {
            continue;
        };
        let port = v
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("query parameter \"port\": {v:?} is not a port"))?;
        if !allowed.is_empty() && !allowed.contains(&port) {
            return Err(format!("port {port} is not in the request's ports"));
        }
        ports.push(port);
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    // Two channels per port, numbered in one byte.
    if ports.len() > 127 {
        return Err("at most 127 ports per session".into());
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn negotiation() {
        let p = negotiate_remote_command(&o(&["v5.channel.k8s.io"])).unwrap();
        assert!(p.framing.stream_close && p.structured_status);
        let p = negotiate_remote_command(&o(&["nope", "v4.base64.channel.k8s.io"])).unwrap();
        assert_eq!(p.framing.codec, Codec::Base64);
        assert!(p.structured_status && !p.framing.stream_close);
        let p = negotiate_remote_command(&o(&["base64.channel.k8s.io"])).unwrap();
        assert!(!p.structured_status);
        assert_eq!(negotiate_remote_command(&[]).unwrap().name, "");
        assert!(negotiate_remote_command(&o(&["v6.channel.k8s.io"])).is_none());
        assert_eq!(
            negotiate_port_forward(&o(&[TUNNEL_PORTFORWARD])),
            Some(PortForwardProtocol::Tunnel)
        );
        assert!(matches!(
            negotiate_port_forward(&o(&["v4.channel.k8s.io"])),
            Some(PortForwardProtocol::Channels(_))
        ));
        assert!(negotiate_port_forward(&o(&["v5.channel.k8s.io"])).is_none());
    }

    #[test]
    fn ports_from_the_query() {
        assert_eq!(
            query_ports(Some("port=80&port=8080"), &[]),
            Ok(vec![80, 8080])
        );
        assert_eq!(query_ports(Some("x=1&port=80"), &[80]), Ok(vec![80]));
        assert!(query_ports(Some("port=81"), &[80]).is_err());
        assert!(query_ports(Some("port=0"), &[]).is_err());
        assert!(query_ports(Some("port=70000"), &[]).is_err());
        assert!(query_ports(Some("port=http"), &[]).is_err());
        assert!(query_ports(None, &[]).is_err());
        let many = vec!["port=1"; 128].join("&");
        assert!(query_ports(Some(&many), &[]).is_err());
    }

    #[test]
    fn handshake_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, "WebSocket".parse().unwrap());
        assert!(is_upgrade(&h));
        assert!(accept_key(&h).is_err());
        h.insert(header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        // RFC 6455's example.
        assert_eq!(accept_key(&h).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            "v5.channel.k8s.io, v4.channel.k8s.io".parse().unwrap(),
        );
        assert_eq!(offered(&h), o(&["v5.channel.k8s.io", "v4.channel.k8s.io"]));
    }
}
