//! Building the OCI runtime spec of a container from its CRI config, the
//! image config and the guest paths of its mounts.
//!
//! Containers of a pod share the VM's network, UTS (hostname) and IPC
//! namespaces, as containers of a pod share them on a node; each keeps its
//! own mount, PID and cgroup namespace.

use std::path::Path;

use k8s_cri::v1::{ContainerConfig, LinuxContainerResources};
use serde_json::{json, Value};
use tonic::Status;

use husk_runtime::image::ImageConfig;

/// containerd's default capability set for unprivileged containers.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability a 6.x kernel knows, for privileged containers and "ALL".
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A mount as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    pub destination: String,
    /// Guest path below the share.
    pub source: String,
    pub readonly: bool,
}

/// The process owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// HOME for the process when neither the image nor the config sets it:
    /// the user's home in the image's /etc/passwd, else "/". Given here so
    /// that the runtime in the guest never looks the user up in the
    /// container's own (tenant-controlled) files.
    pub home: String,
}

/// Largest /etc/passwd or /etc/group read from a container's rootfs.
const ACCOUNT_FILE_MAX: u64 = 4 << 20;

/// A container's /etc/passwd or /etc/group, read confined to its rootfs
/// (the tenant controls that file: see [`husk_runtime::confined`]). A
/// missing file is empty; one that cannot be read safely is empty too, and
/// the second value says why, for the error of a name that is not found.
fn account_file(rootfs: &Path, path: &str) -> (String, String) {
    match husk_runtime::confined::read_in_root(rootfs, Path::new(path), ACCOUNT_FILE_MAX) {
        Ok(b) => (String::from_utf8_lossy(&b).into_owned(), String::new()),
        Err(husk_runtime::confined::ConfinedError::NotFound(_)) => {
            (String::new(), " (it has none)".into())
        }
        Err(e) => {
            tracing::warn!(error = %e, "not reading a container's account file");
            (String::new(), format!(" (not read: {e})"))
        }
    }
}

/// [`resolve_user`] on a blocking thread: it reads files of the container's
/// rootfs, which must never hold up the async workers serving every CRI
/// call of the node.
pub async fn resolve_user_off_thread(
    config: &ContainerConfig,
    image: &ImageConfig,
    rootfs: &Path,
) -> Result<ProcessUser, Status> {
    let (config, image, rootfs) = (config.clone(), image.clone(), rootfs.to_path_buf());
    tokio::task::spawn_blocking(move || resolve_user(&config, &image, &rootfs))
        .await
        .map_err(|e| Status::internal(format!("resolving the container user: {e}")))?
}

