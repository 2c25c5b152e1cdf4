//! Policy routing and addresses through rtnetlink: the `ip rule`s and routes
//! lessnat owns (priorities in [`RULE_PRIORITIES`], tables in [`ROUTE_TABLES`])
//! and the addresses it labels as its own ([`ADDRESS_LABEL_SUFFIX`]), read from
//! and written to the kernel. Everything outside those ranges is never
//! returned, and never changed.
//!
//! Routes are dumped with `NETLINK_GET_STRICT_CHK`, one filtered dump per
//! table of the range, so the kernel does the filtering and the cost does not
//! grow with the size of other tables (a host with a full BGP table in `main`
//! costs the same as an empty one). Kernels without strict checking (before
//! 4.20) ignore such filters; there one unfiltered dump is read and filtered
//! here instead.
//!
//! Writes are idempotent, so an interrupted apply can simply run again: adding
//! what is there already succeeds, and so does deleting what is not. A rule,
//! route or address that was written reads back *equal* from [`observe`] or
//! [`observe_addresses`]:
//!
//! - a route with a device and no gateway is `scope link`
//!   (`10.20.1.5/32 dev ln0123abcd table 27000`);
//! - a route with a gateway and no device leaves the device to the kernel
//!   (`default via 192.0.2.2 table 27001`), and reads back without one;
//! - a route with both is `onlink` on that device (`default via 169.254.1.1
//!   dev eth0 onlink`), and reads back with the device;
//! - destinations and rule sources are CIDR text (`10.20.1.5/32`, never a bare
//!   address), and the default route is `default`.
//!
//! Deleting is exact: a rule or route is deleted only when one equal to it is
//! there. The kernel treats fields left out of a delete request as wildcards,
//! so without that check deleting `10.20.1.0/24 dev v0` could remove
//! `10.20.1.0/24 via 192.0.2.10` instead.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::io;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use nix::libc;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType, RouteVia,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion};

use crate::model::{IpRule, OwnedAddress, Route, RoutingState};
use crate::netns::{Netns, NetnsError};
use crate::ownership::{ADDRESS_LABEL_SUFFIX, ADDRESS_PROTO, ROUTE_TABLES, RULE_PRIORITIES};

/// Reading or changing routing state, addresses or links failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The network namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The rtnetlink socket or its runtime could not be set up, or the kernel
    /// refused a request (with the errno it gave).
    #[error("in {netns}, cannot {doing}")]
    Io {
        /// Where.
        netns: String,
        /// What lessnat was doing.
        doing: String,
        /// Why.
        source: io::Error,
    },
    /// The kernel sent something unexpected.
    #[error("in {netns}, cannot {doing}")]
    Netlink {
        /// Where.
        netns: String,
        /// What lessnat was doing.
        doing: String,
        /// Why.
        source: rtnetlink::Error,
    },
    /// The request itself is wrong (a malformed prefix, a table outside
    /// lessnat's range, ...); nothing was sent to the kernel.
    #[error("cannot {doing}: {reason}")]
    Invalid {
        /// What lessnat was asked to do.
        doing: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A failure inside the namespace thread, before it is placed in a namespace.
pub(crate) enum Fault {
    Io(String, io::Error),
    Netlink(String, rtnetlink::Error),
}

impl Fault {
    pub(crate) fn io(doing: impl Into<String>) -> impl FnOnce(io::Error) -> Fault {
        let doing = doing.into();
        move |source| Fault::Io(doing, source)
    }

    /// A refusal from the kernel keeps just its errno (`File exists (os error
    /// 17)`); anything else stays a netlink error.
    pub(crate) fn netlink(doing: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Fault {
        let doing = doing.into();
        move |source| match source {
            rtnetlink::Error::NetlinkError(message) => Fault::Io(doing, message.to_io()),
            source => Fault::Netlink(doing, source),
        }
    }

    /// Puts `context` in front of what was being done (`wire web at 10.20.1.5: `).
    pub(crate) fn context(self, context: &str) -> Fault {
        match self {
            Fault::Io(doing, source) => Fault::Io(format!("{context}{doing}"), source),
            Fault::Netlink(doing, source) => Fault::Netlink(format!("{context}{doing}"), source),
        }
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

/// Makes a request that is wrong into a [`NetlinkError::Invalid`].
fn invalid(doing: &str) -> impl FnOnce(String) -> NetlinkError + '_ {
    move |reason| NetlinkError::Invalid {
        doing: doing.to_owned(),
        reason,
    }
}

/// The errno of a kernel refusal, if that is what `error` is.
pub(crate) fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(-message.raw_code()),
        _ => None,
    }
}

/// An rtnetlink connection inside a namespace thread.
pub(crate) struct Rtnl {
    /// Requests go through it.
    pub(crate) handle: Handle,
    /// Whether the kernel filters dumps (`NETLINK_GET_STRICT_CHK`).
    strict: bool,
}

/// Runs `work` with an rtnetlink connection on a thread inside `netns`.
pub(crate) fn with_rtnl<T, F, Fut>(netns: &Netns, work: F) -> Result<T, NetlinkError>
where
    T: Send,
    F: FnOnce(Rtnl) -> Fut + Send,
    Fut: Future<Output = Result<T, Fault>>,
{
    netns
        .run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(Fault::io("start the netlink I/O runtime"))?
                .block_on(async {
                    let rtnl = connect()?;
                    work(rtnl).await
                })
        })?
        .map_err(|fault| fault.within(netns))
}

