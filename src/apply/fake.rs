//! A host in memory for unit tests of apply's decisions, in the spirit of
//! knftables' `Fake`: containers by name, lessnat's table with its redirects,
//! routing, veths and kernel settings; conntrack and health answers scripted
//! by the test; a virtual clock (drains take no real time); a log of every
//! call in order; and failures injected into any call.
//!
//! A container listens on the port numbers its command and environment name
//! (`-listen=:{port}` filled in), on loopback in host mode and at the address
//! it is wired in at in routed mode; a probe of a port nobody listens on is
//! refused.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bollard::errors::Error as ApiError;

use super::host::{ConntrackWake, Host, TableHold};
use crate::backend::conntrack::{ConntrackError, FlowTo, Interest, Settled, UdpPort};
use crate::backend::docker::{ContainerStatus, DockerError, PullProgress};
use crate::backend::netlink::NetlinkError;
use crate::backend::nft::NftError;
use crate::backend::sysctl::SysctlError;
use crate::backend::veth::Wiring;
use crate::desired::host_table::{redirects_in, remove_canary};
use crate::health::NetworkCheck;
use crate::model::{
    ConntrackState, Container, ContainerNetwork, ContainerSpec, Image, IpRule, NftElement, NftRule,
    NftState, NftTable, OBSERVED_FORMAT, Observed, OwnedAddress, Redirect, Route, RoutingState,
    Veth, redirect_map_name,
};
use crate::ownership::{
    LABEL_ADDRESS, LABEL_DIGEST, LABEL_PORTS, LABEL_SERVICE, LABEL_SPEC, LABEL_STOP_TIMEOUT,
    parse_container_name, veth_name,
};
use crate::plan::operation::Unanswered;
use crate::registry::{Credentials, ImageRef};

/// How a container answers health checks (network probes and `exec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Health {
    /// Fails this many checks, then passes.
    After(u32),
    /// Never passes.
    Never,
    /// Passes `after` checks, then fails every one.
    Sickens {
        /// Checks passed before it fails.
        after: u32,
    },
    /// Passes `after` checks, then exits with code 1.
    Dies {
        /// Checks passed before it exits.
        after: u32,
    },
    /// Fails `after` checks, then exits with `code`.
    Exits {
        /// Checks failed before it exits.
        after: u32,
        /// Its exit code.
        code: i64,
    },
}

/// One container.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct FakeContainer {
    /// What it was created from.
    pub spec: ContainerSpec,
    /// Whether its process runs.
    pub running: bool,
    /// Its exit code once it has exited.
    pub exit_code: Option<i64>,
    /// Its pid while it runs.
    pub pid: Option<u32>,
    /// Whether its restart policy is `unless-stopped`.
    pub kept_running: bool,
    health: Health,
    checks: u32,
}

impl FakeContainer {
    fn status(&self) -> ContainerStatus {
        ContainerStatus {
            running: self.running,
            exit_code: self.exit_code,
            pid: self.pid,
        }
    }

    fn listens_on(&self, port: u16) -> bool {
        self.spec
            .command
            .iter()
            .chain(self.spec.env.values())
            .flat_map(|text| text.split(|c: char| !c.is_ascii_digit()))
            .any(|number| number.parse() == Ok(port))
    }

    /// Answers one health check as scripted.
    fn check(&mut self) -> Result<(), String> {
        self.checks += 1;
        match self.health {
            Health::After(failures) if self.checks > failures => Ok(()),
            Health::Sickens { after } | Health::Dies { after } if self.checks <= after => Ok(()),
            Health::Dies { .. } => {
                self.running = false;
                self.exit_code = Some(1);
                self.pid = None;
                Err("connection reset: the process exited".into())
            }
            Health::Exits { after, code } if self.checks > after => {
                self.running = false;
                self.exit_code = Some(code);
                self.pid = None;
                Err("connection reset: the process exited".into())
            }
            _ => Err(format!("not healthy yet (check {})", self.checks)),
        }
    }
}

/// When someone else deletes lessnat's table, for [`FakeHost::delete_table_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum At {
    /// At the `n`th conntrack read (counted from 1), before it is answered.
    ConntrackRead(usize),
    /// At the `n`th health probe (counted from 1), before it is answered.
    Probe(usize),
}

/// Answers scripted by a test: each read takes the next one; the last one stays.
#[derive(Debug, Clone, Default)]
struct Script<T>(VecDeque<T>);

