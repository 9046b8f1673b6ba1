//! husk's image store: pulls images from OCI / Docker v2 registries, keeps them content-addressed
//! on the host, and prepares overlayfs root filesystems for containers. The CRI `ImageService`
//! of `huskd` is a thin wrapper over [`ImageStore`].
//!
//! On-disk layout (all writes are temp-file + rename, so a crash leaves either the old or the
//! new state; `tmp/` is emptied on open, as are records' temporaries in `meta/`):
//!
//! ```text
//! <root>/images/blobs/sha256/<hex>     compressed layer blobs and image configs, verified
//! <root>/images/layers/<hex>/fs/       one unpacked layer, named by its diff_id (overlay lower dir)
//! <root>/images/layers/<hex>/usage.json  bytes / inodes of that layer
//! <root>/images/meta/<hex>.json        one image record, named by the image id (config digest)
//! <root>/images/tmp/                   downloads and unpacks in progress
//! <root>/rootfs/<container-id>/        upper/, work/ and rootfs.json of a prepared container rootfs
//! ```
//!
//! Layers are keyed by diff_id rather than chain id: an overlay lower dir holds only its own
//! layer's changes, so the same diff stacked on different parents is the same directory.
//!
//! Removal: [`ImageStore::remove`] refuses an image the caller reports in use (`in_use`), like
//! containerd refuses to delete an image whose snapshots are active. Independently, a layer is
//! deleted only when no image record, no prepared container rootfs and no pull in progress
//! references it, so a mounted rootfs never loses its lower dirs; a layer kept alive only by
//! a rootfs is deleted when that rootfs is released.

mod error;
mod flight;
mod reference;
mod registry;
mod unpack;

pub use error::{Error, ErrorKind, Result};
pub use reference::ImageRef;
pub use registry::RegistryAuth;

use crate::files::{self, write_atomic};
use crate::mounts::WhenBusy;
use error::IoContext;
use flight::Flights;
use futures_util::{StreamExt, TryStreamExt};
use oci_client::manifest::OciDescriptor;
use registry::{map_error, map_io, Clients, Endpoint};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

/// Configuration of an [`ImageStore`].
#[derive(Debug, Clone, Default)]
pub struct ImageStoreConfig {
    /// State directory; the store uses `<root>/images` and `<root>/rootfs`.
    pub root: PathBuf,
    /// Registry host (as in the normalised reference, e.g. `docker.io`, `registry.k8s.io`) ->
    /// mirror endpoint URLs tried in order before the registry itself. A mirror replaces the
    /// host and keeps the repository path; the image keeps its original name.
    pub mirrors: HashMap<String, Vec<String>>,
    /// `host[:port]` registries (or mirrors) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Layers downloaded at once per pull (0 = 3).
    pub max_concurrent_downloads: usize,
}

/// An image id: `sha256:<hex>` digest of the image config.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageId(pub String);

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The runtime part of an image config (what CRI `ImageSpec`/`ImageStatus` and container
/// creation need).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub user: Option<String>,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub exposed_ports: Vec<String>,
    pub volumes: Vec<String>,
    pub stop_signal: Option<String>,
    pub os: String,
    pub architecture: String,
}

/// One layer of an image, bottom first in [`Image::layers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the uncompressed tar (names the unpacked directory).
    pub diff_id: String,
    /// Digest of the blob as stored in the registry.
    pub digest: String,
    /// Blob size in bytes.
    pub size: u64,
    pub media_type: String,
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: ImageId,
    /// Normalised `registry/repo:tag` names pointing at this image.
    pub repo_tags: Vec<String>,
    /// `registry/repo@sha256:...` (the index digest for multi-arch images, as containerd).
    pub repo_digests: Vec<String>,
    /// Config plus compressed layer sizes.
    pub size: u64,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
    /// Digest of the platform manifest that was pulled.
    pub manifest_digest: String,
}

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

/// What [`ImageStore::remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveOutcome {
    Removed(ImageId),
    /// Nothing matched; CRI `RemoveImage` treats this as success.
    NotFound,
}

