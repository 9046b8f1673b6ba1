//! husk-vsock: husk's virtio-vsock device with hybrid vsock, served to QEMU over vhost-user.
//!
//! `husk-vsock --socket <vhost-user socket> --uds <hybrid vsock socket> --guest-cid <cid>`
//! serves exactly one frontend, then exits 0 when it disconnects, removing its sockets.
//!
//! With `--console-socket <path> --console-log <file>` it also takes the guest's serial console
//! from QEMU (a socket chardev connecting there) and writes it to a log capped at
//! `--console-max-bytes` (default 1 MiB): QEMU's file chardev would let the guest fill the disk.
//! It lives here because husk-vsock is already the one helper process of every QEMU pod.

#![forbid(unsafe_code)]

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use husk_vmm::console_log::CappedLog;
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
    console: Option<Console>,
}

struct Console {
    socket: PathBuf,
    log: PathBuf,
    max_bytes: u64,
}

const USAGE: &str = "usage: husk-vsock --socket <vhost-user socket> --uds <hybrid vsock socket> \
--guest-cid <cid> [--max-connections <n>] [--console-socket <path> --console-log <file> \
[--console-max-bytes <n>]]";
const DEFAULT_CONSOLE_MAX_BYTES: u64 = 1 << 20;

fn parse_args() -> Result<Args> {
    let mut socket = None;
    let mut uds = None;
    let mut cid = None;
    let mut max_connections = None;
    let (mut console_socket, mut console_log, mut console_max) = (None, None, None);
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
            "--console-socket" => console_socket = Some(PathBuf::from(val()?)),
            "--console-log" => console_log = Some(PathBuf::from(val()?)),
            "--console-max-bytes" => {
                console_max = Some(val()?.parse().context("--console-max-bytes")?)
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let console = match (console_socket, console_log) {
        (Some(socket), Some(log)) => Some(Console {
            socket,
            log,
            max_bytes: console_max.unwrap_or(DEFAULT_CONSOLE_MAX_BYTES),
        }),
        (None, None) => None,
        _ => bail!("--console-socket and --console-log go together\n{USAGE}"),
    };
    Ok(Args {
        socket: socket.context(USAGE)?,
        uds: uds.context(USAGE)?,
        guest_cid: cid.context(USAGE)?,
        max_connections,
        console,
    })
}

/// Listens for QEMU's console chardev before the vhost-user socket appears (QEMU connects to
/// both at start-up) and copies what it sends into the capped log, one connection at a time.
fn start_console(c: &Console) -> Result<()> {
    let _ = std::fs::remove_file(&c.socket);
    let listener = UnixListener::bind(&c.socket)
        .with_context(|| format!("binding the console socket {}", c.socket.display()))?;
    let mut log = CappedLog::open(&c.log, c.max_bytes)
        .with_context(|| format!("opening the console log {}", c.log.display()))?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            loop {
                match std::io::Read::read(&mut conn, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        // A full disk loses console output, never the VM.
                        let _ = log.write_all(&buf[..n]);
                    }
                }
            }
        }
    });
    Ok(())
}

fn remove_sockets(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

fn run(args: Args) -> Result<()> {
    if let Some(c) = &args.console {
        start_console(c)?;
    }
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
    let mut sockets = vec![args.socket.clone(), args.uds.clone()];
    sockets.extend(args.console.as_ref().map(|c| c.socket.clone()));
    let on_signal = sockets.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = sigs.wait() {
            info!("{sig:?}: exiting");
            remove_sockets(&on_signal);
            std::process::exit(0);
        }
    });
    let res = run(args);
    remove_sockets(&sockets);
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
