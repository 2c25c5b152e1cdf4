//! The upgrade handshake's own cost (issue 16): from a worker's ready next
//! version to every load-balancer node's acknowledgement seen by the
//! worker, with 2 and 8 load-balancer nodes, against today's fixed
//! `switchWait` (default 30 s); and the etcd writes one upgrade makes.
//!
//! What is measured, honestly: the etcd path only. A real three-member etcd
//! on loopback (`tests/support/etcd.rs`); each load-balancer node is a
//! thread with its own etcd client, registered under its own lease, that
//! watches `{prefix}/replicas/` and writes its acknowledgement
//! (`SwitchAck::acknowledge`, as its apply does) as soon as it sees the next
//! version registered healthy. Not included: the load-balancer agent's plan
//! and table write between the two (measured by `benches/agent.rs`: a
//! registration change to a new spread), and a whole routed upgrade with
//! Docker (not measured here).
//!
//! Each trial: `Handshake::publish` (which registers the next version and
//! publishes the upgrade), then `Published::wait` until done, then
//! `Published::finish`. Writes per upgrade are the store's revisions from
//! just before the publish to just after the finish (every put and delete
//! is one revision; lease grants are not writes to the key space).
//!
//! `cargo bench --bench cluster` (needs `etcd`). Reported: p50, p99, min and
//! max over N trials (default 20, `LESSNAT_BENCH_TRIALS`). Results are in
//! docs/benchmarks.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lessnat::backend::etcd::{CONNECT_TIMEOUT, Etcd, EtcdConfig, KeyChange, REQUEST_TIMEOUT};
use lessnat::cluster::handshake::{Handshake, SwitchAck};
use lessnat::cluster::keys::{Keys, NodeRecord, ReplicaRecord, Role};
use lessnat::spec::{Etcd as EtcdSpec, HumanDuration};
use support::etcd::EtcdCluster;

const FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 20, 1, 5));
const TO: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 20, 1, 6));

fn client(spec: &EtcdSpec) -> Etcd {
    Etcd::connect(&EtcdConfig {
        endpoints: spec.endpoints.iter().map(|e| e.value.clone()).collect(),
        tls: None,
        connect_timeout: CONNECT_TIMEOUT,
        request_timeout: REQUEST_TIMEOUT,
    })
    .expect("client")
}

/// A load-balancer node: registers, then acknowledges every next version
/// it sees registered healthy at `TO`, until `stop`.
fn balancer(spec: EtcdSpec, node: String, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let etcd = client(&spec);
        let keys = Keys::new(&spec.prefix.value);
        let lease = etcd.grant(Duration::from_secs(5)).expect("lease");
        let mut keeper = etcd.keep_alive(lease).expect("keep alive");
        let record = NodeRecord {
            roles: vec![Role::LoadBalancer],
            commit: None,
            spec_hash: "sha256:00".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            since: 0,
        };
        etcd.put(
            &keys.node(&node),
            &serde_json::to_vec(&record).expect("json"),
            Some(lease),
        )
        .expect("register");
        let read = etcd.get_prefix(&keys.replicas()).expect("read");
        let mut watch = etcd
            .watch_prefix(&keys.replicas(), read.revision + 1)
            .expect("watch");
        let mut renewed = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if renewed.elapsed() > Duration::from_secs(1) {
                keeper.renew().expect("renew");
                renewed = Instant::now();
            }
            let Some((_, changes)) = watch.next(Duration::from_millis(100)).expect("watch") else {
                continue;
            };
            for change in changes {
                let KeyChange::Put(entry) = change else {
                    continue;
                };
                let Ok(replica) = serde_json::from_slice::<ReplicaRecord>(&entry.value) else {
                    continue;
                };
                if entry.key.ends_with(&format!("/{TO}")) && replica.healthy {
                    SwitchAck {
                        etcd: spec.clone(),
                        node: node.clone(),
                        version: replica.version,
                    }
                    .acknowledge("api", FROM, TO)
                    .expect("acknowledge");
                }
            }
        }
        let _ = etcd.revoke(lease);
    })
}

struct Row {
    balancers: usize,
    times: Vec<Duration>,
    writes: Vec<i64>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn trial_set(cluster: &EtcdCluster, balancers: usize, trials: usize) -> Row {
    let spec = EtcdSpec {
        endpoints: cluster.endpoints().into_iter().map(Into::into).collect(),
        prefix: format!("/lessnat-bench-{}-{balancers}", std::process::id()).into(),
        tls: None,
        lease_ttl: HumanDuration::secs(5).into(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<JoinHandle<()>> = (1..=balancers)
        .map(|i| balancer(spec.clone(), format!("lb-{i}"), Arc::clone(&stop)))
        .collect();
    let etcd = client(&spec);
    let keys = Keys::new(&spec.prefix.value);
    // Until every node registered.
    let deadline = Instant::now() + Duration::from_secs(20);
    while etcd.get_prefix(&keys.nodes()).expect("read").entries.len() < balancers {
        assert!(
            Instant::now() < deadline,
            "load-balancer nodes did not register"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut row = Row {
        balancers,
        times: Vec::new(),
        writes: Vec::new(),
    };
    for trial in 0..trials {
        let handshake = Handshake {
            etcd: spec.clone(),
            service: "api".into(),
            node: "web-1".into(),
            from: FROM,
            to: TO,
            version: format!("sha256:{trial:064x}"),
        };
        let before = etcd.get_prefix(&keys.nodes()).expect("read").revision;
        let started = Instant::now();
        let mut published = handshake.publish(1).expect("publish");
        while !published
            .wait(Duration::from_millis(100))
            .expect("wait")
            .done()
        {
            assert!(started.elapsed() < Duration::from_secs(20), "no acks");
        }
        row.times.push(started.elapsed());
        assert_eq!(published.standing().acknowledged.len(), balancers);
        published.finish().expect("finish");
        let after = etcd.get_prefix(&keys.nodes()).expect("read").revision;
        row.writes.push(after - before);
        // The next version's registration (leased) goes before the next trial.
        etcd.delete(&keys.replica("api", &TO.to_string()))
            .expect("delete");
    }
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        let _ = thread.join();
    }
    row
}

fn main() {
    if !support::commands("bench cluster", &["etcd"]) {
        return;
    }
    let trials: usize = std::env::var("LESSNAT_BENCH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(20);
    let cluster = EtcdCluster::start(3);
    let rows: Vec<Row> = [2, 8]
        .into_iter()
        .map(|n| trial_set(&cluster, n, trials))
        .collect();
    println!(
        "\nready -> every LB acknowledged (etcd path only), {trials} trials; today: switchWait (default 30 s)\n"
    );
    println!(
        "| LB nodes | p50 | p99 | min | max | vs switchWait 30 s (p99) | etcd writes per upgrade |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for row in rows {
        let mut times = row.times.clone();
        times.sort();
        let p99 = percentile(&times, 0.99);
        let writes = row.writes.iter().max().copied().unwrap_or(0);
        let fewest = row.writes.iter().min().copied().unwrap_or(0);
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0}x shorter | {}{} |",
            row.balancers,
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3,
            30.0 / p99.as_secs_f64(),
            fewest,
            if writes == fewest {
                String::new()
            } else {
                format!("–{writes}")
            }
        );
    }
}
