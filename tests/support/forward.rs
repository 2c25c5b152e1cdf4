//! A TCP forwarder on loopback that a test can cut and restore: a node
//! given its port instead of a service's (an etcd member's client port)
//! loses the service while cut — every connection through it is closed,
//! and new ones are closed as soon as they are accepted — and reaches it
//! again once restored. Its threads end when it is dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the accepting thread and the test share.
#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both sides of every connection forwarded, to close them when cut.
    open: Mutex<Vec<TcpStream>>,
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

fn accept(listener: &TcpListener, upstream: SocketAddr, shared: &Shared) {
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
        std::thread::spawn(move || pipe(client, server));
        std::thread::spawn(move || pipe(server_back, client_back));
    }
}

/// Copies `from` to `to` until either ends, then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0_u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
