//! The CRI side of pod networking: what a pod config asks of the network,
//! and how a CNI result becomes the VM's NIC and the guest's configuration.
//!
//! The host plumbing itself (network namespace, CNI plugins, tap and tc
//! redirect) lives in [`husk_runtime::network`].

use std::time::Duration;

use husk_proto::agent::{self as agent_proto, NetworkConfig};
use k8s_cri::v1 as cri;
use tonic::Status;

use husk_runtime::hypervisor::NetDeviceConfig;
use husk_runtime::network::{NetworkError, PodNetwork, PodNetworkRequest, PortMapping};
use husk_runtime::sandbox::SandboxNetwork;

/// The guest's name for its pod interface.
const GUEST_IFNAME: &str = "eth0";

/// The host namespaces a pod asks for (`NODE` in its namespace options):
/// such a pod cannot be a VM, which has its own kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostNamespaces {
    pub network: bool,
    pub pid: bool,
    pub ipc: bool,
}

impl HostNamespaces {
    pub fn of(config: &cri::PodSandboxConfig) -> Self {
        let n = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref());
        let node = |mode: Option<i32>| mode == Some(cri::NamespaceMode::Node as i32);
        Self {
            network: node(n.map(|n| n.network)),
            pid: node(n.map(|n| n.pid)),
            ipc: node(n.map(|n| n.ipc)),
        }
    }

    pub fn any(&self) -> bool {
        self.network || self.pid || self.ipc
    }

    /// The request's field naming the first host namespace asked for.
    pub fn field(&self) -> &'static str {
        if self.network {
            "config.linux.security_context.namespace_options.network: NODE (hostNetwork)"
        } else if self.pid {
            "config.linux.security_context.namespace_options.pid: NODE (hostPID)"
        } else {
            "config.linux.security_context.namespace_options.ipc: NODE (hostIPC)"
        }
    }
}

/// The CNI request for a pod: its identity and port mappings.
pub fn request(pod_id: &str, config: &cri::PodSandboxConfig) -> Result<PodNetworkRequest, Status> {
    let meta = config.metadata.clone().unwrap_or_default();
    let mut port_mappings = Vec::new();
    for (i, pm) in config.port_mappings.iter().enumerate() {
        // kubelet sends container ports without a host port too; only
        // hostPort mappings concern the portmap plugin (containerd skips
        // the others the same way).
        if pm.host_port <= 0 {
            continue;
        }
        let field = |f: &str| format!("config.port_mappings[{i}].{f}");
        let port = |f: &str, v: i32| {
            u16::try_from(v)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| Status::invalid_argument(format!("{}: {v} is not a port", field(f))))
        };
        let protocol = match cri::Protocol::try_from(pm.protocol) {
            Ok(cri::Protocol::Tcp) => "tcp",
            Ok(cri::Protocol::Udp) => "udp",
            Ok(cri::Protocol::Sctp) => "sctp",
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "{}: {} is not a protocol",
                    field("protocol"),
                    pm.protocol
                )))
            }
        };
        if !pm.host_ip.is_empty() && pm.host_ip.parse::<std::net::IpAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "{}: {:?} is not an IP address",
                field("host_ip"),
                pm.host_ip
            )));
        }
        port_mappings.push(PortMapping {
            protocol: protocol.into(),
            container_port: port("container_port", pm.container_port)?,
            host_port: port("host_port", pm.host_port)?,
            host_ip: pm.host_ip.clone(),
        });
    }
    Ok(PodNetworkRequest {
        pod_id: pod_id.into(),
        pod_name: meta.name,
        pod_namespace: meta.namespace,
        pod_uid: meta.uid,
        port_mappings,
        vm_nic: true,
    })
}

