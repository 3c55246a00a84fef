//! Filters: MongoDB's query language for implicit equality, dotted paths, `$eq $ne $gt
//! $gte $lt $lte $in $nin $exists $not $and $or $nor`, and equality against array elements.

use std::cmp::Ordering;

use nimbus_api::ApiError;
use serde_json::{Map, Value};

use crate::doc::order::{bracket, compare, values_equal};
use crate::doc::path::{candidates, lookup, validate_path};

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Nor(Vec<Filter>),
    Field { path: String, pred: Pred },
}

/// A predicate on the values at one path.
#[derive(Debug, Clone, PartialEq)]
pub enum Pred {
    Eq(Value),
    Ne(Value),
    Cmp(CmpOp, Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Exists(bool),
    Not(Box<Pred>),
    /// Several operators on one path: `{"a": {"$gt": 1, "$lt": 5}}`.
    All(Vec<Pred>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl CmpOp {
    fn holds(self, o: Ordering) -> bool {
        match self {
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Gte => o != Ordering::Less,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::Lte => o != Ordering::Greater,
        }
    }
}

fn err(msg: impl Into<String>) -> ApiError {
    ApiError::invalid_filter(msg)
}

impl Filter {
    /// The filter that matches every document.
    pub fn all() -> Filter {
        Filter::And(vec![])
    }

    /// Parses a filter document. `None` and `{}` match everything.
    pub fn parse(v: Option<&Value>) -> Result<Filter, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(Filter::all()),
            Some(Value::Object(map)) => parse_doc(map),
            Some(other) => Err(err(format!("filter must be an object, not {}", type_name(other)))),
        }
    }

    pub fn matches(&self, doc: &Value) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(doc)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(doc)),
            Filter::Nor(fs) => !fs.iter().any(|f| f.matches(doc)),
            Filter::Field { path, pred } => pred.matches(doc, path),
        }
    }

    /// The filter's shape: its structure with every value replaced by `?`, so that
    /// queries differing only in values share statistics.
    pub fn shape(&self) -> String {
        match self {
            Filter::And(fs) if fs.is_empty() => "{}".into(),
            Filter::And(fs) => format!("$and[{}]", fs.iter().map(Filter::shape).collect::<Vec<_>>().join(",")),
            Filter::Or(fs) => format!("$or[{}]", fs.iter().map(Filter::shape).collect::<Vec<_>>().join(",")),
            Filter::Nor(fs) => format!("$nor[{}]", fs.iter().map(Filter::shape).collect::<Vec<_>>().join(",")),
            Filter::Field { path, pred } => format!("{path}:{}", pred.shape()),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_doc(map: &Map<String, Value>) -> Result<Filter, ApiError> {
    let mut parts = Vec::with_capacity(map.len());
    for (key, value) in map {
        if let Some(op) = key.strip_prefix('$') {
            let list = |v: &Value| -> Result<Vec<Filter>, ApiError> {
                let Value::Array(items) = v else {
                    return Err(err(format!("${op} needs an array of filters")));
                };
                if items.is_empty() {
                    return Err(err(format!("${op} needs a non-empty array")));
                }
                items
                    .iter()
                    .map(|i| match i {
                        Value::Object(m) => parse_doc(m),
                        _ => Err(err(format!("${op} elements must be objects"))),
                    })
                    .collect()
            };
            parts.push(match op {
                "and" => Filter::And(list(value)?),
                "or" => Filter::Or(list(value)?),
                "nor" => Filter::Nor(list(value)?),
                _ => return Err(err(format!("unknown top-level operator ${op}"))),
            });
        } else {
            validate_path(key).map_err(err)?;
            parts.push(Filter::Field { path: key.clone(), pred: parse_pred(value)? });
        }
    }
    Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::And(parts) })
}

/// `{"$gt": 1}` style operator objects: every key starts with `$`.
fn is_operator_object(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty() && m.keys().all(|k| k.starts_with('$')))
}

