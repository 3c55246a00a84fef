//! The CRD files in the repository are exactly what the code generates, and every example
//! manifest is valid against them (structure and CEL rules).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use nimbus_operator::crd::{crd_files, crds};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn the_crd_files_match_the_code() {
    let regenerate = std::env::var_os("NIMBUS_REGENERATE_CRDS").is_some();
    for dir in ["crds", "charts/nimbus/crds"] {
        for (name, yaml) in crd_files().unwrap() {
            let path = repo().join(dir).join(&name);
            if regenerate {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &yaml).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == yaml,
                "{} differs from the code: run `NIMBUS_REGENERATE_CRDS=1 cargo nextest run -p nimbus-operator --test crds`",
                path.display()
            );
        }
    }
}

/// The schema of `kind` in the generated CRDs.
fn schema_of(kind: &str) -> Value {
    let crd = crds().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

/// Structural validation as the API server does it: types, required fields, enums,
/// patterns, bounds, and no field the schema does not know (it would be pruned silently,
/// which in an example means a typo).
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            errors.push(format!("{path}: expected an integer or a string"));
        }
        return;
    }
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) && schema.get("type").is_none() {
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!("{path}: expected {ty}, found {value}"));
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {options:?}"));
    }
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(Value::as_str), value.as_str()) {
        // The patterns in these CRDs are all `^[class]{min,max}$`.
        let re = p.trim_start_matches('^').trim_end_matches('$');
        let (class, bounds) = re.split_once(']').unwrap();
        let allowed = |c: char| {
            let class = class.trim_start_matches('[');
            (class.contains("A-Z") && c.is_ascii_uppercase())
                || (class.contains("a-z") && c.is_ascii_lowercase())
                || (class.contains("0-9") && c.is_ascii_digit())
                || (class.contains('_') && c == '_')
                || (class.contains('-') && c == '-')
        };
        let (min, max) = bounds.trim_matches(|c| c == '{' || c == '}').split_once(',').unwrap();
        let n = s.chars().count();
        if !s.chars().all(allowed) || n < min.parse().unwrap() || n > max.parse().unwrap() {
            errors.push(format!("{path}: {s:?} does not match {p}"));
        }
    }
    if let Some(s) = value.as_str() {
        let n = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && n > max
        {
            errors.push(format!("{path}: Too long: may not be more than {max} characters"));
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && n < min
        {
            errors.push(format!("{path}: Invalid value: should be at least {min} characters long"));
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && items.len() as u64 > max
        {
            errors.push(format!("{path}: Too many: {}: must have at most {max} items", items.len()));
        }
        // The list types the API server enforces: a set's items and a map's keys are unique.
        let key_of = |v: &Value| match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => Some(v.clone()),
            Some("map") => {
                let keys = schema.get("x-kubernetes-list-map-keys").and_then(Value::as_array).cloned();
                Some(Value::Array(keys.unwrap_or_default().iter().map(|k| v[k.as_str().unwrap()].clone()).collect()))
            }
            _ => None,
        };
        let mut seen = Vec::new();
        for (i, v) in items.iter().enumerate() {
            if let Some(k) = key_of(v) {
                if seen.contains(&k) {
                    errors.push(format!("{path}[{i}]: Duplicate value: {k}"));
                }
                seen.push(k);
            }
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), value.as_f64())
        && n < min
    {
        errors.push(format!("{path}: {n} is below the minimum {min}"));
    }
    if let (Some(max), Some(n)) = (schema.get("maximum").and_then(Value::as_f64), value.as_f64())
        && n > max
    {
        errors.push(format!("{path}: {n} is above the maximum {max}"));
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !map.contains_key(req.as_str().unwrap()) {
                    errors.push(format!("{path}: missing required field {req}"));
                }
            }
            for (k, v) in map {
                let sub = props.and_then(|p| p.get(k)).or(additional.filter(|a| a.is_object()));
                match sub {
                    Some(s) => check(s, v, &format!("{path}.{k}"), errors),
                    None if path.is_empty() && (k == "apiVersion" || k == "kind" || k == "metadata") => {}
                    None if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) => {}
                    None => errors.push(format!("{path}.{k}: unknown field")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check(item_schema, v, &format!("{path}[{i}]"), errors);
                }
            }
        }
        _ => {}
    }
}

