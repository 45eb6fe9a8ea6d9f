#!/usr/bin/env bash
# The whole test suite: unit tests, and end-to-end tests that start their own local brokers
# (Tansu, sqlite engine) on free loopback ports. Installs the broker once if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sieve/target}"
scripts/broker.sh install >/dev/null
export SIEVE_TANSU_BIN="$(scripts/broker.sh bin)"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
exec cargo nextest run --workspace --no-fail-fast -j "${SIEVE_TEST_JOBS:-2}" "$@"
