#!/usr/bin/env python3
"""Helpers for .ci/interop.sh: free ports, readiness polling, the Python
smtplib client cases (the standard library's SMTP client, not ours), and
DKIM verification with dkimpy against keys served by a small DNS server.

Every subcommand exits 0 on success and non-zero with a message on stderr.
"""

import argparse
import smtplib
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from email.message import EmailMessage


def cmd_ports(args):
    # Hold every socket open until all are chosen so the ports are distinct.
    socks = []
    for _ in range(args.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def cmd_wait_http(args):
    deadline = time.monotonic() + args.deadline
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(args.url, timeout=2) as r:
                if r.status == 200:
                    return 0
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    print(f"{args.url} not 200 within {args.deadline}s (last: {last})", file=sys.stderr)
    return 1


def cmd_wait_banner(args):
    deadline = time.monotonic() + args.deadline
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((args.host, args.port), timeout=2) as s:
                s.settimeout(5)
                line = s.makefile("rb").readline().decode("utf-8", "replace").strip()
                if line.startswith("220"):
                    return 0
                last = line or "connection closed without a banner"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    print(f"{args.host}:{args.port}: no 220 banner within {args.deadline}s (last: {last})", file=sys.stderr)
    return 1


def tls_context(cafile):
    ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
    return ctx


def connect(args):
    s = smtplib.SMTP(args.host, args.port, local_hostname="smtplib.interop.test", timeout=30)
    if args.debug:
        s.set_debuglevel(1)
    return s


def cmd_probe(args):
    """Print the EHLO keywords, before and (with --starttls) after STARTTLS:
    `plain: KW KW ...` and `tls: KW KW ...`. Exit 3 when STARTTLS is asked
    for but not offered or fails."""
    s = connect(args)
    try:
        s.ehlo()
        print("plain: " + " ".join(sorted(k.upper() for k in s.esmtp_features)))
        if args.starttls:
            if not s.has_extn("starttls"):
                print("STARTTLS not offered", file=sys.stderr)
                return 3
            try:
                s.starttls(context=tls_context(args.cafile))
            except (smtplib.SMTPException, ssl.SSLError, OSError) as e:
                print(f"STARTTLS failed: {e!r}", file=sys.stderr)
                return 3
            s.ehlo()
            feats = []
            for k, v in sorted(s.esmtp_features.items()):
                feats.append(k.upper() + ("=" + v.strip().replace(" ", ",") if v.strip() else ""))
            print("tls: " + " ".join(feats))
        s.quit()
    finally:
        s.close()
    return 0


def cmd_send(args):
    """One connection, EHLO, [STARTTLS, EHLO, AUTH], then --count messages,
    each with header X-Interop-Token: PREFIX-N (N from 1). Prints the tokens
    of the messages the server accepted, one a line."""
    s = connect(args)
    try:
        s.ehlo()
        if args.starttls:
            if args.user and s.has_extn("auth"):
                print("AUTH is offered before STARTTLS (it must not be)", file=sys.stderr)
                return 1
            s.starttls(context=tls_context(args.cafile))
            s.ehlo()
        if args.user:
            if not s.has_extn("auth"):
                print("AUTH not offered after STARTTLS", file=sys.stderr)
                return 1
            if args.bad_password:
                try:
                    s.login(args.user, args.bad_password)
                except smtplib.SMTPAuthenticationError as e:
                    if e.smtp_code != 535:
                        print(f"wrong password: expected 535, got {e.smtp_code} {e.smtp_error!r}", file=sys.stderr)
                        return 1
                else:
                    print("a wrong password was accepted", file=sys.stderr)
                    return 1
            s.login(args.user, args.password)
        elif args.expect_mail_refused:
            code, msg = s.mail(args.sender)
            if code != args.expect_mail_refused:
                print(f"MAIL without AUTH: expected {args.expect_mail_refused}, got {code} {msg!r}", file=sys.stderr)
                return 1
            s.rset()
            if args.count == 0:
                s.quit()
                return 0
        for n in range(1, args.count + 1):
            token = f"{args.token_prefix}-{n}"
            m = EmailMessage()
            m["From"] = args.sender
            m["To"] = args.rcpt
            m["Subject"] = f"interop smtplib {token}"
            m["X-Interop-Token"] = token
            # Lines that start with a dot test transparency (RFC 5321
            # 4.5.2) end to end: smtplib stuffs them, Skein must unstuff on
            # receipt and stuff again on delivery, and smtp-sink unstuffs.
            m.set_content(
                f"message {n} of {args.count} on one connection\n"
                + "line\n" * 50
                + ".dot line\n..two dots\n.\nlast line\n"
            )
            refused = s.send_message(m, from_addr=args.sender, to_addrs=[args.rcpt])
            if refused:
                print(f"{token}: recipients refused: {refused}", file=sys.stderr)
                return 1
            print(token, flush=True)
        s.quit()
    except (smtplib.SMTPException, ssl.SSLError, OSError) as e:
        print(f"smtplib: {e!r}", file=sys.stderr)
        return 1
    finally:
        s.close()
    return 0


def serve_txt(records):
    """Answer TXT queries for `records` ({name: text}) on a UDP port of
    127.0.0.1 (dnspython's wire format); every other name is NXDOMAIN.
    Returns the port."""
    import threading

    import dns.message
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rdtypes.ANY.TXT
    import dns.rrset

    wanted = {k.lower().rstrip(".") + ".": v for k, v in records.items()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def loop():
        while True:
            data, peer = sock.recvfrom(4096)
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            reply = dns.message.make_response(query)
            q = query.question[0]
            text = wanted.get(q.name.to_text().lower())
            if text is not None and q.rdtype == dns.rdatatype.TXT:
                # A character-string holds 255 bytes; a key takes several.
                chunks = [text[i:i + 255].encode() for i in range(0, len(text), 255)]
                rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
                reply.answer.append(dns.rrset.from_rdata(q.name, 60, rdata))
            elif text is None:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(reply.to_wire(), peer)

    threading.Thread(target=loop, daemon=True).start()
    return sock.getsockname()[1]


def cmd_dkim_verify(args):
    import dkim
    import dns.resolver

    records = dict(r.split("=", 1) for r in args.txt)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = serve_txt(records)

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        answer = resolver.resolve(name, "TXT", lifetime=timeout)
        return b"".join(b"".join(r.strings) for r in answer)

    raw = open(args.file, "rb").read()
    # smtp-sink dumps with bare LF line ends; the message had CRLF.
    message = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    found = [l for l in message.split(b"\r\n") if l.lower().startswith(b"dkim-signature:")]
    if len(found) != args.expect:
        print(f"{args.file}: {len(found)} DKIM-Signature fields, expected {args.expect}", file=sys.stderr)
        return 1
    failed = 0
    for i in range(len(found)):
        d = dkim.DKIM(message)
        ok = d.verify(idx=i, dnsfunc=dnsfunc)
        print(f"dkimpy: {'pass' if ok else 'FAIL'}: {found[i].decode(errors='replace')}")
        failed += 0 if ok else 1
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("ports")
    a.add_argument("count", type=int)
    a.set_defaults(func=cmd_ports)

    a = sub.add_parser("wait-http")
    a.add_argument("url")
    a.add_argument("--deadline", type=float, default=60)
    a.set_defaults(func=cmd_wait_http)

    a = sub.add_parser("wait-banner")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a.add_argument("--deadline", type=float, default=60)
    a.set_defaults(func=cmd_wait_banner)

    a = sub.add_parser("dkim-verify")
    a.add_argument("file")
    a.add_argument("--expect", type=int, required=True, help="DKIM-Signature fields expected")
    a.add_argument("--txt", action="append", default=[], help="NAME=TEXT served as TXT")
    a.set_defaults(func=cmd_dkim_verify)

    for name, func in (("probe", cmd_probe), ("send", cmd_send)):
        a = sub.add_parser(name)
        a.add_argument("--host", default="127.0.0.1")
        a.add_argument("--port", type=int, required=True)
        a.add_argument("--starttls", action="store_true")
        a.add_argument("--cafile")
        a.add_argument("--debug", action="store_true")
        if name == "send":
            a.add_argument("--count", type=int, default=1)
            a.add_argument("--token-prefix", required=True)
            a.add_argument("--sender", default="smtplib@[127.0.0.1]")
            a.add_argument("--rcpt", default="x@[127.0.0.1]")
            a.add_argument("--user")
            a.add_argument("--password")
            a.add_argument("--bad-password")
            a.add_argument("--expect-mail-refused", type=int)
        a.set_defaults(func=func)

    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
