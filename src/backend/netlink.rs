//! Policy routing through rtnetlink: the `ip rule`s and routes lessnat owns
//! (priorities in [`RULE_PRIORITIES`], tables in [`ROUTE_TABLES`]), read from
//! the kernel. Everything outside those ranges is never returned.
//!
//! Routes are dumped with `NETLINK_GET_STRICT_CHK`, one filtered dump per
//! table of the range, so the kernel does the filtering and the cost does not
//! grow with the size of other tables (a host with a full BGP table in `main`
//! costs the same as an empty one). Kernels without strict checking (before
//! 4.20) ignore such filters; there one unfiltered dump is read and filtered
//! here instead.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::io;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteVia};
use rtnetlink::packet_route::rule::{RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion};

use crate::netns::{Netns, NetnsError};
use crate::observe::{IpRule, Route, RoutingState};
use crate::ownership::{ROUTE_TABLES, RULE_PRIORITIES};

/// Reading routing state failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The network namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The rtnetlink socket or its runtime could not be set up.
    #[error("routing in {netns}: cannot {doing}: {source}")]
    Io {
        /// Where.
        netns: String,
        /// What lessnat was doing.
        doing: String,
        /// Why.
        source: io::Error,
    },
    /// The kernel refused a request or sent something unexpected.
    #[error("routing in {netns}: cannot {doing}: {source}")]
    Netlink {
        /// Where.
        netns: String,
        /// What lessnat was doing.
        doing: String,
        /// Why.
        source: rtnetlink::Error,
    },
}

/// A failure inside the namespace thread, before it is placed in a namespace.
enum Fault {
    Io(String, io::Error),
    Netlink(String, rtnetlink::Error),
}

impl Fault {
    fn io(doing: impl Into<String>) -> impl FnOnce(io::Error) -> Fault {
        let doing = doing.into();
        move |source| Fault::Io(doing, source)
    }

    fn netlink(doing: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Fault {
        let doing = doing.into();
        move |source| Fault::Netlink(doing, source)
    }

    fn within(self, netns: &Netns) -> NetlinkError {
        let netns = netns.to_string();
        match self {
            Fault::Io(doing, source) => NetlinkError::Io {
                netns,
                doing,
                source,
            },
            Fault::Netlink(doing, source) => NetlinkError::Netlink {
                netns,
                doing,
                source,
            },
        }
    }
}

/// Reads the policy routing rules (IPv4 and IPv6) whose priority is in
/// [`RULE_PRIORITIES`] and the routes of the tables in [`ROUTE_TABLES`], sorted.
///
/// A rule's `fwmask` is reported only when it is not the full mask
/// (`fwmark 1` and `fwmark 1/0xffffffff` are the same rule to the kernel).
pub fn observe(netns: &Netns) -> Result<RoutingState, NetlinkError> {
    netns
        .run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(Fault::io("start the netlink I/O runtime"))?
                .block_on(observe_here())
        })?
        .map_err(|fault| fault.within(netns))
}

async fn observe_here() -> Result<RoutingState, Fault> {
    let (strict, (connection, handle, _)) = match rtnetlink::new_connection_with_strict_check() {
        Ok(parts) => (true, parts),
        Err(_) => (
            false,
            rtnetlink::new_connection().map_err(Fault::io("open an rtnetlink socket"))?,
        ),
    };
    tokio::spawn(connection);

    let mut rules = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let mut dump = handle.rule().get(version).execute();
        loop {
            match dump.try_next().await {
                Ok(Some(message)) => rules.extend(ip_rule(&message)),
                Ok(None) => break,
                // A kernel without IPv6 has no IPv6 rules.
                Err(rtnetlink::Error::NetlinkError(error))
                    if error.raw_code() == -nix::libc::EAFNOSUPPORT =>
                {
                    break;
                }
                Err(error) => return Err(Fault::netlink("dump the policy routing rules")(error)),
            }
        }
    }
    rules.sort();

    let mut found = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        if strict {
            for table in ROUTE_TABLES {
                dump_routes(&handle, family, Some(table), &mut found).await?;
            }
        } else {
            dump_routes(&handle, family, None, &mut found).await?;
        }
    }

    let mut names = BTreeMap::new();
    for index in found.iter().filter_map(|route| route.oif) {
        if let Entry::Vacant(slot) = names.entry(index) {
            slot.insert(link_name(&handle, index).await?);
        }
    }
    let mut routes: Vec<Route> = found
        .into_iter()
        .map(|route| Route {
            table: route.table,
            destination: route.destination,
            gateway: route.gateway,
            device: route.oif.and_then(|index| names.get(&index).cloned()),
        })
        .collect();
    routes.sort();
    Ok(RoutingState { rules, routes })
}