fn validate(kind: &str, doc: &Value, old: Option<&Value>) -> Vec<String> {
    let schema = schema_of(kind);
    let mut errors = Vec::new();
    check(&schema, doc, "", &mut errors);
    // Root rules with `optionalOldSelf` are evaluated here: kube's validator skips them on
    // create and binds `oldSelf` as a plain object on update (the API server: an optional).
    let (optional, mut rest): (Vec<Value>, Vec<Value>) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .partition(|r| r.get("optionalOldSelf") == Some(&Value::Bool(true)));
    let mut schema = schema.clone();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("x-kubernetes-validations".into(), Value::Array(std::mem::take(&mut rest)));
    }
    if let Err(e) = kube::core::cel::Validator::new().validate(&schema, doc, old) {
        errors.push(format!("CEL: {e}"));
    }
    for r in &optional {
        let rule = r["rule"].as_str().unwrap();
        let body = rule
            .strip_prefix("oldSelf.hasValue() || ")
            .unwrap_or_else(|| panic!("a rule this check does not read: {rule}"));
        if old.is_some() {
            continue; // `oldSelf.hasValue()`: true on every update
        }
        let mut ctx = cel::Context::default();
        ctx.add_variable("self", doc.clone()).unwrap();
        if cel::Program::compile(body).unwrap().execute(&ctx).unwrap() != cel::Value::Bool(true) {
            errors.push(format!("CEL: {}", r["message"].as_str().unwrap_or(rule)));
        }
    }
    errors
}

fn example_docs() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(repo().join("examples")).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !v.is_null() {
                out.push((path.clone(), v));
            }
        }
    }
    out
}

#[test]
fn every_example_validates_against_the_generated_schema() {
    let docs = example_docs();
    assert!(docs.iter().any(|(_, d)| d["kind"] == "DatabaseInstance"), "examples/ holds a DatabaseInstance");
    for (path, doc) in docs {
        let kind = doc["kind"].as_str().unwrap().to_string();
        assert_eq!(doc["apiVersion"], "nimbus.io/v1alpha1", "{}", path.display());
        let errors = validate(&kind, &doc, None);
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
    }
}

fn instance(spec: Value) -> Value {
    serde_json::json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
        "metadata": {"name": "shop"}, "spec": spec})
}

#[test]
fn the_schema_refuses_what_an_instance_must_not_say() {
    let bad = [
        (serde_json::json!({"replicas": 4}), "replicas is 3 or 5"),
        (serde_json::json!({"zones": ["a", "b"]}), "at least three zones"),
        (serde_json::json!({"tier": "gold"}), "is not one of"),
        (serde_json::json!({"database": "no spaces"}), "does not match"),
        (serde_json::json!({"users": [{"name": "a"}, {"name": "a"}]}), "Duplicate value"),
        (
            serde_json::json!({"users": (0..33).map(|i| serde_json::json!({"name": format!("u{i}")})).collect::<Vec<_>>()}),
            "Too many",
        ),
        (serde_json::json!({"zones": ["a", "a", "b"]}), "Duplicate value"),
        (serde_json::json!({"zones": ["a", "b", "z".repeat(64)]}), "Too long"),
        (serde_json::json!({"users": [{"name": "a", "secretRef": {"name": "", "key": "k"}}]}), "at least 1"),
        (serde_json::json!({"replcas": 3}), "unknown field"),
        (serde_json::json!({"autoscaling": {"enabled": true, "minQps": 10, "maxQps": 5}}), "minQps"),
    ];
    for (spec, expect) in bad {
        let errors = validate("DatabaseInstance", &instance(spec.clone()), None).join("; ");
        assert!(errors.contains(expect), "{spec}: expected an error containing {expect:?}, got {errors:?}");
    }
    assert!(validate("DatabaseInstance", &instance(serde_json::json!({"replicas": 5})), None).is_empty());
}

