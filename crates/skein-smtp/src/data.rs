//! The DATA reader: finds the end of a message and removes dot-stuffing.
//!
//! Only the exact sequence CRLF "." CRLF ends the data. Bare LF and bare CR
//! are ordinary body bytes (flagged, so the server can refuse them): if a
//! receiver ends the data on anything looser than a sender escapes, the rest
//! of the "body" runs as commands — SMTP smuggling. For the same reason only
//! a CRLF starts a line for dot-unstuffing.
//!
//! The reader is a byte-level state machine, so input may be split anywhere.

use memchr::memchr3;

/// Where the reader stands relative to line boundaries (CRLF only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Right after a CRLF (or at the very start).
    LineStart,
    /// Read "." at the start of a line: a stuffed dot or the end marker.
    Dot,
    /// Read ".\r" at the start of a line: only LF completes the end marker.
    DotCr,
    /// Inside a line, previous byte not CR.
    Mid,
    /// Inside a line, previous byte CR.
    MidCr,
    /// The end marker has been read.
    Done,
}

/// How far one [`DataReader::feed`] call got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataProgress {
    /// Bytes of the input used; the rest belongs to whatever follows DATA.
    pub consumed: usize,
    /// The end marker has been read.
    pub done: bool,
}

#[derive(Clone, Debug)]
pub struct DataReader {
    state: State,
    max_size: usize,
    body_len: u64,
    exceeded: bool,
    line_len: usize,
    longest_line: usize,
    bare_lf: bool,
    bare_cr: bool,
    nul: bool,
}

impl DataReader {
    /// A reader positioned at the start of a line, right after the DATA
    /// command's CRLF, so data that begins with ".\r\n" is an empty message.
    pub fn new(max_size: usize) -> Self {
        DataReader {
            state: State::LineStart,
            max_size,
            body_len: 0,
            exceeded: false,
            line_len: 0,
            longest_line: 0,
            bare_lf: false,
            bare_cr: false,
            nul: false,
        }
    }

    /// Consumes as much of `input` as possible, appending the unstuffed body
    /// (CRLFs included, the final ".\r\n" excluded) to `out`. Stops right
    /// after the end marker; later bytes are not consumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> DataProgress {
        let mut i = 0;
        // Each arm either consumes bytes (advancing `i`) or changes state and
        // lets the next arm look at the same byte again.
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => break,
                State::LineStart if b == b'.' => {
                    self.state = State::Dot;
                    self.line_len += 1;
                    i += 1;
                }
                State::LineStart => self.state = State::Mid,
                State::Dot if b == b'\r' => {
                    self.state = State::DotCr;
                    self.line_len += 1;
                    i += 1;
                }
                // The line began with a dot that is not the end marker: that
                // dot was stuffing and is dropped (RFC 5321 §4.5.2).
                State::Dot => self.state = State::Mid,
                State::DotCr if b == b'\n' => {
                    self.end_line();
                    self.state = State::Done;
                    i += 1;
                }
                State::DotCr => {
                    // ".\r" then not LF: the dot was stuffing, the CR is body.
                    self.emit(b"\r", out);
                    self.state = State::MidCr;
                }
                State::MidCr if b == b'\n' => {
                    self.emit(b"\n", out);
                    self.end_line();
                    self.state = State::LineStart;
                    i += 1;
                }
                State::MidCr => {
                    self.bare_cr = true;
                    self.state = State::Mid;
                }
                State::Mid => i += self.scan(&input[i..], out),
            }
        }
        DataProgress {
            consumed: i,
            done: self.state == State::Done,
        }
    }

    /// Copies plain bytes up to and including the next CR, LF or NUL;
    /// returns how many were consumed. The fast path for 25 MB bodies.
    fn scan(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let Some(k) = memchr3(b'\r', b'\n', 0, input) else {
            self.emit(input, out);
            self.line_len += input.len();
            return input.len();
        };
        match input[k] {
            // CRLF both here: finish the line without another round trip.
            b'\r' if input.get(k + 1) == Some(&b'\n') => {
                self.emit(&input[..k + 2], out);
                self.line_len += k + 1; // end_line counts the LF
                self.end_line();
                self.state = State::LineStart;
                return k + 2;
            }
            b'\r' => self.state = State::MidCr,
            b'\n' => self.bare_lf = true,
            _ => self.nul = true,
        }
        self.emit(&input[..=k], out);
        self.line_len += k + 1;
        k + 1
    }

    fn end_line(&mut self) {
        self.line_len += 1; // the LF that ended the line
        self.longest_line = self.longest_line.max(self.line_len);
        self.line_len = 0;
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let room = (self.max_size as u64).saturating_sub(self.body_len);
        self.body_len += bytes.len() as u64;
        if self.exceeded {
            return;
        }
        if bytes.len() as u64 <= room {
            out.extend_from_slice(bytes);
        } else {
            // Keep reading to the end marker so the session stays in step,
            // but stop storing.
            out.extend_from_slice(&bytes[..room as usize]);
            self.exceeded = true;
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The body grew past `max_size`. What was appended stops at exactly
    /// `max_size` bytes; the rest is counted in `body_len` only.
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    /// An LF not preceded by CR was seen.
    pub fn saw_bare_lf(&self) -> bool {
        self.bare_lf
    }

    /// A CR not followed by LF was seen.
    pub fn saw_bare_cr(&self) -> bool {
        self.bare_cr
    }

    pub fn saw_nul(&self) -> bool {
        self.nul
    }

    /// The longest line so far in transmitted octets (stuffing dot and CRLF
    /// included; the line in progress counts too), for the 1000-octet rule.
    pub fn longest_line(&self) -> usize {
        self.longest_line.max(self.line_len)
    }

    /// Unstuffed body size so far, including bytes dropped past the limit.
    pub fn body_len(&self) -> u64 {
        self.body_len
    }
}
