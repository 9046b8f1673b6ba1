//! bench-cri [N]: drives a real huskd over CRI gRPC the way kubelet does
//! (its own temp config, a local registry with the test busybox image) and
//! prints medians over N rounds of PullImage, RunPodSandbox (split into
//! host-side work and guest boot from the pod's verbose status),
//! CreateContainer, StartContainer, ExecSync, StopPodSandbox and
//! RemovePodSandbox. Rounds run one after another.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use husk_testkit::bench::{median, rounds};
use husk_tests::huskd::assert_nothing_left;
use husk_tests::pods::{
    container_config, create_container, pod_config, pull, run_pod, verbose_status, BenchHuskd,
};
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
    let mut b = BenchHuskd::start().await?;
    let (mut rt, mut img) = b.huskd.clients().await?;
    let mut s = Samples::default();
    let log_dir = b.dirs.top.path().join("logs");
    let r: Result<()> = async {
        for i in 0..n {
            // A fresh tag each round: every pull downloads and unpacks.
            let image = b.registry.push_busybox(&format!("busybox:r{i}"))?;
            let t = Instant::now();
            let image_ref = pull(&mut img, &image).await?;
            s.add("PullImage (local registry, busybox image)", t.elapsed());

            let pcfg = pod_config("bench", i, &log_dir);
            let t = Instant::now();
            let pod = run_pod(&mut rt, &pcfg).await?;
            let run = t.elapsed();
            s.add("RunPodSandbox", run);
            let (_, info) = verbose_status(&mut rt, &pod).await?;
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

            let ccfg = container_config("sleeper", &image_ref, &["sleep", "3600"], "sleeper/0.log");
            let t = Instant::now();
            let c = create_container(&mut rt, &pod, &pcfg, ccfg).await?;
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
    b.huskd.finish(r, 60).await?;
    assert_nothing_left(b.dirs.state.path())?;

    println!(
        "bench-cri: {n} rounds through huskd's CRI socket; {}",
        b.env.hypervisor.description()
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
