//! Next healthy → redirect live, end to end, without Docker: in a network
//! namespace with lessnat's table, an "old" server on the canonical port and a
//! "next" one on the temporary port. Each trial takes the health probe's
//! passing answer from the next server (lessnat's own HTTP probe), then does
//! what apply does between that answer and the redirect stage's end of
//! writing (the journal's record of stage 1: read, then written and fsynced;
//! the redirect element),
//! then connects to the canonical port until the answer comes from the next
//! server. Two ways of writing the element, alternating trial by trial so
//! that load elsewhere falls on both: one nf_tables netlink batch (what
//! lessnat does, `nft::set_redirect`) and an `nft -j -f -` process with the
//! same element (what it did before).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lessnat::backend::nft::{apply_table, set_redirect};
use lessnat::desired::host_table::host_table;
use lessnat::health::probe_http;
use lessnat::journal::{Journal, JournalFile, UpgradeRecord};
use lessnat::model::Redirect;
use lessnat::netns::Netns;
use lessnat::plan::StageName;
use lessnat::spec::{Protocol, Strategy};

use crate::support::TestNetns;

/// The canonical port and the temporary port, inside the namespace.
const PORT: u16 = 8000;
const TEMP_PORT: u16 = 18000;

/// How the element is written.
#[derive(Clone, Copy, PartialEq)]
enum Writer {
    Netlink,
    NftProcess,
}

impl Writer {
    fn name(self) -> &'static str {
        match self {
            Writer::Netlink => "nf_tables netlink batch (lessnat)",
            Writer::NftProcess => "`nft -j -f -` process (before)",
        }
    }

    fn set(self, netns: &Netns, redirect: &Redirect, present: bool) {
        match self {
            Writer::Netlink => set_redirect(netns, redirect, present).expect("redirect"),
            Writer::NftProcess => nft_process(redirect, present),
        }
    }
}

/// The element in one `nft -j -f -` transaction, as lessnat wrote it before
/// (an add, and for a removal a delete after it, so an absent one is fine).
/// Runs in the calling thread's namespace.
fn nft_process(redirect: &Redirect, present: bool) {
    let element = serde_json::json!({"element": {
        "family": "inet", "table": "lessnat", "name": "redirect_tcp",
        "elem": [[redirect.port, redirect.temp_port]],
    }});
    let mut commands = vec![serde_json::json!({ "add": element })];
    if !present {
        commands.push(serde_json::json!({ "delete": element }));
    }
    let payload = serde_json::json!({ "nftables": commands }).to_string();
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start nft");
    child
        .stdin
        .take()
        .expect("nft's stdin")
        .write_all(payload.as_bytes())
        .expect("write to nft");
    assert!(child.wait().expect("wait for nft").success(), "nft failed");
}

/// A server answering every connection with an HTTP 200 whose body is `body`.
fn serve(listener: TcpListener, body: &'static str) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0; 1024];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// Which server answers a new connection to the canonical port.
fn answer() -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", PORT)).expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    text.rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Runs `trials` trials of each writer; prints a table.
pub fn run(trials: usize) {
    let ns = TestNetns::new("bench-cut");
    let netns = ns.netns();
    apply_table(&netns, &host_table(&[])).expect("lessnat's table");
    let state = tempfile::tempdir().expect("state directory");
    let journal = JournalFile::in_dir(state.path());
    let mut record = Journal::default();
    record.upgrades.insert(
        "bench".into(),
        UpgradeRecord {
            strategy: Strategy::RedirectDrain,
            from_spec: "a".repeat(64),
            from_image: "lessnat-testserver:v1".into(),
            to_spec: "b".repeat(64),
            reached: Some(StageName::StartNext),
            rolling_back: false,
            started_at: lessnat::journal::now(),
            updated_at: lessnat::journal::now(),
            canary: None,
        },
    );
    let redirect = Redirect {
        protocol: Protocol::Tcp,
        port: PORT,
        temp_port: TEMP_PORT,
    };
    // Per writer: the whole interval, the journal write, the element write,
    // the new connection.
    let mut times: BTreeMap<&str, [Vec<Duration>; 4]> = BTreeMap::new();
    let load_before = crate::load_average();
    netns
        .run(|| {
            serve(TcpListener::bind(("127.0.0.1", PORT)).expect("bind"), "old");
            serve(
                TcpListener::bind(("127.0.0.1", TEMP_PORT)).expect("bind"),
                "next",
            );
            let next = SocketAddr::from(([127, 0, 0, 1], TEMP_PORT));
            for trial in 0..trials * 2 {
                // ABBA order: load elsewhere falls on both alike.
                let writer = if (trial % 4 == 0) || (trial % 4 == 3) {
                    Writer::Netlink
                } else {
                    Writer::NftProcess
                };
                assert_eq!(answer(), "old", "no redirect before the trial");
                probe_http(next, "/healthz", Duration::from_secs(1)).expect("next healthy");
                let healthy = Instant::now();
                // As apply journals a stage: read, update, write (fsynced).
                let mut read = journal.read().expect("journal");
                read.upgrades.clone_from(&record.upgrades);
                journal.write(&read).expect("journal");
                let journaled = Instant::now();
                writer.set(&netns, &redirect, true);
                let written = Instant::now();
                let mut tries = 1;
                while answer() != "next" {
                    tries += 1;
                    assert!(tries < 1000, "the redirect never took");
                }
                let live = Instant::now();
                let parts = times.entry(writer.name()).or_default();
                parts[0].push(live - healthy);
                parts[1].push(journaled - healthy);
                parts[2].push(written - journaled);
                parts[3].push(live - written);
                writer.set(&netns, &redirect, false);
            }
        })
        .expect("run in the namespace");
    println!(
        "\nNext healthy (probe passed) → redirect live (a new connection answered by next), \
         ms, {trials} trials each, alternating; load average {load_before} → {}",
        crate::load_average()
    );
    println!(
        "| element written by | p50 | p99 | max | min | journal p50 / p99 | element p50 / p99 | connection p50 / p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, mut parts) in times {
        for samples in &mut parts {
            samples.sort();
        }
        let p = |samples: &[Duration], q: f64| crate::ms(crate::percentile(samples, q));
        let [total, journal, element, connection] = &parts;
        println!(
            "| {name} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} |",
            p(total, 50.0),
            p(total, 99.0),
            crate::ms(total.last().copied().unwrap_or_default()),
            crate::ms(total.first().copied().unwrap_or_default()),
            p(journal, 50.0),
            p(journal, 99.0),
            p(element, 50.0),
            p(element, 99.0),
            p(connection, 50.0),
            p(connection, 99.0),
        );
    }
}
