//! Container root filesystems: an overlay of an image's unpacked layers with
//! a private upper dir per container, and its persisted record.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::error::IoContext;
use super::store::{find_image, Inner};
use super::{Error, ImageId, ImageStore, Result};
use crate::files::write_atomic;
use crate::mounts::WhenBusy;

/// A mounted container root filesystem, from [`ImageStore::prepare_rootfs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsMount {
    pub container_id: String,
    pub image_id: ImageId,
    /// Where the overlay is mounted.
    pub target: PathBuf,
    pub upper_dir: PathBuf,
    pub work_dir: PathBuf,
    /// overlayfs lower dirs, top-most first (the order of the `lowerdir=` option).
    pub lower_dirs: Vec<PathBuf>,
    /// diff_ids kept alive by this rootfs.
    pub layers: Vec<String>,
    created_target: bool,
}

impl ImageStore {
    /// Mounts an overlay of `image`'s layers with a private upper dir for `container_id` at
    /// `target` (created if missing). The record is persisted so that a restarted store still
    /// knows the mount and keeps its layers.
    pub fn prepare_rootfs(
        &self,
        image: &str,
        container_id: &str,
        target: &Path,
    ) -> Result<RootfsMount> {
        if let Err(e) = husk_proto::ids::validate(container_id) {
            return Err(Error::InvalidArgument(format!(
                "container id {container_id:?} is not a safe directory name: {e}"
            )));
        }
        if !target.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "rootfs target {} is not absolute",
                target.display()
            )));
        }
        let dir = self.inner.dirs.rootfs.join(container_id);
        let mount = {
            let mut st = self.inner.lock();
            let img = find_image(&st, image)?
                .ok_or_else(|| Error::ImageNotFound(image.to_string()))?
                .clone();
            if st.rootfs.contains_key(container_id) {
                return Err(Error::RootfsExists(container_id.to_string()));
            }
            let mut lower_dirs: Vec<PathBuf> = img
                .layers
                .iter()
                .rev()
                .map(|l| self.inner.layer_dir(&l.diff_id).join("fs"))
                .collect();
            if lower_dirs.is_empty() {
                lower_dirs.push(self.inner.dirs.empty.clone());
            }
            let m = RootfsMount {
                container_id: container_id.to_string(),
                image_id: img.id.clone(),
                target: target.to_path_buf(),
                upper_dir: dir.join("upper"),
                work_dir: dir.join("work"),
                lower_dirs,
                layers: img.layers.iter().map(|l| l.diff_id.clone()).collect(),
                created_target: !target.exists(),
            };
            // Claimed under the lock: pins the layers against a concurrent remove.
            st.rootfs.insert(container_id.to_string(), m.clone());
            m
        };
        match self.inner.mount_rootfs(&mount, &dir) {
            Ok(()) => {
                debug!(container = container_id, target = %target.display(), "rootfs mounted");
                Ok(mount)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                if mount.created_target {
                    let _ = fs::remove_dir(target);
                }
                self.inner.lock().rootfs.remove(container_id);
                Err(e)
            }
        }
    }

    /// Unmounts a container's rootfs, deletes its upper/work dirs and record, and deletes layers
    /// that were kept only for it.
    pub fn release_rootfs(&self, container_id: &str) -> Result<()> {
        let mount = self
            .inner
            .lock()
            .rootfs
            .get(container_id)
            .cloned()
            .ok_or_else(|| Error::RootfsNotFound(container_id.to_string()))?;
        crate::mounts::unmount(&mount.target, WhenBusy::Wait).map_err(|e| Error::Mount {
            op: "unmount",
            target: mount.target.clone(),
            source: e,
        })?;
        let dir = self.inner.dirs.rootfs.join(container_id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", dir.display()), e)),
        }
        if mount.created_target {
            let _ = fs::remove_dir(&mount.target);
        }
        self.inner.lock().rootfs.remove(container_id);
        let removed = self.inner.collect_garbage();
        self.inner.delete_paths(removed);
        debug!(container = container_id, "rootfs released");
        Ok(())
    }

    /// Prepared rootfs records (e.g. to reconcile with containers after a restart).
    pub fn rootfs_mounts(&self) -> Vec<RootfsMount> {
        self.inner.lock().rootfs.values().cloned().collect()
    }
}

impl Inner {
    fn mount_rootfs(&self, m: &RootfsMount, dir: &Path) -> Result<()> {
        use nix::mount::{mount, MsFlags};
        for l in &m.lower_dirs {
            if !l.is_dir() {
                return Err(Error::Corrupt {
                    path: l.clone(),
                    detail: format!("layer directory of image {} is missing", m.image_id),
                });
            }
        }
        fs::create_dir_all(&m.upper_dir).ctx(|| format!("creating {}", m.upper_dir.display()))?;
        fs::create_dir_all(&m.work_dir).ctx(|| format!("creating {}", m.work_dir.display()))?;
        fs::create_dir_all(&m.target).ctx(|| format!("creating {}", m.target.display()))?;
        let lower = m
            .lower_dirs
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            m.upper_dir.display(),
            m.work_dir.display()
        );
        // mount(2) copies at most one page of options.
        if opts.len() >= 4096 {
            return Err(Error::InvalidArgument(format!(
                "image {} has too many layers ({}) for one overlay mount",
                m.image_id,
                m.lower_dirs.len()
            )));
        }
        let data = serde_json::to_vec_pretty(m)
            .map_err(|e| Error::io("encoding rootfs record", io::Error::other(e)))?;
        let record = dir.join("rootfs.json");
        write_atomic(&record, &data)?;
        mount(
            Some("overlay"),
            &m.target,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| Error::Mount {
            op: "overlay mount",
            target: m.target.clone(),
            source: e.into(),
        })
    }
}

/// The prepared rootfs records a previous store instance left in `dir`, by
/// container id; a directory without a record is deleted.
pub(super) fn load_records(dir: &Path) -> Result<HashMap<String, RootfsMount>> {
    let mut records = HashMap::new();
    for entry in fs::read_dir(dir).ctx(|| format!("reading {}", dir.display()))? {
        let path = entry.ctx(|| "reading rootfs records".into())?.path();
        let record = path.join("rootfs.json");
        match fs::read(&record) {
            Ok(data) => {
                let m: RootfsMount = serde_json::from_slice(&data).map_err(|e| Error::Corrupt {
                    path: record.clone(),
                    detail: e.to_string(),
                })?;
                records.insert(m.container_id.clone(), m);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Crashed before the record was written: nothing was mounted yet.
                warn!(dir = %path.display(), "removing incomplete rootfs directory");
                let _ = fs::remove_dir_all(&path);
            }
            Err(e) => return Err(Error::io(format!("reading {}", record.display()), e)),
        }
    }
    Ok(records)
}
