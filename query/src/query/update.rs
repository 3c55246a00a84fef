//! Updates: the operators `$set $unset $inc $push $pull`, or a whole-document replacement
//! (an update document with no `$` operator). Applying an update never changes `_id`.

use nimbus_api::ApiError;
use serde_json::{Map, Number, Value};

use super::filter::{Filter, Pred};
use crate::doc::order::values_equal;
use crate::doc::path::validate_path;

#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Replace(Map<String, Value>),
    Ops(Vec<(Op, String)>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Set(Value),
    Unset,
    Inc(Number),
    Push(Vec<Value>),
    Pull(PullCond),
}

#[derive(Debug, Clone, PartialEq)]
pub enum PullCond {
    Equal(Value),
    Pred(Pred),
    Filter(Filter),
}

fn err(msg: impl Into<String>) -> ApiError {
    ApiError::invalid_update(msg)
}

impl Update {
    pub fn parse(v: &Value) -> Result<Update, ApiError> {
        let Value::Object(map) = v else {
            return Err(err("update must be an object"));
        };
        if map.is_empty() {
            return Err(err("update must not be empty"));
        }
        let ops = map.keys().filter(|k| k.starts_with('$')).count();
        if ops == 0 {
            check_field_names(map)?;
            return Ok(Update::Replace(map.clone()));
        }
        if ops != map.len() {
            return Err(err("update cannot mix $ operators and plain fields"));
        }
        let mut out: Vec<(Op, String)> = Vec::new();
        for (op, args) in map {
            let Value::Object(args) = args else {
                return Err(err(format!("{op} needs an object of fields")));
            };
            for (path, arg) in args {
                validate_path(path).map_err(err)?;
                let parsed = match op.as_str() {
                    "$set" => Op::Set(arg.clone()),
                    "$unset" => Op::Unset,
                    "$inc" => match arg {
                        Value::Number(n) => Op::Inc(n.clone()),
                        _ => return Err(err(format!("$inc of {path:?} needs a number"))),
                    },
                    "$push" => match arg {
                        Value::Object(m) if m.contains_key("$each") => match (m.len(), m.get("$each")) {
                            (1, Some(Value::Array(items))) => Op::Push(items.clone()),
                            _ => return Err(err("$push with $each needs exactly {\"$each\": [...]}")),
                        },
                        other => Op::Push(vec![other.clone()]),
                    },
                    "$pull" => Op::Pull(parse_pull(arg)?),
                    other => return Err(err(format!("unknown update operator {other}"))),
                };
                if (path == "_id" || path.starts_with("_id.")) && !matches!(parsed, Op::Set(_)) {
                    return Err(err("_id cannot be modified"));
                }
                if let Some((_, other)) = out.iter().find(|(_, p)| conflicts(p, path)) {
                    return Err(err(format!("updating {path:?} and {other:?} in one update conflicts")));
                }
                out.push((parsed, path.clone()));
            }
        }
        Ok(Update::Ops(out))
    }

    /// Applies the update to `doc` (which has an `_id`), giving the new document.
    pub fn apply(&self, doc: &Value) -> Result<Value, ApiError> {
        let id = doc.get("_id").cloned();
        match self {
            Update::Replace(new) => {
                if let (Some(old), Some(new_id)) = (&id, new.get("_id"))
                    && !values_equal(old, new_id)
                {
                    return Err(err("a replacement cannot change _id"));
                }
                let mut out = Map::new();
                if let Some(id) = id {
                    out.insert("_id".into(), id);
                }
                for (k, v) in new {
                    if k != "_id" {
                        out.insert(k.clone(), v.clone());
                    }
                }
                Ok(Value::Object(out))
            }
            Update::Ops(ops) => {
                let mut out = doc.clone();
                for (op, path) in ops {
                    let parts: Vec<&str> = path.split('.').collect();
                    apply_op(&mut out, &parts, op, path)?;
                }
                if let (Some(old), Some(new)) = (&id, out.get("_id"))
                    && !values_equal(old, new)
                {
                    return Err(err("_id cannot be modified"));
                }
                Ok(out)
            }
        }
    }
}

fn check_field_names(map: &Map<String, Value>) -> Result<(), ApiError> {
    for k in map.keys() {
        if k.is_empty() || k.contains('.') {
            return Err(err(format!("invalid field name {k:?} in replacement document")));
        }
    }
    Ok(())
}

/// Two paths conflict when one is a prefix of the other at a component boundary.
fn conflicts(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long == short || (long.starts_with(short) && long.as_bytes().get(short.len()) == Some(&b'.'))
}

