//! Domains and address literals (RFC 5321 §4.1.2, §4.1.3).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::address::AddressError;

/// Longest domain name in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest label in octets (RFC 1035 §2.3.4).
pub const MAX_LABEL: usize = 63;

/// The part after `@`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Domain {
    /// ASCII letters are lowercased (domains compare case-insensitively);
    /// non-ASCII characters (SMTPUTF8 U-labels) are kept as given.
    Name(String),
    Literal(AddressLiteral),
}

/// The bracketed form: `[192.0.2.1]`, `[IPv6:2001:db8::1]`, `[tag:content]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddressLiteral {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    General { tag: String, content: String },
}

impl Domain {
    /// Parses a domain name or address literal. UTF-8 labels are accepted;
    /// check [`Domain::is_utf8`] where that matters.
    pub fn parse(s: &str) -> Result<Domain, AddressError> {
        parse_domain(s, true)
    }

    /// Parses an ASCII domain name or address literal (a host name in a
    /// config, say): the same rules, non-ASCII refused.
    pub fn parse_ascii(s: &str) -> Result<Domain, AddressError> {
        parse_domain(s, false)
    }

    pub fn is_utf8(&self) -> bool {
        matches!(self, Domain::Name(name) if !name.is_ascii())
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(name) => f.write_str(name),
            Domain::Literal(lit) => lit.fmt(f),
        }
    }
}

impl fmt::Display for AddressLiteral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressLiteral::V4(ip) => write!(f, "[{ip}]"),
            AddressLiteral::V6(ip) => write!(f, "[IPv6:{ip}]"),
            AddressLiteral::General { tag, content } => write!(f, "[{tag}:{content}]"),
        }
    }
}

/// Parses a domain; with `utf8` false any non-ASCII is refused as such.
///
/// U-labels are only checked for being non-ASCII text with LDH punctuation;
/// IDNA validity is left to DNS. Label and name limits count UTF-8 octets.
pub(crate) fn parse_domain(s: &str, utf8: bool) -> Result<Domain, AddressError> {
    if !utf8 && !s.is_ascii() {
        return Err(AddressError::NonAscii);
    }
    if s.is_empty() {
        return Err(AddressError::Syntax("empty domain"));
    }
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or(AddressError::Syntax("unterminated address literal"))?;
        return parse_literal(inner).map(Domain::Literal);
    }
    if s.len() > MAX_DOMAIN {
        return Err(AddressError::TooLong("domain too long"));
    }
    for label in s.split('.') {
        check_label(label)?;
    }
    Ok(Domain::Name(s.to_ascii_lowercase()))
}

