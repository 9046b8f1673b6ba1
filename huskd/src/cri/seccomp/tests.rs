// The deprecated `seccomp_profile_path` is part of what is tested.
#![allow(deprecated)]

use std::collections::BTreeSet;

use k8s_cri::v1::{LinuxContainerSecurityContext, SecurityProfile};
use serde_json::{json, Value};
use tonic::Code;

use super::*;

fn sc_with(profile_type: ProfileType, localhost_ref: &str) -> LinuxContainerSecurityContext {
    LinuxContainerSecurityContext {
        seccomp: Some(SecurityProfile {
            profile_type: profile_type as i32,
            localhost_ref: localhost_ref.into(),
        }),
        ..Default::default()
    }
}

fn default_caps() -> Vec<String> {
    crate::cri::spec::DEFAULT_CAPS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn runtime_default(caps: &[String]) -> Value {
    linux_seccomp(Some(&sc_with(ProfileType::RuntimeDefault, "")), caps)
        .unwrap()
        .unwrap()
}

/// Names allowed unconditionally (no args) by a profile.
fn allowed(p: &Value) -> BTreeSet<String> {
    p["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW" && r.get("args").is_none())
        .flat_map(|r| r["names"].as_array().unwrap().iter())
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

fn rule_for<'a>(p: &'a Value, name: &str) -> Vec<&'a Value> {
    p["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["names"].as_array().unwrap().iter().any(|n| n == name))
        .collect()
}

#[test]
fn cri_semantics_of_the_profile_fields() {
    assert_eq!(choice(None).unwrap().0, Choice::Unconfined);
    let none = LinuxContainerSecurityContext::default();
    assert_eq!(choice(Some(&none)).unwrap().0, Choice::Unconfined);
    let rd = sc_with(ProfileType::RuntimeDefault, "");
    assert_eq!(choice(Some(&rd)).unwrap().0, Choice::RuntimeDefault);
    let priv_rd = LinuxContainerSecurityContext {
        privileged: true,
        ..rd.clone()
    };
    assert_eq!(choice(Some(&priv_rd)).unwrap().0, Choice::Unconfined);
    let lh = sc_with(ProfileType::Localhost, "/p.json");
    assert_eq!(
        choice(Some(&lh)).unwrap().0,
        Choice::Localhost("/p.json".into())
    );
    // The structured field wins over the deprecated path.
    let both = LinuxContainerSecurityContext {
        seccomp_profile_path: "localhost//x.json".into(),
        ..sc_with(ProfileType::Unconfined, "")
    };
    assert_eq!(choice(Some(&both)).unwrap().0, Choice::Unconfined);
    for (path, want) in [
        ("unconfined", Choice::Unconfined),
        ("runtime/default", Choice::RuntimeDefault),
        ("docker/default", Choice::RuntimeDefault),
        (
            "localhost//etc/p.json",
            Choice::Localhost("/etc/p.json".into()),
        ),
    ] {
        let sc = LinuxContainerSecurityContext {
            seccomp_profile_path: path.into(),
            ..Default::default()
        };
        assert_eq!(choice(Some(&sc)).unwrap().0, want, "{path}");
    }
    let bad = LinuxContainerSecurityContext {
        seccomp_profile_path: "/etc/p.json".into(),
        ..Default::default()
    };
    let e = choice(Some(&bad)).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("seccomp_profile_path"),
        "{}",
        e.message()
    );
    let unknown = LinuxContainerSecurityContext {
        seccomp: Some(SecurityProfile {
            profile_type: 7,
            localhost_ref: String::new(),
        }),
        ..Default::default()
    };
    assert_eq!(
        choice(Some(&unknown)).unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[test]
fn runtime_default_allows_the_ordinary_and_refuses_the_dangerous() {
    let p = runtime_default(&default_caps());
    assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(p["defaultErrnoRet"], 1);
    let ok = allowed(&p);
    for name in [
        "read",
        "write",
        "openat",
        "execve",
        "mmap",
        "futex",
        "exit_group",
        "wait4",
        "chroot",
    ] {
        assert!(ok.contains(name), "{name} must be allowed");
    }
    for name in [
        "mount",
        "umount2",
        "unshare",
        "setns",
        "init_module",
        "kexec_load",
        "bpf",
        "keyctl",
        "add_key",
        "ptrace",
        "reboot",
        "io_uring_setup",
        "userfaultfd",
        "clock_settime",
        "open_by_handle_at",
        "perf_event_open",
        "personality",
        "socket",
        "clone",
    ] {
        assert!(
            !ok.contains(name),
            "{name} must not be allowed unconditionally"
        );
    }
    // Every name listed once per unconditional rule set: a duplicate is a slip in the lists.
    let total: usize = p["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW" && r.get("args").is_none())
        .map(|r| r["names"].as_array().unwrap().len())
        .sum();
    assert_eq!(total, ok.len(), "a syscall is listed twice");
    // The OCI types accept it: libcontainer reads it through them.
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(p.clone()).unwrap();
}

#[test]
fn runtime_default_clone_and_socket_conditions() {
    let p = runtime_default(&default_caps());
    // clone: namespace flags refused; written for libcontainer with the mask in valueTwo.
    let clone = rule_for(&p, "clone");
    assert_eq!(clone.len(), 1);
    assert_eq!(
        clone[0]["args"],
        json!([{"index": 0, "value": 0, "valueTwo": 0x7E02_0000u64, "op": "SCMP_CMP_MASKED_EQ"}])
    );
    assert_eq!(rule_for(&p, "clone3")[0]["errnoRet"], 38);
    assert_eq!(
        rule_for(&p, "socket")[0]["args"],
        json!([{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}])
    );
    assert_eq!(rule_for(&p, "personality").len(), 5);

    // CAP_SYS_ADMIN brings mounts, namespaces and a plain clone back.
    let mut caps = default_caps();
    caps.push("CAP_SYS_ADMIN".into());
    caps.push("CAP_SYS_PTRACE".into());
    let p = runtime_default(&caps);
    let ok = allowed(&p);
    for name in [
        "mount",
        "unshare",
        "setns",
        "clone",
        "clone3",
        "ptrace",
        "process_vm_readv",
    ] {
        assert!(
            ok.contains(name),
            "{name} with CAP_SYS_ADMIN/CAP_SYS_PTRACE"
        );
    }
}

#[test]
fn unconfined_and_privileged_get_no_filter() {
    let caps = default_caps();
    assert_eq!(linux_seccomp(None, &caps).unwrap(), None);
    let u = sc_with(ProfileType::Unconfined, "");
    assert_eq!(linux_seccomp(Some(&u), &caps).unwrap(), None);
}

fn localhost(text: &str, caps: &[String]) -> Result<Value, Status> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("profile.json");
    std::fs::write(&p, text).unwrap();
    let sc = sc_with(ProfileType::Localhost, p.to_str().unwrap());
    linux_seccomp(Some(&sc), caps).map(Option::unwrap)
}

#[test]
fn localhost_docker_format_profile() {
    // The shape kubelet's users write: archMap, conditional rules, masked comparisons in the
    // runc convention.
    let text = r#"{
        "defaultAction": "SCMP_ACT_ALLOW",
        "archMap": [
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}
        ],
        "syscalls": [
            {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"},
            {"name": "mount", "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["clone"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["chroot"], "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["reboot"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_SYS_BOOT"]}},
            {"names": ["s390_pci_mmio_read"], "action": "SCMP_ACT_ERRNO", "includes": {"arches": ["s390x"]}}
        ]
    }"#;
    let p = localhost(text, &default_caps()).unwrap();
    assert_eq!(
        p["architectures"],
        json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
    );
    let names: Vec<&str> = p["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["names"][0].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sethostname", "mount", "clone", "reboot"]);
    assert_eq!(rule_for(&p, "mount")[0]["errnoRet"], 13);
    // Swapped for libcontainer: mask in valueTwo.
    assert_eq!(
        rule_for(&p, "clone")[0]["args"][0]["valueTwo"],
        2114060288u64
    );
    assert_eq!(rule_for(&p, "clone")[0]["args"][0]["value"], 0);
}

#[test]
fn bad_localhost_profiles_are_invalid_argument_naming_the_field() {
    let caps = default_caps();
    let e = |r: Result<Value, Status>| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().contains("security_context.seccomp"),
            "{}",
            e.message()
        );
        e.message().to_string()
    };
    assert!(e(localhost("not json", &caps)).contains("not a seccomp profile"));
    assert!(e(localhost(r#"{"defaultAction": "SCMP_ACT_MAYBE"}"#, &caps)).contains("OCI"));
    let missing = sc_with(ProfileType::Localhost, "/nonexistent/husk/profile.json");
    e(linux_seccomp(Some(&missing), &caps).map(Option::unwrap));
    let relative = sc_with(ProfileType::Localhost, "profile.json");
    assert!(e(linux_seccomp(Some(&relative), &caps).map(Option::unwrap)).contains("absolute"));
    // A FIFO neither blocks nor is read; a directory is not a profile.
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let sc = sc_with(ProfileType::Localhost, fifo.to_str().unwrap());
    assert!(e(linux_seccomp(Some(&sc), &caps).map(Option::unwrap)).contains("regular"));
    let sc = sc_with(ProfileType::Localhost, d.path().to_str().unwrap());
    e(linux_seccomp(Some(&sc), &caps).map(Option::unwrap));
    let big = d.path().join("big.json");
    std::fs::write(&big, vec![b' '; (MAX_PROFILE_BYTES + 1) as usize]).unwrap();
    let sc = sc_with(ProfileType::Localhost, big.to_str().unwrap());
    assert!(e(linux_seccomp(Some(&sc), &caps).map(Option::unwrap)).contains("larger"));
}
