#!/usr/bin/env python3
"""Checks the rendered chart as data: what a real API server and kubelet would need that a
schema cannot see. Usage: check-chart-objects.py RENDERED.yaml (run by check-chart.sh)."""
import sys

import yaml

docs = [d for path in sys.argv[1:] for d in yaml.safe_load_all(open(path)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


secrets = set(by_kind.get("Secret", {}))
pod_specs = [(kind, name, obj["spec"]["template"]["spec"]) for kind in ("Deployment", "StatefulSet")
             for name, obj in by_kind.get(kind, {}).items()]
pod_specs += [("Pod", name, obj["spec"]) for name, obj in by_kind.get("Pod", {}).items()]
for kind, name, spec in pod_specs:
    sc = spec.get("securityContext", {})
    for v in spec.get("volumes", []):
        if "secret" not in v:
            continue
        if kind != "Pod":  # the operator's Pods mount Secrets it makes in their namespace
            check(v["secret"]["secretName"] in secrets, f"{kind} {name} mounts a Secret the chart does not make: {v}")
        # A Secret's files are root's: without o+r the process reads them only as their
        # group, which fsGroup makes its own.
        mode = v["secret"].get("defaultMode", 0o644)
        if sc.get("runAsUser", 0) != 0 and not mode & 0o004:
            check("fsGroup" in sc and sc["fsGroup"] == sc.get("runAsGroup", sc["fsGroup"]),
                  f"{kind} {name}: Secret volume {v['name']} (mode {oct(mode)}) is unreadable without fsGroup")
for kind, name, spec in pod_specs:
    ports = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
    for c in spec["containers"]:
        for probe in ("readinessProbe", "livenessProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str):
                check(port in ports, f"{kind} {name}: {probe} on a port it does not have: {port}")

etcd = next((o for n, o in by_kind.get("StatefulSet", {}).items() if n.endswith("-etcd")), None)
if etcd is not None:
    spec = etcd["spec"]["template"]["spec"]
    check(spec["initContainers"][0]["args"][0] == "etcd-member", "etcd's init container is etcd-member")
    args = spec["initContainers"][0]["args"]
    check(any(a.startswith("--tls-dir=") for a in args), "etcd runs TLS")
    check(all("https://" in a for a in args if a.startswith("--peers=") or a.startswith("--etcd=")), "etcd URLs are https")
    check(spec["containers"][0]["command"] == ["etcd", "--config-file=/var/run/etcd/etcd.yaml"], "etcd reads its file")
    op = by_kind["Deployment"][etcd["metadata"]["name"].replace("-etcd", "-operator")]
    init = op["spec"]["template"]["spec"].get("initContainers", [])
    check(init and init[0]["args"] == ["etcd-setup"], "the operator sets up etcd's users before it runs")
    setup_env = {e["name"]: e.get("value") for e in init[0]["env"]} if init else {}
    member_env = {e["name"]: e.get("valueFrom", {}) for e in spec["initContainers"][0]["env"]}
    state = setup_env.get("NIMBUS_ETCD_STATE_CONFIGMAP")
    check(state and member_env.get("NIMBUS_ETCD_BOOTSTRAPPED", {}).get("configMapKeyRef", {}).get("name") == state,
          "etcd's members read the record that etcd-setup writes")
    roles = [r for r in by_kind.get("Role", {}).values()]
    check(any("configmaps" in rule["resources"] and {"create", "patch"} <= set(rule["verbs"]) for r in roles for rule in r["rules"]),
          "the operator may record that etcd was bootstrapped")
    env = {e["name"]: e.get("value") for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}
    check(env.get("NIMBUS_ETCD_CERT_FILE", "").endswith("etcd-operator.crt"), "the operator connects with its own certificate")
    check("-etcd" in {n[-5:] for n in by_kind.get("NetworkPolicy", {})}, "etcd has a NetworkPolicy")

# The reconciler tests enforce the RBAC they read from the template itself (operator/src/k8s/
# fake/rbac.rs: three substitutions, anything else refused); it must be what helm renders.
template = open("charts/nimbus/templates/rbac.yaml").read()
lines = [l.replace("{{ .Release.Name }}", "nimbus").replace("{{ .Release.Namespace }}", "nimbus-system")
         for l in template.splitlines() if l.strip() != '{{- include "nimbus.labels" . | nindent 4 }}']
as_tests_read = {(d["kind"], d["metadata"]["name"]): d.get("rules") for d in yaml.safe_load_all("\n".join(lines)) if d}
for (kind, name), rules in as_tests_read.items():
    if kind in ("Role", "ClusterRole") and name in by_kind.get(kind, {}):
        check(by_kind[kind][name]["rules"] == rules, f"{kind} {name}: the tests' reading of rbac.yaml differs from helm's")

role = next(iter(by_kind.get("ClusterRole", {}).values()), None)
if role is None:  # the operator's objects alone (preview)
    for f in failures:
        print("check-chart-objects: FAIL " + f)
    sys.exit(1 if failures else 0)
verbs = {}
for rule in role["rules"]:
    for r in rule["resources"]:
        verbs.setdefault(r, set()).update(rule["verbs"])
# What the operator server-side applies: SSA creates missing objects, so it needs create.
for r in ("services", "secrets", "deployments", "poddisruptionbudgets", "networkpolicies", "pods", "persistentvolumeclaims"):
    check({"create", "patch"} <= verbs.get(r, set()), f"the operator may create and patch {r}")

for f in failures:
    print("check-chart-objects: FAIL " + f)
sys.exit(1 if failures else 0)
