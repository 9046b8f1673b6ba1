use super::*;
use serde_json::json;

fn write(dir: &Path, name: &str, v: &Value) {
    std::fs::write(dir.join(name), serde_json::to_vec(v).unwrap()).unwrap();
}

#[test]
fn missing_dir_and_empty_dir_are_not_found() {
    let t = tempfile::tempdir().unwrap();
    assert!(matches!(
        load(&t.path().join("nope")),
        Err(LoadError::NotFound)
    ));
    std::fs::write(t.path().join("README"), "x").unwrap();
    std::fs::write(t.path().join("x.conf.bak"), "x").unwrap();
    assert!(matches!(load(t.path()), Err(LoadError::NotFound)));
}

#[test]
fn first_file_in_lexical_order_wins_and_conf_is_wrapped() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "20-list.conflist",
        &json!({"cniVersion": "1.0.0", "name": "second", "plugins": [{"type": "bridge"}]}),
    );
    write(
        t.path(),
        "10-single.conf",
        &json!({"cniVersion": "0.4.0", "name": "first", "type": "ptp", "ipam": {"type": "host-local"}}),
    );
    let (path, list) = load(t.path()).unwrap();
    assert_eq!(path.file_name().unwrap(), "10-single.conf");
    assert_eq!(list.name, "first");
    assert_eq!(list.cni_version, "0.4.0");
    assert_eq!(list.plugins.len(), 1);
    assert_eq!(list.plugin_type(0), "ptp");
    // name/cniVersion moved to the list, the rest stays with the plugin.
    assert!(!list.plugins[0].contains_key("name"));
    assert_eq!(list.plugins[0]["ipam"]["type"], "host-local");
    assert_eq!(list.json["plugins"][0]["type"], "ptp");
    // The persisted form loads back the same.
    let again = ConfList::from_json(list.json.clone()).unwrap();
    assert_eq!(again.name, "first");

    std::fs::remove_file(t.path().join("10-single.conf")).unwrap();
    let (_, list) = load(t.path()).unwrap();
    assert_eq!(list.name, "second");
    assert_eq!(list.plugin_type(0), "bridge");
}

#[test]
fn json_file_may_hold_a_list() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "05-net.json",
        &json!({"cniVersion": "1.1.0", "name": "j", "plugins": [{"type": "bridge"}, {"type": "portmap"}]}),
    );
    let (_, list) = load(t.path()).unwrap();
    assert_eq!(list.plugins.len(), 2);
    assert_eq!(list.plugin_type(1), "portmap");
}

#[test]
fn invalid_configs_are_rejected_with_reasons() {
    for (v, want) in [
        (
            json!({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}),
            "name",
        ),
        (
            json!({"name": "n", "plugins": [{"type": "x"}]}),
            "cniVersion",
        ),
        (
            json!({"cniVersion": "0.2.0", "name": "n", "plugins": [{"type": "x"}]}),
            "not supported",
        ),
        (
            json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}),
            "empty",
        ),
        (
            json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"a": 1}]}),
            "type",
        ),
        (
            json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../x"}]}),
            "invalid type",
        ),
    ] {
        let e = ConfList::from_json(v).unwrap_err();
        assert!(e.contains(want), "{e}");
    }
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("a.conflist"), "{not json").unwrap();
    assert!(matches!(load(t.path()), Err(LoadError::Invalid(_, _))));
}

fn list() -> ConfList {
    ConfList::from_json(json!({
        "cniVersion": "1.0.0",
        "name": "podnet",
        "plugins": [
            {"type": "bridge", "bridge": "cni0"},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "tuning", "capabilities": {"portMappings": false}}
        ]
    }))
    .unwrap()
}

#[test]
fn stdin_gets_name_version_prev_result_and_declared_capabilities_only() {
    let l = list();
    let ports = [PortMapping {
        protocol: "tcp".into(),
        container_port: 80,
        host_port: 8080,
        host_ip: "".into(),
    }];
    let first = plugin_stdin(&l, 0, None, &ports);
    assert_eq!(first["name"], "podnet");
    assert_eq!(first["cniVersion"], "1.0.0");
    assert_eq!(first["bridge"], "cni0");
    assert!(first.get("prevResult").is_none());
    assert!(first.get("runtimeConfig").is_none());

    let prev = json!({"cniVersion": "1.0.0", "ips": []});
    let pm = plugin_stdin(&l, 1, Some(&prev), &ports);
    assert_eq!(pm["prevResult"], prev);
    assert_eq!(
        pm["runtimeConfig"]["portMappings"],
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}])
    );
    let tuning = plugin_stdin(&l, 2, Some(&prev), &ports);
    assert!(tuning.get("runtimeConfig").is_none());
}

