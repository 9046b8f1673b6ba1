//! The VM config: a JSON file huskd writes and husk-vmm reads (`husk-vmm --config FILE`).
//!
//! Every struct rejects unknown fields, so a field one side renames or drops fails the launch
//! loudly instead of being ignored. Absent options are left out when serialized rather than
//! written as `null`, which keeps the file huskd writes the same as before these types existed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The serial log's cap when the config gives none: 1 MiB.
pub const DEFAULT_SERIAL_LOG_MAX_BYTES: u64 = 1 << 20;

fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u64 {
    256
}

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Sandbox id, used in logs and errors.
    pub id: String,
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Where the guest's serial console goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<PathBuf>,
    /// The most bytes `serial_log` keeps on disk (the newest output is kept); default
    /// [`DEFAULT_SERIAL_LOG_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log_max_bytes: Option<u64>,
    /// Unix socket for shutdown/status requests (binary only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Written with the VMM's pid once the VM runs; removed on exit (binary only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// Hide CPU features KVM's instruction emulator cannot execute. Default: on when the host
    /// has no VT-x/SVM (PVM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hide_emulator_unsupported_cpuid: Option<bool>,
    #[serde(default)]
    pub devices: Devices,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    /// virtio-rng.
    #[serde(default)]
    pub rng: bool,
    /// virtio-vsock with Firecracker-style hybrid vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares through vhost-user (virtiofsd).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// virtio-net on taps.
    #[serde(default)]
    pub net: Vec<NetConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Host side: `CONNECT <port>` here; guest-initiated connections go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn full() -> VmConfig {
        VmConfig {
            id: "sb1".into(),
            kernel: "/g/vmlinuz".into(),
            initrd: Some("/g/initrd.img".into()),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 512,
            serial_log: Some("/s/console.log".into()),
            serial_log_max_bytes: Some(65536),
            control_socket: Some("/s/vmm.sock".into()),
            pid_file: Some("/s/vmm.pid".into()),
            hide_emulator_unsupported_cpuid: Some(true),
            devices: Devices {
                rng: true,
                vsock: Some(VsockConfig {
                    guest_cid: 3,
                    uds_path: "/s/vsock".into(),
                }),
                fs: vec![FsConfig {
                    tag: "husk-share".into(),
                    socket: "/s/fs.sock".into(),
                    queue_size: Some(512),
                }],
                net: vec![NetConfig {
                    tap: "tap0".into(),
                    mac: Some("0a:58:0a:01:00:05".into()),
                }],
            },
        }
    }

    #[test]
    fn round_trips() {
        let c = full();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), c);
    }

    #[test]
    fn defaults_fill_a_minimal_config() {
        let c: VmConfig = serde_json::from_value(json!({"id": "a", "kernel": "/k"})).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.cmdline, "");
        assert_eq!(c.initrd, None);
        assert_eq!(c.devices, Devices::default());
    }

    #[test]
    fn absent_options_are_left_out_not_null() {
        let c: VmConfig = serde_json::from_value(json!({"id": "a", "kernel": "/k"})).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({
                "id": "a",
                "kernel": "/k",
                "cmdline": "",
                "vcpus": 1,
                "memory_mib": 256,
                "devices": {"rng": false, "fs": [], "net": []},
            })
        );
        let fs = FsConfig {
            tag: "t".into(),
            socket: "/f".into(),
            queue_size: None,
        };
        assert_eq!(
            serde_json::to_value(&fs).unwrap(),
            json!({"tag": "t", "socket": "/f"})
        );
    }

    #[test]
    fn explicit_nulls_are_accepted() {
        let c: VmConfig = serde_json::from_value(json!({
            "id": "a", "kernel": "/k", "initrd": null, "serial_log": null,
            "devices": {"vsock": null, "net": [{"tap": "t", "mac": null}]},
        }))
        .unwrap();
        assert_eq!(c.initrd, None);
        assert_eq!(c.devices.net[0].mac, None);
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level() {
        let bad = [
            json!({"id": "a", "kernel": "/k", "memory": 64}),
            json!({"id": "a", "kernel": "/k", "devices": {"balloon": true}}),
            json!({"id": "a", "kernel": "/k", "devices": {"vsock": {"guest_cid": 3, "uds_path": "/v", "port": 1}}}),
            json!({"id": "a", "kernel": "/k", "devices": {"fs": [{"tag": "t", "socket": "/f", "cache": "auto"}]}}),
            json!({"id": "a", "kernel": "/k", "devices": {"net": [{"tap": "t", "ip": "10.0.0.2"}]}}),
        ];
        for v in bad {
            let e = serde_json::from_value::<VmConfig>(v.clone()).unwrap_err();
            assert!(e.to_string().contains("unknown field"), "{v}: {e}");
        }
    }

    #[test]
    fn malformed_input_is_rejected() {
        let bad = [
            json!({"kernel": "/k"}),
            json!({"id": "a"}),
            json!({"id": "a", "kernel": "/k", "vcpus": 256}),
            json!({"id": "a", "kernel": "/k", "vcpus": -1}),
            json!({"id": "a", "kernel": "/k", "memory_mib": "64"}),
            json!({"id": "a", "kernel": "/k", "devices": {"vsock": {"uds_path": "/v"}}}),
            json!({"id": "a", "kernel": "/k", "devices": {"fs": [{"tag": "t", "socket": "/f", "queue_size": 65536}]}}),
            json!({"id": "a", "kernel": "/k", "devices": {"net": [{"mac": "0a:58:0a:01:00:05"}]}}),
            json!("a"),
        ];
        for v in bad {
            assert!(
                serde_json::from_value::<VmConfig>(v.clone()).is_err(),
                "{v}"
            );
        }
        assert!(serde_json::from_str::<VmConfig>(r#"{"id":"a","kernel":"/k""#).is_err());
    }
}
