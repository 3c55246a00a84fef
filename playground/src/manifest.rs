//! The manifests `apply` and `up --instances` take: `DatabaseInstance` and `ResourcePool`
//! documents, the same YAML as on Kubernetes. Pure: parsed once into typed values and
//! checked as the API server would (schema, CEL rules), before anything changes.
//!
//! The checks here are the CRD's that matter on one machine; they run twice, in the
//! `nimbus` command (so a mistake is shown before anything is sent) and in the control
//! plane (against its own state, the one that decides).

use std::collections::{BTreeMap, BTreeSet};

use nimbus_operator::crd::v1alpha1::{DatabaseInstance, MAX_USERS, MAX_ZONES, ResourcePool, Tier};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::state::State;

/// The API version both kinds are served at.
pub const API_VERSION: &str = "nimbus.io/v1alpha1";
/// Longest instance name (its replica sets and datanodes are named after it).
pub const MAX_INSTANCE_NAME: usize = 50;
/// Longest pool name (replica sets are named `{pool}-rs{n}`).
pub const MAX_POOL_NAME: usize = 40;

/// One YAML document and where it came from (`FILE document N`), as sent to the control
/// plane: it parses and checks the documents again itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Document {
    pub source: String,
    pub document: Value,
}

/// A refused manifest: where, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {field}: {message}")]
pub struct ManifestError {
    /// `FILE document N`.
    pub location: String,
    /// The field, as a path (`spec.pool`, `spec.users[1].name`).
    pub field: String,
    pub message: String,
}

impl ManifestError {
    fn new(source: &str, field: impl Into<String>, message: impl Into<String>) -> ManifestError {
        ManifestError { location: source.to_owned(), field: field.into(), message: message.into() }
    }
}

/// The typed documents of one apply, pools first (instances may name them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    pub pools: Vec<(String, ResourcePool)>,
    pub instances: Vec<(String, DatabaseInstance)>,
}

impl Manifests {
    /// The instance names, in the order of the files.
    pub fn instance_names(&self) -> Vec<String> {
        self.instances.iter().filter_map(|(_, i)| i.metadata.name.clone()).collect()
    }
}

/// Every document of a multi-document YAML text; empty documents are skipped.
pub fn split_yaml(text: &str, file: &str) -> Result<Vec<Document>, ManifestError> {
    let mut out = Vec::new();
    for (n, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let source = format!("{file} document {}", n + 1);
        let value = Value::deserialize(doc).map_err(|e| ManifestError::new(&source, "(document)", e.to_string()))?;
        if !value.is_null() {
            out.push(Document { source, document: value });
        }
    }
    Ok(out)
}

/// Parses and checks every document on its own and the set together (names unique per
/// kind, database names unique): all of them, or an error naming the first bad field.
pub fn parse(documents: &[Document]) -> Result<Manifests, ManifestError> {
    let mut m = Manifests::default();
    for d in documents {
        let src = d.source.as_str();
        let field = |name: &str| d.document.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        if api_version != API_VERSION {
            return Err(ManifestError::new(src, "apiVersion", format!("{api_version:?} is not {API_VERSION:?}")));
        }
        match kind.as_str() {
            "ResourcePool" => {
                let pool: ResourcePool = typed(src, &d.document)?;
                check_pool(src, &pool)?;
                m.pools.push((d.source.clone(), pool));
            }
            "DatabaseInstance" => {
                let dbi: DatabaseInstance = typed(src, &d.document)?;
                check_instance(src, &dbi)?;
                m.instances.push((d.source.clone(), dbi));
            }
            other => {
                return Err(ManifestError::new(
                    src,
                    "kind",
                    format!("{other:?} is not a kind the playground applies (DatabaseInstance, ResourcePool)"),
                ));
            }
        }
    }
    let mut pools = BTreeSet::new();
    for (src, p) in &m.pools {
        let name = p.metadata.name.clone().unwrap_or_default();
        if !pools.insert(name.clone()) {
            return Err(ManifestError::new(src, "metadata.name", format!("ResourcePool {name} appears twice")));
        }
    }
    let mut names = BTreeSet::new();
    let mut databases: BTreeMap<String, String> = BTreeMap::new();
    for (src, i) in &m.instances {
        let name = i.metadata.name.clone().unwrap_or_default();
        if !names.insert(name.clone()) {
            return Err(ManifestError::new(src, "metadata.name", format!("DatabaseInstance {name} appears twice")));
        }
        if let Some(other) = databases.insert(i.database(), name) {
            return Err(ManifestError::new(
                src,
                "spec.database",
                format!("database {} is also instance {other}'s", i.database()),
            ));
        }
    }
    Ok(m)
}

