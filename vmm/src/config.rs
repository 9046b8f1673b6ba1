//! husk-vmm's configuration: a JSON file written by huskd (`husk-vmm --config FILE`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u64 {
    256
}

/// One VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Sandbox id, used in logs and errors.
    pub id: String,
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Where the guest's serial console goes.
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// Unix socket for shutdown/status requests (binary only).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Written with the VMM's pid once the VM runs; removed on exit (binary only).
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Hide CPU features KVM's instruction emulator cannot execute. Default: on when the host
    /// has no VT-x/SVM (PVM).
    #[serde(default)]
    pub hide_emulator_unsupported_cpuid: Option<bool>,
    #[serde(default)]
    pub devices: Devices,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    /// virtio-rng.
    #[serde(default)]
    pub rng: bool,
    /// virtio-vsock with Firecracker-style hybrid vsock.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares through vhost-user (virtiofsd).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// virtio-net on taps.
    #[serde(default)]
    pub net: Vec<NetConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Host side: `CONNECT <port>` here; guest-initiated connections go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    #[serde(default)]
    pub queue_size: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    #[serde(default)]
    pub mac: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, serde_json::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl VmConfig {
    pub fn from_file(path: &std::path::Path) -> Result<VmConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let cfg: VmConfig =
            serde_json::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::Invalid("vcpus must be at least 1".into()));
        }
        if self.memory_mib < 16 || self.memory_mib > 1 << 20 {
            return Err(ConfigError::Invalid(format!(
                "memory_mib {} outside 16..=1048576",
                self.memory_mib
            )));
        }
        if self.cmdline.len() >= crate::arch::x86_64::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::Invalid("kernel command line too long".into()));
        }
        Ok(())
    }
}
