//! Every reply the SMTP server sends, by name. Texts follow Postfix's where
//! clients and operators know them.

use skein_smtp::{EnhancedCode, Reply};

const fn ec(class: u8, subject: u16, detail: u16) -> Option<EnhancedCode> {
    Some(EnhancedCode::new(class, subject, detail))
}

pub fn greeting(hostname: &str) -> Reply {
    Reply::new(220, None, format!("{hostname} ESMTP Skein"))
}

pub fn helo(hostname: &str) -> Reply {
    Reply::new(250, None, hostname.to_string())
}

pub fn ok() -> Reply {
    Reply::new(250, ec(2, 0, 0), "Ok")
}

pub fn sender_ok() -> Reply {
    Reply::new(250, ec(2, 1, 0), "Ok")
}

pub fn recipient_ok() -> Reply {
    Reply::new(250, ec(2, 1, 5), "Ok")
}

pub fn start_data() -> Reply {
    Reply::new(354, None, "End data with <CR><LF>.<CR><LF>")
}

pub fn queued(id: &impl std::fmt::Display) -> Reply {
    Reply::new(250, ec(2, 0, 0), format!("Ok: queued as {id}"))
}

pub fn bye() -> Reply {
    Reply::new(221, ec(2, 0, 0), "Bye")
}

pub fn help() -> Reply {
    Reply::new(
        214,
        ec(2, 0, 0),
        "See https://www.rfc-editor.org/rfc/rfc5321",
    )
}

pub fn vrfy() -> Reply {
    Reply::new(
        252,
        ec(2, 0, 0),
        "Cannot VRFY user, but will accept message and attempt delivery",
    )
}

pub fn not_implemented(verb: &str) -> Reply {
    Reply::new(
        502,
        ec(5, 5, 1),
        format!("Error: {verb} command not implemented"),
    )
}

pub fn need_helo() -> Reply {
    Reply::new(503, ec(5, 5, 1), "Error: send HELO/EHLO first")
}

pub fn nested_mail() -> Reply {
    Reply::new(503, ec(5, 5, 1), "Error: nested MAIL command")
}

pub fn need_mail() -> Reply {
    Reply::new(503, ec(5, 5, 1), "Error: need MAIL command")
}

pub fn need_rcpt() -> Reply {
    Reply::new(503, ec(5, 5, 1), "Error: need RCPT command")
}

pub fn line_too_long() -> Reply {
    Reply::new(500, ec(5, 5, 2), "Error: command line too long")
}

pub fn text_line_too_long() -> Reply {
    Reply::new(
        500,
        ec(5, 5, 2),
        "Error: message line longer than 1000 octets (RFC 5321 4.5.3.1.6)",
    )
}

pub fn bare_line_ending() -> Reply {
    Reply::new(
        500,
        ec(5, 5, 2),
        "Error: bare <CR> or <LF> in command; lines end with <CR><LF>",
    )
}

pub fn nul_in_command() -> Reply {
    Reply::new(500, ec(5, 5, 2), "Error: NUL character in command")
}

pub fn bare_line_ending_in_data() -> Reply {
    Reply::new(
        554,
        ec(5, 6, 0),
        "Error: bare <CR> or <LF> in message data; lines end with <CR><LF>",
    )
}

pub fn nul_in_data() -> Reply {
    Reply::new(554, ec(5, 6, 0), "Error: NUL character in message data")
}

pub fn too_many_hops() -> Reply {
    Reply::new(
        554,
        ec(5, 4, 6),
        "Error: too many hops (Received headers): mail loop?",
    )
}

pub fn talked_first() -> Reply {
    Reply::new(554, ec(5, 5, 0), "Error: talking before the greeting")
}

pub fn out_of_sync() -> Reply {
    Reply::new(
        554,
        ec(5, 5, 0),
        "Error: SMTP protocol synchronization: data sent before the 354 reply",
    )
}

pub fn bdat_interrupted() -> Reply {
    Reply::new(
        503,
        ec(5, 5, 1),
        "Error: BDAT chunks interrupted; message discarded",
    )
}

pub fn chunk_received(size: u64) -> Reply {
    Reply::new(250, ec(2, 0, 0), format!("Ok: {size} octets received"))
}

