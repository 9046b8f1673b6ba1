//! The container's seccomp filter from its CRI security context, applied by libcontainer in the
//! guest.
//!
//! CRI semantics, as containerd implements them: `seccomp` (a `SecurityProfile`) wins over the
//! deprecated `seccomp_profile_path`; neither means unconfined; privileged containers are
//! unconfined; `Localhost` names a profile file on the node (kubelet resolves it below
//! `/var/lib/kubelet/seccomp`), in the Docker format that kubelet and the seccomp operator
//! write, which is the OCI format plus `archMap` and per-rule `includes`/`excludes`.
//!
//! Masked comparisons: in OCI profiles (runc, Docker, containerd, CRI-O) `SCMP_CMP_MASKED_EQ`
//! means `(arg & value) == valueTwo`. libcontainer 0.7 reads the two the other way round
//! (`valueTwo` as the mask). Profiles here are written and read in the common convention and
//! swapped once, in [`for_libcontainer`], so a profile means in husk what it means elsewhere.

mod runtime_default;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{ContainerConfig, LinuxContainerSecurityContext};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::Status;

use super::validation::printable;

/// The guest is x86_64; its libseccomp filters the 32-bit and x32 entry points too, so that
/// a container cannot step around the filter with `int 0x80`.
const NATIVE_ARCHES: &[&str] = &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"];
/// Profiles on the node are small; this bounds what a mistaken path can make huskd read.
const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// Which filter the container gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Unconfined,
    RuntimeDefault,
    /// An absolute path on the node.
    Localhost(String),
}

/// The CRI fields that name the profile, and the field to blame in errors.
// kubelet still sends `seccomp_profile_path` for old pods; containerd still honours it.
#[allow(deprecated)]
pub fn choice(
    sc: Option<&LinuxContainerSecurityContext>,
) -> Result<(Choice, &'static str), Status> {
    const FIELD: &str = "config.linux.security_context.seccomp";
    const PATH_FIELD: &str = "config.linux.security_context.seccomp_profile_path";
    let Some(sc) = sc else {
        return Ok((Choice::Unconfined, FIELD));
    };
    if sc.privileged {
        return Ok((Choice::Unconfined, FIELD));
    }
    if let Some(p) = &sc.seccomp {
        let c = match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Choice::RuntimeDefault,
            Ok(ProfileType::Unconfined) => Choice::Unconfined,
            Ok(ProfileType::Localhost) => Choice::Localhost(p.localhost_ref.clone()),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "{FIELD}.profile_type: unknown profile type {}",
                    p.profile_type
                )))
            }
        };
        return Ok((c, FIELD));
    }
    let c = match sc.seccomp_profile_path.as_str() {
        "" | "unconfined" => Choice::Unconfined,
        "runtime/default" | "docker/default" => Choice::RuntimeDefault,
        p => match p.strip_prefix("localhost/") {
            Some(path) => Choice::Localhost(path.to_string()),
            None => {
                return Err(Status::invalid_argument(format!(
                    "{PATH_FIELD}: {:?} is none of \"unconfined\", \"runtime/default\", \
                     \"docker/default\" or \"localhost/<path>\"",
                    printable(p)
                )))
            }
        },
    };
    Ok((c, PATH_FIELD))
}

/// The OCI `linux.seccomp` of a container created from `config`, or `None` for unconfined.
pub async fn for_container(config: &ContainerConfig) -> Result<Option<Value>, Status> {
    let caps = super::spec::capabilities(config)?;
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone());
    // A Localhost profile is a file read: not on the async workers.
    tokio::task::spawn_blocking(move || linux_seccomp(sc.as_ref(), &caps))
        .await
        .map_err(|e| Status::internal(format!("seccomp profile task: {e}")))?
}

/// The OCI `linux.seccomp` for a container holding `caps`, or `None` for unconfined. Reads a
/// Localhost profile from the node.
pub fn linux_seccomp(
    sc: Option<&LinuxContainerSecurityContext>,
    caps: &[String],
) -> Result<Option<Value>, Status> {
    let (choice, field) = choice(sc)?;
    let profile = match choice {
        Choice::Unconfined => return Ok(None),
        Choice::RuntimeDefault => runtime_default::profile(caps),
        Choice::Localhost(path) => {
            let text = read_profile(Path::new(&path)).map_err(|why| {
                Status::invalid_argument(format!(
                    "{field}: localhost profile {:?}: {why}",
                    printable(&path)
                ))
            })?;
            from_docker_format(&text, caps).map_err(|why| {
                Status::invalid_argument(format!(
                    "{field}: localhost profile {:?}: {why}",
                    printable(&path)
                ))
            })?
        }
    };
    Ok(Some(for_libcontainer(profile)))
}