/// Opens a connection (inside a runtime) and spawns its driver.
fn connect() -> Result<Rtnl, Fault> {
    let (strict, (connection, handle, _)) = match rtnetlink::new_connection_with_strict_check() {
        Ok(parts) => (true, parts),
        Err(_) => (
            false,
            rtnetlink::new_connection().map_err(Fault::io("open an rtnetlink socket"))?,
        ),
    };
    tokio::spawn(connection);
    Ok(Rtnl { handle, strict })
}

/// Reads the policy routing rules (IPv4 and IPv6) whose priority is in
/// [`RULE_PRIORITIES`] and the routes of the tables in [`ROUTE_TABLES`], sorted.
///
/// A rule's `fwmask` is reported only when it is not the full mask
/// (`fwmark 1` and `fwmark 1/0xffffffff` are the same rule to the kernel). A
/// route's device is reported for device routes and `onlink` gateways; for
/// other gateway routes the kernel picked it, and it is left out.
pub fn observe(netns: &Netns) -> Result<RoutingState, NetlinkError> {
    with_rtnl(netns, |rtnl| async move {
        let mut rules = rules_here(&rtnl.handle, IpVersion::V4).await?;
        rules.extend(rules_here(&rtnl.handle, IpVersion::V6).await?);
        rules.sort();
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            routes.extend(routes_here(&rtnl, family, ROUTE_TABLES, None).await?);
        }
        routes.sort();
        Ok(RoutingState { rules, routes })
    })
}

/// The rules of one family in lessnat's range, in kernel order.
async fn rules_here(handle: &Handle, version: IpVersion) -> Result<Vec<IpRule>, Fault> {
    let mut rules = Vec::new();
    let mut dump = handle.rule().get(version).execute();
    loop {
        match dump.try_next().await {
            Ok(Some(message)) => rules.extend(ip_rule(&message)),
            Ok(None) => return Ok(rules),
            // A kernel without IPv6 has no IPv6 rules.
            Err(error) if errno(&error) == Some(libc::EAFNOSUPPORT) => return Ok(rules),
            Err(error) => return Err(Fault::netlink("dump the policy routing rules")(error)),
        }
    }
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
            RuleAttribute::Source(address) => {
                rule.source = Some(format!("{address}/{}", message.header.src_len));
            }
            RuleAttribute::FwMark(mark) => rule.fwmark = Some(*mark),
            RuleAttribute::FwMask(mask) => rule.fwmask = Some(*mask).filter(|m| *m != u32::MAX),
            RuleAttribute::Table(table) => rule.table = *table,
            _ => {}
        }
    }
    RULE_PRIORITIES.contains(&rule.priority).then_some(rule)
}

/// How `ip rule` would show `rule` (for messages).
fn describe_rule(rule: &IpRule) -> String {
    let mut text = format!("{} priority {}", rule.family, rule.priority);
    text += &format!(" from {}", rule.source.as_deref().unwrap_or("all"));
    if let Some(mark) = rule.fwmark {
        text += &format!(" fwmark {mark:#x}");
        if let Some(mask) = rule.fwmask {
            text += &format!("/{mask:#x}");
        }
    }
    text + &format!(" lookup {}", rule.table)
}

