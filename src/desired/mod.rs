//! Desired state: what a node should have according to the spec, derived
//! from the spec alone (pure). This module: the containers a node runs and
//! whether it needs lessnat's nftables table; [`host_table`] and
//! [`routed_table`] build that table, [`routed`] the routed-mode roles,
//! rules, routes, addresses and kernel settings.

pub mod host_table;
pub mod routed;
pub mod routed_table;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{ContainerNetwork, ContainerSpec};
use crate::ownership::{
    LABEL_DIGEST, LABEL_PORTS, LABEL_SERVICE, LABEL_SPEC, LABEL_STOP_TIMEOUT, Slot,
    replica_container_name,
};
use crate::spec::{
    HumanDuration, NetworkMode, PlaceholderError, Protocol, Service, Spec, render_placeholders,
};

/// One port of a container as it will be started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredPort {
    /// The port's name in the spec.
    pub name: String,
    /// The canonical port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// The temporary port used during redirect-drain upgrades (host mode).
    pub temp_port: Option<u16>,
}

/// The container a service should have on a node, in the form that decides
/// whether a running container is current: anything here that changes means a
/// new container. Upgrade settings are not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredContainer {
    /// The service name.
    pub service: String,
    /// Image reference.
    pub image: String,
    /// `host` or `routed`.
    pub network: NetworkMode,
    /// Command template with `{port}` placeholders (filled in per slot).
    pub command: Vec<String>,
    /// Environment templates.
    pub env: BTreeMap<String, String>,
    /// Ports.
    pub ports: Vec<DesiredPort>,
    /// Routed mode: this replica's address.
    pub address: Option<String>,
    /// Routed mode: the replica's number on its node when it is not the
    /// first (see [`routed::PlacedReplica`]); it names its containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<u32>,
    /// `pull: always`: the registry digest of the image's tag, set by the
    /// planner from observation. Part of the hash, so a moved tag is a new
    /// container; recorded in the `io.lessnat.digest` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl DesiredContainer {
    /// A short, stable hash of everything above, stored in the `io.lessnat.spec`
    /// label so a later run can tell whether a container is current.
    pub fn spec_hash(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The routed replica's number on its node (1 for the first, and in host mode).
    pub fn replica_number(&self) -> u32 {
        self.replica.unwrap_or(1)
    }

    /// The canonical ports as the `io.lessnat.ports` label lists them: `8000/tcp`.
    pub fn port_labels(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol.as_str()))
            .collect()
    }

    /// The command with placeholders filled in: canonical ports, or temporary
    /// ports when `temporary` (the `next` container during an upgrade).
    pub fn command_for(&self, temporary: bool) -> Result<Vec<String>, PlaceholderError> {
        self.command
            .iter()
            .map(|arg| self.fill(arg, temporary))
            .collect()
    }

    /// The environment with placeholders filled in, as for [`Self::command_for`].
    pub fn env_for(&self, temporary: bool) -> Result<BTreeMap<String, String>, PlaceholderError> {
        self.env
            .iter()
            .map(|(k, v)| Ok((k.clone(), self.fill(v, temporary)?)))
            .collect()
    }

    /// The container this needs on `node` in `slot`: its name, the
    /// labels lessnat recognises it by (service, spec hash, canonical ports),
    /// and the command and environment with their port placeholders filled:
    /// temporary ports for [`Slot::Next`] (ports without one keep the
    /// canonical port), canonical ports otherwise.
    pub fn container_spec(
        &self,
        node: &str,
        slot: Slot,
        stop_timeout: Duration,
    ) -> Result<ContainerSpec, PlaceholderError> {
        let temporary = slot == Slot::Next;
        let mut labels = BTreeMap::from([
            (LABEL_SERVICE.to_string(), self.service.clone()),
            (LABEL_SPEC.to_string(), self.spec_hash()),
            (LABEL_PORTS.to_string(), self.port_labels().join(",")),
            (
                LABEL_STOP_TIMEOUT.to_string(),
                HumanDuration(stop_timeout).to_string(),
            ),
        ]);
        if let Some(digest) = &self.digest {
            labels.insert(LABEL_DIGEST.to_string(), digest.clone());
        }
        Ok(ContainerSpec {
            name: replica_container_name(&self.service, node, self.replica_number(), slot),
            image: self.image.clone(),
            command: self.command_for(temporary)?,
            env: self.env_for(temporary)?,
            labels,
            network: match self.network {
                NetworkMode::Host => ContainerNetwork::Host,
                NetworkMode::Routed => ContainerNetwork::None,
            },
            stop_timeout,
        })
    }

    fn fill(&self, template: &str, temporary: bool) -> Result<String, PlaceholderError> {
        let number = |port: &DesiredPort| match (temporary, port.temp_port) {
            (true, Some(temp)) => temp,
            _ => port.port,
        };
        render_placeholders(template, |name| match name {
            None if self.ports.len() == 1 => Ok(number(&self.ports[0])),
            None => Err(PlaceholderError::Ambiguous {
                count: self.ports.len(),
            }),
            Some(name) => self
                .ports
                .iter()
                .find(|p| p.name == name)
                .map(number)
                .ok_or_else(|| PlaceholderError::UnknownPort {
                    name: name.to_string(),
                }),
        })
    }
}

