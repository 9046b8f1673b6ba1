//! Container and process management on top of youki's libcontainer.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as YoukiContainer;
use libcontainer::oci_spec::runtime::{LinuxSeccomp, Spec};
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cgroup::Cgroups;
use crate::error::{AgentError, Result};
use crate::reaper::{ForkGuard, Reaper};
use crate::spec;
use crate::stdio::{self, ProcessStdio};
use crate::stdio::{receive_console, split_stdio, ChildStdio};

/// Exited execs kept per container so that late WaitProcess calls still get
/// their status; older ones are forgotten (exec probes run forever).
const MAX_EXITED_EXECS: usize = 256;
/// How long RemoveContainer waits for SIGKILLed processes to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    /// Guest-local state: bundles, libcontainer state, console sockets.
    pub run_dir: PathBuf,
    /// Container cgroups are `/<cgroup_parent>/<id>`.
    pub cgroup_parent: PathBuf,
    /// Lower process rlimits to the agent's own hard limits. On a host (no
    /// VM) the kernel refuses to raise a hard limit without
    /// CAP_SYS_RESOURCE, which husk's nodes may lack; in the guest the agent
    /// is PID 1 with every limit available.
    pub clamp_rlimits: bool,
    /// Enter container roots with MS_MOVE + chroot instead of pivot_root
    /// (only when the agent could not leave the initial rootfs).
    pub no_pivot: bool,
}

impl Config {
    fn bundle(&self, id: &str) -> PathBuf {
        self.run_dir.join("containers").join(id)
    }
    fn youki_root(&self) -> PathBuf {
        self.run_dir.join("youki")
    }
    fn tty_dir(&self) -> PathBuf {
        self.run_dir.join("tty")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub oom_killed: bool,
    pub at: SystemTime,
}

pub struct Process {
    pub pid: Pid,
    pub stdio: ProcessStdio,
    exit: watch::Receiver<Option<Exit>>,
}

impl Process {
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> Result<Exit> {
        let mut rx = self.exit.clone();
        let r = rx.wait_for(|e| e.is_some()).await;
        match r {
            Ok(e) => Ok(e.expect("wait_for returned a value matching is_some")),
            Err(_) => Err(AgentError::Internal("the process's exit was lost".into())),
        }
    }
}

#[derive(Default)]
struct Lifecycle {
    started: bool,
    removed: bool,
}

pub struct Container {
    pub id: String,
    cgroup: PathBuf,
    pub init: Arc<Process>,
    /// The container's filter, for its exec processes (see [`HuskExecutor`]).
    seccomp: Option<LinuxSeccomp>,
    lifecycle: tokio::sync::Mutex<Lifecycle>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            AgentError::NotFound(format!(
                "exec {exec_id:?} not found in container {:?}",
                self.id
            ))
        })
    }

    fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut v = vec![Arc::clone(&self.init)];
        v.extend(lock(&self.execs).values().cloned());
        v
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Entry {
    Creating,
    Ready(Arc<Container>),
}

/// Runs the container process's payload. Wraps libcontainer's default
/// executor to undo what the agent's process state would otherwise leak into
/// every container: Rust's runtime ignores SIGPIPE, and an ignored signal
/// stays ignored across execve.
///
/// For exec processes it also applies the container's seccomp filter:
/// libcontainer 0.7 builds an exec's spec without the container's
/// `linux.seccomp`, so without this an exec (a probe, `kubectl exec`) would
/// run the tenant's binaries unfiltered. This runs after libcontainer dropped
/// the process's capabilities, where the kernel accepts a filter only under
/// no_new_privs: exec processes of a filtered container get no_new_privs,
/// stricter than runc, which can load the filter earlier.
#[derive(Clone, Default)]
struct HuskExecutor {
    tenant_seccomp: Option<LinuxSeccomp>,
}

impl Executor for HuskExecutor {
    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        // SAFETY: setting a signal to its default disposition installs no
        // handler; this runs single-threaded in the container process just
        // before execve.
        unsafe {
            let _ = nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl);
        }
        let _ = nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&nix::sys::signal::SigSet::empty()),
            None,
        );
        if let Some(filter) = &self.tenant_seccomp {
            nix::sys::prctl::set_no_new_privs().map_err(|e| {
                ExecutorError::Other(format!("no_new_privs for the seccomp filter: {e}"))
            })?;
            libcontainer::seccomp::initialize_seccomp(filter).map_err(|e| {
                ExecutorError::Other(format!("the container's seccomp filter: {e}"))
            })?;
        }
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

