//! End-to-end: the builtin hypervisor backend (husk-vmm).
//!
//! On a host with hardware virtualization a real sandbox boots under
//! husk-vmm (the checks of sandbox.rs's first test). On a host without it
//! (the PVM development and CI machines) a stock Linux guest cannot boot
//! under husk-vmm in reasonable time, so that test asserts and prints why
//! the builtin backend is refused there. Everything else the backend does is
//! checked on every host with a tiny guest that needs no Linux: husk-vmm is
//! launched with the generated config, in its own session, answers on its
//! control socket, serves the hybrid vsock and the console log, and stops
//! without leaving a process, a socket or a directory behind.
//!
//! Environment: `HUSK_VMM_BIN` (else husk-vmm on PATH, `HUSK_BIN_DIR`, next
//! to the test binary's target dir: `cargo build -p husk-vmm --bin husk-vmm`),
//! `HUSK_VIRTIOFSD_BIN`, and for the full sandbox what husk_tests::TestEnv
//! needs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_runtime::hypervisor::builtin::{
    self, control_request, BuiltinFiles, Request, Status, VmState, BUILTIN_KERNEL_PARAM,
};
use husk_runtime::hypervisor::{
    self, probe_accel, Accel, Builtin, BuiltinPaths, HybridVsockConfig, Hypervisor,
    HypervisorChoice, HypervisorError, VirtioFsConfig, Vm, VmConfig,
};
use husk_runtime::process::ManagedChild;
use husk_runtime::Sandbox;
use husk_testkit::guest::elf;
use husk_testkit::{busybox, env_path};
use husk_tests::{
    init_tracing, run_short_lived_container, show_console_if_failed, unique_id, LeakProbe, TestEnv,
};

/// The hosts have two cores: one VM test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// husk-vmm and virtiofsd, the two binaries every builtin backend test runs.
fn vmm_and_virtiofsd() -> Result<(BuiltinPaths, PathBuf)> {
    let paths = BuiltinPaths::resolve(env_path("HUSK_VMM_BIN").as_deref())
        .context("the builtin backend tests need husk-vmm: cargo build -p husk-vmm --bin husk-vmm, or set HUSK_VMM_BIN")?;
    let virtiofsd =
        husk_runtime::virtiofsd::find_virtiofsd(env_path("HUSK_VIRTIOFSD_BIN").as_deref())?;
    Ok((paths, virtiofsd))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_sandbox_runs_a_container_or_says_why_not() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let probe = probe_accel();
    let chosen = hypervisor::select(HypervisorChoice::Builtin, || {
        unreachable!("a forced builtin backend never resolves QEMU")
    });
    if probe.accel != Accel::Kvm {
        let e = match chosen {
            Ok(h) => bail!(
                "select(Builtin) accepted {} on a host without hardware virtualization ({})",
                h.description(),
                probe.reason
            ),
            Err(e) => e,
        };
        eprintln!(
            "NOT BOOTING A SANDBOX UNDER husk-vmm ON THIS HOST: {}\n  select(builtin) refuses: {e}\n  \
             (the launch/status/shutdown path is checked by husk_vmm_launch_status_shutdown)",
            probe.reason
        );
        ensure!(
            matches!(e, HypervisorError::BuiltinUnavailable(_)),
            "wrong error: {e}"
        );
        ensure!(e.to_string().contains(&probe.why), "{e}");
        // And auto falls back to QEMU, saying why.
        let env_q = husk_runtime::hypervisor::QemuPaths {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            bios: "/usr/share/qemu/qboot.rom".into(),
            husk_vsock: "husk-vsock".into(),
        };
        let auto = hypervisor::select(HypervisorChoice::Auto, || Ok(env_q))?;
        ensure!(auto.name() == "qemu", "auto chose {}", auto.description());
        ensure!(auto.description() == probe.reason, "{}", auto.description());
        return Ok(());
    }

    // Hardware virtualization: a real sandbox under husk-vmm.
    let h = chosen.context("select(Builtin) with hardware virtualization")?;
    ensure!(h.name() == "builtin", "{}", h.description());
    let env = TestEnv::from_env()?;
    let mut cfg = env.sandbox_config(&unique_id("bi"));
    cfg.hypervisor = h.into();
    let rootfs = tempfile::tempdir()?;
    busybox::rootfs(rootfs.path())?;
    let sb = Sandbox::start(cfg).await?;
    let probe_leak = LeakProbe::of(&sb);
    let body = async {
        eprintln!(
            "sandbox {} up under {}: {:?}",
            sb.id(),
            sb.hypervisor(),
            sb.timings()
        );
        let roles: Vec<&str> = sb.pids().iter().map(|(r, _)| *r).collect();
        ensure!(
            roles.contains(&"husk-vmm") && !roles.contains(&"husk-vsock"),
            "{roles:?}"
        );
        let h = sb.health().await?;
        ensure!(!h.agent_version.is_empty(), "health: {h:?}");
        run_short_lived_container(&sb, rootfs.path()).await
    }
    .await;
    show_console_if_failed(&sb, &body);
    let stop = sb.stop().await;
    drop(sb);
    let clean = probe_leak.assert_clean();
    body?;
    stop?;
    clean
}

