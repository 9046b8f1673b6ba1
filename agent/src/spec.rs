//! Validation of what the host sends and the rewriting of OCI documents
//! before they reach libcontainer. Pure functions, unit tested.

use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::{LinuxResources, Process, Spec};

use crate::error::AgentError;

/// Largest OCI document the agent accepts (the ttrpc frame limit is 4 MiB
/// anyway; this keeps a hostile spec from being parsed at all).
const MAX_JSON: usize = 1 << 20;

/// Container and exec ids become path components (bundle dir, cgroup dir,
/// libcontainer state dir); the host checks them by the same rule.
pub fn validate_id(field: &str, id: &str) -> Result<(), AgentError> {
    husk_proto::ids::validate(id)
        .map_err(|e| AgentError::InvalidArgument(format!("{field}: {id:?} {e}")))
}

/// RFC 1123 host name as the kernel accepts it (at most 64 bytes).
pub fn validate_hostname(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "hostname: {name:?} is not a valid host name"
        )))
    }
}

/// virtio-fs tags are at most 36 bytes and must not contain NUL.
pub fn validate_share_tag(tag: &str) -> Result<(), AgentError> {
    if tag.is_empty() || tag.len() > 36 || tag.contains('\0') {
        return Err(AgentError::InvalidArgument(format!(
            "share_tag: {tag:?} must be 1 to 36 bytes without NUL"
        )));
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(field: &str, json: &[u8]) -> Result<T, AgentError> {
    if json.len() > MAX_JSON {
        return Err(AgentError::InvalidArgument(format!(
            "{field}: larger than {MAX_JSON} bytes"
        )));
    }
    serde_json::from_slice(json).map_err(|e| AgentError::InvalidArgument(format!("{field}: {e}")))
}

/// Parses the host's OCI spec and rewrites the parts the agent owns:
/// the cgroup path (always `<cgroup_parent>/<id>`, so stats, update and
/// removal know where it is) and `process.terminal` (it must agree with the
/// stdio the host asked for, or libcontainer would want a console socket we
/// did not set up). The root must be an absolute guest path because the
/// bundle directory is guest-local and holds nothing but config.json.
pub fn prepare_spec(
    id: &str,
    json: &[u8],
    terminal: bool,
    cgroup_parent: &Path,
) -> Result<Spec, AgentError> {
    let mut spec: Spec = parse_json("oci_spec_json", json)?;
    if !spec.version().starts_with("1.") {
        return Err(AgentError::InvalidArgument(format!(
            "oci_spec_json.ociVersion: {:?} is not 1.x",
            spec.version()
        )));
    }
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| AgentError::InvalidArgument("oci_spec_json.root: missing".into()))?;
    if !root.path().is_absolute() {
        return Err(AgentError::InvalidArgument(format!(
            "oci_spec_json.root.path: {:?} is not an absolute guest path",
            root.path()
        )));
    }
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| AgentError::InvalidArgument("oci_spec_json.process: missing".into()))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::InvalidArgument(
            "oci_spec_json.process.args: empty".into(),
        ));
    }
    process.set_terminal(Some(terminal));
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| AgentError::InvalidArgument("oci_spec_json.linux: missing".into()))?;
    linux.set_cgroups_path(Some(cgroup_path(cgroup_parent, id)));
    Ok(spec)
}

/// Parses an exec's OCI Process and forces `terminal` to match the stdio
/// request, for the same reason as in [`prepare_spec`].
pub fn prepare_process(json: &[u8], terminal: bool) -> Result<Process, AgentError> {
    let mut process: Process = parse_json("process_json", json)?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::InvalidArgument(
            "process_json.args: empty".into(),
        ));
    }
    if !process.cwd().is_absolute() {
        return Err(AgentError::InvalidArgument(format!(
            "process_json.cwd: {:?} is not absolute",
            process.cwd()
        )));
    }
    process.set_terminal(Some(terminal));
    Ok(process)
}

/// Lowers each rlimit of `process` to this process's own hard limit (see
/// `Config::clamp_rlimits`).
pub fn clamp_rlimits(process: &mut Process) {
    use libcontainer::oci_spec::runtime::{PosixRlimitBuilder, PosixRlimitType as T};
    let Some(mut limits) = process.rlimits().clone() else {
        return;
    };
    for l in limits.iter_mut() {
        let res = match l.typ() {
            T::RlimitCpu => libc::RLIMIT_CPU,
            T::RlimitFsize => libc::RLIMIT_FSIZE,
            T::RlimitData => libc::RLIMIT_DATA,
            T::RlimitStack => libc::RLIMIT_STACK,
            T::RlimitCore => libc::RLIMIT_CORE,
            T::RlimitRss => libc::RLIMIT_RSS,
            T::RlimitNproc => libc::RLIMIT_NPROC,
            T::RlimitNofile => libc::RLIMIT_NOFILE,
            T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
            T::RlimitAs => libc::RLIMIT_AS,
            T::RlimitLocks => libc::RLIMIT_LOCKS,
            T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
            T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
            T::RlimitNice => libc::RLIMIT_NICE,
            T::RlimitRtprio => libc::RLIMIT_RTPRIO,
            T::RlimitRttime => libc::RLIMIT_RTTIME,
        };
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct we own.
        if unsafe { libc::getrlimit(res, &mut cur) } != 0 {
            continue;
        }
        let hard = l.hard().min(cur.rlim_max);
        if let Ok(clamped) = PosixRlimitBuilder::default()
            .typ(l.typ())
            .hard(hard)
            .soft(l.soft().min(hard))
            .build()
        {
            *l = clamped;
        }
    }
    process.set_rlimits(Some(limits));
}

