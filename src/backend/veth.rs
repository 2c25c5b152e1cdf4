//! Wiring routed containers in: a veth pair between the node and a container
//! that Docker started with `--network none`.
//!
//! Routed mode keeps the client's address all the way to the container (see
//! `docs/routed-mode.md`), so containers cannot sit behind Docker's bridge
//! and its masquerading. Each one instead gets its own address from the
//! node's container subnet and a point-to-point link to the node:
//!
//! ```text
//!  node (netns)                                  container
//!  lnXXXXXXXXXXXX  169.254.1.1/32   ◀── veth ──▶  eth0  10.20.1.5/32
//!  route 10.20.1.5/32 dev lnXXXXXXXXXXXX          169.254.1.1/32 dev eth0 scope link
//!        table 27000 (ROUTES_TABLE)               default via 169.254.1.1 dev eth0 onlink
//! ```
//!
//! Every node side carries the same gateway address, [`VETH_GATEWAY`], so a
//! container needs to know nothing about the node it runs on. An IPv6
//! container gets `ADDRESS/128` and `default via fe80::1 dev eth0`, the node
//! side `fe80::1/64` ([`VETH_GATEWAY_V6`]) and the `/128` route; both
//! addresses skip duplicate address detection (`nodad`), so they are usable
//! at once, and the container's `eth0` has IPv6 enabled whatever Docker set. The node side
//! is named [`veth_name`] and carries the alias `lessnat SERVICE ADDRESS`
//! ([`VETH_ALIAS_PREFIX`]): that is how lessnat recognises its veths and
//! what they lead to. The pair lives only as long as the container's network
//! namespace; a container that stops loses it, and the next apply wires it in
//! again.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::libc;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth};

use super::netlink::{
    Fault, NetlinkError, add_address_here, errno, link_index, replace_route, required_link,
    with_rtnl,
};
use crate::error::chain;
use crate::model::{Route, Veth};
use crate::netns::Netns;
use crate::ownership::{ROUTES_TABLE, VETH_ALIAS_PREFIX, VETH_GATEWAY, VETH_GATEWAY_V6, veth_name};

/// The container side's name.
const CONTAINER_DEVICE: &str = "eth0";

/// The main routing table (the container's routes live there).
const MAIN_TABLE: u32 = 254;

/// Lists lessnat's veths: every interface whose alias starts with
/// [`VETH_ALIAS_PREFIX`], sorted. An alias that does not have the form
/// `lessnat SERVICE ADDRESS` is still listed (with whatever parts it has),
/// so that the veth can be recognised as stale and removed.
pub fn observe(netns: &Netns) -> Result<Vec<Veth>, NetlinkError> {
    with_rtnl(netns, |rtnl| async move {
        let mut veths = Vec::new();
        let mut dump = rtnl.handle.link().get().execute();
        while let Some(link) = dump
            .try_next()
            .await
            .map_err(Fault::netlink("dump the interfaces"))?
        {
            veths.extend(veth(&link));
        }
        veths.sort();
        Ok(veths)
    })
}

/// The veth an interface is, when its alias says it is lessnat's.
fn veth(link: &LinkMessage) -> Option<Veth> {
    let mut name = None;
    let mut alias = None;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(text) => name = Some(text.clone()),
            LinkAttribute::IfAlias(text) => alias = Some(text.as_str()),
            _ => {}
        }
    }
    let (service, address) = parse_alias(alias?)?;
    Some(Veth {
        name: name?,
        service: service.to_owned(),
        address: address.to_owned(),
        up: link.header.flags.contains(LinkFlags::Up),
    })
}

/// The alias of the veth for `service`'s container at `address`.
fn alias(service: &str, address: IpAddr) -> String {
    format!("{VETH_ALIAS_PREFIX}{service} {address}")
}

/// Reads `lessnat SERVICE ADDRESS` as (service, address); `None` when the
/// alias is not lessnat's. Parts that are missing are empty.
fn parse_alias(alias: &str) -> Option<(&str, &str)> {
    let rest = alias.strip_prefix(VETH_ALIAS_PREFIX)?;
    Some(rest.split_once(' ').unwrap_or((rest, "")))
}

/// What to wire in: a service's container at its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wiring<'a> {
    /// The service (it goes into the node side's alias).
    pub service: &'a str,
    /// The container's address, from the node's container subnet.
    pub address: IpAddr,
    /// The container's main process, as the host PID namespace numbers it:
    /// its network namespace is `/proc/PID/ns/net`.
    pub pid: u32,
}

