//! CNI: loading the network configuration the way libcni/containerd do,
//! running the plugin chain (ADD in order, DEL in reverse) and reading the
//! final result.
//!
//! Written against the CNI spec (0.3.x to 1.1.0 results) rather than
//! through a crate: the few Rust CNI crates found target writing plugins,
//! not invoking them, and the runtime side is small.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use super::{PortMapping, RouteSpec};

/// How long one plugin invocation may take. portmap waits for the xtables
/// lock, so this is generous; a hung plugin must not hang the pod forever.
pub(crate) const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Result versions whose shape (interfaces, ips with an interface index,
/// routes, dns) this module understands.
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A network configuration list as the plugins get it, normalised from a
/// .conflist, or from a single .conf wrapped into a one-plugin list.
#[derive(Debug, Clone)]
pub(crate) struct ConfList {
    pub name: String,
    pub cni_version: String,
    /// Each plugin's own configuration object (has at least "type").
    pub plugins: Vec<Map<String, Value>>,
    /// The list as JSON, what [`super::PodNetwork::conflist_json`] keeps.
    pub json: Value,
}

impl ConfList {
    /// Validates a conflist JSON object (as loaded, or as persisted).
    pub(crate) fn from_json(json: Value) -> Result<Self, String> {
        let obj = json
            .as_object()
            .ok_or("the network configuration is not a JSON object")?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("missing \"name\"")?
            .to_string();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or("missing \"cniVersion\"")?
            .to_string();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(format!(
                "cniVersion {cni_version:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ));
        }
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or("missing \"plugins\" list")?;
        if plugins.is_empty() {
            return Err("the \"plugins\" list is empty".into());
        }
        let mut out = Vec::with_capacity(plugins.len());
        for (i, p) in plugins.iter().enumerate() {
            let p = p
                .as_object()
                .ok_or_else(|| format!("plugins[{i}] is not an object"))?;
            let ty = p
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("plugins[{i}] has no \"type\""))?;
            // The type names a file in the plugin directories.
            if ty.is_empty() || ty.contains('/') || ty == "." || ty == ".." {
                return Err(format!("plugins[{i}]: invalid type {ty:?}"));
            }
            out.push(p.clone());
        }
        Ok(Self {
            name,
            cni_version,
            plugins: out,
            json,
        })
    }

    /// Wraps a single plugin configuration (.conf) into a list, as libcni's
    /// ConfListFromConf does: name and cniVersion move to the list.
    fn from_single_conf(conf: Value) -> Result<Self, String> {
        let mut obj = match conf {
            Value::Object(o) => o,
            _ => return Err("the network configuration is not a JSON object".into()),
        };
        if !obj.contains_key("type") {
            return Err("missing \"type\"".into());
        }
        let name = obj.remove("name").unwrap_or(Value::Null);
        let version = obj.remove("cniVersion").unwrap_or(Value::Null);
        let list = serde_json::json!({
            "cniVersion": version,
            "name": name,
            "plugins": [Value::Object(obj)],
        });
        Self::from_json(list)
    }

    pub(crate) fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Why no configuration could be loaded.
#[derive(Debug)]
pub(crate) enum LoadError {
    /// No config directory, or no *.conflist/*.conf/*.json in it.
    NotFound,
    Io(PathBuf, std::io::Error),
    Invalid(PathBuf, String),
}

/// The config files libcni considers, in the order it considers them.
fn conf_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LoadError::NotFound),
        Err(e) => return Err(LoadError::Io(dir.to_path_buf(), e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::Io(dir.to_path_buf(), e))?;
        let path = entry.path();
        let ext_ok = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "conflist" | "conf" | "json"));
        // Follows symlinks (config managers often link files in).
        if ext_ok && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads the lexicographically first network configuration in `dir`, the
