#!/usr/bin/env bash
# End to end on kind: build and load the images, install the chart, apply examples/, wait
# for Ready, write and read through the gateway, delete the leader's Pod and show the
# instance recovers, delete the instance and show cleanup. Needs docker, kind, kubectl and
# helm (scripts/setup.sh fetches helm). Skips, with a message, where docker or kind is absent.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1 || ! command -v kind >/dev/null; then
  echo "e2e/kind: SKIPPED: needs a Docker engine and kind (neither runs on this machine); see README, 'Kubernetes end to end'"
  exit 0
fi
helm="${HELM:-$(command -v helm || echo "$HOME/.cache/nimbus/tools/layer/helm/helm")}"
cluster="${KIND_CLUSTER:-nimbus-e2e}"
ns=nimbus-system
tag=e2e
cleanup() { [ -n "${KEEP_CLUSTER:-}" ] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; kill "${pf:-0}" 2>/dev/null || true; }
trap cleanup EXIT

step() { echo "== $*"; }
wait_for() { # wait_for <seconds> <what> <command...>
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $what" >&2; kubectl -n $ns get dbi,pods -o wide >&2; exit 1; }
    sleep 2
  done
}

step "images"
for b in datanode gateway operator; do docker build -q -f docker/Dockerfile.$b -t nimbus-$b:$tag . ; done
step "cluster"
kind create cluster --name "$cluster" --config e2e/kind/kind-config.yaml --wait 120s
for b in datanode gateway operator; do kind load docker-image --name "$cluster" nimbus-$b:$tag; done
step "chart"
"$helm" install nimbus charts/nimbus -n $ns --create-namespace --wait --timeout 5m \
  --set images.operator=nimbus-operator:$tag --set images.datanode=nimbus-datanode:$tag \
  --set images.gateway=nimbus-gateway:$tag --set images.pullPolicy=Never
step "instance"
kubectl -n $ns apply -f examples/database-instance.yaml
wait_for 600 "shop Ready" bash -c "kubectl -n $ns get dbi shop -o jsonpath='{.status.phase}' | grep -qx Ready"
kubectl -n $ns get dbi -o wide
token=$(kubectl -n $ns get secret shop-credentials -o jsonpath='{.data.token}' | base64 -d)
kubectl -n $ns port-forward svc/nimbus-gateway 18080:8080 >/dev/null 2>&1 & pf=$!
wait_for 60 "port-forward" curl -sf http://127.0.0.1:18080/healthz
api=http://127.0.0.1:18080/v1/databases/shop/collections/orders
curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"documents":[{"_id":"o1","total":42}]}' $api/documents
curl -sf -H "Authorization: Bearer $token" $api/documents/o1 | grep -q '"total":42'
step "kill the leader's pod"
leader=$(kubectl -n $ns get dbi shop -o jsonpath='{.status.placement.leader}')
kubectl -n $ns delete pod "$leader" --wait=false
wait_for 300 "a new leader" bash -c "[ \"\$(kubectl -n $ns get dbi shop -o jsonpath='{.status.placement.leader}')\" != '$leader' ]"
wait_for 300 "shop Ready again" bash -c "kubectl -n $ns get dbi shop -o jsonpath='{.status.phase}' | grep -qx Ready"
curl -sf -H "Authorization: Bearer $token" $api/documents/o1 | grep -q '"total":42'
step "delete the instance"
kubectl -n $ns delete dbi shop --wait=true --timeout=120s
wait_for 60 "credentials gone" bash -c "! kubectl -n $ns get secret shop-credentials"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" $api/documents/o1)
[ "$code" = 401 ] || { echo "expected 401 after deletion, got $code" >&2; exit 1; }
echo "e2e/kind: passed"
