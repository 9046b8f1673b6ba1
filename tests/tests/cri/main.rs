//! End-to-end through CRI v1 gRPC, the way kubelet drives a runtime: a real
//! huskd process (config, root, state and socket in temp dirs), a real
//! registry on 127.0.0.1 with a busybox image pushed by skopeo, real pod
//! VMs (QEMU; TCG on the development hosts). Needs root, the guest image
//! and the binaries (see husk_tests); anything missing fails the test.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_tests::huskd::{assert_nothing_left, Huskd, HuskdDirs, BIG_MEMORY_MIB, BIG_VCPUS};
use husk_tests::pods::verbose_status;
use husk_tests::registry::Registry;
use k8s_cri::v1 as cri;
use tonic::Code;

mod helpers;
mod hybrid;
mod streaming;
mod tenant;

use helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_lifecycle() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let log_root = dirs.top.path().join("logs");
    let image = s.image.clone();
    let r = guarded(&huskd, async {
        // 1. Version and Status.
        let v = rt
            .version(cri::VersionRequest::default())
            .await?
            .into_inner();
        ensure!(
            v.runtime_name == "husk" && v.runtime_api_version == "v1",
            "{v:?}"
        );
        ensure!(!v.runtime_version.is_empty(), "{v:?}");
        let st = rt
            .status(cri::StatusRequest { verbose: true })
            .await?
            .into_inner();
        let conds = st
            .status
            .as_ref()
            .context("Status.status")?
            .conditions
            .clone();
        let ready = conds
            .iter()
            .find(|c| c.r#type == "RuntimeReady")
            .context("no RuntimeReady condition")?;
        ensure!(ready.status, "RuntimeReady false: {ready:?}");
        ensure!(
            !ready.reason.is_empty() && !ready.message.is_empty(),
            "{ready:?}"
        );
        let info: serde_json::Value =
            serde_json::from_str(st.info.get("info").context("verbose Status without info")?)?;
        let reason = info["accelReason"].as_str().unwrap_or_default();
        ensure!(
            !reason.is_empty(),
            "Status info has no hypervisor reason: {info}"
        );
        ensure!(
            !info["accel"].as_str().unwrap_or_default().is_empty(),
            "{info}"
        );
        let names: Vec<&str> = st
            .runtime_handlers
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        ensure!(
            names.contains(&"husk") && names.contains(&"big"),
            "{names:?}"
        );
        eprintln!("Status: {ready:?} accel={} ({reason})", info["accel"]);

        // 2. Pull; ListImages/ImageStatus show it.
        let t = Instant::now();
        let image_ref = pull(&mut img, &image).await.context("PullImage")?;
        eprintln!("PullImage: {} ms", t.elapsed().as_millis());
        ensure!(image_ref.starts_with("sha256:"), "image_ref {image_ref}");
        let listed = img
            .list_images(cri::ListImagesRequest { filter: None })
            .await?
            .into_inner()
            .images;
        ensure!(listed.len() == 1, "ListImages: {listed:?}");
        ensure!(listed[0].id == image_ref, "{listed:?}");
        ensure!(listed[0].repo_tags == vec![image.clone()], "{listed:?}");
        ensure!(listed[0].size > 0, "{listed:?}");
        let is = image_status(&mut img, &image)
            .await?
            .context("ImageStatus: no image")?;
        ensure!(is.id == image_ref, "{is:?}");
        let by_id = image_status(&mut img, &image_ref).await?;
        ensure!(
            by_id.is_some_and(|i| i.id == image_ref),
            "ImageStatus by id"
        );
        // A second pull is quick and gives the same id.
        ensure!(pull(&mut img, &image).await? == image_ref, "second pull");

        // huskd's open files before the pod, compared after its removal.
        let huskd_pid = huskd.pid().context("huskd pid")?;
        let fds_before = open_fds(huskd_pid)?;

        // 3. A pod.
        let pcfg = pod_config("web", &log_root.join("web"));
        let pod = run_pod(&mut rt, &pcfg, "husk").await?;
        ensure!(
            pod_state(&mut rt, &pod).await? == cri::PodSandboxState::SandboxReady as i32,
            "pod not Ready"
        );
        let (status, info) = verbose_status(&mut rt, &pod).await?;
        let status = status.context("status")?;
        ensure!(
            status.metadata == pcfg.metadata && status.labels == pcfg.labels,
            "{status:?}"
        );
        ensure!(status.runtime_handler == "husk", "{status:?}");
        ensure!(info["vcpus"] == 1 && info["memoryMiB"] == 256, "{info}");
        let tm = &info["startTimingsMs"];
        for k in ["hostSetup", "guestBoot", "agentSetup", "total"] {
            ensure!(
                tm[k].as_f64().is_some_and(|v| v > 0.0),
                "startTimingsMs.{k}: {info}"
            );
        }
        let all = list_pods(&mut rt, Default::default()).await?;
        ensure!(all.len() == 1 && all[0].id == pod, "{all:?}");
        let by_prefix = list_pods(
            &mut rt,
            cri::PodSandboxFilter {
                id: pod[..12].into(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(by_prefix.len() == 1, "id prefix filter: {by_prefix:?}");
        let ready_filter = |state| cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue {
                state: state as i32,
            }),
            ..Default::default()
        };
        ensure!(
            list_pods(&mut rt, ready_filter(cri::PodSandboxState::SandboxReady))
                .await?
                .len()
                == 1
        );
        ensure!(
            list_pods(&mut rt, ready_filter(cri::PodSandboxState::SandboxNotready))
                .await?
                .is_empty()
        );
        let sel = |k: &str, v: &str| cri::PodSandboxFilter {
            label_selector: HashMap::from([(k.to_string(), v.to_string())]),
            ..Default::default()
        };
        ensure!(
            list_pods(&mut rt, sel("app", "web")).await?.len() == 1,
            "label match"
        );
        ensure!(
            list_pods(&mut rt, sel("app", "db")).await?.is_empty(),
            "label mismatch"
        );

        // 4. A short container: exit code, reason, log file.
        let c1 = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config(
                "short",
                &image,
                &["sh", "-c", "echo hello; echo oops >&2; exit 3"],
                "short/0.log",
            ),
        )
        .await?;
        let cs = wait_exited(&mut rt, &c1, Duration::from_secs(60)).await?;
        ensure!(cs.exit_code == 3, "exit code {}: {cs:?}", cs.exit_code);
        ensure!(cs.reason == "Error", "reason {:?}", cs.reason);
        ensure!(
            cs.started_at > 0 && cs.finished_at >= cs.started_at,
            "{cs:?}"
        );
        ensure!(cs.image_ref == image_ref, "{cs:?}");
        let log_file = log_root.join("web/short/0.log");
        ensure!(
            cs.log_path == log_file.display().to_string(),
            "log_path {:?}",
            cs.log_path
        );
        let text = std::fs::read_to_string(&log_file)
            .with_context(|| format!("reading {}", log_file.display()))?;
        let mut recs = parse_log(&text)?;
        recs.sort();
        ensure!(
            recs == vec![
                ("stderr".into(), "F".into(), "oops".into()),
                ("stdout".into(), "F".into(), "hello".into())
            ],
            "log records {recs:?} in {text:?}"
        );
        // All output is in the log once the exit is reported.
        let chatty = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config("chatty", &image, &["seq", "1", "5000"], "chatty/0.log"),
        )
        .await?;
        let cs = wait_exited(&mut rt, &chatty, Duration::from_secs(60)).await?;
        ensure!(cs.exit_code == 0 && cs.reason == "Completed", "{cs:?}");
        let text = std::fs::read_to_string(log_root.join("web/chatty/0.log"))?;
        let recs = parse_log(&text)?;
        let want: Vec<(String, String, String)> = (1..=5000)
            .map(|i| ("stdout".into(), "F".into(), i.to_string()))
            .collect();
        ensure!(
            recs == want,
            "chatty log at exit: {} records, last {:?}",
            recs.len(),
            recs.last()
        );
        // ExecSync into an exited container is refused.
        expect_err(
            "ExecSync in an exited container",
            exec(&mut rt, &c1, &["true"], 0).await,
            Code::FailedPrecondition,
            &["not running"],
        )?;

        // A log path outside the pod's log directory.
        expect_err(
            "CreateContainer with log_path ../x.log",
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("evil", &image, &["true"], "../x.log")),
                sandbox_config: Some(pcfg.clone()),
            })
            .await,
            Code::InvalidArgument,
            &["config.log_path", "outside"],
        )?;
        expect_err(
            "CreateContainer with an absolute log_path",
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("evil", &image, &["true"], "/etc/x.log")),
                sandbox_config: Some(pcfg.clone()),
            })
            .await,
            Code::InvalidArgument,
            &["config.log_path"],
        )?;
        expect_err(
            "CreateContainer with an image not pulled",
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(
                    "nope",
                    &format!("{}/nothere:1", s.registry.host()),
                    &["true"],
                    "",
                )),
                sandbox_config: Some(pcfg.clone()),
            })
            .await,
            Code::NotFound,
            &["config.image.image"],
        )?;

        // 5. Long-running containers and ExecSync.
        let c2 = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config(
                "trapper",
                &image,
                &[
                    "sh",
                    "-c",
                    "trap 'echo bye; exit 0' TERM; echo up; while true; do sleep 0.2; done",
                ],
                "trapper/0.log",
            ),
        )
        .await?;
        let c3 = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config("sleeper", &image, &["sleep", "3600"], ""),
        )
        .await?;
        for c in [&c2, &c3] {
            let st = container_status(&mut rt, c).await?;
            ensure!(
                st.state == cri::ContainerState::ContainerRunning as i32,
                "{st:?}"
            );
        }
        let t = Instant::now();
        let r = exec(&mut rt, &c3, &["echo", "hi"], 0).await?;
        eprintln!("ExecSync echo: {} ms", t.elapsed().as_millis());
        ensure!(
            r.stdout == b"hi\n" && r.stderr.is_empty() && r.exit_code == 0,
            "{r:?}"
        );
        // Containers share the VM's UTS namespace, named after the pod.
        let r = exec(&mut rt, &c3, &["hostname"], 10).await?;
        ensure!(r.stdout == b"web\n", "hostname {r:?}");
        let r = exec(&mut rt, &c3, &["sh", "-c", "echo err >&2; exit 7"], 10).await?;
        ensure!(
            r.exit_code == 7 && r.stderr == b"err\n" && r.stdout.is_empty(),
            "{r:?}"
        );
        let t = Instant::now();
        expect_err(
            "ExecSync sleep 30 with timeout 2",
            exec(&mut rt, &c3, &["sleep", "30"], 2).await,
            Code::DeadlineExceeded,
            &["timed out"],
        )?;
        let took = t.elapsed();
        ensure!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(10),
            "timeout took {took:?}"
        );
        // The timed-out process was killed; the container still runs.
        let r = exec(
            &mut rt,
            &c3,
            &["sh", "-c", "ps -o args | grep -c '^sleep 30' || true"],
            10,
        )
        .await?;
        ensure!(
            String::from_utf8_lossy(&r.stdout).trim() == "0",
            "sleep 30 still runs: {r:?}"
        );
        expect_err(
            "ExecSync with an empty cmd",
            exec(&mut rt, &c3, &[], 0).await,
            Code::InvalidArgument,
            &["cmd"],
        )?;
        let listed = list_containers(
            &mut rt,
            cri::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            },
        )
        .await?;
        let mut ids: Vec<_> = listed.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        let mut want = vec![c2.clone(), c3.clone()];
        want.sort();
        ensure!(ids == want, "running containers {ids:?}, want {want:?}");
        // Stats of the running containers come from the guest.
        let stats = rt
            .list_container_stats(cri::ListContainerStatsRequest {
                filter: Some(cri::ContainerStatsFilter {
                    pod_sandbox_id: pod.clone(),
                    ..Default::default()
                }),
            })
            .await
            .context("ListContainerStats")?
            .into_inner()
            .stats;
        let mut got: Vec<_> = stats
            .iter()
            .filter_map(|s| s.attributes.as_ref().map(|a| a.id.clone()))
            .collect();
        got.sort();
        ensure!(got == want, "ListContainerStats ids {got:?}, want {want:?}");
        for st in &stats {
            let cpu = st.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds);
            let mem = st.memory.as_ref().and_then(|m| m.working_set_bytes);
            ensure!(
                cpu.is_some_and(|v| v.value > 0) && mem.is_some_and(|v| v.value > 0),
                "stats without usage: {st:?}"
            );
        }
        let one = rt
            .container_stats(cri::ContainerStatsRequest {
                container_id: c3.clone(),
            })
            .await
            .context("ContainerStats")?
            .into_inner()
            .stats
            .context("ContainerStats without stats")?;
        ensure!(
            one.memory
                .as_ref()
                .and_then(|m| m.usage_bytes)
                .is_some_and(|v| v.value > 0),
            "{one:?}"
        );
        eprintln!("stats of sleeper: {:?} {:?}", one.cpu, one.memory);

        // Log rotation as kubelet does it: rename, ReopenContainerLog; no
        // line is lost or written twice across the two files.
        let ticker = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config(
                "ticker",
                &image,
                &[
                    "sh",
                    "-c",
                    "i=0; while true; i=$((i+1)); do echo tick$i; sleep 0.1; done",
                ],
                "ticker/0.log",
            ),
        )
        .await?;
        // A container with stdin open (nobody attaches): cat blocks on it
        // instead of seeing EOF.
        let mut rcfg = container_config("reader", &image, &["cat"], "");
        rcfg.stdin = true;
        let reader = create_start(&mut rt, &pod, &pcfg, rcfg).await?;
        let live_log = log_root.join("web/ticker/0.log");
        let rotated = log_root.join("web/ticker/0.log.1");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        std::fs::rename(&live_log, &rotated)?;
        rt.reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: ticker.clone(),
        })
        .await
        .context("ReopenContainerLog")?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rt.stop_container(cri::StopContainerRequest {
            container_id: ticker.clone(),
            timeout: 0,
        })
        .await
        .context("StopContainer ticker")?;
        let st = container_status(&mut rt, &reader).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "cat with stdin open: {st:?}"
        );
        let old = parse_log(&std::fs::read_to_string(&rotated)?)?;
        let new = parse_log(&std::fs::read_to_string(&live_log)?)?;
        ensure!(
            !old.is_empty() && !new.is_empty(),
            "old {old:?} new {new:?}"
        );
        let ticks: Vec<String> = old.iter().chain(&new).map(|r| r.2.clone()).collect();
        let want: Vec<String> = (1..=ticks.len()).map(|i| format!("tick{i}")).collect();
        ensure!(ticks == want, "ticks across rotation: {ticks:?}");
        eprintln!(
            "rotation: {} records before, {} after",
            old.len(),
            new.len()
        );
        expect_err(
            "ReopenContainerLog of an exited container",
            rt.reopen_container_log(cri::ReopenContainerLogRequest {
                container_id: ticker.clone(),
            })
            .await,
            Code::FailedPrecondition,
            &["not running"],
        )?;

        // 6. StopContainer: SIGTERM honoured, SIGTERM ignored (PID 1) -> SIGKILL.
        let t = Instant::now();
        rt.stop_container(cri::StopContainerRequest {
            container_id: c2.clone(),
            timeout: 30,
        })
        .await
        .context("StopContainer trapper")?;
        let took = t.elapsed();
        let st = container_status(&mut rt, &c2).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerExited as i32,
            "{st:?}"
        );
        ensure!(st.exit_code == 0 && st.reason == "Completed", "{st:?}");
        ensure!(took < Duration::from_secs(10), "SIGTERM stop took {took:?}");
        let text = std::fs::read_to_string(log_root.join("web/trapper/0.log"))?;
        let recs = parse_log(&text)?;
        let msgs: Vec<&str> = recs.iter().map(|r| r.2.as_str()).collect();
        ensure!(msgs == ["up", "bye"], "trapper log {text:?}");
        let t = Instant::now();
        rt.stop_container(cri::StopContainerRequest {
            container_id: c3.clone(),
            timeout: 1,
        })
        .await
        .context("StopContainer sleeper")?;
        let took = t.elapsed();
        let st = container_status(&mut rt, &c3).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerExited as i32,
            "{st:?}"
        );
        ensure!(st.exit_code == 137, "sleeper exit {st:?}");
        ensure!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(15),
            "SIGKILL stop took {took:?}"
        );
        // Stop again: no-op.
        rt.stop_container(cri::StopContainerRequest {
            container_id: c3.clone(),
            timeout: 1,
        })
        .await
        .context("second StopContainer")?;
        for c in [&c1, &chatty, &ticker, &reader, &c2, &c3] {
            rt.remove_container(cri::RemoveContainerRequest {
                container_id: c.to_string(),
            })
            .await
            .with_context(|| format!("RemoveContainer {c}"))?;
            expect_err(
                "ContainerStatus of a removed container",
                rt.container_status(cri::ContainerStatusRequest {
                    container_id: c.to_string(),
                    verbose: false,
                })
                .await,
                Code::NotFound,
                &["container_id"],
            )?;
        }
        ensure!(list_containers(&mut rt, Default::default())
            .await?
            .is_empty());
        // Idempotence: unknown (well-formed) ids and second removals succeed.
        let unknown = "f".repeat(64);
        rt.stop_container(cri::StopContainerRequest {
            container_id: unknown.clone(),
            timeout: 0,
        })
        .await
        .context("StopContainer unknown")?;
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: c1.clone(),
        })
        .await
        .context("RemoveContainer twice")?;
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: unknown.clone(),
        })
        .await
        .context("StopPodSandbox unknown")?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: unknown.clone(),
        })
        .await
        .context("RemovePodSandbox unknown")?;
        let sandbox_dirs = std::fs::read_dir(dirs.state.path().join("sandboxes"))?.count();
        ensure!(
            sandbox_dirs == 1,
            "{sandbox_dirs} sandbox dirs with one pod"
        );
        stop_remove_pod(&mut rt, &pod).await?;
        let fds_after = open_fds(huskd_pid)?;
        ensure!(
            fds_after.len() <= fds_before.len(),
            "huskd holds {} files after the pod's removal, {} before: {fds_after:?}",
            fds_after.len(),
            fds_before.len()
        );
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .context("StopPodSandbox after removal")?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .context("RemovePodSandbox twice")?;
        // huskd's own socket is in the state dir; the pods' things are not.
        dirs.assert_sandboxes_gone()?;

        // 7. The second handler gives a bigger VM.
        let mut small_mem = 0;
        for (handler, name) in [("husk", "small"), ("big", "large")] {
            let pcfg = pod_config(name, &log_root.join(name));
            let pod = run_pod(&mut rt, &pcfg, handler).await?;
            let status = rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .context("status")?;
            ensure!(status.runtime_handler == handler, "{status:?}");
            let c = create_start(
                &mut rt,
                &pod,
                &pcfg,
                container_config("probe", &image, &["sleep", "3600"], ""),
            )
            .await?;
            let mem = meminfo_total_kib(
                &exec(&mut rt, &c, &["cat", "/proc/meminfo"], 10)
                    .await?
                    .stdout,
            )?;
            let cpus = exec(&mut rt, &c, &["nproc"], 10).await?;
            let cpus: u32 = String::from_utf8_lossy(&cpus.stdout).trim().parse()?;
            eprintln!("handler {handler}: MemTotal {mem} kB, {cpus} vCPUs");
            if handler == "big" {
                ensure!(cpus == BIG_VCPUS, "big handler: {cpus} vCPUs");
                ensure!(
                    mem > small_mem + 200 * 1024 && mem <= u64::from(BIG_MEMORY_MIB) * 1024,
                    "big handler MemTotal {mem} kB vs default {small_mem} kB"
                );
            } else {
                ensure!(cpus == 1, "default handler: {cpus} vCPUs");
                ensure!(mem <= 256 * 1024, "default MemTotal {mem} kB");
                small_mem = mem;
            }
            if handler == "big" {
                // RemovePodSandbox of a running pod stops it first.
                rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await
                .context("RemovePodSandbox of a Ready pod")?;
                ensure!(
                    list_pods(&mut rt, Default::default()).await?.is_empty(),
                    "pod listed after RemovePodSandbox"
                );
            } else {
                // StopPodSandbox with a running container kills it.
                stop_remove_pod(&mut rt, &pod).await?;
            }
            expect_err(
                "ContainerStatus after RemovePodSandbox",
                rt.container_status(cri::ContainerStatusRequest {
                    container_id: c.clone(),
                    verbose: false,
                })
                .await,
                Code::NotFound,
                &[],
            )?;
        }

        // RemoveImage, twice.
        img.remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await
        .context("RemoveImage")?;
        ensure!(
            image_status(&mut img, &image).await?.is_none(),
            "image still there"
        );
        img.remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await
        .context("RemoveImage twice")?;
        ensure!(list_pods(&mut rt, Default::default()).await?.is_empty());
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_bad_input() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    // A second registry, configured insecure and then stopped: pulls from
    // it find nothing listening.
    let mut down = Registry::start()?;
    let down_host = down.host();
    down.stop();
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str(), down_host.as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let log_dir = dirs.top.path().join("logs");
    let image = s.image.clone();
    let r = guarded(&huskd, async {
        let long = "a".repeat(65);
        for (what, id, code, needle) in [
            (
                "empty",
                "",
                Code::InvalidArgument,
                "pod_sandbox_id is empty",
            ),
            (
                "malformed",
                "../etc",
                Code::InvalidArgument,
                "pod_sandbox_id",
            ),
            (
                "too long",
                long.as_str(),
                Code::InvalidArgument,
                "pod_sandbox_id",
            ),
            ("unknown", "0123456789ab", Code::NotFound, "0123456789ab"),
        ] {
            expect_err(
                &format!("PodSandboxStatus {what}"),
                rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.into(),
                    verbose: false,
                })
                .await,
                code,
                &[needle],
            )?;
            version_answers(&mut rt).await?;
        }
        for (what, id, code, needle) in [
            ("empty", "", Code::InvalidArgument, "container_id is empty"),
            ("malformed", "a/b", Code::InvalidArgument, "container_id"),
            ("unknown", "0123456789ab", Code::NotFound, "0123456789ab"),
        ] {
            expect_err(
                &format!("ContainerStatus {what}"),
                rt.container_status(cri::ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                })
                .await,
                code,
                &[needle],
            )?;
            expect_err(
                &format!("StartContainer {what}"),
                rt.start_container(cri::StartContainerRequest {
                    container_id: id.into(),
                })
                .await,
                code,
                &[needle],
            )?;
            expect_err(
                &format!("ExecSync {what}"),
                exec(&mut rt, id, &["true"], 0).await,
                code,
                &[needle],
            )?;
            version_answers(&mut rt).await?;
        }
        // Stop/remove with a malformed id is an argument error, not success.
        expect_err(
            "StopPodSandbox malformed",
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: "x y".into(),
            })
            .await,
            Code::InvalidArgument,
            &["pod_sandbox_id"],
        )?;
        expect_err(
            "RemoveContainer empty",
            rt.remove_container(cri::RemoveContainerRequest {
                container_id: String::new(),
            })
            .await,
            Code::InvalidArgument,
            &["container_id"],
        )?;
        expect_err(
            "CreateContainer in an unknown pod",
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: "0123456789ab".into(),
                config: Some(container_config("c", &image, &["true"], "")),
                sandbox_config: None,
            })
            .await,
            Code::NotFound,
            &["pod_sandbox_id"],
        )?;
        // Images.
        expect_err(
            "PullImage unparsable",
            pull(&mut img, "Not A/Valid::Ref").await,
            Code::InvalidArgument,
            &["image.image", "Not A/Valid::Ref"],
        )?;
        expect_err(
            "PullImage empty",
            pull(&mut img, "").await,
            Code::InvalidArgument,
            &["image"],
        )?;
        expect_err(
            "PullImage registry down",
            pull(&mut img, &format!("{down_host}/busybox:1.0")).await,
            Code::Unavailable,
            &[&down_host],
        )?;
        expect_err(
            "PullImage missing tag",
            pull(&mut img, &format!("{}/busybox:nope", s.registry.host())).await,
            Code::NotFound,
            &["busybox:nope"],
        )?;
        expect_err(
            "PullImage missing repository",
            pull(&mut img, &format!("{}/nothere:1", s.registry.host())).await,
            Code::NotFound,
            &["nothere"],
        )?;
        version_answers(&mut rt).await?;
        ensure!(
            img.list_images(cri::ListImagesRequest { filter: None })
                .await?
                .into_inner()
                .images
                .is_empty(),
            "failed pulls left images"
        );
        // Pods.
        let pcfg = pod_config("bad", &log_dir);
        expect_err(
            "RunPodSandbox unknown handler",
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pcfg.clone()),
                runtime_handler: "kata".into(),
            })
            .await,
            Code::InvalidArgument,
            &["runtime_handler", "kata", "big", "husk"],
        )?;
        let mut no_meta = pcfg.clone();
        no_meta.metadata = None;
        expect_err(
            "RunPodSandbox without metadata",
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(no_meta),
                runtime_handler: String::new(),
            })
            .await,
            Code::InvalidArgument,
            &["config.metadata"],
        )?;
        let mut rel_logs = pcfg.clone();
        rel_logs.log_directory = "relative/logs".into();
        expect_err(
            "RunPodSandbox relative log_directory",
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(rel_logs),
                runtime_handler: String::new(),
            })
            .await,
            Code::InvalidArgument,
            &["config.log_directory"],
        )?;
        expect_err(
            "RunPodSandbox without config",
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: None,
                runtime_handler: String::new(),
            })
            .await,
            Code::InvalidArgument,
            &["config"],
        )?;
        version_answers(&mut rt).await?;
        ensure!(
            list_pods(&mut rt, Default::default()).await?.is_empty(),
            "failed runs left pods"
        );
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_restart_keeps_records() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let log_dir = dirs.top.path().join("logs/restart");
    let image = s.image.clone();
    let pcfg = pod_config("restart", &log_dir);
    let mut ids = None;
    let r = guarded(&huskd, async {
        let image_ref = pull(&mut img, &image).await.context("PullImage")?;
        let pod = run_pod(&mut rt, &pcfg, "").await?;
        let c = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config("sleeper", &image, &["sleep", "3600"], "sleeper/0.log"),
        )
        .await?;
        ids = Some((image_ref, pod, c));
        Ok(())
    })
    .await;
    // SIGTERM with the pod running leaves its VM running; it dies while
    // huskd is down, so the next huskd cannot adopt it.
    let end = terminate_leaving_vms(huskd, &dirs).await;
    r?;
    end?;
    let (image_ref, pod, c) = ids.context("ids")?;
    kill_vmm(&dirs)?;

    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let r = guarded(&huskd, async {
        let pods = list_pods(&mut rt, Default::default()).await?;
        ensure!(
            pods.len() == 1 && pods[0].id == pod,
            "pods after restart: {pods:?}"
        );
        ensure!(pods[0].metadata == pcfg.metadata, "{pods:?}");
        ensure!(
            pods[0].state == cri::PodSandboxState::SandboxNotready as i32,
            "pod state after restart {pods:?}"
        );
        let cs = list_containers(&mut rt, Default::default()).await?;
        ensure!(
            cs.len() == 1 && cs[0].id == c && cs[0].pod_sandbox_id == pod,
            "{cs:?}"
        );
        ensure!(
            cs[0].state == cri::ContainerState::ContainerExited as i32,
            "{cs:?}"
        );
        let st = container_status(&mut rt, &c).await?;
        ensure!(st.exit_code != 0 && !st.reason.is_empty(), "{st:?}");
        let images = img
            .list_images(cri::ListImagesRequest { filter: None })
            .await?
            .into_inner()
            .images;
        ensure!(images.len() == 1 && images[0].id == image_ref, "{images:?}");
        ensure!(images[0].repo_tags == vec![image.clone()], "{images:?}");
        // A new pod works after the restart, with the same image.
        let pcfg2 = pod_config("after", &dirs.top.path().join("logs/after"));
        let pod2 = run_pod(&mut rt, &pcfg2, "").await?;
        let c2 = create_start(
            &mut rt,
            &pod2,
            &pcfg2,
            container_config("sleeper", &image, &["sleep", "3600"], ""),
        )
        .await?;
        let r = exec(&mut rt, &c2, &["echo", "again"], 10).await?;
        ensure!(r.stdout == b"again\n", "{r:?}");
        // The old records can be stopped and removed.
        rt.stop_container(cri::StopContainerRequest {
            container_id: c.clone(),
            timeout: 0,
        })
        .await
        .context("StopContainer after restart")?;
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: c.clone(),
        })
        .await
        .context("RemoveContainer after restart")?;
        stop_remove_pod(&mut rt, &pod).await?;
        stop_remove_pod(&mut rt, &pod2).await?;
        ensure!(list_containers(&mut rt, Default::default())
            .await?
            .is_empty());
        img.remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: image_ref.clone(),
                ..Default::default()
            }),
        })
        .await
        .context("RemoveImage by id")?;
        ensure!(image_status(&mut img, &image).await?.is_none());
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

