#!/usr/bin/env bash
# Kafka for the tests: tansu 0.6.0 (a Kafka-protocol broker from crates.io) with
# SQLite storage, on 127.0.0.1:${BACKSTOP_TANSU_PORT:-19092}.
#
#   scripts/tansu.sh install   build tansu once (about 10 minutes on 2 cores)
#   scripts/tansu.sh start     install if needed, start a fresh broker (new data folder)
#   scripts/tansu.sh stop      stop the broker this script started
#
# See ../shared/design/BROKERS.md for why these flags: no auto-creation of
# topics, SQLite path relative to the working directory, loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.6.0
PORT=${BACKSTOP_TANSU_PORT:-19092}
STATE=target/tansu
PIDFILE=$STATE/pid

installed() {
  command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q "$VERSION"
}

install() {
  if installed; then
    return 0
  fi
  echo "==> installing tansu $VERSION with SQLite storage (cargo install, once per machine)"
  cargo install tansu --version "$VERSION" --features libsql --locked \
    || cargo install tansu --version "$VERSION" --features libsql
}

stop() {
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
  fi
}

listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

start() {
  install
  stop
  # A broker left behind by an earlier run of another checkout: ours to replace.
  pkill -f "tansu broker --listener-url tcp://127.0.0.1:$PORT " 2>/dev/null || true
  for _ in $(seq 50); do listening || break; sleep 0.1; done
  if listening; then
    echo "port $PORT is taken by a process this script did not start; stop it or set BACKSTOP_TANSU_PORT" >&2
    exit 1
  fi
  data="$STATE/data-$(date +%s)-$$"
  mkdir -p "$data"
  # Keep only the newest few data folders.
  ls -1dt "$STATE"/data-* 2>/dev/null | tail -n +4 | xargs -r rm -rf
  (
    cd "$data"
    exec tansu broker \
      --listener-url "tcp://127.0.0.1:$PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$PORT" \
      --storage-engine sqlite://tansu.db
  ) >"$data/tansu.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 100); do
    if listening; then
      echo "==> tansu $VERSION listening on 127.0.0.1:$PORT (data: $data)"
      return 0
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "tansu exited at start; its log:" >&2
      cat "$data/tansu.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "tansu did not listen on 127.0.0.1:$PORT within 10 s; log in $data/tansu.log" >&2
  exit 1
}

case "${1:-start}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