/// Wires a container in (see the module documentation): in `netns`, a veth
/// named [`veth_name`] whose peer is created directly inside the container's
/// network namespace as `eth0`; the container side gets the address, the
/// link route to [`VETH_GATEWAY`] and the default route through it; the node
/// side gets the gateway address and the `/32` route to the container in
/// [`ROUTES_TABLE`]. Both ends and the container's `lo` are set up.
///
/// A veth of that name that exists already is a stale pair: it is deleted
/// first. When any step fails, the node side is deleted (which removes the
/// pair), so nothing is left half-wired; the error names the step and the
/// container address.
pub fn wire(netns: &Netns, wiring: &Wiring) -> Result<Veth, NetlinkError> {
    let address = wiring.address.to_string();
    let name = veth_name(wiring.service, &address);
    let context = format!(
        "wire {} at {address} (veth {name}, process {}): ",
        wiring.service, wiring.pid
    );
    if wiring.service.is_empty() || wiring.service.contains(char::is_whitespace) {
        return Err(NetlinkError::Invalid {
            doing: context.trim_end_matches([':', ' ']).to_owned(),
            reason: format!(
                "the service name {:?} must be non-empty, without spaces",
                wiring.service
            ),
        });
    }
    let container_path = PathBuf::from(format!("/proc/{}/ns/net", wiring.pid));
    let container = Netns::Path(container_path.clone());
    let wired = wire_node(netns, &container_path, &name, wiring, &context)
        .and_then(|()| wire_container(&container, wiring, &context));
    if let Err(error) = wired {
        if let Err(cleanup) = unwire(netns, &name) {
            tracing::warn!(veth = %name, "cannot remove a half-wired veth: {}", chain(&cleanup));
        }
        return Err(error);
    }
    Ok(Veth {
        name,
        service: wiring.service.to_owned(),
        address,
        up: true,
    })
}

/// The node side: the pair (peer straight into the container), its alias,
/// the gateway address and the route to the container.
fn wire_node(
    netns: &Netns,
    container_path: &Path,
    name: &str,
    wiring: &Wiring,
    context: &str,
) -> Result<(), NetlinkError> {
    with_rtnl(netns, |rtnl| async move {
        let handle = &rtnl.handle;
        let step = |fault: Fault| fault.context(context);
        delete_link(handle, name).await.map_err(step)?;
        let opening = format!(
            "open the container's network namespace {}",
            container_path.display()
        );
        let namespace = File::open(container_path)
            .map_err(Fault::io(&opening))
            .map_err(step)?;
        // A process on the node's own network (host networking) would have
        // the node's default route replaced: refuse it.
        let own = is_own_namespace(&namespace)
            .map_err(Fault::io(
                "compare the container's network namespace with the node's",
            ))
            .map_err(step)?;
        if own {
            return Err(step(Fault::Io(
                "check the container's network namespace".to_owned(),
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the process is on the node's own network, not in a container of its own \
                     (routed containers run with --network none)",
                ),
            )));
        }
        let peer = LinkUnspec::new_with_name(CONTAINER_DEVICE)
            .append_extra_attribute(LinkAttribute::NetNsFd(namespace.as_raw_fd()))
            .build();
        let pair = LinkVeth::new(name, CONTAINER_DEVICE)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        handle
            .link()
            .add(pair)
            .execute()
            .await
            .map_err(Fault::netlink(format!(
                "create the veth pair ({CONTAINER_DEVICE} in the container)"
            )))
            .map_err(step)?;
        drop(namespace);
        let index = required_link(handle, name).await.map_err(step)?;
        let message = LinkUnspec::new_with_index(index)
            .alias(alias(wiring.service, wiring.address))
            .up()
            .build();
        handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(Fault::netlink("set the alias and bring the node side up"))
            .map_err(step)?;
        let gateway = gateway_net(wiring.address);
        add_address_here(handle, index, gateway, None)
            .await
            .map_err(Fault::netlink(format!("add the gateway {gateway}")))
            .map_err(step)?;
        let route = Route {
            table: ROUTES_TABLE,
            destination: IpNet::from(wiring.address).to_string(),
            gateway: None,
            device: Some(name.to_owned()),
        };
        replace_route(handle, &route).await.map_err(step)
    })
}

/// The node side's address for a container at `address`: the gateway of
/// its family.
fn gateway_net(address: IpAddr) -> IpNet {
    match address {
        IpAddr::V4(_) => IpNet::V4(Ipv4Net::from(VETH_GATEWAY)),
        IpAddr::V6(_) => IpNet::V6(Ipv6Net::new_assert(VETH_GATEWAY_V6, 64)),
    }
}

/// Whether the namespace `file` is the one the calling thread is in.
fn is_own_namespace(file: &File) -> io::Result<bool> {
    let own = std::fs::metadata("/proc/thread-self/ns/net")?;
    let other = file.metadata()?;
    Ok((own.dev(), own.ino()) == (other.dev(), other.ino()))
}

