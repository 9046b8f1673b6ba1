//! CRI calls on the fake backend (`husk_runtime::hypervisor::fake`: the
//! real husk-agent on the host, no VM), through the RuntimeService as
//! kubelet calls it: pod lifecycle, concurrent calls on one pod, and
//! restart reconciliation (pod records vs live processes vs orphan
//! directories). Real CNI plugins (Debian's bridge + host-local), real
//! virtiofsd and husk-agent; needs root. A pod starts in ~100 ms here
//! instead of a VM's seconds, so these run with the unit tests.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use husk_runtime::hypervisor::host::{self as fake, HostBackend};
use husk_runtime::Hypervisor;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Code, Request};

use super::runtime_service::CriRuntime;
use super::{Husk, HuskdConfig};
use crate::state::PodState;

/// One huskd state (root, state dir, CNI network) per test.
struct Env {
    base: tempfile::TempDir,
    state: PathBuf,
    bridge: String,
    config: HuskdConfig,
    backend: Arc<dyn Hypervisor>,
    /// The first three octets of the pods' subnet, with the dot.
    net: String,
    /// Every pod this test ran, to check what they leave.
    pods: std::sync::Mutex<Vec<String>>,
}

static N: AtomicU32 = AtomicU32::new(0);

fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HUSK_AGENT_BIN") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("x86_64-unknown-linux-gnu/release/husk-agent");
    assert!(
        p.exists(),
        "the fake-backend tests run the real husk-agent: build it (`make agent`) or set HUSK_AGENT_BIN; not at {}",
        p.display()
    );
    p
}

impl Env {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the fake-backend tests need root (network namespaces, CNI, the agent's cgroups)"
        );
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let base = tempfile::tempdir().unwrap();
        // Short: the hybrid vsock socket path of a sandbox must fit a
        // unix socket address.
        let state = PathBuf::from(format!("/run/hkt{pid}-{n}"));
        let bridge = format!("hkf{}{n}", pid % 100_000);
        let conf_dir = base.path().join("cni");
        std::fs::create_dir_all(&conf_dir).unwrap();
        // One subnet per Env: the tests of this binary run at once, each
        // with its own bridge; another process gets other subnets.
        let net = format!("10.{}.{}.", 200 + n % 50, pid % 256);
        let subnet = format!("{net}0/24");
        std::fs::write(
            conf_dir.join("10-test.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": format!("fake{n}"),
                "plugins": [{
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": base.path().join("ipam"),
                        "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                }]
            })
            .to_string(),
        )
        .unwrap();
        let guest = base.path().join("guest");
        std::fs::create_dir_all(&guest).unwrap();
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::write(guest.join(f), b"not used by the fake backend").unwrap();
        }
        let mut config = HuskdConfig {
            root: base.path().join("root"),
            state: state.clone(),
            listen: base.path().join("husk.sock"),
            ..Default::default()
        };
        config.cni.conf_dir = conf_dir;
        config.cni.bin_dirs = vec!["/usr/lib/cni".into()];
        for h in config.handlers.values_mut() {
            h.kernel = guest.join("vmlinuz");
            h.initrd = guest.join("initrd.img");
        }
        let backend: Arc<dyn Hypervisor> = Arc::new(HostBackend::new(agent_binary()));
        Self {
            base,
            state,
            bridge,
            config,
            backend,
            net,
            pods: Default::default(),
        }
    }

    async fn open(&self) -> CriRuntime {
        let (husk, _) = Husk::open_with(self.config.clone(), Some(self.backend.clone()))
            .await
            .unwrap();
        CriRuntime { husk }
    }

    fn sandboxes(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state.join("sandboxes"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for d in self.sandboxes() {
                if let Ok(log) = std::fs::read_to_string(d.join("agent.log")) {
                    eprintln!("---- {}/agent.log ----\n{log}", d.display());
                }
            }
        }
        // As a clean huskd exit with no pods: the netns directory's own
        // mount goes (it fails, leaving it, while a pod network is up).
        let released =
            husk_runtime::network::release_netns_dir(&husk_runtime::network::CniConfig {
                conf_dir: self.config.cni.conf_dir.clone(),
                bin_dirs: self.config.cni.bin_dirs.clone(),
                netns_dir: self.state.join("netns"),
            });
        if !std::thread::panicking() {
            // Every test removes its pods: nothing may hold the directory.
            assert!(matches!(released, Ok(true)), "netns dir: {released:?}");
        }
        if !std::thread::panicking() {
            let left: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
                .flat_map(|c| {
                    std::fs::read_dir(c.path().join(fake::CGROUP_ROOT))
                        .into_iter()
                        .flatten()
                        .flatten()
                })
                .map(|e| e.path())
                .filter(|p| self.pods.lock().unwrap().iter().any(|id| p.ends_with(id)))
                .collect();
            assert!(left.is_empty(), "cgroups left: {left:?}");
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = &self.base;
    }
}

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "fake".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

