//! Image store against a real registry (Debian's docker-registry on 127.0.0.1), with images
//! built here as OCI layouts and pushed with skopeo. Needs root (overlay mounts, whiteouts).

use husk_runtime::image::{Error, ErrorKind, Image, ImageStore, ImageStoreConfig, RemoveOutcome};
use husk_testkit::bench::median;
use husk_testkit::registry::{free_port, Registry};
use husk_testkit::sha256_digest;
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- registry

/// Blob GETs the registry served (from its access log).
fn blob_gets(reg: &Registry) -> usize {
    fs::read_to_string(reg.log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .count()
}

/// Content-Type of a manifest as the registry serves it (checks what skopeo pushed).
fn manifest_media_type(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-type:")
                .then(|| l[13..].trim().to_string())
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- OCI layout

#[derive(Clone, Copy)]
enum Comp {
    Plain,
    Gzip,
    Zstd,
}

enum Entry {
    Dir(&'static str),
    File(&'static str, Vec<u8>, u32),
    Symlink(&'static str, &'static str),
}

struct BuiltLayer {
    blob: Vec<u8>,
    diff_id: String,
    media_type: &'static str,
}

fn layer(entries: &[Entry], comp: Comp) -> BuiltLayer {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let diff_id = sha256_digest(&tar);
    let (blob, media_type) = match comp {
        Comp::Plain => (tar, "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&tar).unwrap();
            (
                gz.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Comp::Zstd => (
            zstd::encode_all(&tar[..], 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    };
    BuiltLayer {
        blob,
        diff_id,
        media_type,
    }
}

struct Layout {
    dir: PathBuf,
    index: Vec<serde_json::Value>,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            index: vec![],
        }
    }

    fn blob(&self, data: &[u8]) -> (String, usize) {
        let d = sha256_digest(data);
        fs::write(
            self.dir
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
            data,
        )
        .unwrap();
        (d, data.len())
    }

    /// Writes config + manifest; returns the manifest descriptor.
    fn image(&self, layers: &[&BuiltLayer], arch: &str, cmd: &str) -> serde_json::Value {
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": [cmd], "WorkingDir": "/", "User": "1000:1000",
                        "Labels": {"husk.test": "yes"}},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        });
        let (cd, cs) = self.blob(&serde_json::to_vec(&config).unwrap());
        let ls: Vec<_> = layers
            .iter()
            .map(|l| {
                let (d, s) = self.blob(&l.blob);
                serde_json::json!({"mediaType": l.media_type, "digest": d, "size": s})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": ls,
        });
        let (md, ms) = self.blob(&serde_json::to_vec(&manifest).unwrap());
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
                           "platform": {"architecture": arch, "os": "linux"}})
    }

    fn tag(&mut self, tag: &str, mut desc: serde_json::Value) {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(desc);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.index});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    fn tag_index(&mut self, tag: &str, manifests: Vec<serde_json::Value>) {
        let idx = serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        let (d, s) = self.blob(&serde_json::to_vec(&idx).unwrap());
        self.tag(
            tag,
            serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s}),
        );
    }
}

fn push_uncompressed(reg: &Registry, layers: &[&BuiltLayer], name: &str) {
    push_annotated(reg, layers, name, None)
}

/// Pushes with oci-client; `annotations` go into the manifest.
fn push_annotated(
    reg: &Registry,
    layers: &[&BuiltLayer],
    name: &str,
    annotations: Option<std::collections::BTreeMap<String, String>>,
) {
    use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let image_layers: Vec<ImageLayer> = layers
        .iter()
        .map(|l| ImageLayer::new(l.blob.clone(), l.media_type.to_string(), None))
        .collect();
    let reference: oci_client::Reference = format!("{}/{name}", reg.host()).parse().unwrap();
    let config = Config::oci_v1(serde_json::to_vec(&config).unwrap(), None);
    let manifest = annotations
        .map(|a| oci_client::manifest::OciImageManifest::build(&image_layers, &config, Some(a)));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(client.push(
            &reference,
            &image_layers,
            config,
            &oci_client::secrets::RegistryAuth::Anonymous,
            manifest,
        ))
        .unwrap();
}

