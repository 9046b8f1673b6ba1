//! `tests/go/stream-client`, the Go exec and port-forward client husk's
//! tests use to check the streaming server against the Go libraries
//! kubelet's clients are built on.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

/// Builds the client once per test binary with Debian's Go in GOPATH mode;
/// fails loudly without Go or the libraries (scripts/install-deps installs
/// them).
pub fn stream_client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/go/stream-client");
            let out =
                std::env::temp_dir().join(format!("husk-stream-client-{}", std::process::id()));
            let st = std::process::Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(&src)
                .env("GO111MODULE", "off")
                .env("GOPATH", "/usr/share/gocode")
                .env("GOCACHE", std::env::temp_dir().join("husk-go-cache"))
                .status()
                .expect("`go` (Debian golang-go) is needed: run scripts/install-deps");
            assert!(
                st.success(),
                "building tests/go/stream-client failed (needs golang-github-docker-spdystream-dev \
                 and golang-github-gorilla-websocket-dev)"
            );
            out
        })
        .clone()
}

/// Runs the client with `flags` on `url`, feeding it `stdin`; at most a
/// minute.
pub async fn run_stream_client(url: &str, flags: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = tokio::process::Command::new(stream_client())
        .args(flags)
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the Go stream client");
    let mut w = child.stdin.take().expect("piped stdin");
    let data = stdin.to_vec();
    tokio::spawn(async move {
        let _ = w.write_all(&data).await;
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the Go client finished within a minute")
        .expect("waiting for the Go client")
}