/// The VM's NIC and the guest configuration for a set-up pod network. The
/// guest interface takes the CNI interface's MAC, so that what the CNI
/// plugins (bridge FDB, ARP entries, anti-spoofing rules) learned about the
/// pod stays true once the tc redirect puts the VM behind it.
pub fn sandbox_network(net: &PodNetwork, setup_time: Duration) -> SandboxNetwork {
    let addresses = net
        .addresses
        .iter()
        .map(|(ip, prefix)| agent_proto::IpAddress {
            address: ip.to_string(),
            prefix_len: u32::from(*prefix),
        })
        .collect();
    let routes = net
        .routes
        .iter()
        .map(|r| agent_proto::Route {
            destination: r.destination.clone(),
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
            device: GUEST_IFNAME.into(),
        })
        .collect();
    SandboxNetwork {
        device: NetDeviceConfig {
            netns: net.netns.clone(),
            tap: net.tap.clone(),
            mac: net.mac.clone(),
        },
        guest: NetworkConfig {
            interfaces: vec![agent_proto::Interface {
                mac: net.mac.clone(),
                name: GUEST_IFNAME.into(),
                mtu: net.mtu,
                addresses,
            }],
            routes,
        },
        setup_time,
    }
}

/// The CRI status of a network failure: a missing configuration means the
/// node's network is not ready yet (kubelet waits for it), the rest is the
/// plugins' failure.
pub fn network_error(pod_id: &str, e: &NetworkError) -> Status {
    let msg = format!("pod {pod_id}: setting up the pod network: {e}");
    if e.is_not_configured() {
        Status::failed_precondition(msg)
    } else {
        Status::internal(msg)
    }
}

/// CNI DEL and the namespace, tap and filters gone. Never fails: a network
/// that cannot be released is logged, and RemovePodSandbox (or the next
/// huskd start) tries again; CNI DEL is idempotent.
pub(super) async fn release_network(h: &super::Husk, pod_id: &str, net: Option<&PodNetwork>) {
    if let Err(e) = husk_runtime::network::teardown(&h.cni, pod_id, net).await {
        tracing::error!(error = %e, "releasing the pod network");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(network: cri::NamespaceMode, ports: Vec<cri::PortMapping>) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                namespace: "default".into(),
                uid: "u1".into(),
                attempt: 0,
            }),
            port_mappings: ports,
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: network as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn host_namespaces_are_read_and_named() {
        let h = HostNamespaces::of(&pod(cri::NamespaceMode::Node, vec![]));
        assert!(h.network && !h.pid && !h.ipc && h.any());
        assert!(h.field().contains("namespace_options.network"));
        assert!(!HostNamespaces::of(&pod(cri::NamespaceMode::Pod, vec![])).any());
        assert!(!HostNamespaces::of(&cri::PodSandboxConfig::default()).any());
        let pid = HostNamespaces {
            pid: true,
            ..Default::default()
        };
        assert!(pid.field().contains("namespace_options.pid"));
    }

    #[test]
    fn only_host_port_mappings_reach_cni() {
        let pm = |proto: cri::Protocol, c: i32, h: i32, ip: &str| cri::PortMapping {
            protocol: proto as i32,
            container_port: c,
            host_port: h,
            host_ip: ip.into(),
        };
        let r = request(
            "p1",
            &pod(
                cri::NamespaceMode::Pod,
                vec![
                    pm(cri::Protocol::Tcp, 80, 8080, ""),
                    pm(cri::Protocol::Tcp, 443, 0, ""),
                    pm(cri::Protocol::Udp, 53, 5353, "127.0.0.1"),
                ],
            ),
        )
        .unwrap();
        assert_eq!(r.pod_name, "web");
        assert_eq!(r.pod_namespace, "default");
        assert_eq!(r.pod_uid, "u1");
        assert_eq!(r.port_mappings.len(), 2);
        assert_eq!(r.port_mappings[0].protocol, "tcp");
        assert_eq!(r.port_mappings[0].host_port, 8080);
        assert_eq!(r.port_mappings[1].protocol, "udp");
        assert_eq!(r.port_mappings[1].host_ip, "127.0.0.1");

        for (bad, field) in [
            (pm(cri::Protocol::Tcp, 0, 8080, ""), "container_port"),
            (pm(cri::Protocol::Tcp, 80, 70000, ""), "host_port"),
            (pm(cri::Protocol::Tcp, 80, 8080, "nope"), "host_ip"),
        ] {
            let e = request("p1", &pod(cri::NamespaceMode::Pod, vec![bad])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().contains(&format!("port_mappings[0].{field}")),
                "{e}"
            );
        }
    }
}
