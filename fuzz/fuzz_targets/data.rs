//! The DATA reader: the same bytes give the same result however they are
//! split, and dot-stuffed bodies come back exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_smtp::{dot_stuff, DataReader};

fn read_all(parts: &[&[u8]]) -> (Vec<u8>, usize, bool) {
    let mut r = DataReader::new(1 << 16);
    let (mut out, mut used, mut done) = (Vec::new(), 0, false);
    for p in parts {
        if done {
            break;
        }
        let step = r.feed(p, &mut out);
        used += step.consumed;
        done = step.done;
        if !done {
            assert_eq!(step.consumed, p.len(), "an unfinished reader takes everything");
        }
    }
    (out, used, done)
}

fuzz_target!(|input: &[u8]| {
    let Some((&split, rest)) = input.split_first() else { return };
    let at = (split as usize * rest.len()) / 256;
    let whole = read_all(&[rest]);
    let halves = read_all(&[&rest[..at], &rest[at..]]);
    assert_eq!(whole, halves, "split at {at}");

    // Any body ending in CRLF (or empty) survives dot-stuffing exactly.
    let mut body = rest.to_vec();
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    if body.len() < 1 << 15 {
        let mut wire = Vec::new();
        dot_stuff(&body, &mut wire);
        let (out, used, done) = read_all(&[&wire]);
        assert!(done && used == wire.len());
        assert_eq!(out, body);
    }
});
