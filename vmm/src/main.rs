//! husk-vmm: one process per sandbox VM. `husk-vmm --config FILE` (JSON, see
//! `husk_vmm::config::VmConfig`). Runs in its own session so it outlives huskd; a restarted
//! huskd finds it through the pid file and the control socket.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use husk_vmm::builder::{VmState, Vmm};
use husk_vmm::control::{ControlServer, StatusSource};
use husk_vmm::devices::bus::lock;
use husk_vmm::vstate::vcpu::VcpuStop;

fn usage() -> ! {
    eprintln!("usage: husk-vmm --config FILE");
    std::process::exit(2)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = Some(args.next().unwrap_or_else(|| usage()).into()),
            _ => usage(),
        }
    }
    let config = config.unwrap_or_else(|| usage());
    let cfg = husk_vmm::config::from_file(&config)?;
    let id = cfg.id.clone();

    // Leave huskd's session and process group: a signal to its group or its death must not
    // take the VM down. EPERM means we already lead a group (started by setsid), which is fine.
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    // SAFETY: ignoring SIGHUP installs no handler code.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };

    let mut vmm = Vmm::build(&cfg).with_context(|| format!("sandbox {id}: building the VM"))?;
    let status = Arc::new(StatusSource {
        id: id.clone(),
        accel: vmm.accel(),
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        started: Instant::now(),
        state: Mutex::new(VmState::Created),
    });
    let control = match &cfg.control_socket {
        Some(p) => Some(
            ControlServer::start(p, status.clone(), vmm.stop_handle(), vmm.pause_handle())
                .with_context(|| format!("sandbox {id}: control socket {}", p.display()))?,
        ),
        None => None,
    };
    if let Some(p) = &cfg.pid_file {
        // Write-then-rename: a reader (a restarted huskd) never sees an empty pid file.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, p))
            .with_context(|| format!("sandbox {id}: pid file {}", p.display()))?;
    }
    vmm.start()
        .with_context(|| format!("sandbox {id}: starting vCPUs"))?;
    *lock(&status.state) = VmState::Running;
    tracing::info!(sandbox = %id, accel = ?vmm.accel(), "VM running");
    let outcome = vmm.wait(None);
    *lock(&status.state) = VmState::Stopped;
    drop(control);
    if let Some(p) = &cfg.pid_file {
        let _ = std::fs::remove_file(p);
    }
    match outcome {
        Some(o) => match o.reason {
            VcpuStop::Crash(what) => {
                eprintln!("sandbox {id}: guest crashed: {what}");
                eprintln!("last console lines:");
                for l in &o.console_tail {
                    eprintln!("  {l}");
                }
                bail!("sandbox {id}: guest crashed: {what}")
            }
            other => {
                tracing::info!(sandbox = %id, "VM stopped: {other:?}");
                Ok(())
            }
        },
        None => Ok(()),
    }
}