/// one containerd's CRI plugin uses by default.
pub(crate) fn load(dir: &Path) -> Result<(PathBuf, ConfList), LoadError> {
    let files = conf_files(dir)?;
    let path = files.into_iter().next().ok_or(LoadError::NotFound)?;
    let data = std::fs::read(&path).map_err(|e| LoadError::Io(path.clone(), e))?;
    let json: Value = serde_json::from_slice(&data)
        .map_err(|e| LoadError::Invalid(path.clone(), format!("not JSON: {e}")))?;
    let is_list = path.extension().is_some_and(|e| e == "conflist")
        // A .json file may hold either form; a list is recognised by its
        // plugins array (libcni treats .json like .conf, which fails on a
        // list; accepting it is the friendlier reading).
        || (json.get("plugins").is_some() && json.get("type").is_none());
    let list = if is_list {
        ConfList::from_json(json)
    } else {
        ConfList::from_single_conf(json)
    }
    .map_err(|e| LoadError::Invalid(path.clone(), e))?;
    Ok((path, list))
}

/// Orders CNI versions ("0.4.0" < "1.0.0"); unparsable parts count as 0.
fn version_at_least(v: &str, min: (u32, u32, u32)) -> bool {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let t = (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    );
    t >= min
}

/// What the runtime passes to each plugin besides its configuration.
pub(crate) struct Invocation<'a> {
    pub container_id: &'a str,
    /// Empty when the namespace is already gone (DEL after a crash).
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub cni_args: String,
    pub port_mappings: &'a [PortMapping],
    pub bin_dirs: &'a [PathBuf],
}

/// CNI_ARGS as kubelet-era runtimes pass them.
pub(crate) fn k8s_cni_args(pod_id: &str, name: &str, namespace: &str, uid: &str) -> String {
    // ';' and '=' separate the pairs; a value containing them would corrupt
    // the list, and Kubernetes names never contain them.
    let clean = |s: &str| s.replace([';', '='], "_");
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        clean(namespace),
        clean(name),
        clean(pod_id),
        clean(uid)
    )
}

/// The stdin of one plugin: its own configuration plus what libcni injects.
pub(crate) fn plugin_stdin(
    list: &ConfList,
    i: usize,
    prev_result: Option<&Value>,
    port_mappings: &[PortMapping],
) -> Value {
    let mut conf = list.plugins[i].clone();
    conf.insert("name".into(), Value::String(list.name.clone()));
    conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    match prev_result {
        Some(prev) => {
            conf.insert("prevResult".into(), prev.clone());
        }
        None => {
            conf.remove("prevResult");
        }
    }
    let wants_ports = conf
        .get("capabilities")
        .and_then(|c| c.get("portMappings"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if wants_ports {
        let maps: Vec<Value> = port_mappings
            .iter()
            .map(|p| {
                serde_json::json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol,
                    "hostIP": p.host_ip,
                })
            })
            .collect();
        let rc = conf
            .entry("runtimeConfig")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(rc) = rc {
            rc.insert("portMappings".into(), Value::Array(maps));
        }
    }
    Value::Object(conf)
}

/// A plugin's failure, as much of it as the plugin told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginFailure {
    /// The plugin exited non-zero with a CNI error object on stdout.
    Cni {
        code: u64,
        msg: String,
        details: String,
        stderr: String,
    },
    /// The plugin exited non-zero without a parsable CNI error.
    Exit { status: String, stderr: String },
    /// It could not be started.
    Spawn(String),
    /// It did not finish in time and was killed.
    Timeout(Duration),
}