fn skopeo_push(layout: &Path, tag: &str, dest: &str, extra: &[&str]) {
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
        .args(extra)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {tag} -> {dest}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pushes the test images to `reg`:
/// - `busybox:v1`: one gzip layer: busybox + applets, /etc/passwd, /etc/group,
///   /var/lib/data/{a,b}
/// - `busybox:v2`: v1's layer + a zstd layer: adds /hello.txt, whiteout of /etc/group,
///   opaque /var/lib/data with a new file c
/// - `busybox:plain`: v1's layer + an uncompressed layer adding /plain.txt
/// - `busybox:docker`: v1 as a Docker v2 schema 2 manifest
/// - `busybox:multi`: an index with linux/arm64 (first) and linux/amd64 entries
/// - `pause:3.9`: = v1 (for the mirror test)
fn push_test_images(reg: &Registry) {
    let tmp = tempfile::tempdir().unwrap();
    let mut lay = Layout::new(tmp.path());
    let busybox = fs::read(husk_testkit::busybox::path().unwrap()).expect("busybox-static");
    let mut base = vec![
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", busybox, 0o755),
    ];
    for applet in ["sh", "ls", "cat", "echo", "sleep", "true"] {
        base.push(Entry::Symlink(
            Box::leak(format!("bin/{applet}").into_boxed_str()),
            "busybox",
        ));
    }
    base.extend([
        Entry::Dir("etc/"),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
            0o644,
        ),
        Entry::File("etc/group", b"root:x:0:\n".to_vec(), 0o644),
        Entry::Dir("var/"),
        Entry::Dir("var/lib/"),
        Entry::Dir("var/lib/data/"),
        Entry::File("var/lib/data/a", b"a".to_vec(), 0o644),
        Entry::File("var/lib/data/b", b"b".to_vec(), 0o644),
    ]);
    let l_base = layer(&base, Comp::Gzip);
    let l_v2 = layer(
        &[
            Entry::File("hello.txt", b"hello from v2\n".to_vec(), 0o644),
            Entry::Dir("etc/"),
            Entry::File("etc/.wh.group", vec![], 0o644),
            Entry::Dir("var/lib/data/"),
            Entry::File("var/lib/data/.wh..wh..opq", vec![], 0o644),
            Entry::File("var/lib/data/c", b"c".to_vec(), 0o644),
        ],
        Comp::Zstd,
    );
    let l_plain = layer(
        &[Entry::File("plain.txt", b"plain\n".to_vec(), 0o644)],
        Comp::Plain,
    );
    let l_arm = layer(
        &[Entry::File("arm64", b"not for us\n".to_vec(), 0o644)],
        Comp::Gzip,
    );

    let v1 = lay.image(&[&l_base], "amd64", "/bin/sh");
    lay.tag("v1", v1.clone());
    lay.tag("v2", lay.image(&[&l_base, &l_v2], "amd64", "/bin/sh"));
    let arm = lay.image(&[&l_arm], "arm64", "/arm");
    let mut arm_desc = arm.clone();
    arm_desc["platform"] = serde_json::json!({"architecture": "arm64", "os": "linux"});
    lay.tag_index("multi", vec![arm_desc, v1]);

    let h = reg.host();
    skopeo_push(tmp.path(), "v1", &format!("{h}/busybox:v1"), &[]);
    skopeo_push(tmp.path(), "v2", &format!("{h}/busybox:v2"), &[]);
    // skopeo compresses uncompressed layers on the way to a registry; push this one with
    // oci-client so the registry really serves a plain tar layer.
    push_uncompressed(reg, &[&l_base, &l_plain], "busybox:plain");
    skopeo_push(
        tmp.path(),
        "v1",
        &format!("{h}/busybox:docker"),
        &["--format", "v2s2"],
    );
    skopeo_push(
        tmp.path(),
        "multi",
        &format!("{h}/busybox:multi"),
        &["--all"],
    );
    skopeo_push(tmp.path(), "v1", &format!("{h}/pause:3.9"), &[]);
}

// ---------------------------------------------------------------- helpers

