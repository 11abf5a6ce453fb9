//! Any bytes as a command line: parsing never panics, and what parses
//! encodes to a line that parses back to the same command.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_smtp::{parse_command, parse_command_utf8};

fuzz_target!(|line: &[u8]| {
    let _ = parse_command(line);
    for utf8 in [false, true] {
        if let Ok(cmd) = parse_command_utf8(line, utf8) {
            let mut wire = Vec::new();
            cmd.encode(&mut wire);
            assert!(wire.ends_with(b"\r\n"));
            let again = parse_command_utf8(&wire[..wire.len() - 2], true).expect("an encoded command parses");
            assert_eq!(again, cmd, "round trip of {:?}", String::from_utf8_lossy(line));
        }
    }
});
