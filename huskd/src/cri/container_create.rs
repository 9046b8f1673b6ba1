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

/// CRI's read-only is not recursive: mounts below a read-only volume keep their own flags.
/// On the host they do (`remount_readonly` changes the top mount only), but in the guest
/// virtio-fs shows them as automounts, and an automount triggered under the container's
/// read-only bind inherits its read-only flag. Listing each one as its own bind, after the
/// volume, mounts it from the share's view instead, with the flags the host gave it.
fn submounts_keep_their_flags(
    target: &Path,
    container_path: &str,
    guest_source: &str,
) -> Vec<GuestMount> {
    let mut subs: Vec<PathBuf> = husk_runtime::mounts::mounts_under(target)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.strip_prefix(target).ok().map(Path::to_path_buf))
        .filter(|rel| !rel.as_os_str().is_empty())
        .collect();
    // Outer mounts before the ones inside them.
    subs.sort_by_key(|rel| rel.components().count());
    subs.iter()
        .filter_map(|rel| rel.to_str())
        .map(|rel| GuestMount {
            destination: format!("{}/{rel}", container_path.trim_end_matches('/')),
            source: format!("{guest_source}/{rel}"),
            readonly: false,
        })
        .collect()
}

/// Makes the CRI mounts visible in the guest: each host path is bind-mounted
/// below the container's directory in the share.
fn bind_cri_mounts(
    share_cdir: &Path,
    guest_cdir: &str,
    mounts: &[cri::Mount],
    host_mounts: &mut Vec<PathBuf>,
) -> Result<Vec<GuestMount>, Status> {
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
        let target = share_cdir.join("mounts").join(i.to_string());
        let mk = if meta.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            std::fs::create_dir_all(target.parent().unwrap_or(share_cdir))
                .and_then(|_| std::fs::File::create(&target).map(|_| ()))
        };
        mk.map_err(|e| Status::internal(format!("{field}: creating {}: {e}", target.display())))?;
        husk_runtime::mounts::bind(src, &target).map_err(|e| {
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
            source: format!("{guest_cdir}/mounts/{i}"),
            readonly: m.readonly,
        });
        if m.readonly {
            out.extend(submounts_keep_their_flags(
                &target,
                &m.container_path,
                &format!("{guest_cdir}/mounts/{i}"),
            ));
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
    let share_cdir = sandbox.share_dir().join("containers").join(&id);
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
        let mut mounts = bind_cri_mounts(
            &share_cdir,
            &guest_cdir,
            &config.mounts,
            &mut rec.host_mounts,
        )?;
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

    /// A tmpfs below a read-only volume is listed as its own writable bind, outer first.
    #[test]
    fn submounts_of_a_readonly_volume_get_their_own_binds() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("a/b"));
        std::fs::create_dir(&a).unwrap();
        nix::mount::mount(
            Some("none"),
            &a,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::create_dir(&b).unwrap();
        nix::mount::mount(
            Some("none"),
            &b,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let got = submounts_keep_their_flags(d.path(), "/mnt/", "/g/mounts/0");
        let _ = husk_runtime::mounts::unmount_all_under(d.path());
        let pairs: Vec<(String, String, bool)> = got
            .into_iter()
            .map(|m| (m.destination, m.source, m.readonly))
            .collect();
        assert_eq!(
            pairs,
            [
                ("/mnt/a".into(), "/g/mounts/0/a".into(), false),
                ("/mnt/a/b".into(), "/g/mounts/0/a/b".into(), false),
            ]
        );
    }
}
