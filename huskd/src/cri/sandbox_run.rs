//! RunPodSandbox: the pod's network, then its VM (or, for a pod sharing a
//! host namespace or of a `hypervisor = "none"` handler, its supervisor on
//! the host), then the pod record.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use husk_runtime::components::GuestImage;
use husk_runtime::hypervisor::HostPodConfig;
use husk_runtime::network;
use husk_runtime::sandbox::{share, Sandbox, SandboxConfig, SandboxPaths};
use k8s_cri::v1 as cri;
use tonic::Status;

use super::errors::{sandbox_error, state_error};
use super::helpers::record_pod_field;
use super::pod_network::{self, release_network};
use super::{now_ns, validation, Husk};
use crate::config::HostNamespacesPolicy;
use crate::state::{PodRecord, PodState};

/// The VM size of a pod: the handler's, raised to hold the pod's declared
/// resources plus overhead when kubelet sends them.
pub fn pod_size(
    handler: &crate::config::HandlerConfig,
    config: &cri::PodSandboxConfig,
) -> (u32, u32) {
    let linux = config.linux.as_ref();
    let cpus = |r: Option<&cri::LinuxContainerResources>| -> u64 {
        r.filter(|r| r.cpu_quota > 0 && r.cpu_period > 0)
            .map(|r| (r.cpu_quota as u64).div_ceil(r.cpu_period as u64))
            .unwrap_or(0)
    };
    let mib = |r: Option<&cri::LinuxContainerResources>| -> u64 {
        r.filter(|r| r.memory_limit_in_bytes > 0)
            .map(|r| (r.memory_limit_in_bytes as u64).div_ceil(1 << 20))
            .unwrap_or(0)
    };
    let res = linux.and_then(|l| l.resources.as_ref());
    let ovh = linux.and_then(|l| l.overhead.as_ref());
    let want_cpus = cpus(res) + cpus(ovh);
    let want_mib = mib(res) + mib(ovh);
    let vcpus = (handler.vcpus as u64).max(want_cpus).min(255) as u32;
    let memory_mib = (handler.memory_mib as u64).max(want_mib).min(1 << 20) as u32;
    (vcpus, memory_mib)
}

/// The host name of a pod that has none in its config: its name cut the
/// way kubelet cuts pod names (63 bytes, no trailing '-' or '.'). The name
/// is free-form (critest's are 68 bytes), so other bytes become '-'.
fn hostname_from_name(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    h.trim_matches(|c| c == '-' || c == '.').to_string()
}

/// Host names the guest kernel accepts (RFC 1123, at most 63 bytes).
fn pod_hostname(
    config: &cri::PodSandboxConfig,
    meta: &cri::PodSandboxMetadata,
) -> Result<String, Status> {
    let h = if config.hostname.is_empty() {
        hostname_from_name(&meta.name)
    } else {
        config.hostname.clone()
    };
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(h)
    } else {
        Err(Status::invalid_argument(format!(
            "config.hostname {:?} is not a valid host name",
            validation::printable(&h)
        )))
    }
}

/// The pod-wide files shared into the guest: /etc/hosts, resolv.conf,
/// hostname.
fn write_pod_files(
    paths: &SandboxPaths,
    config: &cri::PodSandboxConfig,
    hostname: &str,
) -> std::io::Result<()> {
    let dir = paths.share_rw.join("pod");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("hostname"), format!("{hostname}\n"))?;
    std::fs::write(
        dir.join("hosts"),
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
    )?;
    let mut resolv = String::new();
    if let Some(dns) = &config.dns_config {
        for s in &dns.servers {
            resolv.push_str(&format!("nameserver {s}\n"));
        }
        if !dns.searches.is_empty() {
            resolv.push_str(&format!("search {}\n", dns.searches.join(" ")));
        }
        if !dns.options.is_empty() {
            resolv.push_str(&format!("options {}\n", dns.options.join(" ")));
        }
    }
    std::fs::write(dir.join("resolv.conf"), resolv)?;
    // Containers may edit /etc/hosts (as with runc); the rest stays as
    // written here.
    share::make_guest_writable(paths, Path::new("pod/hosts"))
}

/// Validates the parts of a CRI config that end up in files, commands or
/// the guest, before anything is created.
fn check_pod_config(config: &cri::PodSandboxConfig) -> Result<&cri::PodSandboxMetadata, Status> {
    let meta = config
        .metadata
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("config.metadata is missing"))?;
    validation::name("config.metadata.name", &meta.name)?;
    validation::name("config.metadata.namespace", &meta.namespace)?;
    validation::name("config.metadata.uid", &meta.uid)?;
    validation::log_directory(&config.log_directory)?;
    if let Some(dns) = &config.dns_config {
        for (f, list) in [
            ("servers", &dns.servers),
            ("searches", &dns.searches),
            ("options", &dns.options),
        ] {
            if list
                .iter()
                .any(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(Status::invalid_argument(format!(
                    "config.dns_config.{f}: empty entry or whitespace"
                )));
            }
        }
    }
    Ok(meta)
}

