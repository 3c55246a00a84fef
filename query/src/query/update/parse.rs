//! Parsing update documents and array filters.

use std::cmp::Ordering;

use nimbus_api::ApiError;
use serde_json::{Map, Value};

use super::{Op, Ops, Part, PullCond, Push, PushSort, Update, UpdatePath, err};
use crate::doc::ejson;
use crate::doc::path::Root;
use crate::query::filter::{Filter, MAX_LIST_VALUES, ValueSet};
use crate::query::pattern::PatternBudget;
use crate::query::sort::{SortSpec, parse_direction};

pub(super) fn parse(v: &Value, array_filters: Option<&Value>) -> Result<Update, ApiError> {
    let Value::Object(map) = v else {
        return Err(err("update must be an object"));
    };
    if map.is_empty() {
        return Err(err("update must not be empty"));
    }
    let ops = map.keys().filter(|k| k.starts_with('$')).count();
    if ops == 0 {
        if array_filters.is_some_and(|f| !f.is_null()) {
            return Err(err("arrayFilters need update operators, not a replacement document"));
        }
        check_field_names(map)?;
        let mut replacement = map.clone();
        for v in replacement.values_mut() {
            ejson::normalize(v).map_err(err)?;
        }
        // `_id` is checked against the document's when applied: it is never changed.
        return Ok(Update::Replace(replacement));
    }
    if ops != map.len() {
        return Err(err("update cannot mix $ operators and plain fields"));
    }
    // Every pair of paths is checked for a conflict: bounded, since this runs in the apply
    // loop every database of the replica set shares.
    let fields: usize = map.values().map(|a| a.as_object().map_or(0, |o| o.len())).sum();
    if fields > MAX_UPDATE_FIELDS {
        return Err(err(format!(
            "an update may change at most {MAX_UPDATE_FIELDS} fields; set an embedded document instead"
        )));
    }
    let mut out: Vec<(UpdatePath, Op)> = Vec::new();
    let mut targets: Vec<UpdatePath> = Vec::new();
    // The regular expressions of every `$pull` condition and array filter count together.
    let mut budget = PatternBudget::default();
    for (op, args) in map {
        let Value::Object(args) = args else {
            return Err(err(format!("{op} needs an object of fields")));
        };
        for (path, arg) in args {
            let path = parse_path(path)?;
            let parsed = parse_op(op, &path, arg, &mut budget)?;
            let touches_id = matches!(path.parts.first(), Some(Part::Field(f)) if f == "_id");
            if touches_id && !matches!(parsed, Op::Set(_) | Op::SetOnInsert(_)) {
                return Err(err("_id cannot be modified"));
            }
            let mut paths = vec![path.clone()];
            if let Op::Rename(to) = &parsed {
                if matches!(to.parts.first(), Some(Part::Field(f)) if f == "_id") {
                    return Err(err("_id cannot be modified"));
                }
                paths.push(to.clone());
            }
            for p in &paths {
                if let Some(other) = targets.iter().find(|t| conflicts(t, p)) {
                    return Err(err(format!(
                        "updating {p:?} and {other:?} in one update conflicts",
                        p = p.text,
                        other = other.text
                    )));
                }
            }
            if paths.len() == 2 && conflicts(&paths[0], &paths[1]) {
                return Err(err(format!("$rename of {} to {}: the paths overlap", paths[0], paths[1])));
            }
            targets.extend(paths);
            out.push((path, parsed));
        }
    }
    out.sort_by(|(a, _), (b, _)| path_order(a, b));
    let uses_positional = out.iter().any(|(p, _)| p.parts.contains(&Part::Positional));
    let array_filters = parse_array_filters(array_filters, &out, &mut budget)?;
    Ok(Update::Ops(Ops { ops: out, array_filters, uses_positional }))
}