impl PluginFailure {
    /// The CNI error code, if the plugin gave one.
    pub fn code(&self) -> Option<u64> {
        match self {
            PluginFailure::Cni { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stderr = |f: &mut fmt::Formatter<'_>, s: &str| {
            let s = s.trim();
            if s.is_empty() {
                Ok(())
            } else {
                write!(f, "; stderr: {s}")
            }
        };
        match self {
            PluginFailure::Cni {
                code,
                msg,
                details,
                stderr: err,
            } => {
                write!(f, "CNI error {code}: {msg}")?;
                if !details.is_empty() {
                    write!(f, ": {details}")?;
                }
                stderr(f, err)
            }
            PluginFailure::Exit {
                status,
                stderr: err,
            } => {
                write!(f, "exited with {status} without a CNI error")?;
                stderr(f, err)
            }
            PluginFailure::Spawn(e) => write!(f, "could not be started: {e}"),
            PluginFailure::Timeout(d) => {
                write!(f, "killed after {} s without finishing", d.as_secs())
            }
        }
    }
}

/// Finds a plugin binary: the first executable file named `ty` in the
/// directories, in order.
pub(crate) fn find_plugin(bin_dirs: &[PathBuf], ty: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    bin_dirs.iter().map(|d| d.join(ty)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Runs one plugin; on success returns its stdout.
pub(crate) async fn exec_plugin(
    bin: &Path,
    command: &str,
    inv: &Invocation<'_>,
    stdin: &Value,
) -> Result<Vec<u8>, PluginFailure> {
    let cni_path = std::env::join_paths(inv.bin_dirs)
        .map_err(|e| PluginFailure::Spawn(format!("bin_dirs: {e}")))?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.netns)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_ARGS", &inv.cni_args)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // portmap and friends look up iptables through PATH; a daemon started
    // with an empty environment would otherwise fail in the plugin.
    if std::env::var_os("PATH").is_none() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| PluginFailure::Spawn(e.to_string()))?;
    let data = serde_json::to_vec(stdin).map_err(|e| PluginFailure::Spawn(e.to_string()))?;
    let mut pipe = child.stdin.take();
    let run = async {
        let write = async {
            if let Some(p) = pipe.as_mut() {
                // A plugin that exits without reading stdin closes the pipe;
                // its exit status tells the real story.
                let _ = p.write_all(&data).await;
            }
            drop(pipe);
        };
        let (_, out) = tokio::join!(write, child.wait_with_output());
        out
    };
    let out = tokio::time::timeout(PLUGIN_TIMEOUT, run)
        .await
        .map_err(|_| PluginFailure::Timeout(PLUGIN_TIMEOUT))?
        .map_err(|e| PluginFailure::Spawn(e.to_string()))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    #[derive(Deserialize)]
    struct CniErr {
        code: u64,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    match serde_json::from_slice::<CniErr>(&out.stdout) {
        Ok(e) => Err(PluginFailure::Cni {
            code: e.code,
            msg: e.msg,
            details: e.details,
            stderr,
        }),
        Err(_) => {
            let mut stderr = stderr;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !stdout.trim().is_empty() {
                stderr = format!("{} (stdout: {})", stderr.trim(), stdout.trim());
            }
            Err(PluginFailure::Exit {
                status: out.status.to_string(),
                stderr,
            })
        }
    }
}

/// Whether DEL gets the cached result as prevResult (CNI >= 0.4.0).
pub(crate) fn del_takes_prev_result(version: &str) -> bool {
    version_at_least(version, (0, 4, 0))
}

// ---- results ----

#[derive(Debug, Deserialize)]
struct RawResult {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    #[serde(default)]
    ips: Vec<RawIp>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    dns: DnsConfig,
}

#[derive(Debug, Deserialize)]
struct RawInterface {
    name: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Debug, Deserialize)]
struct RawIp {
    address: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    interface: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct RawRoute {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
}

/// DNS settings from the CNI result (often empty: kubelet sends the pod's
/// DNS config through CRI instead).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// What the guest needs from a CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedResult {
    /// The MAC the result reports for the pod interface, if any.
    pub mac: Option<String>,
    pub addresses: Vec<(IpAddr, u8)>,
    pub routes: Vec<RouteSpec>,
    pub dns: DnsConfig,
}

/// Parses "addr/len", checking the prefix length against the family.
pub(crate) fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not in CIDR form"))?;
    let ip: IpAddr = a.parse().map_err(|_| format!("{s:?}: bad address"))?;
    let len: u8 = l.parse().map_err(|_| format!("{s:?}: bad prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{s:?}: prefix length over {max}"));
    }
    Ok((ip, len))
}