/// The typed value of a document, refusing fields the type does not have (the API server
/// prunes or refuses them; here a typo would otherwise be ignored silently).
fn typed<T: serde::de::DeserializeOwned + Serialize>(src: &str, doc: &Value) -> Result<T, ManifestError> {
    let value: T =
        serde_json::from_value(doc.clone()).map_err(|e| ManifestError::new(src, "(document)", e.to_string()))?;
    let back = serde_json::to_value(&value).map_err(|e| ManifestError::new(src, "(document)", e.to_string()))?;
    if let Some(field) = unknown_field(doc, &back, "") {
        return Err(ManifestError::new(src, field, "unknown field"));
    }
    Ok(value)
}

/// The first field of `given` that the typed value (`known`, serialised back) lost.
fn unknown_field(given: &Value, known: &Value, path: &str) -> Option<String> {
    match (given, known) {
        (Value::Object(g), Value::Object(k)) => g.iter().find_map(|(key, v)| {
            let here = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            match k.get(key) {
                None if !v.is_null() => Some(here),
                None => None,
                Some(kv) => unknown_field(v, kv, &here),
            }
        }),
        (Value::Array(g), Value::Array(k)) => {
            g.iter().zip(k).enumerate().find_map(|(n, (gv, kv))| unknown_field(gv, kv, &format!("{path}[{n}]")))
        }
        _ => None,
    }
}

/// A DNS label: lowercase letters, digits and '-', starting with a letter, not ending with '-'.
fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(u8::is_ascii_lowercase)
        && b.last().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn check_pool(src: &str, pool: &ResourcePool) -> Result<(), ManifestError> {
    let err = |f: &str, m: String| Err(ManifestError::new(src, f, m));
    let name = pool.metadata.name.as_deref().unwrap_or_default();
    if name.len() > MAX_POOL_NAME || !dns_label(name) {
        return err(
            "metadata.name",
            format!(
                "{name:?}: the name must be a DNS label of at most {MAX_POOL_NAME} characters: lowercase letters, \
                 digits and '-', starting with a letter"
            ),
        );
    }
    let s = &pool.spec;
    if s.replicas_per_set != 3 && s.replicas_per_set != 5 {
        return err("spec.replicasPerSet", format!("{}: replicasPerSet is 3 or 5", s.replicas_per_set));
    }
    if !(1..=100_000).contains(&s.databases_per_replica_set) {
        return err("spec.databasesPerReplicaSet", format!("{}: from 1 to 100000", s.databases_per_replica_set));
    }
    Ok(())
}

