//! The guest's network configuration against the real kernel. Each test
//! runs on a thread of its own that first moves into a fresh network
//! namespace (unshare(CLONE_NEWNET) affects only the calling thread), so
//! the host's own network is never touched; the namespace and its veths go
//! away with the thread. The test interfaces are created through rtnetlink;
//! the result is read back with `ip -j` (iproute2), an implementation
//! independent of the one under test. Needs root.

mod common;
mod qemu_vm;

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_agent::error::AgentError;
use husk_agent::network::{configure, configure_with_wait, validate};
use husk_proto::agent::{
    CreateSandboxRequest, DestroySandboxRequest, Interface, IpAddress, NetworkConfig, Route,
};
use husk_proto::ttrpc::Code;
use qemu_vm::{container_spec, create_sandbox, QemuVm};
use rtnetlink::LinkVeth;
use serde_json::Value;

const MAC_A: &str = "02:00:00:00:00:0a";
const MAC_B: &str = "02:00:00:00:00:0b";

/// Runs `f` on a new thread inside a new, empty network namespace, with a
/// current-thread tokio runtime (its tasks stay on that thread, so in that
/// namespace too).
fn in_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let t = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): these tests need root");
        let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let process = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_ne!(
            own, process,
            "the test thread must not be in the host's netns"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f());
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

fn mac_bytes(mac: &str) -> Vec<u8> {
    mac.split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// A veth pair in the current namespace: `name` with `mac`, and its peer
/// up so that `name` gets a carrier once it is up, like a virtio-net link.
async fn add_veth(name: &str, mac: &str, peer: &str) {
    let (conn, handle, _) = rtnetlink::new_connection().unwrap();
    let conn = tokio::spawn(conn);
    handle
        .link()
        .add(LinkVeth::new(name, peer).address(mac_bytes(mac)).build())
        .execute()
        .await
        .unwrap_or_else(|e| panic!("creating veth {name}: {e}"));
    conn.abort();
    ip(&["link", "set", peer, "up"]);
}

/// Runs `ip ARGS` in the calling thread's namespace (a child inherits the
/// namespaces of the thread that spawns it) and returns its stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ip_json(args: &[&str]) -> Vec<Value> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = ip(&full);
    if out.trim().is_empty() {
        return vec![];
    }
    serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|e| panic!("ip {args:?}: {e}: {out}"))
}

fn link(name: &str) -> Value {
    let mut links = ip_json(&["link", "show", "dev", name]);
    assert_eq!(links.len(), 1, "{links:?}");
    links.remove(0)
}

fn link_names() -> Vec<String> {
    ip_json(&["link", "show"])
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .collect()
}

fn iface(mac: &str, name: &str, mtu: u32, addresses: &[(&str, u32)]) -> Interface {
    Interface {
        mac: mac.into(),
        name: name.into(),
        mtu,
        addresses: addresses
            .iter()
            .map(|(a, p)| IpAddress {
                address: (*a).into(),
                prefix_len: *p,
            })
            .collect(),
    }
}

fn route(destination: &str, gateway: &str, device: &str) -> Route {
    Route {
        destination: destination.into(),
        gateway: gateway.into(),
        device: device.into(),
    }
}

fn pod_config() -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![iface(
            MAC_A,
            "eth0",
            1400,
            &[("10.88.0.5", 16), ("fd00:88::5", 64)],
        )],
        routes: vec![
            route("0.0.0.0/0", "10.88.0.1", ""),
            route("::/0", "fd00:88::1", ""),
            route("192.168.50.0/24", "", "eth0"),
            route("10.200.0.0/16", "10.88.0.1", "eth0"),
        ],
    }
}

/// The routes of a family as (dst, gateway, dev, scope) with the kernel's
/// own prefix routes left out.
fn routes(family: &str) -> Vec<(String, String, String, String)> {
    let mut r: Vec<_> = ip_json(&[family, "route", "show", "table", "main"])
        .iter()
        .filter(|r| r["protocol"].as_str() != Some("kernel"))
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            (s("dst"), s("gateway"), s("dev"), s("scope"))
        })
        .collect();
    r.sort();
    r
}

fn t4(d: &str, g: &str, dev: &str, scope: &str) -> (String, String, String, String) {
    (d.into(), g.into(), dev.into(), scope.into())
}

