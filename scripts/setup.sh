#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test sieve: libclang (RocksDB's bindings),
# OpenSSL headers (librdkafka's TLS and SCRAM),
# Prometheus (promtool checks the alert rules; the server scrapes the services in a test), wrk,
# GNU time and python3-venv (the benchmark runner), Java 17 and Maven (Apache Kafka's jars come
# from Maven Central), cargo-machete (unused dependencies) and the broker itself (fetched once
# into ~/.cache/sieve). Safe to run again: it checks first.
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
if ! command -v wrk >/dev/null 2>&1 || [ ! -x /usr/bin/time ]; then
  echo "setup: installing wrk and GNU time (the benchmark runner's load tool and RSS meter)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk time >/dev/null
fi
if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
  echo "setup: installing python3-venv (the benchmark runner's venv)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  echo "setup: installing Java 17 and Maven (Apache Kafka runs on the JVM; its jars come from Maven Central)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
fi
# cargo-machete (CI's unused-dependency check) beside cargo-deny in the tools cache; small, a
# couple of minutes to build once.
TOOLS="${SIEVE_CACHE:-$HOME/.cache/sieve}/tools"
if ! PATH="$TOOLS/bin:$PATH" command -v cargo-machete >/dev/null 2>&1; then
  echo "setup: installing cargo-machete into $TOOLS (unused dependencies)"
  CARGO_TARGET_DIR="$TOOLS/target-machete" cargo install cargo-machete --version 0.9.2 --locked \
    --quiet --root "$TOOLS" -j "${CARGO_BUILD_JOBS:-2}"
  rm -rf "$TOOLS/target-machete"
fi
scripts/broker.sh install
