//! The pod network inside the guest: the interfaces the host's CNI set up,
//! found by MAC, get their name, MTU and addresses, then the routes are
//! added. Everything goes through rtnetlink in the network namespace of the
//! calling thread, so the same code runs as PID 1 of a VM and in a test's
//! throwaway namespace on a host.
//!
//! The request is validated as a whole before anything is changed: a bad
//! field is an `InvalidArgument` naming it, and the guest is left untouched.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use husk_proto::agent::NetworkConfig;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info};

use crate::error::{AgentError, Result};

/// How long [`configure`] waits for every interface to appear. virtio-net
/// devices show up once the driver module loaded at boot has probed them,
/// which may be a little after the agent starts serving.
pub const LINK_WAIT: Duration = Duration::from_secs(5);

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Linux's IFNAMSIZ, which counts the terminating NUL.
const IFNAMSIZ: usize = 16;

/// The smallest MTU IPv4 needs (RFC 791) and the largest an Ethernet
/// device may have (ETH_MAX_MTU).
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;
/// Below this the kernel disables IPv6 on the interface (RFC 8200).
const MIN_MTU_IPV6: u32 = 1280;

/// A checked interface: everything parsed, nothing applied yet.
#[derive(Debug)]
struct Iface {
    field: String,
    mac: [u8; 6],
    name: String,
    mtu: Option<u32>,
    addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug)]
struct RouteSpec {
    field: String,
    destination: IpAddr,
    prefix_len: u8,
    gateway: Option<IpAddr>,
    /// Index into `Plan::ifaces`.
    device: Option<usize>,
}

#[derive(Debug)]
struct Plan {
    ifaces: Vec<Iface>,
    routes: Vec<RouteSpec>,
}

/// Checks a network configuration without touching the system. The same
/// checks run at the start of [`configure`].
pub fn validate(cfg: &NetworkConfig) -> Result<()> {
    plan(cfg).map(|_| ())
}

/// Configures the network of the calling thread's network namespace as
/// `cfg` says, waiting up to [`LINK_WAIT`] for the interfaces to appear.
pub async fn configure(cfg: &NetworkConfig) -> Result<()> {
    configure_with_wait(cfg, LINK_WAIT).await
}

/// [`configure`] with the time to wait for the interfaces given.
///
/// Order, per interface: link down, rename, MTU, addresses (IPv6 ones with
/// `nodad`, usable at once), link up; then the routes, link-scope ones
/// first so that a gateway they make reachable can be used by the others.
/// Addresses and routes that already exist are left as they are, so a
/// second call with the same configuration succeeds.
pub async fn configure_with_wait(cfg: &NetworkConfig, link_wait: Duration) -> Result<()> {
    let plan = plan(cfg)?;
    if plan.ifaces.is_empty() && plan.routes.is_empty() {
        return Ok(());
    }
    // The socket belongs to the network namespace of the thread creating
    // it, whichever thread later drives the connection.
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| AgentError::Internal(format!("opening a netlink socket: {e}")))?;
    let conn = tokio::spawn(conn);
    let result = apply(&handle, &plan, link_wait).await;
    conn.abort();
    result
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> AgentError {
    AgentError::InvalidArgument(format!("{field}: {msg}"))
}

