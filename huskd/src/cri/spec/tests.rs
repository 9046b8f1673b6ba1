use super::*;
use k8s_cri::v1::{
    Capability, Int64Value, KeyValue, LinuxContainerConfig, LinuxContainerSecurityContext,
};

fn image() -> ImageConfig {
    ImageConfig {
        entrypoint: vec!["/entry".into()],
        cmd: vec!["cmd1".into()],
        env: vec!["A=1".into(), "PATH=/bin".into()],
        user: Some("app".into()),
        ..Default::default()
    }
}

#[test]
fn command_rules() {
    let img = image();
    let mut c = ContainerConfig::default();
    assert_eq!(argv(&c, &img).unwrap(), vec!["/entry", "cmd1"]);
    c.args = vec!["x".into()];
    assert_eq!(argv(&c, &img).unwrap(), vec!["/entry", "x"]);
    c.command = vec!["/bin/sh".into()];
    c.args.clear();
    assert_eq!(argv(&c, &img).unwrap(), vec!["/bin/sh"]);
    let e = argv(&ContainerConfig::default(), &ImageConfig::default()).unwrap_err();
    assert!(e.message().contains("config.command"));
}

#[test]
fn env_merge() {
    let c = ContainerConfig {
        envs: vec![
            KeyValue {
                key: "A".into(),
                value: "2".into(),
            },
            KeyValue {
                key: "B".into(),
                value: "x=y".into(),
            },
        ],
        ..Default::default()
    };
    assert_eq!(env(&c, &image()), vec!["A=2", "PATH=/bin", "B=x=y"]);
    assert!(env(&ContainerConfig::default(), &ImageConfig::default())[0]
        .starts_with("PATH=/usr/local/sbin"));
}

