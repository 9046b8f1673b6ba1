//! What the CRI end-to-end tests share: CRI calls as kubelet makes them, and the checks every
//! test ends with.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_tests::huskd::{assert_nothing_left, Huskd, HuskdDirs};
use husk_tests::pods;
use husk_tests::registry::Registry;
use husk_tests::TestEnv;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use tonic::Code;

pub(crate) type Rt = RuntimeServiceClient<Channel>;
pub(crate) type Img = ImageServiceClient<Channel>;

/// One VM test at a time: two cores, CPU-bound TCG boots.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([
            ("app".into(), name.into()),
            ("husk-test".into(), "cri".into()),
        ]),
        ..Default::default()
    }
}

pub(crate) fn container_config(
    name: &str,
    image: &str,
    cmd: &[&str],
    log_path: &str,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        labels: HashMap::from([("ctr".into(), name.into())]),
        ..pods::container_config(name, image, cmd, log_path)
    }
}

pub(crate) async fn run_pod(
    rt: &mut Rt,
    config: &cri::PodSandboxConfig,
    handler: &str,
) -> Result<String> {
    let t = Instant::now();
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .with_context(|| format!("RunPodSandbox (handler {handler:?})"))?
        .into_inner()
        .pod_sandbox_id;
    eprintln!("RunPodSandbox {handler:?}: {} ms", t.elapsed().as_millis());
    ensure!(id.len() == 64, "pod id {id:?}");
    Ok(id)
}

pub(crate) async fn create_start(
    rt: &mut Rt,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    cfg: cri::ContainerConfig,
) -> Result<String> {
    let name = cfg
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(cfg),
            sandbox_config: Some(pod_cfg.clone()),
        })
        .await
        .with_context(|| format!("CreateContainer {name}"))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .with_context(|| format!("StartContainer {name}"))?;
    Ok(id)
}

pub(crate) async fn container_status(rt: &mut Rt, id: &str) -> Result<cri::ContainerStatus> {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .with_context(|| format!("ContainerStatus {id}"))?
    .into_inner()
    .status
    .context("ContainerStatus without status")
}

pub(crate) async fn wait_exited(
    rt: &mut Rt,
    id: &str,
    timeout: Duration,
) -> Result<cri::ContainerStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = container_status(rt, id).await?;
        if s.state == cri::ContainerState::ContainerExited as i32 {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("container {id} not EXITED after {timeout:?}: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn pod_state(rt: &mut Rt, id: &str) -> Result<i32> {
    Ok(rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await
        .with_context(|| format!("PodSandboxStatus {id}"))?
        .into_inner()
        .status
        .context("PodSandboxStatus without status")?
        .state)
}

pub(crate) async fn exec(
    rt: &mut Rt,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout,
    })
    .await
    .map(|r| r.into_inner())
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, as Go's RFC3339Nano in UTC.
pub(crate) fn is_rfc3339_nano(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    if b.len() < 20 || !ts.ends_with('Z') {
        return false;
    }
    let shape = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    let rest = &ts[19..ts.len() - 1];
    shape
        && (rest.is_empty()
            || (rest.starts_with('.')
                && rest.len() <= 10
                && rest.len() > 1
                && rest[1..].bytes().all(|c| c.is_ascii_digit())))
}

/// Parses kubelet-format log lines into (stream, tag, content).
pub(crate) fn parse_log(text: &str) -> Result<Vec<(String, String, String)>> {
    let mut v = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(ts), Some(stream), Some(tag), Some(msg)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("log line without 4 fields: {line:?}");
        };
        ensure!(is_rfc3339_nano(ts), "bad timestamp in {line:?}");
        ensure!(
            matches!(stream, "stdout" | "stderr"),
            "bad stream in {line:?}"
        );
        ensure!(matches!(tag, "F" | "P"), "bad tag in {line:?}");
        v.push((stream.to_string(), tag.to_string(), msg.to_string()));
    }
    Ok(v)
}

/// The targets of a process's open file descriptors.
pub(crate) fn open_fds(pid: u32) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        v.push(
            std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
    }
    v.sort();
    Ok(v)
}

pub(crate) fn meminfo_total_kib(out: &[u8]) -> Result<u64> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no MemTotal in {text:?}"))
}

/// Expects `r` to fail with `code` and a message containing every `needle`.
pub(crate) fn expect_err<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    code: Code,
    needles: &[&str],
) -> Result<()> {
    match r {
        Ok(v) => bail!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            ensure!(
                s.code() == code,
                "{what}: expected {code:?}, got {:?}: {}",
                s.code(),
                s.message()
            );
            for n in needles {
                ensure!(
                    s.message().contains(n),
                    "{what}: message {:?} does not mention {n:?}",
                    s.message()
                );
            }
            eprintln!("{what}: {:?}: {}", s.code(), s.message());
            Ok(())
        }
    }
}

