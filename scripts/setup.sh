#!/usr/bin/env bash
# Installs, idempotently, what a fresh Debian bookworm machine lacks to build, run and test
# Nimbus. Safe to run again: it installs only what is missing.
set -euo pipefail

# Debian packages: libclang-dev for RocksDB's bindgen; protoc and the protobuf well-known
# types for the etcd client; etcd for the control plane and
# the benchmarks' peer, iproute2/iptables for the partition tests.
packages=(libclang-dev clang protobuf-compiler libprotobuf-dev etcd-server etcd-client iproute2 iptables curl openssl python3)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Debian etcd-server package starts a system etcd on 2379; Nimbus runs its own etcd
# processes on ports it picks, so the system one is not needed (and would only hold a port).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup" >&2; exit 1; }
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
echo "setup: ok"
