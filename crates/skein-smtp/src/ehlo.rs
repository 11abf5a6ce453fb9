//! What a server offers: the extensions listed in its EHLO reply.

use crate::reply::Reply;

/// The EHLO keywords and their parameters, keywords uppercased.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    entries: Vec<(String, Vec<String>)>,
}

impl Extensions {
    /// Reads the lines after the first (which is the greeting). Lines that
    /// are not `keyword *(SP param)` are skipped rather than failing the
    /// whole session. The obsolete `AUTH=PLAIN LOGIN` form counts as AUTH.
    pub fn from_ehlo(reply: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(first) = words.next() else { continue };
            let (keyword, inline) = match first.split_once('=') {
                Some((k, v)) => (k, Some(v).filter(|v| !v.is_empty())),
                None => (first, None),
            };
            let valid = keyword
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
                && keyword
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !valid {
                continue;
            }
            let keyword = keyword.to_ascii_uppercase();
            let params = inline.into_iter().chain(words).map(str::to_string);
            match ext.entries.iter_mut().find(|(k, _)| *k == keyword) {
                Some((_, existing)) => existing.extend(params),
                None => ext.entries.push((keyword, params.collect())),
            }
        }
        ext
    }

    /// Case-insensitive.
    pub fn has(&self, keyword: &str) -> bool {
        self.params(keyword).is_some()
    }

    /// The parameters after a keyword, `None` if it is not offered.
    pub fn params(&self, keyword: &str) -> Option<&[String]> {
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(keyword))
            .map(|(_, p)| p.as_slice())
    }

    /// The advertised size limit. `None` also when SIZE has no number or 0,
    /// both of which mean "no fixed limit" (RFC 1870 §4).
    pub fn size(&self) -> Option<u64> {
        let limit = self.params("SIZE")?.first()?.parse().ok()?;
        (limit > 0).then_some(limit)
    }

    pub fn pipelining(&self) -> bool {
        self.has("PIPELINING")
    }

    pub fn starttls(&self) -> bool {
        self.has("STARTTLS")
    }

    pub fn eight_bit_mime(&self) -> bool {
        self.has("8BITMIME")
    }

    pub fn binary_mime(&self) -> bool {
        self.has("BINARYMIME")
    }

    pub fn smtputf8(&self) -> bool {
        self.has("SMTPUTF8")
    }

    pub fn enhanced_status_codes(&self) -> bool {
        self.has("ENHANCEDSTATUSCODES")
    }

    pub fn chunking(&self) -> bool {
        self.has("CHUNKING")
    }

    pub fn dsn(&self) -> bool {
        self.has("DSN")
    }

    /// Offered SASL mechanisms, uppercased, without duplicates.
    pub fn auth_mechanisms(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in self.params("AUTH").unwrap_or_default() {
            let m = m.to_ascii_uppercase();
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }

    /// All offered keywords, uppercased, in the server's order.
    pub fn keywords(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }
}
