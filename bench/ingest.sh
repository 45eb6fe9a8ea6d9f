#!/usr/bin/env bash
# Ingest throughput on one Kafka broker (scripts/broker.sh), same records everywhere:
#   raw      `sieve ctl gen events --topic`: plain librdkafka produce, the ceiling, twice: with
#            the one `idempotency-key` header, and with the headers ingest writes (the loader
#            3, HTTP 4); the same-headers baseline is the fair ceiling.
#   bulk     `sieve ingest file` of the same events as NDJSON and as one JSON array
#   http     `sieve ingest serve` under wrk, NDJSON batches of 1, 100 and 1000 records
# Prints a markdown table (records/s, ratio to raw, p50/p99 for HTTP).
#
#   bench/ingest.sh [N] [SECONDS]       default: 100000 records, 10 s per HTTP run
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sieve/target}"
cargo build -q --bin sieve
N="${1:-100000}"; SECS="${2:-10}"
PORT=19194; HTTP=19196   # the broker's controller listens on PORT+1
work=$(mktemp -d)
cp "$CARGO_TARGET_DIR/debug/sieve" "$work/sieve"   # immune to rebuilds during the run
SIEVE="$work/sieve"
export SIEVE_BROKER_DIR="$work/broker"
srv=""
cleanup() { [ -n "$srv" ] && kill "$srv" 2>/dev/null; scripts/broker.sh stop; rm -rf "$work"; }
trap cleanup EXIT
scripts/broker.sh start "$PORT" >/dev/null
B="127.0.0.1:$PORT"
"$SIEVE" ctl topics apply --brokers "$B" --file deploy/topics.toml >/dev/null
cat >"$work/streams.toml" <<TOML
[streams.raw]
topic = "events.raw"
schema = "event.schema.json"
idempotency_field = "/event_id"
[streams.array]
topic = "events.unique"
schema = "event.schema.json"
idempotency_field = "/event_id"
[streams.http]
topic = "notify.out.push"
schema = "event.schema.json"
idempotency_field = "/event_id"
TOML
RUST_LOG=error "$SIEVE" ctl gen events --count "$N" --retry-rate 0 --conflict-rate 0 >"$work/events.ndjson"
{ echo "["; sed '$!s/$/,/' "$work/events.ndjson"; echo "]"; } >"$work/events.json"
mb=$(( $(stat -c %s "$work/events.ndjson") / 1000000 ))

raw_produce() { # raw_produce TOPIC [--header K=V …] → records/s
  local start topic=$1; shift
  start=$(date +%s.%N)
  RUST_LOG=error "$SIEVE" ctl gen events --count "$N" --retry-rate 0 --conflict-rate 0 \
    --topic "$topic" --brokers "$B" "$@" >/dev/null 2>&1
  echo "$N / ($(date +%s.%N) - $start)" | bc -l
}
raw=$(raw_produce notify.out.email)
raw_file=$(raw_produce notify.out.sms --header sieve-ingest-stream=raw --header sieve-ingest-source=file)
raw_http=$(raw_produce notify.out.inapp --header sieve-ingest-stream=http \
  --header sieve-ingest-tenant=bench --header sieve-ingest-source=http)

bulk() {  # stream file → records/s, peak RSS MiB
  local out
  out=$(RUST_LOG=error "$SIEVE" ingest file "$2" --stream "$1" --brokers "$B" --schemas schemas \
    --streams "$work/streams.toml" --checkpoint-dir "$work/cp" 2>/dev/null)
  python3 -c "import json,sys; s=json.loads(sys.argv[1]); print('%.0f %d' % (s['accepted']/s['seconds'], s['peak_rss_bytes']>>20))" "$out"
}
read -r nd nd_rss < <(bulk raw "$work/events.ndjson")
read -r arr arr_rss < <(bulk array "$work/events.json")

SIEVE_INGEST_API_KEYS="bench-key-0001@bench:*" RUST_LOG=warn "$SIEVE" ingest serve \
  --listen "127.0.0.1:$HTTP" --brokers "$B" --schemas schemas --streams "$work/streams.toml" \
  --max-records 1000 2>"$work/serve.log" &
srv=$!
until curl -sf "127.0.0.1:$HTTP/readyz" >/dev/null; do
  kill -0 "$srv" 2>/dev/null || { echo "ingest serve exited:" >&2; cat "$work/serve.log" >&2; exit 1; }
  sleep 0.2
done
cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-ndjson"
wrk.headers["Authorization"] = "Bearer bench-key-0001"
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
LUA

ratio() { echo "scale=2; $1 / ${2:-$raw}" | bc -l; }
printf "| path | records/s | × raw | × raw, same headers | notes |\n| --- | ---: | ---: | ---: | --- |\n"
printf "| raw librdkafka produce (ctl gen events), 1 header | %.0f | 1.00 | | %d records, %d MB NDJSON |\n" "$raw" "$N" "$mb"
printf "| raw produce with the loader's 3 headers | %.0f | %s | 1.00 | |\n" "$raw_file" "$(ratio "$raw_file")"
printf "| raw produce with HTTP ingest's 4 headers | %.0f | %s | 1.00 | |\n" "$raw_http" "$(ratio "$raw_http")"
printf "| bulk loader, NDJSON | %.0f | %s | %s | peak RSS %s MiB |\n" "$nd" "$(ratio "$nd")" "$(ratio "$nd" "$raw_file")" "$nd_rss"
printf "| bulk loader, JSON array | %.0f | %s | %s | peak RSS %s MiB |\n" "$arr" "$(ratio "$arr")" "$(ratio "$arr" "$raw_file")" "$arr_rss"
for batch in 1 100 1000; do
  head -n "$batch" "$work/events.ndjson" >"$work/body-$batch"
  conns=$(( batch == 1 ? 32 : 8 ))
  out=$(BODY="$work/body-$batch" wrk -t2 -c"$conns" -d"${SECS}s" --latency -s "$work/post.lua" \
    "http://127.0.0.1:$HTTP/v1/events/http")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  recs=$(echo "$rps * $batch" | bc -l)
  printf "| HTTP, %d-record batches, %d connections | %.0f | %s | %s | p50 %s, p99 %s, non-2xx %s |\n" \
    "$batch" "$conns" "$recs" "$(ratio "$recs")" "$(ratio "$recs" "$raw_http")" "$p50" "$p99" "${non2xx:-0}"
done
