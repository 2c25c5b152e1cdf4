//! The etcd backend against a real three-member etcd cluster on loopback
//! (`tests/support/etcd.rs`): leases keep their keys while kept alive, also
//! across each member's death (the keep-alive opens its stream again); keys go when the lease ends; a watch sees puts
//! and expiries; a dead etcd answers with an error within the timeout; a
//! registrar whose lease was lost writes everything again under a new one;
//! behind a slow link it keeps its lease while every call is answered in
//! time, and stops renewing and writing once a renewal is not (so its
//! lease expires instead of being kept alive by late renewals).

mod support;

use std::time::{Duration, Instant};

use lessnat::backend::etcd::{
    CONNECT_TIMEOUT, Etcd, EtcdConfig, EtcdError, KeyChange, REQUEST_TIMEOUT, TlsFiles,
};
use lessnat::cluster::keys::{Keys, NodeRecord, ReplicaRecord, ReplicaSlot, Role};
use lessnat::cluster::registration::{Registrar, Wanted};
use lessnat::error::chain;
use support::etcd::EtcdCluster;
use support::forward::Forwarder;

fn config(endpoints: Vec<String>) -> EtcdConfig {
    EtcdConfig {
        endpoints,
        tls: None,
        connect_timeout: CONNECT_TIMEOUT,
        request_timeout: REQUEST_TIMEOUT,
    }
}

fn record_bytes() -> Vec<u8> {
    serde_json::to_vec(&NodeRecord {
        roles: vec![Role::LoadBalancer],
        commit: None,
        spec_hash: "sha256:00".into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        since: 0,
    })
    .expect("serialises")
}

/// A registrar of node `web-1` reaching etcd at `endpoints`, under
/// `prefix` with a lease of `ttl_secs`.
fn registrar_of(endpoints: &[String], prefix: &str, ttl_secs: u64) -> Registrar {
    let yaml = format!(
        "version: 1\ncluster:\n  etcd:\n    endpoints: [{}]\n    prefix: {prefix}\n    leaseTtl: {ttl_secs}s\n\
         nodes:\n  - name: web-1\n    address: 192.0.2.10\nservices: []\n",
        endpoints.join(", ")
    );
    let spec = lessnat::spec::load_bytes("spec.yaml", yaml.as_bytes()).expect("valid spec");
    let settings = spec.cluster.as_ref().expect("cluster block");
    Registrar::new(settings).expect("registrar")
}

/// A forwarder to the first member of `cluster` (`support::forward`) and a
/// registrar ([`registrar_of`]) that reaches etcd through it only.
fn registrar_through_a_forwarder(
    cluster: &EtcdCluster,
    prefix: &str,
    ttl_secs: u64,
) -> (Forwarder, Registrar) {
    let link = Forwarder::start(
        cluster
            .endpoint(0)
            .trim_start_matches("http://")
            .parse()
            .expect("member address"),
    );
    let registrar = registrar_of(&[link.url()], prefix, ttl_secs);
    (link, registrar)
}

/// Replica `replica` of node `web-1`, a healthy primary.
fn healthy_primary(replica: u32) -> ReplicaRecord {
    ReplicaRecord {
        node: "web-1".into(),
        replica,
        version: "sha256:aa".into(),
        slot: ReplicaSlot::Primary,
        healthy: true,
        since: 0,
    }
}

/// Retries `call` for up to 10 s (a member may be electing a leader).
fn retry<T>(what: &str, mut call: impl FnMut() -> Result<T, EtcdError>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call() {
            Ok(value) => return value,
            Err(error) if Instant::now() < deadline => {
                eprintln!("{what}: {} (retrying)", chain(&error));
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => panic!("{what}: {}", chain(&error)),
        }
    }
}