pub fn data_too_slow() -> Reply {
    Reply::new(421, ec(4, 4, 2), "Error: message data arriving too slowly")
}

pub fn too_many_junk() -> Reply {
    Reply::new(421, ec(4, 7, 0), "Error: too many commands without mail")
}

pub fn too_many_from_you(hostname: &str) -> Reply {
    Reply::new(
        421,
        ec(4, 7, 0),
        format!("{hostname} Error: too many connections from your address"),
    )
}

pub fn storage_low() -> Reply {
    Reply::new(452, ec(4, 3, 1), "Error: insufficient system storage")
}

pub fn tls_go_ahead() -> Reply {
    Reply::new(220, ec(2, 0, 0), "Ready to start TLS")
}

pub fn tls_already() -> Reply {
    Reply::new(503, ec(5, 5, 1), "Error: TLS already active")
}

pub fn tls_required() -> Reply {
    Reply::new(530, ec(5, 7, 0), "Must issue a STARTTLS command first")
}

pub fn encryption_required() -> Reply {
    Reply::new(
        538,
        ec(5, 7, 11),
        "Encryption required for requested authentication mechanism",
    )
}

pub fn auth_not_here() -> Reply {
    Reply::new(
        503,
        ec(5, 5, 1),
        "Error: authentication not enabled on this port",
    )
}

pub fn already_authenticated() -> Reply {
    Reply::new(503, ec(5, 5, 1), "Error: already authenticated")
}

pub fn auth_in_transaction() -> Reply {
    Reply::new(503, ec(5, 5, 1), "Error: MAIL transaction in progress")
}

pub fn unknown_mechanism() -> Reply {
    Reply::new(
        504,
        ec(5, 5, 4),
        "Error: unsupported authentication mechanism",
    )
}

pub fn sasl_challenge(challenge: &str) -> Reply {
    Reply::new(334, None, challenge.to_string())
}

pub fn auth_aborted() -> Reply {
    Reply::new(501, ec(5, 0, 0), "Authentication aborted")
}

pub fn undecodable_sasl() -> Reply {
    Reply::new(501, ec(5, 5, 2), "Error: cannot decode the response")
}

pub fn auth_ok() -> Reply {
    Reply::new(235, ec(2, 7, 0), "Authentication successful")
}

pub fn auth_busy() -> Reply {
    Reply::new(
        454,
        ec(4, 7, 0),
        "Temporary authentication failure, try again later",
    )
}

pub fn auth_failed() -> Reply {
    Reply::new(535, ec(5, 7, 8), "Error: authentication failed")
}

pub fn params_need_ehlo() -> Reply {
    Reply::new(555, ec(5, 5, 4), "Error: parameters need EHLO")
}

pub fn unknown_parameter(name: &str) -> Reply {
    Reply::new(555, ec(5, 5, 4), format!("Unsupported option: {name}"))
}

pub fn message_too_big() -> Reply {
    Reply::new(552, ec(5, 3, 4), "Error: message file too big")
}

pub fn too_many_recipients() -> Reply {
    Reply::new(452, ec(4, 5, 3), "Error: too many recipients")
}

pub fn relay_denied(rcpt: &str) -> Reply {
    Reply::new(554, ec(5, 7, 1), format!("<{rcpt}>: Relay access denied"))
}

pub fn auth_required() -> Reply {
    Reply::new(530, ec(5, 7, 0), "Authentication required")
}

/// The message could not be committed by a majority in time: the client
/// must try again later (here or at another node).
pub fn not_committed() -> Reply {
    Reply::new(
        451,
        ec(4, 3, 0),
        "Error: queue unavailable, try again later",
    )
}

pub fn too_many_errors() -> Reply {
    Reply::new(421, ec(4, 7, 0), "Error: too many errors")
}

pub fn too_many_connections(hostname: &str) -> Reply {
    Reply::new(
        421,
        ec(4, 7, 0),
        format!("{hostname} Error: too many connections"),
    )
}

pub fn shutting_down(hostname: &str) -> Reply {
    Reply::new(
        421,
        ec(4, 3, 2),
        format!("{hostname} Service shutting down, try another server"),
    )
}

pub fn timeout(hostname: &str) -> Reply {
    Reply::new(
        421,
        ec(4, 4, 2),
        format!("{hostname} Error: timeout exceeded"),
    )
}