fn parse_pred(v: &Value) -> Result<Pred, ApiError> {
    let Value::Object(map) = v else {
        return Ok(Pred::Eq(v.clone()));
    };
    if !is_operator_object(v) {
        if map.keys().any(|k| k.starts_with('$')) {
            return Err(err("cannot mix operators and fields in one object"));
        }
        return Ok(Pred::Eq(v.clone()));
    }
    let mut preds = Vec::with_capacity(map.len());
    for (op, arg) in map {
        let list = || -> Result<Vec<Value>, ApiError> {
            match arg {
                Value::Array(items) => Ok(items.clone()),
                _ => Err(err(format!("{op} needs an array"))),
            }
        };
        preds.push(match op.as_str() {
            "$eq" => Pred::Eq(arg.clone()),
            "$ne" => Pred::Ne(arg.clone()),
            "$gt" => Pred::Cmp(CmpOp::Gt, arg.clone()),
            "$gte" => Pred::Cmp(CmpOp::Gte, arg.clone()),
            "$lt" => Pred::Cmp(CmpOp::Lt, arg.clone()),
            "$lte" => Pred::Cmp(CmpOp::Lte, arg.clone()),
            "$in" => Pred::In(list()?),
            "$nin" => Pred::Nin(list()?),
            "$exists" => Pred::Exists(truthy(arg)),
            "$not" => {
                if !is_operator_object(arg) {
                    return Err(err("$not needs an operator object such as {\"$gt\": 1}"));
                }
                Pred::Not(Box::new(parse_pred(arg)?))
            }
            _ => return Err(err(format!("unknown operator {op}"))),
        });
    }
    Ok(if preds.len() == 1 { preds.remove(0) } else { Pred::All(preds) })
}

/// MongoDB accepts `$exists: 1`, `$exists: 0`, booleans, anything truthy.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Null => false,
        _ => true,
    }
}

impl Pred {
    pub fn matches(&self, doc: &Value, path: &str) -> bool {
        match self {
            Pred::Eq(v) => eq_matches(doc, path, v),
            Pred::Ne(v) => !eq_matches(doc, path, v),
            Pred::Cmp(op, v) => cmp_matches(doc, path, *op, v),
            Pred::In(vs) => vs.iter().any(|v| eq_matches(doc, path, v)),
            Pred::Nin(vs) => !vs.iter().any(|v| eq_matches(doc, path, v)),
            Pred::Exists(want) => lookup(doc, path).is_empty() != *want,
            Pred::Not(p) => !p.matches(doc, path),
            Pred::All(ps) => ps.iter().all(|p| p.matches(doc, path)),
        }
    }

    fn shape(&self) -> String {
        match self {
            Pred::Eq(_) => "?".into(),
            Pred::Ne(_) => "$ne".into(),
            Pred::Cmp(op, _) => format!("{op:?}").to_lowercase(),
            Pred::In(_) => "$in".into(),
            Pred::Nin(_) => "$nin".into(),
            Pred::Exists(_) => "$exists".into(),
            Pred::Not(p) => format!("$not({})", p.shape()),
            Pred::All(ps) => ps.iter().map(Pred::shape).collect::<Vec<_>>().join("&"),
        }
    }
}

fn eq_matches(doc: &Value, path: &str, v: &Value) -> bool {
    let found = candidates(doc, path);
    if v.is_null() && (found.is_empty() || lookup(doc, path).is_empty()) {
        // `{a: null}` matches documents without `a`.
        return true;
    }
    found.iter().any(|c| values_equal(c, v))
}

