//! Warnings about a valid spec that depend on the host it runs on: a
//! host-mode `port` or `tempPort` inside the host's ephemeral port range can
//! be taken by any outgoing connection's local port before the service binds
//! it, so a start or an upgrade fails at random.

use std::ops::RangeInclusive;

use super::{Located, NetworkMode, Spec};
use crate::diagnostic::Diagnostic;

/// Linux's default `net.ipv4.ip_local_port_range`, for hosts where it cannot be read.
pub const DEFAULT_EPHEMERAL_PORTS: RangeInclusive<u16> = 32768..=60999;

/// Reads a `net.ipv4.ip_local_port_range` value (`"32768\t60999"`).
pub fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    match (numbers.next(), numbers.next(), numbers.next()) {
        (Some(Ok(low)), Some(Ok(high)), None) if low <= high => Some(low..=high),
        _ => None,
    }
}

/// Host-mode ports and temporary ports of `spec` that lie in `ephemeral`.
pub fn ephemeral_port_warnings(spec: &Spec, ephemeral: &RangeInclusive<u16>) -> Vec<Diagnostic> {
    let mut warnings = Vec::new();
    let mut check = |what: &str, port: &Located<u16>| {
        if ephemeral.contains(&port.value) {
            warnings.push(
                Diagnostic::warning(
                    Some(port.span),
                    format!(
                        "{what} {} lies in this host's ephemeral port range {}-{} \
                         (net.ipv4.ip_local_port_range): an outgoing connection can take it \
                         before the service binds it",
                        port.value,
                        ephemeral.start(),
                        ephemeral.end()
                    ),
                )
                .with_help(format!(
                    "choose a port below {}, or reserve it with net.ipv4.ip_local_reserved_ports",
                    ephemeral.start()
                )),
            );
        }
    };
    for service in spec
        .services
        .iter()
        .filter(|s| s.network == NetworkMode::Host)
    {
        for port in &service.ports {
            check("port", &port.port);
            if let Some(temp) = &port.temp_port {
                check("tempPort", temp);
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::{Report, Severity};
    use crate::spec::load_bytes;
    use crate::style::Style;

    const SPEC: &str = "version: 1\nnodes: [{name: a, address: 192.0.2.1, containerSubnet: 10.20.1.0/24}]\nservices:\n  - name: web\n    node: a\n    image: web:1\n    ports: [{name: http, port: 8000, tempPort: 40000}]\n  - name: api\n    image: api:1\n    network: routed\n    replicas: [{node: a, address: 10.20.1.5}]\n    ports: [{name: http, port: 45000}]\n";

    #[test]
    fn reads_the_kernel_format() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
    }

    #[test]
    fn host_mode_ports_in_the_range_are_pointed_at() {
        let spec = load_bytes("s.yaml", SPEC.as_bytes()).expect("valid");
        let warnings = ephemeral_port_warnings(&spec, &DEFAULT_EPHEMERAL_PORTS);
        // The routed service's port 45000 is inside its container's own namespace.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].severity, Severity::Warning);
        let report = Report {
            file: "s.yaml".into(),
            source: SPEC.into(),
            diagnostics: warnings,
        };
        let text = report.render(Style::Plain);
        assert!(
            text.starts_with("s.yaml:7:48: warning: tempPort 40000 lies in this host's ephemeral port range 32768-60999"),
            "{text}"
        );
        assert!(text.contains("^^^^^"), "{text}");
        assert!(text.ends_with("s.yaml: 1 warning\n"), "{text}");
        assert!(ephemeral_port_warnings(&spec, &(50000..=60000)).is_empty());
    }
}
