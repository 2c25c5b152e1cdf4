//! nftables: lessnat's own table, built as a value ([`ruleset`]), read from and
//! written to the host through `nft -j`, and shown as nft text ([`text`]).
//!
//! Only `inet lessnat` is ever read or written; other tables are seen by name
//! only, to know whether ours exists. Every change is one atomic transaction:
//! an `nft -j -f` one, or, for the element of one redirect (the cutover,
//! where time counts), one nf_tables netlink batch (`element`).
//!
//! How the `nftables` crate is used:
//! - listings run through `nftables::helper::get_current_ruleset_raw`, and their
//!   JSON is decoded here, not by `nftables::schema`, so rules keep their
//!   statements exactly as nft reports them (see `decode`);
//! - transactions are built with the crate's typed [`Batch`] and piped to
//!   `nft -j -f -` here rather than through `nftables::helper::apply_ruleset`,
//!   because that helper (0.6.3) does not capture nft's stderr: the reason a
//!   transaction was refused would be printed on lessnat's own stderr and be
//!   missing from the error (nftables-rs issue #209).

mod decode;
mod element;
mod encode;
mod events;
mod guard;
mod watch;

use std::io::Write;
use std::process::{Command, Stdio};

use nftables::batch::Batch;
use nftables::helper::{self, NftablesError};

use crate::error::chain;
use crate::model::Redirect;
use crate::model::{NftRule, NftState, NftTable};
use crate::netns::{Netns, NetnsError};
use crate::ownership::{NFT_FAMILY, NFT_TABLE};
pub use events::TableEvents;
pub use guard::GuardTable;
pub use watch::{TableWatch, reassert};

/// The nft executable, looked up in `PATH`.
const NFT: &str = "nft";

