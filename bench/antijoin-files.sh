#!/usr/bin/env bash
# File anti-join benchmark (issue: anti-join). One run, same machine, same generated data:
# N legacy user records (~120 B each, 5 % the hot key `guest`) as one JSON array, like the
# seed's legacy_users.json, against the current users (10 % of the ids, as a JSON array).
#   - sieve antijoin files
#   - DuckDB: NOT EXISTS over read_json (the peer a data engineer would reach for)
#   - the seed's naive Python: json.load both files, a set of current ids, a list comprehension
# Prints wall time and peak RSS (GNU time) per tool, ratios against DuckDB, and checks that
# every tool found the same number of missing records. DuckDB comes from PyPI into a venv
# under ~/.cache/sieve; it is skipped with a message when it cannot be installed.
#
#   bench/antijoin-files.sh [N]        default 10000000 (1.2 GB of legacy JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sieve/target}"
cargo build -q --bin sieve
SIEVE="$CARGO_TARGET_DIR/debug/sieve"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

VENV="$HOME/.cache/sieve/bench-venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q duckdb || echo "bench: no DuckDB (pip failed)" >&2
fi
PY="$VENV/bin/python"

echo "bench: generating $N legacy records and the current users" >&2
"$SIEVE" ctl gen users --side legacy --legacy "$N" --ids "$N" --array --out "$WORK/legacy.json"
"$SIEVE" ctl gen users --side current --ids "$N" --array --out "$WORK/current.json"
legacy_mb=$(( $(stat -c %s "$WORK/legacy.json") >> 20 ))

rows=()
run() { # run NAME OUTPUT CMD…: time and peak RSS of CMD, then the output's line count
  local name=$1 out=$2; shift 2
  if /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >/dev/null 2>"$WORK/err"; then
    read -r secs kb <"$WORK/time"
    rows+=("$name|$secs|$((kb / 1024))|$(wc -l <"$out")")
  else
    echo "bench: $name failed: $(tail -3 "$WORK/err")" >&2
  fi
}

run "sieve antijoin files" "$WORK/sieve.ndjson" \
  "$SIEVE" antijoin files --left "$WORK/legacy.json" --right "$WORK/current.json" \
  --out "$WORK/sieve.ndjson" --quiet
if "$PY" -c "import duckdb" 2>/dev/null; then
  run "DuckDB NOT EXISTS" "$WORK/duckdb.ndjson" "$PY" -c "
import duckdb
con = duckdb.connect()
con.execute(\"\"\"COPY (SELECT l.* FROM read_json('$WORK/legacy.json', format='array') l
  WHERE NOT EXISTS (SELECT 1 FROM read_json('$WORK/current.json', format='array') c WHERE c.id = l.id))
  TO '$WORK/duckdb.ndjson' (FORMAT JSON)\"\"\")"
fi
run "naive Python (json.load + set)" "$WORK/naive.ndjson" python3 -c "
import json
legacy = json.load(open('$WORK/legacy.json'))
current = {u['id'] for u in json.load(open('$WORK/current.json'))}
with open('$WORK/naive.ndjson', 'w') as out:
    for u in legacy:
        if u['id'] not in current:
            out.write(json.dumps(u) + '\n')"

echo
echo "$N legacy records ($legacy_mb MiB JSON array), $(nproc) cores, $(date -u +%Y-%m-%d)"
echo
echo "| tool | seconds | peak RSS (MiB) | missing records | time vs DuckDB | RSS vs DuckDB |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
duck_s="" duck_m=""
for r in "${rows[@]}"; do
  IFS='|' read -r name secs mib n <<<"$r"
  if [ "$name" = "DuckDB NOT EXISTS" ]; then duck_s=$secs; duck_m=$mib; fi
done
answers=()
for r in "${rows[@]}"; do
  IFS='|' read -r name secs mib n <<<"$r"
  answers+=("$n")
  if [ -n "$duck_s" ]; then
    ratio_t=$(awk -v a="$secs" -v b="$duck_s" 'BEGIN { printf "%.2f", a / b }')
    ratio_m=$(awk -v a="$mib" -v b="$duck_m" 'BEGIN { printf "%.2f", a / b }')
  else
    ratio_t="-" ratio_m="-"
  fi
  echo "| $name | $secs | $mib | $n | $ratio_t | $ratio_m |"
done
if [ "$(printf '%s\n' "${answers[@]}" | sort -u | wc -l)" != "1" ]; then
  echo "bench: the tools disagree on the answer" >&2
  exit 1
fi
