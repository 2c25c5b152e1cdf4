//! A routed site (`support::topology`) whose nodes share a real
//! three-member etcd on loopback (`support::etcd`): spec files with a
//! `cluster:` block (each node may be given its own, with other
//! endpoints), `lessnat agent` started per node, a test-side watch of
//! the keys that records when each changed, and reads of the LBs' spreads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use lessnat::backend::etcd::{CONNECT_TIMEOUT, Etcd, EtcdConfig, KeyChange, REQUEST_TIMEOUT};
use lessnat::cluster::keys::Keys;

use super::etcd::EtcdCluster;
use super::load::{Load, LoadConfig};
use super::process::Process;
use super::topology::{CLIENT_THREADS, Node, Replica, Service, Topology, vip};

/// The longest a first converge may take.
pub const FIRST_RUN: Duration = Duration::from_secs(60);

/// A site with etcd and one routed service, `web`, with one replica per
/// worker at `10.20.N.5` (its next address `10.20.N.6`).
pub struct ClusterSite {
    /// The etcd cluster.
    pub etcd: EtcdCluster,
    /// The namespaces and nodes.
    pub site: Topology,
    /// The key prefix of the site.
    pub prefix: String,
    lease_ttl: u64,
}

impl ClusterSite {
    /// `None` (skipped) without root, the tools or Docker; else the site
    /// with `workers` workers and a lease TTL of `lease_ttl` seconds.
    pub fn new(test: &str, workers: usize, lease_ttl: u64) -> Option<ClusterSite> {
        if !super::root_with(test, &["nft", "sysctl", "etcd"]) || !super::docker(test) {
            return None;
        }
        let etcd = EtcdCluster::start(3);
        let site = Topology::new(workers);
        let prefix = format!(
            "/lessnat-test-{}-{}",
            std::process::id(),
            super::free_port()
        );
        Some(ClusterSite {
            etcd,
            site,
            prefix,
            lease_ttl,
        })
    }

    /// Writes spec file `name` running `image`, reaching etcd at
    /// `endpoints` (every member when `None`); returns its path.
    pub fn write_spec(&self, name: &str, image: &str, endpoints: Option<&[String]>) -> PathBuf {
        let replicas = (0..self.site.workers.len())
            .map(|w| Replica::on(w, 5))
            .collect();
        let spec = self
            .site
            .write_spec(name, &[Service::new("web", image, replicas)]);
        let text = std::fs::read_to_string(&spec).expect("spec");
        let all = self.etcd.endpoints();
        let block = format!(
            "cluster:\n  etcd:\n    endpoints: [{}]\n    prefix: {}\n    leaseTtl: {}s\n",
            endpoints.unwrap_or(&all).join(", "),
            self.prefix,
            self.lease_ttl
        );
        let text = text.replacen("version: 1\n", &format!("version: 1\n{block}"), 1);
        std::fs::write(&spec, text).expect("write spec");
        spec
    }

    /// Starts the agent of `node` with `spec`, running every `interval`
    /// without events, and waits until it is ready.
    pub fn agent(node: &Node, spec: &std::path::Path, interval: &str) -> Process {
        let mut command = Topology::lessnat(
            node,
            &[
                "agent",
                "--interval",
                interval,
                "--metrics-addr",
                "127.0.0.1:0",
                "-f",
            ],
        );
        command.arg(spec).env_remove("NOTIFY_SOCKET");
        let mut agent = Process::spawn(command);
        agent.wait_line("Ready:", 1, FIRST_RUN);
        agent
    }

    /// A client of the test's own.
    pub fn client(&self) -> Etcd {
        Etcd::connect(&EtcdConfig {
            endpoints: self.etcd.endpoints(),
            tls: None,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        })
        .expect("etcd client")
    }

