//! Child processes the runtime owns (QEMU, virtiofsd, husk-vsock).
//!
//! Every child gets its own session (and so its own process group) so that
//! a helper that forks (virtiofsd in some sandbox modes) is killed as a
//! whole and a terminal's SIGINT/SIGHUP meant for huskd never reaches it,
//! its stdout and stderr go to a log file in the sandbox directory, and it
//! is killed and reaped: explicitly through [`ManagedChild::kill`], or by
//! `Drop` as a last resort, unless it was handed over with
//! [`ManagedChild::detach`] (huskd exiting while its pod VMs keep running).
//!
//! [`AdoptedProcess`] is the other side: a process a previous huskd started,
//! found again by pid and start time, waited for through a pidfd.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot open log file {path}: {source}")]
    Log { path: PathBuf, source: io::Error },
    #[error("cannot start {name} ({program}): {source}")]
    Exec {
        name: &'static str,
        program: PathBuf,
        source: io::Error,
    },
}

/// A child process in its own process group.
#[derive(Debug)]
pub struct ManagedChild {
    name: &'static str,
    pid: u32,
    child: Child,
    status: Option<ExitStatus>,
    /// Handed over: `Drop` leaves it running.
    detached: bool,
}

impl ManagedChild {
    /// Starts `program args` in a new process group with stdin on /dev/null
    /// and stdout+stderr appended to `log`.
    pub fn spawn<I, S>(
        name: &'static str,
        program: &Path,
        args: I,
        log: &Path,
    ) -> Result<Self, SpawnError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Self::spawn_command(name, program, cmd, log)
    }

    /// Like [`spawn`](Self::spawn) for a caller-prepared command (extra fds,
    /// environment). Stdio and the process group are set here.
    pub fn spawn_command(
        name: &'static str,
        program: &Path,
        mut cmd: Command,
        log: &Path,
    ) -> Result<Self, SpawnError> {
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|source| SpawnError::Log {
                    path: log.to_path_buf(),
                    source,
                })
        };
        let out = open_log()?;
        let err = open_log()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches no memory of the
        // parent; it is all that runs between fork and exec here.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
        }
        let child = cmd.spawn().map_err(|source| SpawnError::Exec {
            name,
            program: program.to_path_buf(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| SpawnError::Exec {
            name,
            program: program.to_path_buf(),
            source: io::Error::other("child exited before its pid was read"),
        })?;
        tracing::debug!(name, pid, program = %program.display(), "spawned");
        Ok(Self {
            name,
            pid,
            child,
            status: None,
            detached: false,
        })
    }

    /// Forgets the child without signalling it: it keeps running after this
    /// handle (and huskd) is gone, for a later huskd to adopt.
    pub fn detach(mut self) {
        self.detached = true;
        tracing::debug!(name = self.name, pid = self.pid, "detached");
    }

    /// The child's pid and start time, recorded to adopt it later.
    pub fn identity(&self, role: &str) -> Option<ProcessIdentity> {
        ProcessIdentity::of(role, self.pid)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status once the child has been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Reaps the child if it has exited, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let s = self.child.try_wait()?;
        if s.is_some() {
            self.status = s;
            self.sweep_group();
        }
        Ok(s)
    }

    /// Waits for the child to exit and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self.child.wait().await?;
        self.status = Some(s);
        self.sweep_group();
        Ok(s)
    }

    /// Waits at most `timeout`; `None` when the child is still running.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Sends `sig` to the child's whole process group (no-op once reaped).
    pub fn signal(&self, sig: Signal) {
        if self.status.is_some() {
            return;
        }
        if let Err(e) = killpg(Pid::from_raw(self.pid as i32), sig) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(name = self.name, pid = self.pid, %e, "killpg failed");
            }
        }
    }

    /// SIGKILLs the process group and reaps the leader.
    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        self.signal(Signal::SIGKILL);
        self.wait().await
    }

    /// SIGTERM, up to `grace` for a clean exit, then SIGKILL.
    pub async fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        if let Some(s) = self.wait_timeout(grace).await? {
            return Ok(s);
        }
        tracing::warn!(
            name = self.name,
            pid = self.pid,
            "did not exit on SIGTERM, killing"
        );
        self.kill().await
    }

    /// The leader is gone; anything it left in its group goes too. The group id
    /// cannot have been reused while a member is alive, and without members
    /// killpg just fails with ESRCH.
    fn sweep_group(&self) {
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        if self.status.is_some() || self.detached {
            return;
        }
        // Not reaped: kill the group now. Reaping needs a wait; a short
        // blocking try-loop keeps this usable outside a runtime (tokio reaps
        // dropped children in the background anyway).
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        for _ in 0..200 {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        tracing::warn!(
            name = self.name,
            pid = self.pid,
            "killed child not reaped in Drop"
        );
    }
}