impl<T: Clone + Default> Script<T> {
    fn next(&mut self) -> T {
        if self.0.len() > 1 {
            self.0.pop_front().unwrap_or_default()
        } else {
            self.peek()
        }
    }

    fn peek(&self) -> T {
        self.0.front().cloned().unwrap_or_default()
    }
}

/// A veth and the process whose namespace it leads into.
#[derive(Debug, Clone)]
struct Wired {
    veth: Veth,
    pid: u32,
}

/// A call that fails the next `times` times it is made.
#[derive(Debug, Clone)]
struct Fault {
    call: String,
    times: u32,
}

#[derive(Debug, Default)]
struct State {
    containers: BTreeMap<String, FakeContainer>,
    table: Option<NftTable>,
    rules: Vec<IpRule>,
    routes: Vec<Route>,
    addresses: Vec<OwnedAddress>,
    veths: Vec<Wired>,
    sysctls: BTreeMap<String, String>,
    conntrack: Script<ConntrackState>,
    conntrack_reads: usize,
    interrupt_at_read: Option<usize>,
    interrupt_at_probe: Option<usize>,
    probes: usize,
    delete_table_at: Vec<At>,
    flows_to: BTreeMap<IpAddr, Script<Vec<FlowTo>>>,
    health: BTreeMap<String, Health>,
    faults: Vec<Fault>,
    calls: Vec<String>,
    elapsed: Duration,
    last_pid: u32,
    /// Images the engine has (pulled ones).
    images: Vec<String>,
}

impl State {
    /// The veths whose container still runs (a pair goes with its namespace).
    fn live_veths(&self) -> impl Iterator<Item = &Wired> {
        self.veths.iter().filter(|w| {
            self.containers
                .values()
                .any(|c| c.running && c.pid == Some(w.pid))
        })
    }

    /// The running container that answers at `ip`, `port`.
    fn listener(&self, ip: IpAddr, port: u16) -> Option<String> {
        let wired_at = |pid| {
            self.live_veths()
                .any(|w| w.pid == pid && w.veth.address == ip.to_string())
        };
        self.containers
            .iter()
            .find(|(_, c)| {
                c.running
                    && c.listens_on(port)
                    && match c.spec.network {
                        ContainerNetwork::Host => ip.is_loopback(),
                        ContainerNetwork::None => c.pid.is_some_and(wired_at),
                    }
            })
            .map(|(name, _)| name.clone())
    }
}

/// What a test does at given health probes, for [`FakeHost::at_probe`].
#[derive(Default)]
struct ProbeHooks(Vec<(usize, Box<dyn FnOnce()>)>);

impl std::fmt::Debug for ProbeHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let at: Vec<usize> = self.0.iter().map(|(n, _)| *n).collect();
        write!(f, "ProbeHooks at {at:?}")
    }
}

/// The host in memory.
#[derive(Debug)]
pub(super) struct FakeHost {
    state: RefCell<State>,
    hooks: RefCell<ProbeHooks>,
    /// The flag apply's context borrows as its interrupt; a scripted
    /// conntrack read can set it.
    pub interrupt: AtomicBool,
    epoch: Instant,
}

