//! Reading a server's EHLO reply.

use skein_smtp::{parse_reply, Extensions};

fn extensions(wire: &str) -> Extensions {
    let (reply, _) = parse_reply(wire.as_bytes()).unwrap().unwrap();
    Extensions::from_ehlo(&reply)
}

#[test]
fn postfix_style_reply() {
    let ext = extensions(
        "250-mx.example.org\r\n\
         250-PIPELINING\r\n\
         250-SIZE 10240000\r\n\
         250-ETRN\r\n\
         250-STARTTLS\r\n\
         250-AUTH PLAIN LOGIN\r\n\
         250-AUTH=PLAIN LOGIN\r\n\
         250-ENHANCEDSTATUSCODES\r\n\
         250-8BITMIME\r\n\
         250-DSN\r\n\
         250-SMTPUTF8\r\n\
         250 CHUNKING\r\n",
    );
    assert!(ext.pipelining());
    assert!(ext.starttls());
    assert!(ext.eight_bit_mime());
    assert!(ext.enhanced_status_codes());
    assert!(ext.dsn());
    assert!(ext.smtputf8());
    assert!(ext.chunking());
    assert!(!ext.binary_mime());
    assert!(ext.has("etrn") && ext.has("Etrn"));
    assert!(
        !ext.has("mx.example.org"),
        "the greeting line is not a keyword"
    );
    assert_eq!(ext.size(), Some(10_240_000));
    assert_eq!(
        ext.auth_mechanisms(),
        vec!["PLAIN".to_string(), "LOGIN".to_string()]
    );
    assert_eq!(
        ext.keywords().collect::<Vec<_>>(),
        [
            "PIPELINING",
            "SIZE",
            "ETRN",
            "STARTTLS",
            "AUTH",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING"
        ]
    );
}

#[test]
fn minimal_and_odd_replies() {
    // (reply, size, auth mechanisms, pipelining)
    let cases: &[(&str, Option<u64>, &[&str], bool)] = &[
        ("250 mx.example.org\r\n", None, &[], false),
        ("250-mx\r\n250 SIZE\r\n", None, &[], false),
        ("250-mx\r\n250 SIZE 0\r\n", None, &[], false),
        ("250-mx\r\n250 SIZE lots\r\n", None, &[], false),
        (
            "250-mx\r\n250-size 42\r\n250 pipelining\r\n",
            Some(42),
            &[],
            true,
        ),
        (
            "250-mx\r\n250-AUTH=login\r\n250 AUTH cram-md5\r\n",
            None,
            &["LOGIN", "CRAM-MD5"],
            false,
        ),
        (
            "250-mx\r\n250-\r\n250-!!bad\r\n250 PIPELINING\r\n",
            None,
            &[],
            true,
        ),
    ];
    for (wire, size, auth, pipelining) in cases {
        let ext = extensions(wire);
        assert_eq!(ext.size(), *size, "{wire:?}");
        assert_eq!(ext.auth_mechanisms(), *auth, "{wire:?}");
        assert_eq!(ext.pipelining(), *pipelining, "{wire:?}");
    }
}