/// The kernel message for `rule` (to add or to delete).
fn rule_request(rule: &IpRule) -> Result<RuleMessage, String> {
    if !RULE_PRIORITIES.contains(&rule.priority) {
        return Err(format!(
            "priority {} is outside lessnat's range {}..={}",
            rule.priority,
            RULE_PRIORITIES.start(),
            RULE_PRIORITIES.end()
        ));
    }
    let family = address_family(&rule.family)?;
    let mut message = RuleMessage::default();
    message.header.family = family;
    message.header.action = RuleAction::ToTable;
    // Ids above 255 do not fit the header: they go in FRA_TABLE (as `ip` does).
    message.header.table = header_table(rule.table);
    message.attributes.push(RuleAttribute::Table(rule.table));
    message
        .attributes
        .push(RuleAttribute::Priority(rule.priority));
    if let Some(source) = &rule.source {
        let prefix = prefix(source, "source")?;
        if address_family_of(&prefix.addr()) != family {
            return Err(format!("source {source} is not {}", rule.family));
        }
        message.header.src_len = prefix.prefix_len();
        message
            .attributes
            .push(RuleAttribute::Source(prefix.addr()));
    }
    match (rule.fwmark, rule.fwmask) {
        (Some(mark), mask) => {
            message.attributes.push(RuleAttribute::FwMark(mark));
            message.attributes.extend(mask.map(RuleAttribute::FwMask));
        }
        (None, Some(_)) => return Err("an fwmask needs an fwmark".to_owned()),
        (None, None) => {}
    }
    Ok(message)
}

/// Adds the policy routing rule `rule` (its priority must be in
/// [`RULE_PRIORITIES`]). Adding a rule that is there already succeeds.
pub fn add_rule(netns: &Netns, rule: &IpRule) -> Result<(), NetlinkError> {
    let doing = format!("add rule {}", describe_rule(rule));
    let message = rule_request(rule).map_err(invalid(&doing))?;
    with_rtnl(netns, |rtnl| async move {
        let mut request = rtnl.handle.rule().add();
        *request.message_mut() = message;
        match request.execute().await {
            Err(error) if errno(&error) != Some(libc::EEXIST) => Err(Fault::netlink(doing)(error)),
            _ => Ok(()),
        }
    })
}

/// Deletes the policy routing rule equal to `rule`; when there is none,
/// nothing happens.
pub fn delete_rule(netns: &Netns, rule: &IpRule) -> Result<(), NetlinkError> {
    let doing = format!("delete rule {}", describe_rule(rule));
    let message = rule_request(rule).map_err(invalid(&doing))?;
    let version = match message.header.family {
        AddressFamily::Inet6 => IpVersion::V6,
        _ => IpVersion::V4,
    };
    with_rtnl(netns, |rtnl| async move {
        if !rules_here(&rtnl.handle, version).await?.contains(rule) {
            return Ok(());
        }
        match rtnl.handle.rule().del(message).execute().await {
            Err(error) if errno(&error) != Some(libc::ENOENT) => Err(Fault::netlink(doing)(error)),
            _ => Ok(()),
        }
    })
}

/// A route of lessnat's tables, before its output interface is named.
struct FoundRoute {
    table: u32,
    destination: String,
    gateway: Option<String>,
    oif: Option<u32>,
    onlink: bool,
}

/// Up to this many tables are dumped one by one (with strict checking).
const FILTERED_TABLES: usize = 8;

