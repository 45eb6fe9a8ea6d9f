#!/usr/bin/env bash
# Runs one fuzz target (docs/fuzzing.md): scripts/fuzz.sh TARGET [SECONDS, default 600].
# Seeds the corpus from the shared hostile corpus (tests/corpus) and fuzz/regressions, runs
# one libFuzzer job and prints its last status line. A crash is left in
# fuzz/artifacts/TARGET/: minimise it, fix the decoder, and commit the input under
# fuzz/regressions/TARGET/ so the stable replay tests keep it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
target="$1"
seconds="${2:-600}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sieve/target-fuzz-nightly}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
features=()
case "$target" in
  jsonkey|bulk_file) ;;
  *) features=(--features services) ;;
esac
cargo +nightly fuzz build -O "${features[@]}" "$target"
corpus="corpus/$target"
mkdir -p "$corpus" "artifacts/$target" "regressions/$target"
# Seeds: every file and inline body of the shared corpus, and the committed regressions.
find ../tests/corpus -type f ! -name '*.toml' -exec cp -n {} "$corpus/" \;
python3 - "$corpus" <<'PY'
import sys, tomllib, hashlib, pathlib
out = pathlib.Path(sys.argv[1])
for m in pathlib.Path("../tests/corpus").rglob("*.toml"):
    for case in tomllib.loads(m.read_text()).get("case", []):
        body = case.get("body")
        if body is not None:
            data = body.encode()
            (out / ("seed-" + hashlib.sha1(data).hexdigest())).write_bytes(data)
PY
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/$target"
"$bin" -max_total_time="$seconds" -jobs=1 -rss_limit_mb=2048 -max_len=65536 \
  -artifact_prefix="artifacts/$target/" "$corpus" "regressions/$target" 2>&1 | tail -n 3
cat fuzz-0.log 2>/dev/null | grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|SUMMARY|ERROR|panicked" | tail -n 4 || true
mv -f fuzz-0.log "artifacts/$target/last-run.log" 2>/dev/null || true