    /// The site's keys.
    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }

    /// Waits (up to `within`) until `key` exists (`true`) or not; whether
    /// it came to that.
    pub fn wait_key(&self, key: &str, exists: bool, within: Duration) -> bool {
        let etcd = self.client();
        let deadline = Instant::now() + within;
        while etcd
            .get_prefix(key)
            .map_or(exists, |s| s.entries.iter().any(|e| e.key == key))
            != exists
        {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

/// Whether `lb`'s spread (its `routed_dnat` chain) names `address`.
pub fn names_in_spread(lb: &Node, address: &str) -> bool {
    let output = lb
        .ns
        .exec("nft", &["list", "chain", "inet", "lessnat", "routed_dnat"]);
    String::from_utf8_lossy(&output.stdout).contains(address)
}

/// Waits (up to `within`) until `lb`'s spread names `address` (`want`) or not.
pub fn wait_spread(lb: &Node, address: &str, want: bool, within: Duration) {
    let deadline = Instant::now() + within;
    while names_in_spread(lb, address) != want {
        assert!(
            Instant::now() < deadline,
            "{}: {address} {} its spread within {within:?}",
            lb.name,
            if want { "not in" } else { "still in" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `threads` clients in client namespace `client`, asking the VIP for
/// `/peer` through LB `client` (a request fails after 1 s).
pub fn load_through(site: &Topology, client: usize, threads: usize) -> Load {
    Load::start(LoadConfig {
        clients: threads,
        first_client: client * CLIENT_THREADS,
        io_timeout: Duration::from_secs(1),
        ..LoadConfig::to(vip())
            .in_netns(&site.clients[client].ns.name)
            .path("/peer")
    })
}

/// Every change under a prefix, seen by a watch of the test's own, with the
/// wall-clock time it arrived (to order it with `docker events`).
pub struct KeyClock {
    seen: Arc<Mutex<Vec<(Instant, SystemTime, KeyChange)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KeyClock {
    /// Watches `prefix` through `etcd` from now on.
    pub fn start(etcd: Etcd, prefix: String) -> KeyClock {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let revision = etcd.get_prefix(&prefix).expect("read").revision + 1;
        let mut watch = etcd.watch_prefix(&prefix, revision).expect("watch");
        let (noted, stopped) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut next = revision;
            while !stopped.load(Ordering::SeqCst) {
                match watch.next(Duration::from_millis(100)) {
                    Ok(Some((revision, changes))) => {
                        next = revision + 1;
                        let at = (Instant::now(), SystemTime::now());
                        let mut noted = noted.lock().unwrap_or_else(PoisonError::into_inner);
                        noted.extend(changes.into_iter().map(|c| (at.0, at.1, c)));
                    }
                    Ok(None) => {}
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        if let Ok(again) = etcd.watch_prefix(&prefix, next) {
                            watch = again;
                        }
                    }
                }
            }
        });
        KeyClock {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// When `key` first changed after `after` in a way `matches` accepts.
    pub fn first_after(
        &self,
        key: &str,
        after: Instant,
        matches: impl Fn(&KeyChange) -> bool,
    ) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(at, _, change)| {
                let of_key = match change {
                    KeyChange::Put(entry) => entry.key == key,
                    KeyChange::Delete { key: k, .. } => k == key,
                };
                *at >= after && of_key && matches(change)
            })
            .map(|(at, _, _)| *at)
    }

    /// When `key` was first written (`put`) or deleted, if it was.
    pub fn first(&self, key: &str, put: bool) -> Option<(Instant, SystemTime)> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(_, _, change)| match change {
                KeyChange::Put(entry) => put && entry.key == key,
                KeyChange::Delete { key: k, .. } => !put && k == key,
            })
            .map(|(instant, time, _)| (*instant, *time))
    }
}

impl Drop for KeyClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The first line of `agent`'s output containing every one of `parts`,
/// waited for up to `within`; panics with the output when none comes.
pub fn wait_output(agent: &Process, parts: &[&str], within: Duration) -> (Instant, String) {
    wait_output_after(agent, None, parts, within)
}

/// As [`wait_output`], counting only lines that came after `since` (when given).
pub fn wait_output_after(
    agent: &Process,
    since: Option<Instant>,
    parts: &[&str],
    within: Duration,
) -> (Instant, String) {
    let deadline = Instant::now() + within;
    loop {
        let found = agent.lines_with(parts[0]).into_iter().find(|(at, line)| {
            since.is_none_or(|since| *at > since) && parts.iter().all(|p| line.contains(p))
        });
        if let Some(found) = found {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?} within {within:?}:\n{}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The upstream address of etcd member `index` (its client URL's).
pub fn member_address(etcd: &EtcdCluster, index: usize) -> SocketAddr {
    let url = etcd.endpoint(index);
    url.trim_start_matches("http://")
        .parse()
        .expect("member address")
}

/// Waits (up to `within`) until `agent`'s `lessnat_cluster_etcd_up` is
/// `up`; returns when it saw it. Panics with the output after `within`.
pub fn wait_etcd_up(within: Duration, agent: &Process, node: &Node, up: bool) -> Instant {
    let want = format!("lessnat_cluster_etcd_up {}", u8::from(up));
    let deadline = Instant::now() + within;
    while !agent.http_get("/metrics").contains(&want) {
        assert!(
            Instant::now() < deadline,
            "{}: never {want}:\n{}",
            node.name,
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Instant::now()
}
