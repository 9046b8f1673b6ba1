//! The content store: blobs, unpacked layers and image records on disk, the
//! in-memory index of them, lookups, removal and garbage collection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::error::IoContext;
use super::flight::Flights;
use super::pull::Counters;
use super::registry::{self, Clients, Endpoint};
use super::rootfs::{self, RootfsMount};
use super::{Error, ImageRef, Result};
use crate::files::{self, write_atomic};

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
    /// What an (untrusted) image may hold.
    pub limits: ImageLimits,
}

/// Bounds on what a pulled image may make the host store or hold in
/// memory: its config is read whole, its layers are unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// A manifest or image index (JSON, read into memory).
    pub max_manifest_bytes: u64,
    /// The image config blob (JSON, read into memory).
    pub max_config_bytes: u64,
    /// Each layer (see [`super::unpack::LayerLimits`]).
    pub layer: super::unpack::LayerLimits,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            // As containers/image (CRI-O): real manifests are a few KiB.
            max_manifest_bytes: 4 << 20,
            max_config_bytes: 8 << 20,
            layer: Default::default(),
        }
    }
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

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(super) struct LayerUsage {
    pub(super) bytes: u64,
    pub(super) inodes: u64,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) images: BTreeMap<ImageId, Image>,
    pub(super) rootfs: HashMap<String, RootfsMount>,
    /// Digests / diff_ids used by pulls in progress; never garbage collected.
    pub(super) pins: HashMap<String, usize>,
    /// Unpacked layers present on disk.
    pub(super) layers: HashMap<String, LayerUsage>,
    /// Blobs present on disk and their sizes.
    pub(super) blobs: HashMap<String, u64>,
}

pub(super) struct Dirs {
    pub(super) images: PathBuf,
    pub(super) blobs: PathBuf,
    pub(super) layers: PathBuf,
    pub(super) meta: PathBuf,
    pub(super) tmp: PathBuf,
    pub(super) rootfs: PathBuf,
    pub(super) empty: PathBuf,
}

pub(super) struct Inner {
    pub(super) dirs: Dirs,
    pub(super) mirrors: HashMap<String, Vec<Endpoint>>,
    pub(super) clients: Clients,
    pub(super) concurrency: usize,
    pub(super) limits: ImageLimits,
    pub(super) state: Mutex<State>,
    pub(super) pulls: Flights<Image>,
    pub(super) blob_flights: Flights<()>,
    pub(super) layer_flights: Flights<()>,
    pub(super) counters: Counters,
}

/// The image store. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct ImageStore {
    pub(super) inner: Arc<Inner>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(super) fn tmp_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `sha256:<64 lowercase hex>`; anything else from a registry is refused before it names a file.
pub(super) fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
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
        // Layers hold whatever images carry (setuid binaries, device
        // nodes): no other host user may reach them.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dirs.images, fs::Permissions::from_mode(0o700))
                .ctx(|| format!("chmod {}", dirs.images.display()))?;
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
        state.rootfs = rootfs::load_records(&dirs.rootfs)?;
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
                limits: config.limits,
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
}

pub(super) fn find_image<'a>(st: &'a State, reference: &str) -> Result<Option<&'a Image>> {
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
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn layer_dir(&self, diff_id: &str) -> PathBuf {
        self.dirs
            .layers
            .join(digest_hex(diff_id).unwrap_or("invalid"))
    }

    pub(super) fn blob_path(&self, digest: &str) -> PathBuf {
        self.dirs
            .blobs
            .join(digest_hex(digest).unwrap_or("invalid"))
    }

    /// Records a pulled image: merges names into an existing record with the same id and moves
    /// its tag away from whichever image had it.
    pub(super) fn commit(&self, new: Image) -> Result<Image> {
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

    /// Deletes (from the in-memory state, and renames away on disk) every layer and blob that
    /// nothing references. Returns the renamed paths; the caller deletes them outside the lock.
    pub(super) fn collect_garbage(&self) -> Vec<PathBuf> {
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

    pub(super) fn delete_paths(&self, paths: Vec<PathBuf>) {
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
}
