//! The host side of pod networking: a network namespace per pod, the CNI
//! plugin chain run in it, and a tap joined to the CNI interface by tc
//! mirred redirects so that the VM's virtio-net stands in for that
//! interface (Kata's tc-mirred model).
//!
//! [`setup`] creates everything and returns a [`PodNetwork`], which the
//! caller persists; [`teardown`] takes it back down, also after a restart
//! or a crash half-way through setup. See docs/networking.md.

mod cni;
mod netns;
mod tap;

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use cni::{DnsConfig, PluginFailure};
pub use tap::{IngressRedirect, InspectResult};

/// The pod interface the CNI plugins create in the namespace.
pub const POD_IFNAME: &str = "eth0";
/// The tap inside the pod namespace that the VM's virtio-net uses.
pub const TAP_NAME: &str = "tap0_husk";

/// Where CNI configuration and plugins live, and where pod namespaces go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConfig {
    /// Network configurations (*.conflist, *.conf, *.json); the
    /// lexicographically first one is used.
    pub conf_dir: PathBuf,
    /// Plugin binaries, searched in order.
    pub bin_dirs: Vec<PathBuf>,
    /// Pod network namespaces are bind-mounted here, one file per pod id.
    pub netns_dir: PathBuf,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            netns_dir: "/run/husk/netns".into(),
        }
    }
}

/// A hostPort mapping for the portmap plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    pub container_port: u16,
    pub host_port: u16,
    /// Empty for all host addresses.
    pub host_ip: String,
}

/// What [`setup`] needs to know about the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetworkRequest {
    pub pod_id: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
    pub port_mappings: Vec<PortMapping>,
    /// Join a tap to the CNI interface for a VM's NIC; a host pod uses the
    /// interface itself.
    pub vm_nic: bool,
}

/// A route the guest should install.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// CIDR; "0.0.0.0/0" or "::/0" for a default route.
    pub destination: String,
    /// None for a link-scope route.
    pub gateway: Option<IpAddr>,
}

/// A set-up pod network: what the VM and the guest need, and everything
/// [`teardown`] needs after a huskd restart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PodNetwork {
    /// The bind-mounted namespace file.
    pub netns: PathBuf,
    /// The CNI network (conflist) name used.
    pub network_name: String,
    /// The CNI interface in the namespace ([`POD_IFNAME`]).
    pub ifname: String,
    /// The tap in the namespace for the VM ([`TAP_NAME`]; not created for
    /// a host pod, which uses the CNI interface itself).
    pub tap: String,
    /// The CNI interface's MAC, lower case "aa:bb:..": the guest NIC's MAC.
    pub mac: String,
    /// The CNI interface's MTU (the tap has the same).
    pub mtu: u32,
    /// The pod interface's addresses from the CNI result.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes for the guest: the result's, plus a default route through the
    /// IPAM gateway per family when the result has a gateway but no
    /// default route.
    pub routes: Vec<RouteSpec>,
    /// DNS from the CNI result (often empty).
    #[serde(default)]
    pub dns: DnsConfig,
    /// The port mappings given to ADD: portmap's DEL needs them again.
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// CNI_ARGS of ADD, repeated for DEL (plugins may key on the pod name).
    #[serde(default)]
    pub cni_args: String,
    /// The raw final CNI result: prevResult of DEL.
    pub cni_result: Value,
    /// The network configuration list used, so that DEL after a restart
    /// runs the same plugins even if the config directory changed.
    pub conflist_json: Value,
}