/// A process as recorded at launch: the pid plus its start time (clock ticks
/// after boot, /proc/<pid>/stat field 22), which tells the same process from
/// a later one that got the pid again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub role: String,
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessIdentity {
    /// The identity of the live process `pid`; `None` if it is gone.
    pub fn of(role: &str, pid: u32) -> Option<Self> {
        Some(Self {
            role: role.into(),
            pid,
            start_time: crate::procfs::start_time(pid)?,
        })
    }
}

/// Why a recorded process cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("{role} (pid {pid}) is no longer running")]
    Gone { role: String, pid: u32 },
    #[error("pid {pid} is now another process than the recorded {role} (start time {found} != {recorded})")]
    Reused {
        role: String,
        pid: u32,
        recorded: u64,
        found: u64,
    },
    #[error("pidfd_open({pid}) for {role}: {source}")]
    Pidfd {
        role: String,
        pid: u32,
        source: io::Error,
    },
}

/// A process a previous huskd started (not our child): waited for through a
/// pidfd and signalled through it, so a reused pid is never hit.
#[derive(Debug)]
pub struct AdoptedProcess {
    role: &'static str,
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    exited: bool,
    killed: bool,
    detached: bool,
}

impl AdoptedProcess {
    /// Opens a pidfd for the recorded process and checks, after opening it
    /// (from then on the pid cannot move to another process under us), that
    /// it is still the one recorded. Must run inside a tokio runtime.
    pub fn adopt(role: &'static str, rec: &ProcessIdentity) -> Result<Self, AdoptError> {
        let gone = || AdoptError::Gone {
            role: role.into(),
            pid: rec.pid,
        };
        if rec.pid == 0 || rec.pid > i32::MAX as u32 {
            return Err(gone());
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
        // no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, rec.pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(gone());
            }
            return Err(AdoptError::Pidfd {
                role: role.into(),
                pid: rec.pid,
                source: e,
            });
        }
        // SAFETY: the syscall just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let found = crate::procfs::start_time(rec.pid).ok_or_else(gone)?;
        if found != rec.start_time {
            return Err(AdoptError::Reused {
                role: role.into(),
                pid: rec.pid,
                recorded: rec.start_time,
                found,
            });
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and
        // refers to this pidfd for the AsyncFd's whole life.
        let pidfd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|source| AdoptError::Pidfd {
            role: role.into(),
            pid: rec.pid,
            source: source.into(),
        })?;
        let mut p = Self {
            role,
            pid: rec.pid,
            pidfd,
            exited: false,
            killed: false,
            detached: false,
        };
        if p.has_exited() {
            return Err(gone());
        }
        Ok(p)
    }

    pub fn role(&self) -> &'static str {
        self.role
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (a pidfd polls readable then), without
    /// blocking.
    pub fn has_exited(&mut self) -> bool {
        if self.exited {
            return true;
        }
        let mut pfd = libc::pollfd {
            fd: self.pidfd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, timeout 0 (no blocking).
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n > 0 && pfd.revents != 0 {
            self.exited = true;
        }
        self.exited
    }

    /// The status reported for the process. It is not our child, so its real
    /// exit status went to its new parent: a SIGKILL when we killed it,
    /// success otherwise.
    pub fn status(&self) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus::from_raw(if self.killed { libc::SIGKILL } else { 0 })
    }

    /// Waits until the process has exited.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        while !self.exited {
            let mut g = self.pidfd.readable().await?;
            g.clear_ready();
            self.has_exited();
        }
        Ok(self.status())
    }

    /// Waits at most `timeout`; `None` while it still runs.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Sends `sig` through the pidfd (no-op once it has exited).
    pub fn signal(&mut self, sig: Signal) {
        if self.has_exited() {
            return;
        }
        if sig == Signal::SIGKILL {
            self.killed = true;
        }
        // SAFETY: pidfd_send_signal(pidfd, sig, NULL info, 0 flags) reads no
        // memory of ours; the fd is a pidfd we own.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(role = self.role, pid = self.pid, %e, "pidfd_send_signal failed");
            }
        }
    }

    /// SIGKILLs the process, waits for it and sweeps its process group (it
    /// was started as a session leader, see [`ManagedChild`]).
    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        self.signal(Signal::SIGKILL);
        let s = self.wait().await?;
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        Ok(s)
    }

    /// SIGTERM, up to `grace` for a clean exit, then SIGKILL.
    pub async fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        if let Some(s) = self.wait_timeout(grace).await? {
            return Ok(s);
        }
        tracing::warn!(
            role = self.role,
            pid = self.pid,
            "did not exit on SIGTERM, killing"
        );
        self.kill().await
    }

    /// Forgets the process without signalling it.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for AdoptedProcess {
    fn drop(&mut self) {
        // Same last resort as ManagedChild: a handle dropped without
        // stop/kill/detach takes its process with it.
        if !self.detached && !self.has_exited() {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// A helper process of a sandbox: started by this huskd or adopted.
#[derive(Debug)]
pub enum Helper {
    Child(ManagedChild),
    Adopted(AdoptedProcess),
}

impl Helper {
    pub fn pid(&self) -> u32 {
        match self {
            Helper::Child(c) => c.pid(),
            Helper::Adopted(a) => a.pid(),
        }
    }

    pub async fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        match self {
            Helper::Child(c) => c.terminate(grace).await,
            Helper::Adopted(a) => a.terminate(grace).await,
        }
    }

    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        match self {
            Helper::Child(c) => c.kill().await,
            Helper::Adopted(a) => a.kill().await,
        }
    }

    pub fn detach(self) {
        match self {
            Helper::Child(c) => c.detach(),
            Helper::Adopted(a) => a.detach(),
        }
    }
}

