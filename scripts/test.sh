#!/usr/bin/env bash
# The test suite: builds every binary (the multi-process tests start them), then runs all
# tests. CI runs exactly this after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# One target directory shared by every clone on this machine: RocksDB's C++ takes ~20 min
# to build cold, so it is built once and reused.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nimbus/target}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"
cargo fmt --all -- --check
cargo build --workspace --bins
cargo clippy --workspace --all-targets --quiet -- -D warnings
scripts/check-chart.sh
e2e/kind/run.sh   # skips, saying so, without Docker and kind
cargo nextest run --workspace
scripts/fuzz.sh    # every fuzz corpus replayed, then a few seconds of fuzzing per target