/// The routes of `family` in `tables` (through `oif`, when given), with
/// their devices named, in kernel order.
async fn routes_here(
    rtnl: &Rtnl,
    family: AddressFamily,
    tables: impl IntoIterator<Item = u32>,
    oif: Option<u32>,
) -> Result<Vec<Route>, Fault> {
    let tables: Vec<u32> = tables.into_iter().collect();
    let mut found = Vec::new();
    // A few tables: one filtered dump each; more (lessnat's whole range): one
    // dump of the family, filtered here, instead of a thousand.
    if rtnl.strict && tables.len() <= FILTERED_TABLES {
        for &table in &tables {
            dump_routes(&rtnl.handle, family, Some(table), oif, &mut found).await?;
        }
    } else {
        dump_routes(&rtnl.handle, family, None, None, &mut found).await?;
    }
    found.retain(|route| tables.contains(&route.table) && oif.is_none_or(|i| route.oif == Some(i)));

    let mut names = BTreeMap::new();
    for index in found.iter().filter_map(|route| route.oif) {
        if let Entry::Vacant(slot) = names.entry(index) {
            slot.insert(link_name(&rtnl.handle, index).await?);
        }
    }
    Ok(found
        .into_iter()
        .map(|route| {
            let named = route.gateway.is_none() || route.onlink;
            Route {
                table: route.table,
                destination: route.destination,
                gateway: route.gateway,
                device: route
                    .oif
                    .filter(|_| named)
                    .and_then(|index| names.get(&index).cloned()),
            }
        })
        .collect())
}

/// Dumps the routes of `family` (of one table and device, when the kernel
/// filters) and keeps those in [`ROUTE_TABLES`].
async fn dump_routes(
    handle: &Handle,
    family: AddressFamily,
    table: Option<u32>,
    oif: Option<u32>,
    found: &mut Vec<FoundRoute>,
) -> Result<(), Fault> {
    let mut request = RouteMessage::default();
    request.header.address_family = family;
    request.attributes.extend(table.map(RouteAttribute::Table));
    request.attributes.extend(oif.map(RouteAttribute::Oif));
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
            Err(error) if errno(&error) == Some(libc::ENOENT) && table.is_some() => {
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
        onlink: header.flags.contains(RouteFlags::Onlink),
    })
}

fn ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(address) => Some(IpAddr::V4(*address)),
        RouteAddress::Inet6(address) => Some(IpAddr::V6(*address)),
        _ => None,
    }
}

fn route_address(address: IpAddr) -> RouteAddress {
    match address {
        IpAddr::V4(address) => RouteAddress::Inet(address),
        IpAddr::V6(address) => RouteAddress::Inet6(address),
    }
}

/// How `ip route` would show `route` (for messages).
pub(crate) fn describe_route(route: &Route) -> String {
    let mut text = route.destination.clone();
    if let Some(gateway) = &route.gateway {
        text += &format!(" via {gateway}");
    }
    if let Some(device) = &route.device {
        text += &format!(" dev {device}");
    }
    text + &format!(" table {}", route.table)
}

/// A [`Route`] checked and parsed, before its device is looked up.
struct RouteSpec<'a> {
    family: AddressFamily,
    destination: Option<IpNet>,
    gateway: Option<IpAddr>,
    device: Option<&'a str>,
    table: u32,
}

fn route_spec(route: &Route) -> Result<RouteSpec<'_>, String> {
    let destination = match route.destination.as_str() {
        "default" => None,
        text => {
            let destination = prefix(text, "destination")?;
            if destination.prefix_len() == 0 {
                return Err(format!("write the destination {text} as `default`"));
            }
            Some(destination)
        }
    };
    let gateway = route
        .gateway
        .as_deref()
        .map(|text| {
            text.parse::<IpAddr>()
                .map_err(|_| format!("gateway {text} is not an IP address"))
        })
        .transpose()?;
    let families: Vec<AddressFamily> = destination
        .map(|net| net.addr())
        .into_iter()
        .chain(gateway)
        .map(|address| address_family_of(&address))
        .collect();
    if families.windows(2).any(|pair| pair[0] != pair[1]) {
        return Err("the destination and the gateway are of different families".to_owned());
    }
    if gateway.is_none() && route.device.is_none() {
        return Err("a route needs a gateway, a device or both".to_owned());
    }
    Ok(RouteSpec {
        // `default dev X` without a gateway is IPv4, as for `ip route`.
        family: families.first().copied().unwrap_or(AddressFamily::Inet),
        destination,
        gateway,
        device: route.device.as_deref(),
        table: route.table,
    })
}

