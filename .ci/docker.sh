#!/usr/bin/env bash
# The Docker tier: the compose cluster of docker/compose.yml on an image
# built here from the host's binaries (no registry to pull a base from).
# Through the round-robin name mx.skein.test it sends mail, kills the
# leader's container, cuts a node off the network, brings both back, and
# checks that every acknowledged message reached the sink and that the
# cluster healed.
set -euo pipefail
cd "$(dirname "$0")/.."

project=skeinci
compose=(docker-compose -p "$project" -f docker/compose.yml)
net="${project}_default"
work=$(mktemp -d)
# Private, as skeind's own warning advises: the compose file must cope.
chmod 600 docker/secrets/*
cleanup() {
    "${compose[@]}" logs --no-color > "$work/compose.log" 2>&1 || true
    if [ "${ok:-0}" != 1 ]; then tail -n 80 "$work/compose.log" || true; fi
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "-- image from the host's binaries"
bash .ci/image.sh

run_tool() { docker run --rm --network "$net" skein:latest "$@"; }
# skeinctl as the compose file's tools service runs it: the token from a file.
ctl() { "${compose[@]}" run --rm -T -e SKEIN_NODE="$1" tools skeinctl --json status; }
cid() { "${compose[@]}" ps -q "$1"; }
healthy() {
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$(cid "$1")" 2>/dev/null)" = healthy ]
}
wait_for() { # seconds, description, command...
    local until=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if [ $SECONDS -ge $until ]; then echo "timed out: $what"; return 1; fi
        sleep 1
    done
}
all_healthy() { healthy skein1 && healthy skein2 && healthy skein3; }
leader_of() { ctl "$1" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])'; }
agreed() { # every node names the same leader and sees every node reachable
    local seen=""
    for n in skein1 skein2 skein3; do
        seen="$seen $(ctl $n:7100 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
ok = s["leader"] != 0 and len(s["nodes"]) == 3 and all(n["reachable"] for n in s["nodes"])
print(s["leader"] if ok else "no")' || echo no)"
    done
    set -- $seen
    [ "$1" != no ] && [ "$1" = "$2" ] && [ "$2" = "$3" ]
}

echo "-- three nodes behind mx.skein.test"
start=$SECONDS
"${compose[@]}" up -d --no-build skein1 skein2 skein3 sink
[ "$(docker inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$(cid skein1)")" = unless-stopped ] ||
    { echo "the nodes are not restarted when they exit"; exit 1; }
wait_for 120 "three healthy nodes" all_healthy
wait_for 60 "an agreed leader" agreed
echo "   up and agreed in $((SECONDS - start))s"

echo "-- mail through the round-robin name"
run_tool skein-mail --to mx.skein.test:25 --count 60 --prefix calm > "$work/calm.txt"
echo "   $(grep -c '^ack' "$work/calm.txt") of 60 acknowledged, by $(grep '^ack' "$work/calm.txt" | awk '{print $3}' | sort -u | wc -l) different nodes"

echo "-- faults under load"
docker run --rm --network "$net" skein:latest skein-mail --to mx.skein.test:25 \
    --count 400 --interval 25ms --prefix storm > "$work/storm.txt" &
sender=$!
leader=$(leader_of skein1:7100)
victim="skein$leader"
cut="skein$(( leader % 3 + 1 ))"
sleep 2
echo "   docker kill $victim (the leader)"
docker kill "$(cid "$victim")" >/dev/null
sleep 4
echo "   docker network disconnect $cut"
docker network disconnect "$net" "$(cid "$cut")"
sleep 4
echo "   reconnect $cut, start $victim"
docker network connect --alias "$cut" --alias mx.skein.test "$net" "$(cid "$cut")"
docker start "$(cid "$victim")" >/dev/null
heal_start=$SECONDS
wait "$sender"
wait_for 120 "the killed node healthy again" all_healthy
wait_for 60 "one leader, every node reachable" agreed
echo "   healed $((SECONDS - heal_start))s after the restart; leader now node $(leader_of skein1:7100)"

echo "-- every acknowledged message at the sink"
cat "$work/calm.txt" "$work/storm.txt" > "$work/sent.txt"
grep '^ack' "$work/sent.txt" | awk '{print $2}' | sort -u > "$work/acked.txt"
arrived() {
    docker logs "$(cid sink)" 2>/dev/null | awk '/^delivered/ {print $2}' > "$work/delivered-all.txt"
    sort -u "$work/delivered-all.txt" > "$work/delivered.txt"
    [ -z "$(comm -23 "$work/acked.txt" "$work/delivered.txt")" ]
}
if ! wait_for 120 "every acknowledged message delivered" arrived; then
    echo "LOST: $(comm -23 "$work/acked.txt" "$work/delivered.txt" | wc -l) acknowledged messages:"
    comm -23 "$work/acked.txt" "$work/delivered.txt" | head -20
    exit 1
fi
sent=$(wc -l < "$work/sent.txt")
acked=$(wc -l < "$work/acked.txt")
distinct=$(wc -l < "$work/delivered.txt")
dups=$(( $(wc -l < "$work/delivered-all.txt") - distinct ))
echo "   sent $sent, acknowledged $acked, delivered $distinct distinct, $dups duplicate deliveries, lost 0"
ok=1
echo "docker tier: PASS"
