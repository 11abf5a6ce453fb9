//! MAIL and RCPT parameters (RFC 5321 §4.1.2 esmtp-param) and the extensions
//! that define them: SIZE (RFC 1870), BODY (RFC 6152, RFC 3030), SMTPUTF8
//! (RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461), AUTH (RFC 4954).
//!
//! Parsing only checks syntax. Unknown keywords land in `other` so the server
//! can decide, with knowledge of what it advertised, whether to refuse them.

use serde::{Deserialize, Serialize};

use crate::command::CommandError;
use crate::xtext::{xtext_decode, xtext_encode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    BinaryMime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Ret {
    Full,
    Hdrs,
}

/// NOTIFY=. A value with nothing set means the same as `never` and is
/// encoded as NEVER.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Notify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// xtext-decoded.
    pub envid: Option<String>,
    /// xtext-decoded; `<>` when the submitter was not authenticated.
    pub auth: Option<String>,
    /// Unknown parameters in order, keyword uppercased, value as written.
    pub other: Vec<(String, Option<String>)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptParams {
    pub notify: Option<Notify>,
    /// `addr-type;address`, xtext-decoded.
    pub orcpt: Option<String>,
    /// Unknown parameters in order, keyword uppercased, value as written.
    pub other: Vec<(String, Option<String>)>,
}

/// True when the parameter text names SMTPUTF8, which decides whether the
/// same command's path may be UTF-8 (checked before the path is parsed).
pub(crate) fn mentions_smtputf8(params: &str) -> bool {
    params
        .split(' ')
        .any(|t| t.eq_ignore_ascii_case("SMTPUTF8"))
}

pub(crate) fn parse_mail_params(s: &str, utf8: bool) -> Result<MailParams, CommandError> {
    let mut p = MailParams::default();
    for (key, value) in split_params(s, utf8)? {
        match key.as_str() {
            "SIZE" => p.size = Some(parse_size(value)?),
            "BODY" => {
                p.body = Some(match value.map(str::to_ascii_uppercase).as_deref() {
                    Some("7BIT") => BodyType::SevenBit,
                    Some("8BITMIME") => BodyType::EightBitMime,
                    Some("BINARYMIME") => BodyType::BinaryMime,
                    _ => return Err(CommandError::Syntax("invalid BODY value")),
                })
            }
            "SMTPUTF8" if value.is_none() => p.smtputf8 = true,
            "SMTPUTF8" => return Err(CommandError::Syntax("SMTPUTF8 takes no value")),
            "RET" => {
                p.ret = Some(match value.map(str::to_ascii_uppercase).as_deref() {
                    Some("FULL") => Ret::Full,
                    Some("HDRS") => Ret::Hdrs,
                    _ => return Err(CommandError::Syntax("invalid RET value")),
                })
            }
            "ENVID" => p.envid = Some(decode(value, "invalid ENVID value")?),
            "AUTH" => p.auth = Some(decode(value, "invalid AUTH value")?),
            _ => p.other.push((key, value.map(str::to_string))),
        }
    }
    Ok(p)
}

pub(crate) fn parse_rcpt_params(s: &str, utf8: bool) -> Result<RcptParams, CommandError> {
    let mut p = RcptParams::default();
    for (key, value) in split_params(s, utf8)? {
        match key.as_str() {
            "NOTIFY" => p.notify = Some(parse_notify(value)?),
            "ORCPT" => {
                const BAD: CommandError = CommandError::Syntax("invalid ORCPT value");
                let orcpt = decode(value, "invalid ORCPT value")?;
                let (kind, addr) = orcpt.split_once(';').ok_or(BAD)?;
                if kind.is_empty() || addr.is_empty() || !kind.bytes().all(is_keyword_byte) {
                    return Err(BAD);
                }
                p.orcpt = Some(orcpt);
            }
            _ => p.other.push((key, value.map(str::to_string))),
        }
    }
    Ok(p)
}

impl MailParams {
    /// Appends each parameter preceded by a space.
    pub fn encode(&self, out: &mut String) {
        if let Some(size) = self.size {
            out.push_str(&format!(" SIZE={size}"));
        }
        if let Some(body) = self.body {
            out.push_str(match body {
                BodyType::SevenBit => " BODY=7BIT",
                BodyType::EightBitMime => " BODY=8BITMIME",
                BodyType::BinaryMime => " BODY=BINARYMIME",
            });
        }
        if self.smtputf8 {
            out.push_str(" SMTPUTF8");
        }
        if let Some(ret) = self.ret {
            out.push_str(match ret {
                Ret::Full => " RET=FULL",
                Ret::Hdrs => " RET=HDRS",
            });
        }
        if let Some(envid) = &self.envid {
            out.push_str(" ENVID=");
            xtext_encode(envid, out);
        }
        if let Some(auth) = &self.auth {
            out.push_str(" AUTH=");
            xtext_encode(auth, out);
        }
        encode_other(&self.other, out);
    }
}

impl RcptParams {
    /// Appends each parameter preceded by a space.
    pub fn encode(&self, out: &mut String) {
        if let Some(n) = self.notify {
            out.push_str(" NOTIFY=");
            if n.never || !(n.success || n.failure || n.delay) {
                out.push_str("NEVER");
            } else {
                let names = [
                    (n.success, "SUCCESS"),
                    (n.failure, "FAILURE"),
                    (n.delay, "DELAY"),
                ];
                let set: Vec<&str> = names
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, s)| *s)
                    .collect();
                out.push_str(&set.join(","));
            }
        }
        if let Some(orcpt) = &self.orcpt {
            out.push_str(" ORCPT=");
            xtext_encode(orcpt, out);
        }
        encode_other(&self.other, out);
    }
}