/// Field names of a replacement document, as documents have them.
fn check_field_names(map: &Map<String, Value>) -> Result<(), ApiError> {
    for k in map.keys() {
        if k.is_empty() || k.contains('.') || k.starts_with('$') {
            return Err(err(format!("invalid field name {k:?} in replacement document")));
        }
    }
    Ok(())
}

/// Most `$[<id>]` one update path may hold: each level evaluates its array filter on every
/// element of the arrays it reaches.
pub const MAX_FILTERED_PER_PATH: usize = 8;

/// Splits and checks an update path: non-empty components; `$`, `$[]` and `$[<id>]` only
/// after the first component, `<id>` a lower-case letter then letters and digits; one `$`.
fn parse_path(path: &str) -> Result<UpdatePath, ApiError> {
    crate::doc::path::validate_path(path).map_err(err)?;
    let mut parts = Vec::new();
    for (i, c) in path.split('.').enumerate() {
        let part = if let Some(rest) = c.strip_prefix('$') {
            if i == 0 {
                return Err(err(format!("invalid path {path:?}: starts with $")));
            }
            match rest {
                "" => Part::Positional,
                "[]" => Part::AllElements,
                _ => match rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                    Some(id) if is_identifier(id) => Part::Filtered(id.to_owned()),
                    _ => return Err(err(format!("invalid path component {c:?} in {path:?}"))),
                },
            }
        } else {
            Part::Field(c.to_owned())
        };
        parts.push(part);
    }
    if parts.iter().filter(|p| **p == Part::Positional).count() > 1 {
        return Err(err(format!("{path:?}: at most one positional $ per path")));
    }
    if parts.iter().filter(|p| matches!(p, Part::Filtered(_))).count() > MAX_FILTERED_PER_PATH {
        return Err(err(format!("{path:?}: at most {MAX_FILTERED_PER_PATH} $[<id>] per path")));
    }
    Ok(UpdatePath { text: path.to_owned(), parts })
}

/// Most fields one update's operators name.
pub const MAX_UPDATE_FIELDS: usize = 1_000;

fn is_identifier(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_lowercase()) && id.chars().all(|c| c.is_ascii_alphanumeric()) && id.len() <= 64
}

/// Two paths conflict when one is a prefix of the other, component by component; an array
/// placeholder may stand for any element, so it conflicts with any component.
fn conflicts(a: &UpdatePath, b: &UpdatePath) -> bool {
    a.parts.iter().zip(&b.parts).all(|(x, y)| match (x, y) {
        (Part::Field(x), Part::Field(y)) => x == y,
        _ => true,
    })
}

/// Lexicographic by component; numeric components by number (MongoDB 5.0's order).
fn path_order(a: &UpdatePath, b: &UpdatePath) -> Ordering {
    fn key(p: &Part) -> (u8, u64, &str) {
        match p {
            Part::Field(f) if !f.is_empty() && f.len() <= 19 && f.bytes().all(|b| b.is_ascii_digit()) => {
                (0, f.parse().unwrap_or(u64::MAX), f)
            }
            Part::Field(f) => (1, 0, f),
            Part::Positional => (2, 0, "$"),
            Part::AllElements => (2, 0, "$[]"),
            Part::Filtered(id) => (2, 0, id),
        }
    }
    a.parts.iter().map(key).cmp(b.parts.iter().map(key))
}

fn operand(v: &Value) -> Result<Value, ApiError> {
    ejson::normalized(v).map_err(err)
}

/// The values of `$addToSet`'s `$each` or of `$pullAll`: as many as a `$in` may hold.
fn list(op: &str, items: &[Value]) -> Result<Vec<Value>, ApiError> {
    if items.len() > MAX_LIST_VALUES {
        return Err(err(format!("{op} takes at most {MAX_LIST_VALUES} values, not {}", items.len())));
    }
    items.iter().map(operand).collect()
}

fn number(op: &str, path: &UpdatePath, arg: &Value) -> Result<serde_json::Number, ApiError> {
    match operand(arg)? {
        Value::Number(n) => Ok(n),
        _ => Err(err(format!("{op} of {path:?} needs a number", path = path.text))),
    }
}

