#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test sieve: libclang (RocksDB's bindings),
# OpenSSL headers (librdkafka's TLS and SCRAM),
# Prometheus (promtool checks the alert rules; the server scrapes the services in a test) and
# the local broker (built once into ~/.cache/sieve). Safe to run again: it checks first.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s libclang-dev >/dev/null 2>&1; then
  echo "setup: installing libclang-dev (RocksDB's build needs it)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "setup: installing prometheus (promtool and the server, for the ops tests)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! dpkg -s libssl-dev >/dev/null 2>&1 || ! command -v pkg-config >/dev/null 2>&1; then
  echo "setup: installing libssl-dev and pkg-config (librdkafka's TLS and SASL/SCRAM)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config >/dev/null
fi
scripts/broker.sh install
