//! CreateContainer: the rootfs overlay and CRI mounts in the pod's share,
//! the OCI spec, the container created by the agent, its output attached
//! to the CRI log; the record written last.

use std::path::{Path, PathBuf};

use husk_proto::agent::StdioConfig;
use husk_proto::GUEST_SHARE_DIR;
use husk_runtime::sandbox::Rootfs;
use k8s_cri::v1 as cri;
use tonic::Status;

use super::container_io::attach_output;
use super::container_remove::release_container_host;
use super::errors::{image_error, sandbox_error, state_error};
use super::helpers::{find_pod, record_pod_field};
use super::spec::{self, GuestMount, SpecInputs};
use super::{now_ns, validation, Husk, LiveContainer};
use crate::logs::LogFile;
use crate::state::{ContainerRecord, ContainerState, PodState};

/// Host mounts below a CRI mount's host path, relative to it, outer first
/// (each listed once, however many are stacked on it).
fn submounts(src: &Path) -> Vec<PathBuf> {
    let Ok(canonical) = std::fs::canonicalize(src) else {
        return Vec::new();
    };
    let mut subs: Vec<PathBuf> = husk_runtime::mounts::mounts_under(&canonical)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.strip_prefix(&canonical).ok().map(Path::to_path_buf))
        .filter(|rel| !rel.as_os_str().is_empty())
        .collect();
    subs.sort_by_key(|rel| rel.components().count());
    subs.dedup();
    subs
}

/// A container's directory in the share: mount points are created on the
/// writable side and mounted on in the share, whose view the guest cannot
/// change.
struct ContainerShare<'a> {
    share: &'a Path,
    rw: &'a Path,
    guest: &'a str,
}

impl ContainerShare<'_> {
    /// Creates `mounts/<name>` (a directory, or a file to bind a file on);
    /// returns its path in the share and in the guest.
    fn mount_point(&self, name: &str, dir: bool) -> std::io::Result<(PathBuf, String)> {
        let point = self.rw.join("mounts").join(name);
        if dir {
            std::fs::create_dir_all(&point)?;
        } else {
            std::fs::create_dir_all(self.rw.join("mounts"))?;
            std::fs::File::create(&point)?;
        }
        Ok((
            self.share.join("mounts").join(name),
            format!("{}/mounts/{name}", self.guest),
        ))
    }
}

/// Makes the CRI mounts visible in the guest: each host path is bound into
/// the container's directory in the share, and so is each host mount below
/// it, on its own. Separate binds, not one recursive bind, because
/// - CRI's read-only is not recursive: a read-only volume's submounts keep
///   their own flags. In the guest, a virtio-fs automount under the
///   container's read-only bind would inherit its read-only flag; bound on
///   its own, each gets the flags the host gave it.
/// - A recursive copy would put mounts of huskd's on the host's own mount
///   points below the volume, and the host could then not remove those
///   directories (`EBUSY`) while the pod lives.
///
/// Below the host path the tree may be the tenant's (a writable volume), so
/// each submount is opened without following symlinks and bound from that
/// handle.
fn bind_cri_mounts(
    dirs: &ContainerShare<'_>,
    mounts: &[cri::Mount],
    host_mounts: &mut Vec<PathBuf>,
) -> Result<Vec<GuestMount>, Status> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let field = format!("config.mounts[{i}]");
        if !m.container_path.starts_with('/') || m.container_path.split('/').any(|c| c == "..") {
            return Err(Status::invalid_argument(format!(
                "{field}.container_path {:?} must be an absolute path without '..'",
                validation::printable(&m.container_path)
            )));
        }
        let src = Path::new(&m.host_path);
        if !src.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "{field}.host_path {:?} is not absolute",
                validation::printable(&m.host_path)
            )));
        }
        let meta = std::fs::metadata(src).map_err(|e| {
            Status::invalid_argument(format!(
                "{field}.host_path {}: {e}",
                validation::printable(&m.host_path)
            ))
        })?;
        let subs = if meta.is_dir() {
            submounts(src)
        } else {
            Vec::new()
        };
        let (target, guest) = dirs
            .mount_point(&i.to_string(), meta.is_dir())
            .map_err(|e| Status::internal(format!("{field}: creating its mount point: {e}")))?;
        husk_runtime::mounts::bind_one(src, &target).map_err(|e| {
            Status::internal(format!("{field}: bind-mounting {}: {e}", m.host_path))
        })?;
        host_mounts.push(target.clone());
        // Read-only on the host side of the share too: root in the guest
        // can remount its view read-write, but virtiofsd writes through
        // this mount, which stays read-only.
        if m.readonly {
            husk_runtime::mounts::remount_readonly(&target).map_err(|e| {
                Status::internal(format!(
                    "{field}: making {} read-only: {e}",
                    target.display()
                ))
            })?;
        }
        out.push(GuestMount {
            destination: m.container_path.clone(),
            source: guest,
            readonly: m.readonly,
        });
        for (k, rel) in subs.iter().enumerate() {
            let sub_err = |e: String| {
                Status::internal(format!(
                    "{field}: the host mount {} below it: {e}",
                    src.join(rel).display()
                ))
            };
            let fd = husk_runtime::confined::open_path_beneath(src, rel)
                .map_err(|e| sub_err(e.to_string()))?;
            let handle = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            let is_dir = std::fs::metadata(&handle)
                .map_err(|e| sub_err(e.to_string()))?
                .is_dir();
            let (target, guest) = dirs
                .mount_point(&format!("{i}.{k}"), is_dir)
                .map_err(|e| sub_err(format!("creating its mount point: {e}")))?;
            husk_runtime::mounts::bind_one(&handle, &target)
                .map_err(|e| sub_err(format!("bind-mounting: {e}")))?;
            host_mounts.push(target);
            out.push(GuestMount {
                destination: format!(
                    "{}/{}",
                    m.container_path.trim_end_matches('/'),
                    rel.display()
                ),
                source: guest,
                readonly: false,
            });
        }
    }
    Ok(out)
}

