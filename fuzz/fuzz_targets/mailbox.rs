//! Mailboxes: parsing never panics, and a parsed mailbox prints to text
//! that parses back to the same mailbox.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_smtp::Mailbox;

fuzz_target!(|s: &str| {
    if let Ok(m) = Mailbox::parse(s) {
        let printed = m.to_string();
        let again = Mailbox::parse(&printed).expect("a printed mailbox parses");
        assert_eq!(again, m, "{s:?} printed as {printed:?}");
    }
});
