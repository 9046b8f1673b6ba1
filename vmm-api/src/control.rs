//! The control socket's protocol: one JSON object a line each way on a unix stream socket.
//!
//! Requests: `{"op":"status"}`, `{"op":"shutdown"}`, `{"op":"pause"}`, `{"op":"resume"}`.
//! Each gets one line back: `{"ok":true}`, `{"ok":true,"status":{..}}` for `status`, or
//! `{"ok":false,"error":".."}`.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Shutdown,
    Pause,
    Resume,
}

impl Request {
    /// The request as sent: one JSON object and the newline that ends it.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("a unit variant always serializes");
        s.push('\n');
        s
    }

    /// The `op` value, for messages about this request.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Shutdown => "shutdown",
            Request::Pause => "pause",
            Request::Resume => "resume",
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op())
    }
}

/// Where the VM is in its life, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Created,
    Running,
    Paused,
    Stopped,
}

/// What `status` reports.
///
/// Unknown fields are accepted (unlike the config): a newer husk-vmm may report more, and an
/// older huskd that adopts it must still read the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub id: String,
    pub pid: u32,
    pub state: VmState,
    /// Free text for people: which acceleration the VM runs on.
    pub accel: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub uptime_ms: u64,
}

/// The one line husk-vmm answers each request with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// Why the request failed; only with `ok: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Only in the reply to `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            error: None,
            status: None,
        }
    }

    pub fn status(status: Status) -> Reply {
        Reply {
            status: Some(status),
            ..Reply::ok()
        }
    }

    pub fn error(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(error.into()),
            status: None,
        }
    }
}

/// The reply as it went over the wire, for logs and error messages.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ALL: [Request; 4] = [
        Request::Status,
        Request::Shutdown,
        Request::Pause,
        Request::Resume,
    ];

    #[test]
    fn requests_are_one_op_object_a_line() {
        assert_eq!(Request::Status.line(), "{\"op\":\"status\"}\n");
        for r in ALL {
            assert_eq!(r.line(), format!("{{\"op\":\"{}\"}}\n", r.op()));
            assert_eq!(serde_json::from_str::<Request>(r.line().trim()).unwrap(), r);
            assert_eq!(r.to_string(), r.op());
        }
    }

    #[test]
    fn unknown_or_malformed_requests_are_rejected() {
        for line in [
            r#"{"op":"explode"}"#,
            r#"{"op":"Status"}"#,
            r#"{"op":1}"#,
            r#"{"cmd":"status"}"#,
            r#"{}"#,
            r#""status""#,
            r#"{"op":"status""#,
            "",
        ] {
            assert!(serde_json::from_str::<Request>(line).is_err(), "{line}");
        }
        // husk-vmm has always ignored other members beside `op`.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"status","x":1}"#).unwrap(),
            Request::Status
        );
    }

    fn status() -> Status {
        Status {
            id: "sb1".into(),
            pid: 4242,
            state: VmState::Running,
            accel: "kvm (hardware virtualization)".into(),
            vcpus: 2,
            memory_mib: 256,
            uptime_ms: 1500,
        }
    }

    #[test]
    fn replies_serialize_as_before() {
        assert_eq!(
            serde_json::to_string(&Reply::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::error("request too long")).unwrap(),
            r#"{"ok":false,"error":"request too long"}"#
        );
        assert_eq!(
            serde_json::to_value(Reply::status(status())).unwrap(),
            json!({"ok": true, "status": {
                "id": "sb1", "pid": 4242, "state": "running",
                "accel": "kvm (hardware virtualization)",
                "vcpus": 2, "memory_mib": 256, "uptime_ms": 1500,
            }})
        );
        assert_eq!(Reply::ok().to_string(), r#"{"ok":true}"#);
    }

    #[test]
    fn replies_round_trip() {
        for r in [Reply::ok(), Reply::error("no"), Reply::status(status())] {
            let text = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), r);
        }
        for s in [
            VmState::Created,
            VmState::Running,
            VmState::Paused,
            VmState::Stopped,
        ] {
            let text = serde_json::to_string(&s).unwrap();
            assert_eq!(text, format!("\"{}\"", format!("{s:?}").to_lowercase()));
            assert_eq!(serde_json::from_str::<VmState>(&text).unwrap(), s);
        }
    }

    #[test]
    fn replies_tolerate_fields_a_newer_vmm_may_add() {
        let r: Reply = serde_json::from_value(json!({
            "ok": true, "took_ms": 3,
            "status": {
                "id": "sb1", "pid": 4242, "state": "paused", "accel": "x",
                "vcpus": 1, "memory_mib": 64, "uptime_ms": 0, "balloon_mib": 0,
            },
        }))
        .unwrap();
        assert_eq!(r.status.unwrap().state, VmState::Paused);
    }

    #[test]
    fn malformed_replies_are_rejected() {
        for v in [
            json!({}),
            json!({"ok": "true"}),
            json!({"ok": true, "status": {"id": "sb1"}}),
            json!({"ok": true, "status": {
                "id": "sb1", "pid": 1, "state": "exploded", "accel": "x",
                "vcpus": 1, "memory_mib": 64, "uptime_ms": 0,
            }}),
        ] {
            assert!(serde_json::from_value::<Reply>(v.clone()).is_err(), "{v}");
        }
    }
}
