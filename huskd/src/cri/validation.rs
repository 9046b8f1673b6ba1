//! Checks of CRI request fields. Every error is `InvalidArgument` and names
//! the field as it is spelled in the CRI API.

use std::path::{Component, Path, PathBuf};

use tonic::Status;

/// A sandbox/container id or id prefix (crictl users may pass a prefix of
/// our 64-hex-digit ids), by the rule of [`husk_proto::ids`].
pub fn id<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    use husk_proto::ids::{self, IdError};
    match ids::validate(value) {
        Ok(()) => Ok(value),
        Err(e @ (IdError::Empty | IdError::TooLong)) => {
            Err(Status::invalid_argument(format!("{field} {e}")))
        }
        Err(e) => Err(Status::invalid_argument(format!(
            "{field} {:?} is malformed: {e}",
            printable(value)
        ))),
    }
}

/// A metadata name (pod or container name): non-empty, no control
/// characters, no '/' (it ends up in log paths and hostnames).
pub fn name(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is empty")));
    }
    if value.len() > 253 || value.contains('/') || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{field} {:?} is malformed: at most 253 characters, no '/' or control characters",
            printable(value)
        )));
    }
    Ok(())
}

/// The pod's `log_directory`: empty (no logs) or an absolute path without
/// `..`.
pub fn log_directory(value: &str) -> Result<Option<PathBuf>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    let p = Path::new(value);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(Status::invalid_argument(format!(
            "config.log_directory {:?} must be an absolute path without '..'",
            printable(value)
        )));
    }
    Ok(Some(p.to_path_buf()))
}

/// A container's `log_path`, relative to the pod's log directory; it must
/// stay inside it. Returns the absolute path (`None` without logs).
pub fn log_path(pod_log_dir: Option<&Path>, value: &str) -> Result<Option<PathBuf>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    let Some(dir) = pod_log_dir else {
        return Err(Status::invalid_argument(format!(
            "config.log_path {:?} is set but the pod has no log_directory",
            printable(value)
        )));
    };
    let p = Path::new(value);
    let inside = !p.is_absolute()
        && !value.ends_with('/')
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && p.file_name().is_some();
    if !inside {
        return Err(Status::invalid_argument(format!(
            "config.log_path {:?} is outside the pod's log directory {}",
            printable(value),
            dir.display()
        )));
    }
    Ok(Some(dir.join(p)))
}

/// Quotes caller text in messages without letting it span lines.
pub fn printable(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Bytes of kernel command line the pod's sysctls may take (x86's whole
/// command line is 2048 bytes).
const MAX_SYSCTL_CMDLINE: usize = 1024;

/// The pod's sysctls (`config.linux.sysctls`) as guest kernel parameters
/// `sysctl.KEY=VALUE`, which the kernel applies at boot (Linux 5.8+). The
/// pod's containers share the VM's IPC, UTS and network namespaces, so the
/// boot-time values are the pod's; an OCI `linux.sysctl` would not do, as
/// an OCI runtime refuses IPC and network sysctls without a private
/// namespace. Keys are `[A-Za-z0-9_./-]`; values are printable ASCII
/// without spaces or '"' (kernel parameters must not hold whitespace, see
/// `VmConfig::validate`), so multi-value sysctls like `kernel.sem` are
/// refused.
pub fn sysctl_kernel_params(
    sysctls: &std::collections::HashMap<String, String>,
) -> Result<Vec<String>, Status> {
    let mut keys: Vec<&String> = sysctls.keys().collect();
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    let mut total = 0;
    for k in keys {
        let v = &sysctls[k];
        let bad = |why: &str| {
            Status::invalid_argument(format!("config.linux.sysctls[{:?}]: {why}", printable(k)))
        };
        if k.is_empty()
            || k.starts_with(['.', '/'])
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-'))
        {
            return Err(bad("malformed name"));
        }
        if v.is_empty() || !v.bytes().all(|b| (b'!'..=b'~').contains(&b) && b != b'"') {
            return Err(bad(
                "the value must be printable ASCII without spaces or '\"' (it becomes a guest kernel parameter)",
            ));
        }
        let p = format!("sysctl.{k}={v}");
        total += p.len() + 1;
        if total > MAX_SYSCTL_CMDLINE {
            return Err(Status::invalid_argument(format!(
                "config.linux.sysctls: more than {MAX_SYSCTL_CMDLINE} bytes"
            )));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_as_kernel_params() {
        let m = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        };
        assert_eq!(
            sysctl_kernel_params(&m(&[
                ("kernel.shm_rmid_forced", "1"),
                ("fs.mqueue.msg_max", "100"),
            ]))
            .unwrap(),
            vec![
                "sysctl.fs.mqueue.msg_max=100",
                "sysctl.kernel.shm_rmid_forced=1"
            ]
        );
        for (k, v) in [
            ("a b", "1"),
            ("kernel.sem", "250 32000 32 128"),
            ("k", "x\" init=/bin/sh"),
            ("k", ""),
            ("k", "1\n"),
            (".k", "1"),
        ] {
            let e = sysctl_kernel_params(&m(&[(k, v)])).unwrap_err();
            assert!(e.message().contains("config.linux.sysctls"), "{k:?}={v:?}");
        }
        let many: Vec<(String, String)> =
            (0..200).map(|i| (format!("k.k{i}"), "1".into())).collect();
        assert!(sysctl_kernel_params(&many.into_iter().collect()).is_err());
    }
    use tonic::Code;

    #[test]
    fn ids() {
        assert!(id("pod_sandbox_id", "0123abcd").is_ok());
        let e = id("pod_sandbox_id", "").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(e.message(), "pod_sandbox_id is empty");
        for bad in ["../etc", "a/b", ".hidden", "a b", "x\n"] {
            let e = id("container_id", bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().starts_with("container_id "), "{}", e.message());
            assert!(!e.message().contains('\n'));
        }
        assert!(id("x", &"a".repeat(65)).is_err());
    }

    #[test]
    fn log_paths() {
        let dir = Path::new("/var/log/pods/ns_p_uid");
        assert_eq!(
            log_path(Some(dir), "c/0.log").unwrap().unwrap(),
            dir.join("c/0.log")
        );
        assert_eq!(log_path(Some(dir), "").unwrap(), None);
        for bad in ["../x.log", "/etc/passwd", "c/../../x", "c/", "."] {
            let e = log_path(Some(dir), bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
            assert!(e.message().contains("config.log_path"), "{}", e.message());
        }
        assert!(log_path(None, "c/0.log")
            .unwrap_err()
            .message()
            .contains("no log_directory"));
        assert!(log_directory("rel").is_err());
        assert!(log_directory("/a/../b").is_err());
        assert_eq!(log_directory("").unwrap(), None);
    }

    #[test]
    fn names() {
        assert!(name("config.metadata.name", "nginx").is_ok());
        assert!(name("config.metadata.name", "")
            .unwrap_err()
            .message()
            .contains("config.metadata.name"));
        assert!(name("config.metadata.name", "a/b").is_err());
    }
}
