//! Any bytes as server replies: parsing never panics, and a parsed reply
//! of valid UTF-8 encodes to bytes that parse back to the same reply. (Bytes
//! that are not UTF-8 are shown as U+FFFD, which changes the text.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_smtp::parse_reply;

fuzz_target!(|buf: &[u8]| {
    if let Ok(Some((reply, used))) = parse_reply(buf) {
        assert!(used <= buf.len());
        if std::str::from_utf8(&buf[..used]).is_err() {
            return;
        }
        let wire = reply.to_bytes();
        let (again, n) = parse_reply(&wire).expect("an encoded reply parses").expect("complete");
        assert_eq!(n, wire.len());
        assert_eq!(again, reply);
    }
});
