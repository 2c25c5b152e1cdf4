//! The little HTTP/1.x the test server understands: reading and parsing a
//! request head, and the query string of its target.

use std::fmt;
use std::io::{self, BufRead, Read};

/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The target's path, without the query.
    pub path: String,
    /// The target's query, as `key=value` pairs in order (not percent-decoded).
    pub query: Vec<(String, String)>,
    /// Minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Bytes of request body announced by `Content-Length`.
    pub content_length: u64,
    /// Whether the body uses chunked transfer coding (not supported).
    pub chunked: bool,
    /// Tokens of the `Connection` header, lower-cased.
    connection: Vec<String>,
}

impl Request {
    /// Whether the client wants the connection kept open after the response.
    pub fn keep_alive(&self) -> bool {
        let has = |token: &str| self.connection.iter().any(|t| t == token);
        if self.minor >= 1 {
            !has("close")
        } else {
            has("keep-alive")
        }
    }

    /// The value of query parameter `key`, if present.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request head was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The request line is not `METHOD TARGET HTTP/1.x`.
    RequestLine(String),
    /// The HTTP version is not 1.0 or 1.1.
    Version(String),
    /// A header line has no `name:` part.
    Header(String),
    /// `Content-Length` is not a number, or appears twice with different values.
    ContentLength(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::RequestLine(l) => write!(f, "bad request line {l:?}"),
            ParseError::Version(v) => write!(f, "unsupported HTTP version {v:?}"),
            ParseError::Header(h) => write!(f, "bad header line {h:?}"),
            ParseError::ContentLength(v) => write!(f, "bad Content-Length {v:?}"),
        }
    }
}

/// Reads one request head, up to and including the empty line that ends it.
/// Returns `None` on a clean end of stream before the first byte (the client
/// closed an idle keep-alive connection). Empty lines before the request line
/// are skipped, as RFC 9112 asks.
pub fn read_head(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let too_long = || io::Error::new(io::ErrorKind::InvalidData, "request head too long");
    let mut head = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        // At least 1, since `head` never holds more than MAX_HEAD bytes here.
        let limit = MAX_HEAD + 1 - head.len();
        let n = Read::take(&mut *reader, limit as u64).read_until(b'\n', &mut line)?;
        if n == 0 && head.is_empty() {
            return Ok(None);
        }
        if !line.ends_with(b"\n") {
            return Err(if n == limit {
                too_long()
            } else {
                io::ErrorKind::UnexpectedEof.into()
            });
        }
        let blank = line == b"\r\n" || line == b"\n";
        if blank && head.is_empty() {
            continue;
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(too_long());
        }
        if blank {
            return String::from_utf8(head).map(Some).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "request head is not UTF-8")
            });
        }
    }
}

/// Parses a request head as read by [`read_head`].
pub fn parse_request(head: &str) -> Result<Request, ParseError> {
    let mut lines = head.lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::RequestLine(request_line.to_string()));
    };
    if method.is_empty() || !target.starts_with('/') {
        return Err(ParseError::RequestLine(request_line.to_string()));
    }
    let minor = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        other => return Err(ParseError::Version(other.to_string())),
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, parse_query(query)),
        None => (target, Vec::new()),
    };
    let mut request = Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
        minor,
        content_length: 0,
        chunked: false,
        connection: Vec::new(),
    };
    let mut content_length = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ParseError::Header(line.to_string()));
        };
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(ParseError::Header(line.to_string()));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            request
                .connection
                .extend(value.split(',').map(|t| t.trim().to_ascii_lowercase()));
        } else if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| ParseError::ContentLength(value.to_string()))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(ParseError::ContentLength(value.to_string()));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            request.chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    request.content_length = content_length.unwrap_or(0);
    Ok(request)
}

/// Splits a query string into `key=value` pairs; a key without `=` gets an empty value.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor};

    fn parse(head: &str) -> Request {
        parse_request(head).unwrap()
    }

    #[test]
    fn parses_a_simple_get() {
        let r = parse("GET /hold?ms=250&x HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/hold");
        assert_eq!(r.param("ms"), Some("250"));
        assert_eq!(r.param("x"), Some(""));
        assert_eq!(r.param("y"), None);
        assert_eq!(r.minor, 1);
        assert_eq!(r.content_length, 0);
        assert!(r.keep_alive());
    }

    #[test]
    fn keep_alive_follows_version_and_connection_header() {
        assert!(!parse("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive());
        assert!(!parse("GET / HTTP/1.1\r\nconnection: Upgrade, close\r\n\r\n").keep_alive());
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
        assert!(parse("GET / HTTP/1.1\n\n").keep_alive());
    }

    #[test]
    fn reads_body_framing_headers() {
        let r = parse("POST / HTTP/1.1\r\nContent-Length: 12\r\ncontent-length: 12\r\n\r\n");
        assert_eq!(r.content_length, 12);
        assert!(parse("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").chunked);
        assert_eq!(
            parse_request("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(ParseError::ContentLength("2".into()))
        );
        assert_eq!(
            parse_request("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(ParseError::ContentLength("-1".into()))
        );
    }

    #[test]
    fn rejects_malformed_heads() {
        for head in [
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET x HTTP/1.1\r\n\r\n",
            "\r\n",
        ] {
            assert!(
                matches!(parse_request(head), Err(ParseError::RequestLine(_))),
                "{head:?}"
            );
        }
        assert_eq!(
            parse_request("GET / HTTP/2.0\r\n\r\n"),
            Err(ParseError::Version("HTTP/2.0".into()))
        );
        assert!(matches!(
            parse_request("GET / HTTP/1.1\r\nno colon\r\n\r\n"),
            Err(ParseError::Header(_))
        ));
        assert!(matches!(
            parse_request("GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
            Err(ParseError::Header(_))
        ));
    }

    #[test]
    fn reads_pipelined_heads_one_at_a_time() {
        let input = "\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let mut reader = BufReader::new(Cursor::new(input));
        let first = read_head(&mut reader).unwrap().unwrap();
        assert_eq!(first, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        let second = read_head(&mut reader).unwrap().unwrap();
        assert_eq!(parse(&second).path, "/b");
        assert_eq!(read_head(&mut reader).unwrap(), None);
    }

    #[test]
    fn head_reading_fails_on_truncation_and_size() {
        let mut truncated = BufReader::new(Cursor::new("GET / HTTP/1.1\r\nHost"));
        assert_eq!(
            read_head(&mut truncated).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let mut reader = BufReader::new(Cursor::new(huge));
        assert_eq!(
            read_head(&mut reader).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn query_pairs_keep_order() {
        assert_eq!(
            parse_query("chunks=3&ms=10&&flag"),
            vec![
                ("chunks".to_string(), "3".to_string()),
                ("ms".to_string(), "10".to_string()),
                ("flag".to_string(), String::new()),
            ]
        );
    }
}
