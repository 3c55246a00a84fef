//! Projections: `{"a": 1, "b.c": 1}` keeps only those fields (and `_id` unless
//! `"_id": 0`); `{"a": 0}` drops fields. Inclusion and exclusion do not mix, except `_id`.

use nimbus_api::ApiError;
use serde_json::{Map, Value};

use crate::doc::path::validate_path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    include: bool,
    paths: Vec<Vec<String>>,
    keep_id: bool,
}

impl Projection {
    /// `None` when the projection is absent or empty (whole documents).
    pub fn parse(v: Option<&Value>) -> Result<Option<Projection>, ApiError> {
        let map = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) if m.is_empty() => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(ApiError::bad_request("projection must be an object")),
        };
        let mut include = None;
        let mut keep_id = true;
        let mut paths = Vec::new();
        for (path, flag) in map {
            validate_path(path).map_err(ApiError::bad_request)?;
            let on = match flag {
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => return Err(ApiError::bad_request(format!("projection of {path:?} must be 0, 1, true or false"))),
            };
            if path == "_id" {
                keep_id = on;
                continue;
            }
            match include {
                None => include = Some(on),
                Some(i) if i != on => {
                    return Err(ApiError::bad_request("projection cannot mix inclusion and exclusion (except _id)"));
                }
                _ => {}
            }
            paths.push(path.split('.').map(str::to_owned).collect());
        }
        Ok(Some(Projection { include: include.unwrap_or(false), paths, keep_id }))
    }

    pub fn apply(&self, doc: &Value) -> Value {
        let Value::Object(map) = doc else { return doc.clone() };
        let mut out = if self.include {
            let mut out = Map::new();
            for p in &self.paths {
                include_path(map, p, &mut out);
            }
            match map.get("_id") {
                Some(id) if self.keep_id => {
                    // `_id` first, as stored.
                    let mut with_id = Map::with_capacity(out.len() + 1);
                    with_id.insert("_id".into(), id.clone());
                    with_id.extend(out);
                    with_id
                }
                _ => out,
            }
        } else {
            let mut out = map.clone();
            for p in &self.paths {
                exclude_path(&mut out, p);
            }
            out
        };
        if !self.keep_id {
            out.remove("_id");
        }
        Value::Object(out)
    }
}

fn include_path(src: &Map<String, Value>, path: &[String], out: &mut Map<String, Value>) {
    let Some((first, rest)) = path.split_first() else { return };
    let Some(v) = src.get(first) else { return };
    if rest.is_empty() {
        out.insert(first.clone(), v.clone());
        return;
    }
    match v {
        Value::Object(child) => {
            let entry = out.entry(first.clone()).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(dst) = entry {
                include_path(child, rest, dst);
            }
        }
        Value::Array(items) => {
            let projected: Vec<Value> = items
                .iter()
                .filter_map(|i| match i {
                    Value::Object(child) => {
                        let mut dst = Map::new();
                        include_path(child, rest, &mut dst);
                        Some(Value::Object(dst))
                    }
                    _ => None,
                })
                .collect();
            out.insert(first.clone(), Value::Array(projected));
        }
        _ => {}
    }
}

fn exclude_path(map: &mut Map<String, Value>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else { return };
    if rest.is_empty() {
        map.remove(first);
        return;
    }
    match map.get_mut(first) {
        Some(Value::Object(child)) => exclude_path(child, rest),
        Some(Value::Array(items)) => {
            for item in items {
                if let Value::Object(child) = item {
                    exclude_path(child, rest);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(spec: Value, doc: Value) -> Value {
        Projection::parse(Some(&spec)).unwrap().unwrap().apply(&doc)
    }

    #[test]
    fn inclusion_keeps_id_and_named_fields() {
        let d = json!({"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "e": [{"c": 1, "x": 0}, 5]});
        assert_eq!(p(json!({"a": 1}), d.clone()), json!({"_id": 1, "a": 1}));
        assert_eq!(p(json!({"b.c": 1, "_id": 0}), d.clone()), json!({"b": {"c": 2}}));
        assert_eq!(p(json!({"e.c": 1, "_id": 0}), d), json!({"e": [{"c": 1}]}));
    }

    #[test]
    fn exclusion_drops_named_fields() {
        let d = json!({"_id": 1, "a": 1, "b": {"c": 2, "d": 3}});
        assert_eq!(p(json!({"b.c": 0}), d.clone()), json!({"_id": 1, "a": 1, "b": {"d": 3}}));
        assert_eq!(p(json!({"_id": 0}), d), json!({"a": 1, "b": {"c": 2, "d": 3}}));
    }

    #[test]
    fn mixing_is_refused() {
        assert!(Projection::parse(Some(&json!({"a": 1, "b": 0}))).is_err());
        assert!(Projection::parse(Some(&json!({"a": "yes"}))).is_err());
    }
}
