//! Holding an upgrade's redirect: from the redirect until the unredirect (and
//! in a rollback, until the old version is healthy again), lessnat's table must
//! be there with the redirect's elements, or new connections reach the old
//! version directly, or nothing at all once it is stopped. Someone else's
//! `flush ruleset` or `nft delete table inet lessnat` is undone: the planned
//! table plus the elements is written whole, in one transaction, and apply
//! says so.

use super::ApplyError;
use super::host::{Host, TableHold};
use super::progress::Progress;
use crate::desired::host_table::service_redirects;
use crate::model::NftTable;
use crate::spec::Service;

/// One upgrade's hold on lessnat's table.
pub(super) struct RedirectHold<'a> {
    /// What to hold: the planned table plus the redirect (`None`: the
    /// upgrade redirects nothing, as a stop-start).
    table: Option<&'a NftTable>,
    /// The host's hold while the redirect must hold.
    held: Option<Box<dyn TableHold + 'a>>,
    /// The service, for progress lines.
    service: String,
    /// The progress line of a restore.
    restored_line: String,
    /// Times the table was written again.
    restores: usize,
}

impl<'a> RedirectHold<'a> {
    /// A hold, not taken yet, on `table` for `service`'s redirect.
    pub fn new(service: &Service, table: Option<&'a NftTable>) -> Self {
        let redirects: Vec<String> = service_redirects(service)
            .iter()
            .map(|r| format!("{}/{} -> {}", r.port, r.protocol.as_str(), r.temp_port))
            .collect();
        RedirectHold {
            table,
            held: None,
            service: service.name.value.clone(),
            restored_line: format!(
                "{}: lessnat's table was deleted by someone else; restored it with the redirect {}",
                service.name,
                redirects.join(", ")
            ),
            restores: 0,
        }
    }

    /// A hold, not taken yet, on `table` for `service`'s canary split.
    pub fn canary(service: &Service, table: Option<&'a NftTable>) -> Self {
        RedirectHold {
            restored_line: format!(
                "{}: lessnat's table was deleted by someone else; restored it with the canary split",
                service.name
            ),
            ..RedirectHold::new(service, table)
        }
    }

    /// Takes the hold when it is not held yet, then checks the table now.
    pub fn take(&mut self, host: &'a dyn Host, progress: &mut Progress) -> Result<(), ApplyError> {
        if self.held.is_none()
            && let Some(table) = self.table
        {
            let held = host.hold_table(table)?;
            if let Some(why) = held.unguarded() {
                progress.step(&format!(
                    "{}: no guard table holds the redirect ({}); if someone deletes lessnat's table, new connections are not redirected until lessnat restores it",
                    self.service,
                    crate::error::chain(why)
                ));
            }
            self.held = Some(held);
        }
        self.check(progress)
    }

    /// While held: checks the table now (restoring it when part of it is
    /// missing) and reports every restore since the last check.
    pub fn check(&mut self, progress: &mut Progress) -> Result<(), ApplyError> {
        let Some(held) = &self.held else {
            return Ok(());
        };
        for _ in 0..held.reassert()? {
            progress.step(&self.restored_line);
            self.restores += 1;
        }
        Ok(())
    }

    /// Checks once more and lets go: the redirect is about to be removed.
    pub fn release(&mut self, progress: &mut Progress) -> Result<(), ApplyError> {
        self.check(progress)?;
        self.held = None;
        Ok(())
    }

    /// Times the table was written again.
    pub fn restores(&self) -> usize {
        self.restores
    }
}
