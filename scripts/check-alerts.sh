#!/usr/bin/env bash
# Checks the Prometheus side of deploy/: the alert rules, the scrape config and
# the rules' unit tests (deploy/prometheus/alerts_test.yml), with promtool.
#
# promtool comes with Debian's `prometheus` package:
#   apt-get install -y --no-install-recommends prometheus
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "check-alerts: promtool not found; it is in Debian's 'prometheus' package:" >&2
  echo "  apt-get install -y --no-install-recommends prometheus" >&2
  exit 1
fi

echo "==> $(promtool --version 2>&1 | head -n 1)"
echo "==> promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml
echo "==> promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml
echo "==> promtool test rules deploy/prometheus/alerts_test.yml"
promtool test rules deploy/prometheus/alerts_test.yml