impl Env {
    async fn run_pod(&self, rt: &CriRuntime, name: &str) -> String {
        self.run_pod_with(rt, pod_config(name)).await
    }

    async fn run_pod_with(&self, rt: &CriRuntime, config: cri::PodSandboxConfig) -> String {
        let name = config.metadata.as_ref().unwrap().name.clone();
        let id = rt
            .run_pod_sandbox(Request::new(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .await
            .unwrap_or_else(|s| panic!("RunPodSandbox {name}: {s:?}"))
            .into_inner()
            .pod_sandbox_id;
        self.pods.lock().unwrap().push(id.clone());
        id
    }
}

async fn pod_status(rt: &CriRuntime, id: &str) -> Result<cri::PodSandboxStatus, tonic::Status> {
    rt.pod_sandbox_status(Request::new(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    }))
    .await
    .map(|r| r.into_inner().status.unwrap())
}

async fn stop_pod(rt: &CriRuntime, id: &str) -> Result<(), tonic::Status> {
    rt.stop_pod_sandbox(Request::new(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    }))
    .await
    .map(|_| ())
}

async fn remove_pod(rt: &CriRuntime, id: &str) -> Result<(), tonic::Status> {
    rt.remove_pod_sandbox(Request::new(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    }))
    .await
    .map(|_| ())
}

fn alive(pid: u32) -> bool {
    husk_runtime::procfs::is_alive(pid)
}

