//! Finding command lines in a receive buffer.
//!
//! The server reads bytes into a buffer and asks for the next line; a line
//! that has not fully arrived is [`Line::Incomplete`], a normal answer.

use memchr::memchr;

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;

/// Longest text line, CRLF included (RFC 5321 §4.5.3.1.6).
pub const MAX_TEXT_LINE: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEnding {
    CrLf,
    BareLf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line: `buf[..len]` is its content, `buf[..consumed]` includes
    /// the ending. `bare_cr` / `nul` report a CR or NUL inside the content,
    /// which a strict server may refuse (a CR not followed by LF is a classic
    /// smuggling ingredient).
    Complete {
        len: usize,
        consumed: usize,
        ending: LineEnding,
        bare_cr: bool,
        nul: bool,
    },
    Incomplete,
    /// No LF within `max` bytes. Discard through the next LF (see
    /// [`discard_line`]) and answer with an error.
    TooLong,
}

/// Finds the first line in `buf`. A line ends at LF; whether a CR preceded it
/// is reported. Lines whose length with ending exceeds `max` are `TooLong`.
pub fn next_line(buf: &[u8], max: usize) -> Line {
    let window = &buf[..buf.len().min(max)];
    let Some(lf) = memchr(b'\n', window) else {
        return if buf.len() >= max {
            Line::TooLong
        } else {
            Line::Incomplete
        };
    };
    let crlf = lf > 0 && buf[lf - 1] == b'\r';
    let len = if crlf { lf - 1 } else { lf };
    let content = &buf[..len];
    Line::Complete {
        len,
        consumed: lf + 1,
        ending: if crlf {
            LineEnding::CrLf
        } else {
            LineEnding::BareLf
        },
        bare_cr: memchr(b'\r', content).is_some(),
        nul: memchr(0, content).is_some(),
    }
}

/// How many bytes to drop to skip past the rest of an overlong line: through
/// the next LF, or `None` when no LF has arrived yet (drop everything, keep
/// discarding).
pub fn discard_line(buf: &[u8]) -> Option<usize> {
    memchr(b'\n', buf).map(|lf| lf + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(len: usize, consumed: usize, ending: LineEnding) -> Line {
        Line::Complete {
            len,
            consumed,
            ending,
            bare_cr: false,
            nul: false,
        }
    }

    #[test]
    fn next_line_table() {
        use LineEnding::*;
        let cases: &[(&[u8], usize, Line)] = &[
            (b"", 10, Line::Incomplete),
            (b"NOOP", 10, Line::Incomplete),
            (b"NOOP\r", 10, Line::Incomplete),
            (b"NOOP\r\n", 10, complete(4, 6, CrLf)),
            (b"NOOP\nQUIT\r\n", 10, complete(4, 5, BareLf)),
            (b"\r\n", 10, complete(0, 2, CrLf)),
            (b"\n", 10, complete(0, 1, BareLf)),
            // exactly at the limit, ending included
            (b"12345678\r\n", 10, complete(8, 10, CrLf)),
            (b"123456789\r\n", 10, Line::TooLong),
            (b"1234567890", 10, Line::TooLong),
            (b"123456789", 10, Line::Incomplete),
            (
                b"a\rb\r\n",
                10,
                Line::Complete {
                    len: 3,
                    consumed: 5,
                    ending: CrLf,
                    bare_cr: true,
                    nul: false,
                },
            ),
            (
                b"a\0b\n",
                10,
                Line::Complete {
                    len: 3,
                    consumed: 4,
                    ending: BareLf,
                    bare_cr: false,
                    nul: true,
                },
            ),
        ];
        for (buf, max, want) in cases {
            assert_eq!(
                next_line(buf, *max),
                *want,
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    #[test]
    fn discard_line_finds_next_lf() {
        assert_eq!(discard_line(b"xxxx"), None);
        assert_eq!(discard_line(b"xx\r\nQUIT\r\n"), Some(4));
    }
}
