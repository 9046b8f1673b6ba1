//! Process stdio: the pipes or pty the agent creates for a process, and the
//! STREAM connections the host attaches to them.
//!
//! Each stream of a process is a [`Slot`]. Attaching a connection to a slot
//! replaces (aborts) the previous connection's copy task; what the process
//! wrote and nobody read yet stays in the pipe for the next connection, and
//! output the agent already read but a dead connection did not accept (the
//! host runtime restarted) is kept and sent first on the next connection.

use std::io;
use std::path::PathBuf;

use anyhow::Context;
use libcontainer::container::builder::ContainerBuilder;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::debug;

/// A STREAM connection after its handshake.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn for T {}
pub type BoxConn = Pin<Box<dyn Conn>>;

pub type Fd = Arc<AsyncFd<OwnedFd>>;

/// Wraps the agent's end of a pipe or a pty master for tokio.
pub fn async_fd(fd: OwnedFd) -> io::Result<Fd> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and refers
    // to the same file description for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
    Ok(Arc::new(fd))
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| Ok(nix::unistd::read(inner.get_ref().as_raw_fd(), buf)?)) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|inner| Ok(nix::unistd::write(inner.get_ref().as_fd(), buf)?)) {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// stdin: host -> process.
    In,
    /// stdout/stderr: process -> host.
    Out,
}

/// One stdio stream of a process.
pub struct Slot {
    dir: Direction,
    /// The agent's end; None once the stream is finished (output reached
    /// EOF, stdin was closed), which also closes the fd.
    fd: Arc<Mutex<Option<Fd>>>,
    /// A pty master is shared by stdin and stdout: closing "stdin" must not
    /// close it.
    is_tty: bool,
    /// Output read from the process that no connection has accepted yet.
    /// Shared with the copy task so that aborting the task loses nothing.
    pending: Arc<Mutex<Vec<u8>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Slot {
    pub fn new(dir: Direction, fd: Fd, is_tty: bool) -> Self {
        Slot {
            dir,
            fd: Arc::new(Mutex::new(Some(fd))),
            is_tty,
            pending: Default::default(),
            task: Default::default(),
        }
    }

    fn current(fd: &Mutex<Option<Fd>>) -> Option<Fd> {
        fd.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops the agent's end (e.g. stdin after the process exited).
    pub fn close(&self) {
        self.fd.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    pub fn is_closed(&self) -> bool {
        Self::current(&self.fd).is_none()
    }

    /// Connects `conn` to this stream, replacing the previous connection.
    pub async fn attach(&self, mut conn: BoxConn) {
        let mut task = self.task.lock().await;
        if let Some(old) = task.take() {
            old.abort();
            // Wait until the old task has stopped touching the fd.
            let _ = old.await;
        }
        let fd = Arc::clone(&self.fd);
        let is_tty = self.is_tty;
        let pending = Arc::clone(&self.pending);
        *task = Some(match self.dir {
            Direction::Out => tokio::spawn(async move {
                copy_out(&fd, &pending, &mut conn, is_tty).await;
            }),
            Direction::In => tokio::spawn(async move {
                copy_in(&fd, &mut conn, is_tty).await;
            }),
        });
    }

    /// Stops the copy task (the process is being removed).
    pub async fn detach(&self) {
        if let Some(old) = self.task.lock().await.take() {
            old.abort();
            let _ = old.await;
        }
    }
}

/// process -> host until the process's end reaches EOF, then close the
/// connection. A dead connection just ends the task: the pipe keeps what was
/// not read, `pending` what was read but not accepted by the connection.
async fn copy_out(
    slot: &Mutex<Option<Fd>>,
    pending: &Mutex<Vec<u8>>,
    conn: &mut BoxConn,
    is_tty: bool,
) {
    let lock =
        |m: &Mutex<Vec<u8>>| -> Vec<u8> { m.lock().unwrap_or_else(|p| p.into_inner()).clone() };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // Flush what a previous connection (or this one) left. `pending` only
        // shrinks by what the connection accepted, so it is exact at every
        // await point (where the task may be aborted).
        loop {
            let out = lock(pending);
            if out.is_empty() {
                break;
            }
            match conn.write(&out).await {
                Ok(n) if n > 0 => {
                    pending.lock().unwrap_or_else(|p| p.into_inner()).drain(..n);
                }
                _ => return,
            }
        }
        let Some(fd) = Slot::current(slot) else { break };
        let n = match read_fd(&fd, &mut buf).await {
            Ok(n) => n,
            // A pty master reads EIO once every slave fd is closed.
            Err(e) if is_tty && e.raw_os_error() == Some(libc::EIO) => 0,
            Err(e) => {
                debug!("stdio read: {e}");
                0
            }
        };
        if n == 0 {
            slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            break;
        }
        pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&buf[..n]);
    }
    let _ = conn.shutdown().await;
}

/// host -> process. Host EOF closes the process's stdin (a pipe; a pty
/// master stays open because it also carries the output).
async fn copy_in(slot: &Mutex<Option<Fd>>, conn: &mut BoxConn, is_tty: bool) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(n) => n,
            // The host connection broke: keep stdin open for a re-attach.
            Err(_) => return,
        };
        if n == 0 {
            if !is_tty {
                slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
            return;
        }
        let Some(fd) = Slot::current(slot) else {
            return;
        };
        if let Err(e) = write_all_fd(&fd, &buf[..n]).await {
            debug!("stdin write: {e}");
            // EPIPE: nobody reads stdin any more.
            slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            return;
        }
    }
}

