#!/usr/bin/env bash
# The dependency policy of deny.toml: licences, banned crates, sources.
# Advisories need the RustSec database from GitHub, which CI cannot reach.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deny --version 2>/dev/null | grep -q '0.20.2'; then
    cargo install --locked cargo-deny --version 0.20.2 --no-default-features
fi
# Duplicate versions are reported (warnings) but only errors fail the run.
cargo deny --offline --log-level error check licenses bans sources
