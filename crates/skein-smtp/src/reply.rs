//! Replies: the typed [`Reply`] a server sends and a client parses.
//!
//! One type serves both directions so the server never writes reply strings
//! by hand and the client reads exactly what a server could have written.

use std::fmt;

use memchr::memchr;

/// Longest reply line accepted, line ending included. RFC 5321 §4.5.3.1.5
/// says 512, but real servers exceed it with long banners and EHLO lists;
/// this stays liberal while still bounding what a client buffers.
pub const MAX_REPLY_LINE: usize = 4096;

/// Most lines one reply may have. Without a bound a hostile server could send
/// `250-` lines forever and the client would buffer them all.
pub const MAX_REPLY_LINES: usize = 128;

/// An RFC 3463 enhanced status code such as `4.3.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        EnhancedCode {
            class,
            subject,
            detail,
        }
    }

    /// Parses `class.subject.detail`: class 2, 4 or 5, subject and detail of
    /// one to three digits (RFC 3463 §2).
    pub fn parse(s: &str) -> Option<EnhancedCode> {
        let mut parts = s.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !matches!(class, "2" | "4" | "5") {
            return None;
        }
        let number = |p: &str| {
            if (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse::<u16>().ok()
            } else {
                None
            }
        };
        Some(EnhancedCode::new(
            class.as_bytes()[0] - b'0',
            number(subject)?,
            number(detail)?,
        ))
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// What the first digit of a reply code says (RFC 5321 §4.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplyClass {
    PositivePreliminary,
    PositiveCompletion,
    PositiveIntermediate,
    TransientNegative,
    PermanentNegative,
}

/// One SMTP reply, possibly multi-line. `lines` hold the text only: no code,
/// no separator, no enhanced code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, enhanced: Option<EnhancedCode>, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced,
            lines: vec![text.into()],
        }
    }

    pub fn with_lines(code: u16, enhanced: Option<EnhancedCode>, lines: Vec<String>) -> Reply {
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    /// Appends the wire form. Every line carries the enhanced code (RFC 2034
    /// §4 asks for it on each line). CR and LF inside the text are replaced by
    /// spaces: text may quote peer input, and a stray line break would let it
    /// forge a second reply.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let code = self.code.to_string();
        let count = self.lines.len().max(1);
        for i in 0..count {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            out.extend_from_slice(code.as_bytes());
            out.push(if i + 1 < count { b'-' } else { b' ' });
            if let Some(e) = self.enhanced {
                out.extend_from_slice(e.to_string().as_bytes());
                if !text.is_empty() {
                    out.push(b' ');
                }
            }
            out.extend(
                text.bytes()
                    .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Codes outside 1xx–4xx count as permanent: a reply we cannot classify
    /// must not be retried forever.
    pub fn class(&self) -> ReplyClass {
        match self.code / 100 {
            1 => ReplyClass::PositivePreliminary,
            2 => ReplyClass::PositiveCompletion,
            3 => ReplyClass::PositiveIntermediate,
            4 => ReplyClass::TransientNegative,
            _ => ReplyClass::PermanentNegative,
        }
    }

    pub fn is_success(&self) -> bool {
        self.class() == ReplyClass::PositiveCompletion
    }

    pub fn is_transient(&self) -> bool {
        self.class() == ReplyClass::TransientNegative
    }

    pub fn is_permanent(&self) -> bool {
        self.class() == ReplyClass::PermanentNegative
    }

    /// The text of all lines joined with `" / "`, for logs and last errors.
    pub fn text(&self) -> String {
        self.lines.join(" / ")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        let text = self.text();
        if !text.is_empty() {
            write!(f, " {text}")?;
        }
        Ok(())
    }
}

/// Why bytes from a server are not an SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line")]
    Malformed,
    #[error("reply line longer than {MAX_REPLY_LINE} bytes")]
    LineTooLong,
    #[error("reply code changed within a multi-line reply")]
    CodeMismatch,
    #[error("reply has more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
}

/// Parses one complete (possibly multi-line) reply from the front of `buf`.
///
/// `Ok(None)` means more bytes are needed. Lines may end in CRLF or a bare LF
/// and may carry the code alone (`250\r\n`): a client should be liberal here.
/// An enhanced code is taken from the first line when its class matches the
/// reply code's first digit, and stripped from every line that repeats it.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut enhanced = None;
    let mut lines = Vec::new();
    loop {
        let rest = &buf[pos..];
        let window = &rest[..rest.len().min(MAX_REPLY_LINE)];
        let Some(lf) = memchr(b'\n', window) else {
            if rest.len() >= MAX_REPLY_LINE {
                return Err(ReplyError::LineTooLong);
            }
            // Fail early on a peer that is clearly not speaking SMTP rather
            // than waiting for a line ending that may never come.
            check_partial(rest)?;
            return Ok(None);
        };
        let line = rest[..lf].strip_suffix(b"\r").unwrap_or(&rest[..lf]);
        // Measured as written back, with CRLF: a bare-LF line one byte
        // under the limit would otherwise be accepted and re-encoded over it.
        if line.len() + 2 > MAX_REPLY_LINE {
            return Err(ReplyError::LineTooLong);
        }
        pos += lf + 1;
        let (this_code, last, text) = split_line(line)?;
        if *code.get_or_insert(this_code) != this_code {
            return Err(ReplyError::CodeMismatch);
        }
        if lines.len() == MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        // A CR inside a line is shown as a space, as encode writes it: reply
        // text ends up in logs and bounces, where it must not break lines.
        let text = String::from_utf8_lossy(text).replace('\r', " ");
        let class = (this_code / 100) as u8;
        let text = match split_enhanced(class, &text) {
            Some((e, rest)) if lines.is_empty() => {
                enhanced = Some(e);
                rest
            }
            Some((e, rest)) if enhanced == Some(e) => rest,
            _ => &text,
        };
        lines.push(text.to_string());
        if last {
            let reply = Reply::with_lines(this_code, enhanced, lines);
            return Ok(Some((reply, pos)));
        }
    }
}