fn plan(cfg: &NetworkConfig) -> Result<Plan> {
    let mut ifaces: Vec<Iface> = Vec::with_capacity(cfg.interfaces.len());
    for (i, itf) in cfg.interfaces.iter().enumerate() {
        let field = format!("network.interfaces[{i}]");
        let mac = parse_mac(&itf.mac).map_err(|e| invalid(&format!("{field}.mac"), e))?;
        validate_ifname(&itf.name).map_err(|e| invalid(&format!("{field}.name"), e))?;
        if let Some(other) = ifaces.iter().find(|o| o.mac == mac) {
            return Err(invalid(
                &format!("{field}.mac"),
                format!("{} is also the MAC of {}", itf.mac, other.field),
            ));
        }
        if let Some(other) = ifaces.iter().find(|o| o.name == itf.name) {
            return Err(invalid(
                &format!("{field}.name"),
                format!("{:?} is also the name of {}", itf.name, other.field),
            ));
        }
        let mut addresses = Vec::with_capacity(itf.addresses.len());
        for (j, a) in itf.addresses.iter().enumerate() {
            let afield = format!("{field}.addresses[{j}]");
            let ip: IpAddr = a.address.parse().map_err(|_| {
                invalid(
                    &format!("{afield}.address"),
                    format!("{:?} is not an IPv4 or IPv6 address", a.address),
                )
            })?;
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(invalid(
                    &format!("{afield}.address"),
                    format!("{ip} is not a unicast address"),
                ));
            }
            let max = max_prefix(ip);
            let prefix_len = u8::try_from(a.prefix_len)
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| {
                    invalid(
                        &format!("{afield}.prefix_len"),
                        format!("{} is out of range for {ip} (0..={max})", a.prefix_len),
                    )
                })?;
            addresses.push((ip, prefix_len));
        }
        let mtu = match itf.mtu {
            0 => None,
            m if !(MIN_MTU..=MAX_MTU).contains(&m) => {
                return Err(invalid(
                    &format!("{field}.mtu"),
                    format!("{m} is out of range ({MIN_MTU}..={MAX_MTU}, or 0 for the default)"),
                ))
            }
            m if m < MIN_MTU_IPV6 && addresses.iter().any(|(ip, _)| ip.is_ipv6()) => {
                return Err(invalid(
                    &format!("{field}.mtu"),
                    format!("{m} is below {MIN_MTU_IPV6}, the least IPv6 needs, and the interface has IPv6 addresses"),
                ))
            }
            m => Some(m),
        };
        ifaces.push(Iface {
            field,
            mac,
            name: itf.name.clone(),
            mtu,
            addresses,
        });
    }

    let mut routes = Vec::with_capacity(cfg.routes.len());
    for (i, r) in cfg.routes.iter().enumerate() {
        let field = format!("network.routes[{i}]");
        let (destination, prefix_len) =
            parse_cidr(&r.destination).map_err(|e| invalid(&format!("{field}.destination"), e))?;
        let gateway = if r.gateway.is_empty() {
            None
        } else {
            let gfield = format!("{field}.gateway");
            let gw: IpAddr = r.gateway.parse().map_err(|_| {
                invalid(
                    &gfield,
                    format!("{:?} is not an IPv4 or IPv6 address", r.gateway),
                )
            })?;
            if gw.is_ipv4() != destination.is_ipv4() {
                return Err(invalid(
                    &gfield,
                    format!(
                        "{gw} is not of the destination's address family ({})",
                        r.destination
                    ),
                ));
            }
            if gw.is_unspecified() || gw.is_multicast() {
                return Err(invalid(&gfield, format!("{gw} is not a unicast address")));
            }
            Some(gw)
        };
        let device = if r.device.is_empty() {
            None
        } else {
            Some(
                ifaces
                    .iter()
                    .position(|itf| itf.name == r.device)
                    .ok_or_else(|| {
                        invalid(
                            &format!("{field}.device"),
                            format!(
                                "{:?} is not the name of any interface in network.interfaces",
                                r.device
                            ),
                        )
                    })?,
            )
        };
        match (gateway, device) {
            (None, None) => {
                return Err(invalid(
                    &field,
                    "a route without a gateway is link-scope and needs a device",
                ))
            }
            (Some(IpAddr::V6(gw)), None) if gw.is_unicast_link_local() => {
                return Err(invalid(
                    &format!("{field}.device"),
                    format!("the gateway {gw} is link-local, so the route needs a device"),
                ))
            }
            _ => {}
        }
        // Without a metric in the request, the kernel keeps one route per
        // destination in the main table; a second one would fail with
        // EEXIST, which must count as success for a repeated call, and so
        // would vanish silently.
        if let Some(other) = routes
            .iter()
            .find(|o: &&RouteSpec| o.destination == destination && o.prefix_len == prefix_len)
        {
            return Err(invalid(
                &format!("{field}.destination"),
                format!(
                    "{} is also the destination of {} (routes have no metric, so one route per destination)",
                    r.destination, other.field
                ),
            ));
        }
        routes.push(RouteSpec {
            field,
            destination,
            prefix_len,
            gateway,
            device,
        });
    }
    Ok(Plan { ifaces, routes })
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// "aa:bb:cc:dd:ee:ff" (either case) of a unicast, non-zero MAC.
fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address like \"aa:bb:cc:dd:ee:ff\"");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac == [0; 6] {
        return Err(format!("{s} is the all-zero MAC"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast MAC"));
    }
    Ok(mac)
}

fn format_mac(mac: &[u8]) -> String {
    let mut s = String::with_capacity(mac.len() * 3);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The kernel's own rule (dev_valid_name): 1 to IFNAMSIZ-1 bytes, not "."
/// or "..", no '/', ':' or whitespace. Control characters are refused too:
/// they have no place in a name that ends up in logs.
fn validate_ifname(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() >= IFNAMSIZ {
        return Err(format!(
            "{name:?} is {} bytes long; interface names have at most {} (IFNAMSIZ)",
            name.len(),
            IFNAMSIZ - 1
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{name:?} contains {c:?}, which interface names may not contain"
        ));
    }
    Ok(())
}

/// "10.1.0.0/16", "fd00::/64": an address, '/', a prefix length in range,
/// and no bits set past the prefix (the kernel refuses those for IPv4).
fn parse_cidr(s: &str) -> std::result::Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not in CIDR form (address/prefix length)"))?;
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} in {s:?} is not an IPv4 or IPv6 address"))?;
    let max = max_prefix(ip);
    let prefix_len = Some(len)
        .filter(|l| !l.is_empty() && l.len() <= 3 && l.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|l| l.parse::<u8>().ok())
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("prefix length {len:?} in {s:?} is not a number in 0..={max}"))?;
    let (bits, host_bits) = match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32 - u32::from(prefix_len)),
        IpAddr::V6(a) => (u128::from(a), 128 - u32::from(prefix_len)),
    };
    let host_mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |m| m - 1);
    if bits & host_mask != 0 {
        let net = bits & !host_mask;
        let net: IpAddr = match ip {
            IpAddr::V4(_) => std::net::Ipv4Addr::from(net as u32).into(),
            IpAddr::V6(_) => std::net::Ipv6Addr::from(net).into(),
        };
        return Err(format!(
            "{s:?} has bits set past the prefix length (the network is {net}/{prefix_len})"
        ));
    }
    Ok((ip, prefix_len))
}