/// Reading or changing nftables failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The `nft` command is not installed.
    #[error(
        "the `nft` command was not found: install the `nftables` package (Debian/Ubuntu: apt-get install nftables)"
    )]
    NotInstalled,
    /// `nft` could not be started or fed its input.
    #[error("cannot run `{command}`")]
    Run {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// `nft` ran and reported an error.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line, with what it was doing.
        command: String,
        /// What nft printed on stderr.
        stderr: String,
    },
    /// `nft` printed something that is not the JSON we expect.
    #[error("cannot read the output of `{command}`: {detail}")]
    Output {
        /// The command line.
        command: String,
        /// What is wrong with the output.
        detail: String,
    },
    /// The desired table holds something the `nftables` crate cannot express.
    #[error("cannot write {what} to nftables: {value} is not supported")]
    Unsupported {
        /// Which part of the table.
        what: String,
        /// The value, as JSON.
        value: String,
        /// The decoder's complaint.
        source: serde_json::Error,
    },
    /// Asked to write a table lessnat does not own.
    #[error(
        "refusing to write table {family} {name}: lessnat only writes its own table {NFT_FAMILY} {NFT_TABLE}"
    )]
    NotOwned {
        /// The table's family.
        family: String,
        /// The table's name.
        name: String,
    },
    /// The socket that reports nftables changes could not be opened, or its
    /// thread started.
    #[error("cannot watch nftables for changes to lessnat's table in {netns}")]
    Watch {
        /// The namespace.
        netns: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel refused a redirect element, or could not be asked.
    #[error("cannot {doing} in lessnat's table over nf_tables netlink{netns}")]
    Element {
        /// What was being done.
        doing: String,
        /// ` in NAMESPACE`, or nothing for lessnat's own namespace.
        netns: String,
        /// The kernel's answer or the socket's failure.
        source: std::io::Error,
    },
    /// The network namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// Reads lessnat's table (`inet lessnat`) in `netns`; a missing table gives
/// an empty [`NftState`]. See [`observe_ruleset`].
pub fn observe(netns: &Netns) -> Result<NftState, NftError> {
    observe_ruleset(netns).map(|(state, _)| state)
}

/// Reads lessnat's table (`inet lessnat`) in `netns` and warns about rules
/// anywhere in the ruleset that exempt traffic from connection tracking
/// (`notrack`: connections they match are invisible to conntrack, so drain
/// counts would miss them), from one `nft -j list ruleset`. Of other tables
/// only notrack rules are looked at, and foreign tables are never changed.
pub fn observe_ruleset(netns: &Netns) -> Result<(NftState, Vec<String>), NftError> {
    let command = describe("nft -j list ruleset", netns);
    let json = list(netns, &command, &["list", "ruleset"])?;
    let (table, chains) = decode::ruleset(NFT_FAMILY, NFT_TABLE, &json)
        .map_err(|detail| NftError::Output { command, detail })?;
    let warnings = chains
        .into_iter()
        .map(|chain| {
            format!(
                "chain {chain} has notrack rules: connections they match are not in conntrack, so drains cannot wait for them"
            )
        })
        .collect();
    Ok((
        NftState {
            tables: table.into_iter().collect(),
        },
        warnings,
    ))
}

/// Reads the table `inet NAME` in `netns` with one listing; `None` when it is
/// absent.
fn read_table(netns: &Netns, name: &str) -> Result<Option<NftTable>, NftError> {
    let command = describe(&format!("nft -j list table {NFT_FAMILY} {name}"), netns);
    let json = match list(netns, &command, &["list", "table", NFT_FAMILY, name]) {
        Ok(json) => json,
        Err(error) if is_absent(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    decode::table(NFT_FAMILY, name, &json)
        .map(Some)
        .map_err(|detail| NftError::Output { command, detail })
}

/// Whether nft failed because the table (or the map) it names does not exist.
fn is_absent(error: &NftError) -> bool {
    matches!(error, NftError::Failed { stderr, .. } if stderr.contains("No such file or directory"))
}

/// Replaces lessnat's table in `netns` with `desired`, in one atomic
/// transaction: nothing in between is ever visible to packets. `desired` must
/// be `inet lessnat`. Conntrack entries are not touched, so established flows
/// keep their NAT bindings.
pub fn apply_table(netns: &Netns, desired: &NftTable) -> Result<(), NftError> {
    transact(
        netns,
        "replacing table inet lessnat",
        encode::replace_table(desired)?,
    )
}

/// Adds (`present`) or removes the map element of one redirect in lessnat's
/// table, in one transaction (an nf_tables netlink batch, no `nft` process);
/// nothing else in the table changes. Removing an absent element succeeds,
/// also when its map or the whole table is gone (deleted by someone else).
pub fn set_redirect(netns: &Netns, redirect: &Redirect, present: bool) -> Result<(), NftError> {
    netns
        .run(|| element::set(redirect, present))?
        .map_err(|source| NftError::Element {
            doing: format!(
                "{} redirect {}/{} -> {}",
                if present { "add" } else { "remove" },
                redirect.port,
                redirect.protocol.as_str(),
                redirect.temp_port
            ),
            netns: describe("", netns),
            source,
        })
}

/// Replaces the rules of lessnat's table commented with one of `remove` by
/// `add` (each appended to its chain), in one transaction; nothing else in
/// the table changes. Removing rules that are gone (or whose table is)
/// succeeds.
pub fn replace_rules(
    netns: &Netns,
    remove: &[String],
    add: &[(String, NftRule)],
) -> Result<(), NftError> {
    let command = describe(
        &format!("nft -j list table {NFT_FAMILY} {NFT_TABLE}"),
        netns,
    );
    let handles = match list(netns, &command, &["list", "table", NFT_FAMILY, NFT_TABLE]) {
        Ok(json) => decode::rule_handles(&json, remove)
            .map_err(|detail| NftError::Output { command, detail })?,
        Err(error) if is_absent(&error) => Vec::new(),
        Err(error) => return Err(error),
    };
    if handles.is_empty() && add.is_empty() {
        return Ok(());
    }
    let doing = format!("replacing {} rules with {}", handles.len(), add.len());
    transact(netns, &doing, encode::replace_rules(&handles, add)?)
}

/// Deletes lessnat's table in `netns`; succeeds when it is already absent.
pub fn delete_table(netns: &Netns) -> Result<(), NftError> {
    transact(netns, "deleting table inet lessnat", encode::delete_table())
}

/// Runs `nft -j ARGS` in `netns` and returns its output; `command` describes
/// it in errors.
fn list(netns: &Netns, command: &str, args: &[&str]) -> Result<String, NftError> {
    netns
        .run(|| helper::get_current_ruleset_raw(Some(NFT), args))?
        .map_err(|e| match e {
            NftablesError::NftExecution { inner, .. } => run_error(command, inner),
            NftablesError::NftFailed { stderr, .. } => NftError::Failed {
                command: command.to_string(),
                stderr: stderr.trim().to_string(),
            },
            other => NftError::Output {
                command: command.to_string(),
                detail: chain(&other),
            },
        })
}

/// Runs `batch` as one `nft -j -f -` transaction in `netns`.
fn transact(netns: &Netns, doing: &str, batch: Batch) -> Result<(), NftError> {
    let command = describe(&format!("nft -j -f - ({doing})"), netns);
    let payload = serde_json::to_string(&batch.to_nftables()).map_err(|e| NftError::Output {
        command: command.clone(),
        detail: format!("cannot serialise the commands: {}", chain(&e)),
    })?;
    netns.run(|| {
        let mut child = Command::new(NFT)
            .args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| run_error(&command, e))?;
        // nft reads all its input before it writes anything, so this cannot
        // block on a full stdout or stderr pipe. If nft quits early, its
        // stderr says why better than the broken pipe does.
        let written = match child.stdin.take() {
            Some(mut stdin) => stdin.write_all(payload.as_bytes()),
            None => Ok(()),
        };
        let output = child
            .wait_with_output()
            .map_err(|e| run_error(&command, e))?;
        if !output.status.success() {
            return Err(NftError::Failed {
                command: command.clone(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        written.map_err(|e| run_error(&command, e))
    })?
}

/// A command line for messages, naming the namespace when it is not ours.
fn describe(command: &str, netns: &Netns) -> String {
    match netns {
        Netns::Current => command.to_string(),
        Netns::Path(_) => format!("{command} in {netns}"),
    }
}

fn run_error(command: &str, error: std::io::Error) -> NftError {
    if error.kind() == std::io::ErrorKind::NotFound {
        NftError::NotInstalled
    } else {
        NftError::Run {
            command: command.to_string(),
            source: error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nft_says_what_to_install() {
        let error = run_error(
            "nft -j list tables",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(
            error.to_string().contains("install the `nftables` package"),
            "{error}"
        );
        let error = run_error(
            "nft -j list tables",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(error.to_string().contains("nft -j list tables"), "{error}");
        assert_eq!(
            crate::error::chain(&error),
            "cannot run `nft -j list tables`: permission denied"
        );
    }
}