/// `out 0x3f8, 'H'; out 0x3f8, 'i'` then spin (`jmp $`): the guest's first
/// instructions show up in the console log, and it runs until stopped.
const SAY_HI_AND_SPIN: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'H', 0xee, // mov al, 'H'; out dx, al
    0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
    0xeb, 0xfe, // jmp $
];

/// husk-vmm's `status`, or why it gave none.
async fn vmm_status(files: &BuiltinFiles) -> Result<Status> {
    let r = control_request(&files.control, Request::Status, Duration::from_secs(5)).await?;
    match r.status {
        Some(st) if r.ok => Ok(st),
        _ => bail!("status request failed: {r}"),
    }
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Reaps a child whose handle was forgotten.
fn reap(pid: u32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

struct Fixture {
    dir: PathBuf,
    config: VmConfig,
    virtiofsd: ManagedChild,
}

fn fixture(dir: &Path, virtiofsd: &Path) -> Result<Fixture> {
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(SAY_HI_AND_SPIN))?;
    // husk-vmm loads it where a Linux initramfs would go; contents unused.
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, vec![0u8; 4096])?;
    let fs_sock = dir.join("fs.sock");
    let _ = std::fs::remove_file(&fs_sock);
    let virtiofsd = husk_runtime::virtiofsd::spawn_virtiofsd(
        virtiofsd,
        &share,
        &fs_sock,
        &dir.join("virtiofsd.log"),
    )?;
    // Like the sandbox library: virtiofsd's socket exists before the VMM starts.
    let t0 = Instant::now();
    while !is_socket(&fs_sock) {
        ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "virtiofsd socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let config = VmConfig {
        id: "builtin-e2e".into(),
        vcpus: 1,
        memory_mib: 128,
        kernel,
        initrd,
        kernel_params: vec!["husk.test=1".into()],
        virtio_fs: Some(VirtioFsConfig {
            socket: fs_sock,
            tag: "husk-share".into(),
        }),
        net: None,
        vsock: HybridVsockConfig {
            uds: dir.join("vsock"),
            guest_cid: 3,
        },
        console_log: dir.join("console.log"),
        console_log_max_bytes: 1 << 20,
        sandbox_dir: dir.to_path_buf(),
        host: Default::default(),
    };
    Ok(Fixture {
        dir: dir.to_path_buf(),
        config,
        virtiofsd,
    })
}