pub struct Containers {
    cfg: Config,
    reaper: Arc<Reaper>,
    pub cgroups: Cgroups,
    map: Mutex<HashMap<String, Entry>>,
    tty_seq: AtomicU64,
}

/// What the host asked for a process's stdio.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdioRequest {
    pub stdin: bool,
    pub terminal: bool,
}

/// The agent's side, before the process exists.
enum ParentStdio {
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    Console {
        stdin: bool,
    },
}

impl Containers {
    pub fn new(cfg: Config, reaper: Arc<Reaper>) -> anyhow::Result<Self> {
        for dir in [
            cfg.run_dir.join("containers"),
            cfg.youki_root(),
            cfg.tty_dir(),
        ] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let cgroups = Cgroups::detect();
        info!(mode = ?cgroups.mode, "cgroup hierarchy");
        Ok(Containers {
            cfg,
            reaper,
            cgroups,
            map: Mutex::new(HashMap::new()),
            tty_seq: AtomicU64::new(0),
        })
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        match lock(&self.map).get(id) {
            Some(Entry::Ready(c)) => Ok(Arc::clone(c)),
            Some(Entry::Creating) => Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is still being created"
            ))),
            None => Err(AgentError::NotFound(format!("container {id:?} not found"))),
        }
    }

    pub fn ids(&self) -> Vec<String> {
        lock(&self.map).keys().cloned().collect()
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        self.get(id)?.process(exec_id)
    }

    fn stdio(&self, req: StdioRequest) -> Result<(ChildStdio, ParentStdio)> {
        if req.terminal {
            // sun_path is short: console sockets live in a dir with a short
            // name, whatever the container id's length.
            let n = self.tty_seq.fetch_add(1, Ordering::Relaxed);
            let path = self.cfg.tty_dir().join(format!("{n}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = std::os::unix::net::UnixListener::bind(&path).map_err(|e| {
                AgentError::internal(anyhow::anyhow!("binding {}: {e}", path.display()))
            })?;
            Ok((
                ChildStdio::Console { path, listener },
                ParentStdio::Console { stdin: req.stdin },
            ))
        } else {
            let (child, stdin, stdout, stderr) = stdio::pipes(req.stdin)
                .map_err(|e| AgentError::internal(anyhow::anyhow!("stdio pipes: {e}")))?;
            Ok((
                ChildStdio::Pipes(child),
                ParentStdio::Pipes {
                    stdin,
                    stdout,
                    stderr,
                },
            ))
        }
    }

    /// Runs on the blocking thread: the builder is not Send.
    fn base_builder(
        youki_root: &Path,
        id: &str,
        child: &ChildStdio,
        executor: HuskExecutor,
    ) -> anyhow::Result<ContainerBuilder> {
        let mut b = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(youki_root)?
            .with_executor(executor);
        match child {
            ChildStdio::Pipes(_) => {}
            ChildStdio::Console { path, .. } => b = b.with_console_socket(Some(path)),
        }
        Ok(b)
    }

    /// The end of a create or exec: registers what the blocking libcontainer
    /// build (`task`, named in a join error) started, then releases the fork
    /// lock and kicks the reaper, which may have an exit to collect.
    fn register_built(
        &self,
        guard: ForkGuard,
        built: std::result::Result<anyhow::Result<(Pid, Option<OwnedFd>)>, tokio::task::JoinError>,
        parent: ParentStdio,
        cgroup: &Path,
        task: std::fmt::Arguments<'_>,
    ) -> Result<Arc<Process>> {
        let result = match built {
            Ok(Ok((pid, master))) => self
                .register(&guard, pid, parent, master, cgroup)
                .map_err(AgentError::internal),
            Ok(Err(e)) => Err(AgentError::internal(e)),
            Err(e) => Err(AgentError::Internal(format!("{task} failed: {e}"))),
        };
        drop(guard);
        self.reaper.kick();
        result
    }

    /// Turns the created pid and the agent's stdio ends into a Process and
    /// registers its exit, under the fork lock.
    fn register(
        &self,
        guard: &ForkGuard,
        pid: Pid,
        parent: ParentStdio,
        master: Option<OwnedFd>,
        cgroup: &Path,
    ) -> anyhow::Result<Arc<Process>> {
        let stdio = match parent {
            ParentStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => ProcessStdio::from_pipes(stdin, stdout, stderr)?,
            ParentStdio::Console { stdin } => {
                ProcessStdio::from_pty(master.context("no pty master received")?, stdin)?
            }
        };
        let (tx, rx) = watch::channel(None);
        let process = Arc::new(Process {
            pid,
            stdio,
            exit: rx,
        });
        let oom_baseline = self.cgroups.oom_kills(cgroup).unwrap_or(0);
        let cgroups = self.cgroups.clone();
        let cgroup = cgroup.to_owned();
        let weak = Arc::downgrade(&process);
        self.reaper.register(
            guard,
            pid,
            Box::new(move |status: WaitStatus| {
                let code = spec::exit_code(status).unwrap_or(-1);
                let killed = matches!(status, WaitStatus::Signaled(_, Signal::SIGKILL, _));
                let oom_killed = killed && cgroups.oom_kills(&cgroup).unwrap_or(0) > oom_baseline;
                let _ = tx.send(Some(Exit {
                    code,
                    oom_killed,
                    at: SystemTime::now(),
                }));
                // Nobody reads the process's stdin any more.
                if let Some(p) = weak.upgrade() {
                    if let Some(s) = &p.stdio.stdin {
                        if p.stdio.tty.is_none() {
                            s.close();
                        }
                    }
                }
            }),
        );
        Ok(process)
    }

    pub async fn create(&self, id: &str, spec_json: &[u8], req: StdioRequest) -> Result<()> {
        spec::validate_id("container_id", id)?;
        let mut spec = spec::prepare_spec(id, spec_json, req.terminal, &self.cfg.cgroup_parent)?;
        if self.cfg.clamp_rlimits {
            if let Some(p) = spec.process_mut() {
                spec::clamp_rlimits(p);
            }
        }
        {
            let mut map = lock(&self.map);
            if map.contains_key(id) {
                return Err(AgentError::AlreadyExists(format!(
                    "container {id:?} already exists"
                )));
            }
            map.insert(id.to_owned(), Entry::Creating);
        }
        match self.do_create(id, spec, req).await {
            Ok(c) => {
                lock(&self.map).insert(id.to_owned(), Entry::Ready(c));
                info!(container = id, "created");
                Ok(())
            }
            Err(e) => {
                lock(&self.map).remove(id);
                let _ = std::fs::remove_dir_all(self.cfg.bundle(id));
                let _ = std::fs::remove_dir_all(self.cfg.youki_root().join(id));
                warn!(container = id, "create failed: {e}");
                Err(e)
            }
        }
    }

    async fn do_create(&self, id: &str, spec: Spec, req: StdioRequest) -> Result<Arc<Container>> {
        let bundle = self.cfg.bundle(id);
        // Left over from an agent that died halfway; the map says the id is free.
        let _ = std::fs::remove_dir_all(&bundle);
        let _ = std::fs::remove_dir_all(self.cfg.youki_root().join(id));
        std::fs::create_dir_all(&bundle)
            .and_then(|_| {
                let json = serde_json::to_vec_pretty(&spec).map_err(std::io::Error::other)?;
                std::fs::write(bundle.join("config.json"), json)
            })
            .map_err(|e| {
                AgentError::internal(anyhow::anyhow!("writing the bundle of {id}: {e}"))
            })?;
        let cgroup = spec::cgroup_path(&self.cfg.cgroup_parent, id);
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let (child, parent) = self.stdio(req)?;
        let youki_root = self.cfg.youki_root();

        let no_pivot = self.cfg.no_pivot;
        let guard = self.reaper.fork_lock().await;
        let id2 = id.to_owned();
        let built =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(Pid, Option<OwnedFd>)> {
                let builder =
                    Self::base_builder(&youki_root, &id2, &child, HuskExecutor::default())?;
                let (builder, console) = split_stdio(builder, child);
                let container = builder
                    .as_init(&bundle)
                    .with_no_pivot(no_pivot)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
                    .with_context(|| format!("libcontainer create of {id2}"))?;
                let pid = container
                    .pid()
                    .context("libcontainer returned no init pid")?;
                let master = receive_console(console)?;
                Ok((pid, master))
            })
            .await;
        let result = self.register_built(
            guard,
            built,
            parent,
            &cgroup,
            format_args!("create task of {id}"),
        );
        let init = match result {
            Ok(p) => p,
            Err(e) => {
                // The init process may exist (e.g. the console fd never
                // came): do not leave it behind.
                self.youki_cleanup(id).await;
                return Err(e);
            }
        };
        Ok(Arc::new(Container {
            id: id.to_owned(),
            cgroup,
            init,
            seccomp,
            lifecycle: Default::default(),
            execs: Mutex::new(HashMap::new()),
        }))
    }

    /// Kills and deletes what libcontainer knows of `id`, ignoring errors.
    async fn youki_cleanup(&self, id: &str) {
        let root = self.cfg.youki_root().join(id);
        if !root.exists() {
            return;
        }
        let guard = self.reaper.fork_lock().await;
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut c) = YoukiContainer::load(root.clone()) {
                let _ = c.kill(Signal::SIGKILL, true);
                let _ = c.delete(true);
            }
            let _ = std::fs::remove_dir_all(&root);
        })
        .await;
        drop(guard);
        self.reaper.kick();
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut lc = c.lifecycle.lock().await;
        if lc.removed {
            return Err(AgentError::NotFound(format!("container {id:?} not found")));
        }
        if lc.started {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is already started"
            )));
        }
        if c.init.exit().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} has exited"
            )));
        }
        let root = self.cfg.youki_root().join(id);
        let guard = self.reaper.fork_lock().await;
        let r = tokio::task::spawn_blocking(move || YoukiContainer::load(root)?.start()).await;
        drop(guard);
        self.reaper.kick();
        match r {
            Ok(Ok(())) => {
                lc.started = true;
                info!(container = id, "started");
                Ok(())
            }
            Ok(Err(e)) => Err(AgentError::internal(
                anyhow::Error::new(e).context(format!("starting {id}")),
            )),
            Err(e) => Err(AgentError::Internal(format!(
                "start task of {id} failed: {e}"
            ))),
        }
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        req: StdioRequest,
    ) -> Result<()> {
        if exec_id.is_empty() {
            return Err(AgentError::InvalidArgument(
                "exec_id: empty (\"\" names the init process)".into(),
            ));
        }
        spec::validate_id("exec_id", exec_id)?;
        let mut process = spec::prepare_process(process_json, req.terminal)?;
        if self.cfg.clamp_rlimits {
            spec::clamp_rlimits(&mut process);
        }
        let c = self.get(id)?;
        let lc = c.lifecycle.lock().await;
        if lc.removed {
            return Err(AgentError::NotFound(format!("container {id:?} not found")));
        }
        if !lc.started || c.init.exit().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        if lock(&c.execs).contains_key(exec_id) {
            return Err(AgentError::AlreadyExists(format!(
                "exec {exec_id:?} already exists in container {id:?}"
            )));
        }
        let process_file = self.cfg.bundle(id).join(format!("exec-{exec_id}.json"));
        std::fs::write(
            &process_file,
            serde_json::to_vec(&process).map_err(AgentError::internal)?,
        )
        .map_err(|e| {
            AgentError::internal(anyhow::anyhow!("writing {}: {e}", process_file.display()))
        })?;
        let (child, parent) = self.stdio(req)?;
        let youki_root = self.cfg.youki_root();

        let guard = self.reaper.fork_lock().await;
        let pf = process_file.clone();
        let label = format!("{id}/{exec_id}");
        let id2 = id.to_owned();
        let executor = HuskExecutor {
            tenant_seccomp: c.seccomp.clone(),
        };
        let built =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(Pid, Option<OwnedFd>)> {
                let builder = Self::base_builder(&youki_root, &id2, &child, executor)?;
                let (builder, console) = split_stdio(builder, child);
                let pid = builder
                    .as_tenant()
                    .with_detach(true)
                    .with_process(Some(&pf))
                    .build()
                    .with_context(|| format!("libcontainer exec of {label}"))?;
                let master = receive_console(console)?;
                Ok((pid, master))
            })
            .await;
        let result = self.register_built(
            guard,
            built,
            parent,
            &c.cgroup,
            format_args!("exec task of {id}/{exec_id}"),
        );
        let _ = std::fs::remove_file(&process_file);
        let p = result?;
        let mut execs = lock(&c.execs);
        execs.insert(exec_id.to_owned(), p);
        prune_exited(&mut execs);
        info!(container = id, exec = exec_id, "exec started");
        Ok(())
    }

    pub async fn signal(&self, id: &str, exec_id: &str, sig: i32) -> Result<()> {
        let sig = spec::validate_signal(sig)?;
        let p = self.process(id, exec_id)?;
        // Holding the fork lock keeps the reaper from reaping (and the
        // kernel from reusing) the pid between the check and the kill.
        let _guard = self.reaper.fork_lock().await;
        if p.exit().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "process {id:?}/{exec_id:?} has exited"
            )));
        }
        // SAFETY: kill(2) with a validated signal number has no memory-safety
        // requirements; nix::Signal cannot express real-time signals.
        let rc = unsafe { libc::kill(p.pid.as_raw(), sig) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(AgentError::Internal(format!("kill({}, {sig}): {e}", p.pid)));
        }
        Ok(())
    }

    pub async fn stats(&self, id: &str) -> Result<crate::cgroup::Stats> {
        let c = self.get(id)?;
        self.cgroups
            .stats(&c.cgroup)
            .map_err(|e| AgentError::Internal(format!("reading the cgroup of {id}: {e}")))
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let resources = spec::parse_resources(resources_json)?;
        let c = self.get(id)?;
        let config = CgroupConfig {
            cgroup_path: c.cgroup.clone(),
            systemd_cgroup: false,
            container_name: id.to_owned(),
        };
        let r = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let manager = libcgroups::common::create_cgroup_manager(config)?;
            manager.apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })?;
            Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AgentError::InvalidArgument(format!(
                "resources_json: applying to {id}: {e:#}"
            ))),
            Err(e) => Err(AgentError::Internal(format!(
                "update task of {id} failed: {e}"
            ))),
        }
    }

    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        let c = self.get(id)?;
        let mut lc = c.lifecycle.lock().await;
        if lc.removed {
            return Err(AgentError::NotFound(format!("container {id:?} not found")));
        }
        let alive: Vec<_> = c
            .all_processes()
            .into_iter()
            .filter(|p| p.exit().is_none())
            .collect();
        if lc.started && c.init.exit().is_none() && !force {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is running; stop it or remove with force"
            )));
        }
        if !alive.is_empty() {
            self.kill_all(&c).await;
            let waits = futures_join(alive.iter().map(|p| p.wait()));
            if tokio::time::timeout(KILL_TIMEOUT, waits).await.is_err() {
                return Err(AgentError::Internal(format!(
                    "container {id:?}: processes did not exit within {KILL_TIMEOUT:?} of SIGKILL"
                )));
            }
        }
        for p in c.all_processes() {
            p.stdio.detach_all().await;
        }
        let root = self.cfg.youki_root().join(id);
        let guard = self.reaper.fork_lock().await;
        let r = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            if root.exists() {
                YoukiContainer::load(root.clone())?.delete(true)?;
                let _ = std::fs::remove_dir_all(&root);
            }
            Ok(())
        })
        .await;
        drop(guard);
        self.reaper.kick();
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(container = id, "libcontainer delete: {e:#}"),
            Err(e) => warn!(container = id, "delete task: {e}"),
        }
        self.remove_cgroup(&c.cgroup);
        let bundle = self.cfg.bundle(id);
        if let Err(e) = std::fs::remove_dir_all(&bundle) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(AgentError::Internal(format!(
                    "removing {}: {e}",
                    bundle.display()
                )));
            }
        }
        lc.removed = true;
        lock(&self.map).remove(id);
        info!(container = id, "removed");
        Ok(())
    }

    /// SIGKILLs every process of the container: through libcontainer (which
    /// walks the cgroup) and directly, in case the cgroup walk fails.
    async fn kill_all(&self, c: &Container) {
        let root = self.cfg.youki_root().join(&c.id);
        let guard = self.reaper.fork_lock().await;
        let r = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            YoukiContainer::load(root)?.kill(Signal::SIGKILL, true)?;
            Ok(())
        })
        .await;
        if let Ok(Err(e)) = r {
            warn!(container = c.id, "libcontainer kill: {e:#}");
        }
        for p in c.all_processes() {
            if p.exit().is_none() {
                let _ = nix::sys::signal::kill(p.pid, Signal::SIGKILL);
            }
        }
        drop(guard);
        self.reaper.kick();
    }

    /// libcontainer removes the cgroup on delete; this catches what is left
    /// when delete failed (rmdir only succeeds on an empty cgroup).
    fn remove_cgroup(&self, cgroup: &Path) {
        let controllers: &[&str] = match self.cgroups.mode {
            crate::cgroup::Mode::V2 => &[""],
            crate::cgroup::Mode::V1 => &[
                "cpu",
                "cpuacct",
                "cpuset",
                "memory",
                "devices",
                "freezer",
                "blkio",
                "pids",
                "hugetlb",
                "net_cls",
                "net_prio",
                "perf_event",
                "systemd",
            ],
        };
        for ctl in controllers {
            let dir = self.cgroups.dir(ctl, cgroup);
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!("removing cgroup {}: {e}", dir.display()),
            }
        }
    }
}

fn prune_exited(execs: &mut HashMap<String, Arc<Process>>) {
    let mut exited: Vec<(SystemTime, String)> = execs
        .iter()
        .filter_map(|(k, p)| p.exit().map(|e| (e.at, k.clone())))
        .collect();
    if exited.len() <= MAX_EXITED_EXECS {
        return;
    }
    exited.sort();
    for (_, k) in exited.iter().take(exited.len() - MAX_EXITED_EXECS) {
        execs.remove(k);
    }
}

async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) {
    for f in futs {
        f.await;
    }
}