impl FakeHost {
    /// An empty host: no containers, no table.
    pub fn new() -> Self {
        FakeHost {
            state: RefCell::default(),
            hooks: RefCell::default(),
            interrupt: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    /// Containers created from now on under `name` answer health checks as
    /// `health` (by default they pass at once).
    pub fn set_health(&self, name: &str, health: Health) {
        self.state
            .borrow_mut()
            .health
            .insert(name.to_string(), health);
    }

    /// The running container `name` answers its next health checks as
    /// `health`, its checks counted from zero again.
    pub fn rescript_health(&self, name: &str, health: Health) {
        let mut state = self.state.borrow_mut();
        let container = state
            .containers
            .get_mut(name)
            .unwrap_or_else(|| panic!("no container {name} to rescript"));
        container.health = health;
        container.checks = 0;
    }

    /// What the conntrack reads return, one per read; the last one stays.
    pub fn set_conntrack(&self, reads: Vec<ConntrackState>) {
        self.state.borrow_mut().conntrack = Script(reads.into());
    }

    /// What reads of the flows whose reply comes from `address` return.
    pub fn set_flows_to(&self, address: IpAddr, reads: Vec<Vec<FlowTo>>) {
        self.state
            .borrow_mut()
            .flows_to
            .insert(address, Script(reads.into()));
    }

    /// Sets [`Self::interrupt`] at the `read`th conntrack read (counted from 1).
    pub fn interrupt_at_read(&self, read: usize) {
        self.state.borrow_mut().interrupt_at_read = Some(read);
    }

    /// Sets [`Self::interrupt`] at the `probe`th health probe (counted from 1).
    pub fn interrupt_at_probe(&self, probe: usize) {
        self.state.borrow_mut().interrupt_at_probe = Some(probe);
    }

    /// Someone else deletes lessnat's table `at` that moment (logged as
    /// `foreign: delete table`).
    pub fn delete_table_at(&self, at: At) {
        self.state.borrow_mut().delete_table_at.push(at);
    }

    /// Runs `action` at the `probe`th health probe (counted from 1), before
    /// it is answered: what someone else does meanwhile.
    pub fn at_probe(&self, probe: usize, action: impl FnOnce() + 'static) {
        self.hooks.borrow_mut().0.push((probe, Box::new(action)));
    }

    /// The table lessnat's table is now, if it exists.
    pub fn table(&self) -> Option<NftTable> {
        self.state.borrow().table.clone()
    }

    /// Whether lessnat's table exists.
    pub fn has_table(&self) -> bool {
        self.state.borrow().table.is_some()
    }

    /// Makes the next `times` calls logged as `call` fail.
    pub fn fail(&self, call: &str, times: u32) {
        self.state.borrow_mut().faults.push(Fault {
            call: call.to_string(),
            times,
        });
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state.borrow().calls.clone()
    }

    /// Forgets the calls so far; conntrack reads and probes are counted
    /// afresh (for [`At`] and [`Self::interrupt_at_read`]).
    pub fn clear_calls(&self) {
        let mut state = self.state.borrow_mut();
        state.calls.clear();
        state.conntrack_reads = 0;
        state.probes = 0;
    }

    /// The container named `name`.
    pub fn container(&self, name: &str) -> Option<FakeContainer> {
        self.state.borrow().containers.get(name).cloned()
    }

    /// The names of all containers, sorted.
    pub fn container_names(&self) -> Vec<String> {
        self.state.borrow().containers.keys().cloned().collect()
    }

    /// The redirects in lessnat's table.
    pub fn redirects(&self) -> Vec<Redirect> {
        self.state
            .borrow()
            .table
            .as_ref()
            .map(redirects_in)
            .unwrap_or_default()
    }

    /// Virtual time spent sleeping.
    pub fn elapsed(&self) -> Duration {
        self.state.borrow().elapsed
    }

    /// The host as `lessnat` would observe it on `node` (conntrack: the
    /// current answer, not consumed).
    pub fn observed(&self, node: &str) -> Observed {
        let state = self.state.borrow();
        let containers = state
            .containers
            .iter()
            .filter_map(|(name, c)| {
                let label = |key: &str| c.spec.labels.get(key).cloned();
                Some(Container {
                    id: format!("fake-{name}"),
                    name: name.clone(),
                    service: label(LABEL_SERVICE)?,
                    slot: parse_container_name(name)?.slot,
                    spec_hash: label(LABEL_SPEC).unwrap_or_default(),
                    image: c.spec.image.clone(),
                    ports: label(LABEL_PORTS)
                        .map(|p| p.split(',').map(str::to_string).collect())
                        .unwrap_or_default(),
                    state: match (c.running, c.exit_code) {
                        (true, _) => "running",
                        (false, Some(_)) => "exited",
                        (false, None) => "created",
                    }
                    .into(),
                    health: None,
                    pid: c.pid,
                    address: label(LABEL_ADDRESS),
                    stop_timeout: label(LABEL_STOP_TIMEOUT).and_then(|t| t.parse().ok()),
                    digest: label(LABEL_DIGEST),
                })
            })
            .collect();
        Observed {
            format: OBSERVED_FORMAT,
            node: node.to_string(),
            nft: NftState {
                tables: state.table.iter().cloned().collect(),
            },
            routing: RoutingState {
                rules: state.rules.clone(),
                routes: state.routes.clone(),
            },
            containers,
            veths: state.live_veths().map(|w| w.veth.clone()).collect(),
            addresses: state.addresses.clone(),
            sysctls: state.sysctls.clone(),
            conntrack: state.conntrack.peek(),
            images: state
                .images
                .iter()
                .map(|reference| Image {
                    reference: reference.clone(),
                    id: format!("fake-{reference}"),
                    digests: Vec::new(),
                })
                .collect(),
            ..Observed::default()
        }
    }

    /// Deletes lessnat's table when a test scheduled it `at` this moment.
    /// One scripted conntrack read (logged as `read conntrack`).
    fn read_conntrack(&self) -> Result<ConntrackState, ConntrackError> {
        self.call("read conntrack")
            .map_err(|e| conntrack_error("read conntrack", e))?;
        let read = {
            let mut state = self.state.borrow_mut();
            state.conntrack_reads += 1;
            state.conntrack_reads
        };
        self.foreign_delete(At::ConntrackRead(read));
        let mut state = self.state.borrow_mut();
        if state.interrupt_at_read == Some(read) {
            self.interrupt.store(true, Ordering::SeqCst);
        }
        Ok(state.conntrack.next())
    }

    fn foreign_delete(&self, at: At) {
        let mut state = self.state.borrow_mut();
        if state.delete_table_at.contains(&at) {
            state.calls.push("foreign: delete table".into());
            state.table = None;
        }
    }

    /// Writes lessnat's table, logged as `call`.
    fn apply_table_as(&self, call: &str, table: &NftTable) -> Result<(), NftError> {
        self.call(call).map_err(|e| nft_error(call, e))?;
        self.state.borrow_mut().table = Some(table.clone());
        Ok(())
    }

    /// Logs `call`; fails it when a fault is set for it.
    fn call(&self, call: &str) -> Result<(), String> {
        let mut state = self.state.borrow_mut();
        state.calls.push(call.to_string());
        match state
            .faults
            .iter_mut()
            .find(|f| f.call == call && f.times > 0)
        {
            Some(fault) => {
                fault.times -= 1;
                Err(format!("injected failure of {call}"))
            }
            None => Ok(()),
        }
    }

    /// Logs a Docker call and runs `change` on the container `name`.
    fn on_container<T>(
        &self,
        call: &str,
        name: &str,
        change: impl FnOnce(&mut FakeContainer) -> T,
    ) -> Result<T, DockerError> {
        self.call(call).map_err(|e| docker_error(call, 500, e))?;
        let mut state = self.state.borrow_mut();
        let container = state
            .containers
            .get_mut(name)
            .ok_or_else(|| docker_error(call, 404, format!("no such container: {name}")))?;
        Ok(change(container))
    }
}

fn docker_error(what: &str, status_code: u16, message: String) -> DockerError {
    DockerError::Request {
        host: "fake".into(),
        what: what.to_string(),
        source: ApiError::DockerResponseServerError {
            status_code,
            message,
        },
    }
}

fn nft_error(command: &str, stderr: String) -> NftError {
    NftError::Failed {
        command: command.to_string(),
        stderr,
    }
}

fn conntrack_error(doing: &str, reason: String) -> ConntrackError {
    ConntrackError::Io {
        netns: "fake".into(),
        doing: doing.to_string(),
        source: io::Error::other(reason),
    }
}

fn netlink_error(doing: &str, reason: String) -> NetlinkError {
    NetlinkError::Io {
        netns: "fake".into(),
        doing: doing.to_string(),
        source: io::Error::other(reason),
    }
}

impl Host for FakeHost {
    fn pull(
        &self,
        reference: &str,
        _image: &ImageRef,
        _credentials: Option<&Credentials>,
        on_progress: &mut dyn FnMut(&PullProgress),
    ) -> Result<PullProgress, DockerError> {
        let call = format!("pull {reference}");
        self.call(&call).map_err(|e| docker_error(&call, 500, e))?;
        let progress = PullProgress::default();
        on_progress(&progress);
        self.state.borrow_mut().images.push(reference.to_string());
        Ok(progress)
    }

    fn create(&self, spec: &ContainerSpec) -> Result<(), DockerError> {
        let call = format!("create {}", spec.name);
        self.call(&call).map_err(|e| docker_error(&call, 500, e))?;
        let mut state = self.state.borrow_mut();
        if state.containers.contains_key(&spec.name) {
            return Err(docker_error(&call, 409, "the name is in use".into()));
        }
        let health = state
            .health
            .get(&spec.name)
            .copied()
            .unwrap_or(Health::After(0));
        state.containers.insert(
            spec.name.clone(),
            FakeContainer {
                spec: spec.clone(),
                running: false,
                exit_code: None,
                pid: None,
                kept_running: false,
                health,
                checks: 0,
            },
        );
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), DockerError> {
        let pid = {
            let mut state = self.state.borrow_mut();
            state.last_pid += 1;
            state.last_pid
        };
        self.on_container(&format!("start {name}"), name, |c| {
            if !c.running {
                c.running = true;
                c.exit_code = None;
                c.pid = Some(pid);
            }
        })
    }

    fn stop(&self, name: &str, _timeout: Duration) -> Result<(), DockerError> {
        self.on_container(&format!("stop {name}"), name, |c| {
            if c.running {
                c.running = false;
                c.exit_code = Some(0);
                c.pid = None;
            }
        })
    }

    fn remove(&self, name: &str) -> Result<(), DockerError> {
        let call = format!("remove {name}");
        self.call(&call).map_err(|e| docker_error(&call, 500, e))?;
        self.state.borrow_mut().containers.remove(name);
        Ok(())
    }

    fn rename(&self, name: &str, new_name: &str) -> Result<(), DockerError> {
        let call = format!("rename {name} {new_name}");
        self.call(&call).map_err(|e| docker_error(&call, 500, e))?;
        let mut state = self.state.borrow_mut();
        if state.containers.contains_key(new_name) {
            return Err(docker_error(&call, 409, "the name is in use".into()));
        }
        let mut container = state
            .containers
            .remove(name)
            .ok_or_else(|| docker_error(&call, 404, format!("no such container: {name}")))?;
        container.spec.name = new_name.to_string();
        state.containers.insert(new_name.to_string(), container);
        Ok(())
    }

    fn keep_running(&self, name: &str) -> Result<(), DockerError> {
        self.on_container(&format!("keep_running {name}"), name, |c| {
            c.kept_running = true;
        })
    }

    fn state(&self, name: &str) -> Result<Option<ContainerStatus>, DockerError> {
        let call = format!("state {name}");
        self.call(&call).map_err(|e| docker_error(&call, 500, e))?;
        Ok(self
            .state
            .borrow()
            .containers
            .get(name)
            .map(FakeContainer::status))
    }

    fn logs_tail(&self, name: &str, _lines: usize) -> Result<String, DockerError> {
        self.on_container(&format!("logs {name}"), name, |c| {
            format!("{} exited with {:?}", c.spec.name, c.exit_code)
        })
    }

    fn exec(
        &self,
        name: &str,
        _command: &[String],
        _timeout: Duration,
    ) -> Result<i64, DockerError> {
        let call = format!("exec {name}");
        let answer = self.on_container(&call, name, |c| c.running.then(|| c.check()))?;
        match answer {
            Some(Ok(())) => Ok(0),
            Some(Err(_)) => Ok(1),
            None => Err(docker_error(&call, 409, format!("{name} is not running"))),
        }
    }

    fn apply_table(&self, table: &NftTable) -> Result<(), NftError> {
        self.apply_table_as("write table", table)
    }

    fn delete_table(&self) -> Result<(), NftError> {
        self.call("delete table")
            .map_err(|e| nft_error("delete table", e))?;
        self.state.borrow_mut().table = None;
        Ok(())
    }

    fn set_redirect(&self, redirect: &Redirect, present: bool) -> Result<(), NftError> {
        let call = format!(
            "{} redirect {}/{} -> {}",
            if present { "add" } else { "remove" },
            redirect.port,
            redirect.protocol.as_str(),
            redirect.temp_port
        );
        self.call(&call).map_err(|e| nft_error(&call, e))?;
        let mut state = self.state.borrow_mut();
        let map = state.table.as_mut().and_then(|t| {
            let name = redirect_map_name(redirect.protocol);
            t.maps.iter_mut().find(|m| m.name == name)
        });
        let Some(map) = map else {
            // Removing an element whose map or table is gone succeeds.
            return if present {
                Err(nft_error(&call, "no such map in table inet lessnat".into()))
            } else {
                Ok(())
            };
        };
        let key = serde_json::json!(redirect.port);
        map.elements.retain(|e| e.key != key);
        if present {
            map.elements.push(NftElement {
                key,
                value: serde_json::json!(redirect.temp_port),
            });
            map.elements.sort_by_key(|e| e.key.as_u64());
        }
        Ok(())
    }

    fn replace_rules(&self, remove: &[String], add: &[(String, NftRule)]) -> Result<(), NftError> {
        let call = format!("replace rules -{} +{}", remove.join(" -"), add.len());
        self.call(&call).map_err(|e| nft_error(&call, e))?;
        let mut state = self.state.borrow_mut();
        let Some(table) = state.table.as_mut() else {
            return if add.is_empty() {
                Ok(())
            } else {
                Err(nft_error(&call, "no table inet lessnat".into()))
            };
        };
        remove_canary(table, remove);
        for (chain, rule) in add {
            let found = table.chains.iter_mut().find(|c| &c.name == chain);
            let Some(found) = found else {
                return Err(nft_error(&call, format!("no chain {chain}")));
            };
            found.rules.push(rule.clone());
        }
        Ok(())
    }

    fn hold_table(&self, table: &NftTable) -> Result<Box<dyn TableHold + '_>, NftError> {
        self.call("hold table")
            .map_err(|e| nft_error("hold table", e))?;
        Ok(Box::new(FakeHold {
            host: self,
            table: table.clone(),
        }))
    }

    fn watch_conntrack(
        &self,
        _interests: &[Interest],
    ) -> Result<Box<dyn ConntrackWake + '_>, ConntrackError> {
        Ok(Box::new(FakeWake { host: self }))
    }

