//! Runs the real husk-agent binary with --listen-unix on this host and talks
//! to it like huskd does. Needs root (containers, cgroups).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use husk_proto::agent::{
    AgentClient, CreateContainerRequest, CreateSandboxRequest, ProcessRef, ReadyNotice,
    StdioConfig, StreamAccept, StreamHello, StreamKind,
};
use husk_proto::stream::{read_msg, write_msg};
use husk_proto::ttrpc::{Client, Code, Error};
use libcontainer::oci_spec::runtime::{ProcessBuilder, RootBuilder, Spec, UserBuilder};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

pub const T: Option<Duration> = Some(Duration::from_secs(60));

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub cgroup_parent: String,
    child: Child,
    pub ready: ReadyNotice,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Leftover container processes (if a test failed) would keep their
        // cgroups; the agent's own removal already emptied them otherwise.
        for ctl in [
            "", "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
            "hugetlb", "systemd",
        ] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(ctl)
                .join(&self.cgroup_parent);
            if dir.exists() {
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten() {
                        if e.path().is_dir() {
                            kill_cgroup(&e.path());
                            let _ = std::fs::remove_dir(e.path());
                        }
                    }
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.dir.path().join("agent.log")) {
                eprintln!("---- agent log ----\n{log}");
            }
        }
    }
}

fn kill_cgroup(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn make_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    husk_testkit::busybox::minimal_rootfs(
        &rootfs,
        &["proc", "dev", "sys", "tmp", "etc"],
        &[
            "sh", "echo", "cat", "sleep", "true", "stty", "head", "dd", "tail",
        ],
    )
    .unwrap();
    rootfs
}

impl Agent {
    pub async fn start() -> Agent {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the agent integration tests need root"
        );
        let dir = tempfile::Builder::new()
            .prefix("husk-agent-test")
            .tempdir()
            .unwrap();
        let rootfs = make_rootfs(dir.path());
        let ready_listener = tokio::net::UnixListener::bind(dir.path().join("ready.sock")).unwrap();
        let cgroup_parent = format!("husk-test-{}-{}", std::process::id(), rand_suffix());
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        // HUSK_AGENT_BIN runs the tests against another build, e.g. the
        // static release binary.
        let bin = std::env::var_os("HUSK_AGENT_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_husk-agent").into());
        let child = Command::new(bin)
            .arg("--listen-unix")
            .arg(dir.path())
            .arg("--cgroup-parent")
            .arg(&cgroup_parent)
            .env("HUSK_AGENT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning husk-agent");
        let mut agent = Agent {
            dir,
            rootfs,
            cgroup_parent,
            child,
            ready: ReadyNotice::default(),
        };
        let (mut conn, _) = tokio::time::timeout(Duration::from_secs(20), ready_listener.accept())
            .await
            .expect("no ready notice within 20 s")
            .unwrap();
        agent.ready = read_msg(&mut conn, 1024).await.unwrap();
        agent
    }

    pub async fn client(&self) -> AgentClient {
        let s = UnixStream::connect(self.dir.path().join("ttrpc.sock"))
            .await
            .unwrap();
        AgentClient::new(Client::new(s))
    }

    pub async fn sandbox(&self) -> AgentClient {
        let c = self.client().await;
        c.create_sandbox(
            CreateSandboxRequest {
                sandbox_id: "sb1".into(),
                hostname: "pod".into(),
                share_tag: String::new(),
                network: None,
            },
            T,
        )
        .await
        .unwrap();
        c
    }

    /// An OCI spec running `args` in the busybox rootfs.
    pub fn spec(&self, args: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&self.spec_value(args)).unwrap()
    }

    pub fn spec_value(&self, args: &[&str]) -> serde_json::Value {
        let mut spec = Spec::default();
        spec.set_root(Some(
            RootBuilder::default()
                .path(&self.rootfs)
                .readonly(false)
                .build()
                .unwrap(),
        ));
        let process = ProcessBuilder::default()
            .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .env(vec!["PATH=/bin".to_string()])
            .cwd("/")
            .user(UserBuilder::default().uid(0u32).gid(0u32).build().unwrap())
            .build()
            .unwrap();
        spec.set_process(Some(process));
        serde_json::to_value(&spec).unwrap()
    }

    pub async fn create(
        &self,
        c: &AgentClient,
        id: &str,
        args: &[&str],
        stdin: bool,
        terminal: bool,
    ) {
        c.create_container(
            CreateContainerRequest {
                container_id: id.into(),
                oci_spec_json: self.spec(args),
                stdio: Some(StdioConfig { stdin, terminal }),
            },
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    }

    /// Opens a STREAM connection; returns it after a successful accept.
    pub async fn stream(
        &self,
        id: &str,
        exec: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, String> {
        let mut s = UnixStream::connect(self.dir.path().join("stream.sock"))
            .await
            .unwrap();
        let hello = StreamHello {
            process: Some(ProcessRef {
                container_id: id.into(),
                exec_id: exec.into(),
            }),
            kind: kind as i32,
            port: 0,
        };
        write_msg(&mut s, &hello).await.unwrap();
        let accept: StreamAccept = read_msg(&mut s, 4096).await.unwrap();
        if accept.error.is_empty() {
            Ok(s)
        } else {
            Err(accept.error)
        }
    }
}

pub async fn read_all(s: UnixStream) -> String {
    let out = tokio::time::timeout(Duration::from_secs(30), husk_testkit::read_all(Some(s)))
        .await
        .expect("stream did not reach EOF within 30 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn write_and_close(mut s: UnixStream, data: &[u8]) {
    s.write_all(data).await.unwrap();
    s.shutdown().await.unwrap();
}

pub fn code<T: std::fmt::Debug>(r: Result<T, Error>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a status error: {e}")),
    }
}

pub fn pref(id: &str, exec: &str) -> ProcessRef {
    ProcessRef {
        container_id: id.into(),
        exec_id: exec.into(),
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}
