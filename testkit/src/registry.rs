//! A real OCI registry for tests: Debian's `docker-registry` bound to
//! 127.0.0.1 on a free port, and a busybox image built here (one gzip
//! layer: the static busybox with every applet) pushed to it with skopeo.
//!
//! [`Registry::start_with_auth`] turns on the registry's htpasswd auth
//! (HTTP Basic; distribution 2.8 accepts it over plain HTTP, so no TLS is
//! needed on 127.0.0.1), and pushes then carry the credentials.
//!
//! Here rather than in husk-tests so that husk-runtime's own tests
//! (image_store.rs) can use it: husk-tests depends on husk-runtime.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// A running registry; killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    dir: tempfile::TempDir,
    /// `user:password` when htpasswd auth is on.
    creds: Option<String>,
}

/// A port nothing listens on at the time of asking.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Status code of a plain HTTP GET, `None` if nothing answered.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Registry {
    /// Starts `/usr/bin/docker-registry` and waits until `/v2/` answers.
    pub fn start() -> Result<Registry> {
        Self::start_inner(None)
    }

    /// Like [`Registry::start`], with htpasswd auth: one user `user` with
    /// `password` (stored as a bcrypt hash, the only format the registry
    /// accepts). Every request without these credentials gets 401.
    pub fn start_with_auth(user: &str, password: &str) -> Result<Registry> {
        ensure!(
            !user.is_empty() && !user.contains(':') && !user.contains('\n'),
            "htpasswd user {user:?} must be non-empty without ':' or newline"
        );
        Self::start_inner(Some((user, password)))
    }

    fn start_inner(auth: Option<(&str, &str)>) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage)?;
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            // Cost 4 (the minimum): the registry checks the hash on every
            // request, and the test does not need brute-force resistance.
            let hash = bcrypt::hash(password, 4).context("bcrypt")?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: husk-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, text)?;
        let log = dir.path().join("registry.log");
        let logf = std::fs::File::create(&log)?;
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting /usr/bin/docker-registry (apt-get install docker-registry)")?;
        let mut reg = Registry {
            child: Some(child),
            port,
            log,
            dir,
            creds: auth.map(|(u, p)| format!("{u}:{p}")),
        };
        // With auth on, /v2/ answers 401 once the registry is up.
        let up = if reg.creds.is_some() { 401 } else { 200 };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get_status(port, "/v2/") != Some(up) {
            if let Some(Ok(Some(st))) = reg.child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "registry exited: {st}: {}",
                    std::fs::read_to_string(&reg.log).unwrap_or_default()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "registry did not come up in 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(reg)
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The registry's output, its access log included.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Stops the registry (pulls then fail as Unavailable).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Builds the busybox image and pushes it as `REPO:TAG`; returns the
    /// full reference `127.0.0.1:PORT/REPO:TAG`.
    pub fn push_busybox(&self, repo_tag: &str) -> Result<String> {
        let layout = self.dir.path().join(format!("layout-{}", self.port));
        if !layout.exists() {
            build_busybox_layout(&layout)?;
        }
        let dest = format!("{}/{repo_tag}", self.host());
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"]);
        if let Some(c) = &self.creds {
            cmd.arg("--dest-creds").arg(c);
        }
        let out = cmd
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{dest}"))
            .output()
            .context("running skopeo (apt-get install skopeo)")?;
        ensure!(
            out.status.success(),
            "skopeo copy -> {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(dest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_blob(layout: &Path, data: &[u8]) -> Result<(String, usize)> {
    let d = crate::sha256_digest(data);
    std::fs::write(
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:")),
        data,
    )?;
    Ok((d, data.len()))
}

/// An OCI layout with one image tagged `latest`: a gzip layer holding the
/// static busybox, a symlink per applet, /etc/passwd and /etc/group, and
/// the directories a container runtime mounts onto.
fn build_busybox_layout(layout: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    crate::busybox::rootfs(tmp.path())?;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", tmp.path())?;
    let tar = b.into_inner()?;
    let diff_id = crate::sha256_digest(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    let blob = gz.finish()?;

    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let (cd, cs) = write_blob(layout, &serde_json::to_vec(&config)?)?;
    let (ld, ls) = write_blob(layout, &blob)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}],
    });
    let (md, ms) = write_blob(layout, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_image_is_served_and_auth_is_enforced() {
        let reg = Registry::start().unwrap();
        let image = reg.push_busybox("tk/busybox:1").unwrap();
        assert_eq!(image, format!("{}/tk/busybox:1", reg.host()));
        // The tag list: a manifest GET without an Accept header naming the
        // OCI type is a 404 for an OCI manifest.
        assert_eq!(
            http_get_status(reg.port(), "/v2/tk/busybox/tags/list"),
            Some(200)
        );

        let auth = Registry::start_with_auth("user", "secret").unwrap();
        assert_eq!(http_get_status(auth.port(), "/v2/"), Some(401));
        auth.push_busybox("tk/busybox:1").unwrap();
        assert!(Registry::start_with_auth("a:b", "x").is_err());
    }
}
