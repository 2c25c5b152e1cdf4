//! Credentials out of what lessnat writes: in any text, a URL's user
//! information loses its secret — `https://user:TOKEN@host/` becomes
//! `https://user:***@host/`, and `https://TOKEN@host/` (a token as the user
//! name) becomes `https://***@host/`. Used where lessnat records text it
//! did not write itself, such as its own command line in the lock file.

/// `text` with the secrets of every URL in it replaced by `***`.
pub fn url_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        out.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        let authority_end = rest
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let user_info = &authority[..at];
                match user_info.split_once(':') {
                    Some((user, _secret)) => out.push_str(&format!("{user}:***")),
                    None => out.push_str("***"),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_urls_are_masked() {
        assert_eq!(
            url_credentials(
                "lessnat reconcile --repo https://deploy:S3CRET@git.example/ops.git --ref main"
            ),
            "lessnat reconcile --repo https://deploy:***@git.example/ops.git --ref main"
        );
        assert_eq!(
            url_credentials("https://ghp_TOKEN@github.example/x ssh://git@host:22/r"),
            "https://***@github.example/x ssh://***@host:22/r"
        );
        assert_eq!(url_credentials("https://u:p:q@h"), "https://u:***@h");
    }

    #[test]
    fn text_without_credentials_is_unchanged() {
        for text in [
            "lessnat apply -f spec.yaml",
            "https://git.example/ops.git",
            "file:///srv/repo",
            "mail me@example.org",
            "",
        ] {
            assert_eq!(url_credentials(text), text);
        }
    }
}
