//! A sandbox across huskd restarts: what is recorded of it, how a later
//! huskd takes it over, and how what a crashed one left is cleaned.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use husk_proto::agent::{HealthRequest, ReadyNotice};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::*;
use crate::hypervisor::{self, VmRecord};
use crate::process::{AdoptedProcess, Helper, ProcessIdentity};

/// How long a VMM left by a previous huskd gets to shut down through its
/// backend's control channel before what remains is killed.
const ORPHAN_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a later huskd needs to take a running sandbox over; stored with
/// the pod. The VM part is its backend's ([`VmRecord`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub vm: VmRecord,
    pub virtiofsd: ProcessIdentity,
}

/// What [`Sandbox::adopt`] needs: the pod record's view of the sandbox.
#[derive(Debug, Clone)]
pub struct AdoptConfig {
    pub id: String,
    /// The sandbox directory (sockets and share inside, as at start).
    pub dir: PathBuf,
    /// As recorded at start ([`Sandbox::record`]).
    pub record: SandboxRecord,
    /// The hypervisor description recorded at start.
    pub hypervisor: String,
    /// Each step: control channel, agent connect, Health.
    pub timeout: Duration,
    pub rpc_timeout: Duration,
    /// Kept for later stream connections (as [`SandboxConfig::connect_timeout`]).
    pub connect_timeout: Duration,
    pub stop_timeout: Duration,
}

impl Sandbox {
    /// Takes over a sandbox a previous huskd started: checks that the
    /// recorded VMM and helper processes are still those processes (pid and
    /// start time), connects to the agent through the hybrid vsock socket
    /// and calls Health. Nothing is stopped on failure: the caller decides.
    pub async fn adopt(config: AdoptConfig) -> Result<Sandbox, SandboxError> {
        validate_id("sandbox id", &config.id)?;
        let span = tracing::info_span!("sandbox_adopt", sandbox = %config.id);
        let id = config.id.clone();
        let err = move |why: String| SandboxError::Adopt {
            id: id.clone(),
            why,
        };
        async {
            let dir = config.dir.clone();
            let paths = SandboxPaths::new(&dir);
            let vm = hypervisor::adopt(&config.record.vm, &config.id, config.timeout)
                .await
                .map_err(|e| err(e.to_string()))?;
            let virtiofsd = AdoptedProcess::adopt(ROLE_VIRTIOFSD, &config.record.virtiofsd)
                .map_err(|e| err(e.to_string()))?;
            let agent = tokio::time::timeout(
                config.timeout,
                AgentConn::connect(&paths.vsock, config.connect_timeout),
            )
            .await
            .map_err(|_| err(format!("agent not reached within {:?}", config.timeout)))?
            .map_err(|e| err(format!("connecting to the agent: {e}")))?;
            let health = agent
                .client()
                .health(HealthRequest {}, Some(config.timeout))
                .await
                .map_err(|e| err(format!("agent Health: {e}")))?;
            let mut pids = vm.pids();
            pids.push((ROLE_VIRTIOFSD, virtiofsd.pid()));
            tracing::info!(agent_version = %health.agent_version, guest_uptime_ms = health.uptime_ms, ?pids, "sandbox adopted");
            Ok(Sandbox {
                id: config.id.clone(),
                share_dir: paths.share,
                dir,
                agent,
                rpc_timeout: config.rpc_timeout,
                stop_timeout: config.stop_timeout,
                hypervisor: config.hypervisor,
                ready: ReadyNotice {
                    agent_version: health.agent_version,
                    boot_to_ready_ms: 0,
                },
                timings: SandboxTimings::default(),
                pids,
                record: config.record,
                running: tokio::sync::Mutex::new(Some(Running {
                    vm,
                    virtiofsd: Helper::Adopted(virtiofsd),
                })),
                bound: StdMutex::new(HashSet::new()),
                detached: AtomicBool::new(false),
            })
        }
        .instrument(span)
        .await
    }

    /// What a later huskd needs to adopt this sandbox.
    pub fn record(&self) -> &SandboxRecord {
        &self.record
    }
}

/// Stops what a previous huskd left for a sandbox directory that has no
/// live sandbox, then unmounts and removes the directory: each backend
/// first stops its VMM as gracefully as it can ([`hypervisor::reap_orphan`]),
/// then whatever still names the directory (virtiofsd, helpers, a VMM that
/// did not answer) is SIGKILLed. A directory with mounts left is kept.
pub async fn reap_orphan_dir(dir: &Path) {
    if dir.as_os_str().is_empty() {
        return;
    }
    hypervisor::reap_orphan(dir, ORPHAN_STOP_TIMEOUT).await;
    let pids = crate::process::processes_using(dir);
    if !pids.is_empty() {
        tracing::warn!(?pids, dir = %dir.display(), "killing processes left from a previous huskd");
        crate::process::kill_and_wait(&pids).await;
    }
    if let Err(e) = remove_sandbox_dir(dir) {
        tracing::error!(error = %e, dir = %dir.display(), "removing a stale sandbox directory; keeping it");
    }
}
