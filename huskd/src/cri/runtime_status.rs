//! Version, Status, RuntimeConfig and UpdateRuntimeConfig: what the
//! runtime is and whether it can run pods.

use std::collections::HashMap;

use husk_runtime::network;
use k8s_cri::v1 as cri;
use tonic::Status;

use super::Husk;

pub(super) async fn version(
    _h: &Husk,
    _req: cri::VersionRequest,
) -> Result<cri::VersionResponse, Status> {
    Ok(cri::VersionResponse {
        version: "0.1.0".into(),
        runtime_name: super::RUNTIME_NAME.into(),
        runtime_version: env!("CARGO_PKG_VERSION").into(),
        runtime_api_version: super::CRI_API_VERSION.into(),
    })
}

pub(super) async fn status(
    h: &Husk,
    req: cri::StatusRequest,
) -> Result<cri::StatusResponse, Status> {
    Ok(runtime_status(h, req.verbose))
}

/// kubelet sends the node's pod CIDR here. Pod addresses come from the
/// CNI configuration's IPAM (as with containerd's CNI setup), so there is
/// nothing to apply.
pub(super) async fn update_runtime_config(
    _h: &Husk,
    _req: cri::UpdateRuntimeConfigRequest,
) -> Result<cri::UpdateRuntimeConfigResponse, Status> {
    Ok(cri::UpdateRuntimeConfigResponse {})
}

/// The guest runs cgroup v2 under its own systemd-less agent; kubelet asks
/// which driver to use for the host, where husk creates no per-container
/// cgroups.
pub(super) async fn runtime_config(
    _h: &Husk,
    _req: cri::RuntimeConfigRequest,
) -> Result<cri::RuntimeConfigResponse, Status> {
    Ok(cri::RuntimeConfigResponse {
        linux: Some(cri::LinuxRuntimeConfiguration {
            cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
        }),
    })
}

/// The Status response: runtime readiness with the hypervisor and why it
/// was chosen, network readiness, and the handlers.
pub fn runtime_status(h: &Husk, verbose: bool) -> cri::StatusResponse {
    let usable: Vec<&str> = h
        .handlers
        .values()
        .filter(|x| x.hypervisor.is_ok())
        .map(|x| x.name.as_str())
        .collect();
    let default_ok = h
        .handlers
        .get(crate::config::DEFAULT_HANDLER)
        .is_some_and(|x| x.hypervisor.is_ok());
    let runtime_ready = default_ok && h.virtiofsd.is_ok();
    let hv_desc = h
        .handlers
        .get(crate::config::DEFAULT_HANDLER)
        .map(|x| match &x.hypervisor {
            Ok(hv) => hv.description().to_string(),
            Err(e) => format!("unavailable: {e}"),
        })
        .unwrap_or_default();
    let runtime_msg = if runtime_ready {
        hv_desc.clone()
    } else if let Err(e) = &h.virtiofsd {
        format!("{e}; hypervisor: {hv_desc}")
    } else {
        format!("hypervisor {hv_desc}")
    };
    let conditions = vec![
        cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: runtime_ready,
            reason: if runtime_ready {
                "Hypervisor".into()
            } else {
                "HypervisorUnavailable".into()
            },
            message: runtime_msg,
        },
        match network::configured_network(&h.cni) {
            Ok(name) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: "CniConfigured".into(),
                message: format!("CNI network {name:?}"),
            },
            // kubelet's own reason for this state, as containerd reports it.
            Err(e) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: e.to_string(),
            },
        },
    ];
    let mut runtime_handlers: Vec<cri::RuntimeHandler> = h
        .handlers
        .values()
        .map(|x| cri::RuntimeHandler {
            name: x.name.clone(),
            features: Some(cri::RuntimeHandlerFeatures {
                recursive_read_only_mounts: false,
                user_namespaces: false,
            }),
        })
        .collect();
    // "" names the default handler.
    runtime_handlers.push(cri::RuntimeHandler {
        name: String::new(),
        features: Some(cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: false,
            user_namespaces: false,
        }),
    });
    let mut info = HashMap::new();
    if verbose {
        let handlers: serde_json::Map<String, serde_json::Value> = h
            .handlers
            .values()
            .map(|x| {
                (
                    x.name.clone(),
                    serde_json::json!({
                        "hypervisor": match &x.hypervisor { Ok(hv) => hv.description().to_string(), Err(e) => format!("unavailable: {e}") },
                        // Where its pods that share a host namespace go.
                        "hostNamespaces": if x.config.is_host_only() {
                            "host (all pods)".to_string()
                        } else {
                            match (x.config.host_namespaces, &x.host) {
                                (crate::config::HostNamespacesPolicy::Refuse, _) => "refuse".to_string(),
                                (_, Ok(_)) => "host".to_string(),
                                (_, Err(e)) => format!("host, unavailable: {e}"),
                            }
                        },
                        "vcpus": x.config.vcpus,
                        "memoryMiB": x.config.memory_mib,
                        "kernel": x.config.kernel,
                        "initrd": x.config.initrd,
                    }),
                )
            })
            .collect();
        let v = serde_json::json!({
            "accel": h.probe.accel.as_str(),
            // The default handler's backend says why it was chosen in its
            // own words (the probe's reason is QEMU's wording).
            "accelReason": h
                .handlers
                .get(crate::config::DEFAULT_HANDLER)
                .and_then(|x| x.hypervisor.as_ref().ok())
                .map_or(h.probe.reason.as_str(), |hv| hv.description()),
            "usableHandlers": usable,
            "handlers": handlers,
            "virtiofsd": match &h.virtiofsd { Ok(p) => p.display().to_string(), Err(e) => e.to_string() },
            "root": h.config.root,
            "state": h.config.state,
        });
        info.insert("info".to_string(), v.to_string());
    }
    cri::StatusResponse {
        status: Some(cri::RuntimeStatus { conditions }),
        info,
        runtime_handlers,
        features: Some(cri::RuntimeFeatures {
            supplemental_groups_policy: false,
        }),
    }
}