/// Resolves the container's user from its security context or the image's
/// `User`, reading names from the rootfs' /etc/passwd and /etc/group (the
/// host has the rootfs mounted). Blocking: run it off the async workers.
pub fn resolve_user(
    config: &ContainerConfig,
    image: &ImageConfig,
    rootfs: &Path,
) -> Result<ProcessUser, Status> {
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let (passwd, passwd_err) = account_file(rootfs, "/etc/passwd");
    let (group, group_err) = account_file(rootfs, "/etc/group");
    let lookup_user = |name: &str| -> Option<(u32, u32)> {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == name)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
    };
    let lookup_group = |name: &str| -> Option<u32> {
        group.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok())?
        })
    };
    let user_field = |spec: &str, field: &str| -> Result<(u32, Option<u32>), Status> {
        let (u, g) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let (uid, pgid) = match u.parse::<u32>() {
            Ok(uid) => (uid, passwd_gid(&passwd, uid)),
            Err(_) => {
                let (uid, gid) = lookup_user(u).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "{field}: user {u:?} is not in the image's /etc/passwd{passwd_err}"
                    ))
                })?;
                (uid, Some(gid))
            }
        };
        let gid = match g {
            None => pgid,
            Some(g) => Some(match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => lookup_group(g).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "{field}: group {g:?} is not in the image's /etc/group{group_err}"
                    ))
                })?,
            }),
        };
        Ok((uid, gid))
    };

    // A group without a user would run as the image's user with a group the
    // caller did not pair with it; containerd refuses it the same way.
    if let Some(sc) = sc {
        if sc.run_as_group.is_some() && sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
            return Err(Status::invalid_argument(
                "config.linux.security_context.run_as_group is set without run_as_user or run_as_username",
            ));
        }
    }
    let (mut uid, mut gid) = (0u32, None::<u32>);
    if let Some(u) = image.user.as_deref().filter(|u| !u.is_empty()) {
        (uid, gid) = user_field(u, "image config User")?;
    }
    if let Some(sc) = sc {
        if !sc.run_as_username.is_empty() {
            (uid, gid) = user_field(
                &sc.run_as_username,
                "config.linux.security_context.run_as_username",
            )?;
        } else if let Some(u) = &sc.run_as_user {
            uid = u32::try_from(u.value).map_err(|_| {
                Status::invalid_argument(format!(
                    "config.linux.security_context.run_as_user {} is out of range",
                    u.value
                ))
            })?;
            gid = passwd_gid(&passwd, uid).or(gid);
        }
        if let Some(g) = &sc.run_as_group {
            gid = Some(u32::try_from(g.value).map_err(|_| {
                Status::invalid_argument(format!(
                    "config.linux.security_context.run_as_group {} is out of range",
                    g.value
                ))
            })?);
        }
    }
    let mut additional_gids = Vec::new();
    if let Some(sc) = sc {
        for g in &sc.supplemental_groups {
            additional_gids.push(u32::try_from(*g).map_err(|_| {
                Status::invalid_argument(format!(
                    "config.linux.security_context.supplemental_groups: {g} is out of range"
                ))
            })?);
        }
    }
    Ok(ProcessUser {
        uid,
        gid: gid.unwrap_or(0),
        additional_gids,
        home: passwd_home(&passwd, uid).unwrap_or_else(|| "/".into()),
    })
}

/// The home directory of `uid` in an /etc/passwd text (field 6), if it is
/// an absolute path.
fn passwd_home(passwd: &str, uid: u32) -> Option<String> {
    passwd_by_uid(passwd, uid, |f| {
        f.get(5)
            .filter(|h| h.starts_with('/'))
            .map(|h| h.to_string())
    })
}

fn passwd_gid(passwd: &str, uid: u32) -> Option<u32> {
    passwd_by_uid(passwd, uid, |f| f.get(3)?.parse().ok())
}

/// `pick` applied to the fields of each /etc/passwd line of `uid`, the
/// first answer.
fn passwd_by_uid<T>(passwd: &str, uid: u32, pick: impl Fn(&[&str]) -> Option<T>) -> Option<T> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[2].parse::<u32>().ok() == Some(uid))
            .then(|| pick(&f))
            .flatten()
    })
}

/// The argv: CRI `command` replaces the image Entrypoint, `args` replaces
/// Cmd; with a `command` and no `args`, the image's Cmd is not used
/// (Docker's and containerd's rule).
pub fn argv(config: &ContainerConfig, image: &ImageConfig) -> Result<Vec<String>, Status> {
    let mut v: Vec<String> = if config.command.is_empty() {
        image.entrypoint.clone()
    } else {
        config.command.clone()
    };
    if !config.args.is_empty() {
        v.extend(config.args.iter().cloned());
    } else if config.command.is_empty() {
        v.extend(image.cmd.iter().cloned());
    }
    if v.is_empty() {
        return Err(Status::invalid_argument(
            "config.command: no command: config.command, config.args and the image's Entrypoint and Cmd are all empty",
        ));
    }
    Ok(v)
}

/// Image env, then the container's env (same key replaces), PATH defaulted.
pub fn env(config: &ContainerConfig, image: &ImageConfig) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(e) = out.iter_mut().find(|(ek, _)| ek == k) {
            e.1 = v.to_string();
        } else {
            out.push((k.to_string(), v.to_string()));
        }
    };
    for e in &image.env {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        set(k, v);
    }
    for kv in &config.envs {
        set(&kv.key, &kv.value);
    }
    if !out.iter().any(|(k, _)| k == "PATH") {
        out.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Adds HOME unless the environment has it (see [`ProcessUser::home`]).
fn with_home(mut env: Vec<String>, home: &str) -> Vec<String> {
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={home}"));
    }
    env
}

