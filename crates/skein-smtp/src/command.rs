//! Commands: parsing what a client sends, encoding what our client sends.
//!
//! Verbs are case-insensitive. Leniency is limited to what Postfix accepts
//! and cannot confuse framing: trailing blanks, several spaces between
//! words, and a space after `FROM:` / `TO:`.

use crate::address::AddressError;
use crate::params::{
    mentions_smtputf8, parse_mail_params, parse_rcpt_params, MailParams, RcptParams,
};
use crate::path::{parse_path_inner, path_end, ForwardPath, ReversePath};
use crate::reply::{EnhancedCode, Reply};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// LMTP's greeting (RFC 2033); an SMTP server treats it as unknown.
    Lhlo(String),
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: ForwardPath,
        params: RcptParams,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy(String),
    Expn(String),
    Help(Option<String>),
    StartTls,
    /// The mechanism is uppercased; `initial` is the base64 initial response
    /// (or `=` for an empty one), unchecked beyond its alphabet.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

/// Why a command line was refused. Each maps to one standard reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Unknown verb: 500 5.5.2.
    #[error("command unrecognized")]
    Unrecognized,
    /// Bad arguments: 501 5.5.4. The reason is safe to show the peer.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// Unparsable reverse-path: 501 5.1.7.
    #[error("bad sender address: {0}")]
    BadSender(&'static str),
    /// Unparsable forward-path: 501 5.1.3.
    #[error("bad recipient address: {0}")]
    BadRecipient(&'static str),
    /// An unknown MAIL/RCPT keyword: 555 5.5.4. The parser never returns
    /// it (unknown keywords go to `other`); the server does after checking.
    #[error("unsupported parameter {0}")]
    UnknownParameter(String),
    /// Non-ASCII in an address without SMTPUTF8: 553 5.6.7 (RFC 6531 §3.6.1).
    /// 8-bit bytes elsewhere in a command are plain `Syntax` errors.
    #[error("non-ASCII address requires SMTPUTF8")]
    NonAscii,
}

impl CommandError {
    pub fn reply(&self) -> Reply {
        let e = EnhancedCode::new;
        match self {
            CommandError::Unrecognized => {
                Reply::new(500, Some(e(5, 5, 2)), "Syntax error, command unrecognized")
            }
            CommandError::Syntax(why) => {
                Reply::new(501, Some(e(5, 5, 4)), format!("Syntax error: {why}"))
            }
            CommandError::BadSender(why) => {
                Reply::new(501, Some(e(5, 1, 7)), format!("Bad sender address: {why}"))
            }
            CommandError::BadRecipient(why) => Reply::new(
                501,
                Some(e(5, 1, 3)),
                format!("Bad recipient address: {why}"),
            ),
            CommandError::UnknownParameter(key) => {
                // The keyword came from the peer: keep only what a keyword may hold.
                let key: String = key
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .take(32)
                    .collect();
                Reply::new(
                    555,
                    Some(e(5, 5, 4)),
                    format!("Unsupported parameter {key}"),
                )
            }
            CommandError::NonAscii => {
                Reply::new(553, Some(e(5, 6, 7)), "Non-ASCII address requires SMTPUTF8")
            }
        }
    }
}

/// Parses one command line given WITHOUT its line ending. Non-ASCII
/// addresses are refused; see [`parse_command_utf8`].
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    parse_command_utf8(line, false)
}

