//! CRI set-up and calls the benchmarks make alike (a huskd of their own
//! with the local registry trusted, a pod per round), and the CRI suite
//! shares where it makes the same call.

use std::path::Path;

use anyhow::{Context, Result};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::huskd::{Huskd, HuskdDirs};
use crate::registry::Registry;
use crate::TestEnv;

/// Everything a CRI benchmark talks to; the fields drop in order, huskd
/// before the directories it runs in.
pub struct BenchHuskd {
    pub huskd: Huskd,
    pub dirs: HuskdDirs,
    pub registry: Registry,
    pub env: TestEnv,
}

impl BenchHuskd {
    pub async fn start() -> Result<Self> {
        let env = TestEnv::from_env()?;
        let registry = Registry::start()?;
        let dirs = HuskdDirs::new(&env, &[registry.host().as_str()])?;
        let huskd = Huskd::start(&dirs).await?;
        Ok(Self {
            huskd,
            dirs,
            registry,
            env,
        })
    }
}

/// The pod of round `i`, named `<prefix>-<i>`; the uid carries the pid so
/// that a second run never meets the first one's records.
pub fn pod_config(prefix: &str, i: usize, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("{prefix}-{i}"),
            uid: format!("{prefix}-uid-{i}-{}", std::process::id()),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: format!("{prefix}-{i}"),
        log_directory: log_dir.join(format!("p{i}")).display().to_string(),
        ..Default::default()
    }
}

/// A container of `image` running `cmd`.
pub fn container_config(
    name: &str,
    image: &str,
    cmd: &[&str],
    log_path: &str,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        ..Default::default()
    }
}

/// CreateContainer in `pod`; returns the container id.
pub async fn create_container(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> Result<String> {
    Ok(rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id)
}

/// PullImage; returns the image ref.
pub async fn pull(img: &mut ImageServiceClient<Channel>, image: &str) -> Result<String> {
    Ok(img
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .context("PullImage")?
        .into_inner()
        .image_ref)
}

/// RunPodSandbox on the default handler; returns the pod id.
pub async fn run_pod(
    rt: &mut RuntimeServiceClient<Channel>,
    config: &cri::PodSandboxConfig,
) -> Result<String> {
    Ok(rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id)
}

/// StopPodSandbox then RemovePodSandbox, as kubelet deletes a pod.
pub async fn stop_remove_pod(rt: &mut RuntimeServiceClient<Channel>, pod: &str) -> Result<()> {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .context("StopPodSandbox")?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .context("RemovePodSandbox")?;
    Ok(())
}

/// The verbose PodSandboxStatus: the pod's status and huskd's `info` JSON
/// (start timings, pids).
pub async fn verbose_status(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
) -> Result<(Option<cri::PodSandboxStatus>, serde_json::Value)> {
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: true,
        })
        .await?
        .into_inner();
    let info = serde_json::from_str(st.info.get("info").context("no verbose info")?)?;
    Ok((st.status, info))
}