/// A regular file of at most [`MAX_PROFILE_BYTES`], never blocking on a FIFO.
fn read_profile(path: &Path) -> Result<String, String> {
    if !path.is_absolute() {
        return Err("not an absolute path".into());
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_PROFILE_BYTES {
        return Err(format!("larger than {MAX_PROFILE_BYTES} bytes"));
    }
    let mut text = String::new();
    f.take(MAX_PROFILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// A profile file: OCI fields plus Docker's `archMap` and conditional rules.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    arch_map: Vec<ArchMap>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    syscalls: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMap {
    architecture: String,
    #[serde(default)]
    sub_architectures: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    names: Vec<String>,
    /// Docker's older single-name form.
    #[serde(default)]
    name: Option<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
}

/// Docker's names for the guest's architecture in `includes`/`excludes`.
fn is_native_arch(a: &str) -> bool {
    matches!(a, "amd64" | "x86_64" | "x32" | "386" | "x86")
}

impl Filter {
    /// Whether a container with `caps` on x86_64 matches everything this filter names.
    fn matches_all(&self, caps: &[String]) -> bool {
        self.caps.iter().all(|c| caps.contains(c))
            && (self.arches.is_empty() || self.arches.iter().any(|a| is_native_arch(a)))
    }

    /// Whether a container with `caps` on x86_64 matches anything this filter names.
    fn matches_any(&self, caps: &[String]) -> bool {
        self.caps.iter().any(|c| caps.contains(c)) || self.arches.iter().any(|a| is_native_arch(a))
    }
}

/// The OCI profile that a Docker-format profile means for this container.
fn from_docker_format(text: &str, caps: &[String]) -> Result<Value, String> {
    let p: Profile =
        serde_json::from_str(text).map_err(|e| format!("not a seccomp profile: {e}"))?;
    let architectures: Vec<String> = if !p.architectures.is_empty() {
        p.architectures
    } else if let Some(m) = p
        .arch_map
        .into_iter()
        .find(|m| m.architecture == "SCMP_ARCH_X86_64")
    {
        std::iter::once(m.architecture)
            .chain(m.sub_architectures)
            .collect()
    } else {
        NATIVE_ARCHES.iter().map(|s| s.to_string()).collect()
    };
    let mut syscalls = Vec::new();
    for r in p.syscalls {
        if !r.includes.matches_all(caps) || r.excludes.matches_any(caps) {
            continue;
        }
        let mut names = r.names;
        names.extend(r.name);
        if names.is_empty() {
            return Err("a rule names no syscall".into());
        }
        let mut rule = json!({ "names": names, "action": r.action });
        if let Some(e) = r.errno_ret {
            rule["errnoRet"] = json!(e);
        }
        if !r.args.is_empty() {
            rule["args"] = Value::Array(r.args);
        }
        syscalls.push(rule);
    }
    let mut out = json!({
        "defaultAction": p.default_action,
        "architectures": architectures,
        "syscalls": syscalls,
    });
    if let Some(e) = p.default_errno_ret {
        out["defaultErrnoRet"] = json!(e);
    }
    if !p.flags.is_empty() {
        out["flags"] = json!(p.flags);
    }
    // The OCI types check the action, operator and architecture names here, so a misspelt
    // profile fails CreateContainer instead of the container's start in the guest.
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(out.clone())
        .map_err(|e| format!("not a valid OCI seccomp profile: {e}"))?;
    Ok(out)
}

/// Swaps `value` and `valueTwo` of masked comparisons: libcontainer reads them the other way
/// round from every other runtime (see the module docs).
fn for_libcontainer(mut profile: Value) -> Value {
    if let Some(rules) = profile["syscalls"].as_array_mut() {
        for rule in rules {
            let Some(args) = rule.get_mut("args").and_then(Value::as_array_mut) else {
                continue;
            };
            for a in args {
                if a["op"] == "SCMP_CMP_MASKED_EQ" {
                    let mask = a.get("value").cloned().unwrap_or(json!(0));
                    let want = a.get("valueTwo").cloned().unwrap_or(json!(0));
                    a["value"] = want;
                    a["valueTwo"] = mask;
                }
            }
        }
    }
    profile
}

#[cfg(test)]
mod tests;
