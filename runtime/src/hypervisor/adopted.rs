//! A VM a previous huskd launched, adopted by this one after a restart.
//!
//! Its processes are not our children: they are watched through pidfds
//! ([`AdoptedProcess`]), the VMM is asked to quit through its backend's
//! [`AdoptedControl`] (as a VM we launched would be) and killed by signal
//! after the timeout. Nothing here knows a particular backend.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::{HypervisorError, Vm, VmRecord};
use crate::process::{AdoptError, AdoptedProcess, ProcessIdentity};

/// How a backend asks its adopted VMM to quit, and what it cleans after.
#[async_trait::async_trait]
pub trait AdoptedControl: Send + Sync + std::fmt::Debug {
    /// Asks the VMM to quit (QMP `quit`, husk-vmm's `shutdown`).
    async fn quit(&self, timeout: Duration) -> Result<(), HypervisorError>;
    /// Files the VMM removes itself on a clean exit, stale after a kill.
    fn stale_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// Why a VM could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptVmError {
    #[error("no {0} recorded")]
    NotRecorded(&'static str),
    #[error(transparent)]
    Process(#[from] AdoptError),
}

impl From<AdoptVmError> for HypervisorError {
    fn from(e: AdoptVmError) -> Self {
        HypervisorError::Adopt(e.to_string())
    }
}

/// A running VM found again after a huskd restart.
#[derive(Debug)]
pub struct AdoptedVm {
    id: String,
    vmm: AdoptedProcess,
    helpers: Vec<AdoptedProcess>,
    control: Box<dyn AdoptedControl>,
    log: PathBuf,
    record: VmRecord,
    adopted_at: Instant,
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
    Ok(AdoptedProcess::adopt(role, rec)?)
}

impl AdoptedVm {
    /// Takes over the VMM (`vmm_role`) and helpers of `record`, which the
    /// backend has already checked (their pid and start time are checked
    /// here).
    pub fn adopt(
        id: &str,
        record: &VmRecord,
        vmm_role: &'static str,
        helper_roles: &[&'static str],
        control: Box<dyn AdoptedControl>,
        log: PathBuf,
    ) -> Result<Self, AdoptVmError> {
        let vmm = adopt_role(&record.processes, vmm_role)?;
        let mut helpers = Vec::new();
        for role in helper_roles {
            helpers.push(adopt_role(&record.processes, role)?);
        }
        Ok(Self {
            id: id.to_string(),
            vmm,
            helpers,
            control,
            log,
            record: record.clone(),
            adopted_at: Instant::now(),
        })
    }

    /// The VMM's pid.
    pub fn vmm_pid(&self) -> u32 {
        self.vmm.pid()
    }

    fn remove_files(&self) {
        for p in self.control.stale_files() {
            let _ = std::fs::remove_file(p);
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
                if let Err(e) = self.control.quit(timeout / 2).await {
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

    fn record(&self) -> VmRecord {
        self.record.clone()
    }
}