fn parse_pull(arg: &Value) -> Result<PullCond, ApiError> {
    match arg {
        Value::Object(m) if !m.is_empty() && m.keys().all(|k| k.starts_with('$')) => {
            // An operator condition on each element: wrap as a filter on a pseudo field.
            match Filter::parse(Some(&serde_json::json!({ "v": arg }))).map_err(|e| err(e.message))? {
                Filter::Field { pred, .. } => Ok(PullCond::Pred(pred)),
                _ => Err(err("invalid $pull condition")),
            }
        }
        Value::Object(_) => Ok(PullCond::Filter(Filter::parse(Some(arg)).map_err(|e| err(e.message))?)),
        other => Ok(PullCond::Equal(other.clone())),
    }
}

fn pull_matches(cond: &PullCond, element: &Value) -> bool {
    match cond {
        PullCond::Equal(v) => values_equal(element, v),
        PullCond::Pred(p) => p.matches(&serde_json::json!({ "v": element }), "v"),
        PullCond::Filter(f) => element.is_object() && f.matches(element),
    }
}

/// Walks to the parent of the last component, creating objects for `$set`-like ops.
fn apply_op(doc: &mut Value, parts: &[&str], op: &Op, path: &str) -> Result<(), ApiError> {
    let Some((last, parents)) = parts.split_last() else { return Ok(()) };
    let creates = !matches!(op, Op::Unset | Op::Pull(_));
    let mut cur = doc;
    for part in parents {
        cur = match cur {
            Value::Object(map) => {
                if !map.contains_key(*part) {
                    if !creates {
                        return Ok(());
                    }
                    map.insert((*part).to_owned(), Value::Object(Map::new()));
                }
                match map.get_mut(*part) {
                    Some(v) => v,
                    None => return Ok(()),
                }
            }
            Value::Array(items) => {
                let Ok(i) = part.parse::<usize>() else {
                    return Err(err(format!("cannot use the part {part:?} of {path:?} to traverse an array")));
                };
                if i >= items.len() {
                    if !creates {
                        return Ok(());
                    }
                    pad(items, i)?;
                    items[i] = Value::Object(Map::new());
                }
                &mut items[i]
            }
            _ => {
                if !creates {
                    return Ok(());
                }
                return Err(err(format!("cannot create field {part:?} of {path:?} inside a non-object value")));
            }
        };
    }
    match cur {
        Value::Object(map) => apply_leaf_obj(map, last, op, path),
        Value::Array(items) => {
            let Ok(i) = last.parse::<usize>() else {
                return Err(err(format!("cannot use the part {last:?} of {path:?} to traverse an array")));
            };
            if i >= items.len() {
                if !creates {
                    return Ok(());
                }
                pad(items, i)?;
            }
            let slot = &mut items[i];
            match op {
                Op::Unset => {
                    *slot = Value::Null;
                    Ok(())
                }
                _ => apply_leaf_value(slot, op, path),
            }
        }
        _ if creates => Err(err(format!("cannot create field {last:?} of {path:?} inside a non-object value"))),
        _ => Ok(()),
    }
}

fn pad(items: &mut Vec<Value>, i: usize) -> Result<(), ApiError> {
    if i > 100_000 {
        return Err(err("array index too large"));
    }
    items.resize(i + 1, Value::Null);
    Ok(())
}

fn apply_leaf_obj(map: &mut Map<String, Value>, key: &str, op: &Op, path: &str) -> Result<(), ApiError> {
    match op {
        Op::Unset => {
            map.remove(key);
            Ok(())
        }
        Op::Pull(_) if !map.contains_key(key) => Ok(()),
        _ => {
            let slot = map.entry(key.to_owned()).or_insert(Value::Null);
            let was_missing = slot.is_null();
            if was_missing {
                match op {
                    Op::Inc(n) => {
                        *slot = Value::Number(n.clone());
                        return Ok(());
                    }
                    Op::Push(items) => {
                        *slot = Value::Array(items.clone());
                        return Ok(());
                    }
                    _ => {}
                }
            }
            apply_leaf_value(slot, op, path)
        }
    }
}

