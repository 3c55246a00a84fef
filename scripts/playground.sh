#!/usr/bin/env bash
# From a fresh clone to a served database in one command: set up the machine (once),
# build every binary, and start the playground in .playground (extra arguments go to
# `nimbus playground up`, e.g. --isolate-zones). Stop it with
#   "$CARGO_TARGET_DIR/debug/nimbus" playground down --dir .playground
set -euo pipefail
cd "$(dirname "$0")/.."
# The same shared target directory as scripts/test.sh and bench/run: RocksDB is built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nimbus/target}"
scripts/setup.sh
cargo build --workspace --bins
exec "$CARGO_TARGET_DIR/debug/nimbus" playground up --dir .playground "$@"
