//! Reverse- and forward-paths: the `<...>` of MAIL FROM and RCPT TO.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::address::{parse_mailbox, AddressError, Mailbox};
use crate::domain::parse_domain;

/// Longest path in octets, brackets included (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// The MAIL FROM path. `Null` is `<>`, used by bounces.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReversePath {
    Null,
    Mailbox(Mailbox),
}

/// The RCPT TO path. `<Postmaster>` without a domain is special (RFC 5321 §4.5.1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ForwardPath {
    Postmaster,
    Mailbox(Mailbox),
}

impl ReversePath {
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ReversePath::Null => None,
            ReversePath::Mailbox(m) => Some(m),
        }
    }
}

impl ForwardPath {
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ForwardPath::Postmaster => None,
            ForwardPath::Mailbox(m) => Some(m),
        }
    }
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => m.fmt(f),
        }
    }
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("Postmaster"),
            ForwardPath::Mailbox(m) => m.fmt(f),
        }
    }
}

/// Length of the `<...>` path at the start of `s`, brackets included, or
/// `None` if unterminated. A `>` inside a quoted local part or an address
/// literal (general literals may hold `>` and `"`) does not end it.
pub(crate) fn path_end(s: &str) -> Option<usize> {
    #[derive(PartialEq)]
    enum In {
        Plain,
        Quoted,
        Literal,
    }
    let bytes = s.as_bytes();
    let mut state = In::Plain;
    let mut i = 1;
    while i < bytes.len() {
        match (&state, bytes[i]) {
            (In::Plain, b'>') => return Some(i + 1),
            (In::Plain, b'"') => state = In::Quoted,
            (In::Plain, b'[') => state = In::Literal,
            (In::Quoted, b'\\') => i += 1,
            (In::Quoted, b'"') | (In::Literal, b']') => state = In::Plain,
            _ => {}
        }
        i += 1;
    }
    None
}

/// Parses the text between `<` and `>`; `None` is the null path `<>`.
/// A source route (`@a,@b:`) is checked and dropped, as RFC 5321 §4.1.2 and
/// appendix C ask.
pub(crate) fn parse_path_inner(inner: &str, utf8: bool) -> Result<Option<Mailbox>, AddressError> {
    if inner.len() + 2 > MAX_PATH {
        return Err(AddressError::TooLong("path too long"));
    }
    if inner.is_empty() {
        return Ok(None);
    }
    let mailbox = if inner.starts_with('@') {
        strip_route(inner, utf8)?
    } else {
        inner
    };
    parse_mailbox(mailbox, utf8).map(Some)
}

/// Returns what follows the source route's colon.
fn strip_route(mut s: &str, utf8: bool) -> Result<&str, AddressError> {
    const BAD: AddressError = AddressError::Syntax("invalid source route");
    loop {
        s = s.strip_prefix('@').ok_or(BAD)?;
        // An address literal may itself contain ':' (IPv6), so skip past it.
        let from = if s.starts_with('[') {
            s.find(']').ok_or(BAD)?
        } else {
            0
        };
        let end = s[from..].find([',', ':']).ok_or(BAD)? + from;
        match parse_domain(&s[..end], utf8) {
            Ok(_) => {}
            Err(AddressError::NonAscii) => return Err(AddressError::NonAscii),
            Err(_) => return Err(BAD),
        }
        let sep = s.as_bytes()[end];
        s = &s[end + 1..];
        if sep == b':' {
            return Ok(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_end_table() {
        let cases: &[(&str, Option<usize>)] = &[
            ("<>", Some(2)),
            ("<a@b> SIZE=1", Some(5)),
            ("<\"a>b\"@c> X", Some(9)),
            ("<\"a\\\">b\"@c>", Some(11)),
            ("<a@b", None),
            ("<\"a>", None),
            ("<a@[x:a>\"b]> X", Some(12)),
            ("<a@[x:a>b>", None),
        ];
        for (s, want) in cases {
            assert_eq!(path_end(s), *want, "{s}");
        }
    }

    #[test]
    fn routes_are_dropped() {
        let cases = [
            ("@a.org:u@b.org", "u@b.org"),
            ("@a.org,@c.org:u@b.org", "u@b.org"),
            ("@[IPv6:::1],@[192.0.2.1]:u@b.org", "u@b.org"),
        ];
        for (inner, want) in cases {
            let got = parse_path_inner(inner, false).unwrap().unwrap();
            assert_eq!(got.to_string(), want, "{inner}");
        }
    }

    #[test]
    fn bad_routes() {
        let bad = AddressError::Syntax("invalid source route");
        for inner in [
            "@a.org",
            "@a.org;u@b",
            "@:u@b.org",
            "@a..b:u@b.org",
            "@a.org,b.org:u@b.org",
            "@[::1:u@b",
        ] {
            assert_eq!(parse_path_inner(inner, false), Err(bad.clone()), "{inner}");
        }
    }
}
