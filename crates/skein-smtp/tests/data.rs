//! The DATA reader: end-of-data detection, unstuffing, limits, flags, and
//! independence from how the input is split.

use skein_smtp::{dot_stuff, DataReader};

/// What one read of a whole input produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    body: Vec<u8>,
    consumed: usize,
    done: bool,
    flags: (bool, bool, bool),
    longest: usize,
    body_len: u64,
    exceeded: bool,
}

/// Feeds `input` in chunks ending at `cuts` (then the rest), like a socket would.
fn read_cut(input: &[u8], max: usize, cuts: &[usize]) -> Outcome {
    let mut reader = DataReader::new(max);
    let mut body = Vec::new();
    let mut pos = 0;
    let mut done = false;
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        let end = end.min(input.len());
        if done || end < pos {
            continue;
        }
        let p = reader.feed(&input[pos..end], &mut body);
        if !p.done {
            // an unfinished reader always takes everything it is given
            assert_eq!(p.consumed, end - pos);
        }
        pos += p.consumed;
        done = p.done;
    }
    assert_eq!(reader.is_done(), done);
    Outcome {
        body,
        consumed: pos,
        done,
        flags: (reader.saw_bare_lf(), reader.saw_bare_cr(), reader.saw_nul()),
        longest: reader.longest_line(),
        body_len: reader.body_len(),
        exceeded: reader.exceeded(),
    }
}

fn read(input: &[u8]) -> Outcome {
    read_cut(input, usize::MAX, &[])
}

/// (input, body, done, consumed)
type Case = (&'static [u8], &'static [u8], bool, usize);

