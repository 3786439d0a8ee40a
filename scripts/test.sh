#!/usr/bin/env bash
# The whole test suite: the README's second command, and what .ci/run calls.
#
# It starts whatever the tests need on a fresh machine of this project's kind.
# Today that is nothing beyond the Rust toolchain: the core, the conformance
# suite and the quickstart run on the in-memory broker. Broker-backed suites
# (tansu for Kafka, the local RabbitMQ) are started from here when their
# crates arrive, and a test whose broker is missing fails with the command to
# start it; none is ever skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

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