fn assert_pod_network() {
    let names = link_names();
    assert!(
        names.contains(&"eth0".to_owned()) && !names.contains(&"hv0".to_owned()),
        "{names:?}"
    );
    let l = link("eth0");
    assert_eq!(l["address"], MAC_A);
    assert_eq!(l["mtu"], 1400);
    let flags: Vec<&str> = l["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(flags.contains(&"UP"), "{flags:?}");
    assert!(flags.contains(&"LOWER_UP"), "{flags:?}");

    let addrs = &ip_json(&["addr", "show", "dev", "eth0"])[0]["addr_info"];
    let find = |family: &str, local: &str| {
        addrs
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["family"] == family && a["local"] == local)
            .unwrap_or_else(|| panic!("{local} not on eth0: {addrs}"))
            .clone()
    };
    let v4 = find("inet", "10.88.0.5");
    assert_eq!(v4["prefixlen"], 16);
    let v6 = find("inet6", "fd00:88::5");
    assert_eq!(v6["prefixlen"], 64);
    assert_eq!(v6["nodad"], true, "{v6}");
    assert!(v6.get("tentative").is_none(), "{v6}");
    // Usable at once: binding a tentative address fails (EADDRNOTAVAIL).
    UdpSocket::bind("[fd00:88::5]:0".parse::<SocketAddr>().unwrap())
        .expect("binding the IPv6 address right after configure");
    UdpSocket::bind("10.88.0.5:0".parse::<SocketAddr>().unwrap()).unwrap();

    assert_eq!(
        routes("-4"),
        [
            t4("10.200.0.0/16", "10.88.0.1", "eth0", ""),
            t4("192.168.50.0/24", "", "eth0", "link"),
            t4("default", "10.88.0.1", "eth0", ""),
        ]
    );
    assert_eq!(
        routes("-6"),
        [t4("default", "fd00:88::1", "eth0", "")],
        "{:?}",
        ip_json(&["-6", "route", "show"])
    );
}

#[test]
fn configures_name_mtu_addresses_up_and_routes_idempotently() {
    in_netns(|| async {
        add_veth("hv0", MAC_A, "peer0").await;
        let cfg = pod_config();
        configure(&cfg).await.unwrap();
        assert_pod_network();
        // CreateSandbox twice: existing addresses and routes are fine.
        configure(&cfg).await.unwrap();
        assert_pod_network();
    });
}

#[test]
fn waits_for_an_interface_that_appears_late() {
    in_netns(|| async {
        let t0 = Instant::now();
        let late = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            add_veth("hv0", MAC_A, "peer0").await;
        });
        configure_with_wait(&pod_config(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(400));
        late.await.unwrap();
        assert_pod_network();
    });
}

#[test]
fn unknown_mac_times_out_listing_the_macs_present() {
    in_netns(|| async {
        add_veth("hv0", MAC_A, "peer0").await;
        let mut cfg = pod_config();
        cfg.interfaces[0].mac = "02:00:00:00:00:99".into();
        let t0 = Instant::now();
        let err = configure_with_wait(&cfg, Duration::from_millis(300))
            .await
            .unwrap_err();
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        let AgentError::NotFound(msg) = &err else {
            panic!("{err:?}")
        };
        for part in [
            "02:00:00:00:00:99",
            "network.interfaces[0].mac",
            "hv0 (02:00:00:00:00:0a)",
            "lo (00:00:00:00:00:00)",
        ] {
            assert!(msg.contains(part), "{part:?} not in {msg:?}");
        }
        // Nothing was changed.
        assert_eq!(link("hv0")["mtu"], 1500);
    });
}