pub(super) async fn run_pod_sandbox(
    h: &Husk,
    req: cri::RunPodSandboxRequest,
) -> Result<cri::RunPodSandboxResponse, Status> {
    let config = req
        .config
        .ok_or_else(|| Status::invalid_argument("config is missing"))?;
    let meta = check_pod_config(&config)?.clone();
    let host_ns = pod_network::HostNamespaces::of(&config);
    let Some((handler_name, handler_cfg)) = h.config.handler(&req.runtime_handler) else {
        return Err(Status::invalid_argument(format!(
            "runtime_handler {:?} is not configured; known handlers: {}",
            validation::printable(&req.runtime_handler),
            h.config.handler_names().join(", ")
        )));
    };
    let handler = &h.handlers[handler_name];
    let hostname = pod_hostname(&config, &meta)?;
    let sysctl_params = match config.linux.as_ref() {
        Some(l) => validation::sysctl_kernel_params(&l.sysctls)?,
        None => Vec::new(),
    };
    // The same pod attempt twice is a caller error (kubelet retries with a
    // new attempt number).
    if let Some(p) = h
        .state
        .pods()
        .into_iter()
        .find(|p| p.config.metadata.as_ref() == Some(&meta))
    {
        return Err(Status::already_exists(format!(
            "pod sandbox for {}/{} (uid {}, attempt {}) already exists: {}",
            meta.namespace, meta.name, meta.uid, meta.attempt, p.id
        )));
    }
    // frakti's hybrid runtime: what a VM cannot hold runs on the host.
    let on_host = handler_cfg.is_host_only()
        || (host_ns.any() && handler_cfg.host_namespaces == HostNamespacesPolicy::Host);
    if host_ns.any() && !on_host {
        return Err(Status::invalid_argument(format!(
            "{} is refused: runtime handler {handler_name:?} runs pods only in VMs (host_namespaces = \"refuse\")",
            host_ns.field()
        )));
    }
    let hypervisor = if on_host {
        handler.host.clone().map_err(|e| {
            Status::failed_precondition(format!(
                "runtime handler {handler_name:?} cannot run pods on the host: {e}"
            ))
        })?
    } else {
        handler.hypervisor.clone().map_err(|e| {
            Status::failed_precondition(format!(
                "runtime handler {handler_name:?} cannot run VMs: {e}"
            ))
        })?
    };
    // A host pod has no guest kernel to boot.
    let guest = if on_host {
        GuestImage::default()
    } else {
        Husk::guest_image(&handler.config)
            .map_err(|e| Status::failed_precondition(e.to_string()))?
    };
    let virtiofsd = h
        .virtiofsd
        .clone()
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let (vcpus, memory_mib) = pod_size(handler_cfg, &config);

    let id = super::new_id();
    record_pod_field(&id);
    let mut net_req = pod_network::request(&id, &config)?;
    // A host pod uses the CNI interface itself; a tap would take its
    // traffic away.
    net_req.vm_nic = !on_host;
    let lock = h.pod_lock(&id);
    let _g = lock.lock().await;
    // The network comes first: the VMM (or a host pod's agent) starts
    // inside the pod's namespace. A pod on the host's network has none.
    let t_net = std::time::Instant::now();
    let net = if host_ns.network {
        None
    } else {
        Some(
            network::setup(&h.cni, &net_req)
                .await
                .map_err(|e| pod_network::network_error(&id, &e))?,
        )
    };
    let mut sc = SandboxConfig::new(id.clone(), hypervisor.clone(), guest, virtiofsd);
    sc.network = net
        .as_ref()
        .map(|n| pod_network::sandbox_network(n, t_net.elapsed()));
    sc.host_namespaces = HostPodConfig {
        network: host_ns.network,
        ipc: host_ns.ipc,
        hostname: String::new(),
    };
    sc.hostname = hostname.clone();
    sc.vcpus = vcpus;
    sc.memory_mib = memory_mib;
    sc.kernel_params = handler_cfg.kernel_params.clone();
    sc.kernel_params.extend(sysctl_params);
    sc.state_dir = h.sandbox_state_dir();
    sc.ready_timeout = Duration::from_secs(h.config.sandbox_ready_timeout_secs);
    sc.console_log_max_bytes = h.config.console_log_max_bytes;
    let created_at_ns = now_ns();
    let sandbox = match Sandbox::start(sc).await {
        Ok(sb) => Arc::new(sb),
        Err(e) => {
            if net.is_some() {
                release_network(h, &id, net.as_ref()).await;
            }
            return Err(sandbox_error(&e));
        }
    };

    let finish = async {
        write_pod_files(&sandbox.paths(), &config, &hostname)
            .map_err(|e| Status::internal(format!("writing the pod's hosts/resolv.conf: {e}")))?;
        let rec = PodRecord {
            id: id.clone(),
            config: config.clone(),
            runtime_handler: handler_name.to_string(),
            state: PodState::Ready,
            created_at_ns,
            vcpus,
            memory_mib,
            hypervisor: sandbox.hypervisor().to_string(),
            pids: sandbox
                .pids()
                .iter()
                .map(|(r, p)| (r.to_string(), *p))
                .collect(),
            sandbox_dir: sandbox.dir().to_path_buf(),
            reason: String::new(),
            network: net.clone(),
            sandbox: Some(sandbox.record().clone()),
        };
        h.state.put_pod(rec).map_err(|e| state_error(&e))
    };
    if let Err(s) = finish.await {
        // Never leave a half-created sandbox: the VM goes again.
        if let Err(e) = sandbox.stop().await {
            tracing::error!(error = %e, "stopping a sandbox whose creation failed");
        }
        if net.is_some() {
            release_network(h, &id, net.as_ref()).await;
        }
        return Err(s);
    }
    let t = sandbox.timings();
    tracing::info!(
        handler = handler_name,
        vcpus,
        memory_mib,
        total_ms = t.total.as_millis() as u64,
        guest_boot_ms = t.guest_boot.as_millis() as u64,
        backend = sandbox.hypervisor(),
        ips = ?net.as_ref().map(|n| n.pod_ips()),
        "pod sandbox ready"
    );
    h.insert_sandbox(sandbox);
    Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_size_raised_by_resources_and_overhead() {
        let h = crate::config::HandlerConfig::default();
        let mut cfg = cri::PodSandboxConfig::default();
        assert_eq!(pod_size(&h, &cfg), (1, 256));
        cfg.linux = Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_quota: 150_000,
                cpu_period: 100_000,
                memory_limit_in_bytes: 512 << 20,
                ..Default::default()
            }),
            overhead: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: (64 << 20) + 1,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(pod_size(&h, &cfg), (2, 512 + 65));
        // Smaller than the handler: the handler wins.
        cfg.linux
            .as_mut()
            .unwrap()
            .resources
            .as_mut()
            .unwrap()
            .memory_limit_in_bytes = 1 << 20;
        cfg.linux.as_mut().unwrap().overhead = None;
        assert_eq!(pod_size(&h, &cfg).1, 256);
    }

    #[test]
    fn hostnames() {
        let meta = cri::PodSandboxMetadata {
            name: "web-0".into(),
            ..Default::default()
        };
        let mut cfg = cri::PodSandboxConfig::default();
        assert_eq!(pod_hostname(&cfg, &meta).unwrap(), "web-0");
        let long = cri::PodSandboxMetadata {
            name: format!("create-PodSandbox_{}-", "9".repeat(44)),
            ..Default::default()
        };
        assert_eq!(
            pod_hostname(&cfg, &long).unwrap(),
            format!("create-PodSandbox-{}", "9".repeat(44))
        );
        cfg.hostname = "bad_host".into();
        assert!(pod_hostname(&cfg, &meta)
            .unwrap_err()
            .message()
            .contains("config.hostname"));
    }

    #[test]
    fn pod_config_checks() {
        let mut cfg = cri::PodSandboxConfig::default();
        assert!(check_pod_config(&cfg)
            .unwrap_err()
            .message()
            .contains("config.metadata"));
        cfg.metadata = Some(cri::PodSandboxMetadata {
            name: "p".into(),
            uid: "u".into(),
            namespace: "".into(),
            attempt: 0,
        });
        assert!(check_pod_config(&cfg)
            .unwrap_err()
            .message()
            .contains("config.metadata.namespace"));
        cfg.metadata.as_mut().unwrap().namespace = "ns".into();
        cfg.log_directory = "relative".into();
        assert!(check_pod_config(&cfg)
            .unwrap_err()
            .message()
            .contains("log_directory"));
        cfg.log_directory = "/var/log/pods/x".into();
        cfg.dns_config = Some(cri::DnsConfig {
            servers: vec!["1.1.1.1\nnameserver 6.6.6.6".into()],
            ..Default::default()
        });
        assert!(check_pod_config(&cfg)
            .unwrap_err()
            .message()
            .contains("dns_config.servers"));
        cfg.dns_config = None;
        assert!(check_pod_config(&cfg).is_ok());
    }

    #[test]
    fn pod_files() {
        let d = tempfile::tempdir().unwrap();
        let cfg = cri::PodSandboxConfig {
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            ..Default::default()
        };
        let paths = SandboxPaths::new(d.path());
        husk_runtime::sandbox::share::create(&paths).unwrap();
        let r = write_pod_files(&paths, &cfg, "web-0");
        let read = |f: &str| std::fs::read_to_string(paths.share.join("pod").join(f));
        let resolv = read("resolv.conf");
        let hosts = read("hosts");
        // The guest may edit hosts only.
        let writable = ["hosts", "resolv.conf"]
            .map(|f| std::fs::write(paths.share.join("pod").join(f), "x").is_ok());
        let _ = husk_runtime::mounts::unmount_all_under(d.path());
        r.unwrap();
        assert_eq!(resolv.unwrap(), "nameserver 10.0.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n");
        assert!(hosts.unwrap().contains("web-0"));
        assert_eq!(writable, [true, false]);
    }
}
