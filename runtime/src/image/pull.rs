//! Pulling from registries: endpoint and mirror order, manifest and config
//! checks, verified blob downloads and layer unpacking, deduplicated across
//! concurrent pulls.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{StreamExt, TryStreamExt};
use oci_client::manifest::OciDescriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::error::IoContext;
use super::manifest::ManifestSource;
use super::registry::{map_error, map_io, Endpoint};
use super::store::{digest_hex, tmp_name, Inner, LayerUsage};
use super::{
    unpack, Error, Image, ImageConfig, ImageId, ImageRef, ImageStore, Layer, RegistryAuth, Result,
};

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
pub(super) struct Counters {
    blobs_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    layers_unpacked: AtomicU64,
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

    /// Counters since open (for tests and metrics).
    pub fn stats(&self) -> PullStats {
        let c = &self.inner.counters;
        PullStats {
            blobs_fetched: c.blobs_fetched.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            layers_unpacked: c.layers_unpacked.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
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
        let http = self.clients.http(&image, &ep.host)?;
        let (manifest, manifest_digest, list_digest) = ManifestSource {
            client: &client,
            http: &http,
            auth: &oci_auth,
            scheme: self.clients.scheme(&api_host),
            max_bytes: self.limits.max_manifest_bytes,
            image: &image,
            registry: &ep.host,
        }
        .image_manifest(&oref)
        .await?;
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

        let max_config = self.limits.max_config_bytes;
        if manifest.config.size < 0 || manifest.config.size as u64 > max_config {
            return Err(unsupported(format!(
                "image config of {} bytes (at most {max_config})",
                manifest.config.size
            )));
        }
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
                let limits = self.limits.layer;
                let usage = tokio::task::spawn_blocking(move || {
                    let res = unpack_into(
                        &blob,
                        &work,
                        &final_dir,
                        &expected,
                        &limits,
                        (&img, &host_s, &digest),
                    );
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
    limits: &unpack::LayerLimits,
    (image, host, digest): (&str, &str, &str),
) -> Result<LayerUsage> {
    let fs_dir = work.join("fs");
    fs::create_dir_all(&fs_dir).ctx(|| format!("creating {}", fs_dir.display()))?;
    let unpacked = unpack::unpack_layer(blob, &fs_dir, limits).map_err(|e| match e {
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
