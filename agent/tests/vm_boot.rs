//! Boots the static agent as PID 1 of a QEMU (TCG) microVM and runs a
//! container in it over hybrid vsock. Manual: it needs a guest image built
//! with this agent, husk-vsock and virtiofsd, and takes a minute under TCG:
//!
//! HUSK_GUEST_DIR=/path/with/vmlinuz+initrd.img HUSK_VSOCK_BIN=/path/husk-vsock \
//!   cargo test -p husk-agent --test vm_boot -- --ignored --nocapture
//!
//! The host runtime's end-to-end tests cover this path for CI.

mod qemu_vm;

use std::time::{Duration, Instant};

use husk_proto::agent::{ContainerRef, DestroySandboxRequest, HealthRequest};
use qemu_vm::{container_spec, create_sandbox, QemuVm, CONTAINER};

#[tokio::test]
#[ignore = "manual: needs a guest image with this agent, husk-vsock, virtiofsd and a minute of QEMU TCG"]
async fn container_runs_in_a_vm() {
    let (mut vm, qemu) = QemuVm::prepare("husk-agent-vm").await;
    let started = Instant::now();
    vm.spawn(qemu);
    let result = tokio::time::timeout(Duration::from_secs(240), async {
        let (notice, client) = vm.agent().await;
        eprintln!("ready after {:?}: {notice:?}", started.elapsed());
        let t = Some(Duration::from_secs(60));
        eprintln!("{:?}", client.health(HealthRequest {}, t).await.unwrap());
        create_sandbox(&client, None, t).await;
        let mut spec = container_spec(&["sh", "-c", "echo hello from $(hostname); exit 3"]);
        // Share the VM's UTS namespace: the output then shows the hostname
        // CreateSandbox set.
        spec.as_object_mut().unwrap().remove("hostname");
        let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "uts");
        let (text, exit_code) = vm.run_container(&client, &spec, t).await;
        eprintln!("output {text:?}, exit {exit_code}");
        assert_eq!(text, "hello from vm1\n");
        assert_eq!(exit_code, 3);
        let stats = client
            .container_stats(
                ContainerRef {
                    container_id: CONTAINER.into(),
                },
                t,
            )
            .await
            .unwrap();
        eprintln!("{stats:?}");
        client
            .destroy_sandbox(DestroySandboxRequest { poweroff: true }, t)
            .await
            .unwrap();
    })
    .await;
    if result.is_err() {
        panic!("timed out; console:\n{}", vm.console());
    }
    // The VM powers itself off.
    vm.wait_poweroff().await;
    eprintln!("console:\n{}", vm.console());
}