/// Usage for CRI `ImageFsInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    /// The store's image directory (`<root>/images`).
    pub mountpoint: PathBuf,
    /// Bytes used by the store's blobs and unpacked layers.
    pub used_bytes: u64,
    /// Inodes used by the store's blobs and unpacked layers.
    pub used_inodes: u64,
    /// The underlying filesystem, from statvfs.
    pub fs_total_bytes: u64,
    pub fs_available_bytes: u64,
    pub fs_total_inodes: u64,
    pub fs_free_inodes: u64,
}

/// Counters of work done against registries and disk since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Blob downloads started (configs and layers).
    pub blobs_fetched: u64,
    /// Bytes received for blobs.
    pub bytes_fetched: u64,
    /// Layers unpacked.
    pub layers_unpacked: u64,
}

#[derive(Default)]
struct Counters {
    blobs_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    layers_unpacked: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct LayerUsage {
    bytes: u64,
    inodes: u64,
}

#[derive(Default)]
struct State {
    images: BTreeMap<ImageId, Image>,
    rootfs: HashMap<String, RootfsMount>,
    /// Digests / diff_ids used by pulls in progress; never garbage collected.
    pins: HashMap<String, usize>,
    /// Unpacked layers present on disk.
    layers: HashMap<String, LayerUsage>,
    /// Blobs present on disk and their sizes.
    blobs: HashMap<String, u64>,
}

struct Dirs {
    images: PathBuf,
    blobs: PathBuf,
    layers: PathBuf,
    meta: PathBuf,
    tmp: PathBuf,
    rootfs: PathBuf,
    empty: PathBuf,
}

struct Inner {
    dirs: Dirs,
    mirrors: HashMap<String, Vec<Endpoint>>,
    clients: Clients,
    concurrency: usize,
    state: Mutex<State>,
    pulls: Flights<Image>,
    blob_flights: Flights<()>,
    layer_flights: Flights<()>,
    counters: Counters,
}

/// The image store. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn tmp_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `sha256:<64 lowercase hex>`; anything else from a registry is refused before it names a file.
fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// The subset of an image config JSON (OCI or Docker) that the store reads.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRuntimeConfig>,
    rootfs: RawRootfs,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRuntimeConfig {
    user: Option<String>,
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    volumes: Option<BTreeMap<String, serde_json::Value>>,
    stop_signal: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl RawConfig {
    fn image_config(&self) -> ImageConfig {
        let c = self.config.as_ref();
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        ImageConfig {
            user: c.and_then(|c| nonempty(&c.user)),
            env: c.and_then(|c| c.env.clone()).unwrap_or_default(),
            entrypoint: c.and_then(|c| c.entrypoint.clone()).unwrap_or_default(),
            cmd: c.and_then(|c| c.cmd.clone()).unwrap_or_default(),
            working_dir: c.and_then(|c| nonempty(&c.working_dir)),
            labels: c.and_then(|c| c.labels.clone()).unwrap_or_default(),
            exposed_ports: c
                .and_then(|c| c.exposed_ports.as_ref())
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default(),
            volumes: c
                .and_then(|c| c.volumes.as_ref())
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default(),
            stop_signal: c.and_then(|c| nonempty(&c.stop_signal)),
            os: self.os.clone(),
            architecture: self.architecture.clone(),
        }
    }
}

/// Releases pins taken by a pull when it ends, however it ends.
struct Pins<'a> {
    store: &'a Inner,
    keys: Vec<String>,
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        let mut st = self.store.lock();
        for k in &self.keys {
            if let Some(n) = st.pins.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    st.pins.remove(k);
                }
            }
        }
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store under `config.root`, loading the images and
    /// prepared rootfs records a previous instance left, and deleting leftovers of interrupted
    /// work.
    pub fn open(config: ImageStoreConfig) -> Result<Self> {
        // reqwest is built without a default crypto provider so that only ring is linked.
        let _ = rustls::crypto::ring::default_provider().install_default();

        let images = config.root.join("images");
        let dirs = Dirs {
            blobs: images.join("blobs").join("sha256"),
            layers: images.join("layers"),
            meta: images.join("meta"),
            tmp: images.join("tmp"),
            empty: images.join("empty"),
            rootfs: config.root.join("rootfs"),
            images,
        };
        for p in [&dirs.layers, &dirs.meta, &dirs.rootfs] {
            for c in p.to_string_lossy().chars() {
                if matches!(c, ',' | ':' | '\\') {
                    return Err(Error::InvalidArgument(format!(
                        "store root {} contains a character overlayfs options cannot carry",
                        config.root.display()
                    )));
                }
            }
        }
        if dirs.tmp.exists() {
            fs::remove_dir_all(&dirs.tmp).ctx(|| format!("clearing {}", dirs.tmp.display()))?;
        }
        for d in [
            &dirs.blobs,
            &dirs.layers,
            &dirs.meta,
            &dirs.tmp,
            &dirs.rootfs,
            &dirs.empty,
        ] {
            fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
        }

        let mut mirrors: HashMap<String, Vec<Endpoint>> = HashMap::new();
        let mut http_hosts: Vec<String> = config.insecure.clone();
        for (registry, urls) in &config.mirrors {
            for url in urls {
                let (host, http) = registry::parse_endpoint(url)?;
                if http && !http_hosts.contains(&host) {
                    http_hosts.push(host.clone());
                }
                mirrors
                    .entry(registry.clone())
                    .or_default()
                    .push(Endpoint { host, mirror: true });
            }
        }

        let mut state = State::default();
        for entry in fs::read_dir(&dirs.meta).ctx(|| format!("reading {}", dirs.meta.display()))? {
            let path = entry.ctx(|| "reading image metadata".into())?.path();
            if path.file_name().is_some_and(files::is_temporary) {
                // An interrupted write; the record it was replacing is intact.
                let _ = fs::remove_file(&path);
                continue;
            }
            if path.extension().is_some_and(|e| e == "json") {
                let data = fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
                let image: Image = serde_json::from_slice(&data).map_err(|e| Error::Corrupt {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                state.images.insert(image.id.clone(), image);
            }
        }
        for entry in
            fs::read_dir(&dirs.rootfs).ctx(|| format!("reading {}", dirs.rootfs.display()))?
        {
            let path = entry.ctx(|| "reading rootfs records".into())?.path();
            let record = path.join("rootfs.json");
            match fs::read(&record) {
                Ok(data) => {
                    let m: RootfsMount =
                        serde_json::from_slice(&data).map_err(|e| Error::Corrupt {
                            path: record.clone(),
                            detail: e.to_string(),
                        })?;
                    state.rootfs.insert(m.container_id.clone(), m);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Crashed before the record was written: nothing was mounted yet.
                    warn!(dir = %path.display(), "removing incomplete rootfs directory");
                    let _ = fs::remove_dir_all(&path);
                }
                Err(e) => return Err(Error::io(format!("reading {}", record.display()), e)),
            }
        }
        for entry in fs::read_dir(&dirs.layers).ctx(|| "reading layers".into())? {
            let entry = entry.ctx(|| "reading layers".into())?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let usage = fs::read(entry.path().join("usage.json"))
                .ok()
                .and_then(|d| serde_json::from_slice::<LayerUsage>(&d).ok())
                .unwrap_or_default();
            state.layers.insert(format!("sha256:{name}"), usage);
        }
        for entry in fs::read_dir(&dirs.blobs).ctx(|| "reading blobs".into())? {
            let entry = entry.ctx(|| "reading blobs".into())?;
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let name = entry.file_name().to_string_lossy().into_owned();
            state.blobs.insert(format!("sha256:{name}"), size);
        }

        let concurrency = if config.max_concurrent_downloads == 0 {
            3
        } else {
            config.max_concurrent_downloads
        };
        let store = ImageStore {
            inner: Arc::new(Inner {
                dirs,
                mirrors,
                clients: Clients::new(http_hosts),
                concurrency,
                state: Mutex::new(state),
                pulls: Flights::new(),
                blob_flights: Flights::new(),
                layer_flights: Flights::new(),
                counters: Counters::default(),
            }),
        };
        // Building an HTTP client loads the TLS roots (~100 ms); do it for anonymous pulls now
        // rather than in the first PullImage.
        store
            .inner
            .clients
            .get(
                &Endpoint {
                    host: "localhost".into(),
                    mirror: false,
                },
                "",
                None,
            )
            .map(drop)?;
        let removed = store.inner.collect_garbage();
        store.inner.delete_paths(removed);
        info!(
            root = %config.root.display(),
            images = store.inner.lock().images.len(),
            "image store opened"
        );
        Ok(store)
    }

    /// Pulls `reference` (any form kubelet or crictl send) and returns the stored image.
    /// Concurrent pulls of the same reference share one pull.
    pub async fn pull(&self, reference: &str, auth: Option<&RegistryAuth>) -> Result<Image> {
        let image_ref = ImageRef::parse(reference)?;
        let key = image_ref.normalized();
        let started = std::time::Instant::now();
        let image = self
            .inner
            .pulls
            .run(&key, || self.inner.pull_endpoints(&image_ref, auth))
            .await?;
        info!(image = %key, id = %image.id, elapsed_ms = started.elapsed().as_millis() as u64, "pulled");
        Ok(image)
    }

    /// All images, ordered by id.
    pub fn list(&self) -> Vec<Image> {
        self.inner.lock().images.values().cloned().collect()
    }

    /// Looks an image up by id (`sha256:<hex>` or bare hex), by normalised tag or by repo digest.
    /// `Ok(None)` if absent; a reference that does not parse is `InvalidReference`.
    pub fn status(&self, reference: &str) -> Result<Option<Image>> {
        let st = self.inner.lock();
        Ok(find_image(&st, reference)?.cloned())
    }

    /// Removes an image and every layer/blob no other image, rootfs or pull still uses.
    /// An image for which `in_use` returns true is refused with [`Error::InUse`].
    pub fn remove(
        &self,
        reference: &str,
        in_use: &dyn Fn(&ImageId) -> bool,
    ) -> Result<RemoveOutcome> {
        let removed_paths;
        let id;
        {
            let mut st = self.inner.lock();
            let Some(image) = find_image(&st, reference)? else {
                return Ok(RemoveOutcome::NotFound);
            };
            id = image.id.clone();
            if in_use(&id) {
                return Err(Error::InUse {
                    image: reference.to_string(),
                    id: id.0,
                });
            }
            let hex = digest_hex(&id.0).unwrap_or_default().to_string();
            let meta = self.inner.dirs.meta.join(format!("{hex}.json"));
            match fs::remove_file(&meta) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", meta.display()), e)),
            }
            st.images.remove(&id);
            drop(st);
            removed_paths = self.inner.collect_garbage();
        }
        self.inner.delete_paths(removed_paths);
        info!(image = reference, %id, "removed image");
        Ok(RemoveOutcome::Removed(id))
    }

    /// Usage of the store and its filesystem.
    pub fn fs_info(&self) -> Result<FsInfo> {
        let (used_bytes, used_inodes) = {
            let st = self.inner.lock();
            let layer_bytes: u64 = st.layers.values().map(|u| u.bytes).sum();
            let layer_inodes: u64 = st.layers.values().map(|u| u.inodes).sum();
            let blob_bytes: u64 = st.blobs.values().sum();
            (
                layer_bytes + blob_bytes,
                layer_inodes + st.blobs.len() as u64,
            )
        };
        let vfs = nix::sys::statvfs::statvfs(&self.inner.dirs.images).map_err(|e| {
            Error::io(
                format!("statvfs {}", self.inner.dirs.images.display()),
                e.into(),
            )
        })?;
        let frag = vfs.fragment_size();
        Ok(FsInfo {
            mountpoint: self.inner.dirs.images.clone(),
            used_bytes,
            used_inodes,
            fs_total_bytes: vfs.blocks() * frag,
            fs_available_bytes: vfs.blocks_available() * frag,
            fs_total_inodes: vfs.files(),
            fs_free_inodes: vfs.files_free(),
        })
    }

    /// Counters since open (for tests and metrics).
    pub fn stats(&self) -> PullStats {
        let c = &self.inner.counters;
        PullStats {
            blobs_fetched: c.blobs_fetched.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            layers_unpacked: c.layers_unpacked.load(Ordering::Relaxed),
        }
    }

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

fn find_image<'a>(st: &'a State, reference: &str) -> Result<Option<&'a Image>> {
    let id = if digest_hex(reference).is_some() {
        Some(reference.to_string())
    } else if reference.len() == 64
        && reference
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Some(format!("sha256:{reference}"))
    } else {
        None
    };
    if let Some(id) = id {
        return Ok(st.images.get(&ImageId(id)));
    }
    let r = ImageRef::parse(reference)?;
    let name = r.normalized();
    Ok(st.images.values().find(|img| {
        if r.digest().is_some() {
            img.repo_digests.contains(&name)
        } else {
            img.repo_tags.contains(&name)
        }
    }))
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn layer_dir(&self, diff_id: &str) -> PathBuf {
        self.dirs
            .layers
            .join(digest_hex(diff_id).unwrap_or("invalid"))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dirs
            .blobs
            .join(digest_hex(digest).unwrap_or("invalid"))
    }

    fn pin(&self, keys: Vec<String>) -> Pins<'_> {
        let mut st = self.lock();
        for k in &keys {
            *st.pins.entry(k.clone()).or_insert(0) += 1;
        }
        Pins { store: self, keys }
    }

    async fn pull_endpoints(&self, r: &ImageRef, auth: Option<&RegistryAuth>) -> Result<Image> {
        let mut endpoints: Vec<Endpoint> =
            self.mirrors.get(r.registry()).cloned().unwrap_or_default();
        endpoints.push(Endpoint {
            host: r.registry().to_string(),
            mirror: false,
        });
        let mut last = None;
        for ep in &endpoints {
            match self.pull_from(r, ep, auth).await {
                Ok(img) => return Ok(img),
                Err(e) if ep.mirror => {
                    warn!(image = %r, mirror = %ep.host, error = %e, "mirror failed, trying next endpoint");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::InvalidArgument("no endpoint".into())))
    }

    async fn pull_from(
        &self,
        r: &ImageRef,
        ep: &Endpoint,
        auth: Option<&RegistryAuth>,
    ) -> Result<Image> {
        let image = r.normalized();
        // docker.io's API lives at index.docker.io / registry-1.docker.io.
        let api_host = if !ep.mirror && ep.host == "docker.io" {
            "registry-1.docker.io".to_string()
        } else {
            ep.host.clone()
        };
        let (client, oci_auth) = self.clients.get(ep, &image, auth)?;
        let oref = r.on_host(&api_host);
        let map = |e| map_error(e, &image, &ep.host);
        let (manifest, manifest_digest, list_digest) = client
            .pull_image_manifest_and_list_digest(&oref, &oci_auth)
            .await
            .map_err(map)?;
        debug!(%image, endpoint = %ep.host, %manifest_digest, "manifest fetched");
        let unsupported = |detail: String| Error::Unsupported {
            image: image.clone(),
            registry: ep.host.clone(),
            detail,
        };
        let config_digest = manifest.config.digest.clone();
        if digest_hex(&config_digest).is_none() {
            return Err(unsupported(format!("config digest {config_digest:?}")));
        }
        for l in &manifest.layers {
            if digest_hex(&l.digest).is_none() || l.size < 0 {
                return Err(unsupported(format!("layer descriptor {}", l.digest)));
            }
        }
        let mut pin_keys = vec![config_digest.clone()];
        pin_keys.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        let _pins = self.pin(pin_keys);

        let config_desc = descriptor(&manifest.config);
        self.ensure_blob(&client, &oref, &config_desc, &image, &ep.host)
            .await?;
        let config_path = self.blob_path(&config_digest);
        let config_bytes = tokio::fs::read(&config_path)
            .await
            .ctx(|| format!("reading {}", config_path.display()))?;
        let raw: RawConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| unsupported(format!("image config: {e}")))?;
        if raw.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(unsupported(format!(
                "config lists {} diff_ids for {} layers",
                raw.rootfs.diff_ids.len(),
                manifest.layers.len()
            )));
        }
        if let Some(bad) = raw.rootfs.diff_ids.iter().find(|d| digest_hex(d).is_none()) {
            return Err(unsupported(format!("diff_id {bad:?}")));
        }
        if !raw.os.is_empty() && raw.os != "linux" {
            return Err(unsupported(format!("image os {:?}", raw.os)));
        }
        let _layer_pins = self.pin(raw.rootfs.diff_ids.clone());

        let layers: Vec<Layer> = manifest
            .layers
            .iter()
            .zip(&raw.rootfs.diff_ids)
            .map(|(d, diff_id)| Layer {
                diff_id: diff_id.clone(),
                digest: d.digest.clone(),
                size: d.size as u64,
                media_type: d.media_type.clone(),
            })
            .collect();
        // Collected first: a lazy `map` closure held across the await makes the future !Send
        // (higher-ranked lifetime inference).
        let jobs: Vec<_> = layers
            .iter()
            .map(|l| self.ensure_layer(&client, &oref, l, &image, &ep.host))
            .collect();
        futures_util::stream::iter(jobs)
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await?;

        let repo_digest = format!(
            "{}@{}",
            r.name(),
            list_digest.unwrap_or(manifest_digest.clone())
        );
        let size = manifest.config.size.max(0) as u64 + layers.iter().map(|l| l.size).sum::<u64>();
        let new = Image {
            id: ImageId(config_digest),
            repo_tags: r
                .tag()
                .map(|t| vec![format!("{}:{}", r.name(), t)])
                .unwrap_or_default(),
            repo_digests: vec![repo_digest],
            size,
            config: raw.image_config(),
            layers,
            manifest_digest,
        };
        // Layer files are written without fsync; one syncfs makes them durable before the
        // record that points at them.
        self.sync_store()?;
        self.commit(new)
    }

    fn sync_store(&self) -> Result<()> {
        let dir = fs::File::open(&self.dirs.images)
            .ctx(|| format!("opening {}", self.dirs.images.display()))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
            .map_err(|e| Error::io("syncfs of the image store", e.into()))
    }

    /// Records a pulled image: merges names into an existing record with the same id and moves
    /// its tag away from whichever image had it.
    fn commit(&self, new: Image) -> Result<Image> {
        let mut st = self.lock();
        let mut changed: Vec<ImageId> = vec![new.id.clone()];
        for tag in &new.repo_tags {
            for img in st.images.values_mut() {
                if img.id != new.id && img.repo_tags.contains(tag) {
                    img.repo_tags.retain(|t| t != tag);
                    changed.push(img.id.clone());
                }
            }
        }
        let entry = st.images.entry(new.id.clone()).or_insert_with(|| Image {
            repo_tags: vec![],
            repo_digests: vec![],
            ..new.clone()
        });
        for t in &new.repo_tags {
            if !entry.repo_tags.contains(t) {
                entry.repo_tags.push(t.clone());
            }
        }
        for d in &new.repo_digests {
            if !entry.repo_digests.contains(d) {
                entry.repo_digests.push(d.clone());
            }
        }
        let result = entry.clone();
        for id in changed {
            if let Some(img) = st.images.get(&id) {
                let hex = digest_hex(&id.0).unwrap_or("invalid");
                let data = serde_json::to_vec_pretty(img)
                    .map_err(|e| Error::io("encoding image record", io::Error::other(e)))?;
                let path = self.dirs.meta.join(format!("{hex}.json"));
                write_atomic(&path, &data)?;
            }
        }
        Ok(result)
    }

    async fn ensure_layer(
        &self,
        client: &oci_client::Client,
        oref: &oci_client::Reference,
        layer: &Layer,
        image: &str,
        host: &str,
    ) -> Result<()> {
        self.layer_flights
            .run(&layer.diff_id, || async {
                if self.lock().layers.contains_key(&layer.diff_id) {
                    return Ok(());
                }
                let desc = OciDescriptor {
                    media_type: layer.media_type.clone(),
                    digest: layer.digest.clone(),
                    size: layer.size as i64,
                    ..Default::default()
                };
                self.ensure_blob(client, oref, &desc, image, host).await?;
                let blob = self.blob_path(&layer.digest);
                let work = self.dirs.tmp.join(tmp_name("layer"));
                let final_dir = self.layer_dir(&layer.diff_id);
                let expected = layer.diff_id.clone();
                let (img, host_s, digest) =
                    (image.to_string(), host.to_string(), layer.digest.clone());
                let usage = tokio::task::spawn_blocking(move || {
                    let res =
                        unpack_into(&blob, &work, &final_dir, &expected, &img, &host_s, &digest);
                    if res.is_err() {
                        let _ = fs::remove_dir_all(&work);
                    }
                    res
                })
                .await
                .map_err(|e| Error::io("unpack task", io::Error::other(e)))??;
                self.counters
                    .layers_unpacked
                    .fetch_add(1, Ordering::Relaxed);
                self.lock().layers.insert(layer.diff_id.clone(), usage);
                Ok(())
            })
            .await
    }

    /// Downloads a blob into `blobs/` unless present, verifying its digest and size.
    async fn ensure_blob(
        &self,
        client: &oci_client::Client,
        oref: &oci_client::Reference,
        desc: &OciDescriptor,
        image: &str,
        host: &str,
    ) -> Result<()> {
        self.blob_flights
            .run(&desc.digest, || async {
                if self.lock().blobs.contains_key(&desc.digest) {
                    return Ok(());
                }
                let tmp = self.dirs.tmp.join(tmp_name("blob"));
                let res = self.download(client, oref, desc, image, host, &tmp).await;
                match res {
                    Ok(size) => {
                        let path = self.blob_path(&desc.digest);
                        fs::rename(&tmp, &path).ctx(|| format!("storing {}", path.display()))?;
                        self.lock().blobs.insert(desc.digest.clone(), size);
                        Ok(())
                    }
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        Err(e)
                    }
                }
            })
            .await
    }

    async fn download(
        &self,
        client: &oci_client::Client,
        oref: &oci_client::Reference,
        desc: &OciDescriptor,
        image: &str,
        host: &str,
        tmp: &Path,
    ) -> Result<u64> {
        self.counters.blobs_fetched.fetch_add(1, Ordering::Relaxed);
        let what = format!("blob {}", desc.digest);
        let mut stream = client
            .pull_blob_stream(oref, desc)
            .await
            .map_err(|e| map_error(e, image, host))?;
        let file = tokio::fs::File::create(tmp)
            .await
            .ctx(|| format!("creating {}", tmp.display()))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let limit = desc.size.max(0) as u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| map_io(e, image, host, &what))?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(Error::DigestMismatch {
                    image: image.to_string(),
                    registry: host.to_string(),
                    what,
                    expected: format!("{limit} bytes"),
                    actual: format!("more than {limit} bytes"),
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .ctx(|| format!("writing {}", tmp.display()))?;
        }
        self.counters
            .bytes_fetched
            .fetch_add(total, Ordering::Relaxed);
        out.flush()
            .await
            .ctx(|| format!("writing {}", tmp.display()))?;
        let file = out.into_inner();
        file.sync_all()
            .await
            .ctx(|| format!("syncing {}", tmp.display()))?;
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != desc.digest || total != limit {
            return Err(Error::DigestMismatch {
                image: image.to_string(),
                registry: host.to_string(),
                what,
                expected: format!("{} ({limit} bytes)", desc.digest),
                actual: format!("{actual} ({total} bytes)"),
            });
        }
        Ok(total)
    }

    /// Deletes (from the in-memory state, and renames away on disk) every layer and blob that
    /// nothing references. Returns the renamed paths; the caller deletes them outside the lock.
    fn collect_garbage(&self) -> Vec<PathBuf> {
        let mut st = self.lock();
        let mut live: HashSet<String> = st.pins.keys().cloned().collect();
        for img in st.images.values() {
            live.insert(img.id.0.clone());
            for l in &img.layers {
                live.insert(l.diff_id.clone());
                live.insert(l.digest.clone());
            }
        }
        for m in st.rootfs.values() {
            live.extend(m.layers.iter().cloned());
        }
        let dead_layers: Vec<String> = st
            .layers
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        let dead_blobs: Vec<String> = st
            .blobs
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        let mut doomed = Vec::new();
        for l in dead_layers {
            st.layers.remove(&l);
            let from = self.dirs.layers.join(l.trim_start_matches("sha256:"));
            let to = self.dirs.tmp.join(tmp_name("gc-layer"));
            match fs::rename(&from, &to) {
                Ok(()) => doomed.push(to),
                Err(e) => warn!(layer = %l, error = %e, "cannot remove layer"),
            }
            debug!(layer = %l, "layer unreferenced, removing");
        }
        for b in dead_blobs {
            st.blobs.remove(&b);
            let from = self.dirs.blobs.join(b.trim_start_matches("sha256:"));
            let to = self.dirs.tmp.join(tmp_name("gc-blob"));
            match fs::rename(&from, &to) {
                Ok(()) => doomed.push(to),
                Err(e) => warn!(blob = %b, error = %e, "cannot remove blob"),
            }
        }
        doomed
    }

    fn delete_paths(&self, paths: Vec<PathBuf>) {
        for p in paths {
            let res = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            if let Err(e) = res {
                warn!(path = %p.display(), error = %e, "cannot delete");
            }
        }
    }

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