/// The kernel message for `spec` through interface `oif`: to add (unicast,
/// static, scope link when there is no gateway) or to delete.
fn route_request(spec: &RouteSpec, oif: Option<u32>, add: bool) -> RouteMessage {
    let mut message = RouteMessage::default();
    let header = &mut message.header;
    header.address_family = spec.family;
    header.destination_prefix_length = spec.destination.map_or(0, |net| net.prefix_len());
    header.table = header_table(spec.table);
    if add {
        header.protocol = RouteProtocol::Static;
        header.kind = RouteType::Unicast;
        header.scope = match spec.gateway {
            None => RouteScope::Link,
            Some(_) => RouteScope::Universe,
        };
    } else {
        header.scope = RouteScope::NoWhere;
    }
    if spec.gateway.is_some() && oif.is_some() {
        header.flags |= RouteFlags::Onlink;
    }
    let attributes = &mut message.attributes;
    attributes.push(RouteAttribute::Table(spec.table));
    attributes.extend(
        spec.destination
            .map(|net| RouteAttribute::Destination(route_address(net.addr()))),
    );
    attributes.extend(
        spec.gateway
            .map(|address| RouteAttribute::Gateway(route_address(address))),
    );
    attributes.extend(oif.map(RouteAttribute::Oif));
    message
}

/// `route`, checked: well formed and in one of lessnat's tables.
fn owned_route<'a>(route: &'a Route, doing: &str) -> Result<RouteSpec<'a>, NetlinkError> {
    if !ROUTE_TABLES.contains(&route.table) {
        return Err(invalid(doing)(format!(
            "table {} is outside lessnat's range {}..={}",
            route.table,
            ROUTE_TABLES.start(),
            ROUTE_TABLES.end()
        )));
    }
    route_spec(route).map_err(invalid(doing))
}

/// Adds `route` (its table must be in [`ROUTE_TABLES`]), replacing a route to
/// the same destination in that table.
pub fn add_route(netns: &Netns, route: &Route) -> Result<(), NetlinkError> {
    let doing = format!("add route {}", describe_route(route));
    let spec = owned_route(route, &doing)?;
    with_rtnl(netns, |rtnl| async move {
        put_route(&rtnl.handle, &spec)
            .await
            .map_err(|fault| fault.context(&format!("{doing}: ")))
    })
}

/// Adds (or replaces) the route `route` in any table, from the namespace
/// thread.
pub(crate) async fn replace_route(handle: &Handle, route: &Route) -> Result<(), Fault> {
    let spec = route_spec(route).map_err(|reason| {
        Fault::Io(
            format!("add route {}", describe_route(route)),
            io::Error::new(io::ErrorKind::InvalidInput, reason),
        )
    })?;
    put_route(handle, &spec)
        .await
        .map_err(|fault| fault.context(&format!("add route {}: ", describe_route(route))))
}

async fn put_route(handle: &Handle, spec: &RouteSpec<'_>) -> Result<(), Fault> {
    let oif = match spec.device {
        Some(device) => Some(required_link(handle, device).await?),
        None => None,
    };
    handle
        .route()
        .add(route_request(spec, oif, true))
        .replace()
        .execute()
        .await
        .map_err(Fault::netlink("send the request"))
}

/// Deletes the route equal to `route`; when there is none (or its device is
/// gone, which takes its routes with it), nothing happens.
pub fn delete_route(netns: &Netns, route: &Route) -> Result<(), NetlinkError> {
    let doing = format!("delete route {}", describe_route(route));
    let spec = owned_route(route, &doing)?;
    with_rtnl(netns, |rtnl| async move {
        let oif = match spec.device {
            Some(device) => match link_index(&rtnl.handle, device).await? {
                Some(index) => Some(index),
                None => return Ok(()),
            },
            None => None,
        };
        let present = routes_here(&rtnl, spec.family, [spec.table], oif).await?;
        if !present.contains(route) {
            return Ok(());
        }
        match rtnl
            .handle
            .route()
            .del(route_request(&spec, oif, false))
            .execute()
            .await
        {
            Err(error) if errno(&error) != Some(libc::ESRCH) => Err(Fault::netlink(doing)(error)),
            _ => Ok(()),
        }
    })
}

