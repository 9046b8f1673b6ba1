//! The agent reaps every child (it is PID 1 in the VM, or a child subreaper
//! in host tests) and hands each exit status to whoever waits for that pid.
//!
//! libcontainer waits for its own helper processes with `waitpid(pid)`
//! (the intermediate process of every create/exec, hook commands). A global
//! `waitpid(-1)` running at the same time could take those statuses and make
//! libcontainer fail with ECHILD. So the reaper only calls `waitpid` while
//! it holds the fork lock, and every libcontainer operation that forks runs
//! with the fork lock held ([`Reaper::fork_lock`]). The exit of a process
//! created under the lock is registered before the lock is released, so no
//! status can be reaped before someone is there to receive it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{Notify, OwnedMutexGuard};
use tracing::{debug, error, warn};

/// Called once, from the reaper task, with the pid's exit status. Must not
/// block.
pub type OnExit = Box<dyn FnOnce(WaitStatus) + Send>;

/// Proof that the caller holds the fork lock: while it lives the reaper does
/// not call `waitpid`.
pub struct ForkGuard(#[allow(dead_code)] OwnedMutexGuard<()>);

#[derive(Default)]
pub struct Reaper {
    fork_lock: Arc<tokio::sync::Mutex<()>>,
    waiting: Mutex<HashMap<i32, OnExit>>,
    kick: Notify,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs the SIGCHLD handler and starts the reaper task. Must run
    /// inside a tokio runtime.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                {
                    let _lock = me.fork_lock.lock().await;
                    me.reap_all();
                }
                // A SIGCHLD that arrives while we hold the lock or reap is not
                // lost: the signal stream remembers it, and `kick` covers the
                // exits that happened while someone else held the lock.
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = me.kick.notified() => {}
                }
            }
        });
        Ok(())
    }

    /// Takes the fork lock: hold it across any call that forks and then
    /// waits for a specific pid (libcontainer create, exec, start, delete).
    pub async fn fork_lock(&self) -> ForkGuard {
        ForkGuard(Arc::clone(&self.fork_lock).lock_owned().await)
    }

    /// Registers the callback for `pid`'s exit. Taking the guard makes sure
    /// the pid cannot have been reaped between its creation and this call.
    pub fn register(&self, _guard: &ForkGuard, pid: Pid, on_exit: OnExit) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.insert(pid.as_raw(), on_exit).is_some() {
            // A pid is only reused after it was reaped, which removed its entry.
            error!(
                pid = pid.as_raw(),
                "pid registered twice; the first waiter is dropped"
            );
        }
    }

    /// Asks for a reap pass, e.g. after releasing the fork lock.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    fn reap_all(&self) {
        loop {
            match waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
            ) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(status) => self.dispatch(status),
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => return,
                Err(e) => {
                    warn!("waitpid(-1): {e}");
                    return;
                }
            }
        }
    }

    fn dispatch(&self, status: WaitStatus) {
        let Some(pid) = status.pid() else { return };
        if !matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
            return;
        }
        let cb = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid.as_raw());
        match cb {
            Some(cb) => cb(status),
            None => debug!(pid = pid.as_raw(), ?status, "reaped an orphan"),
        }
    }
}
