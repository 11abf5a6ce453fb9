#!/usr/bin/env bash
# The docs' walk-throughs, run as written from the docs themselves
# (.ci/walkthroughs.py): the README's quickstart and three nodes on one
# machine (with a drain), check-config's sample output in
# docs/configuration.md, the cluster certificates of docs/security.md, and
# the compose demo of docs/deploy.md. What an
# operator follows first cannot drift from what the code does.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi
python3 -c 'import aiosmtpd' 2>/dev/null || python3 -m pip install -q aiosmtpd
cargo build --locked -p skein-node --bin skeind -p skein-ctl --bin skeinctl
bash .ci/image.sh
# The compose demo ends with `down -v`; if it fails part way, its cluster
# must not outlive the run either.
trap 'docker-compose -f docker/compose.yml down -v --remove-orphans >/dev/null 2>&1 || true' EXIT
python3 .ci/walkthroughs.py quickstart three-nodes check-config certificates compose