/// The agent's pid (the fake VM's only process) from the pod record.
fn agent_pid(rt: &CriRuntime, id: &str) -> u32 {
    let p = rt.husk.state.pod(id).unwrap();
    p.pids
        .iter()
        .find(|(role, _)| role == "husk-agent")
        .unwrap_or_else(|| panic!("no husk-agent in {:?}", p.pids))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle() {
    let env = Env::new();
    let rt = env.open().await;
    let id = env.run_pod(&rt, "web").await;
    let st = pod_status(&rt, &id).await.unwrap();
    assert_eq!(st.state, cri::PodSandboxState::SandboxReady as i32);
    let ip = st.network.unwrap().ip;
    assert!(
        ip.starts_with(&env.net),
        "pod IP {ip:?} not in {}0/24",
        env.net
    );
    let agent = agent_pid(&rt, &id);
    assert!(alive(agent));
    // Records (kubelet's configs, Secrets in env among them), image layers
    // and sandbox directories are root's alone.
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    let record = env
        .config
        .root
        .join("state/pods")
        .join(format!("{id}.json"));
    assert_eq!(mode(&record), 0o600, "{}", record.display());
    for d in [
        env.config.root.clone(),
        env.config.root.join("images"),
        env.state.clone(),
        env.state.join("sandboxes").join(&id),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    // The same pod attempt again is refused; a ready-state filter finds it.
    let again = rt
        .run_pod_sandbox(Request::new(cri::RunPodSandboxRequest {
            config: Some(pod_config("web")),
            runtime_handler: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let listed = rt
        .list_pod_sandbox(Request::new(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                state: Some(cri::PodSandboxStateValue {
                    state: cri::PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(listed.iter().map(|p| &p.id).collect::<Vec<_>>(), [&id]);

    stop_pod(&rt, &id).await.unwrap();
    let st = pod_status(&rt, &id).await.unwrap();
    assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
    assert!(st.network.unwrap().ip.is_empty());
    assert!(!alive(agent), "the agent outlived StopPodSandbox");
    assert!(
        !env.state.join("netns").join(&id).exists(),
        "network namespace left"
    );
    stop_pod(&rt, &id).await.unwrap();
    remove_pod(&rt, &id).await.unwrap();
    assert_eq!(
        pod_status(&rt, &id).await.unwrap_err().code(),
        Code::NotFound
    );
    remove_pod(&rt, &id).await.unwrap();
    assert!(env.sandboxes().is_empty(), "{:?}", env.sandboxes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_one_pod() {
    let env = Env::new();
    let rt = env.open().await;
    let id = env.run_pod(&rt, "busy").await;
    let agent = agent_pid(&rt, &id);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (rt, id) = (rt.clone(), id.clone());
        calls.spawn(async move {
            match i % 4 {
                0 => stop_pod(&rt, &id).await,
                1 => remove_pod(&rt, &id).await,
                // Status races with removal: NotFound is the only other answer.
                _ => match pod_status(&rt, &id).await {
                    Err(s) if s.code() != Code::NotFound => Err(s),
                    _ => Ok(()),
                },
            }
        });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap().unwrap();
    }
    // Whatever the order, the pod ends removed and nothing is left.
    remove_pod(&rt, &id).await.unwrap();
    assert!(rt.husk.state.pod(&id).is_none());
    assert!(!alive(agent));
    assert!(env.sandboxes().is_empty(), "{:?}", env.sandboxes());
    assert!(rt.husk.sandbox(&id).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reconciles_records_processes_and_orphans() {
    let env = Env::new();
    let rt = env.open().await;
    let kept = env.run_pod(&rt, "kept").await;
    let lost = env.run_pod(&rt, "lost").await;
    let kept_agent = agent_pid(&rt, &kept);
    let lost_agent = agent_pid(&rt, &lost);
    // huskd exits (SIGTERM path): the sandboxes are left running.
    rt.husk.detach_all().await;
    drop(rt);
    // While huskd is down, one pod's VM dies...
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lost_agent as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // ...and a crash mid-start left a directory without a record, with a
    // process that names it.
    let orphan = env.state.join("sandboxes").join("orphan-start");
    std::fs::create_dir_all(orphan.join("share")).unwrap();
    let mut stray = std::process::Command::new("sleep")
        .arg("300")
        .arg0(orphan.join("stray"))
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if !husk_runtime::process::processes_using(&orphan).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let rt = env.open().await;
    let st = pod_status(&rt, &kept).await.unwrap();
    assert_eq!(st.state, cri::PodSandboxState::SandboxReady as i32);
    assert!(
        rt.husk.sandbox(&kept).is_some(),
        "the live pod was not adopted"
    );
    assert!(alive(kept_agent));
    let st = pod_status(&rt, &lost).await.unwrap();
    assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
    let rec = rt.husk.state.pod(&lost).unwrap();
    assert_eq!(rec.state, PodState::NotReady);
    assert!(rec.reason.contains("lost"), "{}", rec.reason);
    assert!(!orphan.exists(), "the orphan directory was not removed");
    let status = stray.wait().unwrap();
    assert!(!status.success(), "the stray process was not killed");

    // The adopted pod stops through its adopted VM; both go cleanly.
    stop_pod(&rt, &kept).await.unwrap();
    assert!(!alive(kept_agent));
    for id in [&kept, &lost] {
        remove_pod(&rt, id).await.unwrap();
    }
    assert!(env.sandboxes().is_empty(), "{:?}", env.sandboxes());
}

async fn exec_sync(rt: &CriRuntime, id: &str, cmd: &[&str]) -> cri::ExecSyncResponse {
    rt.exec_sync(Request::new(cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 10,
    }))
    .await
    .unwrap_or_else(|s| panic!("ExecSync {cmd:?}: {s:?}"))
    .into_inner()
}

async fn container_state(rt: &CriRuntime, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
    rt.container_status(Request::new(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    }))
    .await
    .map(|r| r.into_inner().status.unwrap())
}

/// A registry on loopback with busybox in it, and an Env whose huskd
/// trusts it and has pulled the image.
async fn env_with_busybox() -> (
    husk_testkit::registry::Registry,
    Env,
    CriRuntime,
    cri::ImageSpec,
) {
    use k8s_cri::v1::image_service_server::ImageService;
    let registry = husk_testkit::registry::Registry::start().unwrap();
    let image = registry.push_busybox("fake/busybox:1").unwrap();
    let mut env = Env::new();
    env.config.registry.insecure = vec![registry.host()];
    let rt = env.open().await;
    let images = super::image_service::CriImages {
        husk: rt.husk.clone(),
    };
    let spec = cri::ImageSpec {
        image,
        ..Default::default()
    };
    images
        .pull_image(Request::new(cri::PullImageRequest {
            image: Some(spec.clone()),
            ..Default::default()
        }))
        .await
        .unwrap();
    (registry, env, rt, spec)
}

impl Env {
    /// CreateContainer + StartContainer of `config` in `pod`; the agent's
    /// log is in the panic message of a failure.
    async fn start_container(
        &self,
        rt: &CriRuntime,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> String {
        let id = rt
            .create_container(Request::new(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            }))
            .await
            .unwrap_or_else(|s| {
                let log = self.state.join("sandboxes").join(pod).join("agent.log");
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!("CreateContainer: {s:?}\nagent log:\n{log}")
            })
            .into_inner()
            .container_id;
        rt.start_container(Request::new(cri::StartContainerRequest {
            container_id: id.clone(),
        }))
        .await
        .unwrap();
        id
    }
}

fn container_config(name: &str, image: &cri::ImageSpec, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image.clone()),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// A container from a real image (pulled from a docker-registry on
/// loopback): created over the pod's share, started, exec'd into, its
/// output in the CRI log, stopped and removed, with nothing left mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_lifecycle() {
    let (_registry, env, rt, spec) = env_with_busybox().await;
    let log_dir = env.base.path().join("pods/app");
    let mut pod_cfg = pod_config("app");
    pod_cfg.log_directory = log_dir.display().to_string();
    pod_cfg.hostname = "app-host".into();
    let pod = env.run_pod_with(&rt, pod_cfg.clone()).await;
    let created = env
        .start_container(
            &rt,
            &pod,
            &pod_cfg,
            container_config("main", &spec, "echo hello; exec sleep 1000"),
        )
        .await;
    assert_eq!(
        container_state(&rt, &created).await.unwrap().state,
        cri::ContainerState::ContainerRunning as i32
    );
    // The pod files reach the container through the share.
    let r = exec_sync(&rt, &created, &["cat", "/etc/hostname"]).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "app-host\n");
    let r = exec_sync(
        &rt,
        &created,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    )
    .await;
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 3)
    );
    let log = log_dir.join("main.log");
    let mut logged = String::new();
    for _ in 0..100 {
        logged = std::fs::read_to_string(&log).unwrap_or_default();
        if logged.contains("stdout F hello") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(logged.contains("stdout F hello"), "CRI log: {logged:?}");

    rt.stop_container(Request::new(cri::StopContainerRequest {
        container_id: created.clone(),
        timeout: 1,
    }))
    .await
    .unwrap();
    let st = container_state(&rt, &created).await.unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert!(
        matches!(st.exit_code, 137 | 143),
        "exit code {}",
        st.exit_code
    );
    rt.remove_container(Request::new(cri::RemoveContainerRequest {
        container_id: created.clone(),
    }))
    .await
    .unwrap();
    assert_eq!(
        container_state(&rt, &created).await.unwrap_err().code(),
        Code::NotFound
    );
    stop_pod(&rt, &pod).await.unwrap();
    remove_pod(&rt, &pod).await.unwrap();
    assert!(env.sandboxes().is_empty(), "{:?}", env.sandboxes());
    // (The netns directory's own mount stays until huskd exits: Env's drop.)
    let left = husk_runtime::mounts::mounts_under(&env.state.join("sandboxes")).unwrap();
    assert!(left.is_empty(), "mounts left: {left:?}");
}

/// Exec through the streaming server (SPDY, v4), the way kubectl and crictl
/// reach it: stdin in, stdout and stderr out, the exit code in the status;
/// a terminal; a missing binary fails at once with a message; tokens are
/// single-use and unknown ones get 404; sessions run concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streaming() {
    use husk_streaming::client;
    let (_registry, env, rt, spec) = env_with_busybox().await;
    let mut pod_cfg = pod_config("stream");
    pod_cfg.log_directory = env.base.path().join("pods/stream").display().to_string();
    let pod = env.run_pod_with(&rt, pod_cfg.clone()).await;
    let ctr = env
        .start_container(
            &rt,
            &pod,
            &pod_cfg,
            container_config("main", &spec, "exec sleep 1000"),
        )
        .await;
    let exec_url = |cmd: &[&str], tty: bool, stdin: bool| {
        let rt = &rt;
        let req = cri::ExecRequest {
            container_id: ctr.clone(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        };
        async move { rt.exec(Request::new(req)).await.map(|r| r.into_inner().url) }
    };

    let url = exec_url(&["sh", "-c", "cat; echo err >&2; exit 4"], false, true)
        .await
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let out = client::exec(&url, Some(b"hello over spdy"), false)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello over spdy");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(
        out.exit_code(),
        Some(4),
        "{:?}",
        String::from_utf8_lossy(&out.status)
    );
    // The token was used: the same URL again is a 404.
    let again = client::exec(&url, None, false).await.unwrap_err();
    assert!(again.to_string().contains("404"), "{again}");
    let bogus = format!(
        "{}/exec/{}",
        url.rsplit_once("/exec/").unwrap().0,
        "0".repeat(40)
    );
    assert!(client::exec(&bogus, None, false)
        .await
        .unwrap_err()
        .to_string()
        .contains("404"));

    let url = exec_url(&["sh", "-c", "test -t 0 && echo tty"], true, true)
        .await
        .unwrap();
    let out = client::exec(&url, Some(b""), true).await.unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tty"),
        "{out:?}"
    );
    assert_eq!(out.exit_code(), Some(0));

    let t = std::time::Instant::now();
    let url = exec_url(&["/no/such/binary"], false, false).await.unwrap();
    let out = client::exec(&url, None, false).await.unwrap();
    let status = String::from_utf8_lossy(&out.status).to_string();
    assert!(status.contains("Failure"), "{status}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    let mut sessions = Vec::new();
    for i in 0..8 {
        let url = exec_url(&["sh", "-c", &format!("echo session {i}")], false, false)
            .await
            .unwrap();
        sessions.push(tokio::spawn(async move {
            (i, client::exec(&url, None, false).await)
        }));
    }
    for s in sessions {
        let (i, out) = s.await.unwrap();
        let out = out.unwrap();
        assert_eq!(out.stdout, format!("session {i}\n").into_bytes());
        assert_eq!(out.exit_code(), Some(0));
    }

    let bad = exec_url(&[], false, false).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let bad = exec_url(&["true"], true, false).await;
    assert!(bad.is_ok(), "tty without stdin is allowed: {bad:?}");
    rt.stop_container(Request::new(cri::StopContainerRequest {
        container_id: ctr.clone(),
        timeout: 1,
    }))
    .await
    .unwrap();
    let stopped = exec_url(&["true"], false, false).await.unwrap_err();
    assert_eq!(stopped.code(), Code::FailedPrecondition, "{stopped:?}");
    stop_pod(&rt, &pod).await.unwrap();
    remove_pod(&rt, &pod).await.unwrap();
}

/// Attach to a container's own stdio: what the session sends reaches the
/// container's stdin (closed after the session with `stdin_once`), its
/// output comes back and still reaches the CRI log; stdin is refused for a
/// container created without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_streaming() {
    use husk_streaming::client;
    let (_registry, env, rt, spec) = env_with_busybox().await;
    let log_dir = env.base.path().join("pods/attach");
    let mut pod_cfg = pod_config("attach");
    pod_cfg.log_directory = log_dir.display().to_string();
    let pod = env.run_pod_with(&rt, pod_cfg.clone()).await;
    let mut cfg = container_config(
        "echo",
        &spec,
        "while read l; do echo \"got $l\"; done; echo bye",
    );
    cfg.stdin = true;
    cfg.stdin_once = true;
    let ctr = env.start_container(&rt, &pod, &pod_cfg, cfg).await;
    let attach = |stdin: bool, id: &str| {
        rt.attach(Request::new(cri::AttachRequest {
            container_id: id.to_string(),
            stdin,
            tty: false,
            stdout: true,
            stderr: true,
        }))
    };
    let url = attach(true, &ctr).await.unwrap().into_inner().url;
    assert!(url.contains("/attach/"), "{url}");
    let out = client::exec(&url, Some(b"one\ntwo\n"), false)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got one\ngot two\nbye\n"
    );
    assert_eq!(
        out.exit_code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.status)
    );
    let mut logged = String::new();
    for _ in 0..100 {
        logged = std::fs::read_to_string(log_dir.join("echo.log")).unwrap_or_default();
        if logged.contains("stdout F bye") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(logged.contains("stdout F got two"), "CRI log: {logged:?}");

    let plain = env
        .start_container(
            &rt,
            &pod,
            &pod_cfg,
            container_config("plain", &spec, "exec sleep 1000"),
        )
        .await;
    let e = attach(true, &plain).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(attach(false, &plain).await.is_ok());
    stop_pod(&rt, &pod).await.unwrap();
    remove_pod(&rt, &pod).await.unwrap();
}

/// The attack of issue 14: a tenant replaces its own /etc/passwd with a
/// FIFO and /etc/group with a symlink to /dev/zero, then gets ExecSync
/// calls (an exec probe is enough). huskd reads those files to resolve the
/// exec's user; it must neither block nor read without end, and every
/// other CRI call must keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_fifo_passwd_does_not_stall_huskd() {
    // The CRI calls run on this test's runtime: a read that blocks its
    // workers would hang the test rather than fail it. A thread outside the
    // runtime turns that into a loud failure.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(120));
        if !watch.load(Ordering::SeqCst) {
            eprintln!("tenant_fifo_passwd_does_not_stall_huskd: huskd stalled for 120 s");
            std::process::abort();
        }
    });
    let (_registry, env, rt, spec) = env_with_busybox().await;
    let mut pod_cfg = pod_config("tenant");
    pod_cfg.log_directory = env.base.path().join("pods/tenant").display().to_string();
    let pod = env.run_pod_with(&rt, pod_cfg.clone()).await;
    let attack = "rm /etc/passwd && mkfifo /etc/passwd && ln -sf /dev/zero /etc/group \
                  && touch /tmp/armed; exec sleep 1000";
    let numeric = env
        .start_container(
            &rt,
            &pod,
            &pod_cfg,
            container_config("numeric", &spec, attack),
        )
        .await;
    let mut named_cfg = container_config("named", &spec, attack);
    named_cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "root".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    // Created before the attack (the name resolves), in the same image.
    let named = env.start_container(&rt, &pod, &pod_cfg, named_cfg).await;
    let rootfs = rt
        .husk
        .sandbox(&pod)
        .unwrap()
        .container_rootfs(&numeric)
        .unwrap();
    for _ in 0..250 {
        if rootfs.join("tmp/armed").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rootfs.join("tmp/armed").exists(), "the attack did not run");

    let bounded = Duration::from_secs(10);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let rt = rt.clone();
        let id = numeric.clone();
        calls.spawn(async move {
            rt.exec_sync(Request::new(cri::ExecSyncRequest {
                container_id: id,
                cmd: vec!["true".into()],
                timeout: 5,
            }))
            .await
        });
    }
    // huskd keeps answering while the execs run.
    for _ in 0..5 {
        let t = std::time::Instant::now();
        rt.version(Request::new(cri::VersionRequest::default()))
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "Version took {:?}",
            t.elapsed()
        );
    }
    let all = tokio::time::timeout(bounded, async {
        while let Some(r) = calls.join_next().await {
            // A numeric user needs no name: the exec itself works.
            assert_eq!(r.unwrap().unwrap().into_inner().exit_code, 0);
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "ExecSync calls did not finish within {bounded:?}"
    );
    // A container that runs as a name now gets a clear error naming why.
    let e = tokio::time::timeout(
        bounded,
        rt.exec_sync(Request::new(cri::ExecSyncRequest {
            container_id: named.clone(),
            cmd: vec!["true".into()],
            timeout: 5,
        })),
    )
    .await
    .expect("ExecSync of a named user hung")
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("FIFO"), "{}", e.message());
    stop_pod(&rt, &pod).await.unwrap();
    remove_pod(&rt, &pod).await.unwrap();
    done.store(true, Ordering::SeqCst);
}

