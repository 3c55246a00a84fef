#!/usr/bin/env bash
# Checks the Kubernetes artifacts without a cluster: `helm lint`, `helm template` (default
# values and an external-etcd variant), and every rendered manifest, CRD and operator-built
# object validated with kubernetes-validate against Kubernetes 1.33 schemas (strict: an
# unknown field is an error). Run by scripts/test.sh; tools come from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${NIMBUS_TOOLS:-$HOME/.cache/nimbus/tools}"
helm="$tools/layer/helm/helm"
validate="$tools/venv/bin/kubernetes-validate"
[ -x "$helm" ] && [ -x "$validate" ] || { echo "check-chart: helm or kubernetes-validate missing: run scripts/setup.sh" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-$HOME/.cache/nimbus/target}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

"$helm" lint --strict charts/nimbus
"$helm" template nimbus charts/nimbus -n nimbus-system > "$out/default.yaml"
"$helm" template nimbus charts/nimbus -n nimbus-system --set etcd.enabled=false \
  --set 'etcd.endpoints={http://etcd.infra:2379}' > "$out/external-etcd.yaml"
for example in examples/*.yaml; do
  if grep -q '^kind: DatabaseInstance' "$example"; then
    "$target/debug/nimbus-operator" preview "$example" --namespace apps > "$out/preview-$(basename "$example")"
  fi
done
# Custom resources (the chart's default ResourcePool) have no schema in kubernetes-validate
# (hence --no-warn); operator/tests/crds.rs validates them against the generated CRDs.
"$validate" --strict -k 1.33.0 --quiet --no-warn "$out"/*.yaml crds/*.yaml
# What a schema cannot see: mounts of Secrets that exist, probes on real ports, etcd with
# TLS and its users, the operator's RBAC for server-side apply.
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out/default.yaml"
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out/external-etcd.yaml"
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out"/preview-*.yaml
echo "check-chart: ok"
