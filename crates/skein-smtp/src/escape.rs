//! Text a peer sent, shown safely in a log line.
//!
//! HELO names, AUTH user names, addresses, parameters and reply texts come
//! from whoever is on the other end. Written into a text log as they are,
//! a line break in one of them would let a client write a log line of its
//! own (log forging), and a terminal escape or a bidirectional override
//! would make a line read differently from what it holds. [`Escaped`]
//! shows such characters as `\u{..}` escapes, and a backslash as `\\`, so
//! what a line says is what the peer sent, unambiguously.

use std::fmt::{self, Write};

/// Displays `T` with control, line-separator and bidirectional-formatting
/// characters escaped.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<T>(pub T);

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.to_string();
        if !text.chars().any(|c| c == '\\' || needs_escape(c)) {
            return f.write_str(&text);
        }
        for c in text.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_escapes_and_overrides_are_shown_escaped() {
        let cases = [
            ("alice", "alice"),
            ("ünïcode ok", "ünïcode ok"),
            ("a\r\nlevel=ERROR forged", "a\\u{d}\\u{a}level=ERROR forged"),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("back\\slash", "back\\\\slash"),
            ("x\u{202e}cod.exe", "x\\u{202e}cod.exe"),
            ("a\u{2028}b\u{85}c", "a\\u{2028}b\\u{85}c"),
        ];
        for (input, shown) in cases {
            assert_eq!(Escaped(input).to_string(), shown, "{input:?}");
        }
    }
}