impl PodNetwork {
    /// The pod's IPs, IPv4 first, then IPv6 (CRI's PodIP, then PodIPs).
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let v4 = self.addresses.iter().map(|a| a.0).filter(IpAddr::is_ipv4);
        let v6 = self.addresses.iter().map(|a| a.0).filter(IpAddr::is_ipv6);
        v4.chain(v6).collect()
    }

    /// Opens the pod's tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) from inside
    /// its namespace and returns the fd: a VMM can take it directly
    /// (`-netdev tap,fd=N,vnet_hdr=on`) without entering the namespace. Each
    /// frame read or written carries a 10-byte virtio-net header.
    pub async fn open_tap(&self, pod_id: &str) -> Result<OwnedFd, NetworkError> {
        let tap = self.tap.clone();
        let err = |reason: String| NetworkError::Tap {
            pod_id: pod_id.to_string(),
            tap: self.tap.clone(),
            netns: self.netns.clone(),
            reason,
        };
        netns::run_in_netns(&self.netns, move || tap::open(&tap))
            .await
            .map_err(|e| err(format!("enter namespace: {e}")))?
            .map_err(|e| err(format!("open: {e}")))
    }

    /// The ingress qdiscs and mirred redirects on the CNI interface and the
    /// tap, read back from the kernel (for tests and diagnostics).
    pub async fn inspect(&self, pod_id: &str) -> Result<InspectResult, NetworkError> {
        let (ifname, tap) = (self.ifname.clone(), self.tap.clone());
        let err = |reason: String| NetworkError::Tap {
            pod_id: pod_id.to_string(),
            tap: self.tap.clone(),
            netns: self.netns.clone(),
            reason,
        };
        netns::run_in_netns(&self.netns, move || tap::inspect(&ifname, &tap))
            .await
            .map_err(|e| err(format!("enter namespace: {e}")))?
            .map_err(err)
    }
}

/// Pod networking failures. Every message names the pod.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod {pod_id:?}: the pod id cannot name a network namespace file: {why}")]
    InvalidPodId {
        pod_id: String,
        why: husk_proto::ids::IdError,
    },
    /// No configuration directory, or no config file in it: the node's
    /// network is not set up (yet).
    #[error("pod {pod_id}: no CNI network config in {}", dir.display())]
    NoConfig { pod_id: String, dir: PathBuf },
    #[error("pod {pod_id}: CNI network config {}: {reason}", path.display())]
    BadConfig {
        pod_id: String,
        path: PathBuf,
        reason: String,
    },
    #[error("pod {pod_id}: CNI plugin {plugin:?} (network {network}) not found in {dirs}")]
    PluginNotFound {
        pod_id: String,
        network: String,
        plugin: String,
        /// The directories searched, joined by ':'.
        dirs: String,
    },
    #[error(
        "pod {pod_id}: CNI {command} of plugin {plugin} (network {network}) failed: {failure}"
    )]
    Plugin {
        pod_id: String,
        network: String,
        plugin: String,
        command: &'static str,
        /// Boxed: keeps `Result<_, NetworkError>` small.
        failure: Box<PluginFailure>,
    },
    #[error("pod {pod_id}: CNI {command} of plugin {plugin} (network {network}) returned an unusable result: {reason}")]
    BadResult {
        pod_id: String,
        network: String,
        plugin: String,
        command: &'static str,
        reason: String,
    },
    #[error("pod {pod_id}: network namespace {}: {op}: {source}", path.display())]
    Netns {
        pod_id: String,
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod_id}: tap {tap} in network namespace {}: {reason}", netns.display())]
    Tap {
        pod_id: String,
        tap: String,
        netns: PathBuf,
        reason: String,
    },
}

impl NetworkError {
    /// True when the node has no usable CNI configuration: the network is
    /// not ready, rather than broken for this pod.
    pub fn is_not_configured(&self) -> bool {
        matches!(self, NetworkError::NoConfig { .. })
    }

    /// The plugin's CNI error code, for a plugin failure that carried one.
    pub fn cni_code(&self) -> Option<u64> {
        match self {
            NetworkError::Plugin { failure, .. } => failure.code(),
            _ => None,
        }
    }
}

/// Where the namespace of `pod_id` is bind-mounted.
/// At a clean exit: when no pod network is left, the netns directory's own
/// mount and the directory go too (a huskd with pods keeps them, as those
/// pods outlive it). Returns whether it released them.
pub fn release_netns_dir(cfg: &CniConfig) -> Result<bool, NetworkError> {
    netns::release_dir(&cfg.netns_dir).map_err(|e| NetworkError::Netns {
        pod_id: String::new(),
        path: cfg.netns_dir.clone(),
        op: "release the netns directory",
        source: e,
    })
}

pub fn netns_path(cfg: &CniConfig, pod_id: &str) -> PathBuf {
    cfg.netns_dir.join(pod_id)
}

/// Pod ids become file names (the namespace's bind mount).
fn check_pod_id(pod_id: &str) -> Result<(), NetworkError> {
    husk_proto::ids::validate(pod_id).map_err(|why| NetworkError::InvalidPodId {
        pod_id: pod_id.to_string(),
        why,
    })
}

