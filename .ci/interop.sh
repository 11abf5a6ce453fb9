#!/usr/bin/env bash
# shellcheck disable=SC2317  # case functions are only called through run_case
# Interop tier: real SMTP clients nobody here wrote (swaks, Python's smtplib,
# Postfix's smtp-source, Postfix itself) against a live skeind, which delivers
# everything to Postfix's smtp-sink — and one domain to a Postfix smtpd, which
# offers CHUNKING and so gets each message as a BDAT chunk; every message
# must arrive.
#
#   .ci/interop.sh                  # run every case
#   INTEROP_TLS=on .ci/interop.sh   # STARTTLS/AUTH cases must run (a missing feature fails)
#
# Knobs (environment):
#   INTEROP_TLS       auto | on | off   (default auto). auto: the STARTTLS/AUTH
#                     cases print "SKIP: <reason>" when skeind lacks the feature
#                     (no `skeind hash-password`, TLS keys rejected, no STARTTLS
#                     in EHLO, no AUTH after STARTTLS); on: those are failures.
#   INTEROP_DEADLINE  seconds to wait for a case's messages to arrive (30; the
#                     500-message case gets twice that). After a failure, later
#                     cases wait at most 10 s, so a broken build fails fast.
#   INTEROP_KEEP      1 keeps the temp dir (logs, sink dumps) after the run
#   SKEIND            use this skeind binary instead of building one
#
# Needs root on Debian for apt-get and the private Postfix instance. Nothing
# binds port 25: the sink, skeind and Postfix all use free high ports on
# 127.0.0.1, chosen at run time.
set -euo pipefail

INTEROP_TLS="${INTEROP_TLS:-auto}"
INTEROP_DEADLINE="${INTEROP_DEADLINE:-30}"
INTEROP_KEEP="${INTEROP_KEEP:-0}"

cd "$(dirname "$0")/.."
ROOT="$PWD"
HELPER="$ROOT/.ci/interop/helper.py"
RUN_ID="$(date +%H%M%S)-$$"
RCPT='x@[127.0.0.1]'

say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "$*" >&2; }
die() { warn "interop: $*"; exit 1; }

case "$INTEROP_TLS" in auto | on | off) ;; *) die "INTEROP_TLS must be auto, on or off (got '$INTEROP_TLS')" ;; esac

# ---------------------------------------------------------------- install
is_root() { [ "$(id -u)" = 0 ]; }

