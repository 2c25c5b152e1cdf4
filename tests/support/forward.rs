//! A TCP forwarder on loopback that a test can cut and restore, or slow
//! down: a node given its port instead of a service's (an etcd member's
//! client port) loses the service while cut — every connection through it
//! is closed, and new ones are closed as soon as they are accepted — and
//! reaches it again once restored. Slowed, it accepts and keeps every
//! connection but passes each chunk on only a set time after it arrived,
//! each way (latency), or not at all while stalled. Its threads end when it
//! is dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The delay that means stalled: nothing is passed on.
const STALLED: u64 = u64::MAX;

/// How often a held chunk looks again whether it is due.
const HOLD_TICK: Duration = Duration::from_millis(5);

/// What the accepting thread, the pipes and the test share.
#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    stop: AtomicBool,
    /// How long (ms) a chunk is held before it is passed on; [`STALLED`]:
    /// until that changes.
    delay_ms: AtomicU64,
    /// Both sides of every connection forwarded, to close them when cut.
    open: Mutex<Vec<TcpStream>>,
}

impl Shared {
    /// How much longer a chunk that arrived at `arrived` is held; `None`
    /// when it is due.
    fn held_for(&self, arrived: Instant) -> Option<Duration> {
        match self.delay_ms.load(Ordering::SeqCst) {
            STALLED => Some(HOLD_TICK),
            ms => (arrived + Duration::from_millis(ms)).checked_duration_since(Instant::now()),
        }
    }
}

/// A forwarder from a free loopback port to `upstream`.
pub struct Forwarder {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts forwarding a free loopback port to `upstream`.
    pub fn start(upstream: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("local address").port();
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        let thread = std::thread::spawn(move || accept(&listener, upstream, &accepting));
        Forwarder {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`: where to reach the upstream through it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and refuses new ones until [`Forwarder::restore`].
    pub fn cut(&self) {
        // Under the lock: no connection is added between the flag and the cut.
        let mut open = self.shared.open.lock().expect("open");
        self.shared.cut.store(true, Ordering::SeqCst);
        for stream in open.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// From now on every chunk, in either direction, is passed on `each_way`
    /// after it arrived (chunks held already included); zero: at once.
    /// Ends a stall.
    pub fn delay(&self, each_way: Duration) {
        let ms = u64::try_from(each_way.as_millis()).map_or(STALLED - 1, |ms| ms.min(STALLED - 1));
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Connections are accepted and kept, but nothing is passed on (either
    /// way) until [`Forwarder::delay`] says how long to hold chunks again.
    pub fn stall(&self) {
        self.shared.delay_ms.store(STALLED, Ordering::SeqCst);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        let _ = client.set_nonblocking(false);
        let server = TcpStream::connect_timeout(&upstream, Duration::from_secs(2));
        let mut open = shared.open.lock().expect("open");
        let (Ok(server), false) = (server, shared.cut.load(Ordering::SeqCst)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let clones = [&client, &server, &client, &server].map(|s| s.try_clone());
        let [
            Ok(client_back),
            Ok(server_back),
            Ok(client_kept),
            Ok(server_kept),
        ] = clones
        else {
            continue;
        };
        open.extend([client_kept, server_kept]);
        drop(open);
        let (there, back) = (Arc::clone(shared), Arc::clone(shared));
        std::thread::spawn(move || pipe(client, server, there));
        std::thread::spawn(move || pipe(server_back, client_back, back));
    }
}

/// Copies `from` to `to`, each chunk when it is due, until either ends,
/// then closes both.
fn pipe(mut from: TcpStream, to: TcpStream, shared: Arc<Shared>) {
    let (hold, held) = channel();
    let writer = std::thread::spawn(move || pass_on(&held, to, &shared));
    let mut buffer = [0_u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if hold.send((Instant::now(), buffer[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(hold);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Both);
}

/// Writes each chunk of `held` to `to` once it is due, until `held` ends,
/// a write fails, or the forwarder cuts or stops; then closes `to`.
fn pass_on(held: &Receiver<(Instant, Vec<u8>)>, mut to: TcpStream, shared: &Shared) {
    'chunks: while let Ok((arrived, chunk)) = held.recv() {
        while let Some(wait) = shared.held_for(arrived) {
            if shared.stop.load(Ordering::SeqCst) || shared.cut.load(Ordering::SeqCst) {
                break 'chunks;
            }
            std::thread::sleep(wait.min(HOLD_TICK));
        }
        if to.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}
