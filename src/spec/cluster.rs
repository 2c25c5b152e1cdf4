//! The spec's optional `cluster:` block (`docs/cluster.md`): the etcd
//! cluster the nodes' agents register in, and its checks. A spec without it
//! plans exactly as one written before it existed.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{HumanDuration, Located};
use crate::diagnostic::Diagnostic;

/// The shortest lease TTL a spec may ask for: etcd refuses leases shorter
/// than about one and a half election timeouts (1.5 s with its defaults).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// The longest lease TTL a spec may ask for: a dead node's replicas stay in
/// the spreads for up to this long.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(60);

/// Cluster coordination: where the agents share what is alive now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    /// The etcd cluster (v3 API) the agents register their nodes and healthy
    /// replicas in, and load-balancer nodes watch.
    pub etcd: Located<Etcd>,
}

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Etcd {
    /// The members' client URLs, e.g. `https://10.0.0.1:2379`: `http://`
    /// without `tls`, `https://` with it.
    #[schemars(length(min = 1))]
    pub endpoints: Vec<Located<String>>,
    /// The key prefix every key of this site lives under. Default `/lessnat`.
    #[serde(default = "default_prefix")]
    pub prefix: Located<String>,
    /// TLS to etcd: the CA that signed the members' certificates and, for
    /// client certificate authentication, this node's certificate and key
    /// (paths on the node, PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Located<EtcdTls>>,
    /// How long a node's registrations outlive its agent: the lease the agent
    /// keeps alive. Whole seconds, `2s` to `60s`. Default `5s`.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Located<HumanDuration>,
}

/// TLS settings for etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdTls {
    /// The CA certificate (PEM) the members' certificates are checked against.
    pub ca: Located<String>,
    /// This node's client certificate (PEM); with `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<Located<String>>,
    /// This node's client key (PEM); with `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Located<String>>,
}

fn default_prefix() -> Located<String> {
    "/lessnat".to_string().into()
}

fn default_lease_ttl() -> Located<HumanDuration> {
    HumanDuration::secs(5).into()
}

/// The problems of a `cluster:` block, each at its value.
pub(super) fn check(cluster: &Cluster) -> Vec<Diagnostic> {
    let etcd = &cluster.etcd;
    let mut found = Vec::new();
    if etcd.endpoints.is_empty() {
        found.push(
            Diagnostic::new(Some(etcd.span), "etcd needs at least one endpoint").with_help(
                "list the members' client URLs, e.g. `endpoints: [http://10.0.0.1:2379]`",
            ),
        );
    }
    let scheme = if etcd.tls.is_some() { "https" } else { "http" };
    for endpoint in &etcd.endpoints {
        if let Err(problem) = endpoint_problem(endpoint, scheme) {
            found.push(
                Diagnostic::new(
                    Some(endpoint.span),
                    format!("invalid etcd endpoint \"{}\": {problem}", endpoint.value),
                )
                .with_help(format!(
                    "write a client URL like `{scheme}://10.0.0.1:2379`{}",
                    if etcd.tls.is_some() {
                        " (with `tls`, every endpoint is https)"
                    } else {
                        " (https needs a `tls` block)"
                    }
                )),
            );
        }
    }
    let prefix = &etcd.prefix;
    if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
        found.push(
            Diagnostic::new(
                Some(prefix.span),
                format!("invalid etcd key prefix \"{}\"", prefix.value),
            )
            .with_help(
                "start it with `/` and end it without one, e.g. `/lessnat` or `/sites/paris`",
            ),
        );
    }
    let ttl = etcd.lease_ttl.value.get();
    if ttl.subsec_nanos() != 0 || !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) {
        found.push(
            Diagnostic::new(
                Some(etcd.lease_ttl.span),
                format!("leaseTtl {} is not a whole number of seconds from 2s to 60s", etcd.lease_ttl.value),
            )
            .with_help("etcd leases count whole seconds; a few seconds (the default `5s`) lets a dead node's replicas leave the spreads soon"),
        );
    }
    if let Some(tls) = &etcd.tls {
        match (&tls.cert, &tls.key) {
            (Some(_), Some(_)) | (None, None) => {}
            (Some(one), None) | (None, Some(one)) => found.push(
                Diagnostic::new(Some(one.span), "etcd TLS needs both `cert` and `key`, or neither")
                    .with_help("give the client certificate and its key together, or only `ca` when etcd does not ask for client certificates"),
            ),
        }
    }
    found
}

/// Why `endpoint` is not a `scheme://HOST:PORT` URL, if it is not.
fn endpoint_problem(endpoint: &str, scheme: &str) -> Result<(), String> {
    let Some((given, rest)) = endpoint.split_once("://") else {
        return Err("it has no scheme".into());
    };
    if given != scheme {
        return Err(format!("the scheme must be {scheme}"));
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err("it has no port".into());
    };
    if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
        return Err("the host is not a host name or address".into());
    }
    if host.starts_with('[') != host.ends_with(']') {
        return Err("an IPv6 address must be in brackets".into());
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err(format!("the port `{port}` is not a number from 1 to 65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_client_urls_of_the_scheme_tls_asks_for() {
        assert_eq!(endpoint_problem("http://10.0.0.1:2379", "http"), Ok(()));
        assert_eq!(
            endpoint_problem("https://etcd-1.example:2379/", "https"),
            Ok(())
        );
        assert_eq!(endpoint_problem("http://[fd00::1]:2379", "http"), Ok(()));
        for (endpoint, problem) in [
            ("10.0.0.1:2379", "it has no scheme"),
            ("https://10.0.0.1:2379", "the scheme must be http"),
            ("http://10.0.0.1", "it has no port"),
            (
                "http://10.0.0.1:99999",
                "the port `99999` is not a number from 1 to 65535",
            ),
            ("http://:2379", "the host is not a host name or address"),
            ("http://a/b:2379", "the host is not a host name or address"),
        ] {
            assert_eq!(
                endpoint_problem(endpoint, "http"),
                Err(problem.into()),
                "{endpoint}"
            );
        }
    }
}