/// Reads a final CNI result (0.3.0 .. 1.1.0) for the interface `ifname`.
pub(crate) fn parse_result(result: &Value, ifname: &str) -> Result<ParsedResult, String> {
    let raw: RawResult =
        serde_json::from_value(result.clone()).map_err(|e| format!("malformed result: {e}"))?;
    if !SUPPORTED_VERSIONS.contains(&raw.cni_version.as_str()) {
        return Err(format!(
            "result cniVersion {:?} is not supported (supported: {})",
            raw.cni_version,
            SUPPORTED_VERSIONS.join(", ")
        ));
    }
    // Addresses belong to the pod interface if they point at it, or if the
    // result does not say (an ip without "interface" is the container's).
    let pod_iface = |idx: Option<usize>| -> Result<bool, String> {
        match idx {
            None => Ok(true),
            Some(i) => raw
                .interfaces
                .get(i)
                .map(|iface| iface.name == ifname && !iface.sandbox.is_empty())
                .ok_or_else(|| {
                    format!("ips entry names interface {i}, which the result does not list")
                }),
        }
    };
    let mac = raw
        .interfaces
        .iter()
        .find(|i| i.name == ifname && !i.sandbox.is_empty() && !i.mac.is_empty())
        .map(|i| i.mac.to_ascii_lowercase());
    let mut addresses = Vec::new();
    let mut gateways: Vec<IpAddr> = Vec::new();
    for ip in &raw.ips {
        if !pod_iface(ip.interface)? {
            continue;
        }
        let (addr, len) = parse_cidr(&ip.address)?;
        addresses.push((addr, len));
        if let Some(gw) = ip.gateway.as_deref().filter(|g| !g.is_empty()) {
            let gw: IpAddr = gw
                .parse()
                .map_err(|_| format!("gateway {gw:?} is not an IP address"))?;
            if gw.is_ipv4() != addr.is_ipv4() {
                return Err(format!(
                    "gateway {gw} does not match address family of {addr}"
                ));
            }
            gateways.push(gw);
        }
    }
    let mut routes = Vec::new();
    for r in &raw.routes {
        let (dst, len) = parse_cidr(&r.dst)?;
        let gateway = match r.gw.as_deref().filter(|g| !g.is_empty()) {
            Some(g) => Some(
                g.parse::<IpAddr>()
                    .map_err(|_| format!("route gw {g:?} is not an IP address"))?,
            ),
            // CNI: "if omitted, a default gateway is assumed (as determined
            // by the plugin)"; the plugins (bridge, ptp) install such a
            // route through the IPAM gateway of the route's family, so the
            // guest must too, or its default route would be on-link.
            None => gateways
                .iter()
                .copied()
                .find(|g| g.is_ipv4() == dst.is_ipv4()),
        };
        routes.push(RouteSpec {
            destination: format!("{dst}/{len}"),
            gateway,
        });
    }
    // The bridge plugin reports the gateway but routes only with
    // isDefaultGateway; the guest needs a default route either way.
    for gw in gateways {
        let default = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
        if !routes.iter().any(|r| r.destination == default) {
            routes.push(RouteSpec {
                destination: default.to_string(),
                gateway: Some(gw),
            });
        }
    }
    Ok(ParsedResult {
        mac,
        addresses,
        routes,
        dns: raw.dns,
    })
}

/// Port mapping in the order the plugins expect, for logs.
pub(crate) fn describe_ports(p: &[PortMapping]) -> String {
    let v: BTreeMap<u16, String> = p
        .iter()
        .map(|m| {
            (
                m.host_port,
                format!(
                    "{}:{}->{}/{}",
                    m.host_ip, m.host_port, m.container_port, m.protocol
                ),
            )
        })
        .collect();
    v.into_values().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests;