fn store(root: &Path, reg: Option<&Registry>, mirrors: HashMap<String, Vec<String>>) -> ImageStore {
    ImageStore::open(ImageStoreConfig {
        root: root.to_path_buf(),
        mirrors,
        insecure: reg.map(|r| vec![r.host()]).unwrap_or_default(),
        max_concurrent_downloads: 0,
        limits: Default::default(),
    })
    .unwrap()
}

fn count_entries(dir: &Path) -> usize {
    fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn mounted_under(path: &Path) -> Vec<String> {
    let p = path.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| m.starts_with(&p))
        })
        .map(String::from)
        .collect()
}

/// A registry with the test images (and its host), an empty store root,
/// and a runtime to pull with.
fn registry_and_root() -> (Registry, String, tempfile::TempDir, tokio::runtime::Runtime) {
    let reg = Registry::start().unwrap();
    push_test_images(&reg);
    let h = reg.host();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (reg, h, tempfile::tempdir().unwrap(), rt)
}

// ---------------------------------------------------------------- tests

#[test]
fn pull_store_restart_rootfs_and_remove() {
    let (reg, h, root, rt) = registry_and_root();
    let s = store(root.path(), Some(&reg), HashMap::new());

    // OCI manifest, gzip layer, insecure (HTTP) registry.
    let v1 = rt
        .block_on(s.pull(&format!("{h}/busybox:v1"), None))
        .unwrap();
    assert_eq!(v1.repo_tags, vec![format!("{h}/busybox:v1")]);
    assert!(v1.repo_digests[0].starts_with(&format!("{h}/busybox@sha256:")));
    assert_eq!(v1.layers.len(), 1);
    assert_eq!(v1.config.cmd, vec!["/bin/sh"]);
    assert_eq!(v1.config.env, vec!["PATH=/bin"]);
    assert_eq!(v1.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(v1.config.working_dir.as_deref(), Some("/"));
    assert_eq!(
        v1.config.labels.get("husk.test").map(String::as_str),
        Some("yes")
    );
    assert!(v1.size > 900_000, "size {}", v1.size);

    // Docker v2 schema 2 manifest of the same image: same id, names merged.
    assert_eq!(
        manifest_media_type(reg.port(), "/v2/busybox/manifests/docker"),
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let docker = rt
        .block_on(s.pull(&format!("{h}/busybox:docker"), None))
        .unwrap();
    assert_eq!(docker.id, v1.id);
    assert_eq!(docker.repo_tags.len(), 2);
    assert_eq!(docker.repo_digests.len(), 2);

    // Shared base layer + zstd layer; base stored once.
    let layers_before = count_entries(&root.path().join("images/layers"));
    let v2 = rt
        .block_on(s.pull(&format!("{h}/busybox:v2"), None))
        .unwrap();
    assert_eq!(v2.layers[0].diff_id, v1.layers[0].diff_id);
    assert!(v2.layers[1].media_type.ends_with("zstd"), "{:?}", v2.layers);
    assert_eq!(
        count_entries(&root.path().join("images/layers")),
        layers_before + 1
    );
    // Uncompressed layer.
    let plain = rt
        .block_on(s.pull(&format!("{h}/busybox:plain"), None))
        .unwrap();
    assert_eq!(
        plain.layers[1].media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(count_entries(&root.path().join("images/layers")), 3);

    // Multi-arch index resolves to linux/amd64; repo digest is the index digest.
    let multi = rt
        .block_on(s.pull(&format!("{h}/busybox:multi"), None))
        .unwrap();
    assert_eq!(multi.id, v1.id, "amd64 entry is the v1 image");
    assert_eq!(multi.config.architecture, "amd64");
    assert_ne!(
        multi.manifest_digest,
        multi
            .repo_digests
            .last()
            .unwrap()
            .split('@')
            .nth(1)
            .unwrap()
    );

    // Lookup by id, bare hex, tag, repo digest.
    assert_eq!(s.status(&v2.id.0).unwrap().unwrap().id, v2.id);
    assert_eq!(
        s.status(v2.id.0.trim_start_matches("sha256:"))
            .unwrap()
            .unwrap()
            .id,
        v2.id
    );
    assert_eq!(s.status(&v2.repo_digests[0]).unwrap().unwrap().id, v2.id);
    assert!(s.status(&format!("{h}/busybox:nope")).unwrap().is_none());
    assert_eq!(
        s.status("Bad:Ref").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // Restart: a new store on the same root lists the same images.
    let mut before: Vec<Image> = s.list();
    drop(s);
    let s = store(root.path(), Some(&reg), HashMap::new());
    let mut after = s.list();
    before.sort_by(|a, b| a.id.cmp(&b.id));
    after.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(before, after);
    assert_eq!(after.len(), 3);
    let fsinfo = s.fs_info().unwrap();
    assert!(
        fsinfo.used_bytes > 2_000_000 && fsinfo.used_inodes > 10,
        "{fsinfo:?}"
    );
    assert!(fsinfo.fs_total_bytes > fsinfo.used_bytes);

    // Rootfs of v2: busybox from the lower layer, whiteouts applied, writes go to upper.
    let share = tempfile::tempdir().unwrap();
    let target = share.path().join("c1/rootfs");
    let m = s
        .prepare_rootfs(&format!("{h}/busybox:v2"), "c1", &target)
        .unwrap();
    assert_eq!(m.lower_dirs.len(), 2);
    assert_eq!(mounted_under(&target).len(), 1);
    let bb = fs::metadata(target.join("bin/busybox")).unwrap();
    assert!(bb.is_file() && bb.len() > 900_000);
    assert_eq!(
        fs::read_link(target.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read(target.join("hello.txt")).unwrap(),
        b"hello from v2\n"
    );
    assert!(target.join("etc/passwd").exists());
    assert!(
        !target.join("etc/group").exists(),
        "whiteout hides etc/group"
    );
    let data: Vec<_> = fs::read_dir(target.join("var/lib/data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(data, vec!["c"], "opaque dir hides a and b");
    // The busybox binary runs from the overlay.
    let out = Command::new(target.join("bin/busybox"))
        .arg("echo")
        .arg("ok")
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"ok\n");
    fs::write(target.join("new.txt"), b"written").unwrap();
    fs::remove_file(target.join("etc/passwd")).unwrap();
    assert_eq!(fs::read(m.upper_dir.join("new.txt")).unwrap(), b"written");
    let wh = fs::symlink_metadata(m.upper_dir.join("etc/passwd")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let lower_passwd = m.lower_dirs.last().unwrap().join("etc/passwd");
    assert!(lower_passwd.exists(), "lower layer untouched");
    assert_eq!(
        s.prepare_rootfs(&v2.id.0, "c1", &target)
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );

    // Removal: refused while the caller says in use; layers of a mounted rootfs survive
    // removal of their image until release.
    let err = s.remove(&v2.id.0, &|id| *id == v2.id).unwrap_err();
    assert!(matches!(err, Error::InUse { .. }), "{err}");
    assert_eq!(
        s.remove(&format!("{h}/busybox:v2"), &|_| false).unwrap(),
        RemoveOutcome::Removed(v2.id.clone())
    );
    let v2_top = m.lower_dirs[0].clone();
    assert!(v2_top.exists(), "mounted layer kept");
    assert!(target.join("hello.txt").exists());
    // Restart with a mounted rootfs: the record survives and release works from the new store.
    drop(s);
    let s = store(root.path(), Some(&reg), HashMap::new());
    assert_eq!(s.rootfs_mounts().len(), 1);
    assert!(v2_top.exists());
    s.release_rootfs("c1").unwrap();
    assert!(
        mounted_under(share.path()).is_empty(),
        "{:?}",
        mounted_under(share.path())
    );
    assert!(!m.upper_dir.exists());
    assert!(
        !v2_top.exists(),
        "unreferenced v2 layer removed after release"
    );
    assert!(v1.layers[0].diff_id.len() > 7);
    assert_eq!(count_entries(&root.path().join("images/layers")), 2);
    assert_eq!(
        s.release_rootfs("c1").unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // Removing v1 (by id) keeps the base layer, which `plain` still uses.
    assert!(matches!(
        s.remove(&v1.id.0, &|_| false).unwrap(),
        RemoveOutcome::Removed(_)
    ));
    assert_eq!(count_entries(&root.path().join("images/layers")), 2);
    assert_eq!(
        s.remove(&v1.id.0, &|_| false).unwrap(),
        RemoveOutcome::NotFound
    );
    s.remove(&plain.id.0, &|_| false).unwrap();
    assert!(s.list().is_empty());
    assert_eq!(count_entries(&root.path().join("images/layers")), 0);
    assert_eq!(count_entries(&root.path().join("images/blobs/sha256")), 0);
    assert_eq!(count_entries(&root.path().join("images/meta")), 0);
    assert_eq!(count_entries(&root.path().join("images/tmp")), 0);
}

#[test]
fn mirrors_and_errors() {
    let (reg, h, root, rt) = registry_and_root();
    let dead = format!("127.0.0.1:{}", free_port().unwrap());
    let mirrors = HashMap::from([(
        "registry.k8s.io".to_string(),
        // A dead mirror first: the next one is tried.
        vec![format!("http://{dead}"), format!("http://{h}")],
    )]);
    let s = store(root.path(), Some(&reg), mirrors);

    // Mirror: fake registry name served by the local registry; the image keeps its name.
    let pause = rt
        .block_on(s.pull("registry.k8s.io/pause:3.9", None))
        .unwrap();
    assert_eq!(pause.repo_tags, vec!["registry.k8s.io/pause:3.9"]);
    assert!(pause.repo_digests[0].starts_with("registry.k8s.io/pause@sha256:"));
    assert!(s.status("registry.k8s.io/pause:3.9").unwrap().is_some());

    // Missing tag -> NotFound naming image and registry.
    let err = rt
        .block_on(s.pull(&format!("{h}/busybox:missing"), None))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("busybox:missing") && msg.contains(&h), "{msg}");
    // Missing repository -> NotFound.
    let err = rt
        .block_on(s.pull(&format!("{h}/nothere:1"), None))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    // Registry down -> Unavailable.
    let s_dead = store(&root.path().join("other"), None, HashMap::new());
    let err = ImageStore::open(ImageStoreConfig {
        root: root.path().join("other2"),
        insecure: vec![dead.clone()],
        ..Default::default()
    })
    .map(|s| rt.block_on(s.pull(&format!("{dead}/busybox:v1"), None)))
    .unwrap()
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains(&dead), "{err}");
    // HTTPS to a plain-HTTP registry (not configured insecure) fails too, as Unavailable.
    let err = rt
        .block_on(s_dead.pull(&format!("{h}/busybox:v1"), None))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    // Bad references -> InvalidArgument naming the reference.
    for bad in ["UPPER/case", "busybox@sha256:123", "a b", ""] {
        let err = rt.block_on(s.pull(bad, None)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad}: {err}");
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }

    // A digest that the registry does not have -> NotFound.
    let zero = "0".repeat(64);
    let err = rt
        .block_on(s.pull(&format!("{h}/busybox@sha256:{zero}"), None))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // By digest that exists: no tag, repo digest recorded.
    let by_digest = rt
        .block_on(s.pull(
            &pause.repo_digests[0].replace("registry.k8s.io/pause", &format!("{h}/pause")),
            None,
        ))
        .unwrap();
    assert_eq!(by_digest.id, pause.id);
    assert!(by_digest
        .repo_digests
        .iter()
        .any(|d| d.starts_with(&format!("{h}/pause@"))));
}

#[test]
fn concurrent_pulls_download_once() {
    let (reg, h, root, rt) = registry_and_root();
    let s = store(root.path(), Some(&reg), HashMap::new());
    let gets_before = blob_gets(&reg);
    // 6 pulls of v2 and 6 of plain at once: they share the base layer.
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..12 {
            let s = s.clone();
            let r = if i % 2 == 0 {
                format!("{h}/busybox:v2")
            } else {
                format!("{h}/busybox:plain")
            };
            tasks.push(tokio::spawn(async move { s.pull(&r, None).await }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    assert_eq!(results.len(), 12);
    let stats = s.stats();
    // Blobs: 2 configs + base + v2 layer + plain layer.
    assert_eq!(stats.blobs_fetched, 5, "{stats:?}");
    assert_eq!(stats.layers_unpacked, 3, "{stats:?}");
    assert_eq!(
        blob_gets(&reg) - gets_before,
        5,
        "registry served each blob once"
    );
    assert_eq!(s.list().len(), 2);
}

/// Pull time of busybox:v1 (one ~1 MB gzip layer) into a running store that does not have it:
/// like critest's PullImage benchmark, the store (daemon) stays up and the image is removed
/// between pulls, so every pull downloads and unpacks everything. Median of 5.
#[test]
fn pull_time_median() {
    let (reg, h, root, rt) = registry_and_root();
    let s = store(root.path(), Some(&reg), HashMap::new());
    let image = format!("{h}/busybox:v1");
    let mut times = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        rt.block_on(s.pull(&image, None)).unwrap();
        times.push(t.elapsed());
        assert!(matches!(
            s.remove(&image, &|_| false).unwrap(),
            RemoveOutcome::Removed(_)
        ));
        assert_eq!(count_entries(&root.path().join("images/layers")), 0);
    }
    let first = times.remove(0);
    let median_ms = median(&times).as_secs_f64() * 1000.0;
    times.sort();
    eprintln!(
        "PullImage busybox:v1: first (cold client) {:.1} ms; median of 5 fresh pulls {:.1} ms (all: {:?})",
        first.as_secs_f64() * 1000.0,
        median_ms,
        times.iter().map(|t| format!("{:.1}", t.as_secs_f64() * 1000.0)).collect::<Vec<_>>()
    );
    assert_eq!(
        s.stats().blobs_fetched,
        12,
        "config + layer downloaded on every pull"
    );
    assert!(median(&times) < Duration::from_secs(5));
}

/// Hostile images (issue 14): a gzip bomb, a tar long-name record far
/// larger than any path, and whiteouts that name the layer's own
/// directories. Each pull fails at once with a clear error naming the
/// layer, and no layer, image record or temporary is left behind.
#[test]
fn hostile_images_fail_cleanly() {
    let reg = Registry::start().unwrap();
    let gz = |tar: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(tar).unwrap();
        BuiltLayer {
            blob: e.finish().unwrap(),
            diff_id: sha256_digest(tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    };
    let tar_of = |build: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        {
            let n = &mut h.as_old_mut().name;
            n.fill(0);
            n[..name.len()].copy_from_slice(name.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    // 256 MiB of zeros: about 250 KiB of gzip.
    let bomb = gz(&tar_of(&|b| file(b, "zeros", &vec![0u8; 256 << 20])));
    assert!(bomb.blob.len() < 1 << 20);
    // A 16 MiB GNU long-name record (the tar crate would read it whole).
    let long_name = gz(&tar_of(&|b| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(16 << 20);
        {
            let n = &mut h.as_old_mut().name;
            n[..13].copy_from_slice(b"././@LongLink");
        }
        h.set_cksum();
        b.append(&h, &vec![b'a'; 16 << 20][..]).unwrap();
        file(b, "short", b"x");
    }));
    let whiteout = gz(&tar_of(&|b| file(b, ".wh...", b"")));
    for (name, layer, want) in [
        ("hostile/bomb:1", &bomb, "bytes uncompressed"),
        ("hostile/longname:1", &long_name, "metadata record"),
        ("hostile/whiteout:1", &whiteout, "names no file"),
    ] {
        push_uncompressed(&reg, &[layer], name);
        let root = tempfile::tempdir().unwrap();
        let s = ImageStore::open(ImageStoreConfig {
            root: root.path().to_path_buf(),
            insecure: vec![reg.host()],
            limits: husk_runtime::image::ImageLimits {
                layer: husk_runtime::image::LayerLimits {
                    max_bytes: 64 << 20,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let t = std::time::Instant::now();
        let e = rt
            .block_on(s.pull(&format!("{}/{name}", reg.host()), None))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{name}: {:?}",
            t.elapsed()
        );
        assert!(s.list().is_empty());
        let images = root.path().join("images");
        for d in ["layers", "tmp", "meta"] {
            assert_eq!(count_entries(&images.join(d)), 0, "{name}: {d} not empty");
        }
        // The store's own directory holds nothing of the layer's content.
        assert!(!root.path().join("zeros").exists() && !root.path().join("short").exists());
    }
}

/// A registry that attacks the puller through the manifest response: `/manifests/declared`
/// announces 10 GB, `/manifests/endless` streams chunks until the client hangs up. Counts what it
/// managed to send of the endless body.
struct HostileRegistry {
    port: u16,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HostileRegistry {
    fn start() -> Self {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { return };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut req = Vec::new();
                    let mut b = [0u8; 1];
                    while !req.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                        req.push(b[0]);
                    }
                    let line = String::from_utf8_lossy(&req)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let ct = "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n";
                    if line.contains("/manifests/declared") {
                        let _ = write!(c, "HTTP/1.1 200 OK\r\n{ct}Content-Length: 10000000000\r\nConnection: close\r\n\r\n{{\"schemaVersion\": 2, ");
                    } else if line.contains("/manifests/endless") {
                        let _ = write!(c, "HTTP/1.1 200 OK\r\n{ct}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
                        let chunk = vec![b' '; 64 << 10];
                        // Up to 4 GiB, far more than a test machine would want to hold.
                        for _ in 0..(4u64 << 30) / chunk.len() as u64 {
                            let ok = write!(c, "{:x}\r\n", chunk.len()).is_ok()
                                && c.write_all(&chunk).is_ok()
                                && c.write_all(b"\r\n").is_ok();
                            if !ok {
                                break;
                            }
                            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                    } else {
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                        );
                    }
                });
            }
        });
        HostileRegistry { port, sent }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Manifests are read with a bound (issue 14): a manifest larger than `max_manifest_bytes` on a
/// real registry, and a hostile registry that declares a 10 GB manifest or streams one without
/// end. Each pull fails at once naming the limit, the endless stream is cut off close to the
/// limit instead of being read into memory, and nothing is left in the store.
#[test]
fn oversized_manifests_are_refused() {
    const LIMIT: u64 = 64 << 10;
    let reg = Registry::start().unwrap();
    let hostile = HostileRegistry::start();
    let layer = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_path("f").unwrap();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        BuiltLayer {
            diff_id: sha256_digest(&tar),
            blob: tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    };
    let fat: std::collections::BTreeMap<String, String> =
        [("padding".to_string(), "p".repeat(256 << 10))].into();
    push_annotated(&reg, &[&layer], "hostile/fat:1", Some(fat));
    let root = tempfile::tempdir().unwrap();
    let open = |max_manifest_bytes| {
        ImageStore::open(ImageStoreConfig {
            root: root.path().to_path_buf(),
            insecure: vec![reg.host(), hostile.host()],
            limits: husk_runtime::image::ImageLimits {
                max_manifest_bytes,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap()
    };
    let s = open(LIMIT);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for image in [
        format!("{}/hostile/fat:1", reg.host()),
        format!("{}/hostile/x:declared", hostile.host()),
        format!("{}/hostile/x:endless", hostile.host()),
    ] {
        let t = Instant::now();
        let e = rt.block_on(s.pull(&image, None)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("max_manifest_bytes"), "{image}: {msg}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{image}: {:?}",
            t.elapsed()
        );
        assert!(s.list().is_empty());
    }
    // The client hung up long before the 4 GiB: what it read is the limit plus buffers.
    std::thread::sleep(Duration::from_millis(200));
    let sent = hostile.sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent < 32 << 20,
        "the endless manifest was read for {sent} bytes"
    );
    for d in ["layers", "tmp", "meta"] {
        assert_eq!(
            count_entries(&root.path().join("images").join(d)),
            0,
            "{d} not empty"
        );
    }
    // The same image pulls under the default limit: the refusal was the limit's.
    drop(s);
    let s = open(husk_runtime::image::ImageLimits::default().max_manifest_bytes);
    rt.block_on(s.pull(&format!("{}/hostile/fat:1", reg.host()), None))
        .unwrap();
}