/// What one node should have.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredNode<'a> {
    /// The node's name.
    pub node: String,
    /// Services that run on this node, with their containers, in spec order.
    pub services: Vec<(&'a Service, DesiredContainer)>,
}

impl DesiredNode<'_> {
    /// Whether the node needs lessnat's host-mode nftables table.
    pub fn needs_host_table(&self) -> bool {
        self.services
            .iter()
            .any(|(s, _)| s.network == NetworkMode::Host)
    }
}

/// Derives what `node` should run from a validated spec: a host-mode
/// service's container, and one container per routed replica on the node.
pub fn desired_node<'a>(spec: &'a Spec, node: &str) -> DesiredNode<'a> {
    let services = spec
        .services
        .iter()
        .flat_map(|service| match service.network {
            NetworkMode::Host => (service.node.as_deref().map(String::as_str) == Some(node))
                .then(|| (service, container_for(service, None)))
                .into_iter()
                .collect::<Vec<_>>(),
            NetworkMode::Routed => routed::replicas_on(spec, service, node)
                .iter()
                .map(|replica| (service, replica_container(service, replica)))
                .collect(),
        })
        .collect();
    DesiredNode {
        node: node.to_string(),
        services,
    }
}

/// The container of a routed replica: its `address` (part of what makes the
/// container current) and, beyond the first on its node, its number.
pub fn replica_container(service: &Service, replica: &routed::PlacedReplica) -> DesiredContainer {
    DesiredContainer {
        replica: (replica.number > 1).then_some(replica.number),
        ..container_for(service, Some(replica.pair.address.to_string()))
    }
}