pub fn parse_resources(json: &[u8]) -> Result<LinuxResources, AgentError> {
    parse_json("resources_json", json)
}

/// The cgroup path as the OCI spec names it (absolute from the hierarchy's
/// root).
pub fn cgroup_path(parent: &Path, id: &str) -> PathBuf {
    Path::new("/").join(parent).join(id)
}

/// Maps a wait status to the exit code WaitProcess reports: the exit status,
/// or 128 + signal number for a process killed by a signal (shell
/// convention, what CRI clients expect).
pub fn exit_code(status: nix::sys::wait::WaitStatus) -> Option<i32> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Signal numbers the host may send: 1..=64 (standard and real-time).
pub fn validate_signal(sig: i32) -> Result<i32, AgentError> {
    if (1..=64).contains(&sig) {
        Ok(sig)
    } else {
        Err(AgentError::InvalidArgument(format!(
            "signal: {sig} is not in 1..=64"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;
    use nix::unistd::Pid;

    #[test]
    fn ids() {
        for ok in ["a", "A0", "abc-def_1.2", "0", &"x".repeat(64)] {
            validate_id("id", ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".",
            "..",
            "_a",
            "a/b",
            "a b",
            "a\0",
            "ä",
            &"x".repeat(65),
            "../x",
        ] {
            let err = validate_id("container_id", bad).unwrap_err();
            match err {
                AgentError::InvalidArgument(m) => assert!(m.starts_with("container_id:"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn hostnames_and_tags() {
        validate_hostname("pod-1.example").unwrap();
        assert!(validate_hostname("").is_err());
        assert!(validate_hostname("-x").is_err());
        assert!(validate_hostname("a..b").is_err());
        assert!(validate_hostname(&"a".repeat(65)).is_err());
        validate_share_tag("husk").unwrap();
        assert!(validate_share_tag("").is_err());
        assert!(validate_share_tag(&"t".repeat(37)).is_err());
    }

    #[test]
    fn exit_codes() {
        let pid = Pid::from_raw(10);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 0)), Some(0));
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(exit_code(WaitStatus::Stopped(pid, Signal::SIGSTOP)), None);
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[test]
    fn signals() {
        assert_eq!(validate_signal(9).unwrap(), 9);
        assert_eq!(validate_signal(64).unwrap(), 64);
        assert!(validate_signal(0).is_err());
        assert!(validate_signal(65).is_err());
        assert!(validate_signal(-9).is_err());
    }

    fn base_spec() -> serde_json::Value {
        let mut spec = serde_json::to_value(Spec::default()).unwrap();
        spec["root"]["path"] = "/run/husk/sandbox/c1/rootfs".into();
        spec
    }

    #[test]
    fn spec_rewrite() {
        let mut json = base_spec();
        json["linux"]["cgroupsPath"] = "/evil/../../x".into();
        json["process"]["terminal"] = true.into();
        let spec =
            prepare_spec("c1", json.to_string().as_bytes(), false, Path::new("husk")).unwrap();
        assert_eq!(
            spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(Path::new("/husk/c1"))
        );
        assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(false));
        let spec =
            prepare_spec("c1", json.to_string().as_bytes(), true, Path::new("husk")).unwrap();
        assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(true));
    }

    fn invalid_field(r: Result<Spec, AgentError>) -> String {
        match r {
            Err(AgentError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn spec_rejects() {
        let p = Path::new("husk");
        assert!(invalid_field(prepare_spec("c", b"{", false, p)).starts_with("oci_spec_json:"));
        assert!(invalid_field(prepare_spec("c", b"[]", false, p)).starts_with("oci_spec_json"));
        let mut json = base_spec();
        json["root"]["path"] = "rootfs".into();
        assert!(
            invalid_field(prepare_spec("c", json.to_string().as_bytes(), false, p))
                .starts_with("oci_spec_json.root.path")
        );
        let mut json = base_spec();
        json["ociVersion"] = "0.9".into();
        assert!(
            invalid_field(prepare_spec("c", json.to_string().as_bytes(), false, p))
                .starts_with("oci_spec_json.ociVersion")
        );
        let mut json = base_spec();
        json["process"]["args"] = serde_json::json!([]);
        assert!(
            invalid_field(prepare_spec("c", json.to_string().as_bytes(), false, p))
                .starts_with("oci_spec_json.process.args")
        );
        let mut json = base_spec();
        json.as_object_mut().unwrap().remove("linux");
        assert!(
            invalid_field(prepare_spec("c", json.to_string().as_bytes(), false, p))
                .starts_with("oci_spec_json.linux")
        );
        let big = vec![b' '; MAX_JSON + 1];
        assert!(invalid_field(prepare_spec("c", &big, false, p)).contains("larger"));
    }

    #[test]
    fn process_rewrite() {
        let json = serde_json::json!({"args": ["sh"], "cwd": "/", "terminal": false, "user": {"uid": 0, "gid": 0}});
        let p = prepare_process(json.to_string().as_bytes(), true).unwrap();
        assert_eq!(p.terminal(), Some(true));
        let json = serde_json::json!({"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}});
        assert!(prepare_process(json.to_string().as_bytes(), false).is_err());
        let json = serde_json::json!({"args": ["sh"], "cwd": "rel", "user": {"uid": 0, "gid": 0}});
        assert!(prepare_process(json.to_string().as_bytes(), false).is_err());
        assert!(prepare_process(b"nope", false).is_err());
    }

    #[test]
    fn resources() {
        let r = parse_resources(br#"{"memory":{"limit":1048576},"cpu":{"shares":512}}"#).unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(1048576));
        assert!(parse_resources(b"{\"memory\":5}").is_err());
    }
}
