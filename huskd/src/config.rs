//! huskd's configuration file (TOML): where state lives, where to listen,
//! registry mirrors, and the runtime handlers (VM size and hypervisor per
//! RuntimeClass handler).
//!
//! Every key has a default, so an empty file (or no file) is a valid
//! configuration. [`DEFAULT_CONFIG_TOML`] is the default configuration with
//! a comment on every key; a test keeps it equal to [`HuskdConfig::default`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use husk_runtime::hypervisor::{HypervisorChoice, MAX_SOCKET_PATH};

/// Where huskd looks for its configuration without `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/config.toml";
/// The handler used for an empty `runtime_handler`; always present.
pub const DEFAULT_HANDLER: &str = "husk";

/// The default configuration, printed by `huskd --print-default-config`.
pub const DEFAULT_CONFIG_TOML: &str = r#"# huskd configuration (TOML). Every key is optional; shown are the defaults.

# Persistent state: the image store and pod/container records.
root = "/var/lib/husk"

# Runtime state: sandbox directories, sockets; lost on reboot. At most 15
# bytes: pod sockets below it must fit in a unix socket path.
state = "/run/husk"

# Unix socket of the CRI (v1) gRPC server.
listen = "/run/husk/husk.sock"

# Default log filter when RUST_LOG is not set (tracing EnvFilter syntax).
log_level = "info"

# virtiofsd binary; empty: search PATH, /usr/libexec and ~/.cargo/bin.
virtiofsd = ""

# qemu-system-x86_64 binary; empty: search PATH and /usr/libexec.
qemu = ""

# husk-vsock binary (vsock backend for QEMU); empty: next to huskd, then PATH.
husk_vsock = ""

# husk-agent binary run on the host for host pods (the static build the
# guest image carries); empty: next to huskd, then PATH.
husk_agent = ""

# Seconds a pod VM may take from launch to its agent being ready.
sandbox_ready_timeout_secs = 60

# Bytes of a pod VM's serial console kept in its sandbox directory
# (console.log and console.log.1); the guest writes what it likes there,
# so older output is dropped past this. At least 8192.
console_log_max_bytes = 1048576

[registry]
# Registries (or mirrors) spoken to over plain HTTP, as "host:port".
insecure = []

# Layers downloaded at once per pull.
max_concurrent_downloads = 3

# What an image may hold (images are untrusted input); a pull that
# exceeds a limit fails naming it, and nothing of it is kept.
# A manifest or image index, read into memory whole:
max_manifest_bytes = 4194304
# The image config, read into memory whole:
max_config_bytes = 8388608
# Per layer, uncompressed bytes (a gzip bomb stops here):
max_layer_bytes = 68719476736
# Per layer, entries (files, directories, links, whiteouts):
max_layer_entries = 2000000
# One tar long-name or PAX record (read into memory whole):
max_tar_metadata_bytes = 1048576

# Registry host -> mirror URLs tried in order before the registry itself.
# A mirror replaces the registry host and keeps the repository path; the
# image keeps its original name. Example:
# "registry.k8s.io" = ["http://127.0.0.1:5000"]
[registry.mirrors]

# The CRI streaming server: Exec, Attach and PortForward return a
# single-use URL of it (valid for one minute) that kubelet, kubectl or
# crictl connect to. The default suits a kubelet on the same node.
[streaming]
# Address the server listens on (and the URLs name).
address = "127.0.0.1"
# 0: any free port (the URL carries it).
port = 0
# Serve HTTPS with this certificate (chain), a PEM file, and the key
# below; set both or neither. Empty: plain HTTP, fine on loopback.
tls_cert_file = ""
# The certificate's private key, a PEM file.
tls_key_file = ""

# Pod networking through CNI. Every pod gets its own network namespace,
# set up by the plugins of the network configured here, and its VM's
# virtio-net device is wired to the CNI interface. Pods asking for the host
# network are refused: a VM cannot share the host's network stack.
[cni]
# Network configurations; the lexicographically first *.conflist, *.conf or
# *.json file is used, as kubelet's runtimes do.
conf_dir = "/etc/cni/net.d"