fn apply_leaf_value(slot: &mut Value, op: &Op, path: &str) -> Result<(), ApiError> {
    match op {
        Op::Set(v) => *slot = v.clone(),
        Op::Unset => *slot = Value::Null,
        Op::Inc(n) => match slot {
            Value::Number(cur) => *slot = Value::Number(add(cur, n)?),
            Value::Null => *slot = Value::Number(n.clone()),
            _ => return Err(err(format!("cannot $inc {path:?}: it is not a number"))),
        },
        Op::Push(items) => match slot {
            Value::Array(arr) => arr.extend(items.iter().cloned()),
            Value::Null => *slot = Value::Array(items.clone()),
            _ => return Err(err(format!("cannot $push to {path:?}: it is not an array"))),
        },
        Op::Pull(cond) => match slot {
            Value::Array(arr) => arr.retain(|e| !pull_matches(cond, e)),
            Value::Null => {}
            _ => return Err(err(format!("cannot $pull from {path:?}: it is not an array"))),
        },
    }
    Ok(())
}

fn add(a: &Number, b: &Number) -> Result<Number, ApiError> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x.checked_add(y).map(Number::from).ok_or_else(|| err("$inc overflows a 64-bit integer"));
    }
    let sum = a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0);
    Number::from_f64(sum).ok_or_else(|| err("$inc result is not a finite number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn u(update: Value, doc: Value) -> Result<Value, ApiError> {
        Update::parse(&update)?.apply(&doc)
    }

    #[test]
    fn set_unset_inc() {
        let d = json!({"_id": 1, "a": 1, "b": {"c": 2}});
        assert_eq!(
            u(json!({"$set": {"b.d": 3, "x": [1]}}), d.clone()).unwrap(),
            json!({"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "x": [1]})
        );
        assert_eq!(u(json!({"$unset": {"b.c": ""}}), d.clone()).unwrap(), json!({"_id": 1, "a": 1, "b": {}}));
        assert_eq!(
            u(json!({"$inc": {"a": 2, "n": 1.5}}), d.clone()).unwrap(),
            json!({"_id": 1, "a": 3, "b": {"c": 2}, "n": 1.5})
        );
        assert_eq!(u(json!({"$unset": {"zz.y": ""}}), d).unwrap(), json!({"_id": 1, "a": 1, "b": {"c": 2}}));
    }

    #[test]
    fn push_and_pull() {
        let d = json!({"_id": 1, "t": [1, 2, 3, 2], "o": [{"k": 1}, {"k": 2}]});
        assert_eq!(u(json!({"$push": {"t": 4}}), d.clone()).unwrap()["t"], json!([1, 2, 3, 2, 4]));
        assert_eq!(u(json!({"$push": {"t": {"$each": [5, 6]}}}), d.clone()).unwrap()["t"], json!([1, 2, 3, 2, 5, 6]));
        assert_eq!(u(json!({"$push": {"new": 1}}), d.clone()).unwrap()["new"], json!([1]));
        assert_eq!(u(json!({"$pull": {"t": 2}}), d.clone()).unwrap()["t"], json!([1, 3]));
        assert_eq!(u(json!({"$pull": {"t": {"$gte": 2}}}), d.clone()).unwrap()["t"], json!([1]));
        assert_eq!(u(json!({"$pull": {"o": {"k": 1}}}), d).unwrap()["o"], json!([{"k": 2}]));
    }

    #[test]
    fn replacement_keeps_id() {
        let d = json!({"_id": 7, "a": 1});
        assert_eq!(u(json!({"b": 2}), d.clone()).unwrap(), json!({"_id": 7, "b": 2}));
        assert!(u(json!({"_id": 8, "b": 2}), d.clone()).is_err());
        assert!(u(json!({"$set": {"_id": 8}}), d).is_err());
    }

    #[test]
    fn type_errors_are_invalid_update() {
        let d = json!({"_id": 1, "s": "x", "n": 1});
        for bad in [
            json!({"$inc": {"s": 1}}),
            json!({"$push": {"s": 1}}),
            json!({"$set": {"s.t": 1}}),
            json!({"$inc": {"n": i64::MAX}}),
        ] {
            let mut d2 = d.clone();
            if bad["$inc"]["n"].is_number() {
                d2["n"] = json!(i64::MAX);
            }
            assert_eq!(u(bad.clone(), d2).unwrap_err().code, nimbus_api::ErrorCode::InvalidUpdate, "{bad}");
        }
        for bad in [
            json!({}),
            json!({"$set": 1}),
            json!({"$rename": {"a": "b"}}),
            json!({"$set": {"a": 1}, "b": 2}),
            json!({"$set": {"a": 1, "a.b": 2}}),
            json!({"$inc": {"a": "1"}}),
            json!({"$unset": {"_id": ""}}),
            json!([1]),
        ] {
            assert_eq!(Update::parse(&bad).unwrap_err().code, nimbus_api::ErrorCode::InvalidUpdate, "{bad}");
        }
    }
}
