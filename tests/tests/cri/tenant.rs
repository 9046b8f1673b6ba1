//! The tenant is the attacker (issue 14): containers of one pod VM go after the host through
//! the files huskd reads in their root filesystems, through the serial console, through the
//! pod's files in the virtio-fs share, and with the syscalls their seccomp profile should refuse. Each attack is one that worked, or would work,
//! without the defence it checks.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use husk_tests::huskd::{Huskd, HuskdDirs, CONSOLE_LOG_MAX_BYTES};
use k8s_cri::v1 as cri;
use tonic::Code;

use super::helpers::*;

fn security_context(cfg: &mut cri::ContainerConfig) -> &mut cri::LinuxContainerSecurityContext {
    cfg.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_tenant_attacks() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let pcfg = pod_config("tenant", &dirs.top.path().join("logs/tenant"));
    let image = s.image.clone();
    let r = guarded(&huskd, async {
        pull(&mut img, &image).await.context("PullImage")?;
        let pod = run_pod(&mut rt, &pcfg, "").await?;
        let t = Pod {
            id: &pod,
            config: &pcfg,
            image: &image,
            dirs: &dirs,
        };
        passwd_traps(&mut rt, &t)
            .await
            .context("planted /etc/passwd")?;
        seccomp_profiles(&mut rt, &t).await.context("seccomp")?;
        console_flood(&mut rt, &t).await.context("console flood")?;
        share_tampering(&mut rt, &t)
            .await
            .context("tampering with the share")?;
        stop_remove_pod(&mut rt, &pod).await
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

struct Pod<'a> {
    id: &'a str,
    config: &'a cri::PodSandboxConfig,
    image: &'a str,
    dirs: &'a HuskdDirs,
}

impl Pod<'_> {
    async fn start(&self, rt: &mut Rt, cfg: cri::ContainerConfig) -> Result<String> {
        create_start(rt, self.id, self.config, cfg).await
    }

    fn sleeper(&self, name: &str) -> cri::ContainerConfig {
        container_config(
            name,
            self.image,
            &["sleep", "3600"],
            &format!("{name}/0.log"),
        )
    }
}

/// A FIFO as `/etc/passwd` once hung every CRI call of the node (huskd opened it on the host);
/// a symlink to an absolute path made huskd read host files. ExecSync resolves the user again,
/// so probes are enough to trigger it.
async fn passwd_traps(rt: &mut Rt, p: &Pod<'_>) -> Result<()> {
    // A host file the symlink aims at: if huskd followed it, the exec's HOME would say so.
    let host_file = p.dirs.top.path().join("host-passwd");
    std::fs::write(&host_file, "root:x:0:0:host:/host-home:/bin/sh\n")?;
    let mut cfg = p.sleeper("fifo");
    security_context(&mut cfg).run_as_user = Some(cri::Int64Value { value: 0 });
    let fifo = p.start(rt, cfg.clone()).await?;
    exec_ok(
        rt,
        &fifo,
        &[
            "sh",
            "-c",
            "rm /etc/passwd && mkfifo /etc/passwd && ln -sf /dev/zero /etc/group",
        ],
    )
    .await?;
    cfg.metadata.as_mut().unwrap().name = "link".into();
    cfg.log_path = "link/0.log".into();
    let link = p.start(rt, cfg).await?;
    let escape = format!(
        "/../../../../../../../../../../../..{}",
        host_file.display()
    );
    exec_ok(rt, &link, &["ln", "-sf", &escape, "/etc/passwd"]).await?;

    // Version keeps answering within 1 s while probes hit both containers at once.
    let stop = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (mut rt, stop) = (rt.clone(), stop.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                tokio::time::timeout(Duration::from_secs(5), version_answers(&mut rt))
                    .await
                    .context("Version did not answer within 5 s")??;
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(worst)
        })
    };
    let mut probes = tokio::task::JoinSet::new();
    for i in 0..8 {
        let mut rt = rt.clone();
        let id = if i % 2 == 0 {
            fifo.clone()
        } else {
            link.clone()
        };
        probes.spawn(async move {
            let r = exec(&mut rt, &id, &["sh", "-c", "echo $HOME"], 30).await;
            (id, r)
        });
    }
    while let Some(done) = probes.join_next().await {
        let (id, r) = done?;
        let r = r.with_context(|| format!("ExecSync in {id}"))?;
        let home = String::from_utf8_lossy(&r.stdout).into_owned();
        ensure!(
            r.exit_code == 0,
            "probe in {id}: exit {} {r:?}",
            r.exit_code
        );
        ensure!(
            !home.contains("host-home"),
            "huskd read the host's file through the symlink: HOME={home:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let worst = watchdog.await??;
    eprintln!("Version during the probes: worst {} ms", worst.as_millis());
    ensure!(
        worst < Duration::from_secs(1),
        "Version took {worst:?} while probes ran"
    );
    Ok(())
}

const STATUS_SECCOMP: &[&str] = &["grep", "Seccomp:", "/proc/self/status"];

async fn seccomp_mode(rt: &mut Rt, id: &str) -> Result<String> {
    let out = exec_ok(rt, id, STATUS_SECCOMP).await?;
    Ok(out
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string())
}

/// RuntimeDefault, Localhost and Unconfined as kubelet sends them; the filter holds for the
/// container's own process and for every ExecSync.
async fn seccomp_profiles(rt: &mut Rt, p: &Pod<'_>) -> Result<()> {
    let profile = |t: cri::security_profile::ProfileType, r: &str| cri::SecurityProfile {
        profile_type: t as i32,
        localhost_ref: r.into(),
    };
    use cri::security_profile::ProfileType;

    let mut cfg = p.sleeper("rtdefault");
    security_context(&mut cfg).seccomp = Some(profile(ProfileType::RuntimeDefault, ""));
    let rd = p.start(rt, cfg).await?;
    ensure!(
        seccomp_mode(rt, &rd).await? == "2",
        "RuntimeDefault: no filter on an exec"
    );
    let main = exec_ok(rt, &rd, &["grep", "Seccomp:", "/proc/1/status"]).await?;
    ensure!(
        main.contains('2'),
        "RuntimeDefault: no filter on the main process: {main:?}"
    );
    // Ordinary work goes through (fork, pipes, files); namespaces and AF_VSOCK do not.
    let out = exec_ok(
        rt,
        &rd,
        &["sh", "-c", "echo ok | cat; mkdir -p /tmp/d && ls /tmp"],
    )
    .await?;
    ensure!(out.contains("ok") && out.contains('d'), "{out:?}");
    let err = exec_fails(rt, &rd, &["unshare", "-U", "true"]).await?;
    ensure!(
        err.contains("Operation not permitted"),
        "unshare under RuntimeDefault: {err:?}"
    );

    // A Localhost profile from the node that refuses mkdir.
    let file = p.dirs.top.path().join("no-mkdir.json");
    std::fs::write(
        &file,
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )?;
    let mut cfg = p.sleeper("localhost");
    security_context(&mut cfg).seccomp =
        Some(profile(ProfileType::Localhost, &file.display().to_string()));
    let lh = p.start(rt, cfg).await?;
    ensure!(seccomp_mode(rt, &lh).await? == "2", "Localhost: no filter");
    let err = exec_fails(rt, &lh, &["mkdir", "/tmp/x"]).await?;
    ensure!(err.contains("Operation not permitted"), "{err:?}");

    let mut cfg = p.sleeper("unconfined");
    security_context(&mut cfg).seccomp = Some(profile(ProfileType::Unconfined, ""));
    let un = p.start(rt, cfg).await?;
    ensure!(seccomp_mode(rt, &un).await? == "0", "Unconfined: a filter");
    exec_ok(rt, &un, &["mkdir", "/tmp/x"]).await?;

    // A profile that is not there: InvalidArgument naming the field, and no container.
    let before = list_containers(rt, Default::default()).await?.len();
    let mut cfg = p.sleeper("missing-profile");
    security_context(&mut cfg).seccomp =
        Some(profile(ProfileType::Localhost, "/nonexistent/profile.json"));
    expect_err(
        "CreateContainer with a missing Localhost profile",
        rt.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: p.id.into(),
            config: Some(cfg),
            sandbox_config: Some(p.config.clone()),
        })
        .await,
        Code::InvalidArgument,
        &["security_context.seccomp", "/nonexistent/profile.json"],
    )?;
    ensure!(
        list_containers(rt, Default::default()).await?.len() == before,
        "a container was left"
    );
    Ok(())
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Root in the guest writes to the serial port for as long as it likes; the host keeps at most
/// the configured cap of it, and the newest output.
async fn console_flood(rt: &mut Rt, p: &Pod<'_>) -> Result<()> {
    let mut cfg = p.sleeper("flood");
    security_context(&mut cfg).privileged = true;
    let flood = p.start(rt, cfg).await?;
    let bytes = CONSOLE_LOG_MAX_BYTES * 3;
    let script = format!(
        "mknod /tmp/ttyS0 c 4 64 && head -c {bytes} /dev/zero | tr '\\0' x > /tmp/ttyS0 \
         && echo TENANT-FLOOD-END > /tmp/ttyS0"
    );
    let t = Instant::now();
    let r = exec(rt, &flood, &["sh", "-c", &script], 300).await?;
    ensure!(r.exit_code == 0, "flood: {r:?}");
    eprintln!(
        "{bytes} bytes through the guest's UART in {} ms",
        t.elapsed().as_millis()
    );
    let log = p
        .dirs
        .state
        .path()
        .join("sandboxes")
        .join(p.id)
        .join("console.log");
    let old = log.with_extension("log.1");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains("TENANT-FLOOD-END") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the newest console output never reached {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = file_len(&log) + file_len(&old);
    eprintln!("console log on disk after the flood: {total} bytes (cap {CONSOLE_LOG_MAX_BYTES})");
    ensure!(
        total <= CONSOLE_LOG_MAX_BYTES,
        "console log holds {total} bytes"
    );
    ensure!(
        file_len(&old) > 0,
        "the log never rotated: the flood did not reach it"
    );
    Ok(())
}

/// Root in a privileged container goes after the pod's share: it remounts its read-only
/// `/etc/resolv.conf` and `/etc/hostname` (virtio-fs files of the pod, shared by all its
/// containers) read-write and rewrites them, which once changed them for every container of
/// the pod. The share is read-only on the host side, so the writes fail, while what containers
/// must write (their root filesystem, the pod's `/etc/hosts`) still works. A container cannot
/// reach the share's own directories (a virtio-fs mount in the guest gets the newest submount,
/// its own root filesystem), so the symlink and rename attacks of a kernel-level attacker are
/// played on the host side, on the same read-only mount virtiofsd serves
/// (`sandbox::tests::share_is_read_only_for_the_guest_except_its_data_mounts`); here the test
/// checks that the pod's share is that mount.
async fn share_tampering(rt: &mut Rt, p: &Pod<'_>) -> Result<()> {
    let victim = p.start(rt, p.sleeper("victim")).await?;
    let mut cfg = p.sleeper("intruder");
    security_context(&mut cfg).privileged = true;
    let intruder = p.start(rt, cfg).await?;
    for f in ["/etc/resolv.conf", "/etc/hostname"] {
        let err = exec_fails(
            rt,
            &intruder,
            &[
                "sh",
                "-c",
                &format!("mount -o remount,rw {f} && echo planted > {f}"),
            ],
        )
        .await?;
        ensure!(
            err.contains("Read-only file system"),
            "{f}: failed, but not on the read-only share: {err}"
        );
    }
    let resolv = exec_ok(rt, &victim, &["cat", "/etc/resolv.conf"]).await?;
    ensure!(!resolv.contains("planted"), "the victim sees {resolv:?}");
    // What containers need to write still works.
    exec_ok(
        rt,
        &intruder,
        &[
            "sh",
            "-c",
            "echo 192.0.2.9 tenant-added >> /etc/hosts && touch /rootfs-write",
        ],
    )
    .await
    .context("writes the container may make")?;
    let hosts = exec_ok(rt, &victim, &["cat", "/etc/hosts"]).await?;
    ensure!(
        hosts.contains("tenant-added"),
        "/etc/hosts is the pod's: {hosts:?}"
    );

    let sb = p.dirs.state.path().join("sandboxes").join(p.id);
    let share = sb.join("share");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let share_mount = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(share.to_str().unwrap_or_default()))
        .with_context(|| format!("{} is not a mount", share.display()))?;
    ensure!(
        share_mount
            .split(' ')
            .nth(5)
            .is_some_and(|o| o.split(',').any(|f| f == "ro")),
        "the pod's share is not read-only: {share_mount}"
    );
    // huskd's own mounts and removals still land where they belong.
    let rw = sb.join("share-rw/containers");
    for id in [&victim, &intruder] {
        ensure!(rw.join(id).join("rootfs").is_dir(), "{id}: no directory");
        rt.stop_container(cri::StopContainerRequest {
            container_id: id.to_string(),
            timeout: 0,
        })
        .await
        .context("StopContainer")?;
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .context("RemoveContainer")?;
        ensure!(!rw.join(id).exists(), "{id}: its share directory is left");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(
            !mountinfo.contains(id.as_str()),
            "{id}: mounts left after RemoveContainer"
        );
    }
    Ok(())
}
