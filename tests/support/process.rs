//! A `lessnat` process (the agent, mostly) run by a test: its output lines
//! (standard output and error) recorded with the instant each was read, so
//! a test can wait for a line and time what it says; killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A lessnat process whose output lines (standard output and error) are
/// recorded with the instant each was read; killed when dropped.
pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Process {
    /// Starts `command` with its output piped and recorded.
    pub fn spawn(mut command: Command) -> Process {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{:?}: {e}", command.get_program()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let readers = [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ]
        .into_iter()
        .map(|stream| {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    lines
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((Instant::now(), line));
                }
            })
        })
        .collect();
        Process {
            child,
            lines,
            readers,
        }
    }

    /// `GET path` from the agent's HTTP endpoint (the address it printed);
    /// the whole response.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let line = self
            .lines_with("Serving metrics at http://")
            .into_iter()
            .next()
            .map(|(_, line)| line)
            .expect("the agent says where it serves");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("an address");
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: lessnat\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        response
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far, one line each.
    pub fn output(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Everything it printed so far, each line after the seconds from
    /// `origin` it was read at (`+1.234s `), to line up with other clocks.
    pub fn output_since(&self, origin: Instant) -> String {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(at, l)| {
                let secs = at.saturating_duration_since(origin).as_secs_f64();
                format!("+{secs:.3}s {l}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The lines containing `text`, with when each was read.
    pub fn lines_with(&self, text: &str) -> Vec<(Instant, String)> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, l)| l.contains(text))
            .cloned()
            .collect()
    }

    /// Waits until the `n`th line containing `text` (counting from 1); returns
    /// when it was read. Panics with the output when the process ends first
    /// or `timeout` passes.
    pub fn wait_line(&mut self, text: &str, n: usize, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, _)) = self.lines_with(text).get(n - 1) {
                return *at;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                if let Some((at, _)) = self.lines_with(text).get(n - 1) {
                    return *at;
                }
                panic!(
                    "lessnat ended ({status}) without printing {text:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "lessnat did not print {text:?} (#{n}) within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal`, waits for the end; returns the status and the output.
    pub fn end(mut self, signal: nix::sys::signal::Signal) -> (ExitStatus, String) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, signal);
        let status = self.wait(Duration::from_secs(10));
        (status, self.output())
    }

    /// Waits up to `timeout` for the end (panics after it).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "lessnat did not end within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
