#!/usr/bin/env bash
# Refreshes .ci/advisory-db, the copy of the RustSec advisory database that
# `.ci/deny.sh` checks the dependencies against (CI cannot reach GitHub).
# Run it where GitHub is reachable and commit the result:
#   bash .ci/refresh-advisories.sh && git add .ci/advisory-db
set -euo pipefail
cd "$(dirname "$0")"

url=https://github.com/rustsec/advisory-db
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone --quiet --depth 1 "$url" "$tmp/db"
rm -rf advisory-db
mkdir advisory-db
# The advisories and their licence; the repository's tooling is not needed.
cp -r "$tmp/db/crates" "$tmp/db/rust" "$tmp/db/README.md" "$tmp/db/LICENSE.txt" advisory-db/
{
    echo "$url"
    git -C "$tmp/db" log -1 --format=%H
    git -C "$tmp/db" log -1 --format=%cI
} >advisory-db/SOURCE
echo "advisory-db now at $(sed -n 2p advisory-db/SOURCE) ($(sed -n 3p advisory-db/SOURCE))"
