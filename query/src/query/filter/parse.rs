//! Parsing filter documents into [`Filter`] trees.

use nimbus_api::ApiError;
use serde_json::{Map, Value};

use super::{AllOf, CmpOp, Filter, MAX_LIST_VALUES, Pred, TypeSel, ValueSet, err};
use crate::doc::ejson;
use crate::doc::path::{FieldPath, validate_path};
use crate::query::pattern::{Pattern, PatternBudget};

/// Parses a filter document; its regular expressions count against `b`.
pub(super) fn parse_doc(map: &Map<String, Value>, b: &mut PatternBudget) -> Result<Filter, ApiError> {
    let mut parts = Vec::with_capacity(map.len());
    for (key, value) in map {
        if let Some(op) = key.strip_prefix('$') {
            parts.push(match op {
                "and" => Filter::And(parse_list(op, value, b)?),
                "or" => Filter::Or(parse_list(op, value, b)?),
                "nor" => Filter::Nor(parse_list(op, value, b)?),
                "comment" => continue,
                _ => return Err(err(format!("unknown top-level operator ${op}"))),
            });
        } else {
            validate_path(key).map_err(err)?;
            parts.push(Filter::Field { path: FieldPath::new(key), pred: parse_pred(value, b)? });
        }
    }
    Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::And(parts) })
}

/// The filters of `$and`, `$or`, `$nor`.
fn parse_list(op: &str, v: &Value, b: &mut PatternBudget) -> Result<Vec<Filter>, ApiError> {
    let Value::Array(items) = v else {
        return Err(err(format!("${op} needs an array of filters")));
    };
    if items.is_empty() {
        return Err(err(format!("${op} needs a non-empty array")));
    }
    items
        .iter()
        .map(|i| match i {
            Value::Object(m) => parse_doc(m, b),
            _ => Err(err(format!("${op} elements must be objects"))),
        })
        .collect()
}

/// `{"$gt": 1}` style operator objects: every key starts with `$` and the object is not an
/// Extended JSON value such as `{"$date": ...}`.
fn is_operator_object(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty() && m.keys().all(|k| k.starts_with('$')) && ejson::wrapper_name(m).is_none())
}

/// An operand, with its Extended JSON normalised.
fn operand(v: &Value) -> Result<Value, ApiError> {
    ejson::normalized(v).map_err(err)
}

fn parse_pred(v: &Value, b: &mut PatternBudget) -> Result<Pred, ApiError> {
    if let Some(p) = Pattern::from_literal(v, b) {
        return Ok(Pred::Regex(p.map_err(err)?));
    }
    if !is_operator_object(v) {
        if let Value::Object(map) = v
            && ejson::wrapper_name(map).is_none()
            && map.keys().any(|k| k.starts_with('$'))
        {
            return Err(err("cannot mix operators and fields in one object"));
        }
        return Ok(Pred::Eq(operand(v)?));
    }
    let Value::Object(map) = v else { return Ok(Pred::Eq(operand(v)?)) };
    let mut preds = Vec::with_capacity(map.len());
    let options = map.get("$options");
    if options.is_some() && !map.contains_key("$regex") {
        return Err(err("$options needs $regex"));
    }
    for (op, arg) in map {
        let list = || -> Result<&Vec<Value>, ApiError> {
            match arg {
                Value::Array(items) => Ok(items),
                _ => Err(err(format!("{op} needs an array"))),
            }
        };
        preds.push(match op.as_str() {
            "$eq" => Pred::Eq(operand(arg)?),
            "$ne" => Pred::Not(Box::new(Pred::Eq(operand(arg)?))),
            "$gt" => Pred::Cmp(CmpOp::Gt, operand(arg)?),
            "$gte" => Pred::Cmp(CmpOp::Gte, operand(arg)?),
            "$lt" => Pred::Cmp(CmpOp::Lt, operand(arg)?),
            "$lte" => Pred::Cmp(CmpOp::Lte, operand(arg)?),
            "$in" => parse_in(op, list()?, b)?,
            "$nin" => Pred::Not(Box::new(parse_in(op, list()?, b)?)),
            "$exists" => {
                if truthy(arg) {
                    Pred::Exists
                } else {
                    Pred::Not(Box::new(Pred::Exists))
                }
            }
            "$type" => Pred::Type(parse_types(arg)?),
            "$regex" => Pred::Regex(Pattern::from_operator(arg, options, b).map_err(err)?),
            "$options" => continue,
            "$mod" => parse_mod(arg)?,
            "$size" => Pred::Size(parse_size(arg)?),
            "$all" => parse_all(list()?, b)?,
            "$elemMatch" => parse_elem_match(arg, b)?,
            "$not" => {
                if let Some(p) = Pattern::from_literal(arg, b) {
                    Pred::Not(Box::new(Pred::Regex(p.map_err(err)?)))
                } else if is_operator_object(arg) {
                    Pred::Not(Box::new(parse_pred(arg, b)?))
                } else {
                    return Err(err("$not needs an operator object such as {\"$gt\": 1} or a regular expression"));
                }
            }
            _ => return Err(err(format!("unknown operator {op}"))),
        });
    }
    Ok(if preds.len() == 1 { preds.remove(0) } else { Pred::All(preds) })
}

/// The number of values in a list of `op` (`$in`, `$nin`, `$all`), checked.
fn check_list_len(op: &str, items: &[Value]) -> Result<(), ApiError> {
    if items.len() > MAX_LIST_VALUES {
        return Err(err(format!(
            "{op} takes at most {MAX_LIST_VALUES} values, not {}: split the query, or use a range",
            items.len()
        )));
    }
    Ok(())
}

