//! xtext (RFC 3461 §4): how ENVID, ORCPT and AUTH= carry arbitrary text in
//! a parameter value.
//!
//! What a sender writes here travels far: into the delivery status
//! notifications Skein writes, into the logs, onto the wire to the next hop.
//! So decoding is strict: a `+XX` escape must stand for printable US-ASCII
//! (space through `~`); `+0D`, `+0A`, `+00`, DEL and 8-bit octets are
//! refused, never passed on.

/// Decodes xtext, or `None` when it is malformed or decodes to anything but
/// printable text. Raw non-ASCII is passed through (it can only reach here
/// when SMTPUTF8 allowed it), but never a control character.
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
                let b = u8::from_str_radix(hex, 16).ok()?;
                if !(b' '..=b'~').contains(&b) {
                    return None;
                }
                out.push(b);
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
    let text = String::from_utf8(out).ok()?;
    if text.chars().any(char::is_control) {
        return None;
    }
    Some(text)
}

/// Appends the xtext form of `s`: `+`, `=`, and ASCII outside the printable
/// range become `+XX`. Non-ASCII characters stay as they are (RFC 6533
/// allows them under SMTPUTF8, the only way they can have come in).
pub fn xtext_encode(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '+' | '=' => push_hex(c as u8, out),
            '!'..='~' => out.push(c),
            c if c.is_ascii() => push_hex(c as u8, out),
            c if c.is_control() => {
                let mut buf = [0; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    push_hex(b, out);
                }
            }
            c => out.push(c),
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
            ("ü", Some("ü")), // raw UTF-8, allowed by SMTPUTF8
            ("+C3+BC", None), // escapes stand for printable ASCII only
            ("+C3", None),
            ("a+0Db", None), // CR
            ("a+0Ab", None), // LF
            ("a+00b", None), // NUL
            ("a+09b", None), // TAB
            ("a+7Fb", None), // DEL
            ("a+20b", Some("a b")),
            ("a\u{85}b", None), // a C1 control, raw
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
            ("ü", "ü"),
        ];
        for (input, want) in cases {
            let mut out = String::new();
            xtext_encode(input, &mut out);
            assert_eq!(out, want, "{input}");
            assert_eq!(xtext_decode(&out).as_deref(), Some(input));
        }
    }
}