fn assert_invalid(err: AgentError, field: &str) {
    match &err {
        AgentError::InvalidArgument(msg) => assert!(
            msg.starts_with(&format!("{field}: ")),
            "{msg:?} does not name {field}"
        ),
        other => panic!("{field}: expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn bad_prefix_is_refused_before_anything_changes() {
    in_netns(|| async {
        add_veth("hv0", MAC_A, "peer0").await;
        for (addr, prefix) in [("10.88.0.5", 33), ("fd00:88::5", 129), ("10.88.0.5", 256)] {
            let mut cfg = pod_config();
            cfg.interfaces[0].addresses[0] = IpAddress {
                address: addr.into(),
                prefix_len: prefix,
            };
            let err = configure_with_wait(&cfg, Duration::from_millis(100))
                .await
                .unwrap_err();
            assert_invalid(err, "network.interfaces[0].addresses[0].prefix_len");
        }
        let l = link("hv0");
        assert_eq!(l["mtu"], 1500);
        assert!(ip_json(&["addr", "show", "dev", "hv0"])[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["family"] != "inet"));
    });
}

#[test]
fn bad_gateways_are_refused() {
    in_netns(|| async {
        add_veth("hv0", MAC_A, "peer0").await;
        // Checked before anything changes.
        for gw in ["fd00:88::1", "10.88.0.300", "224.0.0.1", "0.0.0.0"] {
            let mut cfg = pod_config();
            cfg.routes[0].gateway = gw.into();
            let err = configure_with_wait(&cfg, Duration::from_millis(100))
                .await
                .unwrap_err();
            assert_invalid(err, "network.routes[0].gateway");
        }
        assert_eq!(link("hv0")["mtu"], 1500);
        // Well formed, but in no subnet of the pod: the kernel refuses it.
        let mut cfg = pod_config();
        cfg.routes[0].gateway = "172.16.0.1".into();
        let err = configure_with_wait(&cfg, Duration::from_millis(100))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert_invalid(err, "network.routes[0].gateway");
        assert!(msg.contains("172.16.0.1"), "{msg}");
    });
}

#[test]
fn a_gateway_behind_a_link_scope_route_works_in_any_order() {
    // The shape of point-to-point CNI plugins: a /32 address, the gateway
    // reachable only through a link-scope route listed after its user.
    in_netns(|| async {
        add_veth("hv0", MAC_A, "peer0").await;
        let cfg = NetworkConfig {
            interfaces: vec![iface(MAC_A, "eth0", 0, &[("10.1.2.3", 32)])],
            routes: vec![
                route("0.0.0.0/0", "169.254.1.1", ""),
                route("169.254.1.1/32", "", "eth0"),
            ],
        };
        configure(&cfg).await.unwrap();
        assert_eq!(
            routes("-4"),
            [
                t4("169.254.1.1", "", "eth0", "link"),
                t4("default", "169.254.1.1", "eth0", ""),
            ]
        );
        assert_eq!(link("eth0")["mtu"], 1500);
    });
}

#[test]
fn two_interfaces_swap_names() {
    in_netns(|| async {
        add_veth("eth0", MAC_A, "peer0").await;
        add_veth("eth1", MAC_B, "peer1").await;
        let cfg = NetworkConfig {
            interfaces: vec![
                iface(MAC_A, "eth1", 0, &[("10.1.0.2", 24)]),
                iface(MAC_B, "eth0", 0, &[("10.2.0.2", 24)]),
            ],
            routes: vec![route("0.0.0.0/0", "10.2.0.1", "eth0")],
        };
        configure(&cfg).await.unwrap();
        assert_eq!(link("eth1")["address"], MAC_A);
        assert_eq!(link("eth0")["address"], MAC_B);
        assert_eq!(routes("-4"), [t4("default", "10.2.0.1", "eth0", "")]);
    });
}

#[test]
fn a_name_held_by_an_unconfigured_interface_is_refused() {
    in_netns(|| async {
        add_veth("hv0", MAC_A, "eth0").await;
        let err = configure_with_wait(&pod_config(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_invalid(err, "network.interfaces[0].name");
        assert!(link_names().contains(&"hv0".to_owned()));
    });
}

#[test]
fn validation_names_the_bad_field() {
    type Edit = fn(&mut NetworkConfig);
    let cases: &[(Edit, &str)] = &[
        (
            |c| c.interfaces[0].mac = "02:00:00:00:00".into(),
            "network.interfaces[0].mac",
        ),
        (
            |c| c.interfaces[0].mac = "02-00-00-00-00-0a".into(),
            "network.interfaces[0].mac",
        ),
        (
            |c| c.interfaces[0].mac = "01:00:5e:00:00:01".into(),
            "network.interfaces[0].mac",
        ),
        (
            |c| c.interfaces[0].name = "".into(),
            "network.interfaces[0].name",
        ),
        (
            |c| c.interfaces[0].name = "a-very-long-name".into(),
            "network.interfaces[0].name",
        ),
        (
            |c| c.interfaces[0].name = "eth/0".into(),
            "network.interfaces[0].name",
        ),
        (
            |c| c.interfaces[0].name = "eth 0".into(),
            "network.interfaces[0].name",
        ),
        (|c| c.interfaces[0].mtu = 67, "network.interfaces[0].mtu"),
        (|c| c.interfaces[0].mtu = 65536, "network.interfaces[0].mtu"),
        // IPv6 needs 1280.
        (|c| c.interfaces[0].mtu = 1000, "network.interfaces[0].mtu"),
        (
            |c| c.interfaces[0].addresses[1].address = "fd00::5/64".into(),
            "network.interfaces[0].addresses[1].address",
        ),
        (
            |c| c.interfaces[0].addresses[0].address = "ff02::1".into(),
            "network.interfaces[0].addresses[0].address",
        ),
        (
            |c| c.interfaces[0].addresses[0].prefix_len = 33,
            "network.interfaces[0].addresses[0].prefix_len",
        ),
        (
            |c| c.interfaces.push(iface(MAC_A, "eth1", 0, &[])),
            "network.interfaces[1].mac",
        ),
        (
            |c| c.interfaces.push(iface(MAC_B, "eth0", 0, &[])),
            "network.interfaces[1].name",
        ),
        (
            |c| c.routes[2].destination = "192.168.50.0".into(),
            "network.routes[2].destination",
        ),
        (
            |c| c.routes[2].destination = "192.168.50.1/24".into(),
            "network.routes[2].destination",
        ),
        (
            |c| c.routes[2].destination = "192.168.50.0/33".into(),
            "network.routes[2].destination",
        ),
        (
            |c| c.routes[1].destination = "::/129".into(),
            "network.routes[1].destination",
        ),
        (
            |c| c.routes[1].gateway = "10.88.0.1".into(),
            "network.routes[1].gateway",
        ),
        (
            |c| c.routes[1].gateway = "fe80::1".into(),
            "network.routes[1].device",
        ),
        (
            |c| c.routes[2].device = "eth9".into(),
            "network.routes[2].device",
        ),
        (|c| c.routes[2].device = "".into(), "network.routes[2]"),
        (
            |c| c.routes.push(route("0.0.0.0/0", "10.88.0.2", "eth0")),
            "network.routes[4].destination",
        ),
    ];
    validate(&pod_config()).unwrap();
    for (edit, field) in cases {
        let mut cfg = pod_config();
        edit(&mut cfg);
        assert_invalid(validate(&cfg).unwrap_err(), field);
    }
    // A link-local gateway with a device is fine.
    let mut cfg = pod_config();
    cfg.routes[1] = route("::/0", "fe80::1", "eth0");
    validate(&cfg).unwrap();
    validate(&NetworkConfig::default()).unwrap();
}

/// The real agent binary, outside a VM: CreateSandbox refuses a bad network
/// config with InvalidArgument naming the field, and accepts a good one.
#[tokio::test]
async fn create_sandbox_validates_the_network_config() {
    let agent = common::Agent::start().await;
    let c = agent.client().await;
    let req = |network| CreateSandboxRequest {
        sandbox_id: "sb1".into(),
        hostname: "pod".into(),
        share_tag: String::new(),
        network: Some(network),
    };
    let mut bad = pod_config();
    bad.routes[0].gateway = "fd00:88::1".into();
    let err = c.create_sandbox(req(bad), common::T).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(
        err.to_string().contains("network.routes[0].gateway"),
        "{err}"
    );
    // Accepted, and nothing configured: outside a VM the agent leaves the
    // host's network alone (configuring would fail: no interface here has
    // MAC_A).
    c.create_sandbox(req(pod_config()), common::T)
        .await
        .unwrap();
}

/// Runs `args` in the network namespace of process `pid`.
fn in_ns_of(pid: u32, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "--"])
        .args(args)
        .output()
        .expect("nsenter")
}

/// A real guest: the static agent as PID 1 under QEMU (TCG) with a
/// virtio-net device on a tap. QEMU runs in a network namespace of its own
/// (made for it at spawn, gone when it exits), so the tap never appears in
/// the host's. CreateSandbox configures the guest; a container in the VM's
/// network namespace shows the result, and the tap side pings the guest
/// from its subnet and from an address only the guest's default route
/// reaches. Manual, like vm_boot.rs:
///
/// HUSK_GUEST_DIR=/dir/with/vmlinuz+initrd.img HUSK_VSOCK_BIN=/path/husk-vsock \
///   cargo test --release -p husk-agent --test network -- --ignored --nocapture
#[tokio::test]
#[ignore = "manual: needs a guest image with this agent, husk-vsock, virtiofsd and a minute of QEMU TCG"]
async fn guest_network_in_a_vm() {
    let (mut vm, mut qemu) = QemuVm::prepare("husk-agent-net-vm").await;
    qemu.args([
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
    ])
    .args([
        "-device",
        &format!("virtio-net-device,netdev=n0,mac={MAC_A}"),
    ]);
    // SAFETY: between fork and exec the closure only makes one syscall,
    // unshare(2), which is async-signal-safe, and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut qemu, || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(Into::into)
        });
    }
    let qemu_pid = vm.spawn(qemu);
    // The pod's side of the link, as a CNI plugin would leave it: the
    // gateway's addresses on the tap, plus one address (192.0.2.1) outside
    // the pod's subnet that only the guest's default route leads back to.
    let t = Instant::now();
    while !in_ns_of(qemu_pid, &["ip", "link", "show", "tap0"])
        .status
        .success()
    {
        assert!(t.elapsed() < Duration::from_secs(30), "tap0 never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for args in [
        &["ip", "addr", "add", "10.0.2.2/24", "dev", "tap0"][..],
        &["ip", "addr", "add", "192.0.2.1/32", "dev", "tap0"],
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "fec0::2/64",
            "dev",
            "tap0",
            "nodad",
        ],
        &["ip", "link", "set", "tap0", "up"],
    ] {
        let out = in_ns_of(qemu_pid, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let network = NetworkConfig {
        interfaces: vec![iface(
            MAC_A,
            "pod0",
            1400,
            &[("10.0.2.15", 24), ("fec0::15", 64)],
        )],
        routes: vec![
            route("0.0.0.0/0", "10.0.2.2", ""),
            route("::/0", "fec0::2", "pod0"),
            route("192.168.50.0/24", "", "pod0"),
        ],
    };
    let result = tokio::time::timeout(Duration::from_secs(300), async {
        let (_, client) = vm.agent().await;
        let t = Some(Duration::from_secs(60));
        let started = Instant::now();
        create_sandbox(&client, Some(network), t).await;
        eprintln!(
            "CreateSandbox with the network took {:?}",
            started.elapsed()
        );
        let mut pings = Vec::new();
        for args in [
            &["busybox", "ping", "-c", "1", "-W", "5", "10.0.2.15"][..],
            &[
                "busybox",
                "ping",
                "-c",
                "1",
                "-W",
                "5",
                "-I",
                "192.0.2.1",
                "10.0.2.15",
            ],
            &["busybox", "ping", "-6", "-c", "1", "-W", "5", "fec0::15"],
        ] {
            let out = in_ns_of(qemu_pid, args);
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            pings.push((args.join(" "), out.status.success(), text));
        }
        let script = "busybox ip -o link show pod0; busybox ip -o addr show dev pod0; \
             busybox ip route; busybox ip -6 route; echo done";
        let mut spec = container_spec(&["sh", "-c", script]);
        // The VM's own network namespace: the one the agent configured.
        let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
        let (text, exit_code) = vm.run_container(&client, &spec, t).await;
        eprintln!("guest output (exit {exit_code}):\n{text}");
        client
            .destroy_sandbox(DestroySandboxRequest { poweroff: true }, t)
            .await
            .unwrap();
        (text, pings)
    })
    .await;
    let (text, pings) = match result {
        Ok(r) => r,
        Err(_) => panic!("timed out; console:\n{}", vm.console()),
    };
    for want in [
        "pod0: <",
        ",UP,",
        "mtu 1400",
        "link/ether 02:00:00:00:00:0a",
        "inet 10.0.2.15/24",
        "inet6 fec0::15/64",
        "default via 10.0.2.2 dev pod0",
        "192.168.50.0/24 dev pod0",
        "default via fec0::2 dev pod0",
        "done",
    ] {
        assert!(
            text.contains(want),
            "{want:?} not in the guest's output:\n{text}"
        );
    }
    let v6 = text.lines().find(|l| l.contains("fec0::15/64")).unwrap();
    assert!(!v6.contains("tentative"), "{v6}");
    for (cmd, ok, out) in &pings {
        eprintln!("{cmd}: {ok}\n{out}");
    }
    for (cmd, ok, out) in &pings {
        assert!(ok, "{cmd} from the tap side failed:\n{out}");
    }
    vm.wait_poweroff().await;
}
