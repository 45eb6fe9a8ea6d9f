#!/usr/bin/env bash
# The demo: a fresh local broker, 100 000 generated events with 20 % client retries and 1 %
# idempotency conflicts, `sieve dedup` killed with SIGKILL mid-run and restarted, then the
# reconciliation read back from the topics themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sieve/target}"
COUNT="${SIEVE_DEMO_EVENTS:-100000}"
PORT="${SIEVE_DEMO_PORT:-19092}"
METRICS="127.0.0.1:${SIEVE_DEMO_METRICS_PORT:-19464}"
BROKERS="127.0.0.1:$PORT"

scripts/setup.sh
echo "demo: building sieve (first time: many minutes)"
cargo build -q --bin sieve
SIEVE="$CARGO_TARGET_DIR/debug/sieve"

WORK=$(mktemp -d)
export SIEVE_BROKER_DIR="$WORK/broker"
DEDUP_PID=""
cleanup() {
  [ -n "$DEDUP_PID" ] && kill "$DEDUP_PID" 2>/dev/null || true
  scripts/broker.sh stop
  rm -rf "$WORK"
}
trap cleanup EXIT
scripts/broker.sh start "$PORT"

"$SIEVE" ctl topics apply --brokers "$BROKERS" --file deploy/topics.toml >/dev/null
echo "demo: producing $COUNT events (20% retries, 1% conflicts) to events.raw"
"$SIEVE" ctl gen events --count "$COUNT" --topic events.raw --brokers "$BROKERS"

metric() { # sum of a metric's samples from the running dedup
  curl -s "http://$METRICS/metrics" | awk -v n="$1" '$1 == n || index($1, n "{") == 1 {s += $2} END {printf "%d", s}'
}
end_offsets() { # records in a topic, from the broker's end offsets
  "$SIEVE" ctl topics count --brokers "$BROKERS" --topic "$1" 2>/dev/null || echo "?"
}
run_dedup() {
  RUST_LOG=warn "$SIEVE" dedup --brokers "$BROKERS" --group demo-dedup --state-dir "$WORK/state" \
    --metrics-addr "$METRICS" -X session.timeout.ms=6000 2>>"$WORK/dedup.log" &
  DEDUP_PID=$!
}

started=$(date +%s%N)
run_dedup
until [ "$(metric sieve_records_in_total 2>/dev/null || echo 0)" -gt $((COUNT / 3)) ]; do sleep 0.2; done
echo "demo: SIGKILL dedup after $(metric sieve_records_in_total) records (no graceful anything)"
kill -9 "$DEDUP_PID"; wait "$DEDUP_PID" 2>/dev/null || true
run_dedup
echo "demo: restarted; it resumes from its RocksDB state and checks the output tail"
until curl -sf "http://$METRICS/readyz" >/dev/null 2>&1; do sleep 0.2; done
until [ "$("$SIEVE" ctl lag --brokers "$BROKERS" --group demo-dedup --topic events.raw --total 2>/dev/null || echo 1)" = "0" ]; do sleep 0.5; done
elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
kill -TERM "$DEDUP_PID"; wait "$DEDUP_PID" 2>/dev/null || true; DEDUP_PID=""

unique=$("$SIEVE" ctl topics count --brokers "$BROKERS" --topic events.unique)
dlq=$("$SIEVE" ctl topics count --brokers "$BROKERS" --topic dlq.dedup)
distinct=$("$SIEVE" ctl topics count --brokers "$BROKERS" --topic events.unique --distinct-keys)
expected=$("$SIEVE" ctl gen events --count "$COUNT" --summary)
cat <<SUMMARY

  sieve dedup — $COUNT events in $((elapsed_ms / 1000)).$(( (elapsed_ms % 1000) / 100 )) s, one SIGKILL in the middle
  generated:            $expected
  events.unique:        $unique records, $distinct distinct keys (each key exactly once)
  dlq.dedup:            $dlq idempotency conflicts
  duplicates dropped:   $((COUNT - unique - dlq))
  reconciliation:       in $COUNT = unique $unique + duplicates $((COUNT - unique - dlq)) + dlq $dlq

  Metrics while it runs: http://$METRICS/metrics  (sieve_dedup_*, sieve_records_*, sieve_consumer_lag)
SUMMARY