#[test]
fn the_database_name_and_zones_cannot_change() {
    let old = instance(serde_json::json!({"database": "shop", "zones": ["a", "b", "c"]}));
    let renamed = instance(serde_json::json!({"database": "shop2", "zones": ["a", "b", "c"]}));
    assert!(validate("DatabaseInstance", &renamed, Some(&old)).join(";").contains("database name"));
    let moved = instance(serde_json::json!({"database": "shop", "zones": ["a", "b", "d"]}));
    assert!(validate("DatabaseInstance", &moved, Some(&old)).join(";").contains("spec.zones cannot change"));
    let same = instance(serde_json::json!({"database": "shop", "zones": ["a", "b", "c"], "tier": "free"}));
    assert!(validate("DatabaseInstance", &same, Some(&old)).is_empty());
}

/// Each field that cannot change (yet) is refused on update with a sentence saying why; the
/// ones that can change pass.
#[test]
fn fields_that_would_move_or_resize_a_replica_set_cannot_change() {
    let base = serde_json::json!({"pool": "default", "tier": "standard", "replicas": 3, "storage": {"size": "10Gi"}});
    let old = instance(base.clone());
    let with = |k: &str, v: Value| {
        let mut spec = base.clone();
        spec[k] = v;
        instance(spec)
    };
    let refused = [
        (with("tier", serde_json::json!("dedicated")), "spec.tier cannot change"),
        (with("replicas", serde_json::json!(5)), "spec.replicas cannot change"),
        (with("storage", serde_json::json!({"size": "20Gi"})), "spec.storage cannot change"),
        (
            with("storage", serde_json::json!({"size": "10Gi", "storageClassName": "fast"})),
            "spec.storage cannot change",
        ),
        // Setting spec.database later to another name than the instance's renames it.
        (with("database", serde_json::json!("other")), "database name"),
    ];
    for (new, expect) in refused {
        let errors = validate("DatabaseInstance", &new, Some(&old)).join("; ");
        assert!(errors.contains(expect), "{}: expected {expect:?}, got {errors:?}", new["spec"]);
    }
    let allowed = [
        // A pool change is a hot migration.
        with("pool", serde_json::json!("big")),
        with("tier", serde_json::json!("free")),
        // Naming the database it already has is no rename.
        with("database", serde_json::json!("shop")),
        with("limits", serde_json::json!({"qps": 50})),
    ];
    for new in allowed {
        let errors = validate("DatabaseInstance", &new, Some(&old));
        assert!(errors.is_empty(), "{}: {errors:?}", new["spec"]);
    }
}

/// A pool change starts a migration; another one while it runs is refused by the API server
/// (the stored status is visible to the root rule), and allowed again once it finished.
#[test]
fn the_pool_cannot_change_again_while_a_migration_runs() {
    let with_migration = |pool: &str, finished: Option<&str>| {
        let mut doc = instance(serde_json::json!({"pool": pool}));
        let mut migration = serde_json::json!({"phase": "Copying", "fromReplicaSet": "default-rs0",
            "toReplicaSet": "big-rs0", "startedAt": "2026-01-01T00:00:00Z", "documentsCopied": 0,
            "bytesCopied": 0, "lagOps": 0, "attempt": 1});
        if let Some(at) = finished {
            migration["phase"] = serde_json::json!("Completed");
            migration["finishedAt"] = serde_json::json!(at);
        }
        doc["status"] = serde_json::json!({"migration": migration});
        doc
    };
    let running = with_migration("big", None);
    let errors = validate("DatabaseInstance", &with_migration("other", None), Some(&running)).join("; ");
    assert!(errors.contains("spec.pool cannot change while a migration runs"), "{errors}");
    // Setting it back is a change too: refused while it runs.
    let errors = validate("DatabaseInstance", &with_migration("default", None), Some(&running)).join("; ");
    assert!(errors.contains("spec.pool cannot change while a migration runs"), "{errors}");
    // The operator's status writes keep the spec: they pass.
    let progressed = {
        let mut d = running.clone();
        d["status"]["migration"]["phase"] = serde_json::json!("CatchingUp");
        d
    };
    assert!(validate("DatabaseInstance", &progressed, Some(&running)).is_empty());
    let finished = with_migration("big", Some("2026-01-01T00:05:00Z"));
    let errors = validate("DatabaseInstance", &with_migration("other", None), Some(&finished));
    assert!(errors.is_empty(), "{errors:?}");
    // Into or out of dedicated stays refused, saying what to do instead.
    let old = instance(serde_json::json!({"tier": "standard"}));
    let errors =
        validate("DatabaseInstance", &instance(serde_json::json!({"tier": "dedicated"})), Some(&old)).join("; ");
    assert!(errors.contains("change spec.pool to a pool of mode Dedicated"), "{errors}");
}

