#!/usr/bin/env bash
# The fuzz targets (fuzz/README.md): replays each target's corpus, then fuzzes it for
# FUZZ_SECONDS (default 5; run by scripts/test.sh). New inputs go to a temporary directory,
# so a run leaves the repository as it was; a crash fails the run and leaves its input in
# fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export CARGO_TARGET_DIR="${NIMBUS_FUZZ_TARGET_DIR:-$HOME/.cache/nimbus/fuzz-target}"
# cargo fuzz passes nightly's sanitizer flags (-Z); the stable toolchain accepts them so.
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-5}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cargo fuzz build
for target in $(cargo fuzz list); do
  mkdir -p "$scratch/$target"
  out=$(cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- -max_total_time="$seconds" 2>&1) || {
    echo "$out" | tail -40
    echo "fuzz: $target failed" >&2
    exit 1
  }
  echo "fuzz: $target $(echo "$out" | grep -E '^#[0-9]+.*DONE' | tail -1)"
done
