use super::*;
use crate::hypervisor::{HybridVsockConfig, VirtioFsConfig};

fn cfg() -> VmConfig {
    VmConfig {
        id: "sb1".into(),
        vcpus: 2,
        memory_mib: 256,
        kernel: "/g/vmlinuz".into(),
        initrd: "/g/initrd.img".into(),
        kernel_params: vec!["husk.debug=1".into()],
        virtio_fs: Some(VirtioFsConfig {
            socket: "/s/fs.sock".into(),
            tag: "husk-share".into(),
        }),
        net: None,
        vsock: HybridVsockConfig {
            uds: "/s/vsock".into(),
            guest_cid: 3,
        },
        console_log: "/s/console.log".into(),
        console_log_max_bytes: 65536,
        sandbox_dir: "/s".into(),
        host: Default::default(),
    }
}

#[test]
fn command_line_with_hardware_virtualization() {
    let c = kernel_cmdline(true, Some(2_000_000), &cfg().kernel_params);
    assert_eq!(
        c,
        "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd quiet husk.vmm=builtin husk.debug=1"
    );
}

#[test]
fn command_line_under_pvm() {
    let c = kernel_cmdline(false, Some(2_596_124), &[]);
    assert!(c.contains(" reboot=k "), "{c}");
    assert!(c.contains(" husk.vmm=builtin "), "{c}");
    assert!(c.contains(" noxsave clearcpuid=cx16,"), "{c}");
    assert!(c.ends_with(" tsc_early_khz=2596124"), "{c}");
    assert!(!kernel_cmdline(false, None, &[]).contains("tsc_early_khz"));
}

#[test]
fn vmm_config_json() {
    let c = cfg();
    let files = BuiltinFiles::in_dir(&c.sandbox_dir);
    // The JSON is compared, not the struct: this is the file husk-vmm reads.
    let j = serde_json::to_value(vmm_config(&c, &files, "console=ttyS0").unwrap()).unwrap();
    let want = serde_json::json!({
        "id": "sb1",
        "kernel": "/g/vmlinuz",
        "initrd": "/g/initrd.img",
        "cmdline": "console=ttyS0",
        "vcpus": 2,
        "memory_mib": 256,
        "serial_log": "/s/console.log",
        "serial_log_max_bytes": 65536,
        "control_socket": "/s/vmm.sock",
        "pid_file": "/s/vmm.pid",
        "devices": {
            "rng": true,
            "vsock": {"guest_cid": 3, "uds_path": "/s/vsock"},
            "fs": [{"tag": "husk-share", "socket": "/s/fs.sock"}],
            "net": [],
        },
    });
    assert_eq!(j, want);
    let mut n = cfg();
    n.net = Some(super::super::NetDeviceConfig {
        netns: "/run/husk/netns/sb1".into(),
        tap: "tap0_husk".into(),
        mac: "0a:58:0a:01:00:05".into(),
    });
    assert_eq!(
        vmm_config(&n, &files, "").unwrap().devices.net,
        [NetConfig {
            tap: "tap0_husk".into(),
            mac: Some("0a:58:0a:01:00:05".into())
        }]
    );
    let mut c = cfg();
    c.virtio_fs = None;
    c.vcpus = 300;
    assert!(vmm_config(&c, &files, "").is_err());
    c.vcpus = 1;
    assert_eq!(vmm_config(&c, &files, "").unwrap().devices.fs, []);
}

#[test]
fn descriptions() {
    let hw = AccelProbe {
        accel: Accel::Kvm,
        reason: "qemu (kvm): /dev/kvm with hardware virtualization".into(),
        why: "/dev/kvm with hardware virtualization".into(),
    };
    let p = BuiltinPaths {
        husk_vmm: "/b/husk-vmm".into(),
    };
    let b = Builtin::new(p.clone(), &hw);
    assert_eq!(b.name(), "builtin");
    assert_eq!(
        b.description(),
        "builtin (kvm): hardware virtualization available"
    );
    assert!(b
        .cmdline_for(&cfg())
        .ends_with("husk.vmm=builtin husk.debug=1"));
    let pvm = AccelProbe {
        accel: Accel::Tcg,
        reason: "qemu (tcg): /dev/kvm has no hardware virtualization (PVM)".into(),
        why: "/dev/kvm has no hardware virtualization (PVM)".into(),
    };
    let b = Builtin::new(p, &pvm);
    assert!(!b.hardware());
    assert!(
        b.description()
            .starts_with("builtin (kvm-pvm, instruction emulator): /dev/kvm has no hardware virtualization (PVM)"),
        "{}",
        b.description()
    );
}

#[tokio::test]
async fn launch_failure_quotes_the_log_and_leaves_no_process() {
    let d = tempfile::tempdir().unwrap();
    // A "husk-vmm" that complains and exits, as the real one does on a
    // bad config.
    let fake = d.path().join("husk-vmm");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'bad config: no kernel' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = AccelProbe {
        accel: Accel::Kvm,
        reason: String::new(),
        why: String::new(),
    };
    let b = Builtin::new(BuiltinPaths { husk_vmm: fake }, &probe);
    let mut c = cfg();
    c.sandbox_dir = d.path().to_path_buf();
    c.vsock.uds = d.path().join("vsock");
    let e = b.launch(&c).await.unwrap_err();
    let s = e.to_string();
    assert!(s.contains("bad config: no kernel"), "{s}");
    // The config was written for it, in the schema husk-vmm reads.
    let j: husk_vmm_api::VmConfig =
        serde_json::from_slice(&std::fs::read(d.path().join("vm.json")).unwrap()).unwrap();
    assert_eq!(j.id, "sb1");
}