fn parse_op(op: &str, path: &UpdatePath, arg: &Value, budget: &mut PatternBudget) -> Result<Op, ApiError> {
    Ok(match op {
        "$set" => Op::Set(operand(arg)?),
        "$setOnInsert" => Op::SetOnInsert(operand(arg)?),
        "$unset" => Op::Unset,
        "$inc" => Op::Inc(number(op, path, arg)?),
        "$mul" => Op::Mul(number(op, path, arg)?),
        "$min" => Op::Min(operand(arg)?),
        "$max" => Op::Max(operand(arg)?),
        "$currentDate" => match arg {
            Value::Bool(_) => Op::CurrentDate,
            Value::Object(m) if m.len() == 1 && m.get("$type") == Some(&Value::String("date".into())) => {
                Op::CurrentDate
            }
            Value::Object(m) if m.len() == 1 && m.get("$type") == Some(&Value::String("timestamp".into())) => {
                return Err(err("$currentDate with $type timestamp is not supported: use date"));
            }
            _ => return Err(err("$currentDate needs true or {\"$type\": \"date\"}")),
        },
        "$rename" => {
            let Value::String(to) = arg else {
                return Err(err("$rename needs the new name as a string"));
            };
            let to = parse_path(to)?;
            if path.parts.iter().chain(&to.parts).any(|p| !matches!(p, Part::Field(_))) {
                return Err(err("$rename paths cannot hold array placeholders ($, $[], $[<id>])"));
            }
            if to == *path {
                return Err(err(format!("$rename of {path:?} to itself", path = path.text)));
            }
            Op::Rename(to)
        }
        "$push" => Op::Push(parse_push(arg)?),
        "$addToSet" => Op::AddToSet(match arg {
            Value::Object(m) if m.contains_key("$each") => match (m.len(), &m["$each"]) {
                (1, Value::Array(items)) => list(op, items)?,
                _ => return Err(err("$addToSet with $each needs exactly {\"$each\": [...]}")),
            },
            other => vec![operand(other)?],
        }),
        "$pop" => match arg.as_f64() {
            Some(1.0) => Op::Pop(false),
            Some(-1.0) => Op::Pop(true),
            _ => return Err(err("$pop needs 1 (the last element) or -1 (the first)")),
        },
        "$pull" => Op::Pull(parse_pull(arg, budget)?),
        "$pullAll" => match arg {
            Value::Array(items) => Op::PullAll(ValueSet::new(list(op, items)?)),
            _ => return Err(err("$pullAll needs an array")),
        },
        other => return Err(err(format!("unknown update operator {other}"))),
    })
}

fn parse_push(arg: &Value) -> Result<Push, ApiError> {
    let Value::Object(m) = arg else {
        return Ok(Push { each: vec![operand(arg)?], position: None, slice: None, sort: None });
    };
    if !m.contains_key("$each") {
        return Ok(Push { each: vec![operand(arg)?], position: None, slice: None, sort: None });
    }
    let mut push = Push { each: vec![], position: None, slice: None, sort: None };
    let int = |name: &str, v: &Value| -> Result<i64, ApiError> {
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18).map(|f| f as i64))
            .ok_or_else(|| err(format!("$push's {name} needs a whole number")))
    };
    for (k, v) in m {
        match k.as_str() {
            "$each" => match v {
                Value::Array(items) => push.each = items.iter().map(operand).collect::<Result<_, _>>()?,
                _ => return Err(err("$push's $each needs an array")),
            },
            "$position" => push.position = Some(int(k, v)?),
            "$slice" => push.slice = Some(int(k, v)?),
            "$sort" => {
                push.sort = Some(match v {
                    Value::Object(fields) if !fields.is_empty() => {
                        let spec = SortSpec::parse(Some(v)).map_err(|e| err(e.message))?;
                        if fields.keys().any(|f| f.starts_with('$')) {
                            return Err(err("$push's $sort fields cannot start with $"));
                        }
                        PushSort::Fields(spec)
                    }
                    other => PushSort::Value(parse_direction(other).map_err(err)?),
                })
            }
            other => return Err(err(format!("unknown $push modifier {other}"))),
        }
    }
    Ok(push)
}