/// Splits a line (ending removed) into code, "is last line", and text.
fn split_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    if line.len() < 3 || !valid_code_prefix(&line[..3]) {
        return Err(ReplyError::Malformed);
    }
    let code = line[..3]
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match line.get(3) {
        None => Ok((code, true, &[])),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(ReplyError::Malformed),
    }
}

fn valid_code_prefix(prefix: &[u8]) -> bool {
    prefix.iter().enumerate().all(|(i, &b)| match i {
        0 => (b'1'..=b'5').contains(&b),
        _ => b.is_ascii_digit(),
    })
}

/// Checks the start of a line whose ending has not arrived yet.
fn check_partial(partial: &[u8]) -> Result<(), ReplyError> {
    let head = &partial[..partial.len().min(3)];
    let sep_ok = match partial.get(3) {
        None | Some(b' ' | b'-') => true,
        Some(b'\r') => partial.len() == 4,
        Some(_) => false,
    };
    if valid_code_prefix(head) && sep_ok {
        Ok(())
    } else {
        Err(ReplyError::Malformed)
    }
}

/// Splits `X.Y.Z ` (or `X.Y.Z` alone) off the front of `text` when X is `class`.
fn split_enhanced(class: u8, text: &str) -> Option<(EnhancedCode, &str)> {
    let (head, rest) = match text.split_once(' ') {
        Some((head, rest)) => (head, rest),
        None => (text, ""),
    };
    let code = EnhancedCode::parse(head)?;
    (code.class == class).then_some((code, rest))
}

#[cfg(test)]
mod tests {
    /// The longest line takes the same room whether it ended in LF or CRLF,
    /// so whatever parses also parses again once encoded (found by fuzzing).
    #[test]
    fn the_line_limit_counts_the_line_as_it_is_written_back() {
        let text = "x".repeat(MAX_REPLY_LINE - 6);
        let crlf = format!("250 {text}\r\n");
        assert_eq!(crlf.len(), MAX_REPLY_LINE);
        let (r, _) = parse_reply(crlf.as_bytes()).unwrap().unwrap();
        assert_eq!(r.to_bytes(), crlf.as_bytes());
        let lf = format!("250 {text}\n");
        let (r, _) = parse_reply(lf.as_bytes()).unwrap().unwrap();
        assert_eq!(parse_reply(&r.to_bytes()).unwrap().unwrap().0, r);
        let over = format!("250 {text}x\n");
        assert_eq!(parse_reply(over.as_bytes()), Err(ReplyError::LineTooLong));
    }

    use super::*;

    #[test]
    fn enhanced_code_parse_table() {
        let cases: &[(&str, Option<EnhancedCode>)] = &[
            ("2.0.0", Some(EnhancedCode::new(2, 0, 0))),
            ("4.7.123", Some(EnhancedCode::new(4, 7, 123))),
            ("5.100.1", Some(EnhancedCode::new(5, 100, 1))),
            ("3.0.0", None),
            ("2.0", None),
            ("2.0.0.0", None),
            ("2.1000.0", None),
            ("2..0", None),
            ("2.a.0", None),
            ("22.0.0", None),
        ];
        for (text, want) in cases {
            assert_eq!(EnhancedCode::parse(text), *want, "{text}");
        }
    }

    #[test]
    fn class_of_each_code() {
        let cases = [
            (150, ReplyClass::PositivePreliminary),
            (250, ReplyClass::PositiveCompletion),
            (354, ReplyClass::PositiveIntermediate),
            (451, ReplyClass::TransientNegative),
            (550, ReplyClass::PermanentNegative),
            (650, ReplyClass::PermanentNegative),
        ];
        for (code, class) in cases {
            assert_eq!(Reply::new(code, None, "x").class(), class, "{code}");
        }
    }
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    /// Found by the reply fuzz target: a bare CR in reply text did not
    /// survive parse → encode → parse.
    #[test]
    fn a_bare_cr_in_reply_text_round_trips_as_a_space() {
        let (r, _) = parse_reply(b"451 busy\rnow\r\n").unwrap().unwrap();
        assert_eq!(r.lines, vec!["busy now".to_string()]);
        let (again, _) = parse_reply(&r.to_bytes()).unwrap().unwrap();
        assert_eq!(again, r);
    }
}
