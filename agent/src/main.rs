#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use husk_agent::container::{Config, Containers};
use husk_agent::reaper::Reaper;
use husk_agent::server::Listen;
use husk_agent::service::{AgentService, Mode};
use husk_agent::{logging, pid1, server};
use tracing::{error, info};

const USAGE: &str = "usage: husk-agent [--listen-unix DIR] [--cgroup-parent NAME]\n\
  (no flags: PID 1 of a husk VM, serving on vsock)";

struct Args {
    listen_unix: Option<PathBuf>,
    cgroup_parent: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        listen_unix: None,
        cgroup_parent: PathBuf::from("husk"),
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--listen-unix") => {
                args.listen_unix = Some(it.next().context("--listen-unix needs DIR")?.into())
            }
            Some("--cgroup-parent") => {
                let p: PathBuf = it.next().context("--cgroup-parent needs NAME")?.into();
                if p.is_absolute()
                    || p.components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    bail!("--cgroup-parent must be a relative path without ..");
                }
                args.cgroup_parent = p;
            }
            Some("--help") | Some("-h") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unexpected argument {a:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn main() {
    let pid1 = pid1::is_pid1();
    logging::init();
    let result = std::panic::catch_unwind(|| run(pid1));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!("husk-agent failed: {e:#}"),
        Err(_) => error!("husk-agent panicked"),
    }
    if pid1 {
        pid1::power_off();
    }
    std::process::exit(1);
}

fn run(is_pid1: bool) -> Result<()> {
    let args = parse_args()?;
    // libcontainer changes the working directory temporarily while creating
    // containers; nothing here uses relative paths, and "/" always exists.
    std::env::set_current_dir("/").context("chdir /")?;
    let (listen, mode, run_dir) = match &args.listen_unix {
        Some(dir) => {
            let dir = std::path::absolute(dir).context("--listen-unix DIR")?;
            (Listen::Unix(dir.clone()), Mode::Host, dir.join("run"))
        }
        None => {
            if !is_pid1 {
                bail!("not PID 1: use --listen-unix DIR outside a VM");
            }
            (Listen::Vsock, Mode::Vm, PathBuf::from("/run/husk"))
        }
    };
    let mut no_pivot = false;
    if mode == Mode::Vm {
        no_pivot = !pid1::leave_initial_rootfs();
        pid1::setup_filesystems().context("setting up filesystems")?;
        pid1::console_stdio();
        logging::set_target_from_stderr();
        pid1::load_modules();
        if let Err(e) = pid1::loopback_up() {
            error!("bringing lo up: {e:#}");
        }
        if let Err(e) = nix::unistd::sethostname("husk") {
            error!("sethostname: {e}");
        }
    }
    // As PID 1 this changes nothing; on a host it makes the agent the parent
    // of orphaned container processes, like in the VM.
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    info!(
        version = husk_proto::AGENT_VERSION,
        ?mode,
        "husk-agent starting"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let reaper = Reaper::new();
        reaper.start().context("starting the reaper")?;
        let containers = Containers::new(
            Config {
                run_dir,
                cgroup_parent: args.cgroup_parent,
                clamp_rlimits: mode == Mode::Host,
                no_pivot,
            },
            reaper,
        )?;
        let svc = Arc::new(AgentService::new(mode, containers));
        server::serve(svc, listen).await
    })
}
