//! Why the agent converges now: what woke it, and the channel its event
//! sources wake it through.

use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};

/// What woke the agent up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// The agent started.
    Start,
    /// The interval passed.
    Interval,
    /// Something in lessnat's nftables table changed.
    Table,
    /// One of lessnat's containers died or started.
    Container,
    /// A replica address probed by this load-balancer node changed health.
    Health,
    /// The replica registrations in etcd changed, or etcd became
    /// unreachable or reachable again (spec with `cluster:`).
    Cluster,
    /// A run that could not take the apply lock, tried again.
    Retry,
}

impl Trigger {
    /// Every trigger, in the order metrics and status list them.
    pub const ALL: [Trigger; 7] = [
        Trigger::Start,
        Trigger::Interval,
        Trigger::Table,
        Trigger::Container,
        Trigger::Health,
        Trigger::Cluster,
        Trigger::Retry,
    ];

    /// The name used in metrics labels, JSON and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Interval => "interval",
            Trigger::Table => "table",
            Trigger::Container => "container",
            Trigger::Health => "health",
            Trigger::Cluster => "cluster",
            Trigger::Retry => "retry",
        }
    }

    /// How telling the trigger is when several wake the agent for one run:
    /// a container's death or a health change says what happened; a table
    /// event may be lessnat's own write; the interval and retries say nothing.
    pub fn weight(self) -> u8 {
        match self {
            Trigger::Container => 3,
            Trigger::Health | Trigger::Cluster => 2,
            Trigger::Table => 1,
            Trigger::Start | Trigger::Interval | Trigger::Retry => 0,
        }
    }
}

/// One wake-up: what and, for people, what exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    /// What woke the agent.
    pub trigger: Trigger,
    /// What happened, e.g. `container lessnat-web died`.
    pub detail: String,
    /// The container that died, for the crash-loop back-off.
    pub died: Option<String>,
    /// Whether a table event is among the wake-ups merged into this one.
    pub table_changed: bool,
}

impl Wake {
    /// A wake-up for `trigger`, saying `detail`.
    pub fn new(trigger: Trigger, detail: impl Into<String>) -> Wake {
        Wake {
            trigger,
            detail: detail.into(),
            died: None,
            table_changed: trigger == Trigger::Table,
        }
    }

    /// One run for this wake-up and `other`: the more telling trigger (the
    /// earlier one on a tie), both details, and the container that died.
    pub fn merge(self, other: Wake) -> Wake {
        let (first, second) = if other.trigger.weight() > self.trigger.weight() {
            (other, self)
        } else {
            (self, other)
        };
        let detail = if first.detail.contains(&second.detail) {
            first.detail
        } else {
            format!("{}; {}", first.detail, second.detail)
        };
        Wake {
            trigger: first.trigger,
            detail,
            died: first.died.or(second.died),
            table_changed: first.table_changed || second.table_changed,
        }
    }
}

/// Where event sources send their wake-ups. Sending never fails: a loop that
/// has ended just does not read them.
#[derive(Debug, Clone)]
pub struct Waker(Sender<Wake>);

impl Waker {
    /// A waker sending to `sender`.
    pub fn new(sender: Sender<Wake>) -> Waker {
        Waker(sender)
    }

    /// Wakes the agent for `trigger`, saying `detail`.
    pub fn wake(&self, trigger: Trigger, detail: impl Into<String>) {
        let _ = self.0.send(Wake::new(trigger, detail));
    }

    /// Wakes the agent because container `name` died.
    pub fn died(&self, name: &str) {
        let _ = self.0.send(Wake {
            died: Some(name.to_string()),
            ..Wake::new(Trigger::Container, format!("container {name} died"))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(trigger: Trigger, detail: &str) -> Wake {
        Wake::new(trigger, detail)
    }

    #[test]
    fn merged_wakes_keep_the_telling_trigger_and_every_detail() {
        let table = wake(Trigger::Table, "inet lessnat changed");
        let died = Wake {
            died: Some("lessnat-web".into()),
            ..wake(Trigger::Container, "container lessnat-web died")
        };
        let merged = table.clone().merge(died).merge(table.clone());
        assert_eq!(merged.trigger, Trigger::Container);
        assert_eq!(
            merged.detail,
            "container lessnat-web died; inet lessnat changed"
        );
        assert_eq!(merged.died.as_deref(), Some("lessnat-web"));
        assert!(merged.table_changed, "a table event is among them");
        let interval = wake(Trigger::Interval, "every 30s").merge(table);
        assert_eq!(interval.trigger, Trigger::Table);
    }
}
