#!/usr/bin/env bash
# The whole test suite: unit tests, and end-to-end tests that start their own Apache Kafka
# brokers (scripts/broker.sh run, KRaft) on free loopback ports. Installs what a fresh machine
# lacks first (scripts/setup.sh: build dependencies, Java and Maven, Kafka's jars), once.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sieve/target}"
scripts/setup.sh
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
exec cargo nextest run --workspace --no-fail-fast -j "${SIEVE_TEST_JOBS:-2}" "$@"
