#!/usr/bin/env bash
# The local Kafka-protocol broker for development and CI: Tansu 0.6.0 built from the Rust
# package registry, installed once into a cache directory and reused.
#
#   scripts/broker.sh install        build and install (about 11 minutes on 2 cores, once)
#   scripts/broker.sh start [PORT]   start on 127.0.0.1:PORT (default 9092), sqlite engine
#   scripts/broker.sh stop           stop the broker started by `start`
#   scripts/broker.sh bin            print the binary's path
#
# Always the sqlite engine: the memory engine skips records when a fetch starts in the middle
# of a record batch (every restart and rebalance does that). See docs/broker.md.
set -euo pipefail

TANSU_VERSION=0.6.0
CACHE="${SIEVE_CACHE:-$HOME/.cache/sieve}"
ROOT="$CACHE/tansu"
BIN="$ROOT/bin/tansu"
RUN="${SIEVE_BROKER_DIR:-$CACHE/broker}"

installed() { [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "$TANSU_VERSION"; }

install() {
  if installed; then echo "broker: tansu $TANSU_VERSION already at $BIN"; return; fi
  echo "broker: building tansu $TANSU_VERSION into $ROOT (once; about 11 minutes on 2 cores)"
  CARGO_TARGET_DIR="$CACHE/tansu-target" cargo install tansu --version "$TANSU_VERSION" \
    --locked --features dynostore,libsql --root "$ROOT" -j "${CARGO_BUILD_JOBS:-2}"
  rm -rf "$CACHE/tansu-target"
}

start() {
  local port="${1:-9092}"
  installed || install
  mkdir -p "$RUN"
  if [ -f "$RUN/pid" ] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then
    echo "broker: already running (pid $(cat "$RUN/pid"))"; return
  fi
  local url="tcp://127.0.0.1:$port"
  # Tansu resolves sqlite://PATH relative to its working directory: run it inside $RUN.
  (cd "$RUN" && exec nohup "$BIN" broker --listener-url "$url" --advertised-listener-url "$url" \
    --storage-engine "sqlite://tansu.db" >"$RUN/broker.log" 2>&1) &
  echo $! >"$RUN/pid"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      python3 "$(dirname "$0")/broker-index.py" "$RUN/tansu.db"
      echo "broker: listening on 127.0.0.1:$port (pid $(cat "$RUN/pid"), data $RUN)"; return
    fi
    sleep 0.1
  done
  echo "broker: did not start; log:" >&2; cat "$RUN/broker.log" >&2; exit 1
}

stop() {
  if [ -f "$RUN/pid" ]; then kill "$(cat "$RUN/pid")" 2>/dev/null || true; rm -f "$RUN/pid"; fi
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) stop ;;
  bin) echo "$BIN" ;;
  *) echo "usage: $0 install|start [PORT]|stop|bin" >&2; exit 2 ;;
esac