fn check_instance(src: &str, dbi: &DatabaseInstance) -> Result<(), ManifestError> {
    let err = |f: &str, m: String| Err(ManifestError::new(src, f, m));
    let name = dbi.metadata.name.as_deref().unwrap_or_default();
    if name.len() > MAX_INSTANCE_NAME || !dns_label(name) {
        return err(
            "metadata.name",
            format!(
                "{name:?}: the name must be a DNS label of at most {MAX_INSTANCE_NAME} characters: lowercase \
                 letters, digits and '-', starting with a letter"
            ),
        );
    }
    let s = &dbi.spec;
    if let Err(e) = nimbus_api::limits::validate_name("database", &dbi.database()) {
        let field = if s.database.is_some() { "spec.database" } else { "metadata.name" };
        return err(field, e.message);
    }
    if s.pool.is_empty() || s.pool.len() > MAX_POOL_NAME {
        return err("spec.pool", format!("{:?}: a pool name of 1 to {MAX_POOL_NAME} characters", s.pool));
    }
    if s.replicas != 3 && s.replicas != 5 {
        return err("spec.replicas", format!("{}: replicas is 3 or 5", s.replicas));
    }
    if let Some(zones) = &s.zones
        && (!zones.is_empty() && zones.len() < 3 || zones.len() > MAX_ZONES as usize)
    {
        return err("spec.zones", format!("at least three zones and at most {MAX_ZONES} (or none)"));
    }
    if s.storage.size.is_empty() || s.storage.size.len() > 32 {
        return err("spec.storage.size", "a quantity of 1 to 32 characters".into());
    }
    let l = &s.limits;
    for (field, v) in [
        ("spec.limits.qps", l.qps),
        ("spec.limits.maxConnections", l.max_connections),
        ("spec.limits.maxInFlight", l.max_in_flight),
    ] {
        if v == Some(0) {
            return err(field, "must be at least 1".into());
        }
    }
    if let Some(a) = &s.autoscaling
        && a.min_qps > a.max_qps
    {
        return err("spec.autoscaling.minQps", "autoscaling.minQps must not exceed autoscaling.maxQps".into());
    }
    if !(1..=35).contains(&s.backup.retention_days) {
        return err("spec.backup.retentionDays", format!("{}: from 1 to 35", s.backup.retention_days));
    }
    if s.indexing.max_automatic_indexes > 64 {
        return err("spec.indexing.maxAutomaticIndexes", format!("{}: at most 64", s.indexing.max_automatic_indexes));
    }
    if s.users.len() > MAX_USERS as usize {
        return err("spec.users", format!("{} users: at most {MAX_USERS}", s.users.len()));
    }
    let mut seen = BTreeSet::new();
    for (n, u) in s.users.iter().enumerate() {
        let field = format!("spec.users[{n}].name");
        let ok = !u.name.is_empty()
            && u.name.len() <= 64
            && u.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return err(&field, format!("{:?}: 1 to 64 characters of A-Z a-z 0-9 _ -", u.name));
        }
        if !seen.insert(u.name.as_str()) {
            return err(&field, format!("user {} is listed twice", u.name));
        }
    }
    Ok(())
}

