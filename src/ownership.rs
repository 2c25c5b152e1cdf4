//! What lessnat owns on a host, and how it recognises it. Everything else —
//! other nftables tables, routing rules and tables, containers — is never
//! modified and never appears in a plan.

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

/// The nftables family of lessnat's table.
pub const NFT_FAMILY: &str = "inet";
/// The name of lessnat's nftables table.
pub const NFT_TABLE: &str = "lessnat";
/// The guard table that carries an upgrade's redirect while it must hold,
/// owned by an `nft` process lessnat runs: no other process can delete or
/// flush it, and it goes when that process ends.
pub const NFT_GUARD_TABLE: &str = "lessnat_guard";
/// The comment on lessnat's table, so people reading `nft list ruleset` know who owns it.
pub const NFT_TABLE_COMMENT: &str = "managed by lessnat; changes here are undone by lessnat apply";

/// Socket mark (SO_MARK) on lessnat's own health probes. The redirect rules skip
/// packets with this mark, so a probe reaches the port it means to probe.
pub const PROBE_MARK: u32 = 0x6c6e;

/// Policy routing rule priorities lessnat uses (routed mode); others are left alone.
pub const RULE_PRIORITIES: RangeInclusive<u32> = 27_000..=27_999;
/// Routing table ids lessnat uses (routed mode). Never 253–255 (default, main, local).
pub const ROUTE_TABLES: RangeInclusive<u32> = 27_000..=27_999;

/// Container label naming the service a container belongs to. Its presence marks
/// the container as lessnat's.
pub const LABEL_SERVICE: &str = "io.lessnat.service";
/// Container label holding the hash of the service spec the container was made from.
pub const LABEL_SPEC: &str = "io.lessnat.spec";
/// Container label listing the container's canonical ports, e.g. `8000/tcp,53/udp`.
pub const LABEL_PORTS: &str = "io.lessnat.ports";
/// Container label holding the address a routed container is wired in at.
pub const LABEL_ADDRESS: &str = "io.lessnat.address";
/// Container label holding the service's `stopTimeout` when the container was
/// made, so a container whose service left the spec still stops with it.
pub const LABEL_STOP_TIMEOUT: &str = "io.lessnat.stop-timeout";

/// Container label holding the registry digest of the image the container
/// was made from (services with `pull: always`).
pub const LABEL_DIGEST: &str = "io.lessnat.digest";

/// Label suffix of addresses lessnat adds (`lo:lessnat`): the kernel keeps the
/// label, so lessnat can tell its VIPs from addresses others added.
pub const ADDRESS_LABEL_SUFFIX: &str = ":lessnat";

/// The address protocol (`IFA_PROTO`, `ip address … proto 108`) of the IPv6
/// addresses lessnat adds: IPv6 addresses have no label.
pub const ADDRESS_PROTO: u8 = 108;

/// Interface alias prefix of the veths lessnat makes: `lessnat SERVICE ADDRESS`.
pub const VETH_ALIAS_PREFIX: &str = "lessnat ";

/// Address of the node side of every container veth; containers route through it.
pub const VETH_GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

/// [`VETH_GATEWAY`] for IPv6 containers: a link-local address on every
/// node-side veth.
pub const VETH_GATEWAY_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The routing table (and its rule's priority) holding lessnat's plain routes:
/// container `/32`s on workers, container subnets via workers on LB nodes.
pub const ROUTES_TABLE: u32 = 27_000;

/// Routing table (and rule priority) for replies to the LB node with `id`.
pub fn reply_table(lb_id: u8) -> u32 {
    ROUTES_TABLE + u32::from(lb_id)
}

/// Connection and packet mark of flows that came through the LB node with
/// `id`: `0x6c6e00ID` (`ln` in the high bytes, so lessnat's marks are recognisable).
pub fn lb_mark(lb_id: u8) -> u32 {
    0x6c6e_0000 | u32::from(lb_id)
}

/// Kernel settings routed mode sets: IP forwarding on LB nodes and workers,
/// and `src_valid_mark` on workers, so reverse-path filtering uses the mark's
/// routing table (strict `rp_filter` then passes).
pub const ROUTED_SYSCTLS: [&str; 2] = ["net.ipv4.ip_forward", "net.ipv4.conf.all.src_valid_mark"];

/// IPv6 forwarding, which routed mode sets where a node routes IPv6; read
/// only when the kernel has IPv6.
pub const IPV6_FORWARDING: &str = "net.ipv6.conf.all.forwarding";

/// The node-side name of the veth for `service`'s container at `address`:
/// `ln` and 12 hex digits of a hash (interface names have at most 15 bytes).
pub fn veth_name(service: &str, address: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{service}/{address}").as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("ln{hex}")
}

/// The role a container plays for its service. It is carried by the container
/// name (`lessnat-web.web-1`, `lessnat-web.web-1.next`, `lessnat-web.web-1.prev`),
/// because a container changes role during an upgrade and Docker labels cannot
/// change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// The container serving the canonical ports.
    Primary,
    /// The new version during an upgrade, on the temporary ports.
    Next,
    /// The old version, stopped and kept for rollback until the upgrade finishes.
    Prev,
}

