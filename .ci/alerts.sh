#!/usr/bin/env bash
# The alert rules in docs/prometheus-alerts.yml: valid for Prometheus
# (promtool check rules) and firing when they should (.ci/alerts-test.yml).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
    # Debian's prometheus package carries promtool; its service is not needed.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
fi
promtool check rules docs/prometheus-alerts.yml
promtool test rules .ci/alerts-test.yml