pub(super) async fn create_container(
    h: &Husk,
    req: cri::CreateContainerRequest,
) -> Result<cri::CreateContainerResponse, Status> {
    let pod = find_pod(h, "pod_sandbox_id", &req.pod_sandbox_id)?;
    record_pod_field(&pod.id);
    let config = req
        .config
        .ok_or_else(|| Status::invalid_argument("config is missing"))?;
    let meta = config
        .metadata
        .clone()
        .ok_or_else(|| Status::invalid_argument("config.metadata is missing"))?;
    validation::name("config.metadata.name", &meta.name)?;
    let image_ref = config
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default();
    if image_ref.is_empty() {
        return Err(Status::invalid_argument("config.image.image is empty"));
    }
    let log_dir = validation::log_directory(&pod.config.log_directory)?;
    let log_path = validation::log_path(log_dir.as_deref(), &config.log_path)?;
    let lock = h.pod_lock(&pod.id);
    let _g = lock.lock().await;
    let pod = h
        .state
        .pod(&pod.id)
        .ok_or_else(|| Status::not_found(format!("pod sandbox {} was removed", pod.id)))?;
    let sandbox = match (pod.state, h.sandbox(&pod.id)) {
        (PodState::Ready, Some(sb)) => sb,
        _ => {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )))
        }
    };
    if let Some(c) = h.state.containers_of(&pod.id).into_iter().find(|c| {
        c.config
            .metadata
            .as_ref()
            .is_some_and(|m| m.name == meta.name && m.attempt == meta.attempt)
    }) {
        return Err(Status::already_exists(format!(
            "container {} (attempt {}) already exists in pod {}: {}",
            meta.name, meta.attempt, pod.id, c.id
        )));
    }
    let image = h
        .images
        .status(&image_ref)
        .map_err(|e| image_error(&e))?
        .ok_or_else(|| {
            Status::not_found(format!(
                "config.image.image: image {image_ref:?} is not present; pull it first"
            ))
        })?;

    let id = super::new_id();
    tracing::Span::current().record("container", id.as_str());
    let share_cdir = sandbox.paths().container(&id);
    let rw_cdir = sandbox.paths().container_rw(&id);
    let guest_cdir = format!("{GUEST_SHARE_DIR}/containers/{id}");
    let rootfs = sandbox
        .container_rootfs(&id)
        .map_err(|e| sandbox_error(&e))?;
    let mut rec = ContainerRecord {
        id: id.clone(),
        pod_id: pod.id.clone(),
        config: config.clone(),
        image_ref: image_ref.clone(),
        image_id: image.id.0.clone(),
        state: ContainerState::Created,
        created_at_ns: now_ns(),
        started_at_ns: 0,
        finished_at_ns: 0,
        exit_code: 0,
        reason: String::new(),
        message: String::new(),
        log_path: log_path.clone().unwrap_or_default(),
        host_mounts: Vec::new(),
    };

    let mut agent_created = false;
    let r: Result<LiveContainer, Status> = async {
        std::fs::create_dir_all(rw_cdir.join("rootfs"))
            .map_err(|e| Status::internal(format!("creating {}: {e}", rw_cdir.display())))?;
        let dirs = ContainerShare {
            share: &share_cdir,
            rw: &rw_cdir,
            guest: &guest_cdir,
        };
        let mut mounts = bind_cri_mounts(&dirs, &config.mounts, &mut rec.host_mounts)?;
        for (f, dest) in [
            ("hosts", "/etc/hosts"),
            ("resolv.conf", "/etc/resolv.conf"),
            ("hostname", "/etc/hostname"),
        ] {
            if !mounts.iter().any(|m| m.destination == dest) {
                let readonly = f != "hosts";
                mounts.push(GuestMount {
                    destination: dest.into(),
                    source: format!("{GUEST_SHARE_DIR}/pod/{f}"),
                    readonly,
                });
            }
        }
        let seccomp = super::seccomp::for_container(&config).await?;
        h.images
            .prepare_rootfs(&image.id.0, &id, &rootfs)
            .map_err(|e| image_error(&e))?;
        let user = spec::resolve_user_off_thread(&config, &image.config, &rootfs).await?;
        let oci = spec::build(&SpecInputs {
            config: &config,
            image: &image.config,
            user,
            mounts: &mounts,
            seccomp,
        })?;
        let stdio = StdioConfig {
            stdin: config.stdin,
            terminal: config.tty,
        };
        let log =
            match &log_path {
                Some(p) => {
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| {
                            Status::internal(format!(
                                "creating log directory {}: {e}",
                                parent.display()
                            ))
                        })?;
                    }
                    Some(LogFile::open(p).map_err(|e| {
                        Status::internal(format!("opening log {}: {e}", p.display()))
                    })?)
                }
                None => None,
            };
        sandbox
            .create_container(&id, oci, Rootfs::InShare, stdio)
            .await
            .map_err(|e| sandbox_error(&e))?;
        agent_created = true;
        attach_output(&sandbox, &id, stdio, log).await
    }
    .await;

    let live = match r {
        Ok(l) => l,
        Err(s) => {
            if agent_created {
                let _ = sandbox.remove_container(&id, true).await;
            }
            release_container_host(h, &rec, Some(&sandbox));
            return Err(s);
        }
    };
    if let Err(e) = h.state.put_container(rec.clone()) {
        let _ = sandbox.remove_container(&id, true).await;
        release_container_host(h, &rec, Some(&sandbox));
        return Err(state_error(&e));
    }
    h.set_live(&id, live);
    Ok(cri::CreateContainerResponse { container_id: id })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-only volume with two tmpfs below it, as critest's non-recursive read-only spec
    /// builds it: the volume is read-only through the share, its submounts are writable, each
    /// bound on its own (outer first); and the host can tear its tree down while the binds
    /// live (a recursive copy made its mount points EBUSY).
    #[test]
    fn submounts_of_a_readonly_volume_get_their_own_binds() {
        use husk_runtime::sandbox::{share, SandboxPaths};
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("vol");
        let (a, b) = (src.join("a"), src.join("a/b"));
        std::fs::create_dir_all(&a).unwrap();
        let tmpfs = |p: &Path| {
            nix::mount::mount(
                Some("none"),
                p,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .unwrap()
        };
        tmpfs(&a);
        std::fs::create_dir(&b).unwrap();
        tmpfs(&b);
        let sb = d.path().join("sb");
        std::fs::create_dir(&sb).unwrap();
        let paths = SandboxPaths::new(&sb);
        share::create(&paths).unwrap();
        let (share_cdir, rw_cdir) = (paths.container("c"), paths.container_rw("c"));
        std::fs::create_dir_all(&rw_cdir).unwrap();
        let dirs = ContainerShare {
            share: &share_cdir,
            rw: &rw_cdir,
            guest: "/g",
        };
        let volume = cri::Mount {
            container_path: "/mnt/".into(),
            host_path: src.to_str().unwrap().into(),
            readonly: true,
            ..Default::default()
        };
        let mut host_mounts = Vec::new();
        let got = bind_cri_mounts(&dirs, &[volume], &mut host_mounts);
        let writes = [
            std::fs::write(share_cdir.join("mounts/0/x"), "x").is_ok(),
            std::fs::write(share_cdir.join("mounts/0.0/y"), "y").is_ok(),
            std::fs::write(share_cdir.join("mounts/0.1/z"), "z").is_ok(),
        ];
        let seen = a.join("y").exists() && b.join("z").exists();
        // The host's cleanup, while huskd's binds live.
        let teardown = husk_runtime::mounts::unmount_all_under(&src)
            .map(|left| left.is_empty())
            .and_then(|_| std::fs::remove_dir_all(&src));
        let _ = husk_runtime::mounts::unmount_all_under(&sb);
        let pairs: Vec<(String, String, bool)> = got
            .unwrap()
            .into_iter()
            .map(|m| (m.destination, m.source, m.readonly))
            .collect();
        assert_eq!(
            pairs,
            [
                ("/mnt/".into(), "/g/mounts/0".into(), true),
                ("/mnt/a".into(), "/g/mounts/0.0".into(), false),
                ("/mnt/a/b".into(), "/g/mounts/0.1".into(), false),
            ]
        );
        assert_eq!(host_mounts.len(), 3);
        assert_eq!(
            writes,
            [false, true, true],
            "volume read-only, submounts writable"
        );
        assert!(
            seen,
            "writes through the submount binds reach the host's tmpfs"
        );
        teardown.expect("the host removes its tree while the binds live");
    }
}