/// A fresh fixture in `dir` with its husk-vmm launched, both pids recorded
/// in `pids` for the leak check; returns the VM and husk-vmm's pid.
async fn launch(
    backend: &Builtin,
    dir: &Path,
    virtiofsd: &Path,
    pids: &mut Vec<(&'static str, u32)>,
) -> Result<(Fixture, Box<dyn Vm>, u32)> {
    let fx = fixture(dir, virtiofsd)?;
    pids.push(("virtiofsd", fx.virtiofsd.pid()));
    let t0 = Instant::now();
    let vm: Box<dyn Vm> = backend.launch(&fx.config).await?;
    eprintln!("husk-vmm running after {:?}", t0.elapsed());
    let vm_pids = vm.pids();
    ensure!(
        vm_pids.len() == 1 && vm_pids[0].0 == "husk-vmm",
        "{vm_pids:?}: no husk-vsock with the builtin backend"
    );
    let pid = vm_pids[0].1;
    pids.push(("husk-vmm", pid));
    Ok((fx, vm, pid))
}

/// A sandbox-like directory `<tmp>/<id>` for a fixture, in /tmp so that
/// its socket paths stay short; `<tmp>` goes when the returned guard drops.
fn fresh_dir(tmp_prefix: &str, id_prefix: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let base = tempfile::Builder::new()
        .prefix(tmp_prefix)
        .tempdir_in("/tmp")?;
    let dir = base.path().join(unique_id(id_prefix));
    std::fs::create_dir_all(&dir)?;
    Ok((base, dir))
}

/// The end of a test that ran in `dir`: removes it, then fails with the
/// test's error `r` or else with whatever the husk-vmm or virtiofsd of
/// `pids` left behind.
fn remove_and_check_clean(dir: &Path, pids: Vec<(&'static str, u32)>, r: Result<()>) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let clean = LeakProbe {
        dir: dir.to_path_buf(),
        pids,
    }
    .assert_clean();
    r?;
    clean
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn husk_vmm_launch_status_shutdown() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let (paths, virtiofsd) = vmm_and_virtiofsd()?;
    let probe = probe_accel();
    eprintln!("host: {}", probe.reason);
    // Built directly: select() would refuse it on a host without hardware
    // virtualization, and this guest needs none.
    let backend = Builtin::new(paths, &probe);
    let (_base, dir) = fresh_dir("hb", "v")?;
    let mut pids = Vec::new();
    let r = launch_status_shutdown(&backend, &dir, &virtiofsd, &mut pids).await;
    remove_and_check_clean(&dir, pids, r)
}

async fn launch_status_shutdown(
    backend: &Builtin,
    dir: &Path,
    virtiofsd: &Path,
    pids: &mut Vec<(&'static str, u32)>,
) -> Result<()> {
    let files = BuiltinFiles::in_dir(dir);

    // 1. Launch, status, shutdown through the control socket.
    let (mut fx, mut vm, pid) = launch(backend, dir, virtiofsd, pids).await?;

    // Started with the generated config, in its own session.
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    ensure!(
        cmd.contains(&format!("--config {}", files.config.display())),
        "{cmd}"
    );
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32)))?.as_raw();
    ensure!(
        sid == pid as i32,
        "husk-vmm is not in its own session (sid {sid}), a huskd restart could take it down"
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.config)?)?;
    let cmdline = json["cmdline"].as_str().unwrap_or_default();
    for want in ["reboot=k", BUILTIN_KERNEL_PARAM, "husk.test=1"] {
        ensure!(
            cmdline.split(' ').any(|p| p == want),
            "{want} missing: {cmdline}"
        );
    }
    ensure!(
        json["devices"]["vsock"]["uds_path"] == fx.config.vsock.uds.to_str().unwrap(),
        "{json}"
    );
    ensure!(
        json["devices"]["fs"][0]["socket"]
            == fx
                .config
                .virtio_fs
                .as_ref()
                .unwrap()
                .socket
                .to_str()
                .unwrap(),
        "{json}"
    );
    ensure!(json["devices"]["rng"] == true, "{json}");

    // The pid file is written just before the vCPUs start: "created", then
    // "running".
    let t = Instant::now();
    let st = loop {
        let st = vmm_status(&files).await?;
        ensure!(
            st.state == VmState::Running || st.state == VmState::Created,
            "{st:?}"
        );
        if st.state == VmState::Running {
            break st;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "never running: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("status: {st:?}");
    ensure!(st.id == "builtin-e2e", "{st:?}");
    ensure!(st.pid == pid, "{st:?}");
    ensure!(st.memory_mib == 128, "{st:?}");
    // The hybrid vsock is husk-vmm's own.
    ensure!(
        is_socket(&fx.config.vsock.uds),
        "no hybrid vsock socket at {}",
        fx.config.vsock.uds.display()
    );
    // The guest ran: its serial output is the sandbox's console log.
    let t = Instant::now();
    loop {
        let c = std::fs::read_to_string(&fx.config.console_log).unwrap_or_default();
        if c == "Hi" {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "console log {c:?}, want \"Hi\""
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure!(vm.try_exit()?.is_none(), "husk-vmm exited early");

    let t = Instant::now();
    let status = vm.shutdown(Duration::from_secs(5)).await?;
    eprintln!("shutdown took {:?}: {status}", t.elapsed());
    ensure!(status.success(), "husk-vmm exit {status}");
    ensure!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}: the control socket was not obeyed",
        t.elapsed()
    );
    ensure!(!alive(pid), "husk-vmm pid {pid} still exists");
    for p in [&files.control, &files.pid, &fx.config.vsock.uds] {
        ensure!(!p.exists(), "{} left after shutdown", p.display());
    }
    // Idempotent.
    ensure!(vm.shutdown(Duration::from_secs(1)).await?.success());
    let v = fx.virtiofsd.terminate(Duration::from_secs(2)).await?;
    eprintln!("virtiofsd: {v}");
    drop(vm);

    // 2. kill(): SIGKILL leaves husk-vmm no chance to clean up; the backend does.
    let _ = std::fs::remove_file(&fx.config.console_log);
    let (mut fx, mut vm, pid) = launch(backend, dir, virtiofsd, pids).await?;
    let status = vm.kill().await?;
    ensure!(!status.success(), "killed husk-vmm exited with {status}");
    ensure!(!alive(pid), "husk-vmm pid {pid} survived kill");
    for p in [&files.control, &files.pid, &fx.config.vsock.uds] {
        ensure!(!p.exists(), "{} left after kill", p.display());
    }
    fx.virtiofsd.terminate(Duration::from_secs(2)).await?;

    // 3. The handle is lost without a stop (huskd crashed): husk-vmm keeps
    // running, and a new huskd finds it by its pid file and stops it.
    let (mut fx, vm, pid) = launch(backend, dir, virtiofsd, pids).await?;
    std::mem::forget(vm);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = vmm_status(&files).await?;
    ensure!(st.pid == pid && st.state == VmState::Running, "{st:?}");
    let t = Instant::now();
    let stopped = builtin::stop_orphan(dir, Duration::from_secs(5)).await?;
    ensure!(
        stopped == Some(pid),
        "stop_orphan stopped {stopped:?}, want {pid}"
    );
    ensure!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    // Our forgotten child is a zombie now (nobody reaps it): finished.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    ensure!(
        state.is_empty()
            || state
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
        "husk-vmm still running after stop_orphan: {state}"
    );
    reap(pid);
    for p in [&files.control, &files.pid, &fx.config.vsock.uds] {
        ensure!(!p.exists(), "{} left after stop_orphan", p.display());
    }
    ensure!(builtin::stop_orphan(dir, Duration::from_secs(1))
        .await?
        .is_none());
    fx.virtiofsd.terminate(Duration::from_secs(2)).await?;

    // 4. A bad launch (no virtiofsd behind the socket) fails with husk-vmm's
    // own words and leaves nothing running.
    let mut bad = fx.config.clone();
    bad.virtio_fs = Some(VirtioFsConfig {
        socket: fx.dir.join("nobody.sock"),
        tag: "husk-share".into(),
    });
    match backend.launch(&bad).await {
        Ok(mut vm) => {
            let _ = vm.kill().await;
            bail!("husk-vmm started without its virtio-fs backend");
        }
        Err(e) => {
            let s = e.to_string();
            eprintln!("bad launch: {s}");
            ensure!(s.contains("husk-vmm failed to start"), "{s}");
            ensure!(s.contains("nobody.sock"), "{s}");
        }
    }
    ensure!(!files.pid.exists() && !files.control.exists());
    Ok(())
}