install_deps() {
    local pkgs=()
    command -v swaks >/dev/null || pkgs+=(swaks)
    if ! command -v smtp-sink >/dev/null || ! command -v smtp-source >/dev/null ||
        ! command -v postfix >/dev/null; then
        pkgs+=(postfix)
    fi
    command -v openssl >/dev/null || pkgs+=(openssl)
    command -v python3 >/dev/null || pkgs+=(python3)
    # swaks needs Net::SSLeay for --tls (a Recommends, so maybe absent).
    perl -MNet::SSLeay -e 1 2>/dev/null || pkgs+=(libnet-ssleay-perl)
    # dkimpy, an independent DKIM verifier (Ed25519 through PyNaCl), and
    # dnspython for the DNS server that publishes the keys.
    # Debian's packages serve Debian's interpreter, whatever python3 is first
    # on the PATH.
    /usr/bin/python3 -c 'import dkim, nacl, dns.resolver' 2>/dev/null ||
        pkgs+=(python3-dkim python3-nacl python3-dnspython)
    [ ${#pkgs[@]} -eq 0 ] && return 0
    is_root || die "missing ${pkgs[*]}; run as root (or install them) first"
    say "installing: ${pkgs[*]}"
    # "No configuration": the package installs the programs but no main.cf, so
    # no system MTA starts on port 25.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null ||
        die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/tmp/interop-apt.log 2>&1 ||
        { cat /tmp/interop-apt.log >&2; die "apt-get install ${pkgs[*]} failed"; }
}

install_deps
for c in swaks smtp-sink smtp-source postfix sendmail postconf postqueue openssl python3; do
    command -v "$c" >/dev/null || die "$c not found after install"
done
[ -x "$(command -v sendmail)" ] || die "sendmail is not executable"

# ---------------------------------------------------------------- build
if [ -n "${SKEIND:-}" ]; then
    [ -x "$SKEIND" ] || die "SKEIND=$SKEIND is not executable"
else
    say "== building skeind (cargo build --release -p skein-node)"
    cargo build --release -p skein-node --locked --quiet
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
    SKEIND="$target_dir/release/skeind"
fi
[ -x "$SKEIND" ] || die "no skeind at $SKEIND"

# ---------------------------------------------------------------- scratch, cleanup
T="$(mktemp -d /tmp/skein-interop.XXXXXX)"
# Postfix daemons (user postfix) and smtp-sink (user nobody when root) must
# reach their directories below this.
chmod 0755 "$T"
SINK_DIR="$T/sink"
PF="$T/postfix"
# A second private Postfix, receiving: Skein delivers to its smtpd.
PFR="$T/postfix-receiving"
SINK_PID=""
SKEIND_PID=""
TLS_PID=""
FAILED=0

stop_pid() { # stop_pid PID: SIGTERM, up to 10 s, then SIGKILL
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_postfix() { # stop_postfix [DIR]: the private instance at DIR (default $PF)
    local pf=${1:-$PF}
    [ -f "$pf/conf/main.cf" ] || return 0
    local pidfile="$pf/queue/pid/master.pid" pid
    [ -f "$pidfile" ] || return 0
    pid="$(tr -dc 0-9 <"$pidfile")"
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then return 0; fi
    postfix -c "$pf/conf" stop >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    stop_postfix
    stop_postfix "$PFR"
    stop_pid "$TLS_PID"
    stop_pid "$SKEIND_PID"
    stop_pid "$SINK_PID"
    if [ "$INTEROP_KEEP" = 1 ]; then
        warn "interop: kept $T"
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_us() { local t="${EPOCHREALTIME//[.,]/}"; echo "$t"; }
fmt_secs() { printf '%d.%d' $((($2 - $1) / 1000000)) $(((($2 - $1) / 100000) % 10)); }

# ---------------------------------------------------------------- ports
read -r SINK_PORT SMTP_PORT CLUSTER_PORT METRICS_PORT \
    TLS_SMTP_PORT TLS_SUB_PORT TLS_CLUSTER_PORT TLS_METRICS_PORT PFR_PORT \
    <<<"$(python3 "$HELPER" ports 9)"

# ---------------------------------------------------------------- the sink
mkdir -p "$SINK_DIR"
sink_args=(-c -d "$SINK_DIR/msg.")
if is_root; then
    # smtp-sink refuses to run as root without -u.
    chown nobody "$SINK_DIR"
    sink_args=(-u nobody "${sink_args[@]}")
fi
smtp-sink "${sink_args[@]}" "127.0.0.1:$SINK_PORT" 256 >"$T/sink.log" 2>&1 &
SINK_PID=$!
python3 "$HELPER" wait-banner 127.0.0.1 "$SINK_PORT" --deadline 20 ||
    { cat "$T/sink.log" >&2; die "smtp-sink did not start"; }

# ---------------------------------------------------------------- skeind
write_config() { # write_config FILE DIR SMTP CLUSTER METRICS [extra smtp lines]
    local file=$1 dir=$2 smtp=$3 cluster=$4 metrics=$5 extra=${6:-}
    mkdir -p "$dir"
    cat >"$file" <<EOF
node_id = 1
data_dir = "$dir/data"

[smtp]
listen = ["127.0.0.1:$smtp"]
hostname = "skein.interop.test"
$extra

[cluster]
listen = "127.0.0.1:$cluster"

[metrics]
listen = "127.0.0.1:$metrics"

[delivery]
# Recipients at [127.0.0.1] skip the MX lookup; this sends them to the sink.
port = $SINK_PORT
retry_schedule = ["2s", "5s", "10s"]
connect_timeout = "5s"
EOF
}

start_skeind() { # start_skeind CONFIG LOG SMTP METRICS -> sets STARTED_PID
    local config=$1 log=$2 smtp=$3 metrics=$4
    "$SKEIND" --config "$config" >"$log" 2>&1 &
    STARTED_PID=$!
    if ! python3 "$HELPER" wait-http "http://127.0.0.1:$metrics/readyz" --deadline 60 ||
        ! python3 "$HELPER" wait-banner 127.0.0.1 "$smtp" --deadline 20; then
        warn "skeind ($config) did not become ready; its log:"
        tail -n 30 "$log" >&2
        return 1
    fi
}

SK="$T/skein"
write_config "$SK/skein.toml" "$SK" "$SMTP_PORT" "$CLUSTER_PORT" "$METRICS_PORT"
# DKIM: an RSA key in PKCS#1 and an Ed25519 key in PKCS#8, as OpenSSL makes
# them; mail from dkim.interop.test is signed with both.
DKIM_DIR="$SK/dkim"
mkdir -p "$DKIM_DIR"
openssl genrsa -traditional -out "$DKIM_DIR/rsa.pem" 2048 2>/dev/null
openssl genpkey -algorithm ed25519 -out "$DKIM_DIR/ed25519.pem"
chmod 600 "$DKIM_DIR"/*.pem
DKIM_RSA_P="$(openssl rsa -in "$DKIM_DIR/rsa.pem" -pubout -outform DER 2>/dev/null | base64 -w0)"
DKIM_ED_P="$(openssl pkey -in "$DKIM_DIR/ed25519.pem" -pubout -outform DER | tail -c 32 | base64 -w0)"
cat >>"$SK/skein.toml" <<EOF

[[dkim]]
domain = "dkim.interop.test"
selector = "rsa"
key_file = "$DKIM_DIR/rsa.pem"

[[dkim]]
domain = "dkim.interop.test"
selector = "ed"
key_file = "$DKIM_DIR/ed25519.pem"

# Mail for bdat.interop.test goes to the receiving Postfix's smtpd, which
# offers PIPELINING and CHUNKING (case postfix-bdat).
[[route]]
domain = "bdat.interop.test"
relay = "smtp://127.0.0.1:$PFR_PORT"
tls = "none"
EOF
"$SKEIND" check-config --config "$SK/skein.toml" >"$SK/check-config.out" 2>&1 ||
    { cat "$SK/check-config.out" >&2; die "skeind check-config rejects the plain config"; }
STARTED_PID=""
start_skeind "$SK/skein.toml" "$SK/skeind.log" "$SMTP_PORT" "$METRICS_PORT" || { SKEIND_PID=$STARTED_PID; die "skeind did not start"; }
SKEIND_PID=$STARTED_PID
say "skeind $SKEIND_PID: smtp 127.0.0.1:$SMTP_PORT, metrics $METRICS_PORT; sink 127.0.0.1:$SINK_PORT; scratch $T"

# ---------------------------------------------------------------- arrival checks
# Every message carries "X-Interop-Token: TOKEN" (smtp-source: a Subject).
# await_tokens EXPECTED_FILE: poll the sink until every token arrived exactly
# once, or the deadline passes; then say what was expected and what arrived.
arrived_tokens() {
    grep -rhoE '^X-Interop-Token: [A-Za-z0-9._-]+' "$SINK_DIR" 2>/dev/null |
        sed 's/^X-Interop-Token: //' | sort || true
}

await_tokens() {
    local expected=$1 deadline=${2:-$INTEROP_DEADLINE} end missing dups
    sort -o "$expected" "$expected"
    end=$((SECONDS + deadline))
    while :; do
        arrived_tokens >"$expected.arrived"
        missing="$(comm -23 "$expected" <(sort -u "$expected.arrived") | wc -l)"
        [ "$missing" -eq 0 ] && break
        [ "$SECONDS" -ge "$end" ] && break
        sleep 0.2
    done
    dups="$(grep -xFf "$expected" "$expected.arrived" | uniq -d || true)"
    if [ "$missing" -eq 0 ] && [ -z "$dups" ]; then
        return 0
    fi
    warn "expected $(wc -l <"$expected") message(s) with these tokens, each once:"
    sed 's/^/    /' "$expected" >&2
    warn "arrived at the sink (within ${deadline}s; tokens of this case):"
    grep -xFf "$expected" "$expected.arrived" | uniq -c | sed 's/^/    /' >&2 || true
    [ "$missing" -gt 0 ] && warn "MISSING $missing:" && comm -23 "$expected" <(sort -u "$expected.arrived") | sed 's/^/    /' >&2
    [ -n "$dups" ] && warn "DELIVERED MORE THAN ONCE:" && printf '    %s\n' "$dups" >&2
    return 1
}

# expect_received_with TOKEN PROTO: Skein's Received: header on that message
# names the protocol of RFC 3848 (ESMTP, ESMTPS with TLS, ESMTPSA with AUTH).
expect_received_with() {
    local token=$1 proto=$2 file received
    file="$({ grep -rlx "X-Interop-Token: $token" "$SINK_DIR" || true; } | head -n 1)"
    [ -n "$file" ] || { warn "$token: not at the sink"; return 1; }
    received="$(grep -A1 '^Received: from ' "$file" || true)"
    if ! grep -q "(Skein) with $proto id " <<<"$received"; then
        warn "$token: expected Skein's Received: header to say 'with $proto'; it has:"
        grep -A2 '^Received: from ' "$file" >&2 || true
        return 1
    fi
}

# expect_dot_lines TOKEN: the body's lines ".dot line", "..two dots" and "."
# (helper.py sends them) arrived as sent: dot-stuffing undone exactly once.
expect_dot_lines() {
    local token=$1 file
    file="$({ grep -rlx "X-Interop-Token: $token" "$SINK_DIR" || true; } | head -n 1)"
    [ -n "$file" ] || { warn "$token: not at the sink"; return 1; }
    if ! python3 -c 'import sys; b = open(sys.argv[1]).read(); sys.exit(0 if "\n.dot line\n..two dots\n.\nlast line\n" in b else 1)' "$file"; then
        warn "$token: expected the body lines '.dot line', '..two dots', '.', 'last line' as sent; the body ends:"
        tail -n 6 "$file" | cat -A >&2
        return 1
    fi
}

# ---------------------------------------------------------------- case runner
declare -a R_NAME=() R_MSGS=() R_RESULT=() R_SECS=()
SKIP_REASON_FILE="$T/skip-reason"
CURRENT_LOG=""

record() { R_NAME+=("$1"); R_MSGS+=("$2"); R_RESULT+=("$3"); R_SECS+=("$4"); }

diagnose() { # diagnose [SKEIND_LOG...]: what the lead needs when a case fails
    local log
    if [ -n "$CURRENT_LOG" ] && [ -s "$CURRENT_LOG" ]; then
        warn "--- client transcript (tail of $CURRENT_LOG)"
        tail -n 60 "$CURRENT_LOG" >&2
    fi
    for log in "$@"; do
        [ -s "$log" ] || continue
        warn "--- tail of $log"
        tail -n 30 "$log" >&2
    done
    if [ -s "$PF/maillog" ]; then
        warn "--- tail of Postfix's log $PF/maillog"
        tail -n 20 "$PF/maillog" >&2
    fi
    warn "--- smtp-sink: $(tr '\r' '\n' <"$T/sink.log" | tail -n 1), $(find "$SINK_DIR" -type f | wc -l) file(s) in $SINK_DIR"
}

# run_case NAME MSGS FUNC SKEIND_LOG: FUNC runs in a subshell with errexit
# on; exit 77 means skipped (reason in $SKIP_REASON_FILE).
run_case() {
    local name=$1 msgs=$2 fn=$3 log=$4 t0 t1 rc secs
    CURRENT_LOG="$T/case-$name.log"
    : >"$CURRENT_LOG"
    rm -f "$SKIP_REASON_FILE"
    say "== $name"
    t0=$(now_us)
    set +e
    (
        set -e
        "$fn"
    )
    rc=$?
    set -e
    t1=$(now_us)
    secs="$(fmt_secs "$t0" "$t1")"
    if [ "$rc" -eq 0 ]; then
        say "PASS: $name (${secs}s)"
        record "$name" "$msgs" PASS "$secs"
    elif [ "$rc" -eq 77 ]; then
        say "SKIP: $name: $(cat "$SKIP_REASON_FILE" 2>/dev/null)"
        record "$name" "$msgs" SKIP "$secs"
    else
        warn "FAIL: $name (exit $rc, ${secs}s)"
        diagnose "$log"
        record "$name" "$msgs" FAIL "$secs"
        FAILED=1
        # Fail fast: when delivery is broken every later case would wait the
        # whole deadline.
        [ "$INTEROP_DEADLINE" -le 10 ] || INTEROP_DEADLINE=10
    fi
}

skip() { echo "$*" >"$SKIP_REASON_FILE"; exit 77; }

tokens() { # tokens PREFIX N -> PREFIX-1 .. PREFIX-N, one a line
    local i
    for ((i = 1; i <= $2; i++)); do echo "$1-$i"; done
}

swaks_send() { # swaks_send PORT TOKEN [swaks options...]: one message, transcript to CURRENT_LOG
    local port=$1 token=$2 out rc
    shift 2
    set +e
    out="$(timeout 60 swaks --server "127.0.0.1:$port" --helo swaks.interop.test \
        --from 'swaks@[127.0.0.1]' --to "$RCPT" \
        --header "Subject: interop swaks $token" --header "X-Interop-Token: $token" \
        --timeout 30 "$@" </dev/null 2>&1)"
    rc=$?
    set -e
    printf '### swaks %s (exit %d)\n%s\n' "$token" "$rc" "$out" >>"$CURRENT_LOG"
    [ "$rc" -eq 0 ] || { warn "swaks exited $rc for $token (transcript below)"; return 1; }
    grep -qE '^<[-~]  250 2\.0\.0 Ok: queued as ' <<<"$out" ||
        { warn "swaks: no '250 2.0.0 Ok: queued as ID' reply for $token"; return 1; }
}

# ---------------------------------------------------------------- plain cases
case_swaks_plain() {
    local exp="$T/exp-swaks-plain" t
    tokens "c1-$RUN_ID" 3 >"$exp"
    while read -r t; do swaks_send "$SMTP_PORT" "$t"; done <"$exp"
    await_tokens "$exp"
    expect_received_with "c1-$RUN_ID-1" ESMTP
}

case_swaks_pipeline() {
    local exp="$T/exp-swaks-pipeline" t
    tokens "c2-$RUN_ID" 3 >"$exp"
    while read -r t; do swaks_send "$SMTP_PORT" "$t" --pipeline; done <"$exp"
    grep -q 'PIPELINING' "$CURRENT_LOG" || { warn "EHLO did not offer PIPELINING"; return 1; }
    await_tokens "$exp"
}

case_smtplib() {
    local exp="$T/exp-smtplib"
    tokens "c3-$RUN_ID" 10 >"$exp"
    timeout 120 python3 "$HELPER" send --port "$SMTP_PORT" --count 10 --token-prefix "c3-$RUN_ID" \
        >/dev/null 2>>"$CURRENT_LOG" || { warn "smtplib session failed"; return 1; }
    await_tokens "$exp"
    expect_dot_lines "c3-$RUN_ID-1"
}

# A message From: dkim.interop.test, from 127.0.0.1 (a relay network): signed
# with both keys, and both signatures verify with dkimpy against the keys
# published in DNS.
case_dkim() {
    local exp="$T/exp-dkim" token="dkim-$RUN_ID-1" file
    echo "$token" >"$exp"
    swaks_send "$SMTP_PORT" "$token" --header "From: DKIM <swaks@dkim.interop.test>"
    await_tokens "$exp"
    file="$({ grep -rlx "X-Interop-Token: $token" "$SINK_DIR" || true; } | head -n 1)"
    /usr/bin/python3 "$HELPER" dkim-verify "$file" --expect 2 \
        --txt "rsa._domainkey.dkim.interop.test=v=DKIM1; k=rsa; p=$DKIM_RSA_P" \
        --txt "ed._domainkey.dkim.interop.test=v=DKIM1; k=ed25519; p=$DKIM_ED_P" \
        >>"$CURRENT_LOG" 2>&1 || { warn "dkimpy did not verify both signatures:"; tail -n 5 "$CURRENT_LOG" >&2; return 1; }
}

SOURCE_MSGS=500
case_smtp_source() {
    local subject="interop-c4-$RUN_ID" end n=0 ids
    echo "### smtp-source -s 20 -m $SOURCE_MSGS -l 10240" >>"$CURRENT_LOG"
    timeout 180 smtp-source -s 20 -m "$SOURCE_MSGS" -l 10240 -S "$subject" -M source.interop.test \
        -f 'source@[127.0.0.1]' -t "$RCPT" "127.0.0.1:$SMTP_PORT" >>"$CURRENT_LOG" 2>&1 ||
        { warn "smtp-source failed"; return 1; }
    end=$((SECONDS + INTEROP_DEADLINE * 2))
    while :; do
        n="$({ grep -rlx "Subject: $subject" "$SINK_DIR" 2>/dev/null || true; } | wc -l)"
        [ "$n" -ge "$SOURCE_MSGS" ] && break
        [ "$SECONDS" -ge "$end" ] && break
        sleep 0.5
    done
    # Each smtp-source message has its own Message-Id: count distinct ones too.
    ids="$({ grep -rlx "Subject: $subject" "$SINK_DIR" 2>/dev/null || true; } |
        xargs -r grep -h '^Message-Id:' | sort -u | wc -l)"
    if [ "$n" -ne "$SOURCE_MSGS" ] || [ "$ids" -ne "$SOURCE_MSGS" ]; then
        warn "expected $SOURCE_MSGS messages with 'Subject: $subject' (distinct Message-Ids), each once"
        warn "arrived: $n file(s), $ids distinct Message-Id(s) within $((INTEROP_DEADLINE * 2))s"
        return 1
    fi
}

# postfix_instance DIR HOSTNAME: the directories of a private Postfix under
# DIR and the main.cf every one here shares (no local delivery, no TLS out,
# its own log); the caller appends what makes it what it is.
postfix_instance() {
    local dir=$1 host=$2
    mkdir -p "$dir/conf" "$dir/queue" "$dir/data"
    chown postfix "$dir/data"
    cat >"$dir/conf/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = $host
mydomain = interop.test
mydestination =
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
transport_maps = texthash:$dir/conf/transport
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
biff = no
smtp_tls_security_level = none
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
EOF
}

# postfix_services: the master.cf lines of the services every private
# Postfix here runs (unix sockets only).
postfix_services() {
    cat <<'EOF'
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}

# A private Postfix: its own config and queue under $T, no inet listener at
# all (nothing on port 25), mail injected with its sendmail and relayed to
# skeind. [127.0.0.1] is Postfix's own address (class local), so a transport
# map sends it on; tls@[127.0.0.1] goes to the STARTTLS skeind instead.
setup_postfix() {
    postfix_instance "$PF" postfix.interop.test
    cat >>"$PF/conf/main.cf" <<EOF
myorigin = \$myhostname
inet_interfaces = loopback-only
relayhost = [127.0.0.1]:$SMTP_PORT
EOF
    cat >"$PF/conf/transport" <<EOF
tls@[127.0.0.1]	relay-tls:[127.0.0.1]:$TLS_SMTP_PORT
[127.0.0.1]	relay:[127.0.0.1]:$SMTP_PORT
EOF
    # No inet services: this instance listens on nothing.
    {
        postfix_services
        cat <<EOF
relay     unix  -       -       n       -       -       smtp
relay-tls unix  -       -       n       -       -       smtp -o smtp_tls_security_level=encrypt -o smtp_tls_CAfile=$T/tls/cert.pem -o smtp_tls_loglevel=1
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
EOF
    } >"$PF/conf/master.cf"
    if postconf -c "$PF/conf" -M | awk '$2 == "inet" { found = 1 } END { exit !found }'; then
        warn "the private Postfix would listen on an inet port"
        return 1
    fi
    postfix -c "$PF/conf" check || { warn "postfix check failed"; return 1; }
    postfix -c "$PF/conf" start || { warn "postfix start failed"; return 1; }
}

postfix_send() { # postfix_send RCPT TOKEN
    printf 'From: postfix-user@[127.0.0.1]\nTo: %s\nSubject: interop postfix %s\nX-Interop-Token: %s\n\nrelayed by Postfix through Skein\n' \
        "$1" "$2" "$2" |
        timeout 60 sendmail -C "$PF/conf" -f 'postfix-user@[127.0.0.1]' -- "$1"
}

await_postfix_queue_empty() {
    local end=$((SECONDS + INTEROP_DEADLINE))
    until [[ "$(postqueue -c "$PF/conf" -p 2>&1)" == *"Mail queue is empty"* ]]; do
        if [ "$SECONDS" -ge "$end" ]; then
            warn "Postfix's queue is not empty after ${INTEROP_DEADLINE}s:"
            postqueue -c "$PF/conf" -p >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

case_postfix() {
    is_root || skip "the private Postfix instance needs root"
    local exp="$T/exp-postfix" t sent
    setup_postfix
    tokens "c5-$RUN_ID" 5 >"$exp"
    while read -r t; do postfix_send "$RCPT" "$t"; done <"$exp"
    await_tokens "$exp"
    await_postfix_queue_empty
    sent="$(grep -c "relay=127.0.0.1\[127.0.0.1\]:$SMTP_PORT, .*status=sent (250 2.0.0 Ok: queued as" "$PF/maillog" || true)"
    [ "$sent" -eq 5 ] || { warn "Postfix logged $sent status=sent via skeind, expected 5"; return 1; }
}

# Postfix receiving from Skein: its smtpd offers PIPELINING and CHUNKING, so
# Skein sends each message as one BDAT chunk with its envelope; Postfix
# relays it on to the sink. With debug_peer_list its log shows the commands.
setup_postfix_receiving() {
    postfix_instance "$PFR" receiving.interop.test
    cat >>"$PFR/conf/main.cf" <<EOF
inet_interfaces = 127.0.0.1
relay_domains = bdat.interop.test
smtpd_tls_security_level = none
debug_peer_list = 127.0.0.1
EOF
    cat >"$PFR/conf/transport" <<EOF
bdat.interop.test	smtp:[127.0.0.1]:$SINK_PORT
EOF
    {
        echo "127.0.0.1:$PFR_PORT inet n - n - - smtpd"
        postfix_services
    } >"$PFR/conf/master.cf"
    postfix -c "$PFR/conf" check || { warn "postfix check failed (receiving)"; return 1; }
    postfix -c "$PFR/conf" start || { warn "postfix start failed (receiving)"; return 1; }
    python3 "$HELPER" wait-banner 127.0.0.1 "$PFR_PORT" --deadline 20 ||
        { warn "the receiving Postfix's smtpd did not answer"; return 1; }
}

case_postfix_receives_bdat() {
    is_root || skip "the private Postfix instance needs root"
    local exp="$T/exp-postfix-bdat" t chunks
    setup_postfix_receiving
    tokens "c11-$RUN_ID" 3 >"$exp"
    while read -r t; do RCPT="user@bdat.interop.test" swaks_send "$SMTP_PORT" "$t"; done <"$exp"
    await_tokens "$exp"
    chunks="$(grep -cE '< localhost\[127\.0\.0\.1\]: BDAT [0-9]+ LAST' "$PFR/maillog" || true)"
    if [ "$chunks" -ne 3 ]; then
        warn "the receiving Postfix logged $chunks 'BDAT n LAST' from Skein, expected 3; its log:"
        grep -E '< localhost\[127\.0\.0\.1\]: ' "$PFR/maillog" | tail -n 20 >&2 || true
        return 1
    fi
    if grep -qE '< localhost\[127\.0\.0\.1\]: DATA' "$PFR/maillog"; then
        warn "Skein sent DATA to a receiver offering CHUNKING"
        return 1
    fi
}

# ---------------------------------------------------------------- STARTTLS / AUTH
TLS_DIR="$T/tls"
TLS_USER="interop"
TLS_PASS="interop-pw-$RUN_ID"
TLS_SKIP=""  # non-empty: why the TLS/AUTH cases are skipped

tls_unavailable() { # a feature is missing: SKIP in auto, failure in on
    if [ "$INTEROP_TLS" = on ]; then
        warn "INTEROP_TLS=on but $*"
        return 1
    fi
    TLS_SKIP="$*"
}

setup_tls() {
    local hash out rc extra
    if [ "$INTEROP_TLS" = off ]; then TLS_SKIP="INTEROP_TLS=off"; return 0; fi
    mkdir -p "$TLS_DIR"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" >"$TLS_DIR/openssl.log" 2>&1 ||
        { cat "$TLS_DIR/openssl.log" >&2; warn "openssl could not make a certificate"; return 1; }

    set +e
    hash="$(printf '%s\n' "$TLS_PASS" | "$SKEIND" hash-password 2>"$TLS_DIR/hash.err")"
    rc=$?
    set -e
    if [ "$rc" -ne 0 ] || [[ "$hash" != "\$argon2"* ]]; then
        tls_unavailable "skeind hash-password failed (exit $rc: $(head -c 200 "$TLS_DIR/hash.err"))"
        return
    fi
    extra="submission_listen = [\"127.0.0.1:$TLS_SUB_PORT\"]
tls_cert = \"$TLS_DIR/cert.pem\"
tls_key = \"$TLS_DIR/key.pem\"

[smtp.users]
$TLS_USER = '$hash'"
    write_config "$T/skein-tls/skein.toml" "$T/skein-tls" "$TLS_SMTP_PORT" "$TLS_CLUSTER_PORT" "$TLS_METRICS_PORT" "$extra"
    set +e
    out="$("$SKEIND" check-config --config "$T/skein-tls/skein.toml" 2>&1)"
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        tls_unavailable "skeind check-config rejects tls_cert/tls_key/submission_listen/[smtp.users]: $(echo "$out" | tr '\n' ' ')"
        return
    fi
    STARTED_PID=""
    if ! start_skeind "$T/skein-tls/skein.toml" "$T/skein-tls/skeind.log" "$TLS_SMTP_PORT" "$TLS_METRICS_PORT"; then
        TLS_PID=$STARTED_PID
        return 1
    fi
    TLS_PID=$STARTED_PID
    say "skeind (TLS) $TLS_PID: smtp 127.0.0.1:$TLS_SMTP_PORT, submission 127.0.0.1:$TLS_SUB_PORT"

    # Feature probes: STARTTLS on the MX port; AUTH PLAIN LOGIN after STARTTLS on submission.
    set +e
    out="$(timeout 60 python3 "$HELPER" probe --port "$TLS_SMTP_PORT" --starttls --cafile "$TLS_DIR/cert.pem" 2>&1)"
    rc=$?
    set -e
    say "  MX port EHLO: $(echo "$out" | tr '\n' ';')"
    if [ "$rc" -eq 3 ] && grep -q 'STARTTLS not offered' <<<"$out"; then
        tls_unavailable "EHLO does not offer STARTTLS with tls_cert/tls_key set"
        return
    fi
    [ "$rc" -eq 0 ] || { warn "STARTTLS on the MX port failed: $out"; return 1; }
    set +e
    out="$(timeout 60 python3 "$HELPER" probe --port "$TLS_SUB_PORT" --starttls --cafile "$TLS_DIR/cert.pem" 2>&1)"
    rc=$?
    set -e
    say "  submission EHLO: $(echo "$out" | tr '\n' ';')"
    if [ "$rc" -eq 3 ] && grep -q 'STARTTLS not offered' <<<"$out"; then
        tls_unavailable "the submission port does not offer STARTTLS"
        return
    fi
    [ "$rc" -eq 0 ] || { warn "STARTTLS on the submission port failed: $out"; return 1; }
    if ! grep -q '^tls: .*AUTH=[^ ]*PLAIN' <<<"$out" || ! grep -q '^tls: .*AUTH=[^ ]*LOGIN' <<<"$out"; then
        tls_unavailable "the EHLO after STARTTLS on the submission port lacks AUTH PLAIN LOGIN"
        return
    fi
    if grep -q '^plain: .*AUTH' <<<"$out"; then
        warn "AUTH is offered before STARTTLS on the submission port"
        return 1
    fi
}

need_tls() { [ -z "$TLS_SKIP" ] || skip "$TLS_SKIP"; }

case_swaks_starttls() {
    need_tls
    local exp="$T/exp-swaks-starttls" t
    tokens "c6-$RUN_ID" 2 >"$exp"
    while read -r t; do swaks_send "$TLS_SMTP_PORT" "$t" --tls; done <"$exp"
    grep -q 'TLS started' "$CURRENT_LOG" || { warn "swaks did not report 'TLS started'"; return 1; }
    await_tokens "$exp"
    expect_received_with "c6-$RUN_ID-1" ESMTPS
}

case_swaks_auth_plain() {
    need_tls
    local exp="$T/exp-swaks-plain-auth" t
    tokens "c7-$RUN_ID" 2 >"$exp"
    while read -r t; do
        swaks_send "$TLS_SUB_PORT" "$t" --tls --auth PLAIN --auth-user "$TLS_USER" --auth-password "$TLS_PASS"
    done <"$exp"
    grep -qE '^<[-~]  235 ' "$CURRENT_LOG" || { warn "no 235 reply to AUTH PLAIN"; return 1; }
    await_tokens "$exp"
    expect_received_with "c7-$RUN_ID-1" ESMTPSA
}

case_swaks_auth_login() {
    need_tls
    local exp="$T/exp-swaks-login-auth" t
    tokens "c8-$RUN_ID" 2 >"$exp"
    while read -r t; do
        swaks_send "$TLS_SUB_PORT" "$t" --tls --auth LOGIN --auth-user "$TLS_USER" --auth-password "$TLS_PASS"
    done <"$exp"
    grep -qE '^<[-~]  235 ' "$CURRENT_LOG" || { warn "no 235 reply to AUTH LOGIN"; return 1; }
    await_tokens "$exp"
    expect_received_with "c8-$RUN_ID-1" ESMTPSA
}

case_smtplib_auth() {
    need_tls
    local exp="$T/exp-smtplib-auth"
    tokens "c9-$RUN_ID" 5 >"$exp"
    # Without AUTH, MAIL on the submission port is refused with 530.
    timeout 120 python3 "$HELPER" send --port "$TLS_SUB_PORT" --starttls --cafile "$TLS_DIR/cert.pem" \
        --expect-mail-refused 530 --count 0 --token-prefix unused 2>>"$CURRENT_LOG" ||
        { warn "MAIL without AUTH on the submission port was not refused with 530"; return 1; }
    # STARTTLS, a wrong password (535), then the right one and 5 messages.
    timeout 120 python3 "$HELPER" send --port "$TLS_SUB_PORT" --starttls --cafile "$TLS_DIR/cert.pem" \
        --user "$TLS_USER" --password "$TLS_PASS" --bad-password "wrong-$TLS_PASS" \
        --count 5 --token-prefix "c9-$RUN_ID" >/dev/null 2>>"$CURRENT_LOG" ||
        { warn "smtplib STARTTLS+AUTH session failed"; return 1; }
    await_tokens "$exp"
    expect_received_with "c9-$RUN_ID-1" ESMTPSA
}

case_postfix_tls() {
    need_tls
    is_root || skip "the private Postfix instance needs root"
    [ -f "$PF/queue/pid/master.pid" ] || { warn "the private Postfix is not running (see case postfix-relay)"; return 1; }
    local exp="$T/exp-postfix-tls" t
    tokens "c10-$RUN_ID" 2 >"$exp"
    while read -r t; do postfix_send 'tls@[127.0.0.1]' "$t"; done <"$exp"
    await_tokens "$exp"
    await_postfix_queue_empty
    grep -q "TLS connection established to 127.0.0.1\[127.0.0.1\]:$TLS_SMTP_PORT" "$PF/maillog" ||
        { warn "Postfix did not log a TLS connection to skeind"; return 1; }
    expect_received_with "c10-$RUN_ID-1" ESMTPS
}

# ---------------------------------------------------------------- shutdown
# Contract: SIGTERM stops skeind gracefully and it exits 0. Runs in the main
# shell (skeind is its child, so `wait` gives the exit status).
check_sigterm() {
    local i rc t0 t1 secs
    say "== sigterm"
    t0=$(now_us)
    kill -TERM "$SKEIND_PID" 2>/dev/null || true  # if it died earlier, wait reports how
    for ((i = 0; i < 300; i++)); do
        kill -0 "$SKEIND_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SKEIND_PID" 2>/dev/null; then
        rc="still running 30s after SIGTERM"
    else
        set +e
        wait "$SKEIND_PID"
        rc=$?
        set -e
        SKEIND_PID=""
    fi
    t1=$(now_us)
    secs="$(fmt_secs "$t0" "$t1")"
    if [ "$rc" = 0 ]; then
        say "PASS: sigterm (${secs}s)"
        record sigterm 0 PASS "$secs"
    else
        warn "FAIL: sigterm: expected exit 0 after SIGTERM, got: $rc"
        CURRENT_LOG=""
        diagnose "$SK/skeind.log"
        record sigterm 0 FAIL "$secs"
        FAILED=1
    fi
}

# ---------------------------------------------------------------- run
T_START=$SECONDS
run_case swaks-plain 3 case_swaks_plain "$SK/skeind.log"
run_case swaks-pipeline 3 case_swaks_pipeline "$SK/skeind.log"
run_case smtplib 10 case_smtplib "$SK/skeind.log"
run_case smtp-source "$SOURCE_MSGS" case_smtp_source "$SK/skeind.log"
run_case postfix-relay 5 case_postfix "$SK/skeind.log"
run_case dkim-dkimpy 1 case_dkim "$SK/skeind.log"
run_case postfix-bdat 3 case_postfix_receives_bdat "$SK/skeind.log"

say "== STARTTLS/AUTH setup (INTEROP_TLS=$INTEROP_TLS)"
TLS_LOG="$T/skein-tls/skeind.log"
t0=$(now_us)
if ! setup_tls; then
    t1=$(now_us)
    warn "FAIL: tls-setup"
    CURRENT_LOG=""
    [ -z "$TLS_PID" ] || diagnose "$T/skein-tls/skeind.log"
    record tls-setup 0 FAIL "$(fmt_secs "$t0" "$t1")"
    FAILED=1
    TLS_SKIP="not run: tls-setup failed"
elif [ -n "$TLS_SKIP" ]; then
    say "SKIP: STARTTLS/AUTH cases: $TLS_SKIP (INTEROP_TLS=on makes this a failure)"
fi
run_case swaks-starttls 2 case_swaks_starttls "$TLS_LOG"
run_case swaks-auth-plain 2 case_swaks_auth_plain "$TLS_LOG"
run_case swaks-auth-login 2 case_swaks_auth_login "$TLS_LOG"
run_case smtplib-auth 5 case_smtplib_auth "$TLS_LOG"
run_case postfix-tls 2 case_postfix_tls "$TLS_LOG"

stop_postfix
check_sigterm

say ""
say "interop summary ($((SECONDS - T_START))s; skeind $SKEIND)"
printf '  %-18s %8s  %-6s %8s\n' case messages result seconds
for i in "${!R_NAME[@]}"; do
    printf '  %-18s %8s  %-6s %8s\n' "${R_NAME[$i]}" "${R_MSGS[$i]}" "${R_RESULT[$i]}" "${R_SECS[$i]}"
done
if [ -n "$TLS_SKIP" ]; then say "  (skipped: $TLS_SKIP)"; fi

if [ "$FAILED" -ne 0 ]; then
    warn "interop: FAILED"
    exit 1
fi
say "interop: ok"
