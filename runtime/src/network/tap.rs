//! The tap the VM's virtio-net uses, and the tc mirred redirect that joins
//! it to the CNI interface (Kata's "tcfilter" model): everything arriving
//! on eth0 leaves through the tap into the guest, everything the guest
//! sends arrives on the tap and leaves through eth0. The namespace's own
//! stack never sees the pod's traffic, and no bridge or MAC rewriting is
//! needed because the guest NIC takes eth0's MAC.
//!
//! All functions here run on a thread that has joined the pod's network
//! namespace (see [`super::netns::run_in_netns`]): the tun device and the
//! netlink socket are created in the namespace of the creating thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use rtnetlink::{Handle, LinkUnspec};

/// tc protocol "all": ETH_P_ALL in network byte order, as the kernel
/// compares it with skb->protocol.
const PROTO_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle ffff:0, the parent of ingress filters.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// What the guest NIC must look like: the CNI interface's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plumbed {
    pub mac: String,
    pub mtu: u32,
}

fn ifreq(name: &str, flags: libc::c_int) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers
    // and plain structs); all-zero is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(ifr)
}

/// TUNSETIFF on a fresh /dev/net/tun fd: attaches to the tap `name`,
/// creating it if it does not exist, in the calling thread's namespace.
fn attach(name: &str) -> io::Result<File> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut ifr = ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)?;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifr` is a valid,
    // exclusively borrowed ifreq that outlives the call, and `tun` is an
    // open tun fd.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

fn tun_ioctl_int(tun: &File, req: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST and TUNSETOWNER take their argument by value
    // (no pointer is dereferenced); `tun` is an attached tun fd.
    if unsafe { libc::ioctl(tun.as_raw_fd(), req, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the persistent tap `name` owned by root. It stays after our fd
/// closes; the VMM attaches to it by name (or through [`open`]).
fn create_persistent(name: &str) -> io::Result<()> {
    let tun = attach(name)?;
    tun_ioctl_int(&tun, libc::TUNSETOWNER, 0)?;
    tun_ioctl_int(&tun, libc::TUNSETPERSIST, 1)?;
    Ok(())
}

/// Opens the existing tap `name` (in the calling thread's namespace) for
/// frames with a virtio-net header. The fd keeps working from any thread.
pub(crate) fn open(name: &str) -> io::Result<OwnedFd> {
    // Refuse to create a new, non-persistent tap when ours is missing.
    // Not /sys/class/net: sysfs shows the namespace it was mounted in, and
    // this thread is in the pod's.
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: a valid NUL-terminated string that outlives the call.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no tap {name} in the pod network namespace"),
        ));
    }
    Ok(attach(name)?.into())
}

fn rt() -> io::Result<tokio::runtime::Runtime> {
    // The netlink connection needs a reactor on this (namespace) thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

fn nl_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// A link's index, MAC and MTU.
struct Link {
    index: u32,
    mac: Option<Vec<u8>>,
    mtu: Option<u32>,
}

fn link_info(msg: &LinkMessage) -> Link {
    let mut l = Link {
        index: msg.header.index,
        mac: None,
        mtu: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::Address(m) => l.mac = Some(m.clone()),
            LinkAttribute::Mtu(m) => l.mtu = Some(*m),
            _ => {}
        }
    }
    l
}

async fn get_link(h: &Handle, name: &str) -> Result<Option<Link>, String> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m.as_ref().map(link_info)),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl_err(&format!("get link {name}"), e)),
    }
}

fn format_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The CNI interface: its link, MAC and MTU.
async fn cni_link(h: &Handle, ifname: &str) -> Result<(Link, Plumbed), String> {
    let eth = get_link(h, ifname)
        .await?
        .ok_or_else(|| format!("the CNI plugins left no {ifname} in the namespace"))?;
    let mac = eth
        .mac
        .as_deref()
        .filter(|m| m.len() == 6)
        .map(format_mac)
        .ok_or_else(|| format!("{ifname} has no Ethernet MAC address"))?;
    let mtu = eth.mtu.ok_or_else(|| format!("{ifname} reports no MTU"))?;
    Ok((eth, Plumbed { mac, mtu }))
}

/// In the pod namespace: eth0's MAC and MTU, for a pod that uses eth0
/// itself (a host pod: no VM, no tap).
pub(crate) fn describe(ifname: &str) -> Result<Plumbed, String> {
    let rt = rt().map_err(|e| nl_err("netlink runtime", e))?;
    rt.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| nl_err("netlink socket", e))?;
        tokio::spawn(conn);
        Ok(cni_link(&h, ifname).await?.1)
    })
}

/// In the pod namespace: creates the tap, gives it eth0's MTU, brings it
/// up, and installs the two ingress redirects. Returns eth0's MAC and MTU.
pub(crate) fn plumb(ifname: &str, tap: &str) -> Result<Plumbed, String> {
    create_persistent(tap).map_err(|e| nl_err(&format!("create tap {tap}"), e))?;
    let rt = rt().map_err(|e| nl_err("netlink runtime", e))?;
    rt.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| nl_err("netlink socket", e))?;
        tokio::spawn(conn);
        let (eth, Plumbed { mac, mtu }) = cni_link(&h, ifname).await?;
        let t = get_link(&h, tap)
            .await?
            .ok_or_else(|| format!("tap {tap} vanished after creation"))?;
        h.link()
            .set(LinkUnspec::new_with_index(t.index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|e| nl_err(&format!("set {tap} mtu {mtu} up"), e))?;
        for (from, from_name, to, to_name) in [
            (eth.index, ifname, t.index, tap),
            (t.index, tap, eth.index, ifname),
        ] {
            h.qdisc()
                .add(from as i32)
                .ingress()
                .execute()
                .await
                .map_err(|e| nl_err(&format!("add ingress qdisc on {from_name}"), e))?;
            h.traffic_filter(from as i32)
                .add()
                .parent(INGRESS_PARENT)
                .protocol(PROTO_ALL)
                .redirect(to)
                .map_err(|e| nl_err("build mirred filter", e))?
                .execute()
                .await
                .map_err(|e| {
                    nl_err(
                        &format!("add u32 mirred redirect {from_name} -> {to_name}"),
                        e,
                    )
                })?;
        }
        Ok(Plumbed { mac, mtu })
    })
}

/// In the pod namespace: deletes the tap (its qdisc and filter go with it)
/// and eth0's ingress qdisc. What is already gone is fine.
pub(crate) fn unplumb(ifname: &str, tap: &str) -> Result<(), String> {
    let rt = rt().map_err(|e| nl_err("netlink runtime", e))?;
    rt.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| nl_err("netlink socket", e))?;
        tokio::spawn(conn);
        if let Some(t) = get_link(&h, tap).await? {
            match h.link().del(t.index).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
                Err(e) => return Err(nl_err(&format!("delete {tap}"), e)),
            }
        }
        if let Some(eth) = get_link(&h, ifname).await? {
            let mut del = h.qdisc().del(eth.index as i32);
            del.message_mut().header.parent = TcHandle::INGRESS;
            match del.execute().await {
                Ok(()) => {}
                // No ingress qdisc (EINVAL / ENOENT, by kernel version).
                Err(rtnetlink::Error::NetlinkError(e))
                    if [-libc::EINVAL, -libc::ENOENT].contains(&e.raw_code()) => {}
                Err(e) => return Err(nl_err(&format!("delete ingress qdisc of {ifname}"), e)),
            }
        }
        Ok(())
    })
}

/// One installed ingress filter, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRedirect {
    /// The interface whose ingress the filter is on.
    pub from: String,
    /// The filter kind ("u32").
    pub kind: String,
    /// Interface index the mirred action redirects to.
    pub to_ifindex: u32,
}

/// In the pod namespace: the ingress qdiscs and redirect filters on
/// `ifname` and `tap`, read back through netlink.
pub(crate) fn inspect(ifname: &str, tap: &str) -> Result<InspectResult, String> {
    use rtnetlink::packet_route::tc::{
        TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcFilterU32Option,
        TcOption,
    };
    let rt = rt().map_err(|e| nl_err("netlink runtime", e))?;
    rt.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| nl_err("netlink socket", e))?;
        tokio::spawn(conn);
        let mut out = InspectResult::default();
        for name in [ifname, tap] {
            let Some(l) = get_link(&h, name).await? else {
                continue;
            };
            out.links
                .push((name.to_string(), l.index, l.mtu.unwrap_or(0)));
            let qdiscs: Vec<TcMessage> = h
                .qdisc()
                .get()
                .index(l.index as i32)
                .ingress()
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err("dump qdiscs", e))?;
            for q in qdiscs.iter().filter(|q| q.header.index == l.index as i32) {
                for a in &q.attributes {
                    if let TcAttribute::Kind(k) = a {
                        if k == "ingress" {
                            out.ingress_qdiscs.push(name.to_string());
                        }
                    }
                }
            }
            let filters: Vec<TcMessage> = h
                .traffic_filter(l.index as i32)
                .get()
                .ingress()
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err("dump filters", e))?;
            for f in &filters {
                let mut kind = String::new();
                let mut to = None;
                for a in &f.attributes {
                    match a {
                        TcAttribute::Kind(k) => kind = k.clone(),
                        TcAttribute::Options(opts) => {
                            for o in opts {
                                if let TcOption::U32(TcFilterU32Option::Action(actions)) = o {
                                    for act in actions {
                                        to = to.or_else(|| mirred_target(act));
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if let Some(to_ifindex) = to {
                    out.redirects.push(IngressRedirect {
                        from: name.to_string(),
                        kind,
                        to_ifindex,
                    });
                }
            }
        }
        fn mirred_target(act: &TcAction) -> Option<u32> {
            act.attributes.iter().find_map(|a| match a {
                TcActionAttribute::Options(opts) => opts.iter().find_map(|o| match o {
                    TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) => Some(p.ifindex),
                    _ => None,
                }),
                _ => None,
            })
        }
        Ok(out)
    })
}

/// What [`inspect`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InspectResult {
    /// (name, ifindex, mtu) of the links that exist.
    pub links: Vec<(String, u32, u32)>,
    /// Names of the links with an ingress qdisc.
    pub ingress_qdiscs: Vec<String>,
    pub redirects: Vec<IngressRedirect>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_names() {
        assert!(ifreq("tap0_husk", libc::IFF_TAP).is_ok());
        assert!(ifreq("", libc::IFF_TAP).is_err());
        assert!(ifreq("0123456789abcdef", libc::IFF_TAP).is_err());
        assert!(ifreq("a\0b", libc::IFF_TAP).is_err());
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0, 1, 0xff, 0x10]),
            "0a:58:00:01:ff:10"
        );
        // In memory, big-endian: the bytes of ETH_P_ALL (0x0003) as on the wire.
        assert_eq!(PROTO_ALL.to_ne_bytes(), [0x00, 0x03]);
    }
}