/// A link as a dump shows it.
#[derive(Debug)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
}

fn link_from(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(a) => link.mac = a,
            _ => {}
        }
    }
    link
}

async fn dump_links(handle: &Handle) -> Result<Vec<Link>> {
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| AgentError::Internal(format!("listing network interfaces: {e}")))?
    {
        links.push(link_from(msg));
    }
    Ok(links)
}

fn describe_links(links: &[Link]) -> String {
    if links.is_empty() {
        return "none".into();
    }
    links
        .iter()
        .map(|l| format!("{} ({})", l.name, format_mac(&l.mac)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds every configured interface's link, waiting for the ones that have
/// not appeared yet. Returns (ifindex, current name) per interface.
async fn find_links(
    handle: &Handle,
    ifaces: &[Iface],
    wait: Duration,
) -> Result<(Vec<(u32, String)>, Vec<Link>)> {
    let deadline = Instant::now() + wait;
    loop {
        let links = dump_links(handle).await?;
        let mut found = Vec::with_capacity(ifaces.len());
        let mut missing = Vec::new();
        for itf in ifaces {
            let mut matching = links.iter().filter(|l| l.mac == itf.mac);
            match (matching.next(), matching.next()) {
                (Some(l), None) => found.push((l.index, l.name.clone())),
                (None, _) => missing.push(itf),
                (Some(a), Some(b)) => {
                    return Err(AgentError::FailedPrecondition(format!(
                        "{}.mac: {} is the MAC of more than one interface ({} and {})",
                        itf.field,
                        format_mac(&itf.mac),
                        a.name,
                        b.name
                    )))
                }
            }
        }
        if missing.is_empty() {
            return Ok((found, links));
        }
        if Instant::now() >= deadline {
            let wanted = missing
                .iter()
                .map(|itf| format!("{} ({}.mac)", format_mac(&itf.mac), itf.field))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(AgentError::NotFound(format!(
                "no network interface with MAC {wanted} appeared within {:.1} s; interfaces present: {}",
                wait.as_secs_f64(),
                describe_links(&links)
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// A netlink failure as an RPC error: the errnos with which the kernel
/// refuses a value (out of the device's range, unreachable gateway, name
/// taken) are the request's fault; anything else is the agent's.
fn nl_error(field: &str, what: &str, e: rtnetlink::Error) -> AgentError {
    let (code, text) = match &e {
        rtnetlink::Error::NetlinkError(m) => (Some(m.raw_code().abs()), m.to_io().to_string()),
        _ => (None, e.to_string()),
    };
    let msg = format!("{field}: {what}: {text}");
    match code {
        Some(
            libc::EINVAL
            | libc::ERANGE
            | libc::EEXIST
            | libc::ENETUNREACH
            | libc::EHOSTUNREACH
            | libc::EADDRNOTAVAIL
            | libc::ENODEV,
        ) => AgentError::InvalidArgument(msg),
        _ => AgentError::Internal(msg),
    }
}

async fn set_link(handle: &Handle, msg: LinkMessage, field: &str, what: &str) -> Result<()> {
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| nl_error(field, what, e))
}

/// A name no interface is likely to hold, for moving an interface out of
/// the way of another's rename (e.g. two interfaces swapping names).
fn temporary_name(index: u32) -> String {
    format!("husk{index}")
}

async fn apply(handle: &Handle, plan: &Plan, wait: Duration) -> Result<()> {
    let (found, links) = find_links(handle, &plan.ifaces, wait).await?;
    let indexes: Vec<u32> = found.iter().map(|(i, _)| *i).collect();

    // A target name held by an interface outside the configuration cannot
    // be freed: refuse before changing anything.
    for itf in &plan.ifaces {
        if let Some(holder) = links
            .iter()
            .find(|l| l.name == itf.name && !indexes.contains(&l.index))
        {
            return Err(invalid(
                &format!("{}.name", itf.field),
                format!(
                    "{:?} is the name of another interface ({}), not in network.interfaces",
                    itf.name,
                    format_mac(&holder.mac)
                ),
            ));
        }
    }

    for (itf, (index, name)) in plan.ifaces.iter().zip(&found) {
        set_link(
            handle,
            LinkUnspec::new_with_index(*index).down().build(),
            &itf.field,
            &format!("setting {name} down"),
        )
        .await?;
    }

    // Renames: first move aside the interfaces whose wanted name another
    // configured interface holds right now, then give every one its name.
    let mut current: Vec<String> = found.iter().map(|(_, n)| n.clone()).collect();
    for (k, itf) in plan.ifaces.iter().enumerate() {
        let taken = current
            .iter()
            .enumerate()
            .any(|(o, n)| o != k && *n == itf.name);
        if taken && current[k] != itf.name {
            let tmp = temporary_name(indexes[k]);
            set_link(
                handle,
                LinkUnspec::new_with_index(indexes[k])
                    .name(tmp.clone())
                    .build(),
                &itf.field,
                &format!("renaming {} to {tmp} (out of the way)", current[k]),
            )
            .await?;
            current[k] = tmp;
        }
    }
    // Each pass renames every interface whose name is free; a chain of
    // renames (A wants B's name, B wants C's) resolves within as many
    // passes as there are interfaces.
    for _ in 0..=plan.ifaces.len() {
        let mut progress = false;
        for (k, itf) in plan.ifaces.iter().enumerate() {
            if current[k] == itf.name || current.contains(&itf.name) {
                continue;
            }
            set_link(
                handle,
                LinkUnspec::new_with_index(indexes[k])
                    .name(itf.name.clone())
                    .build(),
                &format!("{}.name", itf.field),
                &format!("renaming {} to {}", current[k], itf.name),
            )
            .await?;
            current[k] = itf.name.clone();
            progress = true;
        }
        if !progress {
            break;
        }
    }
    if let Some((k, itf)) = plan
        .ifaces
        .iter()
        .enumerate()
        .find(|(k, itf)| current[*k] != itf.name)
    {
        return Err(AgentError::Internal(format!(
            "{}.name: could not rename {} to {}",
            itf.field, current[k], itf.name
        )));
    }

    for (itf, index) in plan.ifaces.iter().zip(&indexes) {
        let index = *index;
        if let Some(mtu) = itf.mtu {
            set_link(
                handle,
                LinkUnspec::new_with_index(index).mtu(mtu).build(),
                &format!("{}.mtu", itf.field),
                &format!("setting the MTU of {} to {mtu}", itf.name),
            )
            .await?;
        }
        for (j, (ip, prefix_len)) in itf.addresses.iter().enumerate() {
            let mut req = handle.address().add(index, *ip, *prefix_len);
            if ip.is_ipv6() {
                // Duplicate address detection would keep the address
                // unusable ("tentative") for a second or more; on the
                // pod's link the CNI plugin already made it unique.
                req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            }
            match req.execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {
                    debug!("{ip}/{prefix_len} is already on {}", itf.name)
                }
                Err(e) => {
                    return Err(nl_error(
                        &format!("{}.addresses[{j}]", itf.field),
                        &format!("adding {ip}/{prefix_len} to {}", itf.name),
                        e,
                    ))
                }
            }
        }
        set_link(
            handle,
            LinkUnspec::new_with_index(index).up().build(),
            &itf.field,
            &format!("setting {} up", itf.name),
        )
        .await?;
        info!(
            interface = itf.name,
            mac = format_mac(&itf.mac),
            mtu = itf.mtu,
            addresses = itf.addresses.len(),
            "network interface configured"
        );
    }

    // Link-scope routes first: they may be what makes a gateway reachable
    // (e.g. a /32 address with "169.254.1.1 dev eth0", then "default via
    // 169.254.1.1"). The subnets of the addresses already have theirs,
    // added by the kernel with the addresses.
    let ordered = plan
        .routes
        .iter()
        .filter(|r| r.gateway.is_none())
        .chain(plan.routes.iter().filter(|r| r.gateway.is_some()));
    for r in ordered {
        add_route(handle, plan, &indexes, r).await?;
    }
    if !plan.routes.is_empty() {
        info!(routes = plan.routes.len(), "routes added");
    }
    Ok(())
}

async fn add_route(handle: &Handle, plan: &Plan, indexes: &[u32], r: &RouteSpec) -> Result<()> {
    // Validation made these impossible; an error here is the agent's bug.
    fn invalid_msg(field: &str, e: impl std::fmt::Display) -> AgentError {
        AgentError::Internal(format!("{field}: building the route: {e}"))
    }
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.destination, r.prefix_len)
        .map_err(|e| invalid_msg(&r.field, e))?;
    match r.gateway {
        Some(gw) => b = b.gateway(gw).map_err(|e| invalid_msg(&r.field, e))?,
        // What `ip route add ... dev X` does for IPv4; IPv6 routes keep
        // universe scope.
        None if r.destination.is_ipv4() => b = b.scope(RouteScope::Link),
        None => {}
    }
    if let Some(d) = r.device {
        b = b.output_interface(indexes[d]);
    }
    let text = {
        let mut t = format!("{}/{}", r.destination, r.prefix_len);
        if let Some(gw) = r.gateway {
            let _ = write!(t, " via {gw}");
        }
        if let Some(d) = r.device {
            let _ = write!(t, " dev {}", plan.ifaces[d].name);
        }
        t
    };
    match handle.route().add(b.build()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => {
            debug!("route {text} already exists");
            Ok(())
        }
        Err(e) if errno(&e) == Some(libc::ENETUNREACH) => Err(nl_error(
            &format!("{}.gateway", r.field),
            &format!(
                "adding the route {text} (the gateway is in none of the interfaces' subnets \
                 nor behind a link-scope route)"
            ),
            e,
        )),
        Err(e) => Err(nl_error(&r.field, &format!("adding the route {text}"), e)),
    }
}

#[cfg(test)]
mod tests;