    fn settle_udp_flows(&self, ports: &[UdpPort]) -> Result<Settled, ConntrackError> {
        let listed: Vec<String> = ports.iter().map(|p| format!("{}/udp", p.port)).collect();
        let call = format!("settle udp flows {}", listed.join(" "));
        self.call(&call).map_err(|e| conntrack_error(&call, e))?;
        Ok(Settled {
            deleted: 0,
            quiet: true,
        })
    }

    fn flows_to(&self, address: IpAddr) -> Result<Vec<FlowTo>, ConntrackError> {
        let call = format!("read flows to {address}");
        self.call(&call).map_err(|e| conntrack_error(&call, e))?;
        Ok(self
            .state
            .borrow_mut()
            .flows_to
            .get_mut(&address)
            .map(Script::next)
            .unwrap_or_default())
    }

    fn live_connections_to(&self, address: IpAddr) -> Result<u64, ConntrackError> {
        Ok(self.flows_to(address)?.iter().filter(|f| f.live).count() as u64)
    }

    fn delete_unanswered(&self, flows: &Unanswered) -> Result<u64, ConntrackError> {
        let call = format!("delete unanswered {flows}");
        self.call(&call).map_err(|e| conntrack_error(&call, e))?;
        Ok(0)
    }

    fn add_rule(&self, rule: &IpRule) -> Result<(), NetlinkError> {
        let call = format!("add rule {}", rule.priority);
        self.call(&call).map_err(|e| netlink_error(&call, e))?;
        self.state.borrow_mut().rules.push(rule.clone());
        Ok(())
    }