/// The container side: its address, `eth0` and `lo` up, and the routes
/// through the node.
fn wire_container(container: &Netns, wiring: &Wiring, context: &str) -> Result<(), NetlinkError> {
    with_rtnl(container, |rtnl| async move {
        let handle = &rtnl.handle;
        let step = |fault: Fault| fault.context(context);
        let index = required_link(handle, CONTAINER_DEVICE)
            .await
            .map_err(step)?;
        if wiring.address.is_ipv6() {
            // Docker may disable IPv6 in containers whose networks have
            // none; this thread is in the container's namespace, so
            // `/proc/sys/net` is the container's.
            let key = format!("/proc/sys/net/ipv6/conf/{CONTAINER_DEVICE}/disable_ipv6");
            std::fs::write(&key, "0")
                .map_err(Fault::io(format!(
                    "enable IPv6 on {CONTAINER_DEVICE} ({key})"
                )))
                .map_err(step)?;
        }
        let own = IpNet::from(wiring.address);
        add_address_here(handle, index, own, None)
            .await
            .map_err(Fault::netlink(format!("add {own} to {CONTAINER_DEVICE}")))
            .map_err(step)?;
        for device in [CONTAINER_DEVICE, "lo"] {
            set_up(handle, device).await.map_err(step)?;
        }
        let gateway = gateway_net(wiring.address).addr();
        let link = Route {
            table: MAIN_TABLE,
            destination: IpNet::from(gateway).to_string(),
            gateway: None,
            device: Some(CONTAINER_DEVICE.to_owned()),
        };
        let default = Route {
            table: MAIN_TABLE,
            destination: "default".to_owned(),
            gateway: Some(gateway.to_string()),
            device: Some(CONTAINER_DEVICE.to_owned()),
        };
        // A link-local gateway needs no route of its own: it is on the link.
        let routes = match wiring.address {
            IpAddr::V4(_) => vec![link, default],
            IpAddr::V6(_) => vec![default],
        };
        for route in routes {
            replace_route(handle, &route).await.map_err(step)?;
        }
        Ok(())
    })
}

async fn set_up(handle: &Handle, device: &str) -> Result<(), Fault> {
    let index = required_link(handle, device).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(Fault::netlink(format!("bring {device} up")))
}

/// Removes the veth `name` (its node side; the kernel removes the peer with
/// it). A veth that is not there is fine.
pub fn unwire(netns: &Netns, name: &str) -> Result<(), NetlinkError> {
    with_rtnl(netns, |rtnl| async move {
        delete_link(&rtnl.handle, name).await
    })
}

async fn delete_link(handle: &Handle, name: &str) -> Result<(), Fault> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(index).execute().await {
        Err(error) if errno(&error) != Some(libc::ENODEV) => {
            Err(Fault::netlink(format!("delete veth {name}"))(error))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::link::LinkMessage;

    use super::*;

    #[test]
    fn aliases_round_trip() {
        let text = alias("web", IpAddr::from([10, 20, 1, 5]));
        assert_eq!(text, "lessnat web 10.20.1.5");
        assert_eq!(parse_alias(&text), Some(("web", "10.20.1.5")));
    }

    #[test]
    fn foreign_and_malformed_aliases() {
        for foreign in ["", "lessnat", "lessnatweb 10.0.0.1", "uplink to rack 3"] {
            assert_eq!(parse_alias(foreign), None, "{foreign:?}");
        }
        // lessnat's by the prefix, but not well formed: still listed.
        assert_eq!(parse_alias("lessnat "), Some(("", "")));
        assert_eq!(parse_alias("lessnat web"), Some(("web", "")));
        assert_eq!(
            parse_alias("lessnat web 10.20.1.5 x"),
            Some(("web", "10.20.1.5 x"))
        );
    }

    #[test]
    fn links_are_read_from_name_alias_and_flags() {
        let mut link = LinkMessage::default();
        link.header.flags = LinkFlags::Up | LinkFlags::Broadcast;
        link.attributes = vec![
            LinkAttribute::IfName("ln0123456789ab".into()),
            LinkAttribute::IfAlias("lessnat api 10.20.1.7".into()),
        ];
        assert_eq!(
            veth(&link),
            Some(Veth {
                name: "ln0123456789ab".into(),
                service: "api".into(),
                address: "10.20.1.7".into(),
                up: true,
            })
        );
        link.header.flags = LinkFlags::Broadcast;
        assert_eq!(veth(&link).map(|v| v.up), Some(false));
        link.attributes.pop();
        assert_eq!(veth(&link), None, "no alias: not lessnat's");
    }

    #[test]
    fn service_names_with_spaces_are_refused_before_anything_is_done() {
        let wiring = Wiring {
            service: "a b",
            address: IpAddr::from([10, 20, 1, 5]),
            pid: 1,
        };
        let error = wire(&Netns::from_arg("lessnat-no-such-ns"), &wiring).expect_err("invalid");
        assert!(error.to_string().contains("\"a b\""), "{error}");
    }
}
