#!/usr/bin/env bash
# The dependency policy of deny.toml: licences, banned crates, sources.
# Advisories need the RustSec database from GitHub, which CI cannot reach.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deny --version 2>/dev/null | grep -q '0.20.2'; then
    cargo install --locked cargo-deny --version 0.20.2 --no-default-features
fi
# cargo-deny reads the metadata of every platform's dependencies; a build
# only downloads the host's. Fetch them all (crates.io is reachable), then
# check offline: advisories need the RustSec database from GitHub.
cargo fetch --locked >/dev/null 2>&1 || cargo fetch --locked
# Duplicate versions are reported (warnings) but only errors fail the run.
cargo deny --offline --log-level error check licenses bans sources