# Directories searched in order for plugin binaries.
bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]

# Runtime handlers (Kubernetes RuntimeClass handler names). "husk" is the
# default, also used for an empty runtime_handler; add more as
# [handlers.NAME] tables with the same keys.
[handlers.husk]
# VM backend: "auto" (builtin VMM where hardware virtualization exists,
# otherwise QEMU), "qemu" or "builtin"; "none" runs every pod of this
# handler as OS containers on the host kernel (like runc), no VM.
hypervisor = "auto"

# A pod that asks for the host's network, PID or IPC namespace (kube-proxy,
# CNI agents, node exporters): "host" runs it as OS containers on the host
# kernel (frakti's hybrid runtime), "refuse" rejects it (for nodes that
# must run nothing outside a VM).
host_namespaces = "host"

# vCPUs of a pod VM before the pod's own resources raise it.
vcpus = 1

# Guest memory (MiB) of a pod VM before the pod's resources and overhead raise it.
memory_mib = 256

# Guest kernel (built by husk-guest-image).
kernel = "/var/lib/husk/guest/vmlinuz"

# Guest initramfs with husk-agent (built by husk-guest-image).
initrd = "/var/lib/husk/guest/initrd.img"

# Extra guest kernel command-line parameters.
kernel_params = []
"#;

/// Length of `/sandboxes/<64 hex id>/vhost-vsock.sock`, the longest socket
/// path below the state dir.
const SANDBOX_SOCKET_SUFFIX_LEN: usize = "/sandboxes/".len() + 64 + "/vhost-vsock.sock".len();

/// huskd's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HuskdConfig {
    pub root: PathBuf,
    pub state: PathBuf,
    pub listen: PathBuf,
    pub log_level: String,
    /// Empty: search the usual places.
    pub virtiofsd: PathBuf,
    pub qemu: PathBuf,
    pub husk_vsock: PathBuf,
    pub husk_agent: PathBuf,
    pub sandbox_ready_timeout_secs: u64,
    pub console_log_max_bytes: u64,
    pub registry: RegistryConfig,
    pub streaming: StreamingSection,
    pub cni: CniSection,
    pub handlers: BTreeMap<String, HandlerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingSection {
    pub address: std::net::IpAddr,
    pub port: u16,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
}

impl StreamingSection {
    /// The TLS files, if TLS is configured.
    pub fn tls(&self) -> Option<husk_streaming::TlsFiles> {
        (!self.tls_cert_file.as_os_str().is_empty()).then(|| husk_streaming::TlsFiles {
            cert: self.tls_cert_file.clone(),
            key: self.tls_key_file.clone(),
        })
    }
}