/// The rule as lessnat sees it, when its priority is in lessnat's range.
fn ip_rule(message: &RuleMessage) -> Option<IpRule> {
    let family = match message.header.family {
        AddressFamily::Inet => "inet",
        AddressFamily::Inet6 => "inet6",
        _ => return None,
    };
    let mut rule = IpRule {
        family: family.to_owned(),
        priority: 0,
        source: None,
        fwmark: None,
        fwmask: None,
        table: u32::from(message.header.table),
    };
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Priority(priority) => rule.priority = *priority,
            RuleAttribute::FwMark(mark) => rule.fwmark = Some(*mark),
            RuleAttribute::FwMask(mask) => rule.fwmask = Some(*mask).filter(|m| *m != u32::MAX),
            RuleAttribute::Table(table) => rule.table = *table,
            _ => {}
        }
    }
    RULE_PRIORITIES.contains(&rule.priority).then_some(rule)
}

/// A route of lessnat's tables, before its output interface is named.
struct FoundRoute {
    table: u32,
    destination: String,
    gateway: Option<String>,
    oif: Option<u32>,
}

/// Dumps the routes of `family` (of one table, when the kernel filters) and
/// keeps those in [`ROUTE_TABLES`].
async fn dump_routes(
    handle: &Handle,
    family: AddressFamily,
    table: Option<u32>,
    found: &mut Vec<FoundRoute>,
) -> Result<(), Fault> {
    let mut request = RouteMessage::default();
    request.header.address_family = family;
    request.attributes.extend(table.map(RouteAttribute::Table));
    let mut dump = handle.route().get(request).execute();
    loop {
        match dump.try_next().await {
            // A kernel without IPv6 answers an IPv6 dump with all families.
            Ok(Some(message)) if message.header.address_family == family => {
                found.extend(found_route(&message));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            // A table that does not exist (strict dumps say so).
            Err(rtnetlink::Error::NetlinkError(error))
                if error.raw_code() == -nix::libc::ENOENT && table.is_some() =>
            {
                return Ok(());
            }
            Err(error) => {
                let which = table.map_or_else(|| "all tables".to_owned(), |t| format!("table {t}"));
                return Err(Fault::netlink(format!("dump the routes of {which}"))(error));
            }
        }
    }
}

fn found_route(message: &RouteMessage) -> Option<FoundRoute> {
    let header = &message.header;
    let mut table = u32::from(header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(address) => destination = ip(address),
            RouteAttribute::Gateway(address) => gateway = ip(address),
            RouteAttribute::Via(RouteVia::Inet(address)) => gateway = Some(IpAddr::V4(*address)),
            RouteAttribute::Via(RouteVia::Inet6(address)) => gateway = Some(IpAddr::V6(*address)),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    if !ROUTE_TABLES.contains(&table) {
        return None;
    }
    let destination = match destination {
        Some(address) => format!("{address}/{}", header.destination_prefix_length),
        None => "default".to_owned(),
    };
    Some(FoundRoute {
        table,
        destination,
        gateway: gateway.map(|address| address.to_string()),
        oif,
    })
}

fn ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(address) => Some(IpAddr::V4(*address)),
        RouteAddress::Inet6(address) => Some(IpAddr::V6(*address)),
        _ => None,
    }
}