fn cmp_matches(doc: &Value, path: &str, op: CmpOp, v: &Value) -> bool {
    if v.is_null() {
        // `$gte: null` and `$lte: null` mean "is null or missing"; `$gt`/`$lt` null match nothing.
        return matches!(op, CmpOp::Gte | CmpOp::Lte) && eq_matches(doc, path, v);
    }
    let b = bracket(v);
    candidates(doc, path).iter().any(|c| bracket(c) == b && op.holds(compare(c, v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(filter: Value, doc: Value) -> bool {
        Filter::parse(Some(&filter)).unwrap().matches(&doc)
    }

    #[test]
    fn implicit_equality_and_dotted_paths() {
        assert!(m(json!({"a": 1}), json!({"a": 1.0})));
        assert!(m(json!({"a.b": "x"}), json!({"a": {"b": "x"}})));
        assert!(!m(json!({"a.b": "x"}), json!({"a": {"b": "y"}})));
        assert!(m(json!({"a": {"b": 1}}), json!({"a": {"b": 1}})));
        assert!(!m(json!({"a": {"b": 1}}), json!({"a": {"b": 1, "c": 2}})));
    }

    #[test]
    fn equality_reaches_array_elements() {
        assert!(m(json!({"tags": "x"}), json!({"tags": ["y", "x"]})));
        assert!(m(json!({"tags": ["y", "x"]}), json!({"tags": ["y", "x"]})));
        assert!(!m(json!({"tags": "z"}), json!({"tags": ["y", "x"]})));
        assert!(m(json!({"a.b": 2}), json!({"a": [{"b": 1}, {"b": 2}]})));
    }

    #[test]
    fn null_matches_missing() {
        assert!(m(json!({"a": null}), json!({})));
        assert!(m(json!({"a": null}), json!({"a": null})));
        assert!(!m(json!({"a": null}), json!({"a": 0})));
        assert!(m(json!({"a": {"$ne": null}}), json!({"a": 0})));
        assert!(m(json!({"a": {"$gte": null}}), json!({})));
        assert!(!m(json!({"a": {"$gt": null}}), json!({"a": 1})));
    }

    #[test]
    fn ranges_stay_in_their_type_bracket() {
        assert!(m(json!({"a": {"$gt": 1}}), json!({"a": 2})));
        assert!(!m(json!({"a": {"$gt": 1}}), json!({"a": "2"})));
        assert!(m(json!({"a": {"$gt": 1, "$lt": 3}}), json!({"a": 2})));
        assert!(!m(json!({"a": {"$gt": 1, "$lt": 3}}), json!({"a": 3})));
        assert!(m(json!({"a": {"$lte": "b"}}), json!({"a": "abc"})));
        assert!(m(json!({"a": {"$gt": 5}}), json!({"a": [1, 9]})));
    }

    #[test]
    fn logical_operators() {
        let d = json!({"a": 1, "b": 2});
        assert!(m(json!({"$or": [{"a": 2}, {"b": 2}]}), d.clone()));
        assert!(!m(json!({"$nor": [{"a": 2}, {"b": 2}]}), d.clone()));
        assert!(m(json!({"$and": [{"a": 1}, {"b": {"$in": [1, 2]}}]}), d.clone()));
        assert!(m(json!({"a": {"$nin": [2, 3]}}), d.clone()));
        assert!(m(json!({"a": {"$not": {"$gt": 1}}}), d.clone()));
        assert!(m(json!({"c": {"$not": {"$gt": 1}}}), d.clone()));
        assert!(m(json!({"c": {"$exists": false}, "a": {"$exists": true}}), d));
    }

    #[test]
    fn bad_filters_are_invalid_filter() {
        for bad in [
            json!({"a": {"$regexx": 1}}),
            json!({"$where": "1"}),
            json!({"$or": {}}),
            json!({"$or": []}),
            json!({"a": {"$in": 1}}),
            json!({"a": {"$not": 1}}),
            json!({"a": {"$gt": 1, "b": 2}}),
            json!({"": 1}),
            json!({"a..b": 1}),
            json!([1]),
        ] {
            let e = Filter::parse(Some(&bad)).unwrap_err();
            assert_eq!(e.code, nimbus_api::ErrorCode::InvalidFilter, "{bad}");
        }
    }

    #[test]
    fn shapes_ignore_values() {
        let a = Filter::parse(Some(&json!({"a": 1, "b": {"$gt": 2}}))).unwrap();
        let b = Filter::parse(Some(&json!({"a": "x", "b": {"$gt": 9}}))).unwrap();
        assert_eq!(a.shape(), b.shape());
    }
}
