//! Mailboxes: `local-part@domain` (RFC 5321 §4.1.2, RFC 6531 §3.3).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::{parse_domain, Domain};

/// Longest local part in octets (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;

/// Why an address does not parse. The reasons are short and safe to show peers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{0}")]
    Syntax(&'static str),
    #[error("{0}")]
    TooLong(&'static str),
    /// Non-ASCII where SMTPUTF8 was not negotiated.
    #[error("non-ASCII address requires SMTPUTF8")]
    NonAscii,
}

impl AddressError {
    pub fn reason(&self) -> &'static str {
        match self {
            AddressError::Syntax(r) | AddressError::TooLong(r) => r,
            AddressError::NonAscii => "non-ASCII address requires SMTPUTF8",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mailbox {
    /// As written, including the quotes of a quoted local part.
    pub local: String,
    pub domain: Domain,
}

impl Mailbox {
    /// Parses `local@domain` (no angle brackets). UTF-8 is accepted; check
    /// [`Mailbox::is_utf8`] where that matters.
    pub fn parse(s: &str) -> Result<Mailbox, AddressError> {
        parse_mailbox(s, true)
    }

    /// The domain as written in an address: `example.org` or `[192.0.2.1]`.
    pub fn domain_str(&self) -> String {
        self.domain.to_string()
    }

    /// True when delivering this address needs SMTPUTF8.
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || self.domain.is_utf8()
    }

    /// The local part with quoting removed: `"a b"` gives `a b`.
    pub fn local_unquoted(&self) -> String {
        let Some(inner) = self
            .local
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
        else {
            return self.local.clone();
        };
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        out
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

pub(crate) fn parse_mailbox(s: &str, utf8: bool) -> Result<Mailbox, AddressError> {
    if !utf8 && !s.is_ascii() {
        return Err(AddressError::NonAscii);
    }
    let at = if s.starts_with('"') {
        quoted_end(s)?
    } else {
        let at = s.find('@').ok_or(AddressError::Syntax("missing @domain"))?;
        check_dot_string(&s[..at])?;
        at
    };
    if s.as_bytes().get(at) != Some(&b'@') {
        return Err(AddressError::Syntax("missing @domain"));
    }
    let local = &s[..at];
    if local.len() > MAX_LOCAL_PART {
        return Err(AddressError::TooLong("local part too long"));
    }
    let domain = parse_domain(&s[at + 1..], utf8)?;
    Ok(Mailbox {
        local: local.to_string(),
        domain,
    })
}

/// Dot-string: atoms of atext (plus UTF-8 under RFC 6531) joined by single dots.
fn check_dot_string(local: &str) -> Result<(), AddressError> {
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let ok = local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(|c| atext(c) || !c.is_ascii()));
    if ok {
        Ok(())
    } else {
        Err(AddressError::Syntax("invalid local part"))
    }
}

/// Index just past the closing quote of the quoted string at the start of `s`.
fn quoted_end(s: &str) -> Result<usize, AddressError> {
    const BAD: AddressError = AddressError::Syntax("invalid quoted local part");
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok(i + 1),
            // quoted-pairSMTP: a backslash escapes any printable ASCII
            '\\' => match chars.next() {
                Some((_, ' '..='~')) => {}
                _ => return Err(BAD),
            },
            // qtextSMTP, widened to UTF-8 by RFC 6531
            ' '..='~' => {}
            c if !c.is_ascii() => {}
            _ => return Err(BAD),
        }
    }
    Err(BAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mailbox_table() {
        let long_local = format!("{}@x.org", "a".repeat(65));
        let max_local = format!("{}@x.org", "a".repeat(64));
        type Want<'a> = Result<(&'a str, &'a str), AddressError>;
        let cases: Vec<(&str, Want)> = vec![
            ("user@example.org", Ok(("user", "example.org"))),
            ("First.Last@Example.ORG", Ok(("First.Last", "example.org"))),
            ("a+tag@x.org", Ok(("a+tag", "x.org"))),
            (
                "!#$%&'*+-/=?^_`{|}~@x.org",
                Ok(("!#$%&'*+-/=?^_`{|}~", "x.org")),
            ),
            ("\"a@b\"@x.org", Ok(("\"a@b\"", "x.org"))),
            ("\"a b\\\"c\"@x.org", Ok(("\"a b\\\"c\"", "x.org"))),
            ("\"\"@x.org", Ok(("\"\"", "x.org"))),
            ("user@[192.0.2.1]", Ok(("user", "[192.0.2.1]"))),
            (&max_local, Ok((&max_local[..64], "x.org"))),
            (
                &long_local,
                Err(AddressError::TooLong("local part too long")),
            ),
            ("user", Err(AddressError::Syntax("missing @domain"))),
            ("user@", Err(AddressError::Syntax("empty domain"))),
            ("@x.org", Err(AddressError::Syntax("invalid local part"))),
            (".a@x.org", Err(AddressError::Syntax("invalid local part"))),
            ("a.@x.org", Err(AddressError::Syntax("invalid local part"))),
            (
                "a..b@x.org",
                Err(AddressError::Syntax("invalid local part")),
            ),
            ("a b@x.org", Err(AddressError::Syntax("invalid local part"))),
            ("a@b@x.org", Err(AddressError::Syntax("invalid domain"))),
            (
                "\"a@x.org",
                Err(AddressError::Syntax("invalid quoted local part")),
            ),
            ("\"a\"b@x.org", Err(AddressError::Syntax("missing @domain"))),
            (
                "\"a\tb\"@x.org",
                Err(AddressError::Syntax("invalid quoted local part")),
            ),
            ("üser@x.org", Ok(("üser", "x.org"))),
        ];
        for (input, want) in cases {
            let got = Mailbox::parse(input);
            let got = got.as_ref().map(|m| (m.local.as_str(), m.domain_str()));
            let want = want.as_ref().map(|(l, d)| (*l, d.to_string()));
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn non_ascii_needs_utf8() {
        assert_eq!(
            parse_mailbox("üser@x.org", false),
            Err(AddressError::NonAscii)
        );
        assert_eq!(
            parse_mailbox("user@bücher.de", false),
            Err(AddressError::NonAscii)
        );
        assert!(parse_mailbox("user@bücher.de", true).unwrap().is_utf8());
        assert!(!parse_mailbox("user@x.de", true).unwrap().is_utf8());
    }

    #[test]
    fn local_unquoted_table() {
        let cases = [
            ("user@x.org", "user"),
            ("\"a b\"@x.org", "a b"),
            ("\"a\\\"b\\\\c\"@x.org", "a\"b\\c"),
            ("\"a@b\"@x.org", "a@b"),
        ];
        for (input, want) in cases {
            assert_eq!(
                Mailbox::parse(input).unwrap().local_unquoted(),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["user@example.org", "\"a b\"@[IPv6:::1]", "ü@bücher.de"] {
            let m = Mailbox::parse(s).unwrap();
            assert_eq!(m.to_string(), s);
            assert_eq!(Mailbox::parse(&m.to_string()).unwrap(), m);
        }
    }
}