fn load_config(cfg: &CniConfig, pod_id: &str) -> Result<cni::ConfList, NetworkError> {
    match cni::load(&cfg.conf_dir) {
        Ok((_, list)) => Ok(list),
        Err(cni::LoadError::NotFound) => Err(NetworkError::NoConfig {
            pod_id: pod_id.to_string(),
            dir: cfg.conf_dir.clone(),
        }),
        Err(cni::LoadError::Io(path, e)) => Err(NetworkError::BadConfig {
            pod_id: pod_id.to_string(),
            path,
            reason: e.to_string(),
        }),
        Err(cni::LoadError::Invalid(path, reason)) => Err(NetworkError::BadConfig {
            pod_id: pod_id.to_string(),
            path,
            reason,
        }),
    }
}

/// The name of the network pods would get now (for the runtime's
/// NetworkReady condition), or why there is none.
pub fn configured_network(cfg: &CniConfig) -> Result<String, NetworkError> {
    // No pod here; the error messages name "-" as the pod.
    load_config(cfg, "-").map(|l| l.name)
}

fn dirs_string(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Every plugin's binary, in list order; a missing one is an error before
/// anything is created.
fn resolve_plugins(
    cfg: &CniConfig,
    pod_id: &str,
    list: &cni::ConfList,
) -> Result<Vec<PathBuf>, NetworkError> {
    (0..list.plugins.len())
        .map(|i| {
            let ty = list.plugin_type(i);
            cni::find_plugin(&cfg.bin_dirs, ty).ok_or_else(|| NetworkError::PluginNotFound {
                pod_id: pod_id.to_string(),
                network: list.name.clone(),
                plugin: ty.to_string(),
                dirs: dirs_string(&cfg.bin_dirs),
            })
        })
        .collect()
}

/// Creates the pod's network namespace, runs CNI ADD in it, and joins a new
/// tap to the CNI interface with tc mirred redirects in both directions. On
/// failure, whatever it did is undone (CNI DEL, tap, namespace) before the
/// error is returned.
pub async fn setup(cfg: &CniConfig, req: &PodNetworkRequest) -> Result<PodNetwork, NetworkError> {
    let pod_id = req.pod_id.as_str();
    check_pod_id(pod_id)?;
    let started = Instant::now();
    let list = load_config(cfg, pod_id)?;
    let bins = resolve_plugins(cfg, pod_id, &list)?;
    let ns = netns_path(cfg, pod_id);
    netns::create(&cfg.netns_dir, &ns)
        .await
        .map_err(|source| NetworkError::Netns {
            pod_id: pod_id.to_string(),
            path: ns.clone(),
            op: "create",
            source,
        })?;
    let ns_done = started.elapsed();
    let cni_args = cni::k8s_cni_args(pod_id, &req.pod_name, &req.pod_namespace, &req.pod_uid);
    let pending = pending_path(cfg, pod_id);
    let rec = PendingDel {
        conflist_json: list.json.clone(),
        port_mappings: req.port_mappings.clone(),
        cni_args: cni_args.clone(),
    };
    if let Err(source) = write_pending(&pending, &rec) {
        let _ = netns::remove(&ns);
        return Err(NetworkError::Netns {
            pod_id: pod_id.to_string(),
            path: pending,
            op: "record the CNI DEL parameters",
            source,
        });
    }
    let inv = cni::Invocation {
        container_id: pod_id,
        netns: &ns,
        ifname: POD_IFNAME,
        cni_args,
        port_mappings: &req.port_mappings,
        bin_dirs: &cfg.bin_dirs,
    };
    let mut last_result: Option<Value> = None;
    let result = setup_in_netns(&list, &bins, &inv, req.vm_nic, &mut last_result).await;
    match result {
        Ok(net) => {
            tracing::info!(
                pod_id,
                network = %list.name,
                ips = ?net.pod_ips(),
                mac = %net.mac,
                ports = %cni::describe_ports(&req.port_mappings),
                netns_ms = ns_done.as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "pod network set up"
            );
            Ok(net)
        }
        Err(e) => {
            tracing::warn!(pod_id, error = %e, "pod network setup failed; undoing it");
            match netns::run_in_netns(&ns, || tap::unplumb(POD_IFNAME, TAP_NAME)).await {
                Ok(Ok(())) => {}
                Ok(Err(u)) => tracing::warn!(pod_id, error = %u, "undo: removing the tap failed"),
                Err(u) => tracing::warn!(pod_id, error = %u, "undo: entering the namespace failed"),
            }
            let del = cni_del(&list, &bins, &inv, last_result.as_ref()).await;
            if let Err(r) = netns::remove(&ns) {
                tracing::warn!(pod_id, netns = %ns.display(), error = %r, "undo: removing the namespace failed");
            }
            match del {
                Ok(()) => {
                    if let Err(r) = remove_file_if_exists(&pending) {
                        tracing::warn!(pod_id, error = %r, "undo: removing the CNI DEL record failed");
                    }
                }
                // The record stays: teardown(None) retries DEL from it.
                Err(d) => tracing::warn!(pod_id, error = %d, "undo: CNI DEL failed"),
            }
            Err(e)
        }
    }
}

async fn setup_in_netns(
    list: &cni::ConfList,
    bins: &[PathBuf],
    inv: &cni::Invocation<'_>,
    vm_nic: bool,
    last_result: &mut Option<Value>,
) -> Result<PodNetwork, NetworkError> {
    let pod_id = inv.container_id;
    for (i, bin) in bins.iter().enumerate() {
        let plugin = list.plugin_type(i).to_string();
        let stdin = cni::plugin_stdin(list, i, last_result.as_ref(), inv.port_mappings);
        let t = Instant::now();
        let out = cni::exec_plugin(bin, "ADD", inv, &stdin)
            .await
            .map_err(|failure| NetworkError::Plugin {
                pod_id: pod_id.to_string(),
                network: list.name.clone(),
                plugin: plugin.clone(),
                command: "ADD",
                failure: Box::new(failure),
            })?;
        tracing::debug!(
            pod_id,
            plugin,
            ms = t.elapsed().as_millis() as u64,
            "CNI ADD done"
        );
        let bad = |reason: String| NetworkError::BadResult {
            pod_id: pod_id.to_string(),
            network: list.name.clone(),
            plugin: plugin.clone(),
            command: "ADD",
            reason,
        };
        let v: Value =
            serde_json::from_slice(&out).map_err(|e| bad(format!("stdout is not JSON: {e}")))?;
        if !v.is_object() {
            return Err(bad("stdout is not a JSON object".into()));
        }
        *last_result = Some(v);
    }
    let final_result = last_result.clone().unwrap_or(Value::Null);
    let last_plugin = list.plugin_type(list.plugins.len() - 1).to_string();
    let parsed =
        cni::parse_result(&final_result, POD_IFNAME).map_err(|reason| NetworkError::BadResult {
            pod_id: pod_id.to_string(),
            network: list.name.clone(),
            plugin: last_plugin,
            command: "ADD",
            reason,
        })?;
    let tap_err = |reason: String| NetworkError::Tap {
        pod_id: pod_id.to_string(),
        tap: TAP_NAME.to_string(),
        netns: inv.netns.to_path_buf(),
        reason,
    };
    let plumbed = netns::run_in_netns(inv.netns, move || {
        if vm_nic {
            tap::plumb(POD_IFNAME, TAP_NAME)
        } else {
            tap::describe(POD_IFNAME)
        }
    })
    .await
    .map_err(|e| tap_err(format!("enter namespace: {e}")))?
    .map_err(tap_err)?;
    if let Some(m) = &parsed.mac {
        if *m != plumbed.mac {
            // The kernel is authoritative: it is what the bridge learned.
            tracing::warn!(pod_id, result_mac = %m, eth0_mac = %plumbed.mac, "CNI result MAC differs from the interface's");
        }
    }
    Ok(PodNetwork {
        netns: inv.netns.to_path_buf(),
        network_name: list.name.clone(),
        ifname: POD_IFNAME.to_string(),
        tap: TAP_NAME.to_string(),
        mac: plumbed.mac,
        mtu: plumbed.mtu,
        addresses: parsed.addresses,
        routes: parsed.routes,
        dns: parsed.dns,
        port_mappings: inv.port_mappings.to_vec(),
        cni_args: inv.cni_args.clone(),
        cni_result: final_result,
        conflist_json: list.json.clone(),
    })
}

/// CNI DEL through the whole list in reverse. Every plugin is called even
/// if one fails; the first real failure is returned. Error code 3 ("container
/// unknown or does not exist") means there is nothing to clean up.
async fn cni_del(
    list: &cni::ConfList,
    bins: &[PathBuf],
    inv: &cni::Invocation<'_>,
    prev_result: Option<&Value>,
) -> Result<(), NetworkError> {
    let pod_id = inv.container_id;
    let prev = prev_result.filter(|_| cni::del_takes_prev_result(&list.cni_version));
    let mut first_err = None;
    for i in (0..list.plugins.len()).rev() {
        let plugin = list.plugin_type(i).to_string();
        let stdin = cni::plugin_stdin(list, i, prev, inv.port_mappings);
        let res = cni::exec_plugin(&bins[i], "DEL", inv, &stdin).await;
        match res {
            Ok(_) => {}
            Err(failure) => {
                let e = NetworkError::Plugin {
                    pod_id: pod_id.to_string(),
                    network: list.name.clone(),
                    plugin,
                    command: "DEL",
                    failure: Box::new(failure),
                };
                if e.cni_code() == Some(3) {
                    tracing::info!(pod_id, error = %e, "CNI DEL: already gone");
                } else {
                    tracing::warn!(pod_id, error = %e, "CNI DEL failed");
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// What DEL needs, written next to the namespace before ADD runs, so that
/// a teardown after a crash in the middle of setup (no [`PodNetwork`]
/// persisted) still runs DEL with the same configuration and port mappings
/// that ADD had.
#[derive(Serialize, Deserialize)]
struct PendingDel {
    conflist_json: Value,
    port_mappings: Vec<PortMapping>,
    cni_args: String,
}

fn pending_path(cfg: &CniConfig, pod_id: &str) -> PathBuf {
    cfg.netns_dir.join(".cni").join(format!("{pod_id}.json"))
}

fn write_pending(path: &Path, rec: &PendingDel) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let data = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
    Ok(crate::files::write_atomic(path, &data)?)
}

fn read_pending(path: &Path) -> Option<PendingDel> {
    let data = std::fs::read(path).ok()?;
    match serde_json::from_slice(&data) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable CNI DEL record");
            None
        }
    }
}

fn remove_file_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Takes the pod network down: the tap and its filters, CNI DEL (releasing
/// IPAM addresses and portmap rules), the namespace mount and file.
///
/// Idempotent: a second call succeeds. With `net` None (setup crashed before
/// the result was persisted) but a namespace left for `pod_id`, DEL runs
/// best-effort with the configuration setup recorded before ADD (or today's
/// configuration if there is no record), and the namespace is removed. With
/// `net` Some, a real DEL failure is returned after everything else has been
/// removed; a retry runs DEL again (without a namespace, which plugins
/// accept).
pub async fn teardown(
    cfg: &CniConfig,
    pod_id: &str,
    net: Option<&PodNetwork>,
) -> Result<(), NetworkError> {
    check_pod_id(pod_id)?;
    let started = Instant::now();
    let ns = net
        .map(|n| n.netns.clone())
        .unwrap_or_else(|| netns_path(cfg, pod_id));
    let live = netns::is_netns(&ns);
    if live {
        let (ifname, tapname) = net
            .map(|n| (n.ifname.clone(), n.tap.clone()))
            .unwrap_or_else(|| (POD_IFNAME.to_string(), TAP_NAME.to_string()));
        match netns::run_in_netns(&ns, move || tap::unplumb(&ifname, &tapname)).await {
            Ok(Ok(())) => {}
            // Removing the namespace below takes the links with it.
            Ok(Err(e)) => tracing::warn!(pod_id, error = %e, "removing the tap failed"),
            Err(e) => tracing::warn!(pod_id, error = %e, "entering the pod namespace failed"),
        }
    }
    // Plugins skip their in-namespace work for an empty CNI_NETNS.
    let empty = PathBuf::new();
    let inv_netns: &Path = if live { &ns } else { &empty };
    let pending = pending_path(cfg, pod_id);
    let mut first_err = None;
    match net {
        Some(n) => {
            let list = cni::ConfList::from_json(n.conflist_json.clone()).map_err(|reason| {
                NetworkError::BadConfig {
                    pod_id: pod_id.to_string(),
                    path: PathBuf::from("<persisted pod network>"),
                    reason,
                }
            });
            match list.and_then(|l| resolve_plugins(cfg, pod_id, &l).map(|b| (l, b))) {
                Ok((list, bins)) => {
                    let inv = cni::Invocation {
                        container_id: pod_id,
                        netns: inv_netns,
                        ifname: &n.ifname,
                        cni_args: n.cni_args.clone(),
                        port_mappings: &n.port_mappings,
                        bin_dirs: &cfg.bin_dirs,
                    };
                    if let Err(e) = cni_del(&list, &bins, &inv, Some(&n.cni_result)).await {
                        first_err = Some(e);
                    }
                }
                Err(e) => first_err = Some(e),
            }
        }
        None => {
            let rec = read_pending(&pending);
            if rec.is_some() || live || ns.exists() {
                // An interrupted setup: IPAM may hold an address and portmap
                // rules may exist. Failures are only logged, because ADD may
                // never have run.
                let source = match rec {
                    Some(r) => cni::ConfList::from_json(r.conflist_json)
                        .map(|l| (l, r.port_mappings, r.cni_args))
                        .map_err(|reason| NetworkError::BadConfig {
                            pod_id: pod_id.to_string(),
                            path: pending.clone(),
                            reason,
                        }),
                    None => load_config(cfg, pod_id)
                        .map(|l| (l, Vec::new(), cni::k8s_cni_args(pod_id, "", "", ""))),
                };
                match source
                    .and_then(|(l, p, a)| resolve_plugins(cfg, pod_id, &l).map(|b| (l, b, p, a)))
                {
                    Ok((list, bins, ports, cni_args)) => {
                        let inv = cni::Invocation {
                            container_id: pod_id,
                            netns: inv_netns,
                            ifname: POD_IFNAME,
                            cni_args,
                            port_mappings: &ports,
                            bin_dirs: &cfg.bin_dirs,
                        };
                        if let Err(e) = cni_del(&list, &bins, &inv, None).await {
                            tracing::warn!(pod_id, error = %e, "best-effort CNI DEL after an interrupted setup failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(pod_id, error = %e, "no CNI DEL after an interrupted setup")
                    }
                }
            }
        }
    }
    if let Err(source) = netns::remove(&ns) {
        first_err.get_or_insert(NetworkError::Netns {
            pod_id: pod_id.to_string(),
            path: ns.clone(),
            op: "remove",
            source,
        });
    }
    // Kept until DEL succeeded, so that a retry after a failed DEL still
    // has it.
    if first_err.is_none() {
        if let Err(e) = remove_file_if_exists(&pending) {
            tracing::warn!(pod_id, path = %pending.display(), error = %e, "removing the CNI DEL record failed");
        }
    }
    tracing::info!(
        pod_id,
        ms = started.elapsed().as_millis() as u64,
        ok = first_err.is_none(),
        "pod network torn down"
    );
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ids_are_file_names() {
        assert!(check_pod_id("4f2a9c").is_ok());
        assert!(check_pod_id("a.b-c_d").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(check_pod_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pod_ips_put_v4_first() {
        let n = PodNetwork {
            netns: "/x".into(),
            network_name: "n".into(),
            ifname: POD_IFNAME.into(),
            tap: TAP_NAME.into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            mtu: 1500,
            addresses: vec![
                ("fd00::2".parse().unwrap(), 64),
                ("10.0.0.2".parse().unwrap(), 24),
            ],
            routes: vec![],
            dns: DnsConfig::default(),
            port_mappings: vec![],
            cni_args: String::new(),
            cni_result: Value::Null,
            conflist_json: Value::Null,
        };
        assert_eq!(
            n.pod_ips(),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
    }

    #[test]
    fn not_configured_is_recognisable() {
        let cfg = CniConfig {
            conf_dir: "/nonexistent/cni".into(),
            ..CniConfig::default()
        };
        let e = configured_network(&cfg).unwrap_err();
        assert!(e.is_not_configured());
        assert_eq!(
            e.to_string(),
            "pod -: no CNI network config in /nonexistent/cni"
        );
    }
}