/// A pod VM that dies on its own (its VMM killed): the pod turns NotReady in
/// ListPodSandbox and PodSandboxStatus, its running container EXITED, and
/// Stop/RemovePodSandbox still clean everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_vm_death() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let image = s.image.clone();
    let pcfg = pod_config("doomed", &dirs.top.path().join("logs/doomed"));
    let r = guarded(&huskd, async {
        pull(&mut img, &image).await.context("PullImage")?;
        let pod = run_pod(&mut rt, &pcfg, "").await?;
        let c = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config("sleeper", &image, &["sleep", "3600"], "sleeper/0.log"),
        )
        .await?;
        let (_, info) = verbose_status(&mut rt, &pod).await?;
        let pids = info["pids"].as_array().context("pids")?;
        let vmm = pids
            .iter()
            .find(|p| p[0] == "qemu")
            .and_then(|p| p[1].as_i64())
            .with_context(|| format!("no qemu pid in {info}"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vmm as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = list_pods(&mut rt, Default::default()).await?;
            ensure!(listed.len() == 1, "{listed:?}");
            if listed[0].state == cri::PodSandboxState::SandboxNotready as i32 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "ListPodSandbox still shows the pod Ready 30 s after its VM died"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ensure!(pod_state(&mut rt, &pod).await? == cri::PodSandboxState::SandboxNotready as i32);
        let cs = wait_exited(&mut rt, &c, Duration::from_secs(30)).await?;
        ensure!(cs.exit_code != 0 && !cs.reason.is_empty(), "{cs:?}");
        let listed = list_containers(&mut rt, Default::default()).await?;
        ensure!(
            listed.len() == 1 && listed[0].state == cri::ContainerState::ContainerExited as i32,
            "{listed:?}"
        );
        expect_err(
            "ExecSync in a dead pod",
            exec(&mut rt, &c, &["true"], 5).await,
            Code::FailedPrecondition,
            &[],
        )?;
        version_answers(&mut rt).await?;
        stop_remove_pod(&mut rt, &pod).await?;
        ensure!(list_containers(&mut rt, Default::default())
            .await?
            .is_empty());
        dirs.assert_sandboxes_gone()?;
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

/// kubelet works on several pods at once: concurrent pulls of one image,
/// two pods started, used and removed concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_concurrent_pods() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let image = s.image.clone();
    let log_root = dirs.top.path().join("logs");
    let r = guarded(&huskd, async {
        let mut pulls = Vec::new();
        for _ in 0..3 {
            let (_, mut img) = huskd.clients().await?;
            let image = image.clone();
            pulls.push(tokio::spawn(async move { pull(&mut img, &image).await }));
        }
        let mut ids = Vec::new();
        for p in pulls {
            ids.push(p.await?.context("concurrent PullImage")?);
        }
        ensure!(ids.iter().all(|i| *i == ids[0]), "pull ids {ids:?}");
        let listed = img
            .list_images(cri::ListImagesRequest { filter: None })
            .await?
            .into_inner()
            .images;
        ensure!(listed.len() == 1, "{listed:?}");

        let mut pods = Vec::new();
        for name in ["left", "right"] {
            let (mut rt, _) = huskd.clients().await?;
            let image = image.clone();
            let pcfg = pod_config(name, &log_root.join(name));
            pods.push(tokio::spawn(async move {
                let pod = run_pod(&mut rt, &pcfg, "").await?;
                let mut cs = Vec::new();
                for n in 0..2 {
                    let c = create_start(
                        &mut rt,
                        &pod,
                        &pcfg,
                        container_config(
                            &format!("c{n}"),
                            &image,
                            &["sleep", "3600"],
                            &format!("c{n}/0.log"),
                        ),
                    )
                    .await?;
                    let r = exec(&mut rt, &c, &["echo", name], 10).await?;
                    ensure!(r.stdout == format!("{name}\n").as_bytes(), "{r:?}");
                    cs.push(c);
                }
                Ok::<_, anyhow::Error>((pod, cs))
            }));
        }
        let mut made = Vec::new();
        for p in pods {
            made.push(p.await??);
        }
        for (pod, cs) in &made {
            let listed = list_containers(
                &mut rt,
                cri::ContainerFilter {
                    pod_sandbox_id: pod.clone(),
                    ..Default::default()
                },
            )
            .await?;
            let mut got: Vec<_> = listed.iter().map(|c| c.id.clone()).collect();
            got.sort();
            let mut want = cs.clone();
            want.sort();
            ensure!(got == want, "containers of {pod}: {got:?} want {want:?}");
        }
        let mut stops = Vec::new();
        for (pod, _) in made {
            let (mut rt, _) = huskd.clients().await?;
            stops.push(tokio::spawn(
                async move { stop_remove_pod(&mut rt, &pod).await },
            ));
        }
        for s in stops {
            s.await??;
        }
        ensure!(list_pods(&mut rt, Default::default()).await?.is_empty());
        ensure!(list_containers(&mut rt, Default::default())
            .await?
            .is_empty());
        dirs.assert_sandboxes_gone()?;
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

/// huskd killed with SIGKILL while a pod runs and the pod's QEMU killed
/// while huskd is down: the restarted huskd does not adopt the pod, reaps
/// the helpers left behind (husk-vsock, virtiofsd), shows the records (pod
/// NotReady, container EXITED) and can stop and remove them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_crash_recovery() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let mut huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let image = s.image.clone();
    let pcfg = pod_config("crashy", &dirs.top.path().join("logs/crashy"));
    let mut ids = None;
    let r = guarded(&huskd, async {
        pull(&mut img, &image).await.context("PullImage")?;
        let pod = run_pod(&mut rt, &pcfg, "").await?;
        let c = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config("sleeper", &image, &["sleep", "3600"], "sleeper/0.log"),
        )
        .await?;
        ids = Some((pod, c));
        Ok(())
    })
    .await;
    huskd.kill()?;
    r?;
    let (pod, c) = ids.context("ids")?;
    let left = husk_tests::huskd::processes_mentioning(dirs.state.path());
    ensure!(
        left.len() == 3,
        "after SIGKILL of huskd the pod's qemu, husk-vsock and virtiofsd run on: {left:?}"
    );
    kill_vmm(&dirs)?;

    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, _) = huskd.clients().await?;
    let r = guarded(&huskd, async {
        // The restart reaped what the crashed huskd left.
        let sandboxes = dirs.state.path().join("sandboxes");
        assert_nothing_left(&sandboxes)?;
        let pods = list_pods(&mut rt, Default::default()).await?;
        ensure!(pods.len() == 1 && pods[0].id == pod, "{pods:?}");
        ensure!(
            pods[0].state == cri::PodSandboxState::SandboxNotready as i32,
            "{pods:?}"
        );
        let st = container_status(&mut rt, &c).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerExited as i32 && st.exit_code != 0,
            "{st:?}"
        );
        ensure!(!st.reason.is_empty() && !st.message.is_empty(), "{st:?}");
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: c.clone(),
        })
        .await
        .context("RemoveContainer after a crash")?;
        stop_remove_pod(&mut rt, &pod).await?;
        ensure!(
            std::fs::read_dir(&sandboxes)?.count() == 0,
            "sandbox dirs left"
        );
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

/// SIGTERM; huskd exits 0 and removes its socket, but (by design) leaves
/// its pod VMs running for the next huskd.
async fn terminate_leaving_vms(mut huskd: Huskd, dirs: &HuskdDirs) -> Result<()> {
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
    Ok(())
}

/// SIGKILLs the QEMU of the (single) pod under `dirs` while huskd is down.
fn kill_vmm(dirs: &HuskdDirs) -> Result<()> {
    let left = husk_tests::huskd::processes_mentioning(dirs.state.path());
    let qemu: Vec<i32> = left
        .iter()
        .filter(|l| l.contains("qemu-system"))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    ensure!(qemu.len() == 1, "one qemu expected: {left:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu[0]),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    // Not our child: gone once init reaped it, or a zombie until then.
    let dead = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    while !dead(qemu[0]) {
        ensure!(Instant::now() < deadline, "qemu {} did not die", qemu[0]);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The counter of `counter` lines ("n <i>") in a CRI log, checked to count
/// 0, 1, 2, ... without a gap or a repeat.
fn counter_lines(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut want = 0u64;
    for (stream, tag, msg) in parse_log(&text)? {
        ensure!(stream == "stdout" && tag == "F", "{stream} {tag} {msg}");
        let n: u64 = msg
            .strip_prefix("n ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("not a counter line: {msg:?}"))?;
        ensure!(
            n == want,
            "counter line {n} where {want} was due: lines lost or repeated across a restart\n{text}"
        );
        want += 1;
    }
    Ok(want)
}

/// Waits until the counter log has at least `n` lines (checking it on the way).
async fn wait_counter(path: &Path, n: u64, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = counter_lines(path)?;
        if got >= n {
            return Ok(got);
        }
        ensure!(
            Instant::now() < deadline,
            "counter log at {got} lines, {n} expected within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One restart of [`cri_restart_adopts_running_pod`]: triggers `quitter`
/// (it exits with `code` 0.5 s later, while huskd is down), stops huskd
/// (SIGTERM or, `crash`, SIGKILL), waits 1 s and starts a new huskd, which
/// must have adopted the pod before it serves.
#[allow(clippy::too_many_arguments)]
async fn adopt_round(
    mut huskd: Huskd,
    dirs: &HuskdDirs,
    crash: bool,
    pod: &str,
    counter: &str,
    quitter: &str,
    code: i32,
    counter_log: &Path,
) -> Result<Huskd> {
    let how = if crash { "SIGKILL" } else { "SIGTERM" };
    let (mut rt, _) = huskd.clients().await?;
    exec_ok(&mut rt, quitter, &["touch", "/tmp/go"]).await?;
    drop(rt);
    let before = counter_lines(counter_log)?;
    if crash {
        huskd.kill()?;
    } else {
        terminate_leaving_vms(huskd, dirs).await?;
    }
    let left = husk_tests::huskd::processes_mentioning(dirs.state.path());
    ensure!(
        left.len() == 3,
        "after {how} of huskd the pod's qemu, husk-vsock and virtiofsd run on: {left:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    let huskd = Huskd::start(dirs).await?;
    eprintln!(
        "after {how}: huskd start to serving with 1 adopted pod: {} ms",
        t.elapsed().as_millis()
    );
    let (mut rt, _) = huskd.clients().await?;
    let r = async {
        // The first List is already right.
        let pods = list_pods(&mut rt, Default::default()).await?;
        ensure!(
            pods.len() == 1
                && pods[0].id == pod
                && pods[0].state == cri::PodSandboxState::SandboxReady as i32,
            "pods after {how}: {pods:?}"
        );
        let st = container_status(&mut rt, counter).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "{st:?}"
        );
        let out = exec_ok(&mut rt, counter, &["echo", "adopted"]).await?;
        ensure!(out == "adopted\n", "{out:?}");
        // Exited while huskd was down: the real exit code.
        let qs = wait_exited(&mut rt, quitter, Duration::from_secs(10)).await?;
        ensure!(
            qs.exit_code == code && qs.reason == "Error",
            "quitter after {how}: {qs:?}"
        );
        // The log continues: what was written while huskd was down (about
        // 7 lines), then more, without a gap or a repeat.
        let got = wait_counter(counter_log, before + 15, Duration::from_secs(30)).await?;
        eprintln!("after {how}: counter log {before} -> {got} lines, continuous");
        Ok(())
    }
    .await;
    if r.is_err() {
        eprintln!("--- huskd log ---\n{}", huskd.log_tail(80));
    }
    r.map(|()| huskd)
}

/// Pod VMs outlive huskd (issues 4, 5): after SIGTERM and after SIGKILL of
/// huskd the next huskd adopts the running pod: same id, Ready; its
/// container Running, ExecSync works, its log continues without a lost or
/// repeated line; a container that exited while huskd was down reports its
/// real exit code; a Created container stays Created and starts. Stop and
/// remove leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_restart_adopts_running_pod() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let log_dir = dirs.top.path().join("logs/adopt");
    let counter_log = log_dir.join("counter/0.log");
    let image = s.image.clone();
    let pcfg = pod_config("adopt", &log_dir);
    let mut ids = None;
    let r = guarded(&huskd, async {
        pull(&mut img, &image).await.context("PullImage")?;
        let pod = run_pod(&mut rt, &pcfg, "").await?;
        let counter = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config(
                "counter",
                &image,
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do echo n $i; i=$((i+1)); sleep 0.15; done",
                ],
                "counter/0.log",
            ),
        )
        .await?;
        let mut quitters = Vec::new();
        for code in [7, 9] {
            let cmd =
                format!("while [ ! -e /tmp/go ]; do sleep 0.05; done; sleep 0.5; exit {code}");
            quitters.push(
                create_start(
                    &mut rt,
                    &pod,
                    &pcfg,
                    container_config(
                        &format!("quit{code}"),
                        &image,
                        &["sh", "-c", &cmd],
                        &format!("quit{code}/0.log"),
                    ),
                )
                .await?,
            );
        }
        let late = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(
                    "late",
                    &image,
                    &["sh", "-c", "echo late-start; exec sleep 3600"],
                    "late/0.log",
                )),
                sandbox_config: Some(pcfg.clone()),
            })
            .await
            .context("CreateContainer late")?
            .into_inner()
            .container_id;
        wait_counter(&counter_log, 5, Duration::from_secs(30)).await?;
        ids = Some((pod, counter, quitters, late));
        Ok(())
    })
    .await;
    if let Err(e) = r {
        drop(huskd);
        return Err(e);
    }
    let (pod, counter, quitters, late) = ids.context("ids")?;
    let huskd = adopt_round(
        huskd,
        &dirs,
        false,
        &pod,
        &counter,
        &quitters[0],
        7,
        &counter_log,
    )
    .await?;
    let huskd = adopt_round(
        huskd,
        &dirs,
        true,
        &pod,
        &counter,
        &quitters[1],
        9,
        &counter_log,
    )
    .await?;
    let (mut rt, _) = huskd.clients().await?;
    let r = guarded(&huskd, async {
        // Created before two restarts, never started: still Created, and
        // its re-attached output reaches its log once started.
        let st = container_status(&mut rt, &late).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerCreated as i32,
            "{st:?}"
        );
        rt.start_container(cri::StartContainerRequest {
            container_id: late.clone(),
        })
        .await
        .context("StartContainer late, after two restarts")?;
        let late_log = log_dir.join("late/0.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&late_log)
            .unwrap_or_default()
            .contains("stdout F late-start")
        {
            ensure!(
                Instant::now() < deadline,
                "late container's output not in its log"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop_remove_pod(&mut rt, &pod).await?;
        let cs = list_containers(&mut rt, Default::default()).await?;
        ensure!(
            cs.iter()
                .all(|c| c.state == cri::ContainerState::ContainerExited as i32),
            "{cs:?}"
        );
        counter_lines(&counter_log)?;
        dirs.assert_sandboxes_gone()?;
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

/// Start-to-serving time of a huskd that adopts three pods (printed), and
/// all three Ready and usable afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_restart_adopts_three_pods() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let image = s.image.clone();
    let mut made = Vec::new();
    let r = guarded(&huskd, async {
        pull(&mut img, &image).await.context("PullImage")?;
        for name in ["a", "b", "c"] {
            let pcfg = pod_config(name, &dirs.top.path().join("logs").join(name));
            let pod = run_pod(&mut rt, &pcfg, "").await?;
            let c = create_start(
                &mut rt,
                &pod,
                &pcfg,
                container_config("sleeper", &image, &["sleep", "3600"], "sleeper/0.log"),
            )
            .await?;
            made.push((pod, c));
        }
        Ok(())
    })
    .await;
    if let Err(e) = r {
        drop(huskd);
        return Err(e);
    }
    terminate_leaving_vms(huskd, &dirs).await?;
    let t = Instant::now();
    let huskd = Huskd::start(&dirs).await?;
    eprintln!(
        "huskd start to serving with 3 adopted pods: {} ms",
        t.elapsed().as_millis()
    );
    let (mut rt, _) = huskd.clients().await?;
    let r = guarded(&huskd, async {
        let pods = list_pods(&mut rt, Default::default()).await?;
        ensure!(
            pods.len() == 3
                && pods
                    .iter()
                    .all(|p| p.state == cri::PodSandboxState::SandboxReady as i32),
            "{pods:?}"
        );
        for (pod, c) in &made {
            let out = exec_ok(&mut rt, c, &["echo", "ok"]).await?;
            ensure!(out == "ok\n", "{out:?}");
            stop_remove_pod(&mut rt, pod).await?;
        }
        dirs.assert_sandboxes_gone()?;
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

/// The effective capability set of a process in the container (`self`:
/// the exec'd process, `1`: the container's main process), from /proc.
async fn cap_eff(rt: &mut Rt, id: &str, pid: &str) -> Result<u64> {
    let status = exec_ok(rt, id, &["cat", &format!("/proc/{pid}/status")]).await?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .with_context(|| format!("no CapEff in {status:?}"))?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// Issue 4 as kubelet drives it: volumes (emptyDir-like read-write,
/// ConfigMap-like read-only and updated by the host), the pod's hosts,
/// resolv.conf and hostname, the security context, and
/// UpdateContainerResources seen in the guest's cgroup files. One pod, several
/// containers: VM boots are the expensive part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_mounts_security_and_resources() -> Result<()> {
    const CAP_CHOWN: u64 = 1 << 0;
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let vols = tempfile::tempdir()?;
    let empty_dir = vols.path().join("empty-dir");
    let config_map = vols.path().join("config-map");
    std::fs::create_dir(&empty_dir)?;
    std::fs::create_dir(&config_map)?;
    std::fs::write(config_map.join("key"), "v1\n")?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let image = s.image.clone();
    let mut pcfg = pod_config("vols", &dirs.top.path().join("logs/vols"));
    pcfg.hostname = "vols-host".into();
    pcfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let r = guarded(&huskd, async {
        pull(&mut img, &image).await.context("PullImage")?;
        let pod = run_pod(&mut rt, &pcfg, "").await?;

        // Volumes, pod files, and later the resources.
        let mut cfg = container_config("vols", &image, &["sleep", "3600"], "vols/0.log");
        cfg.mounts = vec![
            cri::Mount {
                container_path: "/data".into(),
                host_path: empty_dir.display().to_string(),
                readonly: false,
                ..Default::default()
            },
            cri::Mount {
                container_path: "/config".into(),
                host_path: config_map.display().to_string(),
                readonly: true,
                ..Default::default()
            },
        ];
        let vols_c = create_start(&mut rt, &pod, &pcfg, cfg).await?;
        exec_ok(&mut rt, &vols_c, &["sh", "-c", "echo from-guest > /data/out"]).await?;
        let seen = std::fs::read_to_string(empty_dir.join("out"))
            .context("the container's write in the read-write mount, on the host")?;
        ensure!(seen == "from-guest\n", "host sees {seen:?}");
        std::fs::write(empty_dir.join("in"), "from-host\n")?;
        let got = exec_ok(&mut rt, &vols_c, &["cat", "/data/in"]).await?;
        ensure!(got == "from-host\n", "{got:?}");
        let got = exec_ok(&mut rt, &vols_c, &["cat", "/config/key"]).await?;
        ensure!(got == "v1\n", "{got:?}");
        exec_fails(&mut rt, &vols_c, &["sh", "-c", "echo x > /config/key"]).await?;
        exec_fails(&mut rt, &vols_c, &["touch", "/config/new"]).await?;
        ensure!(std::fs::read_to_string(config_map.join("key"))? == "v1\n");
        ensure!(!config_map.join("new").exists());
        // kubelet updates a ConfigMap volume by writing new files and
        // renaming; the guest must see the new content.
        std::fs::write(config_map.join(".key.tmp"), "v2\n")?;
        std::fs::rename(config_map.join(".key.tmp"), config_map.join("key"))?;
        let t = Instant::now();
        loop {
            let got = exec_ok(&mut rt, &vols_c, &["cat", "/config/key"]).await?;
            if got == "v2\n" {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "ConfigMap update not visible in the guest after 30 s: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!("ConfigMap update visible after {} ms", t.elapsed().as_millis());
        let hosts = exec_ok(&mut rt, &vols_c, &["cat", "/etc/hosts"]).await?;
        ensure!(
            hosts.lines().any(|l| l.split_whitespace().eq(["127.0.0.1", "localhost"]))
                && hosts
                    .lines()
                    .any(|l| l.split_whitespace().skip(1).any(|n| n == "vols-host")),
            "/etc/hosts: {hosts:?}"
        );
        let resolv = exec_ok(&mut rt, &vols_c, &["cat", "/etc/resolv.conf"]).await?;
        ensure!(
            resolv
                == "nameserver 10.96.0.10\nsearch default.svc.cluster.local cluster.local\noptions ndots:5\n",
            "/etc/resolv.conf: {resolv:?}"
        );
        let hn = exec_ok(&mut rt, &vols_c, &["hostname"]).await?;
        ensure!(hn == "vols-host\n", "hostname {hn:?}");
        let hn = exec_ok(&mut rt, &vols_c, &["cat", "/etc/hostname"]).await?;
        ensure!(hn == "vols-host\n", "/etc/hostname {hn:?}");

        // run_as_user / run_as_group / readonly_rootfs.
        let mut cfg = container_config("restricted", &image, &["sleep", "3600"], "restricted/0.log");
        cfg.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1234 }),
                run_as_group: Some(cri::Int64Value { value: 5678 }),
                readonly_rootfs: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        let restricted = create_start(&mut rt, &pod, &pcfg, cfg).await?;
        ensure!(exec_ok(&mut rt, &restricted, &["id", "-u"]).await? == "1234\n");
        ensure!(exec_ok(&mut rt, &restricted, &["id", "-g"]).await? == "5678\n");
        let ps = exec_ok(&mut rt, &restricted, &["cat", "/proc/1/status"]).await?;
        ensure!(
            ps.lines().any(|l| l.split_whitespace().eq(["Uid:", "1234", "1234", "1234", "1234"]))
                && ps
                    .lines()
                    .any(|l| l.split_whitespace().eq(["Gid:", "5678", "5678", "5678", "5678"])),
            "the container's main process: {ps:?}"
        );
        let err = exec_fails(&mut rt, &restricted, &["touch", "/rootfs-write"]).await?;
        ensure!(err.contains("Read-only file system"), "{err:?}");

        // Capabilities: drop CHOWN, add NET_ADMIN (root in the container).
        let mut cfg = container_config("caps", &image, &["sleep", "3600"], "caps/0.log");
        cfg.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: vec!["NET_ADMIN".into()],
                    drop_capabilities: vec!["CHOWN".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let caps = create_start(&mut rt, &pod, &pcfg, cfg).await?;
        // The main process and an exec'd one get the same set.
        for pid in ["1", "self"] {
            let eff = cap_eff(&mut rt, &caps, pid).await?;
            ensure!(
                eff & CAP_CHOWN == 0 && eff & CAP_NET_ADMIN != 0 && eff & CAP_SYS_ADMIN == 0,
                "CapEff of /proc/{pid} {eff:#x}"
            );
        }
        exec_ok(&mut rt, &caps, &["touch", "/tmp/f"]).await?;
        let err = exec_fails(&mut rt, &caps, &["chown", "1:1", "/tmp/f"]).await?;
        ensure!(err.contains("Operation not permitted"), "{err:?}");
        let err = exec_fails(
            &mut rt,
            &caps,
            &["sh", "-c", "mkdir -p /tmp/m && mount -t tmpfs tmpfs /tmp/m"],
        )
        .await?;
        ensure!(
            err.contains("permission denied") || err.contains("Operation not permitted"),
            "mount without CAP_SYS_ADMIN: {err:?}"
        );
        // The default set keeps CHOWN: the drop above is what removed it.
        let eff = cap_eff(&mut rt, &vols_c, "self").await?;
        ensure!(eff & CAP_CHOWN != 0 && eff & CAP_NET_ADMIN == 0, "CapEff {eff:#x}");
        exec_ok(&mut rt, &vols_c, &["sh", "-c", "touch /tmp/f && chown 1:1 /tmp/f"]).await?;

        // Privileged: every capability, and mounting works inside the VM.
        let mut cfg = container_config("privileged", &image, &["sleep", "3600"], "privileged/0.log");
        cfg.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        cfg.mounts = vec![cri::Mount {
            container_path: "/config".into(),
            host_path: config_map.display().to_string(),
            readonly: true,
            ..Default::default()
        }];
        let privileged = create_start(&mut rt, &pod, &pcfg, cfg).await?;
        // The tenant attack of issue 14: root in the guest remounts its
        // read-only volume read-write and writes. The guest's view may
        // change; the host's files may not.
        let before = std::fs::read_to_string(config_map.join("key"))?;
        let _ = exec(
            &mut rt,
            &privileged,
            &["sh", "-c", "mount -o remount,rw /config; echo pwned > /config/key; touch /config/new; true"],
            30,
        )
        .await;
        ensure!(
            std::fs::read_to_string(config_map.join("key"))? == before
                && !config_map.join("new").exists(),
            "a read-only volume was written on the host through a guest remount"
        );
        let eff = cap_eff(&mut rt, &privileged, "self").await?;
        ensure!(eff & CAP_SYS_ADMIN != 0 && eff & CAP_CHOWN != 0, "CapEff {eff:#x}");
        exec_ok(
            &mut rt,
            &privileged,
            &["sh", "-c", "mkdir -p /tmp/m && mount -t tmpfs tmpfs /tmp/m && echo ok > /tmp/m/x && grep -q ' /tmp/m tmpfs ' /proc/mounts"],
        )
        .await?;

        // UpdateContainerResources reaches the container's cgroup in the guest.
        let cg = exec_ok(&mut rt, &vols_c, &["cat", "/proc/self/cgroup"]).await?;
        ensure!(cg == "0::/\n", "container sees cgroup {cg:?} (expected its own cgroup v2 namespace)");
        let before = exec_ok(&mut rt, &vols_c, &["cat", "/sys/fs/cgroup/memory.max"]).await?;
        eprintln!("memory.max before the update: {}", before.trim());
        let res = cri::LinuxContainerResources {
            memory_limit_in_bytes: 96 << 20,
            cpu_shares: 512,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            ..Default::default()
        };
        rt.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: vols_c.clone(),
            linux: Some(res.clone()),
            windows: None,
            annotations: Default::default(),
        })
        .await
        .context("UpdateContainerResources")?;
        let mem = exec_ok(&mut rt, &vols_c, &["cat", "/sys/fs/cgroup/memory.max"]).await?;
        ensure!(mem == format!("{}\n", 96u64 << 20), "memory.max {mem:?}");
        // Shares to cgroup v2 weight as runc >= 1.3.2 and crun >= 1.23
        // convert them (1024 -> 100, 2 -> 1, 262144 -> 10000): 512 -> 59.
        let l = 512f64.log2();
        let expect = 10f64.powf((l * l + 125.0 * l) / 612.0 - 7.0 / 34.0).ceil() as u64;
        ensure!(expect == 59, "weight formula gives {expect}");
        let weight = exec_ok(&mut rt, &vols_c, &["cat", "/sys/fs/cgroup/cpu.weight"]).await?;
        ensure!(weight == format!("{expect}\n"), "cpu.weight {weight:?}");
        let max = exec_ok(&mut rt, &vols_c, &["cat", "/sys/fs/cgroup/cpu.max"]).await?;
        ensure!(max == "50000 100000\n", "cpu.max {max:?}");
        let st = container_status(&mut rt, &vols_c).await?;
        let linux = st
            .resources
            .as_ref()
            .and_then(|r| r.linux.as_ref())
            .with_context(|| format!("ContainerStatus without resources: {st:?}"))?;
        ensure!(
            linux.memory_limit_in_bytes == 96 << 20
                && linux.cpu_shares == 512
                && linux.cpu_quota == 50_000
                && linux.cpu_period == 100_000,
            "ContainerStatus resources {linux:?}"
        );
        // The other containers keep their own cgroups.
        let other = exec_ok(&mut rt, &caps, &["cat", "/sys/fs/cgroup/memory.max"]).await?;
        ensure!(other == before, "memory.max of another container {other:?}");

        stop_remove_pod(&mut rt, &pod).await?;
        // The host directories outlive the pod, unmounted and intact.
        ensure!(std::fs::read_to_string(empty_dir.join("out"))? == "from-guest\n");
        ensure!(std::fs::read_to_string(config_map.join("key"))? == "v2\n");
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

/// An HTTP GET from the host; returns the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .with_context(|| format!("reading from {addr}"))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "GET {addr}{path}: {head}"
    );
    Ok(body.to_string())
}

/// Issue 6: two pods on a real CNI bridge network (Debian's bridge,
/// host-local and portmap plugins): distinct IPs from the subnet, the
/// guest interface configured with them, pod-to-pod and host-to-pod TCP,
/// a hostPort through portmap, the pod's DNS config inside, a hostNetwork
/// pod refused; and nothing of either pod's network left afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_network() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let log_root = dirs.top.path().join("logs");
    let image = s.image.clone();
    let host_port = 30000 + (std::process::id() % 2000) as i32;
    let r = guarded(&huskd, async {
        let st = rt.status(cri::StatusRequest { verbose: false }).await?.into_inner();
        let net_ready = st
            .status
            .context("Status.status")?
            .conditions
            .into_iter()
            .find(|c| c.r#type == "NetworkReady")
            .context("no NetworkReady condition")?;
        ensure!(net_ready.status, "NetworkReady false: {net_ready:?}");
        pull(&mut img, &image).await?;

        // hostNetwork under a VM-only handler (host_namespaces = "refuse"):
        // refused, nothing created (the default handler runs it on the
        // host: hybrid::cri_hybrid_host_pods).
        let mut host_net = pod_config("hostnet", &log_root.join("hostnet"));
        host_net.linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        expect_err(
            "RunPodSandbox with hostNetwork",
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(host_net),
                runtime_handler: "big".into(),
            })
            .await,
            Code::InvalidArgument,
            &["namespace_options.network", "refuse"],
        )?;

        let mut a_cfg = pod_config("web", &log_root.join("web"));
        a_cfg.port_mappings = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 80,
            host_port,
            host_ip: String::new(),
        }];
        a_cfg.dns_config = Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        });
        let b_cfg = pod_config("client", &log_root.join("client"));
        let a = run_pod(&mut rt, &a_cfg, "").await?;
        let b = run_pod(&mut rt, &b_cfg, "").await?;
        let ip_of = |st: cri::PodSandboxStatusResponse| -> Result<std::net::Ipv4Addr> {
            let ip = st.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
            ip.parse().with_context(|| format!("pod IP {ip:?}"))
        };
        let pod_status = |id: &str| cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        let ip_a = ip_of(rt.pod_sandbox_status(pod_status(&a)).await?.into_inner())?;
        let ip_b = ip_of(rt.pod_sandbox_status(pod_status(&b)).await?.into_inner())?;
        eprintln!("pod IPs: web {ip_a}, client {ip_b}");
        ensure!(ip_a != ip_b, "both pods got {ip_a}");
        let net = &dirs.net;
        for ip in [ip_a, ip_b] {
            ensure!(
                ip.octets()[..3] == net.gateway.octets()[..3] && ip != net.gateway,
                "{ip} is not a pod address of {}",
                net.subnet
            );
        }

        let web = create_start(
            &mut rt,
            &a,
            &a_cfg,
            container_config(
                "httpd",
                &image,
                &[
                    "sh",
                    "-c",
                    "mkdir -p /www && echo husk-pod-web > /www/index.html && exec httpd -f -p 80 -h /www",
                ],
                "httpd.log",
            ),
        )
        .await?;
        let client = create_start(
            &mut rt,
            &b,
            &b_cfg,
            container_config("sleeper", &image, &["sleep", "3600"], "sleeper.log"),
        )
        .await?;

        // The guest's eth0 carries the CNI address; the default route goes
        // through the bridge.
        let addr = exec_ok(&mut rt, &web, &["ip", "-o", "addr", "show", "eth0"]).await?;
        ensure!(addr.contains(&format!("inet {ip_a}/24")), "eth0 in pod web: {addr}");
        let routes = exec_ok(&mut rt, &web, &["ip", "route"]).await?;
        ensure!(
            routes.contains(&format!("default via {}", net.gateway)),
            "routes in pod web: {routes}"
        );
        let resolv = exec_ok(&mut rt, &web, &["cat", "/etc/resolv.conf"]).await?;
        for want in [
            "nameserver 10.96.0.10",
            "search default.svc.cluster.local svc.cluster.local",
            "options ndots:5",
        ] {
            ensure!(resolv.contains(want), "resolv.conf lacks {want:?}: {resolv}");
        }

        // httpd listens a moment after its container starts: wait from
        // the host (which also checks host -> pod).
        let deadline = Instant::now() + Duration::from_secs(30);
        let body = loop {
            match tokio::task::spawn_blocking(move || http_get((ip_a, 80).into(), "/index.html"))
                .await?
            {
                Ok(b) => break b,
                Err(e) if Instant::now() > deadline => {
                    let ps = exec_ok(&mut rt, &web, &["netstat", "-ltn"]).await?;
                    bail!("host cannot fetch from pod web: {e:#}; listening in the pod:\n{ps}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        ensure!(body.trim() == "husk-pod-web", "host to pod: {body:?}");
        // Pod to pod with busybox nc: Debian's static busybox wget
        // segfaults on any URL, on the host too (a glibc static-NSS issue
        // of that build), so it cannot be the client.
        let get = format!(
            "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip_a} 80"
        );
        let resp = exec_ok(&mut rt, &client, &["sh", "-c", &get]).await?;
        ensure!(
            resp.starts_with("HTTP/1.") && resp.trim_end().ends_with("husk-pod-web"),
            "pod to pod: {resp:?}"
        );
        // The hostPort, through portmap's DNAT on the host's side of the
        // bridge.
        let gw = net.gateway;
        let body = tokio::task::spawn_blocking(move || {
            http_get((gw, host_port as u16).into(), "/index.html")
        })
        .await??;
        ensure!(body.trim() == "husk-pod-web", "hostPort {host_port}: {body:?}");

        for id in [&a, &b] {
            stop_remove_pod(&mut rt, id).await?;
        }
        dirs.assert_sandboxes_gone()?;
        let nat = std::process::Command::new("iptables-save")
            .args(["-t", "nat"])
            .output()
            .context("iptables-save")?;
        let nat = String::from_utf8_lossy(&nat.stdout);
        ensure!(
            !nat.contains(&format!("--dport {host_port}")),
            "portmap rules for {host_port} left:\n{nat}"
        );
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}