/// The addresses lessnat added: IPv4 addresses whose label ends with
/// [`ADDRESS_LABEL_SUFFIX`] (`lo:lessnat`) and IPv6 addresses of protocol
/// [`ADDRESS_PROTO`], sorted.
pub fn observe_addresses(netns: &Netns) -> Result<Vec<OwnedAddress>, NetlinkError> {
    with_rtnl(netns, |rtnl| async move {
        let mut addresses = owned_addresses_here(&rtnl.handle).await?;
        addresses.sort();
        Ok(addresses)
    })
}

async fn owned_addresses_here(handle: &Handle) -> Result<Vec<OwnedAddress>, Fault> {
    let mut found = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = handle.address().get();
        request.message_mut().header.family = family;
        let mut dump = request.execute();
        while let Some(message) = dump
            .try_next()
            .await
            .map_err(Fault::netlink("dump the addresses"))?
        {
            if message.header.family != family {
                continue;
            }
            if let Some(address) = owned_address(&message) {
                found.push((message.header.index, address));
            }
        }
    }
    let mut names = BTreeMap::new();
    let mut addresses = Vec::new();
    for (index, address) in found {
        let device = match names.entry(index) {
            Entry::Occupied(slot) => slot.into_mut(),
            Entry::Vacant(slot) => slot.insert(link_name(handle, index).await?),
        };
        addresses.push(OwnedAddress {
            device: device.clone(),
            address,
        });
    }
    Ok(addresses)
}

/// The address (CIDR) of an address message lessnat's mark: an IPv4 label
/// ending with [`ADDRESS_LABEL_SUFFIX`], the IPv6 protocol [`ADDRESS_PROTO`].
fn owned_address(message: &AddressMessage) -> Option<String> {
    let mut label = None;
    let mut protocol = None;
    let mut local = None;
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Label(text) => label = Some(text.as_str()),
            AddressAttribute::Protocol(value) => protocol = Some(u8::from(*value)),
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let owned = match message.header.family {
        AddressFamily::Inet => label.is_some_and(|label| label.ends_with(ADDRESS_LABEL_SUFFIX)),
        _ => protocol == Some(ADDRESS_PROTO),
    };
    owned.then_some(())?;
    let address = local.or(address)?;
    Some(format!("{address}/{}", message.header.prefix_len))
}

/// `address`, checked: CIDR, with its label (`lo:lessnat`; IPv6 addresses
/// carry [`ADDRESS_PROTO`] instead).
fn owned_address_spec(
    address: &OwnedAddress,
    doing: &str,
) -> Result<(IpNet, String), NetlinkError> {
    let net = address.address.parse::<IpNet>().map_err(|_| {
        invalid(doing)(format!(
            "{} is not an address in CIDR form (such as 203.0.113.10/32 or 2001:db8::10/128)",
            address.address
        ))
    })?;
    let label = format!("{}{ADDRESS_LABEL_SUFFIX}", address.device);
    // IFNAMSIZ, less the terminating NUL.
    if label.len() > 15 {
        return Err(invalid(doing)(format!(
            "its label {label} would be longer than the kernel's 15 bytes"
        )));
    }
    Ok((net, label))
}

/// The kernel message for `net` on interface `index`; `owned` (the label
/// for IPv4) marks it as lessnat's. IPv6 addresses skip duplicate address
/// detection (`nodad`), so they are usable at once.
fn address_message(index: u32, net: IpNet, owned: Option<String>) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.prefix_len = net.prefix_len();
    message.header.index = index;
    let address = net.addr();
    message.attributes.push(AddressAttribute::Local(address));
    message.attributes.push(AddressAttribute::Address(address));
    match address {
        IpAddr::V4(_) => {
            message.header.family = AddressFamily::Inet;
            message
                .attributes
                .extend(owned.map(AddressAttribute::Label));
        }
        IpAddr::V6(_) => {
            message.header.family = AddressFamily::Inet6;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            if owned.is_some() {
                message
                    .attributes
                    .push(AddressAttribute::Protocol(AddressProtocol::from(
                        ADDRESS_PROTO,
                    )));
            }
        }
    }
    message
}