fn encode_other(other: &[(String, Option<String>)], out: &mut String) {
    for (key, value) in other {
        out.push(' ');
        out.push_str(key);
        if let Some(v) = value {
            out.push('=');
            out.push_str(v);
        }
    }
}

/// Splits `KEY[=VALUE]` tokens, uppercasing keys and refusing duplicates.
fn split_params(s: &str, utf8: bool) -> Result<Vec<(String, Option<&str>)>, CommandError> {
    let mut out: Vec<(String, Option<&str>)> = Vec::new();
    for token in s.split(' ').filter(|t| !t.is_empty()) {
        let (key, value) = match token.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (token, None),
        };
        if key.is_empty() || !key.bytes().all(is_keyword_byte) || key.starts_with('-') {
            return Err(CommandError::Syntax("invalid parameter keyword"));
        }
        if let Some(v) = value {
            // esmtp-value: printable ASCII but '=' (UTF-8 too under RFC 6531)
            let ok_char = |c: char| matches!(c, '!'..='<' | '>'..='~') || (utf8 && !c.is_ascii());
            if v.is_empty() || !v.chars().all(ok_char) {
                return Err(CommandError::Syntax("invalid parameter value"));
            }
        }
        let key = key.to_ascii_uppercase();
        if out.iter().any(|(k, _)| *k == key) {
            return Err(CommandError::Syntax("duplicate parameter"));
        }
        out.push((key, value));
    }
    Ok(out)
}

fn is_keyword_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

fn parse_size(value: Option<&str>) -> Result<u64, CommandError> {
    const BAD: CommandError = CommandError::Syntax("invalid SIZE value");
    let v = value.ok_or(BAD)?;
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD);
    }
    v.parse().map_err(|_| BAD)
}

fn decode(value: Option<&str>, reason: &'static str) -> Result<String, CommandError> {
    value
        .and_then(xtext_decode)
        .filter(|v| !v.is_empty())
        .ok_or(CommandError::Syntax(reason))
}

fn parse_notify(value: Option<&str>) -> Result<Notify, CommandError> {
    const BAD: CommandError = CommandError::Syntax("invalid NOTIFY value");
    let mut n = Notify::default();
    for item in value.ok_or(BAD)?.split(',') {
        let flag = match item.to_ascii_uppercase().as_str() {
            "NEVER" => &mut n.never,
            "SUCCESS" => &mut n.success,
            "FAILURE" => &mut n.failure,
            "DELAY" => &mut n.delay,
            _ => return Err(BAD),
        };
        if *flag {
            return Err(BAD);
        }
        *flag = true;
    }
    // NEVER must stand alone (RFC 3461 §4.1).
    if n.never && (n.success || n.failure || n.delay) {
        return Err(BAD);
    }
    Ok(n)
}
