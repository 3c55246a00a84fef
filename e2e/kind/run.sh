#!/usr/bin/env bash
# End to end on kind: build and load the images, install the chart, apply examples/, wait
# for Ready, write and read through the gateway's Service, run the contract smoke test,
# delete the leader's Pod and show the instance recovers, lose a zone (its node stopped)
# and show writes go on, delete the instance and show cleanup. Needs docker, kind, kubectl and
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
forwards=()
cleanup() {
  # Only what this script started: never `kill 0` (the whole process group) when a step
  # failed before anything was forwarded.
  for p in "${forwards[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${KEEP_CLUSTER:-}" ] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
}
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
read_only=$(kubectl -n $ns get secret shop-credentials -o jsonpath='{.data.readOnlyToken}' | base64 -d)
# The gateways through a Service, as clients reach them (kind maps node port 30080 to
# 127.0.0.1:18080, see kind-config.yaml).
kubectl -n $ns apply -f - <<'YAML'
apiVersion: v1
kind: Service
metadata: {name: nimbus-gateway-e2e}
spec:
  type: NodePort
  selector: {app.kubernetes.io/name: nimbus, app.kubernetes.io/component: gateway}
  ports: [{name: http, port: 8080, targetPort: http, nodePort: 30080}]
YAML
gw=http://127.0.0.1:18080
wait_for 120 "the gateway Service" curl -sf $gw/readyz
api=$gw/v1/databases/shop/collections/orders
curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"documents":[{"_id":"o1","total":42}]}' $api/documents
curl -sf -H "Authorization: Bearer $token" $api/documents/o1 | grep -q '"total":42'

step "contract smoke test"
# The shapes API.md promises, checked by ../shared/contract/smoke.py against a state file
# in playground.json's shape: the gateway Service, the instance, each member's admin port.
state=$(mktemp -d)
datanodes=()
port=17100
for pod in $(kubectl -n $ns get pods -l app.kubernetes.io/component=datanode -o name); do
  kubectl -n $ns port-forward "$pod" $port:7100 >/dev/null 2>&1 & forwards+=($!)
  datanodes+=("{\"id\": \"${pod#pod/}\", \"admin\": \"http://127.0.0.1:$port\"}")
  port=$((port + 1))
done
for p in $(seq 17100 $((port - 1))); do wait_for 60 "port-forward $p" curl -s -o /dev/null http://127.0.0.1:$p/healthz; done
cat > "$state/playground.json" <<JSON
{"gateway": "$gw", "datanodes": [$(IFS=,; echo "${datanodes[*]}")],
 "instances": {"shop": {"database": "shop", "token": "$token", "readOnlyToken": "$read_only"}}}
JSON
python3 "${NIMBUS_SHARED:-../shared}/contract/smoke.py" "$state/playground.json" | tee "$state/smoke.log"
grep -q ' 0 failed' "$state/smoke.log"

step "kill the leader's pod"
leader=$(kubectl -n $ns get dbi shop -o jsonpath='{.status.placement.leader}')
kubectl -n $ns delete pod "$leader" --wait=false
wait_for 300 "a new leader" bash -c "[ \"\$(kubectl -n $ns get dbi shop -o jsonpath='{.status.placement.leader}')\" != '$leader' ]"
wait_for 300 "shop Ready again" bash -c "kubectl -n $ns get dbi shop -o jsonpath='{.status.phase}' | grep -qx Ready"
curl -sf -H "Authorization: Bearer $token" $api/documents/o1 | grep -q '"total":42'
step "lose a zone"
# The node of the zone holding a follower stops (its container, as a zone outage would):
# the other two zones keep a majority, so writes go on being acknowledged.
leader=$(kubectl -n $ns get dbi shop -o jsonpath='{.status.placement.leader}')
leader_zone=$(kubectl -n $ns get pod "$leader" -o jsonpath="{.metadata.labels['nimbus\.io/zone']}")
lost_zone=$(kubectl -n $ns get dbi shop -o jsonpath='{.status.placement.members[*].zone}' | tr ' ' '\n' | grep -vx "$leader_zone" | head -1)
lost_node=$(kubectl get nodes -l topology.kubernetes.io/zone="$lost_zone" -o jsonpath='{.items[0].metadata.name}')
docker stop "$lost_node" >/dev/null
# A gateway Pod on the stopped node stays an endpoint until the node is NotReady (about
# 40 s): a client retries, as this one does, with an idempotency key (API.md) so that a
# retried write is answered from its record, never applied twice.
for i in 1 2 3 4 5; do
  curl -sf --retry 10 --retry-all-errors --retry-delay 2 -H "Authorization: Bearer $token" \
    -H "Idempotency-Key: zone-loss-$i" -H 'content-type: application/json' -d "{\"documents\":[{\"_id\":\"z$i\"}]}" $api/documents >/dev/null
done
curl -sf --retry 10 --retry-all-errors --retry-delay 2 -H "Authorization: Bearer $token" "$api/documents/z5" \
  | grep -q '"_id":"z5"'
docker start "$lost_node" >/dev/null
wait_for 600 "shop Ready with the zone back" bash -c "kubectl -n $ns get dbi shop -o jsonpath='{.status.phase}' | grep -qx Ready"

step "delete the instance"
kubectl -n $ns delete dbi shop --wait=true --timeout=120s
wait_for 60 "credentials gone" bash -c "! kubectl -n $ns get secret shop-credentials"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" $api/documents/o1)
[ "$code" = 401 ] || { echo "expected 401 after deletion, got $code" >&2; exit 1; }
echo "e2e/kind: passed"
