//! The client side of DATA: dot-stuffing a body for the wire.

use memchr::memmem;

/// Appends `body` with a dot added to every line that starts with one, makes
/// sure a non-empty body ends with CRLF, then appends the end marker ".\r\n".
///
/// Lines are CRLF lines, exactly as [`crate::DataReader`] sees them, so the
/// reader gives `body` back (plus the added CRLF). A receiver that also
/// treats a bare LF as a line end would see a different message — and might
/// end the data early on `\n.\r\n`. Bodies with bare CR or LF should go
/// through [`normalize_line_endings`] before leaving for another host.
pub fn dot_stuff(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + body.len() / 64 + 5);
    let mut start = 0;
    if body.first() == Some(&b'.') {
        out.push(b'.');
    }
    for crlf in memmem::find_iter(body, b"\r\n") {
        let next = crlf + 2;
        out.extend_from_slice(&body[start..next]);
        if body.get(next) == Some(&b'.') {
            out.push(b'.');
        }
        start = next;
    }
    out.extend_from_slice(&body[start..]);
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// Appends `body` with every bare LF and bare CR turned into CRLF, so that
/// every receiver agrees on where lines (and the data) end.
pub fn normalize_line_endings(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len());
    let mut start = 0;
    let mut i = 0;
    while let Some(k) = memchr::memchr2(b'\r', b'\n', &body[i..]) {
        let at = i + k;
        out.extend_from_slice(&body[start..at]);
        out.extend_from_slice(b"\r\n");
        // a CRLF pair is one line ending, not two
        i = if body[at] == b'\r' && body.get(at + 1) == Some(&b'\n') {
            at + 2
        } else {
            at + 1
        };
        start = i;
    }
    out.extend_from_slice(&body[start..]);
}

/// True when `body` holds a CR or LF that is not part of a CRLF pair.
pub fn has_bare_line_endings(body: &[u8]) -> bool {
    let mut i = 0;
    while let Some(k) = memchr::memchr2(b'\r', b'\n', &body[i..]) {
        let at = i + k;
        if body[at] == b'\n' || body.get(at + 1) != Some(&b'\n') {
            return true;
        }
        i = at + 2;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuff_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b".a\r\n.\r\n..\r\n", b"..a\r\n..\r\n...\r\n.\r\n"),
            (b"a.\r\nb . c\r\n", b"a.\r\nb . c\r\n.\r\n"),
            // bare LF does not start a line for stuffing purposes
            (b"a\n.b\r\n", b"a\n.b\r\n.\r\n"),
            (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
        ];
        for (body, want) in cases {
            let mut out = Vec::new();
            dot_stuff(body, &mut out);
            assert_eq!(out, *want, "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn normalize_table() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"", b"", false),
            (b"a\r\nb\r\n", b"a\r\nb\r\n", false),
            (b"a\nb", b"a\r\nb", true),
            (b"a\rb", b"a\r\nb", true),
            (b"a\r\r\n", b"a\r\n\r\n", true),
            (b"\n.\n", b"\r\n.\r\n", true),
            (b"a\r", b"a\r\n", true),
        ];
        for (body, want, bare) in cases {
            let mut out = Vec::new();
            normalize_line_endings(body, &mut out);
            assert_eq!(out, *want, "{:?}", String::from_utf8_lossy(body));
            assert_eq!(
                has_bare_line_endings(body),
                *bare,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