fn check_label(label: &str) -> Result<(), AddressError> {
    if label.is_empty() {
        // also catches a trailing dot, which RFC 5321 does not allow
        return Err(AddressError::Syntax("empty domain label"));
    }
    if label.len() > MAX_LABEL {
        return Err(AddressError::TooLong("domain label too long"));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii();
    if !label.chars().all(ok_char) || label.starts_with('-') || label.ends_with('-') {
        return Err(AddressError::Syntax("invalid domain"));
    }
    Ok(())
}

fn parse_literal(inner: &str) -> Result<AddressLiteral, AddressError> {
    let Some((tag, content)) = inner.split_once(':') else {
        return inner
            .parse()
            .map(AddressLiteral::V4)
            .map_err(|_| AddressError::Syntax("invalid IPv4 address literal"));
    };
    if tag.eq_ignore_ascii_case("IPv6") {
        return content
            .parse()
            .map(AddressLiteral::V6)
            .map_err(|_| AddressError::Syntax("invalid IPv6 address literal"));
    }
    // Standardized-tag is an Ldh-str; dcontent is printable ASCII but [ \ ].
    let tag_ok = tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && tag
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    let content_ok =
        !content.is_empty() && content.bytes().all(|b| matches!(b, 33..=90 | 94..=126));
    if tag_ok && content_ok {
        Ok(AddressLiteral::General {
            tag: tag.to_string(),
            content: content.to_string(),
        })
    } else {
        Err(AddressError::Syntax("invalid address literal"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Result<Domain, AddressError> {
        Ok(Domain::Name(s.to_string()))
    }

    #[test]
    fn parse_domain_table() {
        let long_label = "a".repeat(64);
        let label63 = "a".repeat(63);
        let max_name = [label63.as_str(); 4].join("."); // 255 octets
        let long_name = [label63.as_str(); 3].join(".") + "." + &"b".repeat(62) + ".a"; // 256
        let cases: Vec<(&str, bool, Result<Domain, AddressError>)> = vec![
            ("example.org", false, name("example.org")),
            ("Example.ORG", false, name("example.org")),
            ("localhost", false, name("localhost")),
            ("a-b.c1", false, name("a-b.c1")),
            (
                "xn--bcher-kva.example",
                false,
                name("xn--bcher-kva.example"),
            ),
            ("Bücher.example", true, name("bücher.example")),
            ("bücher.example", false, Err(AddressError::NonAscii)),
            ("", false, Err(AddressError::Syntax("empty domain"))),
            (
                "example.org.",
                false,
                Err(AddressError::Syntax("empty domain label")),
            ),
            (
                ".example.org",
                false,
                Err(AddressError::Syntax("empty domain label")),
            ),
            (
                "a..b",
                false,
                Err(AddressError::Syntax("empty domain label")),
            ),
            ("-a.b", false, Err(AddressError::Syntax("invalid domain"))),
            ("a-.b", false, Err(AddressError::Syntax("invalid domain"))),
            ("a_b.c", false, Err(AddressError::Syntax("invalid domain"))),
            ("a b", false, Err(AddressError::Syntax("invalid domain"))),
            (
                &long_label,
                false,
                Err(AddressError::TooLong("domain label too long")),
            ),
            (&max_name, false, name(&max_name)),
            (
                &long_name,
                false,
                Err(AddressError::TooLong("domain too long")),
            ),
            (
                "[192.0.2.1]",
                false,
                Ok(Domain::Literal(AddressLiteral::V4(Ipv4Addr::new(
                    192, 0, 2, 1,
                )))),
            ),
            (
                "[IPv6:2001:db8::1]",
                false,
                Ok(Domain::Literal(AddressLiteral::V6(
                    "2001:db8::1".parse().unwrap(),
                ))),
            ),
            (
                "[ipv6:::ffff:192.0.2.1]",
                false,
                Ok(Domain::Literal(AddressLiteral::V6(
                    "::ffff:192.0.2.1".parse().unwrap(),
                ))),
            ),
            (
                "[x-tag:some.thing]",
                false,
                Ok(Domain::Literal(AddressLiteral::General {
                    tag: "x-tag".into(),
                    content: "some.thing".into(),
                })),
            ),
            (
                "[192.0.2.256]",
                false,
                Err(AddressError::Syntax("invalid IPv4 address literal")),
            ),
            (
                "[IPv6:zz]",
                false,
                Err(AddressError::Syntax("invalid IPv6 address literal")),
            ),
            (
                "[192.0.2.1",
                false,
                Err(AddressError::Syntax("unterminated address literal")),
            ),
            (
                "[tag:]",
                false,
                Err(AddressError::Syntax("invalid address literal")),
            ),
            (
                "[tag:a]b]",
                false,
                Err(AddressError::Syntax("invalid address literal")),
            ),
            (
                "[:x]",
                false,
                Err(AddressError::Syntax("invalid address literal")),
            ),
        ];
        for (input, utf8, want) in cases {
            assert_eq!(parse_domain(input, utf8), want, "{input}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "example.org",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "[x:y]",
            "bücher.de",
        ] {
            let d = Domain::parse(s).unwrap();
            assert_eq!(d.to_string(), s);
            assert_eq!(Domain::parse(&d.to_string()).unwrap(), d);
        }
    }
}
