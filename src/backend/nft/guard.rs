//! The guard table: while an upgrade's redirect must hold, a second table,
//! `inet lessnat_guard`, carries the same redirect with nftables' `owner`
//! flag. An `nft -i` process lessnat keeps running owns it, and the kernel
//! lets no other process delete it and skips it in `flush ruleset`; it goes
//! when that process ends, however lessnat ends (the process's input closes
//! with lessnat). So when someone deletes lessnat's own table, new
//! connections are still redirected, with no gap, until it is restored.
//!
//! Both tables' chains redirect at the same hook priority; a connection's NAT
//! is set by the first chain that redirects it, so carrying the redirect
//! twice changes nothing.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::{NFT, NftError, describe, read_table, run_error};
use crate::model::NftTable;
use crate::model::nft_text::render_table;
use crate::netns::Netns;
use crate::ownership::NFT_GUARD_TABLE;

/// How long the guard table gets to appear.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(5);
/// How often lessnat looks whether it has appeared.
const APPEAR_POLL: Duration = Duration::from_millis(2);

/// A guard table in place; dropping it removes it.
#[derive(Debug)]
pub struct GuardTable {
    child: Child,
    /// Kept open: the `nft -i` process ends when its input closes.
    _input: ChildStdin,
}

impl GuardTable {
    /// Puts `guard` (a table named `inet lessnat_guard`) in place in `netns`,
    /// owned by an `nft -i` process, and returns once it is there.
    pub fn hold(netns: &Netns, guard: &NftTable) -> Result<GuardTable, NftError> {
        if guard.name != NFT_GUARD_TABLE {
            return Err(NftError::NotOwned {
                family: guard.family.clone(),
                name: guard.name.clone(),
            });
        }
        let command = describe(&format!("nft -i (table inet {NFT_GUARD_TABLE})"), netns);
        let mut child = netns.run(|| {
            Command::new(NFT)
                .arg("-i")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| run_error(&command, e))
        })??;
        let Some(mut input) = child.stdin.take() else {
            return Err(failed(child, &command));
        };
        // `nft -i` reads one command per line.
        let text = format!("{}\n", one_line(&owned(&render_table(guard))));
        if input.write_all(text.as_bytes()).is_err() {
            // nft quit: what it printed says why.
            drop(input);
            return Err(failed(child, &command));
        }
        let started = Instant::now();
        while read_table(netns, NFT_GUARD_TABLE)?.is_none() {
            let running = matches!(child.try_wait(), Ok(None));
            if !running || started.elapsed() > APPEAR_TIMEOUT {
                drop(input);
                return Err(failed(child, &command));
            }
            std::thread::sleep(APPEAR_POLL);
        }
        Ok(GuardTable {
            child,
            _input: input,
        })
    }
}

impl Drop for GuardTable {
    /// Ends the `nft` process; the kernel removes the table it owns.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ends `child` and returns what it said as the failure of `command`.
fn failed(mut child: Child, command: &str) -> NftError {
    let _ = child.kill();
    let mut stderr = String::new();
    if let Some(mut output) = child.stderr.take() {
        let _ = output.read_to_string(&mut stderr);
    }
    let _ = child.wait();
    NftError::Failed {
        command: command.to_string(),
        stderr: stderr.trim().to_string(),
    }
}

/// `table` text with the `owner` flag: only the process that made the table
/// may change it, and it goes with that process.
fn owned(table: &str) -> String {
    match table.split_once('\n') {
        Some((head, rest)) => format!("{head}\n\tflags owner\n{rest}"),
        None => table.to_string(),
    }
}

/// nft text on one line: statements joined with `;` (nft's other separator),
/// a list continued after a `,`.
fn one_line(text: &str) -> String {
    let mut line = String::new();
    for part in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.ends_with(',') {
            line.push(' ');
        } else if !line.is_empty() {
            line.push_str("; ");
        }
        line.push_str(part);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_goes_on_one_owned_line() {
        let text = "table inet lessnat_guard {\n\tmap m {\n\t\ttype inet_service : inet_service\n\t\telements = { 1 : 2,\n\t\t\t     3 : 4 }\n\t}\n\n\tchain c {\n\t\ttype nat hook output priority -110; policy accept;\n\t}\n}\n";
        assert_eq!(
            one_line(&owned(text)),
            "table inet lessnat_guard {; flags owner; map m {; type inet_service : inet_service; \
             elements = { 1 : 2, 3 : 4 }; }; chain c {; type nat hook output priority -110; policy accept;; }; }"
        );
    }
}