/// Prints 'R', then pulses the i8042 reset line (what a `reboot=k` guest
/// does to end the VM under husk-vmm).
const SAY_R_AND_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'R', 0xee, // mov al, 'R'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xeb, 0xfe, // jmp $
];

/// The sandbox library with the builtin backend, on every host: a guest
/// that resets during boot is reported as an exited VM (with its console),
/// one that never announces readiness as a boot timeout, and neither leaves
/// anything behind. No Linux needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_with_builtin_backend_reports_exit_and_timeout() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let (paths, virtiofsd) = vmm_and_virtiofsd()?;
    let hv: std::sync::Arc<dyn Hypervisor> =
        std::sync::Arc::new(Builtin::new(paths, &probe_accel()));
    let base = tempfile::Builder::new().prefix("hs").tempdir_in("/tmp")?;
    let initrd = base.path().join("initrd.img");
    std::fs::write(&initrd, vec![0u8; 4096])?;
    let state = base.path().join("sb");

    for (code, want_exit) in [(SAY_R_AND_RESET, true), (SAY_HI_AND_SPIN, false)] {
        let kernel = base
            .path()
            .join(if want_exit { "reset.elf" } else { "spin.elf" });
        std::fs::write(&kernel, elf(code))?;
        let id = unique_id("s");
        let mut cfg = husk_runtime::SandboxConfig::new(
            id.clone(),
            hv.clone(),
            husk_runtime::GuestImage {
                kernel,
                initrd: initrd.clone(),
            },
            virtiofsd.clone(),
        );
        cfg.state_dir = state.clone();
        cfg.ready_timeout = Duration::from_secs(2);
        let t = Instant::now();
        let r = Sandbox::start(cfg).await;
        let took = t.elapsed();
        let leak = LeakProbe {
            dir: state.join(&id),
            pids: Vec::new(),
        };
        match (r, want_exit) {
            (
                Err(husk_runtime::SandboxError::BootExited {
                    status, console, ..
                }),
                true,
            ) => {
                eprintln!("reset guest: VM exited ({status}) after {took:?}; console {console:?}");
                ensure!(status == "exit status: 0", "{status}");
                ensure!(console == "R", "{console:?}");
                ensure!(took < Duration::from_secs(2), "noticed after {took:?}");
            }
            (Err(husk_runtime::SandboxError::BootTimeout { console, .. }), false) => {
                eprintln!("spinning guest: boot timeout after {took:?}; console {console:?}");
                ensure!(console == "Hi", "{console:?}");
            }
            (Ok(sb), _) => {
                let _ = sb.stop().await;
                bail!("a guest without an agent started a sandbox");
            }
            (Err(e), _) => bail!("unexpected start error: {e}"),
        }
        leak.assert_clean()?;
    }
    Ok(())
}