#[test]
fn a_kept_lease_and_its_keys_survive_each_members_death() {
    if !support::commands(
        "a_kept_lease_and_its_keys_survive_each_members_death",
        &["etcd"],
    ) {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    let etcd = Etcd::connect(&config(cluster.endpoints())).expect("client");
    let keys = Keys::new("/lessnat-test");
    let lease = etcd.grant(Duration::from_secs(2)).expect("lease");
    etcd.put(&keys.node("lb-1"), &record_bytes(), Some(lease))
        .expect("put");
    let mut keeper = etcd.keep_alive(lease).expect("keep alive");
    // The leader first, then the others: one of them carries the
    // keep-alive stream, which `renew` must open again elsewhere by itself.
    let leader = cluster.leader().expect("a leader");
    for member in [leader, (leader + 1) % 3, (leader + 2) % 3] {
        cluster.kill(member);
        eprintln!("killed member {member}");
        // Keep the lease alive through the election, for twice its TTL.
        let until = Instant::now() + Duration::from_secs(4);
        let mut renewals = 0;
        while Instant::now() < until {
            match keeper.renew() {
                Ok(ttl) => {
                    assert!(ttl > Duration::ZERO);
                    renewals += 1;
                }
                Err(EtcdError::LeaseGone { id }) => {
                    panic!("lease {id:x} expired while kept alive\n{}", cluster.logs())
                }
                // An election in progress: the next renewal tries again.
                Err(error) => eprintln!("renewing: {}", chain(&error)),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(
            renewals >= 4,
            "renewed {renewals} times in 4 s with member {member} dead"
        );
        let read = retry("read", || etcd.get_prefix(&keys.nodes()));
        assert_eq!(
            read.entries.len(),
            1,
            "the key outlived member {member}: {read:?}"
        );
        assert_eq!(read.entries[0].lease, lease);
        assert_ne!(cluster.leader(), None, "a leader without member {member}");
        cluster.restart(member);
        cluster.wait_healthy();
    }
    assert!(retry("lease", || etcd.lease_left(lease)).is_some());
    etcd.revoke(lease).expect("revoke");
    let read = etcd.get_prefix(&keys.nodes()).expect("read");
    assert!(
        read.entries.is_empty(),
        "revoking deleted the key: {read:?}"
    );
}

#[test]
fn a_lease_left_alone_expires_and_the_watch_sees_its_keys_go() {
    if !support::commands(
        "a_lease_left_alone_expires_and_the_watch_sees_its_keys_go",
        &["etcd"],
    ) {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let etcd = Etcd::connect(&config(cluster.endpoints())).expect("client");
    let keys = Keys::new("/lessnat-test");
    let before = etcd.get_prefix(&keys.replicas()).expect("read");
    let mut watch = etcd
        .watch_prefix(&keys.replicas(), before.revision + 1)
        .expect("watch");
    let lease = etcd.grant(Duration::from_secs(2)).expect("lease");
    let key = keys.replica("api", "10.20.1.5");
    let granted = Instant::now();
    etcd.put(&key, b"{}", Some(lease)).expect("put");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.iter().any(|c| matches!(c, KeyChange::Delete { .. })) {
        assert!(Instant::now() < deadline, "no deletion seen: {seen:?}");
        if let Some((_, changes)) = watch.next(Duration::from_millis(500)).expect("watch") {
            seen.extend(changes);
        }
    }
    let gone_after = granted.elapsed();
    assert!(
        matches!(&seen[0], KeyChange::Put(entry) if entry.key == key && entry.lease == lease),
        "{seen:?}"
    );
    assert!(
        matches!(&seen[1], KeyChange::Delete { key: k, .. } if *k == key),
        "{seen:?}"
    );
    eprintln!("the key went {gone_after:?} after its 2 s lease was granted");
    assert!(gone_after >= Duration::from_secs(2), "{gone_after:?}");
    assert!(etcd.lease_left(lease).expect("lease").is_none());
}

#[test]
fn a_dead_etcd_fails_each_call_within_its_timeout() {
    if !support::commands("a_dead_etcd_fails_each_call_within_its_timeout", &["etcd"]) {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    cluster.kill_all();
    let started = Instant::now();
    let etcd = Etcd::connect(&config(endpoints)).expect("a client connects lazily");
    let error = etcd.get_prefix("/lessnat-test/").expect_err("etcd is dead");
    let took = started.elapsed();
    let text = chain(&error);
    eprintln!("{text} ({took:?})");
    assert!(text.starts_with("etcd at http://127.0.0.1:"), "{text}");
    assert!(
        took < CONNECT_TIMEOUT + REQUEST_TIMEOUT + Duration::from_secs(1),
        "took {took:?}"
    );
}

#[test]
fn a_registrar_whose_lease_was_lost_registers_everything_again_and_revokes_on_stop() {
    let test = "a_registrar_whose_lease_was_lost_registers_everything_again_and_revokes_on_stop";
    if !support::commands(test, &["etcd"]) {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let mut registrar = registrar_of(&cluster.endpoints(), "/reg", 2);
    let record = healthy_primary(1);
    let wanted = Wanted {
        node: "web-1".into(),
        record: serde_json::from_slice(&record_bytes()).expect("node record"),
        replicas: [(("api".to_string(), "10.20.1.5".to_string()), record)].into(),
    };
    registrar.step(&wanted).expect("registered");
    let (first, _) = registrar.lease().expect("a lease");
    let etcd = Etcd::connect(&config(cluster.endpoints())).expect("client");
    let keys = Keys::new("/reg");
    let read = etcd.get_prefix("/reg/").expect("read");
    assert_eq!(read.entries.len(), 2, "{read:?}");
    // Someone (or an outage longer than the TTL) ends the lease.
    etcd.revoke(first).expect("revoke");
    assert!(etcd.get_prefix("/reg/").expect("read").entries.is_empty());
    std::thread::sleep(Duration::from_millis(700));
    registrar.step(&wanted).expect("registered again");
    let (second, _) = registrar.lease().expect("a new lease");
    assert_ne!(first, second);
    let read = etcd.get_prefix("/reg/").expect("read");
    let leases: Vec<i64> = read.entries.iter().map(|e| e.lease).collect();
    assert_eq!(leases, [second, second], "{read:?}");
    assert!(
        read.entries
            .iter()
            .any(|e| e.key == keys.replica("api", "10.20.1.5"))
    );
    registrar.revoke().expect("revoke");
    assert!(etcd.get_prefix("/reg/").expect("read").entries.is_empty());
}

#[test]
fn a_registrar_behind_a_slow_link_keeps_its_lease_while_it_writes_on_every_step() {
    let test = "a_registrar_behind_a_slow_link_keeps_its_lease_while_it_writes_on_every_step";
    if !support::commands(test, &["etcd"]) {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let (link, mut registrar) = registrar_through_a_forwarder(&cluster, "/slow", 3);
    // A round trip takes 1.4 s: within the 2 s timeout of each call, but
    // a few calls in a row take longer than the lease's 3 s.
    link.delay(Duration::from_millis(700));
    let replicas = (5..10)
        .map(|n| {
            (
                ("api".to_string(), format!("10.20.1.{n}")),
                healthy_primary(n),
            )
        })
        .collect();
    let wanted = Wanted {
        node: "web-1".into(),
        record: serde_json::from_slice(&record_bytes()).expect("node record"),
        replicas,
    };
    // As the registration thread does: a step every 100 ms; here each
    // step has a write to make (one replica's health flips), so renewals
    // must not wait for the writes.
    let mut wanted = wanted;
    let mut leases = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let flipping = wanted.replicas.values_mut().next().expect("a replica");
        flipping.healthy = !flipping.healthy;
        registrar.step(&wanted).expect("a step within the timeouts");
        let (lease, _) = registrar.lease().expect("a lease");
        if leases.last() != Some(&lease) {
            eprintln!("{:.3}s: lease {lease:x}", started.elapsed().as_secs_f64());
            leases.push(lease);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(leases.len(), 1, "the lease expired and was granted again");
    let etcd = Etcd::connect(&config(cluster.endpoints())).expect("client");
    let read = etcd.get_prefix("/slow/").expect("read");
    let on_lease = read.entries.iter().filter(|e| e.lease == leases[0]).count();
    assert_eq!(on_lease, 6, "{read:?}");
}

#[test]
fn a_registrar_behind_a_link_slower_than_its_timeouts_stops_renewing_and_writing_until_etcd_answers()
 {
    let test = "a_registrar_behind_a_link_slower_than_its_timeouts_stops_renewing_and_writing_until_etcd_answers";
    if !support::commands(test, &["etcd"]) {
        return;
    }
    let cluster = EtcdCluster::start(3);
    // Renewals every 2 s. A blind renewal every few seconds, each landing
    // 3 s late, would keep this lease alive for ever.
    let ttl = Duration::from_secs(6);
    let (link, mut registrar) = registrar_through_a_forwarder(&cluster, "/cut", ttl.as_secs());
    let replica = |address: &str| (("api".to_string(), address.to_string()), healthy_primary(1));
    let mut wanted = Wanted {
        node: "web-1".into(),
        record: serde_json::from_slice(&record_bytes()).expect("node record"),
        replicas: [replica("10.20.1.5")].into(),
    };
    registrar.step(&wanted).expect("registered");
    let (first, _) = registrar.lease().expect("a lease");
    let etcd = Etcd::connect(&config(cluster.endpoints())).expect("client");
    let keys = Keys::new("/cut");
    let (node, later) = (keys.node("web-1"), keys.replica("api", "10.20.1.6"));
    let present = |key: &str| {
        etcd.get_prefix("/cut/")
            .expect("read")
            .entries
            .iter()
            .any(|e| e.key == key)
    };
    // Slower than every timeout (2 s a call), each way.
    let latency = Duration::from_secs(3);
    link.delay(latency);
    let slowed = Instant::now();
    // As the registration thread does: a step every 100 ms, 500 ms after
    // an error. Once a renewal went unanswered (within a third of the TTL
    // and a timeout), a second replica is wanted: it must not be written
    // while renewals go unanswered, however late.
    let mut gone = None;
    let mut errors = 0;
    while slowed.elapsed() < Duration::from_secs(25) {
        if slowed.elapsed() > ttl / 3 + REQUEST_TIMEOUT + Duration::from_secs(1) {
            wanted.replicas.extend([replica("10.20.1.6")]);
        }
        match registrar.step(&wanted) {
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => {
                errors += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        assert!(
            !present(&later),
            "{:.3}s after the link slowed: a replica wanted while renewals went unanswered was written",
            slowed.elapsed().as_secs_f64()
        );
        if gone.is_none() && !present(&node) {
            gone = Some(slowed.elapsed());
            eprintln!(
                "the node's lease expired {:.3}s after the link slowed",
                slowed.elapsed().as_secs_f64()
            );
        }
        // Past when a write sent before the renewals stopped could land.
        if gone.is_some_and(|g| slowed.elapsed() > g + 2 * latency) {
            break;
        }
    }
    assert!(errors > 0, "no step failed behind the slow link");
    // The last renewal sent (within a third of the TTL and a timeout) lands
    // `latency` late and keeps the lease for its TTL, then some slack.
    let bound = ttl / 3 + REQUEST_TIMEOUT + latency + ttl + Duration::from_secs(2);
    let gone =
        gone.unwrap_or_else(|| panic!("the node's lease never expired behind the slow link"));
    assert!(
        gone < bound,
        "the lease expired only {gone:?} after the link slowed"
    );
    // Fast again: a new lease, everything written under it.
    link.delay(Duration::ZERO);
    let restored = Instant::now();
    retry("registering again", || registrar.step(&wanted));
    let (second, _) = registrar.lease().expect("a lease");
    assert_ne!(first, second, "the expired lease was kept");
    let read = etcd.get_prefix("/cut/").expect("read");
    let on_lease = read.entries.iter().filter(|e| e.lease == second).count();
    assert_eq!(on_lease, 3, "{read:?}");
    eprintln!(
        "registered again {:.3}s after the link was fast again",
        restored.elapsed().as_secs_f64()
    );
}

#[test]
fn tls_with_a_client_certificate_works_and_without_one_is_refused() {
    let test = "tls_with_a_client_certificate_works_and_without_one_is_refused";
    if !support::commands(test, &["etcd", "openssl"]) {
        return;
    }
    let cluster = EtcdCluster::start_tls(1);
    let files = cluster.tls().expect("TLS files").clone();
    let with_identity = EtcdConfig {
        tls: Some(TlsFiles {
            ca: files.ca.clone(),
            identity: Some((files.cert.clone(), files.key.clone())),
        }),
        ..config(cluster.endpoints())
    };
    let etcd = Etcd::connect(&with_identity).expect("client");
    let lease = retry("grant", || etcd.grant(Duration::from_secs(2)));
    etcd.put("/tls/key", b"value", Some(lease))
        .expect("put over TLS");
    assert_eq!(etcd.get_prefix("/tls/").expect("read").entries.len(), 1);
    let without = EtcdConfig {
        tls: Some(TlsFiles {
            ca: files.ca,
            identity: None,
        }),
        ..config(cluster.endpoints())
    };
    let refused = Etcd::connect(&without)
        .and_then(|etcd| etcd.get_prefix("/tls/"))
        .expect_err("etcd asks for a client certificate");
    eprintln!("without a client certificate: {}", chain(&refused));
}