#[test]
fn cni_args_and_versions() {
    assert_eq!(
        k8s_cni_args("abc", "web", "default", "u-1"),
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
    );
    assert_eq!(k8s_cni_args("a", "x;y=z", "n", "u"), "IgnoreUnknown=1;K8S_POD_NAMESPACE=n;K8S_POD_NAME=x_y_z;K8S_POD_INFRA_CONTAINER_ID=a;K8S_POD_UID=u");
    assert!(!del_takes_prev_result("0.3.1"));
    assert!(del_takes_prev_result("0.4.0"));
    assert!(del_takes_prev_result("1.1.0"));
}

/// A bridge + host-local result as plugins 1.x print it for 0.4.0.
const RESULT_040: &str = r#"{
    "cniVersion": "0.4.0",
    "interfaces": [
        {"name": "cni0", "mac": "6e:3c:1f:00:aa:01"},
        {"name": "veth1234", "mac": "7a:00:00:00:00:02"},
        {"name": "eth0", "mac": "0A:58:0A:01:00:05", "sandbox": "/run/husk/netns/p1"}
    ],
    "ips": [
        {"version": "4", "interface": 2, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
        {"version": "6", "interface": 2, "address": "fd00::5/64", "gateway": "fd00::1"}
    ],
    "routes": [{"dst": "10.96.0.0/12"}, {"dst": "::/0", "gw": "fd00::1"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
}"#;

#[test]
fn parses_040_result() {
    let r = parse_result(&serde_json::from_str(RESULT_040).unwrap(), "eth0").unwrap();
    assert_eq!(r.mac.as_deref(), Some("0a:58:0a:01:00:05"));
    assert_eq!(
        r.addresses,
        vec![
            ("10.1.0.5".parse().unwrap(), 24),
            ("fd00::5".parse().unwrap(), 64)
        ]
    );
    assert_eq!(
        r.routes,
        vec![
            // No gw: through the IPAM gateway of its family.
            RouteSpec {
                destination: "10.96.0.0/12".into(),
                gateway: Some("10.1.0.1".parse().unwrap())
            },
            RouteSpec {
                destination: "::/0".into(),
                gateway: Some("fd00::1".parse().unwrap())
            },
            // Added: the result has the IPv4 gateway but no v4 default.
            RouteSpec {
                destination: "0.0.0.0/0".into(),
                gateway: Some("10.1.0.1".parse().unwrap())
            },
        ]
    );
    assert_eq!(r.dns.nameservers, vec!["10.96.0.10"]);
    assert_eq!(r.dns.search, vec!["svc.cluster.local"]);
}

#[test]
fn parses_100_result_and_skips_other_interfaces() {
    let v = json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/x"},
            {"name": "net1", "mac": "aa:bb:cc:dd:ee:00", "sandbox": "/x"}
        ],
        "ips": [
            {"interface": 0, "address": "192.168.7.9/16"},
            {"interface": 1, "address": "172.16.0.9/24", "gateway": "172.16.0.1"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "192.168.0.1"}]
    });
    let r = parse_result(&v, "eth0").unwrap();
    assert_eq!(r.addresses, vec![("192.168.7.9".parse().unwrap(), 16)]);
    assert_eq!(
        r.routes,
        vec![RouteSpec {
            destination: "0.0.0.0/0".into(),
            gateway: Some("192.168.0.1".parse().unwrap())
        }]
    );
    assert_eq!(r.dns, DnsConfig::default());
    // No interface index: the address is the container's.
    let v = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.2/8"}]});
    let r = parse_result(&v, "eth0").unwrap();
    assert_eq!(r.addresses, vec![("10.0.0.2".parse().unwrap(), 8)]);
    assert!(r.routes.is_empty());
    assert_eq!(r.mac, None);
}

#[test]
fn bad_results_are_errors() {
    for (v, want) in [
        (json!({"cniVersion": "0.2.0", "ip4": {}}), "not supported"),
        (
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2"}]}),
            "CIDR",
        ),
        (
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/33"}]}),
            "prefix",
        ),
        (
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/8", "interface": 3}]}),
            "interface 3",
        ),
        (
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/8", "gateway": "fd00::1"}]}),
            "family",
        ),
        (
            json!({"cniVersion": "1.0.0", "routes": [{"dst": "x"}]}),
            "CIDR",
        ),
        (json!([1, 2]), "malformed"),
    ] {
        let e = parse_result(&v, "eth0").unwrap_err();
        assert!(e.contains(want), "{v}: {e}");
    }
}

#[test]
fn plugin_failure_messages() {
    let f = PluginFailure::Cni {
        code: 7,
        msg: "failed to allocate".into(),
        details: "range full".into(),
        stderr: "".into(),
    };
    assert_eq!(f.to_string(), "CNI error 7: failed to allocate: range full");
    assert_eq!(f.code(), Some(7));
    let f = PluginFailure::Exit {
        status: "exit status: 1".into(),
        stderr: "boom\n".into(),
    };
    assert_eq!(
        f.to_string(),
        "exited with exit status: 1 without a CNI error; stderr: boom"
    );
}
