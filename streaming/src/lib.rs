//! husk's CRI streaming server: what `Exec`, `Attach` and `PortForward`
//! hand to kubelet is a URL of this server, and kubectl, crictl or the API
//! server's proxy then speak SPDY/3.1 or WebSocket to it.

pub mod spdy;