impl Default for StreamingSection {
    fn default() -> Self {
        Self {
            address: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 0,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CniSection {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for CniSection {
    fn default() -> Self {
        Self {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    pub insecure: Vec<String>,
    pub max_concurrent_downloads: usize,
    pub mirrors: BTreeMap<String, Vec<String>>,
    pub max_manifest_bytes: u64,
    pub max_config_bytes: u64,
    pub max_layer_bytes: u64,
    pub max_layer_entries: u64,
    pub max_tar_metadata_bytes: u64,
}

impl RegistryConfig {
    /// The image store's limits from these keys.
    pub fn image_limits(&self) -> husk_runtime::image::ImageLimits {
        husk_runtime::image::ImageLimits {
            max_manifest_bytes: self.max_manifest_bytes,
            max_config_bytes: self.max_config_bytes,
            layer: husk_runtime::image::LayerLimits {
                max_bytes: self.max_layer_bytes,
                max_entries: self.max_layer_entries,
                max_metadata_record: self.max_tar_metadata_bytes,
            },
        }
    }
}

/// One runtime handler: how pod VMs of this RuntimeClass are built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandlerConfig {
    pub hypervisor: String,
    pub host_namespaces: HostNamespacesPolicy,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_params: Vec<String>,
}

/// What a VM handler does with a pod that asks for a host namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostNamespacesPolicy {
    /// Run it as OS containers on the host (the default, as frakti).
    Host,
    /// Reject it with InvalidArgument.
    Refuse,
}

impl HandlerConfig {
    /// `hypervisor = "none"`: every pod on the host, no VM.
    pub fn is_host_only(&self) -> bool {
        self.hypervisor == "none"
    }
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            hypervisor: "auto".into(),
            host_namespaces: HostNamespacesPolicy::Host,
            vcpus: 1,
            memory_mib: 256,
            kernel: "/var/lib/husk/guest/vmlinuz".into(),
            initrd: "/var/lib/husk/guest/initrd.img".into(),
            kernel_params: Vec::new(),
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            max_concurrent_downloads: 3,
            mirrors: BTreeMap::new(),
            max_manifest_bytes: husk_runtime::image::ImageLimits::default().max_manifest_bytes,
            max_config_bytes: husk_runtime::image::ImageLimits::default().max_config_bytes,
            max_layer_bytes: husk_runtime::image::LayerLimits::default().max_bytes,
            max_layer_entries: husk_runtime::image::LayerLimits::default().max_entries,
            max_tar_metadata_bytes: husk_runtime::image::LayerLimits::default().max_metadata_record,
        }
    }
}

impl Default for HuskdConfig {
    fn default() -> Self {
        Self {
            root: "/var/lib/husk".into(),
            state: "/run/husk".into(),
            listen: "/run/husk/husk.sock".into(),
            log_level: "info".into(),
            virtiofsd: PathBuf::new(),
            qemu: PathBuf::new(),
            husk_vsock: PathBuf::new(),
            husk_agent: PathBuf::new(),
            sandbox_ready_timeout_secs: 60,
            console_log_max_bytes: husk_runtime::sandbox::DEFAULT_CONSOLE_LOG_MAX_BYTES,
            registry: RegistryConfig::default(),
            streaming: StreamingSection::default(),
            cni: CniSection::default(),
            handlers: BTreeMap::from([(DEFAULT_HANDLER.to_string(), HandlerConfig::default())]),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl HuskdConfig {
    /// Parses and validates a configuration text; `path` only labels errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: HuskdConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        // A file that only adds handlers keeps the default one.
        cfg.handlers.entry(DEFAULT_HANDLER.to_string()).or_default();
        cfg.validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.into(),
                key,
                message,
            })?;
        Ok(cfg)
    }

    /// `--config PATH` must exist. Without it, [`DEFAULT_CONFIG_PATH`] is
    /// read if present, else the built-in defaults apply. Returns the
    /// configuration and the file it came from (if any).
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((Self::from_toml(&text, &path)?, Some(path))),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Self::default(), None))
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// The handler for a CRI `runtime_handler` ("" is the default).
    pub fn handler(&self, name: &str) -> Option<(&str, &HandlerConfig)> {
        let name = if name.is_empty() {
            DEFAULT_HANDLER
        } else {
            name
        };
        self.handlers
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }

    pub fn handler_names(&self) -> Vec<&str> {
        self.handlers.keys().map(String::as_str).collect()
    }

    fn optional(p: &Path) -> Option<&Path> {
        (!p.as_os_str().is_empty()).then_some(p)
    }

    pub fn virtiofsd_path(&self) -> Option<&Path> {
        Self::optional(&self.virtiofsd)
    }
    pub fn qemu_path(&self) -> Option<&Path> {
        Self::optional(&self.qemu)
    }
    pub fn husk_vsock_path(&self) -> Option<&Path> {
        Self::optional(&self.husk_vsock)
    }
    pub fn husk_agent_path(&self) -> Option<&Path> {
        Self::optional(&self.husk_agent)
    }