#[test]
fn names_that_cannot_name_services_are_refused() {
    let mut dotted = instance(serde_json::json!({}));
    dotted["metadata"]["name"] = serde_json::json!("shop.v2");
    assert!(validate("DatabaseInstance", &dotted, None).join(";").contains("DNS label"));
    let pool = |name: &str| {
        serde_json::json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "ResourcePool",
            "metadata": {"name": name}, "spec": {}})
    };
    assert!(validate("ResourcePool", &pool("shared.eu"), None).join(";").contains("DNS label"));
    assert!(validate("ResourcePool", &pool(&"p".repeat(41)), None).join(";").contains("at most 40"));
    assert!(validate("ResourcePool", &pool("shared-eu"), None).is_empty());
    // On create only: an object made before the rule can still change (and be deleted).
    let mut older = dotted.clone();
    older["metadata"]["finalizers"] = serde_json::json!([]);
    let errors = validate("DatabaseInstance", &older, Some(&dotted));
    assert!(errors.is_empty(), "{errors:?}");
    assert!(validate("ResourcePool", &pool("shared.eu"), Some(&pool("shared.eu"))).is_empty());
}

fn restore(spec: Value) -> Value {
    serde_json::json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseRestore",
        "metadata": {"name": "undo"}, "spec": spec})
}

