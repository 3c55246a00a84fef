#!/usr/bin/env python3
"""Checks the chart's backup values as rendered (run by check-chart.sh): the default has no
backups; `backup.dir` with `existingClaim` sets NIMBUS_BACKUP_DIR and mounts the claim there;
`backup.url` with `backup.s3.*` sets the URL and S3 settings, reads the credentials from the
named Secret (the session token optional) and mounts no volume.
Usage: check-chart-backup.py DEFAULT.yaml BACKUP-DIR.yaml BACKUP-S3.yaml"""
import sys

import yaml

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def operator(path):
    """The operator's Pod spec and its `run` container."""
    for d in yaml.safe_load_all(open(path)):
        if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator"):
            spec = d["spec"]["template"]["spec"]
            return spec, next(c for c in spec["containers"] if c.get("args", [])[:1] == ["run"])
    sys.exit(f"check-chart-backup: no operator Deployment in {path}")


def backup_env(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])
            if e["name"].startswith(("NIMBUS_BACKUP_", "AWS_"))}


def backup_volumes(spec, container):
    return ([v for v in spec.get("volumes", []) if v["name"] == "backups"],
            [m for m in container.get("volumeMounts", []) if m["name"] == "backups"])


default, dir_variant, s3_variant = sys.argv[1:4]

spec, c = operator(default)
check(backup_env(c) == {}, f"default: no backup settings, got {backup_env(c)}")
check(backup_volumes(spec, c) == ([], []), "default: no backup volume")

spec, c = operator(dir_variant)
check(backup_env(c) == {"NIMBUS_BACKUP_DIR": "/var/lib/nimbus/backups"}, f"backup.dir: {backup_env(c)}")
volumes, mounts = backup_volumes(spec, c)
check(volumes == [{"name": "backups", "persistentVolumeClaim": {"claimName": "nimbus-backups"}}],
      f"backup.existingClaim is mounted: {volumes}")
check(mounts == [{"name": "backups", "mountPath": "/var/lib/nimbus/backups"}], f"at backup.dir: {mounts}")

spec, c = operator(s3_variant)
ref = lambda key, **optional: {"secretKeyRef": {"name": "nimbus-s3", "key": key, **optional}}
expected = {
    "NIMBUS_BACKUP_URL": "s3://nimbus-backups/prod",
    "NIMBUS_BACKUP_S3_ENDPOINT": "http://minio.infra:9000",
    "NIMBUS_BACKUP_S3_REGION": "eu-west-3",
    "NIMBUS_BACKUP_S3_ALLOW_HTTP": "true",
    "AWS_ACCESS_KEY_ID": ref("AWS_ACCESS_KEY_ID"),
    "AWS_SECRET_ACCESS_KEY": ref("AWS_SECRET_ACCESS_KEY"),
    "AWS_SESSION_TOKEN": ref("AWS_SESSION_TOKEN", optional=True),
}
check(backup_env(c) == expected, f"backup.url and backup.s3: {backup_env(c)}")
check(backup_volumes(spec, c) == ([], []), f"backup.url: no volume mounted, got {backup_volumes(spec, c)}")

for f in failures:
    print(f"check-chart-backup: {f}", file=sys.stderr)
sys.exit(1 if failures else 0)
