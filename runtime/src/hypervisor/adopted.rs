//! A VM a previous huskd launched, adopted by this one after a restart.
//!
//! Its processes are not our children: they are watched through pidfds
//! ([`AdoptedProcess`]), the VMM is asked to quit the same way as a VM we
//! launched (QMP `quit` for QEMU, `shutdown` on husk-vmm's control socket)
//! and killed by signal after the timeout.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::builtin::{control_request, BuiltinFiles, Request};
use super::qmp::Qmp;
use super::{HypervisorError, Vm};
use crate::process::{AdoptError, AdoptedProcess, ProcessIdentity};

/// How the VMM is asked to quit.
#[derive(Debug, Clone)]
pub enum VmControl {
    /// QEMU's QMP socket.
    Qmp(PathBuf),
    /// husk-vmm's control socket and files, and the hybrid vsock socket it
    /// serves (removed after a kill, as for a launched husk-vmm).
    HuskVmm {
        files: BuiltinFiles,
        vsock_uds: PathBuf,
    },
}

impl VmControl {
    /// The VMM's role name in the recorded processes.
    pub fn vmm_role(&self) -> &'static str {
        match self {
            VmControl::Qmp(_) => "qemu",
            VmControl::HuskVmm { .. } => "husk-vmm",
        }
    }

    /// Roles of the helpers the backend itself started (reported by
    /// `pids()` after the VMM, in launch order).
    pub fn helper_roles(&self) -> &'static [&'static str] {
        match self {
            VmControl::Qmp(_) => &["husk-vsock"],
            VmControl::HuskVmm { .. } => &[],
        }
    }
}

/// Why a VM could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptVmError {
    #[error("no {0} recorded")]
    NotRecorded(&'static str),
    #[error(transparent)]
    Process(#[from] AdoptError),
    #[error("husk-vmm control socket: {0}")]
    Control(String),
}

/// A running VM found again after a huskd restart.
#[derive(Debug)]
pub struct AdoptedVm {
    id: String,
    vmm: AdoptedProcess,
    helpers: Vec<AdoptedProcess>,
    control: VmControl,
    log: PathBuf,
    adopted_at: Instant,
}

fn role_static(role: &str) -> &'static str {
    match role {
        "qemu" => "qemu",
        "husk-vsock" => "husk-vsock",
        "husk-vmm" => "husk-vmm",
        "virtiofsd" => "virtiofsd",
        _ => "helper",
    }
}

/// Opens the recorded process of `role` (see [`AdoptedProcess::adopt`]).
pub fn adopt_role(
    recorded: &[ProcessIdentity],
    role: &'static str,
) -> Result<AdoptedProcess, AdoptVmError> {
    let rec = recorded
        .iter()
        .find(|p| p.role == role)
        .ok_or(AdoptVmError::NotRecorded(role))?;
    Ok(AdoptedProcess::adopt(role_static(&rec.role), rec)?)
}

impl AdoptedVm {
    /// Checks that the VMM and the backend's helpers in `recorded` are
    /// still the processes that were launched, and (husk-vmm) that the
    /// control socket answers `status` for that pid, then takes them over.
    pub async fn adopt(
        id: &str,
        control: VmControl,
        recorded: &[ProcessIdentity],
        timeout: Duration,
    ) -> Result<Self, AdoptVmError> {
        let vmm = adopt_role(recorded, control.vmm_role())?;
        let mut helpers = Vec::new();
        for role in control.helper_roles() {
            helpers.push(adopt_role(recorded, role)?);
        }
        let log = match &control {
            VmControl::Qmp(qmp) => qmp.with_file_name("qemu.log"),
            VmControl::HuskVmm { files, .. } => {
                let r = control_request(&files.control, Request::Status, timeout)
                    .await
                    .map_err(|e| AdoptVmError::Control(e.to_string()))?;
                let pid = r.status.as_ref().map(|s| s.pid);
                if !r.ok || pid != Some(vmm.pid()) {
                    return Err(AdoptVmError::Control(format!(
                        "status reply {r} does not match husk-vmm pid {}",
                        vmm.pid()
                    )));
                }
                files.log.clone()
            }
        };
        Ok(Self {
            id: id.to_string(),
            vmm,
            helpers,
            control,
            log,
            adopted_at: Instant::now(),
        })
    }

    async fn ask_to_quit(&self, timeout: Duration) -> Result<(), HypervisorError> {
        match &self.control {
            VmControl::Qmp(path) => {
                let mut q = Qmp::connect(path, timeout).await?;
                q.execute("quit", timeout).await?;
            }
            VmControl::HuskVmm { files, .. } => {
                let r = control_request(&files.control, Request::Shutdown, timeout).await?;
                if !r.ok {
                    return Err(HypervisorError::Qmp(format!(
                        "husk-vmm refused shutdown: {r}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// husk-vmm removes its socket and pid file on a clean exit; after a
    /// kill they are stale.
    fn remove_files(&self) {
        if let VmControl::HuskVmm { files, vsock_uds } = &self.control {
            for p in [&files.control, &files.pid, vsock_uds] {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    async fn stop_helpers(&mut self, grace: Duration) {
        for h in &mut self.helpers {
            if let Err(e) = h.terminate(grace).await {
                tracing::warn!(role = h.role(), %e, "stopping an adopted helper");
            }
        }
    }
}

#[async_trait::async_trait]
impl Vm for AdoptedVm {
    fn pids(&self) -> Vec<(&'static str, u32)> {
        std::iter::once(&self.vmm)
            .chain(&self.helpers)
            .map(|p| (p.role(), p.pid()))
            .collect()
    }

    /// When this huskd adopted it (the launch was another process's).
    fn launched_at(&self) -> Instant {
        self.adopted_at
    }

    fn log_file(&self) -> Option<PathBuf> {
        Some(self.log.clone())
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>, HypervisorError> {
        Ok(self.vmm.has_exited().then(|| self.vmm.status()))
    }

    async fn wait(&mut self) -> Result<ExitStatus, HypervisorError> {
        self.vmm
            .wait()
            .await
            .map_err(|e| HypervisorError::io(format!("wait for {}", self.vmm.role()), e))
    }

    async fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, HypervisorError> {
        let span = tracing::info_span!("adopted_vm_shutdown", sandbox = %self.id);
        async {
            let deadline = Instant::now() + timeout;
            if !self.vmm.has_exited() {
                if let Err(e) = self.ask_to_quit(timeout / 2).await {
                    tracing::warn!(%e, "asking the adopted VMM to quit failed, killing");
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let status = match self.vmm.wait_timeout(left).await {
                Ok(Some(s)) => s,
                _ => {
                    tracing::warn!("adopted VMM did not quit in time, killing");
                    self.vmm
                        .kill()
                        .await
                        .map_err(|e| HypervisorError::io("kill the adopted VMM", e))?
                }
            };
            self.stop_helpers(Duration::from_millis(500)).await;
            self.remove_files();
            Ok(status)
        }
        .instrument(span)
        .await
    }

    async fn kill(&mut self) -> Result<ExitStatus, HypervisorError> {
        let s = self
            .vmm
            .kill()
            .await
            .map_err(|e| HypervisorError::io("kill the adopted VMM", e))?;
        for h in &mut self.helpers {
            let _ = h.kill().await;
        }
        self.remove_files();
        Ok(s)
    }

    fn detach(self: Box<Self>) {
        let this = *self;
        this.vmm.detach();
        for h in this.helpers {
            h.detach();
        }
    }
}
