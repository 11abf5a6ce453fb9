#!/usr/bin/env bash
# Skein against Postfix on this machine, from one run: the same load
# generators (skein-load, then Postfix's smtp-source), the same message size
# and sessions, the same receiving MTA (skein-sink). Prints accepted/s,
# acceptance latency and end-to-end messages/s (first byte sent to last
# message received at the sink) for Postfix, a 1-node and a 3-node Skein
# cluster (every message on a majority of disks before its 250), and the
# ratios.
#
#   bash crates/skein-bench/vs-postfix.sh          # MESSAGES=5000 SESSIONS=50 SIZE=10240
#
# Needs root on Debian (apt-get for Postfix; a private Postfix instance).
set -euo pipefail
cd "$(dirname "$0")/../.."

MESSAGES="${MESSAGES:-5000}"
SESSIONS="${SESSIONS:-50}"
SIZE="${SIZE:-10240}"

if ! command -v postfix >/dev/null || ! command -v smtp-source >/dev/null; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix >/dev/null
fi
cargo build --release --locked -p skein-node --bin skeind \
    -p skein-bench --bin skein-load --bin skein-sink >/dev/null 2>&1 ||
    cargo build --release --locked -p skein-node --bin skeind -p skein-bench --bin skein-load --bin skein-sink
BIN="$PWD/target/release"

T="$(mktemp -d /tmp/skein-vs-postfix.XXXXXX)"
chmod 0755 "$T"
PIDS=()
PF="$T/postfix"
cleanup() {
    set +e
    [ -f "$PF/conf/main.cf" ] && postfix -c "$PF/conf" stop >/dev/null 2>&1
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK_PORT=$(port)
"$BIN/skein-sink" --listen "127.0.0.1:$SINK_PORT" >"$T/sink.log" &
PIDS+=($!)
delivered() { grep -c '^delivered' "$T/sink.log" || true; }

wait_delivered() { # wait_delivered N: until the sink has N messages (10 min at most)
    local want=$1 until=$((SECONDS + 600))
    while [ "$(delivered)" -lt "$want" ]; do
        [ $SECONDS -lt $until ] || { echo "the sink got $(delivered) of $want" >&2; return 1; }
        sleep 0.05
    done
}
# last_arrival FROM TO: when the latest of the sink's messages FROM+1..TO
# arrived (the sink stamps each line), so that neither this script's
# polling nor its own work after the load counts as the MTA's time.
last_arrival() {
    awk -v from="$1" -v to="$2" '/^delivered/ { n++; if (n > from && n <= to && $4 > t) t = $4 }
        END { printf "%.6f\n", t }' "$T/sink.log"
}

# cpu_ms: CPU time (user + system, ms) the MTA under test has used so far:
# its processes in MTA_ROOTS and all their descendants, plus what the roots'
# children that already exited used (Postfix's smtpd and cleanup come and go).
cpu_ms() {
    python3 - "${MTA_ROOTS[@]}" <<'PY'
import os, sys
roots = {int(p) for p in sys.argv[1:]}
hz = os.sysconf("SC_CLK_TCK")
stat = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
        stat[int(d)] = (int(f[1]), sum(map(int, f[11:13])), sum(map(int, f[13:15])))
children = {}
for pid, (ppid, _, _) in stat.items():
    children.setdefault(ppid, []).append(pid)
ticks, todo = 0, [r for r in roots if r in stat]
ticks += sum(stat[r][2] for r in todo)
while todo:
    pid = todo.pop()
    ticks += stat[pid][1]
    todo += children.get(pid, [])
print(ticks * 1000 // hz)
PY
}

ROWS=()
# measure NAME GENERATOR TARGET...: drive MESSAGES at the targets, wait until
# every accepted message reached the sink, record a row with the MTA's CPU
# time per message.
measure() {
    local name=$1 gen=$2
    shift 2
    local before start end accepted rate p50 p99 cpu0
    before=$(delivered)
    cpu0=$(cpu_ms)
    start=$(date +%s.%N)
    if [ "$gen" = skein-load ]; then
        local args=()
        for t in "$@"; do args+=(--target "$t"); done
        "$BIN/skein-load" "${args[@]}" --sessions "$SESSIONS" --messages "$MESSAGES" \
            --size "$SIZE" --rcpt sink@example.org --json >"$T/load.json"
        accepted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accepted"])' "$T/load.json")
        rate=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["accepted_per_second"]))' "$T/load.json")
        p50=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["latency_ms"]["p50"])' "$T/load.json")
        p99=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["latency_ms"]["p99"])' "$T/load.json")
        LAST_RATE=$rate
    else
        # smtp-source: one process per target, the sessions and messages split.
        local n=$# each_s each_m pids=()
        each_s=$(((SESSIONS + n - 1) / n))
        each_m=$((MESSAGES / n))
        for t in "$@"; do
            smtp-source -s "$each_s" -m "$each_m" -l "$SIZE" -f load@bench.test \
                -t sink@example.org -M bench.test "$t" &
            pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p"; done
        accepted=$((each_m * n))
        rate=$(python3 -c "print(round($accepted / ($(date +%s.%N) - $start)))")
        p50=-
        p99=-
    fi
    wait_delivered $((before + accepted))
    end=$(last_arrival "$before" $((before + accepted)))
    local e2e cpu
    e2e=$(python3 -c "print(round($accepted / ($end - $start)))")
    cpu=$(python3 -c "print(f'{($(cpu_ms) - $cpu0) / $accepted:.2f}')")
    ROWS+=("$name|$gen|$accepted|$rate|$p50|$p99|$e2e|$cpu")
    printf '  %-14s %-11s accepted %6s  %6s/s  p50 %6s ms  p99 %6s ms  end-to-end %6s/s  cpu %5s ms/msg\n' \
        "$name" "$gen" "$accepted" "$rate" "$p50" "$p99" "$e2e" "$cpu"
}