/// The container `service` should have; `address` is a routed replica's
/// `address` (part of what makes the container current), `None` in host mode.
fn container_for(service: &Service, address: Option<String>) -> DesiredContainer {
    DesiredContainer {
        service: service.name.value.clone(),
        image: service.image.value.clone(),
        network: service.network,
        command: service.command.iter().map(|c| c.value.clone()).collect(),
        env: service
            .env
            .iter()
            .map(|(k, v)| (k.value.clone(), v.value.clone()))
            .collect(),
        ports: service
            .ports
            .iter()
            .map(|p| DesiredPort {
                name: p.name.value.clone(),
                port: p.port.value,
                protocol: p.protocol,
                temp_port: p.temp_port.as_ref().map(|t| t.value),
            })
            .collect(),
        address,
        replica: None,
        digest: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load_bytes;

    fn spec(text: &str) -> Spec {
        load_bytes("t.yaml", text.as_bytes())
            .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)))
    }

    const HOST: &str = "version: 1\nnodes: [{name: a, address: 192.0.2.1}, {name: b, address: 192.0.2.2}]\nservices:\n  - name: web\n    node: a\n    image: web:1\n    command: [\"-listen=:{port}\"]\n    env: { PORT: \"{port.http}\" }\n    ports: [{name: http, port: 8000, tempPort: 18000}]\n    upgrade: { drainTimeout: 1m }\n";

    #[test]
    fn services_land_on_their_node() {
        let spec = spec(HOST);
        assert_eq!(desired_node(&spec, "a").services.len(), 1);
        assert!(desired_node(&spec, "b").services.is_empty());
        assert!(desired_node(&spec, "a").needs_host_table());
    }

    #[test]
    fn placeholders_fill_canonical_or_temporary_ports() {
        let spec = spec(HOST);
        let (_, container) = &desired_node(&spec, "a").services[0];
        assert_eq!(
            container.command_for(false).expect("fills"),
            vec!["-listen=:8000"]
        );
        assert_eq!(
            container.command_for(true).expect("fills"),
            vec!["-listen=:18000"]
        );
        assert_eq!(container.env_for(true).expect("fills")["PORT"], "18000");
    }

    #[test]
    fn hash_ignores_upgrade_settings_but_not_the_image() {
        let base = spec(HOST);
        let slower = spec(&HOST.replace("drainTimeout: 1m", "drainTimeout: 9m"));
        let newer = spec(&HOST.replace("web:1", "web:2"));
        let hash = |s: &Spec| desired_node(s, "a").services[0].1.spec_hash();
        assert_eq!(hash(&base), hash(&slower));
        assert_ne!(hash(&base), hash(&newer));
        assert_eq!(hash(&base).len(), 16);
    }

    #[test]
    fn container_spec_for_each_slot() {
        let text = "version: 1\nnodes: [{name: a, address: 192.0.2.1, containerSubnet: 10.0.0.0/24}]\nservices:\n  - name: web\n    node: a\n    image: web:1\n    network: host\n    command: [\"--listen\", \":{port.http}\"]\n    env: { PORT: \"{port.http}\" }\n    ports: [{name: http, port: 8000, tempPort: 18000}, {name: dns, port: 53, protocol: udp, tempPort: 10053}]\n  - name: api\n    image: api:1\n    network: routed\n    replicas: [{node: a, address: 10.0.0.5}]\n    ports: [{name: http, port: 8080}]\n";
        let spec = crate::spec::load_bytes("t.yaml", text.as_bytes())
            .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)));
        let desired = desired_node(&spec, "a");
        let (_, web) = &desired.services[0];
        let stop = Duration::from_secs(10);

        let next = web.container_spec("a", Slot::Next, stop).expect("fills");
        assert_eq!(next.name, "lessnat-web.a.next");
        assert_eq!(next.image, "web:1");
        assert_eq!(next.command, ["--listen", ":18000"]);
        assert_eq!(next.env["PORT"], "18000");
        assert_eq!(next.network, crate::model::ContainerNetwork::Host);
        assert_eq!(next.stop_timeout, stop);
        let labels: Vec<(&str, &str)> = next
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let hash = web.spec_hash();
        assert_eq!(
            labels,
            [
                (LABEL_PORTS, "8000/tcp,53/udp"),
                (LABEL_SERVICE, "web"),
                (LABEL_SPEC, hash.as_str()),
                (LABEL_STOP_TIMEOUT, "10s"),
            ]
        );
        let mut pinned = web.clone();
        pinned.digest = Some("sha256:abc".into());
        let pinned = pinned.container_spec("a", Slot::Next, stop).expect("fills");
        assert_eq!(pinned.labels[LABEL_DIGEST], "sha256:abc");
        assert_ne!(
            pinned.labels[LABEL_SPEC], hash,
            "the digest is part of the hash"
        );

        for (slot, name) in [
            (Slot::Primary, "lessnat-web.a"),
            (Slot::Prev, "lessnat-web.a.prev"),
        ] {
            let spec = web.container_spec("a", slot, stop).expect("fills");
            assert_eq!(spec.name, name);
            assert_eq!(spec.command, ["--listen", ":8000"]);
            assert_eq!(spec.env["PORT"], "8000");
            assert_eq!(spec.labels, next.labels, "labels do not depend on the slot");
        }

        let (_, api) = &desired.services[1];
        let routed = api.container_spec("a", Slot::Primary, stop).expect("fills");
        assert_eq!(routed.network, crate::model::ContainerNetwork::None);
        assert!(routed.command.is_empty() && routed.env.is_empty());

        let mut bad = web.clone();
        bad.command = vec!["{port.nope}".into()];
        assert!(bad.container_spec("a", Slot::Next, stop).is_err());
    }
}