fn descriptor(d: &OciDescriptor) -> OciDescriptor {
    // Foreign-layer URLs from the (untrusted) manifest are not followed.
    OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        ..Default::default()
    }
}

/// Unpacks `blob` into `work/fs`, checks the diff_id, and moves `work` to `final_dir`.
fn unpack_into(
    blob: &Path,
    work: &Path,
    final_dir: &Path,
    expected_diff_id: &str,
    image: &str,
    host: &str,
    digest: &str,
) -> Result<LayerUsage> {
    let fs_dir = work.join("fs");
    fs::create_dir_all(&fs_dir).ctx(|| format!("creating {}", fs_dir.display()))?;
    let unpacked = unpack::unpack_layer(blob, &fs_dir).map_err(|e| match e {
        unpack::UnpackError::Unsafe(detail) => Error::BadLayer {
            image: image.to_string(),
            layer: digest.to_string(),
            detail,
        },
        // A system errno is the local disk (ENOSPC, EIO...); the rest are archive read errors.
        unpack::UnpackError::Io(err) if err.raw_os_error().is_some() => {
            Error::io(format!("unpacking layer {digest} of {image}"), err)
        }
        unpack::UnpackError::Io(err) => Error::BadLayer {
            image: image.to_string(),
            layer: digest.to_string(),
            detail: format!("unpacking failed: {err}"),
        },
    })?;
    if unpacked.diff_id != expected_diff_id {
        return Err(Error::DigestMismatch {
            image: image.to_string(),
            registry: host.to_string(),
            what: format!("uncompressed layer {digest}"),
            expected: expected_diff_id.to_string(),
            actual: unpacked.diff_id,
        });
    }
    let usage = LayerUsage {
        bytes: unpacked.bytes,
        inodes: unpacked.inodes,
    };
    let data =
        serde_json::to_vec(&usage).map_err(|e| Error::io("encoding usage", io::Error::other(e)))?;
    fs::write(work.join("usage.json"), data).ctx(|| "writing layer usage".into())?;
    match fs::rename(work, final_dir) {
        Ok(()) => Ok(usage),
        // Another store instance on the same root finished it first.
        Err(e) if final_dir.join("fs").is_dir() => {
            debug!(error = %e, "layer already present");
            let _ = fs::remove_dir_all(work);
            Ok(usage)
        }
        Err(e) => Err(Error::io(
            format!("storing layer {}", final_dir.display()),
            e,
        )),
    }
}