/// huskd restarts after a crash that left a husk-vmm running (it has its own
/// session, so it survives huskd): opening huskd's state again (which runs
/// the restart recovery) stops it through its control socket rather than
/// SIGKILL, kills the rest (virtiofsd), and leaves no process, socket, pid
/// file or sandbox directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huskd_restart_stops_a_leftover_husk_vmm_cleanly() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let (paths, virtiofsd) = vmm_and_virtiofsd()?;
    let backend = Builtin::new(paths, &probe_accel());
    let base = tempfile::Builder::new().prefix("hr").tempdir_in("/tmp")?;
    let config = huskd::cri::HuskdConfig {
        root: base.path().join("root"),
        state: base.path().join("state"),
        listen: base.path().join("husk.sock"),
        virtiofsd: virtiofsd.clone(),
        ..Default::default()
    };
    // Where huskd puts sandbox directories; no pod record names this one
    // (a crash while the pod started), which recovery must clean too.
    let dir = config.state.join("sandboxes").join(unique_id("r"));
    std::fs::create_dir_all(&dir)?;
    let mut pids = Vec::new();
    let r = restart_after_crash(&backend, config, &dir, &virtiofsd, &mut pids).await;
    remove_and_check_clean(&dir, pids, r)
}

async fn restart_after_crash(
    backend: &Builtin,
    config: huskd::cri::HuskdConfig,
    dir: &Path,
    virtiofsd: &Path,
    pids: &mut Vec<(&'static str, u32)>,
) -> Result<()> {
    let files = BuiltinFiles::in_dir(dir);
    let (mut fx, vm, pid) = launch(backend, dir, virtiofsd, pids).await?;
    // huskd "crashes": the handle is lost without a stop or a kill.
    std::mem::forget(vm);
    let st = vmm_status(&files).await?;
    ensure!(st.pid == pid, "{st:?}");
    ensure!(
        is_socket(&files.control) && files.pid.exists(),
        "husk-vmm has no control socket or pid file to be found by"
    );

    let t = Instant::now();
    let opened = huskd::cri::Husk::open(config).await;
    let took = t.elapsed();
    eprintln!("huskd state reopened (recovery) in {took:?}");
    // husk-vmm is still this test's (forgotten) child: its exit status says
    // how it ended. A clean exit means the control socket stopped it; a
    // SIGKILL would mean the generic clean-up got to it first.
    let t = Instant::now();
    let exit = loop {
        match nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        )? {
            nix::sys::wait::WaitStatus::StillAlive => {
                if t.elapsed() > Duration::from_secs(2) {
                    // Do not leave it running if recovery missed it.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    reap(pid);
                    bail!("husk-vmm pid {pid} still runs after recovery");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            st => break st,
        }
    };
    let v = fx.virtiofsd.terminate(Duration::from_secs(2)).await?;
    eprintln!("husk-vmm: {exit:?}; virtiofsd: {v}");
    opened.context("reopening huskd's state")?;
    ensure!(
        exit == nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid as i32), 0),
        "husk-vmm ended with {exit:?}, not a clean shutdown through its control socket"
    );
    ensure!(
        took < Duration::from_secs(4),
        "recovery took {took:?}: the control socket was not obeyed"
    );
    for p in [&files.control, &files.pid, &fx.config.vsock.uds] {
        ensure!(!p.exists(), "{} left after recovery", p.display());
    }
    ensure!(
        !dir.exists(),
        "sandbox directory {} left after recovery",
        dir.display()
    );
    Ok(())
}

