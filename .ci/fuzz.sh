#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 30) each,
# starting from the committed seed corpus. A crash fails the run and leaves
# the reproducer under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-30}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz --version 0.13.1
fi
# libFuzzer instrumentation needs unstable flags; the stable toolchain allows
# them for this build only.
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
cargo fuzz build -O
for t in $targets; do
    mkdir -p "corpus-run/$t"
    cp -n corpus/"$t"/* "corpus-run/$t/" 2>/dev/null || true
    echo "== fuzz $t for ${seconds}s"
    cargo fuzz run -O "$t" "corpus-run/$t" -- \
        -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 2>&1 |
        tail -n 40
done