/// A guest that stops answering (its agent frozen) before StopPodSandbox:
/// the stop still finishes within a bound and nothing of the VM is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_of_a_silent_guest_is_bounded() {
    let (_registry, env, rt, spec) = env_with_busybox().await;
    let mut pod_cfg = pod_config("silent");
    pod_cfg.log_directory = env.base.path().join("pods/silent").display().to_string();
    let pod = env.run_pod_with(&rt, pod_cfg.clone()).await;
    for name in ["a", "b", "c"] {
        env.start_container(
            &rt,
            &pod,
            &pod_cfg,
            container_config(name, &spec, "exec sleep 1000"),
        )
        .await;
    }
    let agent = agent_pid(&rt, &pod);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t = std::time::Instant::now();
    stop_pod(&rt, &pod).await.unwrap();
    let took = t.elapsed();
    // 2 s for the kills, 3 s for DestroySandbox, 5 s for the VM's stop.
    assert!(
        took < Duration::from_secs(15),
        "StopPodSandbox took {took:?}"
    );
    assert!(!alive(agent), "the silent guest's VM is still running");
    assert_eq!(
        pod_status(&rt, &pod).await.unwrap().state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    remove_pod(&rt, &pod).await.unwrap();
    assert!(env.sandboxes().is_empty(), "{:?}", env.sandboxes());
}