/// Issue 5: the CRI end-to-end suite (tests/cri.rs, through huskd) runs on
/// husk-vmm wherever the host has hardware virtualization: its handlers use
/// `HUSK_TEST_HYPERVISOR` (default `auto`). This test states which backend
/// the suite ran on and, where it is not husk-vmm, why not; and that a
/// handler forced to `builtin` is refused there with that reason rather
/// than failing pods only after their boot timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_suite_backend_is_stated() -> Result<()> {
    use husk_tests::huskd::{Huskd, HuskdDirs};
    use k8s_cri::v1 as cri;
    let _serial = SERIAL.lock().await;
    let env = TestEnv::from_env()?;
    let probe = probe_accel();
    let dirs = HuskdDirs::new(&env, &[])?;
    let mut text = std::fs::read_to_string(&dirs.config)?;
    text.push_str(&format!(
        "\n[handlers.vmm]\nhypervisor = \"builtin\"\nkernel = {:?}\ninitrd = {:?}\n",
        env.guest.kernel, env.guest.initrd
    ));
    std::fs::write(&dirs.config, text)?;
    let mut huskd = Huskd::start(&dirs).await?;
    let r = async {
        let (mut rt, _) = huskd.clients().await?;
        let st = rt
            .status(cri::StatusRequest { verbose: true })
            .await?
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(st.info.get("info").context("Status verbose info")?)?;
        let handlers = &info["handlers"];
        let default = handlers["husk"]["hypervisor"].as_str().unwrap_or_default();
        let forced = handlers["vmm"]["hypervisor"].as_str().unwrap_or_default();
        eprintln!("CRI suite backend (HUSK_TEST_HYPERVISOR={}): {default}", env.hypervisor_choice);
        if probe.accel == Accel::Kvm && env.hypervisor_choice != "qemu" {
            ensure!(default.starts_with("builtin"), "auto did not pick husk-vmm: {default}");
            ensure!(forced.starts_with("builtin"), "{forced}");
            return Ok(());
        }
        eprintln!(
            "THE CRI END-TO-END SUITE DID NOT RUN ON husk-vmm ON THIS HOST: {} (husk-vmm needs VT-x/SVM); it ran on {default}",
            probe.why
        );
        ensure!(default.starts_with("qemu"), "{default}");
        ensure!(
            forced.contains("unavailable") && forced.contains(&probe.why),
            "the forced builtin handler is not reported unusable with the reason: {forced}"
        );
        let e = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cri::PodSandboxConfig {
                    metadata: Some(cri::PodSandboxMetadata {
                        name: "vmm".into(),
                        uid: "vmm-uid".into(),
                        namespace: "default".into(),
                        attempt: 0,
                    }),
                    log_directory: dirs.top.path().join("logs").display().to_string(),
                    ..Default::default()
                }),
                runtime_handler: "vmm".into(),
            })
            .await
            .expect_err("a builtin handler without hardware virtualization ran a pod");
        ensure!(e.code() == tonic::Code::FailedPrecondition, "{e:?}");
        ensure!(e.message().contains(&probe.why), "{e:?}");
        dirs.assert_sandboxes_gone()
    }
    .await;
    huskd.finish(r, 40).await
}