pub fn capabilities(config: &ContainerConfig) -> Result<Vec<String>, Status> {
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let privileged = sc.is_some_and(|s| s.privileged);
    if privileged {
        return Ok(ALL_CAPS.iter().map(|s| s.to_string()).collect());
    }
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    let norm = |c: &str| -> Result<String, Status> {
        let up = c.to_ascii_uppercase();
        let full = if up.starts_with("CAP_") {
            up
        } else {
            format!("CAP_{up}")
        };
        if full == "CAP_ALL" || ALL_CAPS.contains(&full.as_str()) {
            Ok(full)
        } else {
            Err(Status::invalid_argument(format!(
                "config.linux.security_context.capabilities: unknown capability {:?}",
                super::validation::printable(c)
            )))
        }
    };
    if let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) {
        for a in &c.add_capabilities {
            let a = norm(a)?;
            if a == "CAP_ALL" {
                caps = ALL_CAPS.iter().map(|s| s.to_string()).collect();
            } else if !caps.contains(&a) {
                caps.push(a);
            }
        }
        for d in &c.drop_capabilities {
            let d = norm(d)?;
            if d == "CAP_ALL" {
                caps.clear();
            } else {
                caps.retain(|x| *x != d);
            }
        }
    }
    Ok(caps)
}

/// CRI resources as OCI LinuxResources JSON (what the agent's
/// UpdateContainer and the spec take).
pub fn resources_json(r: &LinuxContainerResources) -> Value {
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota > 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    let mut out = serde_json::Map::new();
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }
    if r.memory_limit_in_bytes > 0 {
        let mut mem = json!({ "limit": r.memory_limit_in_bytes });
        if r.memory_swap_limit_in_bytes > 0 {
            mem["swap"] = json!(r.memory_swap_limit_in_bytes);
        }
        out.insert("memory".into(), mem);
    }
    if !r.hugepage_limits.is_empty() {
        let h: Vec<Value> = r
            .hugepage_limits
            .iter()
            .map(|h| json!({"pageSize": h.page_size, "limit": h.limit}))
            .collect();
        out.insert("hugepageLimits".into(), Value::Array(h));
    }
    if !r.unified.is_empty() {
        out.insert("unified".into(), json!(r.unified));
    }
    Value::Object(out)
}

/// The container's process: owner, argv, env, cwd, capabilities, rlimits
/// and no_new_privs. ExecSync processes get the same security settings as
/// the container's main process (as containerd gives them), or an exec
/// would run with every capability the agent holds.
fn process_json(
    c: &ContainerConfig,
    image: &ImageConfig,
    user: &ProcessUser,
    args: Vec<String>,
) -> Result<Value, Status> {
    let sc = c.linux.as_ref().and_then(|l| l.security_context.as_ref());
    let cwd = if !c.working_dir.is_empty() {
        c.working_dir.clone()
    } else {
        image
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    };
    if !cwd.starts_with('/') {
        return Err(Status::invalid_argument(format!(
            "config.working_dir {:?} is not an absolute path",
            super::validation::printable(&cwd)
        )));
    }
    let caps = capabilities(c)?;
    let no_new_privs = sc.is_some_and(|s| s.no_new_privs);
    let mut process = json!({
        "terminal": c.tty,
        "user": {
            "uid": user.uid,
            "gid": user.gid,
            "additionalGids": user.additional_gids,
        },
        "args": args,
        "env": with_home(env(c, image), &user.home),
        "cwd": cwd,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps,
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576u64, "soft": 1048576u64}],
    });
    // Absent rather than false: libcontainer 0.7 loads a seccomp filter while the process still
    // holds CAP_SYS_ADMIN only when the field is absent; with `false` it loads it after dropping
    // capabilities, and the kernel refuses a filter without no_new_privs then.
    if no_new_privs {
        process["noNewPrivileges"] = json!(true);
    }
    Ok(process)
}

/// The OCI process of an ExecSync `cmd` in a container created from
/// `config`: the container's process with `cmd` as argv and no terminal.
pub fn exec_process(
    config: &ContainerConfig,
    image: &ImageConfig,
    user: &ProcessUser,
    cmd: &[String],
) -> Result<oci_spec::runtime::Process, Status> {
    let mut p = process_json(config, image, user, cmd.to_vec())?;
    p["terminal"] = json!(false);
    serde_json::from_value(p)
        .map_err(|e| Status::internal(format!("building the exec process: {e}")))
}

