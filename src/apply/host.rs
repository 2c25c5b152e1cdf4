//! The seam between apply and the machine: [`Host`] is every operation apply
//! carries out on a host (containers, lessnat's nftables table, conntrack,
//! routing, veths, kernel settings, health probes, and the clock its waits
//! run on). [`LiveHost`] does them through the backends inside `--netns`;
//! the unit tests' fake host keeps them in memory, so apply's decisions are
//! tested without root.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::backend::conntrack::{self, ConntrackError, FlowTo, Interest, Settled, UdpPort};
use crate::backend::conntrack_watch::ConntrackWatch;
use crate::backend::docker::{ContainerStatus, Docker, DockerError, PullProgress};
use crate::backend::netlink::{self, NetlinkError};
use crate::backend::nft::{self, NftError};
use crate::backend::sysctl::{self, SysctlError};
use crate::backend::veth::{self, Wiring};
use crate::desired::host_table::guard_table;
use crate::health::NetworkCheck;
use crate::model::{
    ConntrackState, ContainerSpec, IpRule, NftRule, NftTable, OwnedAddress, Redirect, Route, Veth,
};
use crate::netns::Netns;
use crate::plan::operation::Unanswered;
use crate::registry::{Credentials, ImageRef};

/// The operations apply carries out on a host, each as its backend does it
/// (the backend function of the same name documents the details).
pub trait Host {
    /// Creates a container from `spec` (not started); fails when the name is taken.
    fn create(&self, spec: &ContainerSpec) -> Result<(), DockerError>;
    /// Starts a container.
    fn start(&self, name: &str) -> Result<(), DockerError>;
    /// Stops a container, killing it after `timeout`.
    fn stop(&self, name: &str, timeout: Duration) -> Result<(), DockerError>;
    /// Removes a container (absent is fine).
    fn remove(&self, name: &str) -> Result<(), DockerError>;
    /// Renames a container; fails when `new_name` is taken.
    fn rename(&self, name: &str, new_name: &str) -> Result<(), DockerError>;
    /// Gives a healthy primary the restart policy `unless-stopped`.
    fn keep_running(&self, name: &str) -> Result<(), DockerError>;
    /// Whether a container runs, its exit code and pid; `None` when it does not exist.
    fn state(&self, name: &str) -> Result<Option<ContainerStatus>, DockerError>;
    /// Pulls `reference` (taken apart as `image`) with `credentials`,
    /// telling `on_progress` how far it came; returns the final progress.
    fn pull(
        &self,
        reference: &str,
        image: &ImageRef,
        credentials: Option<&Credentials>,
        on_progress: &mut dyn FnMut(&PullProgress),
    ) -> Result<PullProgress, DockerError>;
    /// A container's last `lines` lines of output.
    fn logs_tail(&self, name: &str, lines: usize) -> Result<String, DockerError>;
    /// Runs `command` in a running container and returns its exit code.
    fn exec(&self, name: &str, command: &[String], timeout: Duration) -> Result<i64, DockerError>;

    /// Replaces lessnat's nftables table with `table`, in one transaction.
    fn apply_table(&self, table: &NftTable) -> Result<(), NftError>;
    /// Deletes lessnat's nftables table (absent is fine).
    fn delete_table(&self) -> Result<(), NftError>;
    /// Adds (`present`) or removes one redirect map element; removing one
    /// that is gone (or whose table is) succeeds.
    fn set_redirect(&self, redirect: &Redirect, present: bool) -> Result<(), NftError>;
    /// Replaces the rules of lessnat's table commented with one of `remove`
    /// by `add` (each appended to its chain), in one transaction (a canary's
    /// split set or ended); removing rules that are gone succeeds.
    fn replace_rules(&self, remove: &[String], add: &[(String, NftRule)]) -> Result<(), NftError>;
    /// Keeps lessnat's table holding `table` until the hold is dropped: when
    /// someone else deletes it, or part of it, it is written whole again in
    /// one transaction (live: at once, on nftables' own event).
    fn hold_table(&self, table: &NftTable) -> Result<Box<dyn TableHold + '_>, NftError>;

    /// Follows the live conntrack entries of `interests` (drains of
    /// host-mode upgrades): read once, then kept current.
    fn watch_conntrack(
        &self,
        interests: &[Interest],
    ) -> Result<Box<dyn ConntrackWake + '_>, ConntrackError>;
    /// Deletes the UDP conntrack entries of `ports` that keep a flow where it
    /// should no longer go, until none comes back for a while (how UDP flows
    /// move at a redirect and an unredirect).
    fn settle_udp_flows(&self, ports: &[UdpPort]) -> Result<Settled, ConntrackError>;
    /// The conntrack entries whose reply comes from `address` (routed drains).
    fn flows_to(&self, address: IpAddr) -> Result<Vec<FlowTo>, ConntrackError>;
    /// Counts the live TCP connections whose reply comes from `address`.
    fn live_connections_to(&self, address: IpAddr) -> Result<u64, ConntrackError>;
    /// Deletes the entries of connections to a VIP port that went to
    /// replicas left out of its spread and never got a reply; returns how
    /// many.
    fn delete_unanswered(&self, flows: &Unanswered) -> Result<u64, ConntrackError>;

