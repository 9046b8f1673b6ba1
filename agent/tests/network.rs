//! The guest's network configuration against the real kernel. Each test
//! runs on a thread of its own that first moves into a fresh network
//! namespace (unshare(CLONE_NEWNET) affects only the calling thread), so
//! the host's own network is never touched; the namespace and its veths go
//! away with the thread. The test interfaces are created through rtnetlink;
//! the result is read back with `ip -j` (iproute2), an implementation
//! independent of the one under test. Needs root.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_agent::error::AgentError;
use husk_agent::network::{configure, configure_with_wait, validate};
use husk_proto::agent::{Interface, IpAddress, NetworkConfig, Route};
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
