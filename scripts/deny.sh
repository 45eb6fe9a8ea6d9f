#!/usr/bin/env bash
# Dependency policy (deny.toml): licenses, bans and sources always; RustSec advisories when
# the advisory database (on GitHub) can be fetched. Bounded: the fetch gets 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "deny: installing cargo-deny"
  cargo install cargo-deny --locked --quiet
fi
if timeout 120 cargo deny fetch db >/dev/null 2>&1; then
  cargo deny --log-level warn check
else
  echo "deny: advisory database unreachable; checking licenses, bans and sources only"
  cargo deny --log-level warn check --disable-fetch licenses bans sources
fi