const CASES: &[Case] = &[
    (b"hello\r\nworld\r\n.\r\n", b"hello\r\nworld\r\n", true, 17),
    (b".\r\n", b"", true, 3),
    (b".\r\nQUIT\r\n", b"", true, 3),
    (b"\r\n.\r\n", b"\r\n", true, 5),
    (b"a\r\n.\r\nMAIL FROM:<>\r\n", b"a\r\n", true, 6),
    // unstuffing
    (b"..x\r\n.\r\n", b".x\r\n", true, 8),
    (b"..\r\n.\r\n", b".\r\n", true, 7),
    (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n", true, 11),
    (b"a.\r\nb.c\r\n.\r\n", b"a.\r\nb.c\r\n", true, 12),
    // fake end-of-data sequences: none of them ends the data
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", true, 10),
    (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\nb\r\n", true, 11),
    (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n", true, 11),
    (b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n", true, 11),
    (b"a\r\n.\rx\r\n.\r\n", b"a\r\n\rx\r\n", true, 11),
    (b"a\r\n.\r\r\n.\r\n", b"a\r\n\r\r\n", true, 10),
    (b"a\r\n.\r.\r\n.\r\n", b"a\r\n\r.\r\n", true, 11),
    (b"a\r\r\n.\r\n", b"a\r\r\n", true, 7),
    (b"\n.\n", b"\n.\n", false, 3),
    (b"\r\n.\n", b"\r\n\n", false, 4),
    (b"\n.\r\n", b"\n.\r\n", false, 4),
    (b"\r.\r\n", b"\r.\r\n", false, 4),
    // not finished yet
    (b"", b"", false, 0),
    (b"a\r\n.", b"a\r\n", false, 4),
    (b"a\r\n.\r", b"a\r\n", false, 5),
    (b"a\r\n..", b"a\r\n.", false, 5),
    (b"abc", b"abc", false, 3),
];

#[test]
fn whole_input_table() {
    for (input, body, done, consumed) in CASES {
        let got = read(input);
        let name = String::from_utf8_lossy(input);
        assert_eq!(got.body, *body, "{name:?}");
        assert_eq!(got.done, *done, "{name:?}");
        assert_eq!(got.consumed, *consumed, "{name:?}");
        assert_eq!(got.body_len, body.len() as u64, "{name:?}");
    }
}

#[test]
fn every_split_point_gives_the_same_result() {
    for (input, ..) in CASES {
        let whole = read(input);
        for cut in 0..=input.len() {
            assert_eq!(
                read_cut(input, usize::MAX, &[cut]),
                whole,
                "{input:?} cut at {cut}"
            );
        }
        let bytewise: Vec<usize> = (0..input.len()).collect();
        assert_eq!(
            read_cut(input, usize::MAX, &bytewise),
            whole,
            "{input:?} bytewise"
        );
    }
}

#[test]
fn feeding_after_done_consumes_nothing() {
    let mut reader = DataReader::new(100);
    let mut body = Vec::new();
    assert!(reader.feed(b".\r\n", &mut body).done);
    let p = reader.feed(b"QUIT\r\n", &mut body);
    assert_eq!((p.consumed, p.done), (0, true));
    assert!(body.is_empty());
}

#[test]
fn size_limit_reads_on_to_the_end_marker() {
    let input = b"0123456789abcdef\r\n.\r\nQUIT\r\n";
    let got = read_cut(input, 10, &[]);
    assert!(got.exceeded);
    assert!(got.done);
    assert_eq!(got.body, b"0123456789");
    assert_eq!(got.body_len, 18);
    assert_eq!(&input[got.consumed..], b"QUIT\r\n");
    for cut in 0..=input.len() {
        assert_eq!(read_cut(input, 10, &[cut]), got, "cut at {cut}");
    }
}

#[test]
fn size_limit_boundary() {
    // (max, input, exceeded): the body "12345678\r\n" is 10 bytes
    let cases: &[(usize, &[u8], bool)] = &[
        (10, b"12345678\r\n.\r\n", false),
        (9, b"12345678\r\n.\r\n", true),
        (0, b".\r\n", false),
        (0, b"x\r\n.\r\n", true),
        // stuffing dots do not count
        (5, b"..ab\r\n.\r\n", false),
    ];
    for (max, input, exceeded) in cases {
        let got = read_cut(input, *max, &[]);
        assert_eq!(got.exceeded, *exceeded, "{input:?} max {max}");
        assert!(got.done);
        assert!(got.body.len() <= *max);
    }
}

#[test]
fn flags_table() {
    // (input, bare LF, bare CR, NUL)
    type Flags = (bool, bool, bool);
    let cases: &[(&[u8], Flags)] = &[
        (b"plain\r\n.\r\n", (false, false, false)),
        (b"a\nb\r\n.\r\n", (true, false, false)),
        (b"a\rb\r\n.\r\n", (false, true, false)),
        (b"a\0b\r\n.\r\n", (false, false, true)),
        (b"\n.\r\n.\r\n", (true, false, false)),
        (b"a\r\n.\rx\r\n.\r\n", (false, true, false)),
        (b"a\r\r\n.\r\n", (false, true, false)),
        (b".\n\r\n.\r\n", (true, false, false)),
    ];
    for (input, flags) in cases {
        let got = read(input);
        assert!(got.done, "{input:?}");
        assert_eq!(got.flags, *flags, "{input:?}");
    }
}

#[test]
fn longest_line_counts_transmitted_octets() {
    let long = format!("a\r\n{}\r\n.\r\n", "x".repeat(998));
    let cases: Vec<(Vec<u8>, usize)> = vec![
        (b".\r\n".to_vec(), 3),
        (b"abc\r\n.\r\n".to_vec(), 5),
        (b"..abc\r\n.\r\n".to_vec(), 7),
        (long.into_bytes(), 1000),
        (b"ab\ncd\r\n.\r\n".to_vec(), 7),
        (b"abcdef".to_vec(), 6), // the line in progress counts
    ];
    for (input, want) in cases {
        assert_eq!(
            read(&input).longest,
            want,
            "{:?}",
            String::from_utf8_lossy(&input)
        );
        assert_eq!(read_cut(&input, usize::MAX, &[1, 4]).longest, want);
    }
}

#[test]
fn large_body_round_trips() {
    let mut body = Vec::new();
    for i in 0..200_000 {
        if i % 7 == 0 {
            body.push(b'.');
        }
        body.extend_from_slice(format!("line {i} of the message body\r\n").as_bytes());
    }
    let mut wire = Vec::new();
    dot_stuff(&body, &mut wire);
    let got = read_cut(&wire, 25 << 20, &[65536, 131072, 1 << 20]);
    assert!(got.done);
    assert_eq!(got.consumed, wire.len());
    assert!(got.body == body);
}
