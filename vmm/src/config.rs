//! husk-vmm's configuration: a JSON file written by huskd (`husk-vmm --config FILE`).
//!
//! The schema is shared with huskd through `husk-vmm-api`; what is checked here depends on
//! this VMM (its memory layout, its command-line buffer), not on the format.

use std::path::{Path, PathBuf};

pub use husk_vmm_api::config::{Devices, FsConfig, NetConfig, VmConfig, VsockConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, serde_json::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Reads, parses and validates a config file.
pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
    let cfg: VmConfig =
        serde_json::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
    validate(&cfg)?;
    Ok(cfg)
}

pub fn validate(cfg: &VmConfig) -> Result<(), ConfigError> {
    if cfg.vcpus == 0 {
        return Err(ConfigError::Invalid("vcpus must be at least 1".into()));
    }
    if cfg.memory_mib < 16 || cfg.memory_mib > 1 << 20 {
        return Err(ConfigError::Invalid(format!(
            "memory_mib {} outside 16..=1048576",
            cfg.memory_mib
        )));
    }
    if cfg.cmdline.len() >= crate::arch::x86_64::layout::CMDLINE_MAX_SIZE {
        return Err(ConfigError::Invalid("kernel command line too long".into()));
    }
    Ok(())
}
