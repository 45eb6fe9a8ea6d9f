#!/usr/bin/env bash
# Dependency policy (deny.toml): licenses, bans and sources always; RustSec advisories when
# the advisory database (on GitHub) can be fetched. Bounded: the fetch gets 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
# Installed once into the cache the other scripts use (a few minutes on 2 cores).
TOOLS="${SIEVE_CACHE:-$HOME/.cache/sieve}/tools"
export PATH="$TOOLS/bin:$PATH"
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "deny: installing cargo-deny into $TOOLS"
  CARGO_TARGET_DIR="$TOOLS/target" cargo install cargo-deny --version 0.20.2 --locked --quiet \
    --root "$TOOLS" -j "${CARGO_BUILD_JOBS:-2}"
  rm -rf "$TOOLS/target"
fi
if timeout 120 cargo deny fetch db >/dev/null 2>&1; then
  cargo deny --log-level warn check
else
  echo "deny: advisory database unreachable; checking licenses, bans and sources only"
  cargo deny --log-level warn check licenses bans sources
fi
