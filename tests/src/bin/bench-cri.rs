//! bench-cri [N]: drives a real huskd over CRI gRPC the way kubelet does
//! (its own temp config, a local registry with the test busybox image) and
//! prints medians over N rounds of PullImage, RunPodSandbox (split into
//! host-side work and guest boot from the pod's verbose status),
//! CreateContainer, StartContainer, ExecSync, StopPodSandbox and
//! RemovePodSandbox. Rounds run one after another.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use husk_testkit::bench::{median, rounds};
use husk_tests::huskd::{assert_nothing_left, Huskd, HuskdDirs};
use husk_tests::registry::Registry;
use husk_tests::TestEnv;
use k8s_cri::v1 as cri;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ms_f(v: &serde_json::Value) -> Result<Duration> {
    let f = v.as_f64().with_context(|| format!("not a number: {v}"))?;
    Ok(Duration::from_secs_f64(f / 1000.0))
}

#[derive(Default)]
struct Samples(HashMap<&'static str, Vec<Duration>>);

impl Samples {
    fn add(&mut self, k: &'static str, d: Duration) {
        self.0.entry(k).or_default().push(d);
    }
    fn row(&self, k: &'static str) {
        if let Some(v) = self.0.get(k) {
            println!(
                "{k:<48} {:>10} {:>10} {:>10}",
                ms(median(v)),
                ms(*v.iter().min().unwrap_or(&Duration::ZERO)),
                ms(*v.iter().max().unwrap_or(&Duration::ZERO))
            );
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = rounds(5)?;
    let env = TestEnv::from_env()?;
    let registry = Registry::start()?;
    let dirs = HuskdDirs::new(&env, &[registry.host().as_str()])?;
    let mut huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let mut s = Samples::default();
    let log_dir = dirs.top.path().join("logs");
    let r: Result<()> = async {
        for i in 0..n {
            // A fresh tag each round: every pull downloads and unpacks.
            let image = registry.push_busybox(&format!("busybox:r{i}"))?;
            let t = Instant::now();
            let image_ref = img
                .pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .context("PullImage")?
                .into_inner()
                .image_ref;
            s.add("PullImage (local registry, busybox image)", t.elapsed());

            let pcfg = cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: format!("bench-{i}"),
                    uid: format!("bench-uid-{i}-{}", std::process::id()),
                    namespace: "bench".into(),
                    attempt: 0,
                }),
                hostname: format!("bench-{i}"),
                log_directory: log_dir.join(format!("p{i}")).display().to_string(),
                ..Default::default()
            };
            let t = Instant::now();
            let pod = rt
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pcfg.clone()),
                    runtime_handler: String::new(),
                })
                .await
                .context("RunPodSandbox")?
                .into_inner()
                .pod_sandbox_id;
            let run = t.elapsed();
            s.add("RunPodSandbox", run);
            let st = rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: true,
                })
                .await?
                .into_inner();
            let info: serde_json::Value =
                serde_json::from_str(st.info.get("info").context("no verbose info")?)?;
            let tm = &info["startTimingsMs"];
            let host_setup = ms_f(&tm["hostSetup"])?;
            let boot = ms_f(&tm["guestBoot"])?;
            let agent = ms_f(&tm["agentSetup"])?;
            let net = ms_f(&tm["networkSetup"])?;
            let own = ms_f(&tm["guestBootToReady"])?;
            let sandbox_total = ms_f(&tm["total"])?;
            s.add("  host set-up (until the VMM was exec'd)", host_setup);
            s.add("  guest boot (VMM exec -> agent ready)", boot);
            s.add("    guest's own CLOCK_BOOTTIME at ready", own);
            s.add("  agent set-up (CreateSandbox)", agent);
            s.add("  pod network set-up (CNI ADD, tap, tc)", net);
            s.add(
                "  huskd around the sandbox (records, files, gRPC)",
                run.saturating_sub(sandbox_total + net),
            );
            s.add(
                "  host-side total (RunPodSandbox - guest boot)",
                run.saturating_sub(boot),
            );

            let ccfg = cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "sleeper".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image_ref.clone(),
                    ..Default::default()
                }),
                command: vec!["sleep".into(), "3600".into()],
                log_path: "sleeper/0.log".into(),
                ..Default::default()
            };
            let t = Instant::now();
            let c = rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(ccfg),
                    sandbox_config: Some(pcfg.clone()),
                })
                .await
                .context("CreateContainer")?
                .into_inner()
                .container_id;
            s.add("CreateContainer", t.elapsed());
            let t = Instant::now();
            rt.start_container(cri::StartContainerRequest {
                container_id: c.clone(),
            })
            .await
            .context("StartContainer")?;
            s.add("StartContainer", t.elapsed());
            let t = Instant::now();
            let r = rt
                .exec_sync(cri::ExecSyncRequest {
                    container_id: c.clone(),
                    cmd: vec!["true".into()],
                    timeout: 10,
                })
                .await
                .context("ExecSync")?
                .into_inner();
            ensure!(r.exit_code == 0, "ExecSync true: {r:?}");
            s.add("ExecSync true", t.elapsed());
            let t = Instant::now();
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .context("StopPodSandbox")?;
            s.add("StopPodSandbox (running container)", t.elapsed());
            let t = Instant::now();
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .context("RemovePodSandbox")?;
            s.add("RemovePodSandbox", t.elapsed());
            img.remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: image_ref,
                    ..Default::default()
                }),
            })
            .await
            .context("RemoveImage")?;
            eprintln!(
                "round {i}: RunPodSandbox {} (guest boot {}, host set-up {})",
                ms(run),
                ms(boot),
                ms(host_setup)
            );
        }
        Ok(())
    }
    .await;
    if r.is_err() {
        eprintln!("--- huskd log ---\n{}", huskd.log_tail(60));
    }
    let st = huskd.terminate(Duration::from_secs(60)).await?;
    r?;
    ensure!(st.success(), "huskd exited with {st}");
    assert_nothing_left(dirs.state.path())?;

    println!(
        "bench-cri: {n} rounds through huskd's CRI socket; {}",
        env.hypervisor.description()
    );
    println!(
        "{:<48} {:>10} {:>10} {:>10}",
        "median", "time", "min", "max"
    );
    for k in [
        "PullImage (local registry, busybox image)",
        "RunPodSandbox",
        "  host set-up (until the VMM was exec'd)",
        "  guest boot (VMM exec -> agent ready)",
        "    guest's own CLOCK_BOOTTIME at ready",
        "  agent set-up (CreateSandbox)",
        "  pod network set-up (CNI ADD, tap, tc)",
        "  huskd around the sandbox (records, files, gRPC)",
        "  host-side total (RunPodSandbox - guest boot)",
        "CreateContainer",
        "StartContainer",
        "ExecSync true",
        "StopPodSandbox (running container)",
        "RemovePodSandbox",
    ] {
        s.row(k);
    }
    Ok(())
}