impl Slot {
    /// All slots, in the order they are shown.
    pub const ALL: [Slot; 3] = [Slot::Primary, Slot::Next, Slot::Prev];

    /// The slot's name as used in container names and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Primary => "primary",
            Slot::Next => "next",
            Slot::Prev => "prev",
        }
    }
}

/// The container name for `service` on `node` in `slot`: `lessnat-SERVICE.NODE`,
/// then `.next` or `.prev`. Docker names are global to an engine, so the node is
/// part of the name: several nodes may share one engine (network namespaces,
/// tests). Service and node names cannot contain `.`, so the parts are unambiguous.
pub fn container_name(service: &str, node: &str, slot: Slot) -> String {
    match slot {
        Slot::Primary => format!("lessnat-{service}.{node}"),
        Slot::Next => format!("lessnat-{service}.{node}.next"),
        Slot::Prev => format!("lessnat-{service}.{node}.prev"),
    }
}

/// The container name of routed replica number `replica` (from 1, in spec
/// order) of `service` on `node` in `slot`: the first is named as
/// [`container_name`] names it, the others `lessnat-SERVICE.NODE.N`, then
/// `.next` or `.prev`.
pub fn replica_container_name(service: &str, node: &str, replica: u32, slot: Slot) -> String {
    if replica <= 1 {
        return container_name(service, node, slot);
    }
    match slot {
        Slot::Primary => format!("lessnat-{service}.{node}.{replica}"),
        Slot::Next => format!("lessnat-{service}.{node}.{replica}.next"),
        Slot::Prev => format!("lessnat-{service}.{node}.{replica}.prev"),
    }
}

/// A container name made by [`container_name`] or
/// [`replica_container_name`], read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerName<'a> {
    /// The service.
    pub service: &'a str,
    /// The node.
    pub node: &'a str,
    /// The routed replica's number on the node (1 when the name has none).
    pub replica: u32,
    /// The role.
    pub slot: Slot,
}

/// Reads a container name made by [`container_name`] (a leading `/`, as Docker
/// reports names, is allowed).
pub fn parse_container_name(name: &str) -> Option<ContainerName<'_>> {
    let rest = name
        .strip_prefix('/')
        .unwrap_or(name)
        .strip_prefix("lessnat-")?;
    let mut parts = rest.split('.').peekable();
    let (service, node) = (parts.next()?, parts.next()?);
    let replica = match parts.peek().map(|part| part.parse::<u32>()) {
        Some(Ok(n)) if n >= 2 => {
            parts.next();
            n
        }
        Some(Ok(_)) => return None,
        _ => 1,
    };
    let slot = match parts.next() {
        None => Slot::Primary,
        Some("next") => Slot::Next,
        Some("prev") => Slot::Prev,
        Some(_) => return None,
    };
    if parts.next().is_some() || service.is_empty() || node.is_empty() {
        return None;
    }
    Some(ContainerName {
        service,
        node,
        replica,
        slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_round_trip() {
        for slot in Slot::ALL {
            let name = container_name("web", "node-1", slot);
            let parsed = ContainerName {
                service: "web",
                node: "node-1",
                replica: 1,
                slot,
            };
            assert_eq!(parse_container_name(&name), Some(parsed));
            assert_eq!(replica_container_name("web", "node-1", 1, slot), name);
            let third = replica_container_name("web", "node-1", 3, slot);
            let parsed = ContainerName {
                replica: 3,
                ..parsed
            };
            assert_eq!(parse_container_name(&third), Some(parsed));
        }
        assert_eq!(
            replica_container_name("web", "n", 12, Slot::Next),
            "lessnat-web.n.12.next"
        );
        let primary = ContainerName {
            service: "web",
            node: "n",
            replica: 1,
            slot: Slot::Primary,
        };
        assert_eq!(parse_container_name("/lessnat-web.n"), Some(primary));
        for bad in [
            "lessnat-web",
            "lessnat-web.n.old",
            "lessnat-web.n.next.x",
            "lessnat-web.n.1",
            "lessnat-web.n.0.next",
            "lessnat-web.n.2.3",
            "lessnat-.n",
            "nginx",
        ] {
            assert_eq!(parse_container_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges_avoid_reserved_tables() {
        assert!(
            !ROUTE_TABLES.contains(&253)
                && !ROUTE_TABLES.contains(&254)
                && !ROUTE_TABLES.contains(&255)
        );
    }
}