/// Adds `address` with lessnat's label (`lo:lessnat`). Adding an address that
/// is there with that label succeeds; one that is there without it (someone
/// else's) is an error, as lessnat does not take it over.
pub fn add_address(netns: &Netns, address: &OwnedAddress) -> Result<(), NetlinkError> {
    let doing = format!("add address {} to {}", address.address, address.device);
    let (net, label) = owned_address_spec(address, &doing)?;
    with_rtnl(netns, |rtnl| async move {
        let context = format!("{doing}: ");
        let index = required_link(&rtnl.handle, &address.device)
            .await
            .map_err(|fault| fault.context(&context))?;
        match add_address_here(&rtnl.handle, index, net, Some(label)).await {
            Err(error) if errno(&error) == Some(libc::EEXIST) => {
                if owned_addresses_here(&rtnl.handle).await?.contains(address) {
                    Ok(())
                } else {
                    Err(Fault::Io(
                        doing,
                        io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "it is there already without lessnat's label (someone else's)",
                        ),
                    ))
                }
            }
            result => result.map_err(Fault::netlink(doing)),
        }
    })
}

/// Adds `net` to interface `index` (as lessnat's, with `label`, if given),
/// from the namespace thread; an address that is there already is `EEXIST`.
pub(crate) async fn add_address_here(
    handle: &Handle,
    index: u32,
    net: IpNet,
    label: Option<String>,
) -> Result<(), rtnetlink::Error> {
    let mut request = handle.address().add(index, net.addr(), net.prefix_len());
    *request.message_mut() = address_message(index, net, label);
    request.execute().await
}

/// Deletes `address` (only with lessnat's label, or for IPv6 its
/// protocol); when it is not there, nothing happens.
pub fn delete_address(netns: &Netns, address: &OwnedAddress) -> Result<(), NetlinkError> {
    let doing = format!("delete address {} from {}", address.address, address.device);
    let (net, label) = owned_address_spec(address, &doing)?;
    with_rtnl(netns, |rtnl| async move {
        let Some(index) = link_index(&rtnl.handle, &address.device).await? else {
            return Ok(());
        };
        // The kernel matches an IPv4 delete's label, but not an IPv6
        // delete's protocol: someone else's IPv6 address is left alone here.
        if net.addr().is_ipv6() && !owned_addresses_here(&rtnl.handle).await?.contains(address) {
            return Ok(());
        }
        match rtnl
            .handle
            .address()
            .del(address_message(index, net, Some(label)))
            .execute()
            .await
        {
            Err(error) if errno(&error) != Some(libc::EADDRNOTAVAIL) => {
                Err(Fault::netlink(doing)(error))
            }
            _ => Ok(()),
        }
    })
}

/// The index of the interface `name`, or `None` when there is none.
pub(crate) async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, Fault> {
    match handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link.map(|link| link.header.index)),
        Err(error) if errno(&error) == Some(libc::ENODEV) => Ok(None),
        Err(error) => Err(Fault::netlink(format!("look up interface {name}"))(error)),
    }
}