/// A DatabaseRestore's target must fit its mode, its names must be names, and its spec
/// never changes once created (its status does).
#[test]
fn a_restore_is_refused_when_its_target_does_not_fit_its_mode_or_its_spec_changes() {
    let ok = [
        serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "InPlace"}}),
        serde_json::json!({"source": "shop", "toTime": "2026-01-01T00:00:00Z", "collections": ["orders"],
            "target": {"mode": "Beside", "suffix": "_restored"}}),
        serde_json::json!({"source": "shop", "toTime": "latest",
            "target": {"mode": "Beside", "renames": [{"from": "orders", "to": "orders_old"}]}}),
        serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance", "instance": "shop-copy"}}),
    ];
    for spec in ok {
        let errors = validate("DatabaseRestore", &restore(spec.clone()), None);
        assert!(errors.is_empty(), "{spec}: {errors:?}");
    }
    let bad = [
        (
            serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance"}}),
            "target.instance",
        ),
        (
            serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "InPlace", "instance": "x"}}),
            "target.instance",
        ),
        (serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "Beside"}}), "mode Beside"),
        (
            serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "InPlace", "suffix": "_x"}}),
            "mode Beside",
        ),
        (serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "Sideways"}}), "is not one of"),
        (
            serde_json::json!({"source": "shop", "toTime": "latest", "collections": ["a b"], "target": {"mode": "InPlace"}}),
            "does not match",
        ),
        (
            serde_json::json!({"source": "shop", "toTime": "latest", "collections": ["a", "a"], "target": {"mode": "InPlace"}}),
            "Duplicate value",
        ),
        (
            serde_json::json!({"source": "shop", "toTime": "latest",
                "collections": (0..65).map(|i| format!("c{i}")).collect::<Vec<_>>(), "target": {"mode": "InPlace"}}),
            "Too many",
        ),
        (
            serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "Beside",
                "renames": [{"from": "a", "to": "b"}, {"from": "a", "to": "c"}]}}),
            "Duplicate value",
        ),
        (serde_json::json!({"source": "shop", "toTime": "x".repeat(41), "target": {"mode": "InPlace"}}), "Too long"),
        (serde_json::json!({"toTime": "latest", "target": {"mode": "InPlace"}}), "missing required field"),
    ];
    for (spec, expect) in bad {
        let errors = validate("DatabaseRestore", &restore(spec.clone()), None).join("; ");
        assert!(errors.contains(expect), "{spec}: expected an error containing {expect:?}, got {errors:?}");
    }
    // Immutable: any change of the spec is refused, a status change is not.
    let old = restore(serde_json::json!({"source": "shop", "toTime": "latest", "target": {"mode": "InPlace"}}));
    for changed in [
        restore(serde_json::json!({"source": "shop", "toTime": "2026-01-01T00:00:00Z", "target": {"mode": "InPlace"}})),
        restore(serde_json::json!({"source": "other", "toTime": "latest", "target": {"mode": "InPlace"}})),
        restore(
            serde_json::json!({"source": "shop", "toTime": "latest", "collections": ["a"], "target": {"mode": "InPlace"}}),
        ),
    ] {
        let errors = validate("DatabaseRestore", &changed, Some(&old)).join("; ");
        assert!(errors.contains("spec cannot change"), "{}: {errors}", changed["spec"]);
    }
    let mut progressed = old.clone();
    progressed["status"] = serde_json::json!({"phase": "Restoring", "attempts": 1});
    assert!(validate("DatabaseRestore", &progressed, Some(&old)).is_empty());
}

/// `kubectl get dbi` shows the last backup and the recoverable window, `kubectl get dbr`
/// each restore's phase and the point it reached.
#[test]
fn the_printer_columns_tell_the_backup_and_restore_story() {
    let columns = |kind: &str| -> Vec<(String, String)> {
        let crd = crds().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
        let v = &crd.spec.versions[0];
        v.additional_printer_columns.iter().flatten().map(|c| (c.name.clone(), c.json_path.clone())).collect()
    };
    let dbi = columns("DatabaseInstance");
    for (name, path) in [
        ("Last Backup", ".status.backup.lastFull"),
        ("Restorable From", ".status.backup.earliestRestorable"),
        ("Restorable To", ".status.backup.latestRestorable"),
    ] {
        assert!(dbi.contains(&(name.into(), path.into())), "{name} in {dbi:?}");
    }
    let dbr = columns("DatabaseRestore");
    for (name, path) in
        [("Phase", ".status.phase"), ("Restored To", ".status.restoredTo"), ("Age", ".metadata.creationTimestamp")]
    {
        assert!(dbr.contains(&(name.into(), path.into())), "{name} in {dbr:?}");
    }
    let crd = crds().into_iter().find(|c| c.spec.names.kind == "DatabaseRestore").unwrap();
    assert_eq!(crd.spec.names.short_names, Some(vec!["dbr".to_string()]));
    assert_eq!(crd.spec.scope, "Namespaced");
    // Every column's path is a field of the schema (a typo shows an empty column forever).
    for kind in ["DatabaseInstance", "DatabaseRestore"] {
        let schema = schema_of(kind);
        for (name, path) in columns(kind) {
            if path.starts_with(".metadata.") {
                continue;
            }
            let mut node = &schema;
            for part in path.trim_start_matches('.').split('.') {
                node = node
                    .get("properties")
                    .and_then(|p| p.get(part))
                    .unwrap_or_else(|| panic!("{kind}: {name}: {path}"));
            }
        }
    }
}
