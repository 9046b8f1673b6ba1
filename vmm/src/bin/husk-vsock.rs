//! husk-vsock: husk's virtio-vsock device with hybrid vsock, served to QEMU over vhost-user.
//!
//! `husk-vsock --socket <vhost-user socket> --uds <hybrid vsock socket> --guest-cid <cid>`
//! serves exactly one frontend, then exits 0 when it disconnects, removing both sockets.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use husk_vmm::devices::virtio::vsock::vhost_user::VhostUserVsock;
use husk_vmm::devices::virtio::vsock::MuxerConfig;
use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

struct Args {
    socket: PathBuf,
    uds: PathBuf,
    guest_cid: u64,
    max_connections: Option<usize>,
}

const USAGE: &str = "usage: husk-vsock --socket <vhost-user socket> --uds <hybrid vsock socket> \
--guest-cid <cid> [--max-connections <n>]";

fn parse_args() -> Result<Args> {
    let mut socket = None;
    let mut uds = None;
    let mut cid = None;
    let mut max_connections = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(val()?)),
            "--uds" => uds = Some(PathBuf::from(val()?)),
            "--guest-cid" => cid = Some(val()?.parse().context("--guest-cid")?),
            "--max-connections" => {
                max_connections = Some(val()?.parse().context("--max-connections")?)
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(Args {
        socket: socket.context(USAGE)?,
        uds: uds.context(USAGE)?,
        guest_cid: cid.context(USAGE)?,
        max_connections,
    })
}

fn run(args: Args) -> Result<()> {
    let mut cfg = MuxerConfig::new(args.guest_cid, &args.uds);
    if let Some(n) = args.max_connections {
        cfg.max_connections = n;
    }
    let backend = VhostUserVsock::new(cfg)
        .with_context(|| format!("guest cid {}: creating the vsock muxer", args.guest_cid))?;
    let mut daemon = VhostUserDaemon::new(
        "husk-vsock".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| anyhow::anyhow!("creating the vhost-user daemon: {e}"))?;
    for h in daemon.get_epoll_handlers() {
        backend
            .register_muxer(&h)
            .context("registering the muxer fd")?;
    }
    info!(socket = %args.socket.display(), uds = %args.uds.display(), cid = args.guest_cid,
        "waiting for the vhost-user frontend");
    let res = daemon
        .serve(&args.socket)
        .map_err(|e| anyhow::anyhow!("guest cid {}: vhost-user: {e}", args.guest_cid));
    info!("vhost-user frontend disconnected");
    res
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    // Block the termination signals in every thread (threads inherit the mask) and take them
    // in one thread, so sockets are removed on SIGTERM/SIGINT too.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    if let Err(e) = sigs.thread_block() {
        error!("cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let (sock, uds) = (args.socket.clone(), args.uds.clone());
    std::thread::spawn(move || {
        if let Ok(sig) = sigs.wait() {
            info!("{sig:?}: exiting");
            let _ = std::fs::remove_file(&sock);
            let _ = std::fs::remove_file(&uds);
            std::process::exit(0);
        }
    });
    let (sock, uds) = (args.socket.clone(), args.uds.clone());
    let res = run(args);
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&uds);
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
