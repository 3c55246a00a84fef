//! Server-side apply's field ownership, as the fake API server models it.
//!
//! Each object keeps, per field manager, the set of fields that manager owns, as paths to
//! leaves (`spec.replicas`, `metadata.labels.app`). What is modelled:
//!
//! - An apply by manager X sets every field in X's configuration and X then owns exactly
//!   those; a field X owned before and now omits is removed, unless another manager owns it
//!   too.
//! - A field in X's configuration that another manager owns with a different value is a
//!   conflict (409) unless the apply is forced, which takes the field from the other manager.
//!   The same value is shared ownership, not a conflict.
//! - Other writes (create, merge or JSON patch, status patch) give their manager the fields
//!   whose values they changed and take those fields from every other manager.
//!
//! What is not: lists are atomic (one leaf, replaced whole), where the real server merges
//! associative lists such as `containers` by their keys; and `metadata.managedFields` is not
//! written into the objects.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

pub type Path = Vec<String>;

/// Fields the API server sets or identifies the object by, never owned.
const UNOWNED: &[&[&str]] = &[
    &["apiVersion"],
    &["kind"],
    &["metadata", "name"],
    &["metadata", "namespace"],
    &["metadata", "uid"],
    &["metadata", "resourceVersion"],
    &["metadata", "generation"],
    &["metadata", "creationTimestamp"],
    &["metadata", "deletionTimestamp"],
    &["metadata", "deletionGracePeriodSeconds"],
    &["metadata", "managedFields"],
];

/// Who owns which fields of one object.
#[derive(Debug, Clone, Default)]
pub struct Managed(pub BTreeMap<String, BTreeSet<Path>>);

/// Another manager owns a field the apply sets to a different value.
#[derive(Debug)]
pub struct Conflicts(pub Vec<(String, Path)>);

impl Conflicts {
    /// The API server's words: `Apply failed with 1 conflict: conflict with "kubectl": .spec.replicas`.
    pub fn message(&self) -> String {
        let n = self.0.len();
        let each: Vec<String> =
            self.0.iter().map(|(m, p)| format!("conflict with \"{m}\": .{}", p.join("."))).collect();
        format!("Apply failed with {n} conflict{}: {}", if n == 1 { "" } else { "s" }, each.join(", "))
    }
}

/// The leaves of `v`: scalars, lists, and empty maps; without the fields nobody owns.
pub fn leaves(v: &Value) -> BTreeSet<Path> {
    fn walk(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    path.push(k.clone());
                    walk(x, path, out);
                    path.pop();
                }
            }
            Value::Null => {}
            _ => {
                if !UNOWNED.iter().any(|u| u.iter().eq(path.iter())) {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

pub fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.as_object()?.get(k))
}

fn set(v: &mut Value, path: &[String], x: Value) {
    let mut cur = v;
    for k in &path[..path.len() - 1] {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        cur = cur.as_object_mut().unwrap().entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    cur.as_object_mut().unwrap().insert(path[path.len() - 1].clone(), x);
}

/// Removes the field at `path`, and the maps it leaves empty.
fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    if let Some(Value::Object(m)) = get_mut(v, parents) {
        m.remove(last);
        if m.is_empty() && !parents.is_empty() {
            remove(v, parents);
        }
    }
}

fn get_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.as_object_mut()?.get_mut(k))
}