    /// Checks every key; the error is (dotted key, what is wrong).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        let bin_dir_keys: Vec<String> = (0..self.cni.bin_dirs.len())
            .map(|i| format!("cni.bin_dirs[{i}]"))
            .collect();
        let mut paths = vec![
            ("root", &self.root),
            ("state", &self.state),
            ("listen", &self.listen),
            ("cni.conf_dir", &self.cni.conf_dir),
        ];
        paths.extend(
            bin_dir_keys
                .iter()
                .map(String::as_str)
                .zip(self.cni.bin_dirs.iter()),
        );
        for (key, p) in paths {
            if !p.is_absolute() {
                return err(key, format!("{} is not an absolute path", p.display()));
            }
        }
        if self.listen.as_os_str().len() > MAX_SOCKET_PATH {
            return err(
                "listen",
                format!(
                    "{} is longer than a unix socket path may be",
                    self.listen.display()
                ),
            );
        }
        // Pod sockets live at STATE/sandboxes/<64 hex>/vhost-vsock.sock (the
        // longest name); a longer state dir would fail every RunPodSandbox.
        let longest = self.state.as_os_str().len() + SANDBOX_SOCKET_SUFFIX_LEN;
        if longest > MAX_SOCKET_PATH {
            return err(
                "state",
                format!(
                    "{} is too long: pod sockets under it would be {longest} bytes, over the {MAX_SOCKET_PATH} a unix socket path allows (at most {} bytes)",
                    self.state.display(),
                    MAX_SOCKET_PATH - SANDBOX_SOCKET_SUFFIX_LEN
                ),
            );
        }
        for (key, p) in [
            ("virtiofsd", &self.virtiofsd),
            ("qemu", &self.qemu),
            ("husk_vsock", &self.husk_vsock),
            ("husk_agent", &self.husk_agent),
        ] {
            if !p.as_os_str().is_empty() && !p.is_absolute() {
                return err(
                    key,
                    format!(
                        "{} is not an absolute path (or empty to search)",
                        p.display()
                    ),
                );
            }
        }
        let (cert, key) = (&self.streaming.tls_cert_file, &self.streaming.tls_key_file);
        for (k, p, other) in [
            ("streaming.tls_cert_file", cert, key),
            ("streaming.tls_key_file", key, cert),
        ] {
            if p.as_os_str().is_empty() && !other.as_os_str().is_empty() {
                return err(k, "must be set with the other TLS file".into());
            }
            if !p.as_os_str().is_empty() && !p.is_absolute() {
                return err(k, format!("{} is not an absolute path", p.display()));
            }
        }
        if self.sandbox_ready_timeout_secs == 0 {
            return err("sandbox_ready_timeout_secs", "must be at least 1".into());
        }
        if self.console_log_max_bytes < 8192 {
            return err("console_log_max_bytes", "must be at least 8192".into());
        }
        if !(1..=64).contains(&self.registry.max_concurrent_downloads) {
            return err(
                "registry.max_concurrent_downloads",
                "must be between 1 and 64".into(),
            );
        }
        for (key, v) in [
            (
                "registry.max_manifest_bytes",
                self.registry.max_manifest_bytes,
            ),
            ("registry.max_config_bytes", self.registry.max_config_bytes),
            ("registry.max_layer_bytes", self.registry.max_layer_bytes),
            (
                "registry.max_layer_entries",
                self.registry.max_layer_entries,
            ),
            (
                "registry.max_tar_metadata_bytes",
                self.registry.max_tar_metadata_bytes,
            ),
        ] {
            if v == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        for (i, h) in self.registry.insecure.iter().enumerate() {
            if let Err(m) = check_host_port(h) {
                return err(&format!("registry.insecure[{i}]"), format!("{h:?}: {m}"));
            }
        }
        for (host, urls) in &self.registry.mirrors {
            let key = format!("registry.mirrors.{host:?}");
            if let Err(m) = check_host_port(host) {
                return err(&key, format!("registry host {host:?}: {m}"));
            }
            if urls.is_empty() {
                return err(&key, "needs at least one mirror URL".into());
            }
            for u in urls {
                let rest = u
                    .strip_prefix("http://")
                    .or_else(|| u.strip_prefix("https://"));
                match rest {
                    Some(r) if check_host_port(r.trim_end_matches('/')).is_ok() => {}
                    _ => {
                        return err(
                            &key,
                            format!("mirror {u:?} must be http://host[:port] or https://host[:port] (no path)"),
                        )
                    }
                }
            }
        }
        if !self.handlers.contains_key(DEFAULT_HANDLER) {
            return err(
                "handlers",
                format!("the default handler {DEFAULT_HANDLER:?} is missing"),
            );
        }
        for (name, h) in &self.handlers {
            let key = |k: &str| format!("handlers.{name}.{k}");
            if let Err(m) = check_handler_name(name) {
                return err(&format!("handlers.{name}"), m);
            }
            if !h.is_host_only() {
                if let Err(e) = HypervisorChoice::from_str(&h.hypervisor) {
                    return err(&key("hypervisor"), format!("{e}, or \"none\""));
                }
            }
            if !(1..=255).contains(&h.vcpus) {
                return err(
                    &key("vcpus"),
                    format!("{} is not between 1 and 255", h.vcpus),
                );
            }
            if !(128..=1024 * 1024).contains(&h.memory_mib) {
                return err(
                    &key("memory_mib"),
                    format!("{} is not between 128 and 1048576", h.memory_mib),
                );
            }
            for (k, p) in [("kernel", &h.kernel), ("initrd", &h.initrd)] {
                if !p.is_absolute() {
                    return err(&key(k), format!("{} is not an absolute path", p.display()));
                }
            }
            for p in &h.kernel_params {
                if p.is_empty() || p.contains(char::is_whitespace) {
                    return err(
                        &key("kernel_params"),
                        format!("{p:?} is empty or contains whitespace"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// `host[:port]` as registries are named: no scheme, no path.
fn check_host_port(s: &str) -> Result<(), String> {
    let (host, port, v6) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '['")?;
        match after {
            "" => (h, None, true),
            a => (
                h,
                Some(a.strip_prefix(':').ok_or("expected ':' after ']'")?),
                true,
            ),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p), false),
            None => (s, None, false),
        }
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_') || (v6 && b == b':'))
    {
        return Err("expected host[:port] without scheme or path".into());
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("bad port {p:?}"));
        }
    }
    Ok(())
}

/// RuntimeClass handler names are DNS labels.
fn check_handler_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "handler name {name:?} must be a DNS label (a-z, 0-9, '-', at most 63)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<HuskdConfig, ConfigError> {
        HuskdConfig::from_toml(s, Path::new("test.toml"))
    }

    #[test]
    fn printed_default_is_the_default() {
        assert_eq!(parse(DEFAULT_CONFIG_TOML).unwrap(), HuskdConfig::default());
        assert_eq!(parse("").unwrap(), HuskdConfig::default());
    }

    /// Every key line of the printed default follows a comment line.
    #[test]
    fn printed_default_comments_every_key() {
        let lines: Vec<&str> = DEFAULT_CONFIG_TOML.lines().collect();
        let mut keys = 0;
        for (i, l) in lines.iter().enumerate() {
            if l.is_empty() || l.starts_with('#') || l.starts_with('[') {
                continue;
            }
            keys += 1;
            assert!(
                i > 0 && lines[i - 1].starts_with('#'),
                "key line without a comment: {l}"
            );
        }
        // Every field of the structs is in the text.
        let ser = toml::to_string(&HuskdConfig::default()).unwrap();
        for l in ser.lines().filter(|l| l.contains(" = ")) {
            let k = l.split(" = ").next().unwrap();
            assert!(
                DEFAULT_CONFIG_TOML.contains(&format!("\n{k} = ")),
                "{k} missing from the printed default"
            );
        }
        assert!(keys >= 15, "{keys}");
    }

    #[test]
    fn full_example() {
        let c = parse(
            r#"
root = "/srv/husk"
[registry]
insecure = ["127.0.0.1:5000"]
[registry.mirrors]
"registry.k8s.io" = ["http://127.0.0.1:5000"]
[handlers.big]
hypervisor = "qemu"
vcpus = 2
memory_mib = 1024
"#,
        )
        .unwrap();
        assert_eq!(c.root, Path::new("/srv/husk"));
        assert_eq!(c.state, Path::new("/run/husk"));
        assert_eq!(
            c.registry.mirrors["registry.k8s.io"],
            vec!["http://127.0.0.1:5000"]
        );
        assert_eq!(c.handler("").unwrap().0, "husk");
        let (_, big) = c.handler("big").unwrap();
        assert_eq!((big.vcpus, big.memory_mib), (2, 1024));
        assert_eq!(big.kernel, HandlerConfig::default().kernel);
        assert!(c.handler("nope").is_none());
        assert_eq!(c.handler_names(), vec!["big", "husk"]);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("root = \"rel\"", "root"),
            ("bogus = 1", "unknown field `bogus`"),
            ("[handlers.husk]\nvcpus = 0", "handlers.husk.vcpus"),
            (
                "[handlers.husk]\nmemory_mib = 16",
                "handlers.husk.memory_mib",
            ),
            (
                "[handlers.x]\nhypervisor = \"xen\"",
                "handlers.x.hypervisor",
            ),
            ("[handlers.Bad_Name]\n", "handlers.Bad_Name"),
            (
                "[streaming]\ntls_cert_file = \"/etc/husk/cert.pem\"",
                "streaming.tls_key_file",
            ),
            (
                "[streaming]\ntls_cert_file = \"c.pem\"\ntls_key_file = \"/k.pem\"",
                "streaming.tls_cert_file",
            ),
            ("[handlers.x]\nkernel = \"vmlinuz\"", "handlers.x.kernel"),
            (
                "[handlers.x]\nkernel_params = [\"a b\"]",
                "handlers.x.kernel_params",
            ),
            (
                "[registry]\ninsecure = [\"http://x:5000\"]",
                "registry.insecure[0]",
            ),
            (
                "[registry]\ninsecure = [\"x:notaport\"]",
                "registry.insecure[0]",
            ),
            (
                "[registry.mirrors]\n\"docker.io\" = [\"ftp://m\"]",
                "registry.mirrors",
            ),
            ("[registry.mirrors]\n\"docker.io\" = []", "registry.mirrors"),
            ("[handlers.husk]\nvcpus = \"two\"", "invalid type"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(
                e.starts_with("test.toml") || e.starts_with("parsing test.toml"),
                "{e}"
            );
        }
        let long = format!("listen = \"/{}\"", "a".repeat(120));
        assert!(parse(&long).unwrap_err().to_string().contains("listen"));
        // /run/husk fits; 16 bytes more do not.
        assert!(parse("state = \"/run/husk\"").is_ok());
        let long = format!("state = \"/{}\"", "s".repeat(15));
        assert!(parse(&long).unwrap_err().to_string().contains("state:"));
    }

    #[test]
    fn load_defaults_and_missing_explicit_file() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("none.toml");
        let e = HuskdConfig::load(Some(&missing)).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        let p = d.path().join("c.toml");
        std::fs::write(&p, "state = \"/tmp/x\"\n").unwrap();
        let (c, from) = HuskdConfig::load(Some(&p)).unwrap();
        assert_eq!(c.state, Path::new("/tmp/x"));
        assert_eq!(from.as_deref(), Some(p.as_path()));
    }

    #[test]
    fn host_port() {
        assert!(check_host_port("127.0.0.1:5000").is_ok());
        assert!(check_host_port("registry.k8s.io").is_ok());
        assert!(check_host_port("[::1]:5000").is_ok());
        assert!(check_host_port("a/b").is_err());
        assert!(check_host_port(":5000").is_err());
        assert!(check_host_port("h:0").is_err());
    }
}