/// The agent's side of a process's stdio.
pub struct ProcessStdio {
    pub stdin: Option<Slot>,
    pub stdout: Slot,
    pub stderr: Option<Slot>,
    /// The pty master, for ResizeTerminal.
    pub tty: Option<Fd>,
}

impl ProcessStdio {
    pub fn from_pipes(
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> io::Result<Self> {
        Ok(ProcessStdio {
            stdin: stdin
                .map(|fd| async_fd(fd).map(|fd| Slot::new(Direction::In, fd, false)))
                .transpose()?,
            stdout: Slot::new(Direction::Out, async_fd(stdout)?, false),
            stderr: Some(Slot::new(Direction::Out, async_fd(stderr)?, false)),
            tty: None,
        })
    }

    pub fn from_pty(master: OwnedFd, stdin: bool) -> io::Result<Self> {
        let fd = async_fd(master)?;
        Ok(ProcessStdio {
            stdin: stdin.then(|| Slot::new(Direction::In, Arc::clone(&fd), true)),
            stdout: Slot::new(Direction::Out, Arc::clone(&fd), true),
            stderr: None,
            tty: Some(fd),
        })
    }

    pub async fn detach_all(&self) {
        for slot in [
            self.stdin.as_ref(),
            Some(&self.stdout),
            self.stderr.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            slot.detach().await;
        }
    }
}

/// The process's ends of its stdio pipes, handed to libcontainer.
pub struct ChildPipes {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Creates stdio pipes: the process's ends and the agent's. Without a stdin
/// stream the process's stdin is /dev/null.
pub fn pipes(want_stdin: bool) -> io::Result<(ChildPipes, Option<OwnedFd>, OwnedFd, OwnedFd)> {
    let (in_r, in_w) = if want_stdin {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        (r, Some(w))
    } else {
        let null = std::fs::OpenOptions::new().read(true).open("/dev/null")?;
        (OwnedFd::from(null), None)
    };
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((
        ChildPipes {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
        },
        in_w,
        out_r,
        err_r,
    ))
}

/// Sets a pty's window size.
pub fn resize(master: &AsyncFd<OwnedFd>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points to
    // a live, initialised value; the fd is a pty master we own.
    let rc = unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives the pty master that libcontainer's container process sends over
/// the console socket (SCM_RIGHTS).
pub fn recv_console(listener: &std::os::unix::net::UnixListener) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    listener.set_nonblocking(false)?;
    let (conn, _) = listener.accept()?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut buf = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(r) = c {
            fds.extend(r);
        }
    }
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        // SAFETY: SCM_RIGHTS just installed these fds in this process and
        // nothing else owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if owned.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "console socket sent no fd",
        ));
    }
    Ok(owned.swap_remove(0))
}

/// The process's side of its stdio, before libcontainer takes it.
pub(crate) enum ChildStdio {
    Pipes(ChildPipes),
    Console {
        path: PathBuf,
        listener: std::os::unix::net::UnixListener,
    },
}

/// Hands the process's ends of its stdio to the builder; returns the
/// console listener to receive the pty master from.
pub(crate) fn split_stdio(
    builder: ContainerBuilder,
    child: ChildStdio,
) -> (ContainerBuilder, Option<std::os::unix::net::UnixListener>) {
    match child {
        ChildStdio::Pipes(p) => (
            builder
                .with_stdin(p.stdin)
                .with_stdout(p.stdout)
                .with_stderr(p.stderr),
            None,
        ),
        ChildStdio::Console { path, listener } => {
            let _ = path;
            (builder, Some(listener))
        }
    }
}

pub(crate) fn receive_console(
    listener: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<Option<OwnedFd>> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let master = recv_console(&listener).context("receiving the pty master");
    if let Ok(addr) = listener.local_addr() {
        if let Some(p) = addr.as_pathname() {
            let _ = std::fs::remove_file(p);
        }
    }
    master.map(Some)
}
