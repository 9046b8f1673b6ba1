//! The agent calls of a sandbox: containers and their processes.

use std::path::PathBuf;

use husk_proto::agent::{
    ContainerRef, ContainerStatsResponse, CreateContainerRequest, ExecProcessRequest,
    HealthRequest, HealthResponse, ProcessRef, RemoveContainerRequest, ResizeTerminalRequest,
    SignalProcessRequest, StdioConfig, StreamKind, UpdateContainerRequest,
};
use tokio::net::UnixStream;

use super::*;

impl Sandbox {
    fn rpc_err(
        &self,
        method: &'static str,
    ) -> impl FnOnce(husk_proto::ttrpc::Error) -> SandboxError + '_ {
        move |source| SandboxError::Agent {
            id: self.id.clone(),
            source: AgentError::Rpc { method, source },
        }
    }

    fn container_err(&self, container_id: &str, what: impl Into<String>) -> SandboxError {
        SandboxError::Container {
            id: self.id.clone(),
            container_id: container_id.into(),
            what: what.into(),
        }
    }

    pub async fn health(&self) -> Result<HealthResponse, SandboxError> {
        self.agent
            .client()
            .health(HealthRequest {}, Some(self.rpc_timeout))
            .await
            .map_err(self.rpc_err("Health"))
    }

    /// Creates a container from `spec` (its `root.path` is set here to the
    /// guest path of the rootfs). Attach its streams with
    /// [`attach_stdio`](Self::attach_stdio), then
    /// [`start_container`](Self::start_container).
    pub async fn create_container(
        &self,
        container_id: &str,
        mut spec: oci_spec::runtime::Spec,
        rootfs: Rootfs,
        stdio: StdioConfig,
    ) -> Result<(), SandboxError> {
        let host_rootfs = self.container_rootfs(container_id)?;
        let span =
            tracing::info_span!("create_container", sandbox = %self.id, container = %container_id);
        async {
            if host_rootfs.parent().is_some_and(|p| p.exists()) && matches!(rootfs, Rootfs::Bind(_))
            {
                return Err(self.container_err(container_id, "already exists"));
            }
            // Created on the writable side; the share shows it read-only.
            let rw_dir = self.paths().container_rw(container_id);
            std::fs::create_dir_all(rw_dir.join("rootfs"))
                .map_err(|e| SandboxError::io(format!("create {}", rw_dir.display()), e))?;
            if let Rootfs::Bind(src) = &rootfs {
                mounts::bind(src, &host_rootfs).map_err(|e| {
                    let _ = std::fs::remove_dir_all(&rw_dir);
                    self.container_err(container_id, format!("bind {} : {e}", src.display()))
                })?;
                self.bound
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(container_id.to_string());
            }
            let mut root = spec.root().clone().unwrap_or_default();
            root.set_path(PathBuf::from(Self::guest_rootfs(container_id)));
            spec.set_root(Some(root));
            let json = serde_json::to_vec(&spec).map_err(|e| {
                self.container_err(container_id, format!("serializing the spec: {e}"))
            })?;
            let r = self
                .agent
                .client()
                .create_container(
                    CreateContainerRequest {
                        container_id: container_id.into(),
                        oci_spec_json: json,
                        stdio: Some(stdio),
                    },
                    Some(self.rpc_timeout),
                )
                .await;
            if let Err(e) = r {
                self.release_rootfs(container_id);
                return Err(self.rpc_err("CreateContainer")(e));
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    pub async fn start_container(&self, container_id: &str) -> Result<(), SandboxError> {
        self.agent
            .client()
            .start_container(
                ContainerRef {
                    container_id: container_id.into(),
                },
                Some(self.rpc_timeout),
            )
            .await
            .map_err(self.rpc_err("StartContainer"))?;
        Ok(())
    }

    /// Starts an additional process in a running container.
    pub async fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        stdio: StdioConfig,
    ) -> Result<(), SandboxError> {
        validate_id("exec id", exec_id)?;
        let json = serde_json::to_vec(process).map_err(|e| {
            self.container_err(container_id, format!("serializing the process: {e}"))
        })?;
        self.agent
            .client()
            .exec_process(
                ExecProcessRequest {
                    container_id: container_id.into(),
                    exec_id: exec_id.into(),
                    process_json: json,
                    stdio: Some(stdio),
                },
                Some(self.rpc_timeout),
            )
            .await
            .map_err(self.rpc_err("ExecProcess"))?;
        Ok(())
    }

    /// Opens one stdio stream of a process (`exec_id` "" is the container's
    /// init process).
    pub async fn attach(
        &self,
        container_id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, SandboxError> {
        self.agent
            .open_stream(container_id, exec_id, kind)
            .await
            .map_err(|source| SandboxError::Agent {
                id: self.id.clone(),
                source,
            })
    }

    /// A TCP connection to `localhost:port` in the pod (the agent connects
    /// from inside the VM), as a byte stream.
    pub async fn port_forward(&self, port: u16) -> Result<UnixStream, SandboxError> {
        self.agent
            .port_forward(port)
            .await
            .map_err(|source| SandboxError::Agent {
                id: self.id.clone(),
                source,
            })
    }

    /// Opens the streams `stdio` asked for.
    pub async fn attach_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        stdio: StdioConfig,
    ) -> Result<ProcessStdio, SandboxError> {
        let stdin = if stdio.stdin {
            Some(
                self.attach(container_id, exec_id, StreamKind::Stdin)
                    .await?,
            )
        } else {
            None
        };
        let stdout = self
            .attach(container_id, exec_id, StreamKind::Stdout)
            .await?;
        let stderr = if stdio.terminal {
            None
        } else {
            Some(
                self.attach(container_id, exec_id, StreamKind::Stderr)
                    .await?,
            )
        };
        Ok(ProcessStdio {
            stdin,
            stdout,
            stderr,
        })
    }

    pub async fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: i32,
    ) -> Result<(), SandboxError> {
        self.agent
            .client()
            .signal_process(
                SignalProcessRequest {
                    process: Some(ProcessRef {
                        container_id: container_id.into(),
                        exec_id: exec_id.into(),
                    }),
                    signal,
                },
                Some(self.rpc_timeout),
            )
            .await
            .map_err(self.rpc_err("SignalProcess"))?;
        Ok(())
    }

    /// Sets the terminal size of a process started with a terminal.
    pub async fn resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), SandboxError> {
        self.agent
            .client()
            .resize_terminal(
                ResizeTerminalRequest {
                    process: Some(ProcessRef {
                        container_id: container_id.into(),
                        exec_id: exec_id.into(),
                    }),
                    rows,
                    cols,
                },
                Some(self.rpc_timeout),
            )
            .await
            .map_err(self.rpc_err("ResizeTerminal"))?;
        Ok(())
    }

    /// Waits (without a timeout) until the process has exited.
    pub async fn wait(&self, container_id: &str, exec_id: &str) -> Result<ExitInfo, SandboxError> {
        let r = self
            .agent
            .client()
            .wait_process(
                ProcessRef {
                    container_id: container_id.into(),
                    exec_id: exec_id.into(),
                },
                None,
            )
            .await
            .map_err(self.rpc_err("WaitProcess"))?;
        Ok(r.into())
    }

    pub async fn stats(&self, container_id: &str) -> Result<ContainerStatsResponse, SandboxError> {
        self.agent
            .client()
            .container_stats(
                ContainerRef {
                    container_id: container_id.into(),
                },
                Some(self.rpc_timeout),
            )
            .await
            .map_err(self.rpc_err("ContainerStats"))
    }

    /// Applies new resource limits (an OCI `LinuxResources` as JSON) to the
    /// container's cgroup in the guest.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), SandboxError> {
        self.agent
            .client()
            .update_container(
                UpdateContainerRequest {
                    container_id: container_id.into(),
                    resources_json,
                },
                Some(self.rpc_timeout),
            )
            .await
            .map_err(self.rpc_err("UpdateContainer"))?;
        Ok(())
    }

    /// Removes the container in the guest, then its rootfs bind mount and
    /// directory in the share.
    pub async fn remove_container(
        &self,
        container_id: &str,
        force: bool,
    ) -> Result<(), SandboxError> {
        validate_id("container id", container_id)?;
        self.agent
            .client()
            .remove_container(
                RemoveContainerRequest {
                    container_id: container_id.into(),
                    force,
                },
                Some(self.rpc_timeout),
            )
            .await
            .map_err(self.rpc_err("RemoveContainer"))?;
        self.release_rootfs(container_id);
        Ok(())
    }

    /// Unmounts (if bound) and removes `share-rw/containers/<id>`. A rootfs the
    /// caller placed in the share (Rootfs::InShare) is the caller's: only
    /// bound ones are removed here, and only once unmounted.
    fn release_rootfs(&self, container_id: &str) {
        let was_bound = self
            .bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(container_id);
        if !was_bound {
            return;
        }
        let Ok(rootfs) = self.container_rootfs(container_id) else {
            return;
        };
        match mounts::unmount_all_under(&rootfs) {
            Ok(left) if left.is_empty() => {
                let _ = std::fs::remove_dir_all(self.paths().container_rw(container_id));
            }
            Ok(left) => tracing::error!(?left, "rootfs mounts left, keeping the directory"),
            Err(e) => tracing::error!(%e, "unmounting the rootfs"),
        }
    }
}
