//! Sorts: `{"f": 1, "g": -1}`, comparing with MongoDB's cross-type order. An array field
//! sorts by its smallest element ascending and by its largest descending; a missing field
//! sorts as null.

use std::cmp::Ordering;

use nimbus_api::ApiError;
use serde_json::Value;

use crate::doc::order::compare;
use crate::doc::path::{lookup, validate_path};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SortSpec {
    /// (path, descending), most significant first.
    pub keys: Vec<(String, bool)>,
}

impl SortSpec {
    pub fn parse(v: Option<&Value>) -> Result<SortSpec, ApiError> {
        let map = match v {
            None | Some(Value::Null) => return Ok(SortSpec::default()),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(ApiError::bad_request("sort must be an object such as {\"field\": 1}")),
        };
        let mut keys = Vec::with_capacity(map.len());
        for (path, dir) in map {
            validate_path(path).map_err(ApiError::bad_request)?;
            keys.push((path.clone(), parse_direction(dir).map_err(ApiError::bad_request)?));
        }
        Ok(SortSpec { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn compare(&self, a: &Value, b: &Value) -> Ordering {
        for (path, desc) in &self.keys {
            let o = compare(&sort_key(a, path, *desc), &sort_key(b, path, *desc));
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    pub fn shape(&self) -> String {
        self.keys.iter().map(|(p, d)| format!("{p}:{}", if *d { -1 } else { 1 })).collect::<Vec<_>>().join(",")
    }
}

/// `1` ascending, `-1` descending (as numbers); anything else is an error.
pub fn parse_direction(v: &Value) -> Result<bool, String> {
    match v.as_f64() {
        Some(1.0) => Ok(false),
        Some(-1.0) => Ok(true),
        _ => Err(format!("sort and index directions must be 1 or -1, not {v}")),
    }
}

/// The value a document sorts by on `path`.
pub fn sort_key(doc: &Value, path: &str, descending: bool) -> Value {
    static NULL: Value = Value::Null;
    let mut best: Option<&Value> = None;
    for v in lookup(doc, path) {
        let items: &[Value] = match v {
            Value::Array(items) if !items.is_empty() => items,
            Value::Array(_) => std::slice::from_ref(&NULL),
            other => std::slice::from_ref(other),
        };
        for item in items {
            let better = best.is_none_or(|b| {
                let o = compare(item, b);
                if descending { o == Ordering::Greater } else { o == Ordering::Less }
            });
            if better {
                best = Some(item);
            }
        }
    }
    best.cloned().unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_across_types_and_arrays() {
        let spec = SortSpec::parse(Some(&json!({"a": 1}))).unwrap();
        let mut docs = vec![json!({"a": "s"}), json!({"a": 2}), json!({}), json!({"a": [5, 0.5]}), json!({"a": true})];
        docs.sort_by(|x, y| spec.compare(x, y));
        assert_eq!(
            docs,
            vec![json!({}), json!({"a": [5, 0.5]}), json!({"a": 2}), json!({"a": "s"}), json!({"a": true})]
        );
        let desc = SortSpec::parse(Some(&json!({"a": -1}))).unwrap();
        let mut docs = [json!({"a": [1, 9]}), json!({"a": 5})];
        docs.sort_by(|x, y| desc.compare(x, y));
        assert_eq!(docs[0], json!({"a": [1, 9]}));
    }

    #[test]
    fn directions_must_be_one_or_minus_one() {
        assert!(SortSpec::parse(Some(&json!({"a": 2}))).is_err());
        assert!(SortSpec::parse(Some(&json!({"a": "asc"}))).is_err());
        assert!(SortSpec::parse(Some(&json!([1]))).is_err());
    }
}
