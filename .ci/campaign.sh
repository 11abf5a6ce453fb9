#!/usr/bin/env bash
# The short fault campaign: three real skeind processes, a seeded schedule of
# kills, pauses, restarts, partitions and clock offsets for CAMPAIGN_SECONDS,
# then the checker (exit 1 on any lost, phantom or corrupted message).
# docs/reliability.md has the long runs and how to reproduce any seed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -qq faketime >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq faketime >/dev/null 2>&1; } ||
            echo "libfaketime not installed: the campaign runs without clock offsets"
    fi
fi
cargo build --locked -p skein-tests --bin skein-campaign --bin skeind-under-test
cargo build --locked -p skein-faultfs
for seed in ${CAMPAIGN_SEEDS:-7}; do
    target/debug/skein-campaign --seed "$seed" --duration "${CAMPAIGN_SECONDS:-60}s"
done