/// Like [`parse_command`]; `utf8_allowed` says the transaction's MAIL carried
/// SMTPUTF8, which lets RCPT (and VRFY/EXPN) use UTF-8. MAIL itself allows
/// UTF-8 in its reverse-path when its own parameters include SMTPUTF8.
pub fn parse_command_utf8(line: &[u8], utf8_allowed: bool) -> Result<Command, CommandError> {
    let line = trim_end(line);
    let (verb, rest) = match line.iter().position(|&b| b == b' ') {
        Some(sp) => (&line[..sp], trim_start(&line[sp..])),
        None => (line, &[][..]),
    };
    let verb = Verb::parse(verb).ok_or(CommandError::Unrecognized)?;
    let rest = match std::str::from_utf8(rest) {
        Ok(rest) => rest,
        Err(_) if matches!(verb, Verb::Mail | Verb::Rcpt) && !utf8_allowed => {
            return Err(CommandError::NonAscii)
        }
        Err(_) => return Err(CommandError::Syntax("invalid UTF-8")),
    };
    if rest.bytes().any(|b| b < b' ' || b == 0x7f) {
        return Err(CommandError::Syntax("control character in command"));
    }
    match verb {
        Verb::Ehlo => domain_arg(rest).map(Command::Ehlo),
        Verb::Helo => domain_arg(rest).map(Command::Helo),
        Verb::Lhlo => domain_arg(rest).map(Command::Lhlo),
        Verb::Mail => parse_mail(rest, utf8_allowed),
        Verb::Rcpt => parse_rcpt(rest, utf8_allowed),
        Verb::Data => no_args(rest, Command::Data, "DATA takes no arguments"),
        Verb::Bdat => parse_bdat(rest),
        Verb::Rset => no_args(rest, Command::Rset, "RSET takes no arguments"),
        // RFC 5321 §4.1.1.9: NOOP may carry a string, which is ignored.
        Verb::Noop => Ok(Command::Noop),
        Verb::Quit => no_args(rest, Command::Quit, "QUIT takes no arguments"),
        Verb::Vrfy => text_arg(rest, utf8_allowed, "VRFY requires an argument").map(Command::Vrfy),
        Verb::Expn => text_arg(rest, utf8_allowed, "EXPN requires an argument").map(Command::Expn),
        Verb::Help if rest.is_empty() => Ok(Command::Help(None)),
        Verb::Help => text_arg(rest, false, "").map(|s| Command::Help(Some(s))),
        Verb::StartTls => no_args(rest, Command::StartTls, "STARTTLS takes no arguments"),
        Verb::Auth => parse_auth(rest),
    }
}

impl Command {
    /// Appends the command line with its CRLF. Parsing the output gives back
    /// an equal command (for SMTPUTF8 addresses, with UTF-8 allowed).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut s = match self {
            Command::Ehlo(d) => format!("EHLO {d}"),
            Command::Helo(d) => format!("HELO {d}"),
            Command::Lhlo(d) => format!("LHLO {d}"),
            Command::Mail { from, .. } => format!("MAIL FROM:<{from}>"),
            Command::Rcpt { to, .. } => format!("RCPT TO:<{to}>"),
            Command::Bdat { size, last: true } => format!("BDAT {size} LAST"),
            Command::Bdat { size, last: false } => format!("BDAT {size}"),
            Command::Vrfy(a) => format!("VRFY {a}"),
            Command::Expn(a) => format!("EXPN {a}"),
            Command::Help(Some(a)) => format!("HELP {a}"),
            Command::Auth {
                mechanism,
                initial: Some(i),
            } => format!("AUTH {mechanism} {i}"),
            Command::Auth { mechanism, .. } => format!("AUTH {mechanism}"),
            _ => self.verb().to_string(),
        };
        match self {
            Command::Mail { params, .. } => params.encode(&mut s),
            Command::Rcpt { params, .. } => params.encode(&mut s),
            _ => {}
        }
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// The verb in upper case, for logs and metrics.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::Lhlo(_) => "LHLO",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Bdat { .. } => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Vrfy(_) => "VRFY",
            Command::Expn(_) => "EXPN",
            Command::Help(_) => "HELP",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
        }
    }
}

#[derive(Clone, Copy)]
enum Verb {
    Ehlo,
    Helo,
    Lhlo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth,
}

impl Verb {
    fn parse(word: &[u8]) -> Option<Verb> {
        const VERBS: &[(&[u8], Verb)] = &[
            (b"EHLO", Verb::Ehlo),
            (b"HELO", Verb::Helo),
            (b"LHLO", Verb::Lhlo),
            (b"MAIL", Verb::Mail),
            (b"RCPT", Verb::Rcpt),
            (b"DATA", Verb::Data),
            (b"BDAT", Verb::Bdat),
            (b"RSET", Verb::Rset),
            (b"NOOP", Verb::Noop),
            (b"QUIT", Verb::Quit),
            (b"VRFY", Verb::Vrfy),
            (b"EXPN", Verb::Expn),
            (b"HELP", Verb::Help),
            (b"STARTTLS", Verb::StartTls),
            (b"AUTH", Verb::Auth),
        ];
        VERBS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(word))
            .map(|(_, verb)| *verb)
    }
}

fn trim_end(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &line[..end]
}