impl Managed {
    /// Applies `config` as `manager` to `live` (an empty object if the apply creates it).
    pub fn apply(&mut self, live: &mut Value, manager: &str, config: &Value, force: bool) -> Result<(), Conflicts> {
        let applied = leaves(config);
        let mut conflicts = Vec::new();
        for (other, owned) in &self.0 {
            if other == manager {
                continue;
            }
            for p in applied.intersection(owned) {
                if get(live, p) != get(config, p) {
                    conflicts.push((other.clone(), p.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(Conflicts(conflicts));
        }
        for (other, p) in &conflicts {
            if let Some(owned) = self.0.get_mut(other) {
                owned.remove(p);
            }
        }
        let before = self.0.remove(manager).unwrap_or_default();
        for p in before.difference(&applied) {
            if !self.0.values().any(|owned| owned.contains(p)) {
                remove(live, p);
            }
        }
        for p in &applied {
            set(live, p, get(config, p).cloned().unwrap_or(Value::Null));
        }
        self.0.insert(manager.to_string(), applied);
        self.0.retain(|_, owned| !owned.is_empty());
        Ok(())
    }

    /// Records a write other than an apply: `manager` changed `before` into `after`.
    pub fn update(&mut self, before: &Value, after: &Value, manager: &str) {
        let now = leaves(after);
        let changed: BTreeSet<Path> = now.iter().filter(|p| get(before, p) != get(after, p)).cloned().collect();
        for owned in self.0.values_mut() {
            owned.retain(|p| now.contains(p) && !changed.contains(p));
        }
        self.0.entry(manager.to_string()).or_default().extend(changed);
        self.0.retain(|_, owned| !owned.is_empty());
    }

    /// The fields `manager` owns, dotted, for assertions.
    pub fn fields_of(&self, manager: &str) -> Vec<String> {
        self.0.get(manager).into_iter().flatten().map(|p| p.join(".")).collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cm(data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data})
    }

    #[test]
    fn an_apply_removes_the_fields_its_manager_set_before_and_now_omits() {
        let mut live = json!({});
        let mut m = Managed::default();
        m.apply(&mut live, "op", &cm(json!({"a": "1", "b": "2"})), false).unwrap();
        m.apply(&mut live, "op", &cm(json!({"a": "1"})), false).unwrap();
        assert_eq!(live["data"], json!({"a": "1"}));
        assert_eq!(m.fields_of("op"), vec!["data.a"]);
        // A map left empty goes with its last field.
        m.apply(&mut live, "op", &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}), false)
            .unwrap();
        assert!(live.get("data").is_none(), "{live}");
    }

    #[test]
    fn an_apply_leaves_the_fields_other_managers_own() {
        let mut live = json!({});
        let mut m = Managed::default();
        m.apply(&mut live, "op", &cm(json!({"a": "1"})), false).unwrap();
        m.apply(&mut live, "kubectl", &cm(json!({"b": "2"})), false).unwrap();
        m.apply(&mut live, "op", &cm(json!({"a": "3"})), false).unwrap();
        assert_eq!(live["data"], json!({"a": "3", "b": "2"}));
        assert_eq!(m.fields_of("kubectl"), vec!["data.b"]);
    }

    #[test]
    fn setting_a_field_another_manager_owns_conflicts_unless_forced() {
        let mut live = json!({});
        let mut m = Managed::default();
        m.apply(&mut live, "kubectl", &cm(json!({"a": "1"})), false).unwrap();
        let err = m.apply(&mut live, "op", &cm(json!({"a": "2"})), false).unwrap_err();
        assert_eq!(err.message(), "Apply failed with 1 conflict: conflict with \"kubectl\": .data.a");
        assert_eq!(live["data"]["a"], "1", "a refused apply changes nothing");
        // The same value is shared, not a conflict; force takes the field.
        m.apply(&mut live, "op", &cm(json!({"a": "1"})), false).unwrap();
        m.apply(&mut live, "op", &cm(json!({"a": "2"})), true).unwrap();
        assert_eq!(live["data"]["a"], "2");
        assert!(m.fields_of("kubectl").is_empty());
    }

    #[test]
    fn a_field_shared_with_another_manager_stays_when_one_omits_it() {
        let mut live = json!({});
        let mut m = Managed::default();
        m.apply(&mut live, "op", &cm(json!({"a": "1"})), false).unwrap();
        m.apply(&mut live, "kubectl", &cm(json!({"a": "1"})), false).unwrap();
        m.apply(&mut live, "op", &cm(json!({"b": "2"})), false).unwrap();
        assert_eq!(live["data"], json!({"a": "1", "b": "2"}));
    }

    #[test]
    fn a_plain_update_takes_the_fields_it_changes() {
        let mut live = json!({});
        let mut m = Managed::default();
        m.apply(&mut live, "op", &cm(json!({"a": "1", "b": "2"})), false).unwrap();
        let before = live.clone();
        live["data"]["a"] = json!("edited");
        m.update(&before, &live, "kubectl-edit");
        assert_eq!(m.fields_of("kubectl-edit"), vec!["data.a"]);
        assert_eq!(m.fields_of("op"), vec!["data.b"]);
        // The operator's next apply now conflicts on the edited field unless forced.
        assert!(m.apply(&mut live, "op", &cm(json!({"a": "1", "b": "2"})), false).is_err());
    }
}
