//! Is a saved plan still valid? It is when the host looks as it did when the
//! plan was made (same fingerprint); otherwise this says what changed.

use std::collections::BTreeMap;

use crate::model::{Container, Observed};
use crate::plan::fingerprint;

/// What changed on the host between `before` (when the plan was made) and
/// `now`; empty when nothing that matters changed.
pub fn changes_since(before: &Observed, now: &Observed) -> Vec<String> {
    if fingerprint(before) == fingerprint(now) {
        return Vec::new();
    }
    let mut found = Vec::new();
    let by_name = |o: &Observed| -> BTreeMap<String, Container> {
        o.containers
            .iter()
            .map(|c| (c.name.clone(), c.clone()))
            .collect()
    };
    let (old, new) = (by_name(before), by_name(now));
    for (name, was) in &old {
        match new.get(name) {
            None => found.push(format!("container {name} was removed")),
            Some(is) if is.id != was.id => found.push(format!("container {name} was replaced")),
            Some(is) if is.state != was.state => found.push(format!(
                "container {name} went from {} to {}",
                was.state, is.state
            )),
            Some(is) if is.spec_hash != was.spec_hash || is.image != was.image => {
                found.push(format!("container {name} changed"))
            }
            Some(_) => {}
        }
    }
    for name in new.keys().filter(|n| !old.contains_key(*n)) {
        found.push(format!("container {name} appeared"));
    }
    if before.nft != now.nft {
        found.push("lessnat's nftables table changed".to_string());
    }
    if before.routing != now.routing {
        found.push("lessnat's routing rules or routes changed".to_string());
    }
    if before.foreign_containers != now.foreign_containers {
        found.push("containers using lessnat's names appeared or went".to_string());
    }
    if found.is_empty() {
        found.push("the observed state differs".to_string());
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::Slot;

    fn container(state: &str) -> Container {
        Container {
            id: "1".into(),
            name: "lessnat-web.n".into(),
            service: "web".into(),
            slot: Slot::Primary,
            spec_hash: "h".into(),
            image: "web:1".into(),
            ports: vec![],
            state: state.into(),
            health: None,
            pid: None,
            address: None,
            stop_timeout: None,
            digest: None,
        }
    }

    #[test]
    fn says_what_changed() {
        let before = Observed {
            node: "n".into(),
            containers: vec![container("running")],
            ..Observed::default()
        };
        assert!(changes_since(&before, &before.clone()).is_empty());
        let mut pid_only = before.clone();
        pid_only.containers[0].pid = Some(7);
        assert!(
            changes_since(&before, &pid_only).is_empty(),
            "pids are not part of the fingerprint"
        );
        let stopped = Observed {
            containers: vec![container("exited")],
            ..before.clone()
        };
        assert_eq!(
            changes_since(&before, &stopped),
            vec!["container lessnat-web.n went from running to exited"]
        );
        let gone = Observed {
            containers: vec![],
            ..before.clone()
        };
        assert_eq!(
            changes_since(&before, &gone),
            vec!["container lessnat-web.n was removed"]
        );
    }
}
