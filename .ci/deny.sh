#!/usr/bin/env bash
# The dependency policy of deny.toml: advisories, licences, banned crates,
# sources. Advisories are checked against .ci/advisory-db, the copy of the
# RustSec database kept in the repository (CI cannot reach GitHub;
# .ci/refresh-advisories.sh refreshes it), so a new advisory against any
# dependency — or a new dependency with one — fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deny --version 2>/dev/null | grep -q '0.20.2'; then
    cargo install --locked cargo-deny --version 0.20.2 --no-default-features
fi
# cargo-deny reads the metadata of every platform's dependencies; a build
# only downloads the host's. Fetch them all (crates.io is reachable), then
# check offline.
cargo fetch --locked >/dev/null 2>&1 || cargo fetch --locked

# cargo-deny opens its databases as git checkouts, in a directory named
# after the database's URL under db-path: make one from the copy, dated as
# the copy is.
dbs=$(mktemp -d)
trap 'rm -rf "$dbs"' EXIT
db="$dbs/advisory-db-3157b0e258782691"
mkdir -p "$db"
cp -r .ci/advisory-db/. "$db/"
date=$(sed -n 3p .ci/advisory-db/SOURCE)
(
    cd "$db"
    git init --quiet
    git add -A
    GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" \
        git -c user.name=skein-ci -c user.email=ci@skein.invalid commit --quiet -m "advisory-db $(sed -n 2p SOURCE)"
)
echo "advisories as of $date ($(sed -n 2p .ci/advisory-db/SOURCE))"
# Duplicate versions are reported (warnings) but only errors fail the run.
SKEIN_ADVISORY_DBS="$dbs" cargo deny --offline --log-level error check advisories licenses bans sources