/// Everything [`build`] needs besides the CRI config.
#[derive(Debug)]
pub struct SpecInputs<'a> {
    pub config: &'a ContainerConfig,
    pub image: &'a ImageConfig,
    pub user: ProcessUser,
    pub mounts: &'a [GuestMount],
    /// OCI `linux.seccomp` (from [`super::seccomp::for_container`]); `None`: unconfined.
    pub seccomp: Option<Value>,
}

/// The container's OCI spec (root.path is filled in by the sandbox).
pub fn build(inp: &SpecInputs<'_>) -> Result<oci_spec::runtime::Spec, Status> {
    let c = inp.config;
    let sc = c.linux.as_ref().and_then(|l| l.security_context.as_ref());
    let privileged = sc.is_some_and(|s| s.privileged);
    let mut spec = serde_json::to_value(oci_spec::runtime::Spec::default())
        .map_err(|e| Status::internal(format!("default OCI spec: {e}")))?;

    spec["process"] = process_json(c, inp.image, &inp.user, argv(c, inp.image)?)?;
    // No "hostname" (the default spec has one): the container shares the
    // VM's UTS namespace, named by the sandbox at boot, and an OCI runtime
    // refuses a hostname without a private UTS namespace.
    if let Some(o) = spec.as_object_mut() {
        o.remove("hostname");
    }
    spec["root"] = json!({ "path": "rootfs", "readonly": sc.is_some_and(|s| s.readonly_rootfs) });

    let mut mounts = spec["mounts"].as_array().cloned().unwrap_or_default();
    // Mounts given by the caller replace defaults at the same destination.
    mounts.retain(|m| {
        !inp.mounts
            .iter()
            .any(|g| m["destination"] == json!(g.destination))
    });
    for m in inp.mounts {
        let mode = if m.readonly { "ro" } else { "rw" };
        mounts.push(json!({
            "destination": m.destination, "type": "bind", "source": m.source,
            "options": ["rbind", "rprivate", mode],
        }));
    }
    spec["mounts"] = Value::Array(mounts);

    let linux = &mut spec["linux"];
    // A container of a host pod with the host's PID namespace (hostPID)
    // gets none of its own; the network, IPC and UTS namespaces are the
    // pod's (the VM's, or those its supervisor runs in on the host).
    let host_pid = sc
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|n| n.pid == k8s_cri::v1::NamespaceMode::Node as i32);
    linux["namespaces"] = if host_pid {
        json!([{"type": "mount"}, {"type": "cgroup"}])
    } else {
        json!([{"type": "pid"}, {"type": "mount"}, {"type": "cgroup"}])
    };
    if privileged {
        linux["maskedPaths"] = json!([]);
        linux["readonlyPaths"] = json!([]);
        linux["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
    } else if let Some(sc) = sc {
        // kubelet sends its defaults (or none at all, and then the OCI
        // defaults stay); as containerd does, given lists replace them.
        for (field, key, paths) in [
            ("masked_paths", "maskedPaths", &sc.masked_paths),
            ("readonly_paths", "readonlyPaths", &sc.readonly_paths),
        ] {
            if paths.is_empty() {
                continue;
            }
            if let Some(p) = paths
                .iter()
                .find(|p| !p.starts_with('/') || p.contains('\0'))
            {
                return Err(Status::invalid_argument(format!(
                    "config.linux.security_context.{field}: {:?} is not an absolute path",
                    super::validation::printable(p)
                )));
            }
            linux[key] = json!(paths);
        }
    }
    if let Some(s) = &inp.seccomp {
        linux["seccomp"] = s.clone();
    }
    if let Some(r) = c.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        if let Value::Object(res) = resources_json(r) {
            for (k, v) in res {
                linux["resources"][k] = v;
            }
        }
    }
    let mut ann = serde_json::Map::new();
    for (k, v) in &c.annotations {
        ann.insert(k.clone(), json!(v));
    }
    spec["annotations"] = Value::Object(ann);
    serde_json::from_value(spec)
        .map_err(|e| Status::internal(format!("building the OCI spec: {e}")))
}

#[cfg(test)]
mod tests;