fn parse_in(op: &str, items: &[Value], b: &mut PatternBudget) -> Result<Pred, ApiError> {
    check_list_len(op, items)?;
    b.ensure_room(items.iter().filter(|i| Pattern::is_literal(i)).count()).map_err(err)?;
    let mut values = Vec::with_capacity(items.len());
    let mut patterns = Vec::new();
    for item in items {
        match Pattern::from_literal(item, b) {
            Some(p) => patterns.push(p.map_err(err)?),
            None if is_operator_object(item) => return Err(err("$in and $nin take values, not operators")),
            None => values.push(operand(item)?),
        }
    }
    Ok(Pred::In(ValueSet::new(values), patterns))
}

fn parse_all(items: &[Value], b: &mut PatternBudget) -> Result<Pred, ApiError> {
    if items.is_empty() {
        // MongoDB: `$all: []` matches no document.
        return Ok(Pred::In(ValueSet::default(), vec![]));
    }
    check_list_len("$all", items)?;
    b.ensure_room(items.iter().filter(|i| Pattern::is_literal(i)).count()).map_err(err)?;
    let mut preds = Vec::with_capacity(items.len());
    for item in items {
        preds.push(match item {
            Value::Object(m) if m.len() == 1 && m.contains_key("$elemMatch") => parse_elem_match(&m["$elemMatch"], b)?,
            _ if is_operator_object(item) => return Err(err("$all takes values or {\"$elemMatch\": ...}")),
            _ => match Pattern::from_literal(item, b) {
                Some(p) => Pred::Regex(p.map_err(err)?),
                None => Pred::Eq(operand(item)?),
            },
        });
    }
    Ok(Pred::AllOf(AllOf::new(preds)))
}

/// `$elemMatch`'s argument: operators on each element's value, or a query on each element.
pub(crate) fn parse_elem_match(arg: &Value, b: &mut PatternBudget) -> Result<Pred, ApiError> {
    let Value::Object(m) = arg else {
        return Err(err("$elemMatch needs an object"));
    };
    let first_is_operator = m
        .keys()
        .next()
        .is_some_and(|k| k.starts_with('$') && !matches!(k.as_str(), "$and" | "$or" | "$nor" | "$comment"));
    if first_is_operator {
        match parse_pred(arg, b)? {
            Pred::All(ps) => Ok(Pred::ElemMatchValue(ps)),
            p => Ok(Pred::ElemMatchValue(vec![p])),
        }
    } else {
        Ok(Pred::ElemMatchObject(Box::new(parse_doc(m, b)?)))
    }
}

fn parse_types(arg: &Value) -> Result<Vec<TypeSel>, ApiError> {
    let one = |v: &Value| -> Result<TypeSel, ApiError> {
        let code = match v {
            Value::String(s) => {
                return Ok(match s.as_str() {
                    "double" => TypeSel::Double,
                    "string" => TypeSel::String,
                    "object" => TypeSel::Object,
                    "array" => TypeSel::Array,
                    "objectId" => TypeSel::ObjectId,
                    "bool" => TypeSel::Bool,
                    "date" => TypeSel::Date,
                    "null" => TypeSel::Null,
                    "int" => TypeSel::Int,
                    "long" => TypeSel::Long,
                    "number" => TypeSel::Number,
                    "binData"
                    | "undefined"
                    | "regex"
                    | "dbPointer"
                    | "javascript"
                    | "symbol"
                    | "javascriptWithScope"
                    | "timestamp"
                    | "decimal"
                    | "minKey"
                    | "maxKey" => TypeSel::Never,
                    other => return Err(err(format!("unknown $type {other:?}"))),
                });
            }
            Value::Number(n) => n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64),
            _ => None,
        };
        Ok(match code {
            Some(1) => TypeSel::Double,
            Some(2) => TypeSel::String,
            Some(3) => TypeSel::Object,
            Some(4) => TypeSel::Array,
            Some(7) => TypeSel::ObjectId,
            Some(8) => TypeSel::Bool,
            Some(9) => TypeSel::Date,
            Some(10) => TypeSel::Null,
            Some(16) => TypeSel::Int,
            Some(18) => TypeSel::Long,
            Some(5 | 6 | 11 | 12 | 13 | 14 | 15 | 17 | 19 | -1 | 127) => TypeSel::Never,
            _ => return Err(err(format!("invalid $type {v}"))),
        })
    };
    match arg {
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::Array(_) => Err(err("$type needs at least one type")),
        v => Ok(vec![one(v)?]),
    }
}

fn parse_mod(arg: &Value) -> Result<Pred, ApiError> {
    let int = |v: &Value| -> Option<i64> {
        match v {
            Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f.trunc() as i64)),
            _ => None,
        }
    };
    match arg {
        Value::Array(items) if items.len() == 2 => match (int(&items[0]), int(&items[1])) {
            (Some(0), Some(_)) => Err(err("$mod divisor cannot be 0")),
            (Some(d), Some(r)) => Ok(Pred::Mod(d, r)),
            _ => Err(err("$mod needs [divisor, remainder] as numbers")),
        },
        _ => Err(err("$mod needs an array [divisor, remainder]")),
    }
}

fn parse_size(arg: &Value) -> Result<usize, ApiError> {
    match arg {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
            .and_then(|u| usize::try_from(u).ok())
            .ok_or_else(|| err("$size needs a non-negative whole number")),
        _ => Err(err("$size needs a number")),
    }
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
