//! Child processes the runtime owns (QEMU, virtiofsd, husk-vsock).
//!
//! Every child gets its own process group so that a helper that forks
//! (virtiofsd in some sandbox modes) is killed as a whole, its stdout and
//! stderr go to a log file in the sandbox directory, and it is always killed
//! and reaped: explicitly through [`ManagedChild::kill`], or by `Drop` as a
//! last resort.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
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
            .process_group(0)
            .kill_on_drop(false);
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
        })
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
        if self.status.is_some() {
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
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{grandchild}/stat")) {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            assert_eq!(state, "Z", "grandchild still alive: {stat}");
        }
        assert!(std::fs::read_to_string(&log).unwrap().contains("started"));
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