HALF_ROWS=()
# half_load NAME TARGET...: acceptance latency (end of DATA to 250) with
# skein-load offering, open loop, half the rate the last skein-load row reached.
half_load() {
    local name=$1 half msgs p50 p99
    shift
    half=$((LAST_RATE / 2))
    msgs=$((half * 10))
    local args=()
    for t in "$@"; do args+=(--target "$t"); done
    local before
    before=$(delivered)
    "$BIN/skein-load" "${args[@]}" --sessions "$SESSIONS" --messages "$msgs" --rate "$half" \
        --size "$SIZE" --rcpt sink@example.org --json >"$T/half.json"
    p50=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["latency_ms"]["p50"])' "$T/half.json")
    p99=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["latency_ms"]["p99"])' "$T/half.json")
    local acc
    acc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accepted"])' "$T/half.json")
    wait_delivered $((before + acc))
    HALF_ROWS+=("$name|$half|$acc|$p50|$p99")
    printf '  %-14s half load %6s/s  accepted %6s  p50 %6s ms  p99 %6s ms\n' "$name" "$half" "$acc" "$p50" "$p99"
}

# ---------------------------------------------------------------- Postfix
PF_PORT=$(port)
mkdir -p "$PF/conf" "$PF/queue" "$PF/data"
chown postfix "$PF/data"
cat >"$PF/conf/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:$SINK_PORT
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
biff = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
# As many smtpd processes as sessions, so Postfix is not capped below the load.
default_process_limit = $((SESSIONS + 50))
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
EOF
cat >"$PF/conf/master.cf" <<EOF
127.0.0.1:$PF_PORT inet n - n - - smtpd
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
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
postfix -c "$PF/conf" check
postfix -c "$PF/conf" start >/dev/null 2>&1
until (exec 3<>"/dev/tcp/127.0.0.1/$PF_PORT") 2>/dev/null; do sleep 0.1; done
MTA_ROOTS=("$(head -n1 "$PF/queue/pid/master.pid" | tr -d ' ')")

