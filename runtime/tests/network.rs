//! Pod networking on the host, against the real CNI plugins from
//! containernetworking-plugins (/usr/lib/cni): bridge, host-local, portmap.
//! Needs root; fails (never skips) without it or without the plugins.
//!
//! Every test has its own bridge (hk<pid><letter>), subnet (10.199.N.0/24),
//! host-local data dir and netns dir, and removes them at the end.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_runtime::network::{
    self, CniConfig, NetworkError, PodNetwork, PodNetworkRequest, PortMapping, TAP_NAME,
};
use serde_json::json;

const PLUGIN_DIR: &str = "/usr/lib/cni";

struct Env {
    dir: tempfile::TempDir,
    cfg: CniConfig,
    bridge: String,
    /// "10.199.N"
    net24: String,
    network_name: String,
    ipam_dir: PathBuf,
    tag: char,
}

impl Env {
    /// A conflist of bridge (MTU 1400, so that the tap's MTU visibly comes
    /// from eth0) + host-local + portmap.
    fn new(tag: char) -> Self {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "the network tests need root (netns, bridge, iptables)"
        );
        for p in ["bridge", "host-local", "portmap"] {
            assert!(
                Path::new(PLUGIN_DIR).join(p).exists(),
                "CNI plugin {p} missing in {PLUGIN_DIR}: install containernetworking-plugins"
            );
        }
        let pid = std::process::id();
        let letters = "abcdefgh";
        let k = letters.find(tag).expect("test tag") as u32;
        let bridge = format!("hk{}{}", pid % 10_000_000, tag);
        let net24 = format!("10.199.{}", (pid % 30) * 8 + k);
        let dir = tempfile::tempdir().unwrap();
        let ipam_dir = dir.path().join("ipam");
        let network_name = format!("husktest-{pid}-{tag}");
        let conf_dir = dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        // An empty first bin dir: plugins are found by searching in order.
        let empty_bin = dir.path().join("bin");
        std::fs::create_dir_all(&empty_bin).unwrap();
        let env = Env {
            cfg: CniConfig {
                conf_dir,
                bin_dirs: vec![empty_bin, PLUGIN_DIR.into()],
                netns_dir: dir.path().join("netns"),
            },
            dir,
            bridge,
            net24,
            network_name,
            ipam_dir,
            tag,
        };
        env.write_conflist(&format!("{}.0/24", env.net24), "portmap");
        env
    }

    fn write_conflist(&self, subnet: &str, second_plugin: &str) {
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": self.network_name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "mtu": 1400,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet}]],
                        "dataDir": self.ipam_dir,
                    }
                },
                {"type": second_plugin, "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::write(
            self.cfg.conf_dir.join("10-husktest.conflist"),
            serde_json::to_vec_pretty(&conf).unwrap(),
        )
        .unwrap();
    }

    fn pod_id(&self, n: u32) -> String {
        format!("nettest-{}-{}{}", std::process::id(), self.tag, n)
    }

    fn request(&self, n: u32, ports: Vec<PortMapping>) -> PodNetworkRequest {
        PodNetworkRequest {
            pod_id: self.pod_id(n),
            pod_name: format!("pod{n}"),
            pod_namespace: "default".into(),
            pod_uid: format!("uid-{n}"),
            port_mappings: ports,
            vm_nic: true,
        }
    }

    fn gateway(&self) -> Ipv4Addr {
        format!("{}.1", self.net24).parse().unwrap()
    }

    /// host-local's per-IP allocation files for our network.
    fn allocations(&self) -> Vec<String> {
        let d = self.ipam_dir.join(&self.network_name);
        let Ok(rd) = std::fs::read_dir(&d) else {
            return vec![];
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<IpAddr>().is_ok())
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        // setup made the netns dir a bind mount of itself (as iproute2 does
        // with /run/netns); undo it so that the temp dir can go.
        let _ = nix::mount::umount2(&self.cfg.netns_dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_ref()))
}

