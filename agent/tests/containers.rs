//! The real agent binary, driven over its unix-socket listeners.

mod common;

use common::{code, pref, read_all, write_and_close, Agent, T};
use husk_proto::agent::{
    ContainerRef, CreateSandboxRequest, ExecProcessRequest, HealthRequest, RemoveContainerRequest,
    ResizeTerminalRequest, SignalProcessRequest, StdioConfig, StreamKind, UpdateContainerRequest,
};
use husk_proto::ttrpc::Code;

fn process_json(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    }))
    .unwrap()
}

#[tokio::test]
async fn init_output_exit_code_and_removal() {
    let agent = Agent::start().await;
    assert_eq!(agent.ready.agent_version, husk_proto::AGENT_VERSION);
    let c = agent.client().await;
    let h = c.health(HealthRequest {}, T).await.unwrap();
    assert_eq!(h.agent_version, husk_proto::AGENT_VERSION);
    assert!(!h.kernel_release.is_empty());

    // Containers need a sandbox first.
    let spec = agent.spec(&["true"]);
    let r = c
        .create_container(
            husk_proto::agent::CreateContainerRequest {
                container_id: "early".into(),
                oci_spec_json: spec,
                stdio: None,
            },
            T,
        )
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    let c = agent.sandbox().await;
    let again = CreateSandboxRequest {
        sandbox_id: "sb1".into(),
        hostname: String::new(),
        share_tag: String::new(),
        network: None,
    };
    assert_eq!(code(c.create_sandbox(again, T).await), Code::AlreadyExists);

    agent
        .create(
            &c,
            "c1",
            &["sh", "-c", "echo hello; echo oops >&2; exit 3"],
            false,
            false,
        )
        .await;
    let out = agent.stream("c1", "", StreamKind::Stdout).await.unwrap();
    let err = agent.stream("c1", "", StreamKind::Stderr).await.unwrap();
    // stdin was not requested.
    assert!(agent
        .stream("c1", "", StreamKind::Stdin)
        .await
        .unwrap_err()
        .contains("no STREAM_KIND_STDIN"));
    c.start_container(
        ContainerRef {
            container_id: "c1".into(),
        },
        T,
    )
    .await
    .unwrap();
    assert_eq!(read_all(out).await, "hello\n");
    assert_eq!(read_all(err).await, "oops\n");
    let w = c.wait_process(pref("c1", ""), T).await.unwrap();
    assert_eq!(w.exit_code, 3);
    assert!(!w.oom_killed);
    assert!(w.exited_at_unix_nanos > 0);
    // Waiting again answers at once with the same status.
    assert_eq!(c.wait_process(pref("c1", ""), T).await.unwrap(), w);
    // A re-attached stdout of a finished process is at EOF right away.
    assert_eq!(
        read_all(agent.stream("c1", "", StreamKind::Stdout).await.unwrap()).await,
        ""
    );
    assert_eq!(
        code(
            c.start_container(
                ContainerRef {
                    container_id: "c1".into()
                },
                T
            )
            .await
        ),
        Code::FailedPrecondition
    );

    let cg_dir = std::path::Path::new("/sys/fs/cgroup/memory")
        .join(&agent.cgroup_parent)
        .join("c1");
    let cg_dir = if cg_dir.exists() {
        cg_dir
    } else {
        std::path::Path::new("/sys/fs/cgroup")
            .join(&agent.cgroup_parent)
            .join("c1")
    };
    assert!(
        cg_dir.exists(),
        "container cgroup {} missing",
        cg_dir.display()
    );
    let bundle = agent.dir.path().join("run/containers/c1/config.json");
    assert!(bundle.exists());
    c.remove_container(
        RemoveContainerRequest {
            container_id: "c1".into(),
            force: false,
        },
        T,
    )
    .await
    .unwrap();
    assert!(!bundle.exists());
    assert!(!cg_dir.exists(), "cgroup {} left behind", cg_dir.display());
    assert_eq!(
        code(c.wait_process(pref("c1", ""), T).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.container_stats(
                ContainerRef {
                    container_id: "c1".into()
                },
                T
            )
            .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn exec_signal_stdin_stats_update_and_reconnect() {
    let agent = Agent::start().await;
    let c = agent.sandbox().await;
    agent
        .create(&c, "c2", &["sleep", "1000"], false, false)
        .await;
    assert_eq!(
        code(
            c.create_container(
                husk_proto::agent::CreateContainerRequest {
                    container_id: "c2".into(),
                    oci_spec_json: agent.spec(&["true"]),
                    stdio: None
                },
                T
            )
            .await
        ),
        Code::AlreadyExists
    );
    // Exec before start: the container is not running.
    let exec = |id: &str, args: &[&str], stdin: bool, terminal: bool| ExecProcessRequest {
        container_id: "c2".into(),
        exec_id: id.into(),
        process_json: process_json(args),
        stdio: Some(StdioConfig { stdin, terminal }),
    };
    assert_eq!(
        code(c.exec_process(exec("e0", &["true"], false, false), T).await),
        Code::FailedPrecondition
    );
    c.start_container(
        ContainerRef {
            container_id: "c2".into(),
        },
        T,
    )
    .await
    .unwrap();

    // An exec with output and an exit code.
    c.exec_process(
        exec("e1", &["sh", "-c", "echo exec-out; exit 5"], false, false),
        T,
    )
    .await
    .unwrap();
    let out = agent.stream("c2", "e1", StreamKind::Stdout).await.unwrap();
    assert_eq!(read_all(out).await, "exec-out\n");
    assert_eq!(
        c.wait_process(pref("c2", "e1"), T).await.unwrap().exit_code,
        5
    );
    assert_eq!(
        code(c.exec_process(exec("e1", &["true"], false, false), T).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.exec_process(exec("", &["true"], false, false), T).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.exec_process(exec("../x", &["true"], false, false), T)
                .await
        ),
        Code::InvalidArgument
    );

    // stdin round trip: host EOF closes cat's stdin, cat exits 0.
    c.exec_process(exec("cat", &["cat"], true, false), T)
        .await
        .unwrap();
    let out = agent.stream("c2", "cat", StreamKind::Stdout).await.unwrap();
    let inp = agent.stream("c2", "cat", StreamKind::Stdin).await.unwrap();
    write_and_close(inp, b"ping\npong\n").await;
    assert_eq!(read_all(out).await, "ping\npong\n");
    assert_eq!(
        c.wait_process(pref("c2", "cat"), T)
            .await
            .unwrap()
            .exit_code,
        0
    );

    // Signals: SIGTERM kills busybox sleep -> 128 + 15.
    c.exec_process(exec("sl", &["sleep", "1000"], false, false), T)
        .await
        .unwrap();
    let sig = |p: &str, s: i32| SignalProcessRequest {
        process: Some(pref("c2", p)),
        signal: s,
    };
    assert_eq!(
        code(c.signal_process(sig("sl", 0), T).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.signal_process(sig("nope", 15), T).await),
        Code::NotFound
    );
    c.signal_process(sig("sl", 15), T).await.unwrap();
    assert_eq!(
        c.wait_process(pref("c2", "sl"), T).await.unwrap().exit_code,
        143
    );
    assert_eq!(
        code(c.signal_process(sig("sl", 15), T).await),
        Code::FailedPrecondition
    );

    // Terminal exec: the pty size set by ResizeTerminal is what stty sees.
    c.exec_process(
        exec("tty", &["sh", "-c", "read x; stty size"], true, true),
        T,
    )
    .await
    .unwrap();
    let out = agent.stream("c2", "tty", StreamKind::Stdout).await.unwrap();
    assert!(agent.stream("c2", "tty", StreamKind::Stderr).await.is_err());
    c.resize_terminal(
        ResizeTerminalRequest {
            process: Some(pref("c2", "tty")),
            rows: 33,
            cols: 101,
        },
        T,
    )
    .await
    .unwrap();
    let inp = agent.stream("c2", "tty", StreamKind::Stdin).await.unwrap();
    write_and_close(inp, b"go\n").await;
    let text = read_all(out).await;
    assert!(text.contains("33 101"), "terminal output: {text:?}");
    assert_eq!(
        c.wait_process(pref("c2", "tty"), T)
            .await
            .unwrap()
            .exit_code,
        0
    );
    assert_eq!(
        code(
            c.resize_terminal(
                ResizeTerminalRequest {
                    process: Some(pref("c2", "e1")),
                    rows: 1,
                    cols: 1
                },
                T
            )
            .await
        ),
        Code::FailedPrecondition
    );

    // Stats and update.
    let s = c
        .container_stats(
            ContainerRef {
                container_id: "c2".into(),
            },
            T,
        )
        .await
        .unwrap();
    assert!(s.pids >= 1, "{s:?}");
    assert!(s.memory_usage_bytes > 0, "{s:?}");
    assert!(s.cpu_usage_ns > 0, "{s:?}");
    assert!(s.memory_working_set_bytes <= s.memory_usage_bytes);
    let upd = |json: &str| UpdateContainerRequest {
        container_id: "c2".into(),
        resources_json: json.as_bytes().to_vec(),
    };
    c.update_container(upd(r#"{"pids":{"limit":77}}"#), T)
        .await
        .unwrap();
    let pids_max = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .iter()
        .map(|r| {
            std::path::Path::new(r)
                .join(&agent.cgroup_parent)
                .join("c2/pids.max")
        })
        .find(|p| p.exists())
        .expect("pids.max of the container");
    assert_eq!(std::fs::read_to_string(pids_max).unwrap().trim(), "77");
    assert_eq!(
        code(c.update_container(upd("{not json"), T).await),
        Code::InvalidArgument
    );

    // A new connection sees the same containers; the old one may go.
    drop(c);
    let c = agent.client().await;
    c.exec_process(exec("e2", &["true"], false, false), T)
        .await
        .unwrap();
    assert_eq!(
        c.wait_process(pref("c2", "e2"), T).await.unwrap().exit_code,
        0
    );
    assert_eq!(
        c.wait_process(pref("c2", "e1"), T).await.unwrap().exit_code,
        5
    );

    // A waiter on the init process, then removal: refused without force.
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.wait_process(pref("c2", ""), T).await })
    };
    let rm = |force| RemoveContainerRequest {
        container_id: "c2".into(),
        force,
    };
    assert_eq!(
        code(c.remove_container(rm(false), T).await),
        Code::FailedPrecondition
    );
    c.remove_container(rm(true), T).await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap().exit_code, 137);
    assert_eq!(code(c.remove_container(rm(true), T).await), Code::NotFound);
}

#[tokio::test]
async fn bad_requests_get_the_right_codes() {
    let agent = Agent::start().await;
    let c = agent.sandbox().await;
    let create = |id: &str, spec: Vec<u8>| husk_proto::agent::CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec,
        stdio: None,
    };
    assert_eq!(
        code(
            c.create_container(create("a/b", agent.spec(&["true"])), T)
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_container(create("", agent.spec(&["true"])), T)
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_container(create("x", b"garbage".to_vec()), T)
                .await
        ),
        Code::InvalidArgument
    );
    let e = c
        .create_container(create("x", b"{}".to_vec()), T)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(e.to_string().contains("oci_spec_json"), "{e}");
    // A spec libcontainer cannot run fails cleanly and leaves the id free.
    let mut bad: serde_json::Value =
        serde_json::from_slice(&agent.spec(&["/no/such/binary"])).unwrap();
    bad["root"]["path"] = "/nonexistent/rootfs".into();
    let r = c
        .create_container(create("x", serde_json::to_vec(&bad).unwrap()), T)
        .await;
    assert_eq!(code(r), Code::Internal);
    agent.create(&c, "x", &["true"], false, false).await;
    for id in ["nope", ""] {
        assert_eq!(
            code(
                c.start_container(
                    ContainerRef {
                        container_id: id.into()
                    },
                    T
                )
                .await
            ),
            Code::NotFound
        );
        assert_eq!(code(c.wait_process(pref(id, ""), T).await), Code::NotFound);
    }
    assert_eq!(
        code(c.wait_process(pref("x", "nope"), T).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.signal_process(
                SignalProcessRequest {
                    process: None,
                    signal: 9
                },
                T
            )
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.resize_terminal(
                ResizeTerminalRequest {
                    process: Some(pref("x", "")),
                    rows: 70000,
                    cols: 1
                },
                T
            )
            .await
        ),
        Code::InvalidArgument
    );
    // Bad stream hellos are refused with a reason.
    assert!(agent
        .stream("nope", "", StreamKind::Stdout)
        .await
        .unwrap_err()
        .contains("not found"));
    assert!(agent
        .stream("x", "", StreamKind::Unspecified)
        .await
        .unwrap_err()
        .contains("kind"));
    // A never-started container can be removed without force.
    c.remove_container(
        RemoveContainerRequest {
            container_id: "x".into(),
            force: false,
        },
        T,
    )
    .await
    .unwrap();
    // DestroySandbox with poweroff makes a host-mode agent exit.
    agent
        .create(&c, "y", &["sleep", "1000"], false, false)
        .await;
    c.start_container(
        ContainerRef {
            container_id: "y".into(),
        },
        T,
    )
    .await
    .unwrap();
    c.destroy_sandbox(
        husk_proto::agent::DestroySandboxRequest { poweroff: false },
        T,
    )
    .await
    .unwrap();
    assert_eq!(code(c.wait_process(pref("y", ""), T).await), Code::NotFound);
    // After destroy a new sandbox may be created.
    c.create_sandbox(
        CreateSandboxRequest {
            sandbox_id: "sb2".into(),
            hostname: String::new(),
            share_tag: String::new(),
            network: None,
        },
        T,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn seccomp_profile_is_enforced() {
    let agent = Agent::start().await;
    let c = agent.sandbox().await;
    let mut spec = agent.spec_value(&[
        "sh",
        "-c",
        "mkdir /tmp/blocked 2>/dev/null; echo $?; exec sleep 1000",
    ]);
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
    });
    c.create_container(
        husk_proto::agent::CreateContainerRequest {
            container_id: "sc".into(),
            oci_spec_json: serde_json::to_vec(&spec).unwrap(),
            stdio: None,
        },
        T,
    )
    .await
    .unwrap();
    let mut out = agent.stream("sc", "", StreamKind::Stdout).await.unwrap();
    c.start_container(
        ContainerRef {
            container_id: "sc".into(),
        },
        T,
    )
    .await
    .unwrap();
    // mkdir failed (exit status 1) because the filter returned EPERM.
    let mut first = [0u8; 2];
    tokio::io::AsyncReadExt::read_exact(&mut out, &mut first)
        .await
        .unwrap();
    assert_eq!(&first, b"1\n");
    // An exec runs under the same filter (libcontainer alone would leave it unfiltered).
    c.exec_process(
        ExecProcessRequest {
            container_id: "sc".into(),
            exec_id: "e1".into(),
            process_json: process_json(&["sh", "-c", "mkdir /tmp/blocked 2>/dev/null; echo $?"]),
            stdio: Some(StdioConfig {
                stdin: false,
                terminal: false,
            }),
        },
        T,
    )
    .await
    .unwrap();
    let exec_out = agent.stream("sc", "e1", StreamKind::Stdout).await.unwrap();
    assert_eq!(read_all(exec_out).await, "1\n");
    assert_eq!(
        c.wait_process(pref("sc", "e1"), T).await.unwrap().exit_code,
        0
    );
    c.remove_container(
        RemoveContainerRequest {
            container_id: "sc".into(),
            force: true,
        },
        T,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn oom_kill_is_reported() {
    let agent = Agent::start().await;
    let c = agent.sandbox().await;
    // busybox tail keeps the current line in memory; /dev/zero has no newline.
    let mut spec = agent.spec_value(&["tail", "/dev/zero"]);
    spec["linux"]["resources"] =
        serde_json::json!({"memory": {"limit": 16 * 1024 * 1024, "swap": 16 * 1024 * 1024}});
    c.create_container(
        husk_proto::agent::CreateContainerRequest {
            container_id: "oom".into(),
            oci_spec_json: serde_json::to_vec(&spec).unwrap(),
            stdio: None,
        },
        T,
    )
    .await
    .unwrap();
    c.start_container(
        ContainerRef {
            container_id: "oom".into(),
        },
        T,
    )
    .await
    .unwrap();
    let w = c.wait_process(pref("oom", ""), T).await.unwrap();
    assert_eq!(w.exit_code, 137, "{w:?}");
    assert!(w.oom_killed, "{w:?}");
    c.remove_container(
        RemoveContainerRequest {
            container_id: "oom".into(),
            force: false,
        },
        T,
    )
    .await
    .unwrap();
}
