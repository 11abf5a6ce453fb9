//! xtext (RFC 3461 §4): how ENVID, ORCPT and AUTH= carry arbitrary text in
//! a parameter value.

/// Decodes xtext. `+XX` hex escapes must decode to valid UTF-8. Raw non-ASCII
/// is passed through: it can only reach here when SMTPUTF8 allowed it.
pub fn xtext_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'=' => return None,
            b @ (33..=126 | 128..) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Appends the xtext form of `s`: `+`, `=`, and anything outside printable
/// ASCII become `+XX`.
pub fn xtext_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        match b {
            b'+' | b'=' => push_hex(b, out),
            33..=126 => out.push(b as char),
            _ => push_hex(b, out),
        }
    }
}

fn push_hex(b: u8, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('+');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 15)] as char);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("abc", Some("abc")),
            ("a+2Bb", Some("a+b")),
            ("a+3Db", Some("a=b")),
            ("+2b", Some("+")),
            ("rfc822;u+40x.org", Some("rfc822;u@x.org")),
            ("+C3+BC", Some("ü")),
            ("+C3", None), // not UTF-8
            ("a+2", None),
            ("a+ZZ", None),
            ("a=b", None),
            ("", Some("")),
        ];
        for (input, want) in cases {
            assert_eq!(xtext_decode(input).as_deref(), *want, "{input}");
        }
    }

    #[test]
    fn encode_table() {
        let cases = [
            ("abc", "abc"),
            ("a+b=c", "a+2Bb+3Dc"),
            ("a b", "a+20b"),
            ("ü", "+C3+BC"),
        ];
        for (input, want) in cases {
            let mut out = String::new();
            xtext_encode(input, &mut out);
            assert_eq!(out, want, "{input}");
            assert_eq!(xtext_decode(&out).as_deref(), Some(input));
        }
    }
}
