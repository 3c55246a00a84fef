//! Sorts: `{"f": 1, "g": -1}`, comparing with MongoDB's cross-type order. A document sorts
//! by the keys its path gives ([`crate::doc::path::keys`]): the smallest ascending, the
//! largest descending. A missing field sorts as null, an empty array before null.

use std::cmp::Ordering;

use nimbus_api::ApiError;
use serde_json::Value;

use crate::doc::order::compare;
use crate::doc::path::{FieldPath, Key, keys, validate_path};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SortSpec {
    /// (path, descending), most significant first.
    pub keys: Vec<(String, bool)>,
    paths: Vec<FieldPath>,
}

/// The value a document sorts by on one path.
#[derive(Debug, Clone, PartialEq)]
pub enum SortKey {
    /// An empty array: before every value, null included.
    EmptyArray,
    Value(Value),
}

impl SortKey {
    fn cmp(&self, other: &SortKey) -> Ordering {
        match (self, other) {
            (SortKey::EmptyArray, SortKey::EmptyArray) => Ordering::Equal,
            (SortKey::EmptyArray, _) => Ordering::Less,
            (_, SortKey::EmptyArray) => Ordering::Greater,
            (SortKey::Value(a), SortKey::Value(b)) => compare(a, b),
        }
    }
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
        Ok(SortSpec::new(keys))
    }

    pub fn new(keys: Vec<(String, bool)>) -> SortSpec {
        let paths = keys.iter().map(|(p, _)| FieldPath::new(p)).collect();
        SortSpec { keys, paths }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys `doc` sorts by, one per sort field: compute them once per document.
    pub fn keys_of(&self, doc: &Value) -> Vec<SortKey> {
        self.keys.iter().zip(&self.paths).map(|((_, desc), path)| sort_key(doc, path, *desc)).collect()
    }

    pub fn compare_keys(&self, a: &[SortKey], b: &[SortKey]) -> Ordering {
        for (((_, desc), x), y) in self.keys.iter().zip(a).zip(b) {
            let o = x.cmp(y);
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    pub fn compare(&self, a: &Value, b: &Value) -> Ordering {
        self.compare_keys(&self.keys_of(a), &self.keys_of(b))
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

/// The key a document sorts by on `path`.
pub fn sort_key(doc: &Value, path: &FieldPath, descending: bool) -> SortKey {
    static NULL: Value = Value::Null;
    let as_key = |k: &Key<'_>| match k {
        Key::EmptyArray => SortKey::EmptyArray,
        Key::Value(v) => SortKey::Value((*v).clone()),
        Key::Null => SortKey::Value(NULL.clone()),
    };
    let (ks, _) = keys(doc, path);
    let mut best = as_key(&ks[0]);
    for k in &ks[1..] {
        let k = as_key(k);
        let o = k.cmp(&best);
        if (descending && o == Ordering::Greater) || (!descending && o == Ordering::Less) {
            best = k;
        }
    }
    best
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
    fn empty_arrays_sort_before_null_and_dotted_arrays_by_their_elements() {
        let spec = SortSpec::parse(Some(&json!({"a": 1}))).unwrap();
        let mut docs = [json!({"a": null}), json!({"a": []}), json!({}), json!({"a": 0})];
        docs.sort_by(|x, y| spec.compare(x, y));
        assert_eq!(docs[0], json!({"a": []}));
        let spec = SortSpec::parse(Some(&json!({"a.b": -1}))).unwrap();
        let mut docs = [json!({"a": [{"b": 1}, {"b": 7}]}), json!({"a": {"b": 5}})];
        docs.sort_by(|x, y| spec.compare(x, y));
        assert_eq!(docs[0], json!({"a": [{"b": 1}, {"b": 7}]}));
    }

    #[test]
    fn directions_must_be_one_or_minus_one() {
        assert!(SortSpec::parse(Some(&json!({"a": 2}))).is_err());
        assert!(SortSpec::parse(Some(&json!({"a": "asc"}))).is_err());
        assert!(SortSpec::parse(Some(&json!([1]))).is_err());
    }
}