fn trim_start(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    &s[start..]
}

fn no_args(rest: &str, cmd: Command, why: &'static str) -> Result<Command, CommandError> {
    if rest.is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::Syntax(why))
    }
}

/// EHLO/HELO argument: one printable ASCII word. Whether it is a valid
/// hostname is policy (many clients send `MY_PC`), left to the server.
fn domain_arg(rest: &str) -> Result<String, CommandError> {
    if rest.is_empty() {
        return Err(CommandError::Syntax("domain name required"));
    }
    if !rest.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CommandError::Syntax("invalid domain name"));
    }
    Ok(rest.to_string())
}

fn text_arg(rest: &str, utf8: bool, missing: &'static str) -> Result<String, CommandError> {
    if rest.is_empty() {
        return Err(CommandError::Syntax(missing));
    }
    if !utf8 && !rest.is_ascii() {
        return Err(CommandError::Syntax("non-ASCII argument"));
    }
    Ok(rest.to_string())
}

/// Splits `<path>[ params]` after `FROM:` / `TO:`.
fn split_path(s: &str) -> Result<(&str, &str), &'static str> {
    if !s.starts_with('<') {
        return Err("address must be in angle brackets");
    }
    let end = path_end(s).ok_or("unterminated address")?;
    let (path, params) = s.split_at(end);
    if !params.is_empty() && !params.starts_with(' ') {
        return Err("junk after address");
    }
    Ok((&path[1..end - 1], params))
}

fn strip_keyword<'a>(s: &'a str, keyword: &str) -> Option<&'a str> {
    let head = s.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| s[keyword.len()..].trim_start_matches(' '))
}

fn parse_mail(rest: &str, utf8_allowed: bool) -> Result<Command, CommandError> {
    let s = strip_keyword(rest, "FROM:").ok_or(CommandError::Syntax("expected FROM:<address>"))?;
    let (inner, params) = split_path(s).map_err(CommandError::BadSender)?;
    let utf8 = utf8_allowed || mentions_smtputf8(params);
    let from = match parse_path_inner(inner, utf8) {
        Ok(None) => ReversePath::Null,
        Ok(Some(m)) => ReversePath::Mailbox(m),
        Err(AddressError::NonAscii) => return Err(CommandError::NonAscii),
        Err(e) => return Err(CommandError::BadSender(e.reason())),
    };
    let params = parse_mail_params(params, utf8)?;
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(rest: &str, utf8: bool) -> Result<Command, CommandError> {
    let s = strip_keyword(rest, "TO:").ok_or(CommandError::Syntax("expected TO:<address>"))?;
    let (inner, params) = split_path(s).map_err(CommandError::BadRecipient)?;
    let to = if inner.eq_ignore_ascii_case("Postmaster") {
        ForwardPath::Postmaster
    } else {
        match parse_path_inner(inner, utf8) {
            Ok(None) => return Err(CommandError::BadRecipient("null recipient")),
            Ok(Some(m)) => ForwardPath::Mailbox(m),
            Err(AddressError::NonAscii) => return Err(CommandError::NonAscii),
            Err(e) => return Err(CommandError::BadRecipient(e.reason())),
        }
    };
    let params = parse_rcpt_params(params, utf8)?;
    Ok(Command::Rcpt { to, params })
}

fn parse_bdat(rest: &str) -> Result<Command, CommandError> {
    const BAD: CommandError = CommandError::Syntax("expected BDAT size [LAST]");
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let size = words.next().ok_or(BAD)?;
    if !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD);
    }
    let size = size.parse().map_err(|_| BAD)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(BAD),
    };
    if words.next().is_some() {
        return Err(BAD);
    }
    Ok(Command::Bdat { size, last })
}

fn parse_auth(rest: &str) -> Result<Command, CommandError> {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let mechanism = words
        .next()
        .ok_or(CommandError::Syntax("mechanism required"))?;
    // RFC 4422 §3.1: 1 to 20 of A-Z 0-9 - _
    let mech_ok = (1..=20).contains(&mechanism.len())
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !mech_ok {
        return Err(CommandError::Syntax("invalid mechanism"));
    }
    let initial = words.next();
    let base64 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    };
    if initial.is_some_and(|i| !base64(i)) || words.next().is_some() {
        return Err(CommandError::Syntax("invalid initial response"));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial: initial.map(str::to_string),
    })
}