fn iptables_nat() -> String {
    let out = Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("iptables-save");
    assert!(out.status.success(), "iptables-save failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread inside the network namespace `ns` (an open nsfs fd
/// or file), so that checks see that namespace's links.
fn in_netns<T: Send + 'static>(ns: &OwnedFd, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.try_clone().unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn open_ns(path: &Path) -> OwnedFd {
    std::fs::File::open(path).unwrap().into()
}

/// Whether `name` exists in the calling thread's network namespace.
fn link_exists(name: &str) -> bool {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn mtu_of(name: &str) -> u32 {
    // /sys/class/net shows the namespace sysfs was mounted in, not this
    // thread's: ask the kernel through an ioctl on a socket made here.
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    // SAFETY: plain-data ifreq, zero is valid; SIOCGIFMTU fills ifru_mtu.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: valid socket and ifreq that outlive the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr) };
    assert!(
        r == 0,
        "SIOCGIFMTU {name}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: SIOCGIFMTU succeeded, so the union holds the MTU.
    unsafe { ifr.ifr_ifru.ifru_mtu as u32 }
}

fn v4(net: &PodNetwork) -> Ipv4Addr {
    match net.pod_ips()[0] {
        IpAddr::V4(a) => a,
        other => panic!("first pod IP {other} is not IPv4"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_get_distinct_ips_tap_and_mirred_filters() {
    let env = Env::new('a');
    let t0 = Instant::now();
    let a = network::setup(&env.cfg, &env.request(1, vec![]))
        .await
        .unwrap();
    let setup_ms = t0.elapsed().as_millis();
    let b = network::setup(&env.cfg, &env.request(2, vec![]))
        .await
        .unwrap();

    let (ia, ib) = (v4(&a), v4(&b));
    assert_ne!(ia, ib);
    for (net, ip) in [(&a, ia), (&b, ib)] {
        assert!(
            ip.to_string().starts_with(&format!("{}.", env.net24)),
            "{ip}"
        );
        assert_eq!(net.addresses, vec![(IpAddr::V4(ip), 24)]);
        assert_eq!(net.network_name, env.network_name);
        assert_eq!((net.ifname.as_str(), net.tap.as_str()), ("eth0", TAP_NAME));
        assert_eq!(net.mtu, 1400);
        assert_eq!(net.mac.len(), 17);
        assert_eq!(net.mac, net.mac.to_lowercase());
        // The bridge plugin reports the gateway without a route: a default
        // route via it is added for the guest.
        assert!(
            net.routes.contains(&network::RouteSpec {
                destination: "0.0.0.0/0".into(),
                gateway: Some(IpAddr::V4(env.gateway())),
            }),
            "{:?}",
            net.routes
        );
        assert!(mounted(&net.netns), "{} not mounted", net.netns.display());
        assert_eq!(
            net.netns,
            network::netns_path(&env.cfg, &net.netns.file_name().unwrap().to_string_lossy())
        );

        // The tap exists in the pod namespace with eth0's MTU, and eth0's
        // MAC is what the result reports.
        let ns = open_ns(&net.netns);
        let (tap_ok, tap_mtu, eth_mtu) = in_netns(&ns, || {
            (link_exists(TAP_NAME), mtu_of(TAP_NAME), mtu_of("eth0"))
        });
        assert!(tap_ok);
        assert_eq!((tap_mtu, eth_mtu), (1400, 1400));
        let result_mac = net.cni_result["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "eth0")
            .and_then(|i| i["mac"].as_str())
            .unwrap()
            .to_lowercase();
        assert_eq!(result_mac, net.mac);

        // Both ingress qdiscs and both redirects, read back via netlink.
        let pod_id = net
            .netns
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let seen = net.inspect(&pod_id).await.unwrap();
        let idx = |n: &str| seen.links.iter().find(|l| l.0 == n).unwrap().1;
        assert_eq!(
            seen.ingress_qdiscs,
            vec!["eth0".to_string(), TAP_NAME.to_string()]
        );
        assert_eq!(seen.redirects.len(), 2, "{seen:?}");
        assert_eq!(
            (
                seen.redirects[0].from.as_str(),
                seen.redirects[0].kind.as_str(),
                seen.redirects[0].to_ifindex
            ),
            ("eth0", "u32", idx(TAP_NAME))
        );
        assert_eq!(
            (
                seen.redirects[1].from.as_str(),
                seen.redirects[1].kind.as_str(),
                seen.redirects[1].to_ifindex
            ),
            (TAP_NAME, "u32", idx("eth0"))
        );

        let json = serde_json::to_string(net).unwrap();
        let back: PodNetwork = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, net);
    }

    let t1 = Instant::now();
    network::teardown(&env.cfg, &env.pod_id(1), Some(&a))
        .await
        .unwrap();
    let teardown_ms = t1.elapsed().as_millis();
    network::teardown(&env.cfg, &env.pod_id(2), Some(&b))
        .await
        .unwrap();
    assert!(env.allocations().is_empty(), "{:?}", env.allocations());
    eprintln!("setup of one pod: {setup_ms} ms, teardown: {teardown_ms} ms");
}

/// Reads frames from the tap fd (each behind a 10-byte virtio-net header)
/// until `want` accepts one or the deadline passes.
fn read_tap_until(fd: &OwnedFd, deadline: Instant, want: impl Fn(&[u8]) -> bool) -> bool {
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut pfd = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(200u16)).unwrap();
        if n == 0 {
            continue;
        }
        let len = nix::unistd::read(fd.as_raw_fd(), &mut buf).unwrap();
        if len > 10 && want(&buf[10..len]) {
            return true;
        }
    }
    false
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        sum += w;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// An Ethernet + IPv4 + UDP frame with a zero virtio-net header in front.
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; 10];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_goes_through_the_mirred_redirect_both_ways() {
    let env = Env::new('b');
    let req = env.request(1, vec![]);
    let net = network::setup(&env.cfg, &req).await.unwrap();
    let pod_ip = v4(&net);
    let tap = net.open_tap(&req.pod_id).await.unwrap();

    // Host -> pod: UDP to the pod IP makes the host ARP for it on the
    // bridge; the request enters eth0 and must come out of the tap.
    let host = UdpSocket::bind("0.0.0.0:0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let host = host.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = host.send_to(b"to-pod", (pod_ip, 9999));
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let tap_fd = tap.try_clone().unwrap();
    let got = tokio::task::spawn_blocking(move || {
        read_tap_until(&tap_fd, deadline, |f| {
            let ty = u16::from_be_bytes([f[12], f[13]]);
            (ty == 0x0806 && f.len() >= 42 && f[38..42] == pod_ip.octets())
                || (ty == 0x0800 && f.len() >= 34 && f[30..34] == pod_ip.octets())
        })
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    assert!(
        got,
        "no ARP request or IP packet for {pod_ip} arrived on the tap"
    );

    // Pod -> host: a UDP datagram written into the tap leaves through eth0
    // and reaches a host socket on the bridge's address.
    let gw = env.gateway();
    let rx = UdpSocket::bind((gw, 0)).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let port = rx.local_addr().unwrap().port();
    let br_mac = parse_mac(
        &std::fs::read_to_string(format!("/sys/class/net/{}/address", env.bridge)).unwrap(),
    );
    let frame = udp_frame(br_mac, parse_mac(&net.mac), pod_ip, gw, port, b"from-guest");
    let mut buf = [0u8; 64];
    let mut received = None;
    for _ in 0..20 {
        nix::unistd::write(&tap, &frame).unwrap();
        if let Ok((n, from)) = rx.recv_from(&mut buf) {
            received = Some((buf[..n].to_vec(), from));
            break;
        }
    }
    let (data, from) = received.expect("the frame written to the tap did not reach the host");
    assert_eq!(data, b"from-guest");
    assert_eq!(from.ip(), IpAddr::V4(pod_ip));

    drop(tap);
    network::teardown(&env.cfg, &req.pod_id, Some(&net))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_removes_everything_and_is_idempotent() {
    let env = Env::new('c');
    let host_port = 20000 + (std::process::id() % 10000) as u16;
    let ports = vec![PortMapping {
        protocol: "tcp".into(),
        container_port: 80,
        host_port,
        host_ip: String::new(),
    }];
    let req = env.request(1, ports.clone());
    let t0 = Instant::now();
    let net = network::setup(&env.cfg, &req).await.unwrap();
    eprintln!(
        "setup with a hostPort mapping: {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(net.port_mappings, ports);
    let ip = v4(&net).to_string();
    assert_eq!(env.allocations(), vec![ip.clone()]);
    let nat = iptables_nat();
    assert!(
        nat.contains(&req.pod_id),
        "portmap rules for {} missing:\n{nat}",
        req.pod_id
    );
    assert!(nat.contains(&format!("--dport {host_port}")), "{nat}");

    // Hold the namespace open so that we can look inside after teardown:
    // the tap must be deleted, not just go away with the namespace.
    let ns = open_ns(&net.netns);
    assert!(in_netns(&ns, || link_exists(TAP_NAME)));
    let t1 = Instant::now();
    network::teardown(&env.cfg, &req.pod_id, Some(&net))
        .await
        .unwrap();
    eprintln!(
        "teardown with a hostPort mapping: {} ms",
        t1.elapsed().as_millis()
    );
    assert!(
        !in_netns(&ns, || link_exists(TAP_NAME)),
        "tap survived teardown"
    );
    assert!(!in_netns(&ns, || link_exists("eth0")), "CNI DEL left eth0");
    drop(ns);
    assert!(!net.netns.exists());
    assert!(!mounted(&net.netns));
    assert!(env.allocations().is_empty(), "{:?}", env.allocations());
    let nat = iptables_nat();
    assert!(!nat.contains(&req.pod_id), "portmap rules left:\n{nat}");
    // Again: nothing there, still fine.
    network::teardown(&env.cfg, &req.pod_id, Some(&net))
        .await
        .unwrap();
    network::teardown(&env.cfg, &req.pod_id, None)
        .await
        .unwrap();

    // A crash after setup, before the result was persisted: teardown
    // without the result still releases the IP and the port rules.
    let req2 = env.request(2, ports.clone());
    let net2 = network::setup(&env.cfg, &req2).await.unwrap();
    assert_eq!(env.allocations().len(), 1);
    assert!(iptables_nat().contains(&req2.pod_id));
    network::teardown(&env.cfg, &req2.pod_id, None)
        .await
        .unwrap();
    assert!(!net2.netns.exists());
    assert!(!mounted(&net2.netns));
    assert!(env.allocations().is_empty(), "{:?}", env.allocations());
    assert!(!iptables_nat().contains(&req2.pod_id));

    // A crash right after the namespace was created: only the file and its
    // mount exist (made here the same way setup makes them).
    let id3 = env.pod_id(3);
    let ns3 = network::netns_path(&env.cfg, &id3);
    std::fs::write(&ns3, b"").unwrap();
    let target = ns3.clone();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
    })
    .join()
    .unwrap();
    assert!(mounted(&ns3));
    network::teardown(&env.cfg, &id3, None).await.unwrap();
    assert!(!ns3.exists());
    assert!(!mounted(&ns3));
    network::teardown(&env.cfg, &id3, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_errors_are_clear_and_leave_nothing_behind() {
    let env = Env::new('d');
    let req = env.request(1, vec![]);
    let ns = network::netns_path(&env.cfg, &req.pod_id);

    // A plugin that is not installed.
    env.write_conflist(&format!("{}.0/24", env.net24), "husk-no-such-plugin");
    let e = network::setup(&env.cfg, &req).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, NetworkError::PluginNotFound { .. }), "{e:?}");
    assert!(
        msg.contains(&req.pod_id) && msg.contains("husk-no-such-plugin"),
        "{msg}"
    );
    assert!(msg.contains(PLUGIN_DIR) && msg.contains("/bin"), "{msg}");
    assert!(!ns.exists());

    // No configuration directory at all.
    let cfg = CniConfig {
        conf_dir: env.dir.path().join("absent"),
        ..env.cfg.clone()
    };
    let e = network::setup(&cfg, &req).await.unwrap_err();
    assert!(e.is_not_configured(), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "pod {}: no CNI network config in {}",
            req.pod_id,
            cfg.conf_dir.display()
        )
    );
    assert!(network::configured_network(&cfg).is_err());
    assert!(!ns.exists());

    // host-local rejects the subnet: the bridge plugin's CNI error comes
    // back, and the namespace is gone again.
    env.write_conflist("10.199.0.0/33", "portmap");
    let e = network::setup(&env.cfg, &req).await.unwrap_err();
    let msg = e.to_string();
    match &e {
        NetworkError::Plugin {
            plugin,
            command,
            failure,
            ..
        } => {
            assert_eq!((plugin.as_str(), *command), ("bridge", "ADD"), "{msg}");
            assert!(failure.code().is_some(), "{msg}");
        }
        other => panic!("expected a plugin failure, got {other:?}"),
    }
    assert!(
        msg.contains(&req.pod_id) && msg.contains("10.199.0.0/33"),
        "{msg}"
    );
    assert!(!ns.exists());
    assert!(!mounted(&ns));
    assert!(env.allocations().is_empty());
    // The working config again: the same pod id sets up fine, so the
    // failed attempt left nothing of ours in the way. The bridge goes
    // first: observed here, bridge plugin 1.1.1 fails its next ADD with
    // "could not set bridge's mac: invalid argument" on the port-less
    // bridge its own failed ADD left behind (plugin state, not ours).
    let _ = Command::new("ip")
        .args(["link", "del", &env.bridge])
        .status();
    env.write_conflist(&format!("{}.0/24", env.net24), "portmap");
    assert_eq!(
        network::configured_network(&env.cfg).unwrap(),
        env.network_name
    );
    let net = network::setup(&env.cfg, &req).await.unwrap();
    network::teardown(&env.cfg, &req.pod_id, Some(&net))
        .await
        .unwrap();
}