    /// Adds a policy routing rule.
    fn add_rule(&self, rule: &IpRule) -> Result<(), NetlinkError>;
    /// Deletes a policy routing rule.
    fn delete_rule(&self, rule: &IpRule) -> Result<(), NetlinkError>;
    /// Adds a route.
    fn add_route(&self, route: &Route) -> Result<(), NetlinkError>;
    /// Deletes a route.
    fn delete_route(&self, route: &Route) -> Result<(), NetlinkError>;
    /// Adds an address lessnat owns.
    fn add_address(&self, address: &OwnedAddress) -> Result<(), NetlinkError>;
    /// Deletes an address lessnat owns.
    fn delete_address(&self, address: &OwnedAddress) -> Result<(), NetlinkError>;

    /// Wires a running container in with a veth pair.
    fn wire(&self, wiring: &Wiring) -> Result<(), NetlinkError>;
    /// Removes a veth pair (absent is fine).
    fn unwire(&self, name: &str) -> Result<(), NetlinkError>;
    /// Lists lessnat's veths.
    fn veths(&self) -> Result<Vec<Veth>, NetlinkError>;

    /// Sets a kernel setting.
    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), SysctlError>;

    /// Runs `check` against `ip` with the probe mark: passes, or fails with the reason.
    fn probe(&self, check: &NetworkCheck, ip: IpAddr, timeout: Duration) -> Result<(), String>;

    /// The time drains and switch waits measure with.
    fn now(&self) -> Instant;
    /// Waits `duration`: between two polls of a drain or switch wait, and
    /// between the passes of a UDP move.
    fn sleep(&self, duration: Duration);
}

/// A hold on lessnat's table, from [`Host::hold_table`].
pub trait TableHold {
    /// Checks the table now, writes it whole when part of it is missing, and
    /// returns how many times it was written since the last call (in the
    /// background, or now).
    fn reassert(&self) -> Result<u32, NftError>;
    /// Why no guard table carries the redirect meanwhile, when none does: a
    /// deletion of lessnat's table then leaves new connections unredirected
    /// until it is restored.
    fn unguarded(&self) -> Option<&NftError>;
}

/// A watch on conntrack entries, from [`Host::watch_conntrack`].
pub trait ConntrackWake {
    /// The live entries now, as flow counts.
    fn state(&mut self) -> Result<ConntrackState, ConntrackError>;
    /// Waits until one of the watched entries changes (or may have: events
    /// were lost), at most `timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<(), ConntrackError>;
}

impl ConntrackWake for ConntrackWatch {
    fn state(&mut self) -> Result<ConntrackState, ConntrackError> {
        ConntrackWatch::state(self)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), ConntrackError> {
        ConntrackWatch::wait(self, timeout).map(drop)
    }
}

/// A watch where conntrack is not available: no entry, ever.
struct Untracked {
    state: ConntrackState,
}

impl ConntrackWake for Untracked {
    fn state(&mut self) -> Result<ConntrackState, ConntrackError> {
        Ok(self.state.clone())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), ConntrackError> {
        std::thread::sleep(timeout);
        Ok(())
    }
}

/// The live hold: the guard table (`nft::GuardTable`), when the host allows
/// one, and the watch that restores lessnat's table.
struct LiveHold {
    watch: nft::TableWatch,
    guard: Result<nft::GuardTable, NftError>,
}

impl TableHold for LiveHold {
    fn reassert(&self) -> Result<u32, NftError> {
        self.watch.reassert()
    }

    fn unguarded(&self) -> Option<&NftError> {
        self.guard.as_ref().err()
    }
}

/// The real host: the backends, inside `netns`, and the Docker engine.
pub struct LiveHost<'a> {
    /// The network namespace to work in.
    pub netns: &'a Netns,
    /// The Docker engine.
    pub docker: &'a Docker,
}