async fn link_name(handle: &Handle, index: u32) -> Result<String, Fault> {
    let doing = || format!("look up interface {index}");
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(Fault::netlink(doing()))?;
    link.and_then(|link| {
        link.attributes
            .into_iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            })
    })
    .ok_or_else(|| {
        Fault::Io(
            doing(),
            io::Error::new(io::ErrorKind::NotFound, "the kernel sent no name"),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn rule_message(family: AddressFamily, attributes: Vec<RuleAttribute>) -> RuleMessage {
        let mut message = RuleMessage::default();
        message.header.family = family;
        message.header.table = 252; // RT_TABLE_COMPAT, as the kernel sends for ids > 255
        message.attributes = attributes;
        message
    }

    #[test]
    fn rules_in_range_are_read_with_a_canonical_mask() {
        let full_mask = rule_message(
            AddressFamily::Inet,
            vec![
                RuleAttribute::Table(27001),
                RuleAttribute::Priority(27001),
                RuleAttribute::FwMark(1),
                RuleAttribute::FwMask(u32::MAX),
            ],
        );
        assert_eq!(
            ip_rule(&full_mask),
            Some(IpRule {
                family: "inet".into(),
                priority: 27001,
                source: None,
                fwmark: Some(1),
                fwmask: None,
                table: 27001,
            })
        );
        let masked = rule_message(
            AddressFamily::Inet6,
            vec![
                RuleAttribute::Priority(27999),
                RuleAttribute::FwMark(2),
                RuleAttribute::FwMask(0xff),
                RuleAttribute::Table(27002),
            ],
        );
        assert_eq!(
            ip_rule(&masked).map(|rule| (rule.family, rule.fwmask)),
            Some(("inet6".into(), Some(0xff)))
        );
    }

    #[test]
    fn rules_outside_the_range_are_ignored() {
        for priority in [0, 100, 26_999, 28_000, 32_766] {
            let message = rule_message(
                AddressFamily::Inet,
                vec![
                    RuleAttribute::Priority(priority),
                    RuleAttribute::Table(27001),
                ],
            );
            assert_eq!(ip_rule(&message), None, "priority {priority}");
        }
        // The kernel omits the priority of rule 0.
        assert_eq!(ip_rule(&rule_message(AddressFamily::Inet, vec![])), None);
    }

    fn route_message(prefix: u8, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.table = 252;
        message.header.destination_prefix_length = prefix;
        message.attributes = attributes;
        message
    }

    #[test]
    fn routes_are_read_from_the_table_attribute() {
        let route = found_route(&route_message(
            24,
            vec![
                RouteAttribute::Table(27001),
                RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 20, 1, 0))),
                RouteAttribute::Oif(3),
            ],
        ))
        .expect("in range");
        assert_eq!(
            (
                route.table,
                route.destination.as_str(),
                route.gateway,
                route.oif
            ),
            (27001, "10.20.1.0/24", None, Some(3))
        );

        let default = found_route(&route_message(
            0,
            vec![
                RouteAttribute::Table(27999),
                RouteAttribute::Via(RouteVia::Inet6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1))),
            ],
        ))
        .expect("in range");
        assert_eq!(
            (default.destination.as_str(), default.gateway.as_deref()),
            ("default", Some("fe80::1"))
        );
    }

    #[test]
    fn routes_outside_the_range_are_ignored() {
        for table in [100, 254, 26_999, 28_000] {
            let message = route_message(0, vec![RouteAttribute::Table(table)]);
            assert!(found_route(&message).is_none(), "table {table}");
        }
        // No table attribute: the header's id (main here) applies.
        let mut main = route_message(0, vec![]);
        main.header.table = 254;
        assert!(found_route(&main).is_none());
    }
}