#[test]
fn users() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("etc")).unwrap();
    std::fs::write(
        d.path().join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
    let img = image();
    let u = resolve_user(&ContainerConfig::default(), &img, d.path()).unwrap();
    assert_eq!((u.uid, u.gid), (1000, 1001));
    let sc = |f: &dyn Fn(&mut LinuxContainerSecurityContext)| {
        let mut s = LinuxContainerSecurityContext::default();
        f(&mut s);
        ContainerConfig {
            linux: Some(LinuxContainerConfig {
                security_context: Some(s),
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let c = sc(&|s| {
        s.run_as_user = Some(Int64Value { value: 0 });
        s.run_as_group = Some(Int64Value { value: 50 });
        s.supplemental_groups = vec![7];
    });
    let u = resolve_user(&c, &img, d.path()).unwrap();
    assert_eq!((u.uid, u.gid, u.additional_gids), (0, 50, vec![7]));
    let c = sc(&|s| s.run_as_username = "app:staff".into());
    assert_eq!(resolve_user(&c, &img, d.path()).unwrap().gid, 50);
    let c = sc(&|s| s.run_as_username = "nobody".into());
    assert!(resolve_user(&c, &img, d.path())
        .unwrap_err()
        .message()
        .contains("run_as_username"));
    let c = sc(&|s| s.run_as_user = Some(Int64Value { value: -1 }));
    assert!(resolve_user(&c, &img, d.path()).is_err());
}

#[test]
fn spec_fields() {
    let mut c = ContainerConfig {
        command: vec!["/bin/true".into()],
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                readonly_rootfs: true,
                capabilities: Some(Capability {
                    add_capabilities: vec!["NET_ADMIN".into()],
                    drop_capabilities: vec!["CAP_KILL".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_quota: 50000,
                cpu_period: 100000,
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    let mounts = vec![GuestMount {
        destination: "/etc/hosts".into(),
        source: "/run/husk/sandbox/x".into(),
        readonly: true,
    }];
    let user = ProcessUser {
        uid: 1,
        gid: 2,
        additional_gids: vec![],
        home: "/".into(),
    };
    let inp = SpecInputs {
        config: &c,
        image: &ImageConfig::default(),
        user: user.clone(),
        mounts: &mounts,
        seccomp: None,
    };
    let s = build(&inp).unwrap();
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["root"]["readonly"], json!(true));
    assert_eq!(v["process"]["user"]["uid"], json!(1));
    let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
    assert!(caps.contains(&json!("CAP_NET_ADMIN")) && !caps.contains(&json!("CAP_KILL")));
    assert_eq!(v["linux"]["resources"]["memory"]["limit"], json!(64 << 20));
    assert_eq!(v["linux"]["resources"]["cpu"]["quota"], json!(50000));
    let hosts: Vec<_> = v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["destination"] == "/etc/hosts")
        .collect();
    assert_eq!(hosts.len(), 1);
    assert!(hosts[0]["options"]
        .as_array()
        .unwrap()
        .contains(&json!("ro")));
    assert!(
        v.get("hostname").is_none(),
        "hostname without a UTS namespace"
    );
    let ns: Vec<_> = v["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].clone())
        .collect();
    assert!(!ns.contains(&json!("network")) && ns.contains(&json!("pid")));

    // hostPID: no PID namespace of its own.
    let mut host_pid = c.clone();
    host_pid
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .namespace_options = Some(k8s_cri::v1::NamespaceOption {
        pid: k8s_cri::v1::NamespaceMode::Node as i32,
        ..Default::default()
    });
    let v = serde_json::to_value(
        build(&SpecInputs {
            config: &host_pid,
            ..inp
        })
        .unwrap(),
    )
    .unwrap();
    let ns = v["linux"]["namespaces"].as_array().unwrap();
    assert!(!ns.iter().any(|n| n["type"] == "pid"), "{ns:?}");

    c.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .capabilities = Some(Capability {
        add_capabilities: vec!["BOGUS".into()],
        ..Default::default()
    });
    let inp = SpecInputs {
        config: &c,
        image: &ImageConfig::default(),
        user,
        mounts: &[],
        seccomp: None,
    };
    assert!(build(&inp).unwrap_err().message().contains("capabilities"));
}

#[test]
fn masked_and_readonly_paths() {
    let sc = LinuxContainerSecurityContext {
        masked_paths: vec!["/bin/ls".into()],
        readonly_paths: vec!["/tmp".into()],
        ..Default::default()
    };
    let mut c = ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        }),
        ..Default::default()
    };
    let user = ProcessUser {
        uid: 0,
        gid: 0,
        additional_gids: vec![],
        home: "/".into(),
    };
    let spec = |c: &ContainerConfig| {
        build(&SpecInputs {
            config: c,
            image: &image(),
            user: user.clone(),
            mounts: &[],
            seccomp: None,
        })
        .map(|s| serde_json::to_value(&s).unwrap())
    };
    let v = spec(&c).unwrap();
    assert_eq!(v["linux"]["maskedPaths"], json!(["/bin/ls"]));
    assert_eq!(v["linux"]["readonlyPaths"], json!(["/tmp"]));
    // Without lists the OCI defaults stay (they mask /proc/kcore and more).
    let v = spec(&ContainerConfig::default()).unwrap();
    assert!(v["linux"]["maskedPaths"]
        .as_array()
        .unwrap()
        .contains(&json!("/proc/kcore")));
    let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    sc.masked_paths = vec!["relative".into()];
    assert!(spec(&c).unwrap_err().message().contains("masked_paths"));
    let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    sc.privileged = true;
    assert_eq!(spec(&c).unwrap()["linux"]["maskedPaths"], json!([]));
}

#[test]
fn run_as_group_needs_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                run_as_group: Some(Int64Value { value: 5 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = resolve_user(&c, &ImageConfig::default(), dir.path()).unwrap_err();
    assert!(e.message().contains("run_as_group"), "{}", e.message());
    let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    sc.run_as_user = Some(Int64Value { value: 7 });
    let u = resolve_user(&c, &ImageConfig::default(), dir.path()).unwrap();
    assert_eq!((u.uid, u.gid), (7, 5));
}

#[test]
fn exec_gets_the_container_security() {
    let c = ContainerConfig {
        working_dir: "/w".into(),
        tty: true,
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                no_new_privs: true,
                capabilities: Some(Capability {
                    drop_capabilities: vec!["CHOWN".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let user = ProcessUser {
        uid: 7,
        gid: 8,
        additional_gids: vec![],
        home: "/".into(),
    };
    let p = exec_process(&c, &image(), &user, &["id".into()]).unwrap();
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["args"], json!(["id"]));
    assert_eq!(v["terminal"], json!(false));
    assert_eq!(v["cwd"], json!("/w"));
    assert_eq!(v["noNewPrivileges"], json!(true));
    assert_eq!(v["user"]["uid"], json!(7));
    // Without no_new_privs the field is absent (libcontainer reads `false` as "load seccomp
    // late", which fails without the capability).
    let mut c = c;
    c.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .no_new_privs = false;
    let v =
        serde_json::to_value(exec_process(&c, &image(), &user, &["id".into()]).unwrap()).unwrap();
    assert!(v.get("noNewPrivileges").is_none(), "{v}");
    for set in ["bounding", "effective", "permitted"] {
        let caps = v["capabilities"][set].as_array().unwrap();
        assert!(!caps.contains(&json!("CAP_CHOWN")), "{set}: {caps:?}");
        assert!(caps.contains(&json!("CAP_KILL")), "{set}: {caps:?}");
    }
}