pub(crate) async fn version_answers(rt: &mut Rt) -> Result<()> {
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .context("Version after an error")?
        .into_inner();
    ensure!(v.runtime_name == "husk", "{v:?}");
    Ok(())
}

pub(crate) async fn pull(img: &mut Img, reference: &str) -> Result<String, tonic::Status> {
    img.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: reference.into(),
            ..Default::default()
        }),
        auth: None,
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner().image_ref)
}

pub(crate) async fn image_status(img: &mut Img, reference: &str) -> Result<Option<cri::Image>> {
    Ok(img
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: reference.into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .with_context(|| format!("ImageStatus {reference}"))?
        .into_inner()
        .image)
}

pub(crate) async fn list_pods(
    rt: &mut Rt,
    filter: cri::PodSandboxFilter,
) -> Result<Vec<cri::PodSandbox>> {
    Ok(rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(filter),
        })
        .await
        .context("ListPodSandbox")?
        .into_inner()
        .items)
}

pub(crate) async fn list_containers(
    rt: &mut Rt,
    filter: cri::ContainerFilter,
) -> Result<Vec<cri::Container>> {
    Ok(rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(filter),
        })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers)
}

pub(crate) async fn stop_remove_pod(rt: &mut Rt, id: &str) -> Result<()> {
    let t = Instant::now();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .context("StopPodSandbox")?;
    eprintln!("StopPodSandbox: {} ms", t.elapsed().as_millis());
    ensure!(
        pod_state(rt, id).await? == cri::PodSandboxState::SandboxNotready as i32,
        "pod not NotReady after StopPodSandbox"
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .context("RemovePodSandbox")?;
    expect_err(
        "PodSandboxStatus of a removed pod",
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await,
        Code::NotFound,
        &[id],
    )
}

/// What every test checks at the end: huskd exits 0 on SIGTERM, removes
/// its socket, and leaves no VMM/virtiofsd/husk-vsock process, mount or
/// socket under its directories.
pub(crate) async fn terminate_clean(mut huskd: Huskd, dirs: &HuskdDirs) -> Result<()> {
    let pid = huskd.pid().context("huskd pid")?;
    let st = huskd.terminate(Duration::from_secs(60)).await?;
    ensure!(
        st.success(),
        "huskd exited with {st} on SIGTERM\n{}",
        huskd.log_tail(40)
    );
    ensure!(
        !dirs.socket.exists(),
        "huskd left its socket {}",
        dirs.socket.display()
    );
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "huskd pid {pid} still exists"
    );
    assert_nothing_left(dirs.state.path())?;
    assert_nothing_left(dirs.top.path())?;
    Ok(())
}

pub(crate) struct Setup {
    pub(crate) env: TestEnv,
    pub(crate) registry: Registry,
    pub(crate) image: String,
}

pub(crate) fn setup() -> Result<Setup> {
    let env = TestEnv::from_env()?;
    let registry = Registry::start()?;
    let image = registry.push_busybox("busybox:1.0")?;
    Ok(Setup {
        env,
        registry,
        image,
    })
}

/// Runs `body`; on failure prints huskd's log, and always kills huskd (the
/// VMs are its children and go with it when it is terminated).
pub(crate) async fn guarded(
    huskd: &Huskd,
    body: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    let r = body.await;
    if r.is_err() {
        eprintln!("--- huskd log ---\n{}", huskd.log_tail(80));
    }
    r
}

/// Runs `cmd` in `id` and expects exit 0; returns stdout.
pub(crate) async fn exec_ok(rt: &mut Rt, id: &str, cmd: &[&str]) -> Result<String> {
    let r = exec(rt, id, cmd, 30)
        .await
        .with_context(|| format!("ExecSync {cmd:?} in {id}"))?;
    ensure!(
        r.exit_code == 0,
        "ExecSync {cmd:?}: exit {} stdout {:?} stderr {:?}",
        r.exit_code,
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(String::from_utf8_lossy(&r.stdout).into_owned())
}

/// Runs `cmd` in `id` and expects a non-zero exit; returns stderr.
pub(crate) async fn exec_fails(rt: &mut Rt, id: &str, cmd: &[&str]) -> Result<String> {
    let r = exec(rt, id, cmd, 30)
        .await
        .with_context(|| format!("ExecSync {cmd:?} in {id}"))?;
    ensure!(
        r.exit_code != 0,
        "ExecSync {cmd:?} succeeded but must fail: stdout {:?}",
        String::from_utf8_lossy(&r.stdout)
    );
    let err = String::from_utf8_lossy(&r.stderr).into_owned();
    eprintln!(
        "{cmd:?} failed as expected: exit {}: {}",
        r.exit_code,
        err.trim()
    );
    Ok(err)
}