/// Checks the manifests against what the playground has: pools named exist (or come in
/// the same apply), fields that cannot change did not, a database name is one instance's.
pub fn check_against(st: &State, m: &Manifests) -> Result<(), ManifestError> {
    for (src, p) in &m.pools {
        let name = p.metadata.name.as_deref().unwrap_or_default();
        let Some(have) = st.pool(name) else { continue };
        if have.mode != p.spec.mode {
            return Err(ManifestError::new(
                src,
                "spec.mode",
                format!("spec.mode cannot change (pool {name} is {:?})", have.mode),
            ));
        }
        if have.replicas_per_set != p.spec.replicas_per_set {
            return Err(ManifestError::new(
                src,
                "spec.replicasPerSet",
                format!(
                    "spec.replicasPerSet cannot change: existing replica sets keep their size ({})",
                    have.replicas_per_set
                ),
            ));
        }
    }
    let applied: BTreeSet<&str> = m.pools.iter().filter_map(|(_, p)| p.metadata.name.as_deref()).collect();
    for (src, dbi) in &m.instances {
        let name = dbi.metadata.name.as_deref().unwrap_or_default();
        let s = &dbi.spec;
        if st.pool(&s.pool).is_none() && !applied.contains(s.pool.as_str()) {
            return Err(ManifestError::new(
                src,
                "spec.pool",
                format!("no ResourcePool {:?}: apply it first, or in the same apply", s.pool),
            ));
        }
        let db = dbi.database();
        if let Some((other, _)) = st.instances.iter().find(|(n, i)| n.as_str() != name && i.database == db) {
            return Err(ManifestError::new(src, "spec.database", format!("database {db} is instance {other}'s")));
        }
        let Some(have) = st.instances.get(name) else { continue };
        if have.database != db {
            return Err(ManifestError::new(
                src,
                "spec.database",
                format!(
                    "the database name (spec.database, else the instance's name) cannot change: it is {}",
                    have.database
                ),
            ));
        }
        let Some(old) = &have.spec else { continue };
        let dedicated = |t: Tier| t == Tier::Dedicated;
        if dedicated(old.tier) != dedicated(s.tier) {
            return Err(ManifestError::new(
                src,
                "spec.tier",
                "spec.tier cannot change between shared (free, standard) and dedicated",
            ));
        }
        if old.replicas != s.replicas {
            return Err(ManifestError::new(
                src,
                "spec.replicas",
                format!(
                    "spec.replicas cannot change: the replica set keeps the size it was made with ({})",
                    old.replicas
                ),
            ));
        }
        if old.storage != s.storage {
            return Err(ManifestError::new(
                src,
                "spec.storage",
                "spec.storage cannot change: members keep the volumes they were made with",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn docs(text: &str) -> Vec<Document> {
        split_yaml(text, "f.yaml").unwrap()
    }

    fn refused(text: &str) -> ManifestError {
        parse(&docs(text)).unwrap_err()
    }

    const SHOP: &str = "apiVersion: nimbus.io/v1alpha1\nkind: DatabaseInstance\nmetadata: {name: shop}\n";

    #[test]
    fn pools_and_instances_of_several_documents_parse() {
        let text = format!(
            "apiVersion: nimbus.io/v1alpha1\nkind: ResourcePool\nmetadata: {{name: big}}\nspec:\n  mode: dedicated\n  \
             nodeSelector: {{a: b}}\n---\n{SHOP}spec: {{pool: big}}\n---\n"
        );
        let m = parse(&docs(&text)).unwrap();
        assert_eq!(m.pools.len(), 1);
        assert_eq!(m.instance_names(), vec!["shop".to_string()]);
        assert_eq!(m.instances[0].1.spec.pool, "big");
    }

    #[test]
    fn each_bad_document_is_refused_naming_its_field() {
        let field = |t: &str| refused(t).field;
        assert_eq!(field("apiVersion: v1\nkind: DatabaseInstance\nmetadata: {name: shop}\n"), "apiVersion");
        assert_eq!(field("apiVersion: nimbus.io/v1alpha1\nkind: Pod\nmetadata: {name: x}\n"), "kind");
        assert_eq!(field(&format!("{SHOP}spec: {{replicas: 4}}\n")), "spec.replicas");
        assert_eq!(field(&format!("{SHOP}spec: {{limits: {{qpz: 4}}}}\n")), "spec.limits.qpz");
        assert_eq!(field(&format!("{SHOP}spec: {{database: 'a b'}}\n")), "spec.database");
        assert_eq!(field(&format!("{SHOP}spec: {{users: [{{name: a}}, {{name: a}}]}}\n")), "spec.users[1].name");
        assert_eq!(field(&format!("{SHOP}spec: {{users: [{{name: a, rol: read}}]}}\n")), "spec.users[0].rol");
        assert_eq!(field(&format!("{SHOP}spec: {{limits: {{qps: 0}}}}\n")), "spec.limits.qps");
        assert_eq!(
            field("apiVersion: nimbus.io/v1alpha1\nkind: DatabaseInstance\nmetadata: {name: Shop}\nspec: {}\n"),
            "metadata.name"
        );
        assert_eq!(field(&format!("{SHOP}spec: {{}}\n---\n{SHOP}spec: {{}}\n")), "metadata.name");
        assert_eq!(
            field(
                "apiVersion: nimbus.io/v1alpha1\nkind: ResourcePool\nmetadata: {name: p}\nspec: {replicasPerSet: 4}\n"
            ),
            "spec.replicasPerSet"
        );
        let e = refused(&format!("{SHOP}spec: {{replicas: 4}}\n"));
        assert_eq!(e.to_string(), "f.yaml document 1: spec.replicas: 4: replicas is 3 or 5");
    }

    /// The examples are what a user applies first: each parses, and each applies to a new
    /// playground together with the pools they name.
    #[test]
    fn every_example_parses_and_applies_to_a_new_playground() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let docs = split_yaml(&std::fs::read_to_string(&path).unwrap(), &path.display().to_string()).unwrap();
                parse(&docs).unwrap_or_else(|e| panic!("{e}"));
                all.extend(docs);
            }
        }
        // Examples name the same instance in several files (shop): one file at a time.
        let pools: Vec<Document> = all.iter().filter(|d| d.document["kind"] == "ResourcePool").cloned().collect();
        for d in all.iter().filter(|d| d.document["kind"] == "DatabaseInstance") {
            let docs: Vec<Document> = pools.iter().cloned().chain([d.clone()]).collect();
            check_against(&State::default(), &parse(&docs).unwrap()).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn state_with_shop() -> State {
        let mut st = State::default();
        let m = parse(&docs(&format!("{SHOP}spec: {{tier: standard}}\n"))).unwrap();
        let dbi = &m.instances[0].1;
        st.instances.insert(
            "shop".into(),
            crate::state::InstanceState {
                database: "shop".into(),
                incarnation: "test".into(),
                pool: "default".into(),
                wanted_pool: None,
                wanted_replica_set: None,
                replica_set: "default-rs0".into(),
                tokens: BTreeMap::new(),
                token: String::new(),
                read_only_token: String::new(),
                roles: BTreeMap::new(),
                limits: None,
                spec: Some(dbi.spec.clone()),
                migration: None,
            },
        );
        st
    }

    #[test]
    fn against_the_state_unknown_pools_and_immutable_fields_are_refused() {
        let st = state_with_shop();
        let check = |t: &str| check_against(&st, &parse(&docs(t)).unwrap()).map_err(|e| e.field);
        assert_eq!(check(&format!("{SHOP}spec: {{pool: nowhere}}\n")), Err("spec.pool".into()));
        assert_eq!(check(&format!("{SHOP}spec: {{tier: dedicated}}\n")), Err("spec.tier".into()));
        assert_eq!(check(&format!("{SHOP}spec: {{replicas: 5}}\n")), Err("spec.replicas".into()));
        assert_eq!(check(&format!("{SHOP}spec: {{storage: {{size: 1Gi}}}}\n")), Err("spec.storage".into()));
        assert_eq!(check(&format!("{SHOP}spec: {{database: other}}\n")), Err("spec.database".into()));
        // Another instance may not take shop's database name.
        let other =
            "apiVersion: nimbus.io/v1alpha1\nkind: DatabaseInstance\nmetadata: {name: other}\nspec: {database: shop}\n";
        assert_eq!(check(other), Err("spec.database".into()));
        // Free to standard is a limits change; a pool in the same apply is known.
        assert_eq!(check(&format!("{SHOP}spec: {{tier: free, limits: {{qps: 5}}}}\n")), Ok(()));
        let with_pool = format!(
            "apiVersion: nimbus.io/v1alpha1\nkind: ResourcePool\nmetadata: {{name: big}}\nspec: {{}}\n---\n{SHOP}spec: {{pool: big}}\n"
        );
        assert_eq!(check(&with_pool), Ok(()));
        // The implicit default pool is shared: it cannot become dedicated.
        let default_dedicated =
            "apiVersion: nimbus.io/v1alpha1\nkind: ResourcePool\nmetadata: {name: default}\nspec: {mode: dedicated}\n";
        assert_eq!(check(default_dedicated), Err("spec.mode".into()));
    }
}