    fn delete_rule(&self, rule: &IpRule) -> Result<(), NetlinkError> {
        let call = format!("delete rule {}", rule.priority);
        self.call(&call).map_err(|e| netlink_error(&call, e))?;
        self.state.borrow_mut().rules.retain(|r| r != rule);
        Ok(())
    }

    fn add_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let call = format!("add route {} table {}", route.destination, route.table);
        self.call(&call).map_err(|e| netlink_error(&call, e))?;
        self.state.borrow_mut().routes.push(route.clone());
        Ok(())
    }

    fn delete_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let call = format!("delete route {} table {}", route.destination, route.table);
        self.call(&call).map_err(|e| netlink_error(&call, e))?;
        self.state.borrow_mut().routes.retain(|r| r != route);
        Ok(())
    }

    fn add_address(&self, address: &OwnedAddress) -> Result<(), NetlinkError> {
        let call = format!("add address {} on {}", address.address, address.device);
        self.call(&call).map_err(|e| netlink_error(&call, e))?;
        self.state.borrow_mut().addresses.push(address.clone());
        Ok(())
    }

    fn delete_address(&self, address: &OwnedAddress) -> Result<(), NetlinkError> {
        let call = format!("delete address {} on {}", address.address, address.device);
        self.call(&call).map_err(|e| netlink_error(&call, e))?;
        self.state.borrow_mut().addresses.retain(|a| a != address);
        Ok(())
    }

    fn wire(&self, wiring: &Wiring) -> Result<(), NetlinkError> {
        let call = format!("wire {} at {}", wiring.service, wiring.address);
        self.call(&call).map_err(|e| netlink_error(&call, e))?;
        let mut state = self.state.borrow_mut();
        if !state
            .containers
            .values()
            .any(|c| c.running && c.pid == Some(wiring.pid))
        {
            return Err(netlink_error(
                &call,
                format!("no process {} runs", wiring.pid),
            ));
        }
        let address = wiring.address.to_string();
        let name = veth_name(wiring.service, &address);
        state.veths.retain(|w| w.veth.name != name);
        state.veths.push(Wired {
            veth: Veth {
                name,
                service: wiring.service.to_string(),
                address,
                up: true,
            },
            pid: wiring.pid,
        });
        Ok(())
    }

    fn unwire(&self, name: &str) -> Result<(), NetlinkError> {
        let call = format!("unwire {name}");
        self.call(&call).map_err(|e| netlink_error(&call, e))?;
        self.state
            .borrow_mut()
            .veths
            .retain(|w| w.veth.name != name);
        Ok(())
    }

    fn veths(&self) -> Result<Vec<Veth>, NetlinkError> {
        self.call("list veths")
            .map_err(|e| netlink_error("list veths", e))?;
        Ok(self
            .state
            .borrow()
            .live_veths()
            .map(|w| w.veth.clone())
            .collect())
    }

    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), SysctlError> {
        let call = format!("set sysctl {key}={value}");
        self.call(&call).map_err(|e| SysctlError::Write {
            key: key.to_string(),
            value: value.to_string(),
            netns: "fake".into(),
            source: io::Error::other(e),
        })?;
        self.state
            .borrow_mut()
            .sysctls
            .insert(key.to_string(), value.to_string());
        Ok(())
    }

    fn probe(&self, check: &NetworkCheck, ip: IpAddr, _timeout: Duration) -> Result<(), String> {
        let (NetworkCheck::Http { port, .. } | NetworkCheck::Tcp { port }) = *check;
        let addr = SocketAddr::new(ip, port);
        self.call(&format!("probe {addr}"))?;
        let probe = {
            let mut state = self.state.borrow_mut();
            state.probes += 1;
            state.probes
        };
        self.foreign_delete(At::Probe(probe));
        let due: Vec<Box<dyn FnOnce()>> = {
            let mut hooks = self.hooks.borrow_mut();
            let (due, later) = std::mem::take(&mut hooks.0)
                .into_iter()
                .partition(|(n, _)| *n == probe);
            hooks.0 = later;
            due.into_iter().map(|(_, action)| action).collect()
        };
        for action in due {
            action();
        }
        let mut state = self.state.borrow_mut();
        if state.interrupt_at_probe == Some(probe) {
            self.interrupt.store(true, Ordering::SeqCst);
        }
        let listener = state.listener(ip, port);
        match listener.and_then(|name| state.containers.get_mut(&name)) {
            Some(container) => container.check().map_err(|e| format!("{addr}: {e}")),
            None => Err(format!("{addr}: connection refused")),
        }
    }

    fn now(&self) -> Instant {
        self.epoch + self.state.borrow().elapsed
    }

    fn sleep(&self, duration: Duration) {
        self.state.borrow_mut().elapsed += duration;
    }
}

/// A watch on the fake host's conntrack: each state is the next scripted
/// read; nothing changes there by itself, so a wait lasts its whole timeout
/// (virtual time).
struct FakeWake<'a> {
    host: &'a FakeHost,
}

impl ConntrackWake for FakeWake<'_> {
    fn state(&mut self) -> Result<ConntrackState, ConntrackError> {
        self.host.read_conntrack()
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), ConntrackError> {
        self.host.sleep(timeout);
        Ok(())
    }
}

/// A hold on the fake host's table: it is checked when apply asks (there is no
/// background watch in memory), and restored there (logged as `restore table`).
struct FakeHold<'a> {
    host: &'a FakeHost,
    table: NftTable,
}

impl TableHold for FakeHold<'_> {
    fn reassert(&self) -> Result<u32, NftError> {
        if self
            .host
            .state
            .borrow()
            .table
            .as_ref()
            .is_some_and(|t| t.holds(&self.table))
        {
            return Ok(0);
        }
        self.host.apply_table_as("restore table", &self.table)?;
        Ok(1)
    }

    fn unguarded(&self) -> Option<&NftError> {
        None
    }
}
