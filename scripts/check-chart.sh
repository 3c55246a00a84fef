#!/usr/bin/env bash
# Checks the Kubernetes artifacts without a cluster: `helm lint`, `helm template` (default
# values, an external-etcd variant and backups to a volume and to S3), and every rendered manifest, CRD and operator-built
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
# Backups to a volume, and to S3 (scripts/check-chart-backup.py checks what each renders).
"$helm" template nimbus charts/nimbus -n nimbus-system --set backup.enabled=true \
  --set backup.existingClaim=nimbus-backups > "$out/backup-dir.yaml"
"$helm" template nimbus charts/nimbus -n nimbus-system --set backup.enabled=true \
  --set backup.url=s3://nimbus-backups/prod --set backup.s3.endpoint=http://minio.infra:9000 \
  --set backup.s3.region=eu-west-3 --set backup.s3.allowHttp=true \
  --set backup.s3.credentialsSecret=nimbus-s3 > "$out/backup-s3.yaml"
# S3 with an IAM role for the operator's ServiceAccount (EKS web identity): no Secret, the
# role in the ServiceAccount's annotation.
"$helm" template nimbus charts/nimbus -n nimbus-system --set backup.enabled=true \
  --set backup.url=s3://nimbus-backups/prod \
  --set-string 'operator.serviceAccount.annotations.eks\.amazonaws\.com/role-arn=arn:aws:iam::123456789012:role/nimbus-backups' \
  > "$out/backup-s3-irsa.yaml"
grep -q '^    eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/nimbus-backups$' "$out/backup-s3-irsa.yaml" \
  || { echo "check-chart: operator.serviceAccount.annotations not on the operator's ServiceAccount" >&2; exit 1; }
"$tools/venv/bin/python" scripts/check-chart-backup.py "$out/default.yaml" "$out/backup-dir.yaml" "$out/backup-s3.yaml"
# A URL and a volume at once is refused, saying so.
if "$helm" template nimbus charts/nimbus --set backup.enabled=true --set backup.url=s3://b \
  --set backup.existingClaim=x > /dev/null 2> "$out/exclusive.err"; then
  echo "check-chart: backup.url with backup.existingClaim rendered" >&2; exit 1
fi
grep -q "backup.url and backup.existingClaim are exclusive" "$out/exclusive.err" \
  || { echo "check-chart: backup.url with backup.existingClaim: $(cat "$out/exclusive.err")" >&2; exit 1; }
# Every backup setting the chart gives is one the operator reads (`run --help` names each
# flag's environment variable).
"$target/debug/nimbus-operator" run --help > "$out/run-help.txt"
for name in $(grep -ho 'NIMBUS_BACKUP_[A-Z0-9_]*' "$out"/backup-*.yaml | sort -u); do
  grep -q "env: $name=" "$out/run-help.txt" || { echo "check-chart: the operator reads no $name" >&2; exit 1; }
done
# The operator's settings as the chart gives them (its container's environment), so the
# preview shows what that operator would build: images, pull policy, gateway replicas,
# NetworkPolicies, etcd endpoints.
chart_env() {
  "$tools/venv/bin/python" - "$1" <<'PY'
import shlex, sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc.get("kind") != "Deployment":
        continue
    for c in doc["spec"]["template"]["spec"]["containers"]:
        if c.get("args", [])[:1] == ["run"]:
            for e in c.get("env", []):
                if "value" in e and e["name"].startswith("NIMBUS_"):
                    print(f"{e['name']}={shlex.quote(str(e['value']))}")
PY
}
for variant in default external-etcd; do
  env_file="$out/operator-env-$variant"
  chart_env "$out/$variant.yaml" > "$env_file"
  grep -q NIMBUS_DATANODE_IMAGE "$env_file" || { echo "check-chart: no operator environment in the $variant chart" >&2; exit 1; }
  for example in examples/*.yaml; do
    if grep -q '^kind: DatabaseInstance' "$example"; then
      (set -a; . "$env_file"; set +a
       "$target/debug/nimbus-operator" preview "$example" --namespace apps) > "$out/preview-$variant-$(basename "$example")"
    fi
  done
done
# The preview follows the chart: its images, not the built-in defaults.
image=$(grep NIMBUS_DATANODE_IMAGE "$out/operator-env-default" | cut -d= -f2- | tr -d "'")
grep -q "image: $image" "$out"/preview-default-*.yaml || { echo "check-chart: the preview does not use the chart's datanode image $image" >&2; exit 1; }
# Custom resources (the chart's default ResourcePool) have no schema in kubernetes-validate
# (hence --no-warn); operator/tests/crds.rs validates them against the generated CRDs.
"$validate" --strict -k 1.33.0 --quiet --no-warn "$out"/*.yaml crds/*.yaml
# What a schema cannot see: mounts of Secrets that exist, probes on real ports, etcd with
# TLS and its users, the operator's RBAC for server-side apply.
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out/default.yaml"
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out/external-etcd.yaml"
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out/backup-dir.yaml"
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out/backup-s3.yaml"
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out/backup-s3-irsa.yaml"
"$tools/venv/bin/python" scripts/check-chart-objects.py "$out"/preview-*.yaml
echo "check-chart: ok"