impl Host for LiveHost<'_> {
    fn create(&self, spec: &ContainerSpec) -> Result<(), DockerError> {
        self.docker.create(spec).map(drop)
    }

    fn start(&self, name: &str) -> Result<(), DockerError> {
        self.docker.start(name)
    }

    fn stop(&self, name: &str, timeout: Duration) -> Result<(), DockerError> {
        self.docker.stop(name, timeout)
    }

    fn remove(&self, name: &str) -> Result<(), DockerError> {
        self.docker.remove(name)
    }

    fn rename(&self, name: &str, new_name: &str) -> Result<(), DockerError> {
        self.docker.rename(name, new_name)
    }

    fn keep_running(&self, name: &str) -> Result<(), DockerError> {
        self.docker.keep_running(name)
    }

    fn pull(
        &self,
        reference: &str,
        image: &ImageRef,
        credentials: Option<&Credentials>,
        on_progress: &mut dyn FnMut(&PullProgress),
    ) -> Result<PullProgress, DockerError> {
        self.docker
            .pull(reference, image, credentials, |p| on_progress(p))
    }

    fn state(&self, name: &str) -> Result<Option<ContainerStatus>, DockerError> {
        self.docker.state(name)
    }

    fn logs_tail(&self, name: &str, lines: usize) -> Result<String, DockerError> {
        self.docker.logs_tail(name, lines)
    }

    fn exec(&self, name: &str, command: &[String], timeout: Duration) -> Result<i64, DockerError> {
        self.docker.exec(name, command, timeout)
    }

    fn apply_table(&self, table: &NftTable) -> Result<(), NftError> {
        nft::apply_table(self.netns, table)
    }

    fn delete_table(&self) -> Result<(), NftError> {
        nft::delete_table(self.netns)
    }

    fn set_redirect(&self, redirect: &Redirect, present: bool) -> Result<(), NftError> {
        nft::set_redirect(self.netns, redirect, present)
    }

    fn replace_rules(&self, remove: &[String], add: &[(String, NftRule)]) -> Result<(), NftError> {
        nft::replace_rules(self.netns, remove, add)
    }

    fn hold_table(&self, table: &NftTable) -> Result<Box<dyn TableHold + '_>, NftError> {
        let watch = nft::TableWatch::start(self.netns, table)?;
        let guard = nft::GuardTable::hold(self.netns, &guard_table(table));
        Ok(Box::new(LiveHold { watch, guard }))
    }

    fn watch_conntrack(
        &self,
        interests: &[Interest],
    ) -> Result<Box<dyn ConntrackWake + '_>, ConntrackError> {
        match ConntrackWatch::open(self.netns, interests) {
            Ok(watch) => Ok(Box::new(watch)),
            // As observation reports it (with a warning in the plan): nothing
            // to count, so nothing to wait for.
            Err(ConntrackError::Unavailable { netns, reason }) => Ok(Box::new(Untracked {
                state: ConntrackState {
                    unavailable_reason: Some(format!("{reason} (in {netns})")),
                    ..ConntrackState::default()
                },
            })),
            Err(error) => Err(error),
        }
    }

    fn settle_udp_flows(&self, ports: &[UdpPort]) -> Result<Settled, ConntrackError> {
        conntrack::settle_udp_flows(self.netns, ports)
    }

    fn flows_to(&self, address: IpAddr) -> Result<Vec<FlowTo>, ConntrackError> {
        conntrack::flows_to(self.netns, address)
    }

    fn live_connections_to(&self, address: IpAddr) -> Result<u64, ConntrackError> {
        conntrack::live_connections_to(self.netns, address)
    }

    fn delete_unanswered(&self, flows: &Unanswered) -> Result<u64, ConntrackError> {
        conntrack::delete_unanswered(
            self.netns,
            flows.protocol.as_str(),
            flows.vip,
            flows.vip_port,
            &flows.addresses,
        )
    }

    fn add_rule(&self, rule: &IpRule) -> Result<(), NetlinkError> {
        netlink::add_rule(self.netns, rule)
    }

    fn delete_rule(&self, rule: &IpRule) -> Result<(), NetlinkError> {
        netlink::delete_rule(self.netns, rule)
    }

    fn add_route(&self, route: &Route) -> Result<(), NetlinkError> {
        netlink::add_route(self.netns, route)
    }

    fn delete_route(&self, route: &Route) -> Result<(), NetlinkError> {
        netlink::delete_route(self.netns, route)
    }

    fn add_address(&self, address: &OwnedAddress) -> Result<(), NetlinkError> {
        netlink::add_address(self.netns, address)
    }

    fn delete_address(&self, address: &OwnedAddress) -> Result<(), NetlinkError> {
        netlink::delete_address(self.netns, address)
    }

    fn wire(&self, wiring: &Wiring) -> Result<(), NetlinkError> {
        veth::wire(self.netns, wiring).map(drop)
    }

    fn unwire(&self, name: &str) -> Result<(), NetlinkError> {
        veth::unwire(self.netns, name)
    }

    fn veths(&self) -> Result<Vec<Veth>, NetlinkError> {
        veth::observe(self.netns)
    }

    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), SysctlError> {
        sysctl::write(self.netns, key, value)
    }

    fn probe(&self, check: &NetworkCheck, ip: IpAddr, timeout: Duration) -> Result<(), String> {
        self.netns
            .run(|| check.run(ip, timeout))
            .map_err(|e| crate::error::chain(&e))?
            .map_err(|e| crate::error::chain(&e))
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}