echo "$SESSIONS sessions, $MESSAGES messages of $SIZE bytes, one sink"
measure postfix skein-load "127.0.0.1:$PF_PORT"
half_load postfix "127.0.0.1:$PF_PORT"
measure postfix smtp-source "127.0.0.1:$PF_PORT"
postfix -c "$PF/conf" stop >/dev/null 2>&1

# ---------------------------------------------------------------- Skein
# start_skein N: N release nodes on 127.0.0.1..N, default timings, mail for
# example.org routed to the sink. Sets TARGETS.
start_skein() {
    local n=$1 i peers=""
    local base
    base="$T/skein$n"
    mkdir -p "$base"
    declare -a sp cp mp
    for ((i = 1; i <= n; i++)); do
        sp[$i]=$(port)
        cp[$i]=$(port)
        mp[$i]=$(port)
        peers+="$i = \"127.0.0.$i:${cp[$i]}\""$'\n'
    done
    TARGETS=()
    NODE_PIDS=()
    for ((i = 1; i <= n; i++)); do
        cat >"$base/node$i.toml" <<EOF
node_id = $i
data_dir = "$base/data$i"
[smtp]
listen = ["127.0.0.$i:${sp[$i]}"]
hostname = "node$i.bench.test"
# Every [smtp] setting at its default: the load comes from 127.0.0.1, in
# the default relay networks, which skip the greeting pause and the
# per-address limit as Postfix's mynetworks do.
[cluster]
listen = "127.0.0.$i:${cp[$i]}"
secret = "bench-cluster-secret"
[cluster.peers]
$peers
[admin]
token = "bench-admin-token"
[[route]]
domain = "example.org"
relay = "smtp://127.0.0.1:$SINK_PORT"
tls = "none"
[metrics]
listen = "127.0.0.$i:${mp[$i]}"
EOF
        "$BIN/skeind" --config "$base/node$i.toml" >"$base/node$i.log" 2>&1 &
        NODE_PIDS+=($!)
        PIDS+=($!)
        TARGETS+=("127.0.0.$i:${sp[$i]}")
    done
    MTA_ROOTS=("${NODE_PIDS[@]}")
    for ((i = 1; i <= n; i++)); do
        local until=$((SECONDS + 60))
        until "$BIN/skeind" ready --config "$base/node$i.toml" >/dev/null 2>&1; do
            [ $SECONDS -lt $until ] || { echo "node $i of $n not ready"; tail "$base/node$i.log"; exit 1; }
            sleep 0.2
        done
    done
}
stop_skein() {
    for p in "${NODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${NODE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}

for n in 1 3; do
    start_skein "$n"
    measure "skein $n-node" skein-load "${TARGETS[@]}"
    half_load "skein $n-node" "${TARGETS[@]}"
    measure "skein $n-node" smtp-source "${TARGETS[@]}"
    stop_skein
done

# ---------------------------------------------------------------- ratios
echo
echo "| system | generator | accepted | accepted/s | p50 ms | p99 ms | end-to-end/s | vs Postfix | MTA CPU ms/msg |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name gen acc rate p50 p99 e2e cpu <<<"$row"
    base=""
    for r in "${ROWS[@]}"; do
        IFS='|' read -r n2 g2 _ _ _ _ e2 _ <<<"$r"
        [ "$n2" = postfix ] && [ "$g2" = "$gen" ] && base=$e2
    done
    ratio=$(python3 -c "print(f'{$e2e / $base:.2f}x')")
    echo "| $name | $gen | $acc | $rate | $p50 | $p99 | $e2e | $ratio | $cpu |"
done
echo
echo "MTA CPU ms/msg: user + system time of the MTA's processes (every node of"
echo "a cluster, all of Postfix's) over the row, divided by the messages."


echo
echo "Acceptance latency at half the maximum load (skein-load, open loop):"
echo
echo "| system | offered/s | accepted | p50 ms | p99 ms |"
echo "|---|---:|---:|---:|---:|"
for row in "${HALF_ROWS[@]}"; do
    IFS='|' read -r name half acc p50 p99 <<<"$row"
    echo "| $name | $half | $acc | $p50 | $p99 |"
done