/// The index of the interface `name`, which must exist.
pub(crate) async fn required_link(handle: &Handle, name: &str) -> Result<u32, Fault> {
    link_index(handle, name).await?.ok_or_else(|| {
        Fault::Io(
            format!("look up interface {name}"),
            io::Error::new(io::ErrorKind::NotFound, "there is no such interface"),
        )
    })
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

/// `inet` or `inet6`.
fn address_family(family: &str) -> Result<AddressFamily, String> {
    match family {
        "inet" => Ok(AddressFamily::Inet),
        "inet6" => Ok(AddressFamily::Inet6),
        other => Err(format!("family {other:?} is neither inet nor inet6")),
    }
}

fn address_family_of(address: &IpAddr) -> AddressFamily {
    match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// A network prefix in CIDR form with no host bits set (`10.20.1.0/24`).
fn prefix(text: &str, what: &str) -> Result<IpNet, String> {
    let net = text
        .parse::<IpNet>()
        .map_err(|_| format!("{what} {text} is not in CIDR form (such as 10.20.1.0/24)"))?;
    if net.trunc() != net {
        return Err(format!(
            "{what} {text} has host bits set (the prefix is {})",
            net.trunc()
        ));
    }
    Ok(net)
}

/// A table id for a message header: ids above 255 go in an attribute, and
/// the header says `RT_TABLE_UNSPEC`.
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
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
    #[test]
    fn rule_sources_are_cidr_text() {
        let mut message = rule_message(
            AddressFamily::Inet,
            vec![
                RuleAttribute::Priority(27001),
                RuleAttribute::Source(IpAddr::V4(Ipv4Addr::new(10, 20, 1, 0))),
                RuleAttribute::Table(27001),
            ],
        );
        message.header.src_len = 24;
        assert_eq!(
            ip_rule(&message).and_then(|rule| rule.source),
            Some("10.20.1.0/24".to_owned())
        );
    }

    fn lessnat_rule(source: Option<&str>, table: u32) -> IpRule {
        IpRule {
            family: "inet".into(),
            priority: 27001,
            source: source.map(str::to_owned),
            fwmark: Some(1),
            fwmask: None,
            table,
        }
    }

    #[test]
    fn rules_are_written_as_they_read_back() {
        for table in [27001, 254] {
            let rule = lessnat_rule(Some("10.20.1.0/24"), table);
            let mut message = rule_request(&rule).expect("valid");
            assert_eq!(message.header.action, RuleAction::ToTable);
            // Large ids are only in FRA_TABLE; the header says "unspecified".
            let header_table = if table > 255 { 0 } else { table };
            assert_eq!(u32::from(message.header.table), header_table);
            // What the kernel adds when it reports the rule back.
            message.attributes.push(RuleAttribute::FwMask(u32::MAX));
            assert_eq!(ip_rule(&message), Some(rule));
        }
        assert_eq!(
            describe_rule(&lessnat_rule(None, 27001)),
            "inet priority 27001 from all fwmark 0x1 lookup 27001"
        );
    }

    fn table_route(destination: &str, gateway: Option<&str>, device: Option<&str>) -> Route {
        Route {
            table: 27000,
            destination: destination.into(),
            gateway: gateway.map(str::to_owned),
            device: device.map(str::to_owned),
        }
    }

    #[test]
    fn routes_are_written_as_they_read_back() {
        let device_route = table_route("10.20.1.5/32", None, Some("v0"));
        let spec = route_spec(&device_route).expect("valid");
        let message = route_request(&spec, Some(3), true);
        assert_eq!(message.header.scope, RouteScope::Link);
        assert_eq!(message.header.table, RouteHeader::RT_TABLE_UNSPEC);
        let found = found_route(&message).expect("in range");
        assert_eq!(
            (found.destination.as_str(), found.oif, found.onlink),
            ("10.20.1.5/32", Some(3), false)
        );

        let onlink = table_route("default", Some("169.254.1.1"), Some("eth0"));
        let message = route_request(&route_spec(&onlink).expect("valid"), Some(2), true);
        let found = found_route(&message).expect("in range");
        assert!(found.onlink);
        assert_eq!(found.destination, "default");
        assert_eq!(message.header.scope, RouteScope::Universe);

        let via = table_route("fd00:30::/64", Some("fd00:20::1"), None);
        let spec = route_spec(&via).expect("valid");
        assert_eq!(spec.family, AddressFamily::Inet6);
        let message = route_request(&spec, None, false);
        assert_eq!(message.header.scope, RouteScope::NoWhere);
        assert!(!found_route(&message).expect("in range").onlink);
    }

    #[test]
    fn owned_addresses_are_recognised_by_their_label() {
        let net: IpNet = "203.0.113.10/32".parse().expect("valid");
        let ours = address_message(1, net, Some("lo:lessnat".into()));
        assert_eq!(owned_address(&ours), Some("203.0.113.10/32".into()));
        for label in [None, Some("lo".to_owned()), Some("lo:lessnatx".to_owned())] {
            let message = address_message(1, net, label.clone());
            assert_eq!(owned_address(&message), None, "{label:?}");
        }
    }

    #[test]
    fn owned_ipv6_addresses_are_recognised_by_their_protocol() {
        let net: IpNet = "2001:db8:f::10/128".parse().expect("valid");
        let ours = address_message(1, net, Some("lo:lessnat".into()));
        assert_eq!(owned_address(&ours), Some("2001:db8:f::10/128".into()));
        assert!(
            ours.attributes
                .contains(&AddressAttribute::Flags(AddressFlags::Nodad)),
            "IPv6 addresses skip duplicate address detection"
        );
        let theirs = address_message(1, net, None);
        assert_eq!(owned_address(&theirs), None);
    }
}
