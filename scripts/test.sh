#!/usr/bin/env bash
# The whole test suite: the README's second command, and what .ci/run calls.
#
# It starts whatever the tests need on a fresh machine of this project's kind:
# - Kafka: tansu 0.6.0 with SQLite storage on 127.0.0.1:19092, built once with
#   cargo install and started fresh (new data folder) for every run;
# - RabbitMQ on 127.0.0.1:5672: runs on this machine kind already; started here
#   (rabbitmq-server -detached) if it is not.
# - Redis on 127.0.0.1:6379 (the shared dedupe store): the same, started with
#   redis-server --daemonize yes if it is not running.
# - promtool (Debian's `prometheus` package) for the alert rules' checks and
#   unit tests, installed with apt-get if it is missing.
# A test whose broker is missing fails with the command that starts it; none
# is ever skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/tansu.sh start
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "==> starting RabbitMQ (rabbitmq-server -detached)"
  rabbitmq-server -detached || true
  rabbitmqctl await_startup
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "==> starting Redis (redis-server --daemonize yes)"
  redis-server --daemonize yes --save '' --appendonly no
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && break; sleep 0.1; done
fi
trap './scripts/tansu.sh stop' EXIT
export BACKSTOP_KAFKA_BROKERS=127.0.0.1:${BACKSTOP_TANSU_PORT:-19092}

if ! command -v promtool >/dev/null 2>&1; then
  echo "==> installing promtool (apt-get install prometheus)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null; }
fi
./scripts/check-alerts.sh

echo "==> quickstart smoke: cargo run --example quickstart"
out=$(cargo run --quiet --example quickstart)
summary=$(printf '%s\n' "$out" | tail -n 1)
echo "$summary"
if ! printf '%s\n' "$summary" | grep -Eq '^summary: published=1000 ok=[0-9]+ dead_lettered=[0-9]+ retried=[0-9]+ delayed=[0-9]+ lost=0$'; then
  echo "quickstart did not end with the promised summary line" >&2
  exit 1
fi

echo "==> cargo test --workspace"
cargo test --workspace
