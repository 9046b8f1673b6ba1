use super::*;

#[test]
fn macs() {
    assert_eq!(
        parse_mac("02:00:0a:0B:ff:10").unwrap(),
        [2, 0, 10, 11, 255, 16]
    );
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "02-00-00-00-00-01",
        "02:00:00:00:00:1",
        "02:00:00:00:00:+1",
        "02:00:00:00:00:0g",
        "020000000001",
        "02:00:00:00:00:01:",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad:?}");
    }
    assert!(parse_mac("00:00:00:00:00:00").unwrap_err().contains("zero"));
    assert!(parse_mac("01:00:5e:00:00:01")
        .unwrap_err()
        .contains("multicast"));
    assert_eq!(format_mac(&[2, 0, 10, 11, 255, 16]), "02:00:0a:0b:ff:10");
}

#[test]
fn interface_names() {
    for good in ["eth0", "a", "net1.100", "abcdefghijklmno"] {
        validate_ifname(good).unwrap();
    }
    for bad in [
        "",
        ".",
        "..",
        "abcdefghijklmnop",
        "a/b",
        "a:b",
        "a b",
        "a\tb",
        "eth0\n",
        "a\0b",
    ] {
        assert!(validate_ifname(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn cidrs() {
    assert_eq!(
        parse_cidr("0.0.0.0/0").unwrap(),
        ("0.0.0.0".parse().unwrap(), 0)
    );
    assert_eq!(parse_cidr("::/0").unwrap(), ("::".parse().unwrap(), 0));
    assert_eq!(
        parse_cidr("10.1.0.0/16").unwrap(),
        ("10.1.0.0".parse().unwrap(), 16)
    );
    assert_eq!(
        parse_cidr("10.1.2.3/32").unwrap(),
        ("10.1.2.3".parse().unwrap(), 32)
    );
    assert_eq!(
        parse_cidr("fd00:1::/64").unwrap(),
        ("fd00:1::".parse().unwrap(), 64)
    );
    assert!(parse_cidr("10.1.2.3/16")
        .unwrap_err()
        .contains("10.1.0.0/16"));
    assert!(parse_cidr("fd00::1/64").unwrap_err().contains("fd00::/64"));
    for bad in [
        "10.0.0.0",
        "10.0.0.0/",
        "10.0.0.0/33",
        "10.0.0.0/+8",
        "10.0.0.0/-1",
        "10.0.0.0/0008",
        "::/129",
        "x/8",
        "/8",
        "10.0.0.0/8/8",
    ] {
        assert!(parse_cidr(bad).is_err(), "{bad:?}");
    }
}