fn parse_pull(arg: &Value, budget: &mut PatternBudget) -> Result<PullCond, ApiError> {
    let wrap = |e: ApiError| err(e.message);
    match arg {
        Value::Object(m)
            if !m.is_empty() && m.keys().all(|k| k.starts_with('$')) && ejson::wrapper_name(m).is_none() =>
        {
            // Operators on each element, as on a field: parse them as a field's predicate.
            let field = Map::from_iter([(PULL_FIELD.to_owned(), arg.clone())]);
            match Filter::parse_with(Some(&Value::Object(field)), budget).map_err(wrap)? {
                f @ Filter::Field { .. } => Ok(PullCond::Operators(f)),
                _ => Err(err("invalid $pull condition")),
            }
        }
        Value::Object(m) if ejson::wrapper_name(m).is_none() => {
            Ok(PullCond::Filter(Filter::parse_with(Some(arg), budget).map_err(wrap)?))
        }
        other => Ok(PullCond::Equal(operand(other)?)),
    }
}

/// Parses `arrayFilters`: each a filter whose fields all start with one identifier, used by
/// a `$[<id>]` of the update; every identifier used has its filter.
fn parse_array_filters(
    v: Option<&Value>,
    ops: &[(UpdatePath, Op)],
    budget: &mut PatternBudget,
) -> Result<Vec<(String, Filter)>, ApiError> {
    let used: Vec<&str> = ops
        .iter()
        .flat_map(|(p, _)| p.parts.iter())
        .filter_map(|p| match p {
            Part::Filtered(id) => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let items: &[Value] = match v {
        None | Some(Value::Null) => &[],
        Some(Value::Array(items)) => items,
        Some(_) => return Err(err("arrayFilters must be an array of filters")),
    };
    let mut out: Vec<(String, Filter)> = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(m) = item else {
            return Err(err("each array filter must be an object"));
        };
        let mut ids = m.keys().filter(|k| !k.starts_with('$')).map(|k| k.split('.').next().unwrap_or(k));
        let Some(id) = ids.next() else {
            return Err(err("an array filter needs a field such as {\"x.score\": {\"$gt\": 5}}"));
        };
        if ids.any(|other| other != id) || m.keys().any(|k| k.starts_with('$')) {
            return Err(err("the fields of one array filter must all start with the same identifier"));
        }
        if !is_identifier(id) {
            return Err(err(format!(
                "array filter identifier {id:?} must start with a lower-case letter, then letters and digits"
            )));
        }
        if out.iter().any(|(o, _)| o == id) {
            return Err(err(format!("two array filters for the identifier {id:?}")));
        }
        if !used.contains(&id) {
            return Err(err(format!("the array filter for identifier {id:?} is not used in the update")));
        }
        let filter = Filter::parse_with(Some(item), budget).map_err(|e| err(e.message))?;
        out.push((id.to_owned(), filter));
    }
    if let Some(missing) = used.iter().find(|u| !out.iter().any(|(id, _)| id == *u)) {
        return Err(err(format!("no array filter for the identifier {missing:?}")));
    }
    Ok(out)
}

/// The field a `$pull` operator condition sees each element as.
const PULL_FIELD: &str = "v";

impl PullCond {
    pub(super) fn matches(&self, element: &Value) -> bool {
        use crate::doc::order::values_equal;
        match self {
            PullCond::Equal(v) => values_equal(element, v),
            PullCond::Operators(f) => f.matches_in(Root::Bound { name: PULL_FIELD, value: element }),
            PullCond::Filter(f) => element.is_object() && f.matches(element),
        }
    }
}
