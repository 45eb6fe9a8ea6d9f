#!/usr/bin/env bash
# Peak RSS of `sieve dedup` as the number of distinct keys grows 10x (issue: dedup, "RSS flat
# as the key count grows"). For each size: a fresh local broker (sqlite engine), N generated
# events (20 % retries, 1 % conflicts), dedup as a child process until its lag is 0, then its
# VmHWM from /proc. Prints a markdown table.
#
#   bench/dedup-rss.sh [N1 N2 ...]      default: 50000 500000
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sieve/target}"
cargo build -q --bin sieve
SIEVE="$CARGO_TARGET_DIR/debug/sieve"
PORT=19193
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(50000 500000)
echo "| events | distinct keys | peak RSS (MiB) | state on disk (MiB) | seconds |"
echo "| ---: | ---: | ---: | ---: | ---: |"
for n in "${sizes[@]}"; do
  work=$(mktemp -d)
  export SIEVE_BROKER_DIR="$work/broker"
  scripts/broker.sh start "$PORT" >/dev/null
  "$SIEVE" ctl topics apply --brokers "127.0.0.1:$PORT" --file deploy/topics.toml >/dev/null
  RUST_LOG=error "$SIEVE" ctl gen events --count "$n" --topic events.raw --brokers "127.0.0.1:$PORT" 2>/dev/null
  start=$(date +%s)
  RUST_LOG=warn "$SIEVE" dedup --brokers "127.0.0.1:$PORT" --group rss --state-dir "$work/state" \
    --metrics-addr 127.0.0.1:0 2>"$work/dedup.log" &
  pid=$!
  until [ "$("$SIEVE" ctl lag --brokers "127.0.0.1:$PORT" --group rss --topic events.raw --total 2>/dev/null || echo 1)" = "0" ]; do sleep 1; done
  secs=$(( $(date +%s) - start ))
  peak_kb=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill -TERM "$pid"; wait "$pid" || true
  keys=$("$SIEVE" ctl topics count --brokers "127.0.0.1:$PORT" --topic events.unique)
  disk=$(du -sm "$work/state" | cut -f1)
  echo "| $n | $keys | $((peak_kb / 1024)) | $disk | $secs |"
  scripts/broker.sh stop
  rm -rf "$work"
done