/// The builtin backend's side of a huskd restart (issue 5): a launched
/// husk-vmm outlives its detached handle; a later huskd adopts it by pid and
/// start time (a wrong start time, as after pid reuse, is refused without
/// signalling anything) and by the control socket's `status`, sees it run,
/// and shuts it down through the control socket, which removes its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn husk_vmm_detach_and_adopt() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let (paths, virtiofsd) = vmm_and_virtiofsd()?;
    let backend = Builtin::new(paths, &probe_accel());
    let (_base, dir) = fresh_dir("ha", "a")?;
    let mut pids = Vec::new();
    let r = detach_and_adopt(&backend, &dir, &virtiofsd, &mut pids).await;
    remove_and_check_clean(&dir, pids, r)
}

async fn detach_and_adopt(
    backend: &Builtin,
    dir: &Path,
    virtiofsd: &Path,
    pids: &mut Vec<(&'static str, u32)>,
) -> Result<()> {
    let files = BuiltinFiles::in_dir(dir);
    let (mut fx, vm, pid) = launch(backend, dir, virtiofsd, pids).await?;
    // What the pod record keeps: the backend's own record of the VM.
    let record = vm.record();
    ensure!(
        record.backend == "builtin" && record.processes.len() == 1,
        "{record:?}"
    );
    vm.detach();
    tokio::time::sleep(Duration::from_millis(100)).await;
    ensure!(
        alive(pid) && is_socket(&files.control) && files.pid.exists(),
        "husk-vmm did not outlive its detached handle with its files"
    );
    let mut wrong = record.clone();
    wrong.processes[0].start_time += 1;
    match husk_runtime::hypervisor::adopt(&wrong, "builtin-e2e", Duration::from_secs(2)).await {
        Ok(_) => bail!("adopted a husk-vmm whose start time does not match"),
        Err(e) => eprintln!("refused as it should be: {e}"),
    }
    ensure!(alive(pid), "a refused adoption signalled the process");
    let t = Instant::now();
    let mut vm =
        husk_runtime::hypervisor::adopt(&record, "builtin-e2e", Duration::from_secs(2)).await?;
    eprintln!("husk-vmm adopted in {:?}", t.elapsed());
    ensure!(vm.pids() == vec![("husk-vmm", pid)], "{:?}", vm.pids());
    ensure!(vm.try_exit()?.is_none(), "adopted husk-vmm reported exited");
    let t = Instant::now();
    let st = vm.shutdown(Duration::from_secs(6)).await?;
    let took = t.elapsed();
    eprintln!("adopted husk-vmm shut down in {took:?}: {st}");
    // SIGKILL would come only after half the timeout.
    ensure!(
        st.success() && took < Duration::from_secs(3),
        "not stopped through the control socket: {st} after {took:?}"
    );
    ensure!(vm.try_exit()?.is_some());
    reap(pid);
    for p in [&files.control, &files.pid, &fx.config.vsock.uds] {
        ensure!(!p.exists(), "{} left after shutdown", p.display());
    }
    fx.virtiofsd.terminate(Duration::from_secs(2)).await?;
    Ok(())
}
