//! The loader must never panic, whatever it is given, and every error it
//! reports must point inside the file.

use lessnat::spec::load_bytes;
use proptest::prelude::*;

fn assert_well_formed(bytes: &[u8]) {
    match load_bytes("fuzz.yaml", bytes) {
        Ok(spec) => assert_eq!(*spec.version, 1),
        Err(report) => {
            assert!(
                !report.diagnostics.is_empty(),
                "an error report names at least one problem"
            );
            let lines = report.source.lines().count().max(1) as u32;
            for diagnostic in &report.diagnostics {
                assert!(!diagnostic.message.is_empty());
                if let Some(span) = diagnostic.span {
                    assert!(
                        span.line >= 1 && span.line <= lines + 1,
                        "{span:?} outside {lines} lines"
                    );
                    assert!(span.column >= 1, "{span:?}");
                }
            }
            // Rendering must not panic either.
            let _ = report.render(lessnat::style::Style::Plain);
        }
    }
}

/// Tokens spec files are made of, so generated documents get past the parser often.
fn yaml_token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "version: 1\n",
        "nodes:\n",
        "services:\n",
        "  - ",
        "    ",
        "name: web-1\n",
        "name: web\n",
        "address: 192.0.2.10\n",
        "containerSubnet: 10.20.1.0/24\n",
        "loadBalancer: { id: 1, vips: [203.0.113.10] }\n",
        "node: web-1\n",
        "image: x:1\n",
        "network: routed\n",
        "network: host\n",
        "ports:\n",
        "- { name: http, port: 8000, tempPort: 18000 }\n",
        "replicas:\n",
        "- { node: web-1, address: 10.20.1.5 }\n",
        "health:\n",
        "http: { path: /h }\n",
        "tcp: {}\n",
        "interval: 1s\n",
        "upgrade:\n",
        "drainTimeout: 5m\n",
        "command: [\"{port}\", \"{port.x}\"]\n",
        "env: { A: \"{port\" }\n",
        "&a ",
        "*a\n",
        "<<: *a\n",
        "!!str ",
        "[",
        "]",
        "{",
        "}",
        ": ",
        "- ",
        "\"",
        "'",
        "#c\n",
        "\n",
        "\t",
        "~\n",
        "? ",
        "---\n",
        "...\n",
        "|\n",
        ">\n",
        "1e999\n",
        "-1\n",
        "99999999999999999999999999\n",
        "0x1F\n",
        ".nan\n",
        "yes\n",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        assert_well_formed(&bytes);
    }

    #[test]
    fn arbitrary_yaml_never_panics(tokens in prop::collection::vec(yaml_token(), 0..60)) {
        assert_well_formed(tokens.concat().as_bytes());
    }

    #[test]
    fn mutated_examples_never_panic(
        which in 0usize..3,
        at in any::<prop::sample::Index>(),
        cut in 0usize..12,
        insert in "[ -~\n]{0,12}",
    ) {
        let example = [
            include_str!("../examples/host.yaml"),
            include_str!("../examples/routed.yaml"),
            include_str!("../examples/udp.yaml"),
        ][which];
        let mut chars: Vec<char> = example.chars().collect();
        let start = at.index(chars.len());
        let end = (start + cut).min(chars.len());
        chars.splice(start..end, insert.chars());
        let mutated: String = chars.into_iter().collect();
        assert_well_formed(mutated.as_bytes());
    }
}

#[test]
fn deeply_nested_yaml_is_refused_not_a_crash() {
    let text = format!("version: {}1{}\n", "[".repeat(5000), "]".repeat(5000));
    assert_well_formed(text.as_bytes());
}

#[test]
fn alias_bombs_are_refused() {
    let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 {
            "a".to_string()
        } else {
            format!("b{}", i - 1)
        };
        text.push_str(&format!("b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    assert!(load_bytes("bomb.yaml", text.as_bytes()).is_err());
}