/// Polls until `path` exists as a unix socket, the child exits, or the
/// timeout passes. Used for helpers that create their listening socket
/// themselves; polling a local file every 2 ms is cheap and bounded.
pub async fn wait_for_socket(
    child: &mut ManagedChild,
    path: &Path,
    timeout: Duration,
) -> Result<(), WaitSocketError> {
    use std::os::unix::fs::FileTypeExt;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(WaitSocketError::Exited {
                name: child.name(),
                status,
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(WaitSocketError::Timeout {
                name: child.name(),
                path: path.to_path_buf(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitSocketError {
    #[error("{name} exited ({status}) before creating its socket")]
    Exited {
        name: &'static str,
        status: ExitStatus,
    },
    #[error("{name} did not create {path} within {timeout:?}")]
    Timeout {
        name: &'static str,
        path: PathBuf,
        timeout: Duration,
    },
}

/// Host processes whose command line mentions `dir` (a sandbox directory):
/// the VMM and helpers a previous huskd left behind.
pub fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| !needle.is_empty() && c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// SIGKILLs `pids` and waits (bounded) for them to disappear.
pub async fn kill_and_wait(pids: &[u32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..50 {
        if pids.iter().all(|p| !crate::procfs::is_alive(*p)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kill_reaps_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let pidfile = dir.path().join("pid");
        // The shell forks a sleeping grandchild into the same group.
        let script = format!(
            "sleep 100 & echo $! > {}; echo started >&2; wait",
            pidfile.display()
        );
        let mut c = ManagedChild::spawn("sh", Path::new("/bin/sh"), ["-c", &script], &log).unwrap();
        let mut grandchild = None;
        for _ in 0..500 {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = s.trim().parse::<u32>() {
                    grandchild = Some(p);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let grandchild = grandchild.expect("grandchild pid");
        assert!(c.try_wait().unwrap().is_none());
        let st = c.kill().await.unwrap();
        assert!(!st.success());
        // The grandchild got the SIGKILL too: gone, or a zombie awaiting init.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !crate::procfs::is_alive(grandchild),
            "grandchild {grandchild} still alive"
        );
        assert!(std::fs::read_to_string(&log).unwrap().contains("started"));
    }

    /// A detached child survives its handle in its own session; a later
    /// "huskd" adopts it by pid and start time, sees it run, kills it
    /// through the pidfd and notices the exit.
    #[tokio::test]
    async fn detach_then_adopt_and_kill() {
        let dir = tempfile::tempdir().unwrap();
        let c = ManagedChild::spawn(
            "sleep",
            Path::new("/bin/sleep"),
            ["100"],
            &dir.path().join("l"),
        )
        .unwrap();
        let pid = c.pid();
        // Its own session: huskd's terminal and session leave it alone.
        assert_eq!(
            nix::unistd::getsid(Some(Pid::from_raw(pid as i32)))
                .unwrap()
                .as_raw(),
            pid as i32
        );
        let id = c.identity("sleep").unwrap();
        assert_eq!(id.pid, pid);
        c.detach();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(crate::procfs::is_alive(pid), "detached child was killed");

        // Another start time: a reused pid is refused.
        let wrong = ProcessIdentity {
            start_time: id.start_time + 1,
            ..id.clone()
        };
        assert!(matches!(
            AdoptedProcess::adopt("sleep", &wrong),
            Err(AdoptError::Reused { .. })
        ));
        let mut a = AdoptedProcess::adopt("sleep", &id).unwrap();
        assert!(!a.has_exited());
        assert!(a
            .wait_timeout(Duration::from_millis(50))
            .await
            .unwrap()
            .is_none());
        let st = a.kill().await.unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        assert!(a.has_exited());
        // It was our child after all (this test is its parent): reap it, then
        // it is gone for good and cannot be adopted.
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
        assert!(!crate::procfs::is_alive(pid));
        assert!(matches!(
            AdoptedProcess::adopt("sleep", &id),
            Err(AdoptError::Gone { .. })
        ));
    }

    /// An adopted process that exits on its own is noticed through the pidfd.
    #[tokio::test]
    async fn adopted_exit_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let c = ManagedChild::spawn(
            "sleep",
            Path::new("/bin/sleep"),
            ["0.3"],
            &dir.path().join("l"),
        )
        .unwrap();
        let pid = c.pid();
        let id = c.identity("sleep").unwrap();
        c.detach();
        let mut a = AdoptedProcess::adopt("sleep", &id).unwrap();
        let st = a.wait_timeout(Duration::from_secs(10)).await.unwrap();
        assert!(st.is_some_and(|s| s.success()));
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
    }

    #[tokio::test]
    async fn wait_for_socket_reports_early_exit() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ManagedChild::spawn(
            "false",
            Path::new("/bin/false"),
            [""; 0],
            &dir.path().join("l"),
        )
        .unwrap();
        let e = wait_for_socket(&mut c, &dir.path().join("nope"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, WaitSocketError::Exited { .. }), "{e}");
    }
}

#[cfg(test)]
mod orphan_tests {
    use super::*;

    #[tokio::test]
    async fn finds_and_kills_processes_by_dir() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("sandbox-x");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("X", "1")
            .arg0_marker(&marker)
            .spawn()
            .unwrap();
        // Until the child has exec'd, its cmdline is still this test
        // binary's: wait (bounded) for the marker to show up.
        let mut pids = processes_using(&marker);
        for _ in 0..100 {
            if !pids.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            pids = processes_using(&marker);
        }
        assert_eq!(pids, vec![child.id()]);
        kill_and_wait(&pids).await;
        let st = child.wait().unwrap();
        assert!(!st.success());
        assert!(processes_using(&marker).is_empty());
    }

    trait Arg0Marker {
        fn arg0_marker(&mut self, p: &Path) -> &mut Self;
    }
    impl Arg0Marker for std::process::Command {
        fn arg0_marker(&mut self, p: &Path) -> &mut Self {
            use std::os::unix::process::CommandExt;
            self.arg0(p)
        }
    }
}
