//! Filters: MongoDB's query language. Implicit equality, dotted paths with array traversal
//! ([`crate::doc::path`]), `$eq $ne $gt $gte $lt $lte $in $nin $exists $type $regex $mod
//! $size $all $elemMatch $not $and $or $nor`.
//!
//! Every leaf predicate is tested against each element its path reaches, as MongoDB's
//! matcher does: a document matches when one element does, and each predicate of
//! `{"a": {"$gt": 1, "$lt": 5}}` may be met by a different element of an array.

use std::cmp::Ordering;

use nimbus_api::ApiError;
use serde_json::{Map, Value};

use super::pattern::Pattern;
use crate::doc::ejson;
use crate::doc::order::{Bracket, bracket, compare};
use crate::doc::path::{FieldPath, LeafArrays, for_each_element, validate_path};

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Nor(Vec<Filter>),
    Field { path: FieldPath, pred: Pred },
}

/// A predicate on the values at one path.
#[derive(Debug, Clone, PartialEq)]
pub enum Pred {
    Eq(Value),
    Cmp(CmpOp, Value),
    /// `$in`: equal to one of the values or matching one of the patterns.
    In(Vec<Value>, Vec<Pattern>),
    Exists,
    Type(Vec<TypeSel>),
    Regex(Pattern),
    /// `$mod: [divisor, remainder]`
    Mod(i64, i64),
    /// `$size`: an array of this many elements.
    Size(usize),
    /// `$elemMatch` with a query on each element (objects).
    ElemMatchObject(Box<Filter>),
    /// `$elemMatch` with operators on each element's value.
    ElemMatchValue(Vec<Pred>),
    Not(Box<Pred>),
    /// Several operators on one path, each met by any element: `{"$gt": 1, "$lt": 5}`.
    All(Vec<Pred>),
    /// `$all`: each of these met by any element.
    AllOf(Vec<Pred>),
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

/// A type `$type` selects (BSON's names; the ones no JSON document holds never match).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeSel {
    Double,
    String,
    Object,
    Array,
    ObjectId,
    Bool,
    Date,
    Null,
    Int,
    Long,
    /// Any number.
    Number,
    /// A BSON type a JSON document cannot hold (binData, regex, timestamp, decimal, ...).
    Never,
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
        self.eval(doc).is_some()
    }

    /// `None` when `doc` does not match; otherwise the position in the outermost array that
    /// made it match, when an array did (what the positional update operator `$` uses).
    pub fn eval(&self, doc: &Value) -> Option<Option<usize>> {
        match self {
            Filter::And(fs) => {
                let mut offset = None;
                for f in fs {
                    offset = f.eval(doc)?.or(offset);
                }
                Some(offset)
            }
            Filter::Or(fs) => fs.iter().find_map(|f| f.eval(doc)),
            Filter::Nor(fs) => (!fs.iter().any(|f| f.matches(doc))).then_some(None),
            Filter::Field { path, pred } => pred.eval(doc, path),
        }
    }

    /// The filter's shape: its structure with every value replaced by `?`, so that
    /// queries differing only in values share statistics.
    pub fn shape(&self) -> String {
        let list = |fs: &[Filter]| fs.iter().map(Filter::shape).collect::<Vec<_>>().join(",");
        match self {
            Filter::And(fs) if fs.is_empty() => "{}".into(),
            Filter::And(fs) => format!("$and[{}]", list(fs)),
            Filter::Or(fs) => format!("$or[{}]", list(fs)),
            Filter::Nor(fs) => format!("$nor[{}]", list(fs)),
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
                "comment" => continue,
                _ => return Err(err(format!("unknown top-level operator ${op}"))),
            });
        } else {
            validate_path(key).map_err(err)?;
            parts.push(Filter::Field { path: FieldPath::new(key), pred: parse_pred(value)? });
        }
    }
    Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::And(parts) })
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

fn parse_pred(v: &Value) -> Result<Pred, ApiError> {
    if let Some(p) = Pattern::from_literal(v) {
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
            "$in" => parse_in(list()?)?,
            "$nin" => Pred::Not(Box::new(parse_in(list()?)?)),
            "$exists" => {
                if truthy(arg) {
                    Pred::Exists
                } else {
                    Pred::Not(Box::new(Pred::Exists))
                }
            }
            "$type" => Pred::Type(parse_types(arg)?),
            "$regex" => Pred::Regex(Pattern::from_operator(arg, options).map_err(err)?),
            "$options" => continue,
            "$mod" => parse_mod(arg)?,
            "$size" => Pred::Size(parse_size(arg)?),
            "$all" => parse_all(list()?)?,
            "$elemMatch" => parse_elem_match(arg)?,
            "$not" => {
                if let Some(p) = Pattern::from_literal(arg) {
                    Pred::Not(Box::new(Pred::Regex(p.map_err(err)?)))
                } else if is_operator_object(arg) {
                    Pred::Not(Box::new(parse_pred(arg)?))
                } else {
                    return Err(err("$not needs an operator object such as {\"$gt\": 1} or a regular expression"));
                }
            }
            _ => return Err(err(format!("unknown operator {op}"))),
        });
    }
    Ok(if preds.len() == 1 { preds.remove(0) } else { Pred::All(preds) })
}

fn parse_in(items: &[Value]) -> Result<Pred, ApiError> {
    let mut values = Vec::with_capacity(items.len());
    let mut patterns = Vec::new();
    for item in items {
        match Pattern::from_literal(item) {
            Some(p) => patterns.push(p.map_err(err)?),
            None if is_operator_object(item) => return Err(err("$in and $nin take values, not operators")),
            None => values.push(operand(item)?),
        }
    }
    Ok(Pred::In(values, patterns))
}

fn parse_all(items: &[Value]) -> Result<Pred, ApiError> {
    if items.is_empty() {
        // MongoDB: `$all: []` matches no document.
        return Ok(Pred::In(vec![], vec![]));
    }
    let mut preds = Vec::with_capacity(items.len());
    for item in items {
        preds.push(match item {
            Value::Object(m) if m.len() == 1 && m.contains_key("$elemMatch") => parse_elem_match(&m["$elemMatch"])?,
            _ if is_operator_object(item) => return Err(err("$all takes values or {\"$elemMatch\": ...}")),
            _ => match Pattern::from_literal(item) {
                Some(p) => Pred::Regex(p.map_err(err)?),
                None => Pred::Eq(operand(item)?),
            },
        });
    }
    Ok(Pred::AllOf(preds))
}

fn parse_elem_match(arg: &Value) -> Result<Pred, ApiError> {
    let Value::Object(m) = arg else {
        return Err(err("$elemMatch needs an object"));
    };
    let first_is_operator = m
        .keys()
        .next()
        .is_some_and(|k| k.starts_with('$') && !matches!(k.as_str(), "$and" | "$or" | "$nor" | "$comment"));
    if first_is_operator {
        match parse_pred(arg)? {
            Pred::All(ps) => Ok(Pred::ElemMatchValue(ps)),
            p => Ok(Pred::ElemMatchValue(vec![p])),
        }
    } else {
        Ok(Pred::ElemMatchObject(Box::new(parse_doc(m)?)))
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

impl Pred {
    pub fn matches(&self, doc: &Value, path: &FieldPath) -> bool {
        self.eval(doc, path).is_some()
    }

    /// Whether the values at `path` satisfy the predicate (see [`Filter::eval`]).
    pub fn eval(&self, doc: &Value, path: &FieldPath) -> Option<Option<usize>> {
        match self {
            Pred::Not(p) => p.eval(doc, path).is_none().then_some(None),
            Pred::All(ps) | Pred::AllOf(ps) => {
                let mut offset = None;
                for p in ps {
                    offset = p.eval(doc, path)?.or(offset);
                }
                Some(offset)
            }
            _ => {
                let leaf = match self {
                    Pred::Size(_) | Pred::ElemMatchObject(_) | Pred::ElemMatchValue(_) => LeafArrays::Whole,
                    _ => LeafArrays::Traverse,
                };
                let mut found = None;
                let _ = for_each_element(doc, path, leaf, &mut |e| match self.single(e.value) {
                    Some(inner) => {
                        found = Some(e.array_offset.or(inner));
                        std::ops::ControlFlow::Break(())
                    }
                    None => std::ops::ControlFlow::Continue(()),
                });
                found
            }
        }
    }

    /// Whether one element (`None`: missing) satisfies the predicate; with the position of
    /// the array element that did, for `$elemMatch`.
    fn single(&self, e: Option<&Value>) -> Option<Option<usize>> {
        let hit = |b: bool| b.then_some(None);
        match self {
            Pred::Eq(v) => hit(eq_single(e, v)),
            Pred::Cmp(op, v) => hit(cmp_single(e, *op, v)),
            Pred::In(vs, ps) => hit(vs.iter().any(|v| eq_single(e, v))
                || ps.iter().any(|p| matches!(e, Some(Value::String(s)) if p.is_match(s)))),
            Pred::Exists => hit(e.is_some()),
            Pred::Type(ts) => hit(e.is_some_and(|v| ts.iter().any(|t| type_matches(*t, v)))),
            Pred::Regex(p) => hit(matches!(e, Some(Value::String(s)) if p.is_match(s))),
            Pred::Mod(d, r) => hit(match e {
                Some(Value::Number(n)) => {
                    let x = n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f.trunc() as i64));
                    x.is_some_and(|x| x.checked_rem(*d).unwrap_or(0) == *r)
                }
                _ => false,
            }),
            Pred::Size(n) => hit(matches!(e, Some(Value::Array(items)) if items.len() == *n)),
            Pred::ElemMatchObject(f) => {
                let Some(Value::Array(items)) = e else { return None };
                items
                    .iter()
                    .position(|item| match item {
                        Value::Object(_) => f.matches(item),
                        // MongoDB reads an array element as an object keyed "0", "1", ...
                        Value::Array(inner) => f.matches(&Value::Object(
                            inner.iter().enumerate().map(|(i, v)| (i.to_string(), v.clone())).collect(),
                        )),
                        _ => false,
                    })
                    .map(Some)
            }
            Pred::ElemMatchValue(ps) => {
                let Some(Value::Array(items)) = e else { return None };
                items.iter().position(|item| ps.iter().all(|p| p.single(Some(item)).is_some())).map(Some)
            }
            Pred::Not(p) => hit(p.single(e).is_none()),
            Pred::All(ps) | Pred::AllOf(ps) => hit(ps.iter().all(|p| p.single(e).is_some())),
        }
    }

    fn shape(&self) -> String {
        match self {
            Pred::Eq(_) => "?".into(),
            Pred::Cmp(op, _) => format!("{op:?}").to_lowercase(),
            Pred::In(..) => "$in".into(),
            Pred::Exists => "$exists".into(),
            Pred::Type(_) => "$type".into(),
            Pred::Regex(_) => "$regex".into(),
            Pred::Mod(..) => "$mod".into(),
            Pred::Size(_) => "$size".into(),
            Pred::ElemMatchObject(f) => format!("$elemMatch({})", f.shape()),
            Pred::ElemMatchValue(ps) => {
                format!("$elemMatch({})", ps.iter().map(Pred::shape).collect::<Vec<_>>().join("&"))
            }
            Pred::Not(p) => format!("$not({})", p.shape()),
            Pred::All(ps) => ps.iter().map(Pred::shape).collect::<Vec<_>>().join("&"),
            Pred::AllOf(ps) => format!("$all({})", ps.iter().map(Pred::shape).collect::<Vec<_>>().join(",")),
        }
    }
}

/// Equality of one element: `null` also matches a missing one.
fn eq_single(e: Option<&Value>, v: &Value) -> bool {
    match e {
        None => v.is_null(),
        Some(x) => bracket(x) == bracket(v) && compare(x, v) == Ordering::Equal,
    }
}

/// Comparison of one element: only within the operand's type bracket; `$gte`/`$lte` null
/// mean "null or missing", `$gt`/`$lt` null match nothing.
fn cmp_single(e: Option<&Value>, op: CmpOp, v: &Value) -> bool {
    if v.is_null() {
        return matches!(op, CmpOp::Gte | CmpOp::Lte) && eq_single(e, v);
    }
    match e {
        Some(x) => bracket(x) == bracket(v) && op.holds(compare(x, v)),
        None => false,
    }
}

fn type_matches(t: TypeSel, v: &Value) -> bool {
    let b = bracket(v);
    match t {
        TypeSel::Double => matches!(v, Value::Number(n) if n.is_f64()),
        TypeSel::Int => matches!(v, Value::Number(n) if n.as_i64().is_some_and(|i| i32::try_from(i).is_ok())),
        TypeSel::Long => {
            matches!(v, Value::Number(n) if !n.is_f64() && n.as_i64().is_none_or(|i| i32::try_from(i).is_err()))
        }
        TypeSel::Number => b == Bracket::Number,
        TypeSel::String => b == Bracket::String,
        TypeSel::Object => b == Bracket::Object,
        TypeSel::Array => b == Bracket::Array,
        TypeSel::ObjectId => b == Bracket::ObjectId,
        TypeSel::Bool => b == Bracket::Bool,
        TypeSel::Date => b == Bracket::Date,
        TypeSel::Null => b == Bracket::Null,
        TypeSel::Never => false,
    }
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
        assert!(m(json!({"a": [1]}), json!({"a": [[1], 2]})));
        assert!(!m(json!({"a": 1}), json!({"a": [[1], 2]})));
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

    /// MongoDB's own expectations for null on dotted paths (its jstest
    /// `null_query_semantics.js`, the semantics before SERVER-36681).
    #[test]
    fn null_on_dotted_paths_is_mongodbs() {
        let docs = [
            ("a_empty_subobject", json!({"a": {}}), true),
            ("a_null", json!({"a": null}), true),
            ("a_number", json!({"a": 4}), true),
            ("a_subobject_b_not_null", json!({"a": {"b": "hi"}}), false),
            ("a_subobject_b_null", json!({"a": {"b": null}}), true),
            ("no_a", json!({}), true),
            ("a_double_array", json!({"a": [[]]}), false),
            ("a_empty_array", json!({"a": []}), false),
            ("a_object_array_no_b_nulls", json!({"a": [{"b": 1}, {"b": 3}, {"b": "string"}]}), false),
            ("a_object_array_some_b_nulls", json!({"a": [{"b": null}, {"b": 3}, {"b": null}]}), true),
            ("a_object_array_some_b_missing", json!({"a": [{"b": 3}, {}]}), true),
            ("a_value_array_all_nulls", json!({"a": [null, null]}), false),
            ("a_value_array_no_nulls", json!({"a": [1, "string", 4]}), false),
            ("issue: one object without b", json!({"a": [{"b": 1}, {"c": 1}]}), true),
        ];
        for (name, doc, want) in docs {
            assert_eq!(m(json!({"a.b": null}), doc.clone()), want, "{{a.b: null}} on {name}");
            assert_eq!(m(json!({"a.b": {"$ne": null}}), doc.clone()), !want, "{{a.b: {{$ne: null}}}} on {name}");
            assert_eq!(m(json!({"a.b": {"$in": [null, 75]}}), doc), want, "{{a.b: {{$in: [null, 75]}}}} on {name}");
        }
        // On the field itself, arrays holding null match.
        assert!(m(json!({"a": null}), json!({"a": [1, null]})));
        assert!(!m(json!({"a": null}), json!({"a": []})));
        assert!(m(json!({"a": {"$elemMatch": {"$eq": null}}}), json!({"a": [1, null]})));
        assert!(!m(json!({"a": {"$elemMatch": {"$ne": null}}}), json!({"a": []})));
    }

    #[test]
    fn ranges_stay_in_their_type_bracket() {
        assert!(m(json!({"a": {"$gt": 1}}), json!({"a": 2})));
        assert!(!m(json!({"a": {"$gt": 1}}), json!({"a": "2"})));
        assert!(m(json!({"a": {"$gt": 1, "$lt": 3}}), json!({"a": 2})));
        assert!(!m(json!({"a": {"$gt": 1, "$lt": 3}}), json!({"a": 3})));
        assert!(m(json!({"a": {"$lte": "b"}}), json!({"a": "abc"})));
        assert!(m(json!({"a": {"$gt": 5}}), json!({"a": [1, 9]})));
        // Each bound may be met by a different element.
        assert!(m(json!({"a": {"$gt": 5, "$lt": 3}}), json!({"a": [1, 9]})));
        assert!(!m(json!({"a": {"$elemMatch": {"$gt": 5, "$lt": 3}}}), json!({"a": [1, 9]})));
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
        assert!(m(json!({"c": {"$exists": false}, "a": {"$exists": true}}), d.clone()));
        assert!(m(json!({"a": 1, "$comment": "why"}), d));
    }

    #[test]
    fn array_operators() {
        let d = json!({"t": ["a", "b", "c"], "o": [{"k": 1, "v": "x"}, {"k": 2, "v": "y"}], "n": [[1, 2], [3]]});
        assert!(m(json!({"t": {"$all": ["c", "a"]}}), d.clone()));
        assert!(!m(json!({"t": {"$all": ["c", "z"]}}), d.clone()));
        assert!(!m(json!({"t": {"$all": []}}), d.clone()));
        assert!(m(json!({"t": {"$size": 3}}), d.clone()));
        assert!(!m(json!({"n": {"$size": 2}}), json!({"n": [[1, 2]]})));
        assert!(m(json!({"o": {"$elemMatch": {"k": 2, "v": "y"}}}), d.clone()));
        assert!(!m(json!({"o": {"$elemMatch": {"k": 2, "v": "x"}}}), d.clone()));
        // Without $elemMatch the two conditions may hold in different elements.
        assert!(m(json!({"o.k": 2, "o.v": "x"}), d.clone()));
        assert!(m(json!({"o": {"$all": [{"$elemMatch": {"k": 1}}, {"$elemMatch": {"k": 2}}]}}), d.clone()));
        assert!(m(json!({"n": {"$elemMatch": {"$size": 1}}}), d.clone()));
        assert!(m(json!({"n": {"$elemMatch": {"0": 3}}}), d));
    }

    #[test]
    fn type_regex_and_mod() {
        let d = json!({"i": 5, "f": 5.5, "s": "Hello", "d": {"$date": "2024-01-01T00:00:00.000Z"}, "n": null, "big": 5_000_000_000i64});
        assert!(m(json!({"i": {"$type": "int"}}), d.clone()));
        assert!(m(json!({"i": {"$type": ["string", "number"]}}), d.clone()));
        assert!(m(json!({"f": {"$type": 1}}), d.clone()));
        assert!(m(json!({"big": {"$type": "long"}}), d.clone()));
        assert!(m(json!({"d": {"$type": "date"}}), d.clone()));
        assert!(m(json!({"n": {"$type": "null"}}), d.clone()));
        assert!(!m(json!({"missing": {"$type": "null"}}), d.clone()));
        assert!(m(json!({"s": {"$regex": "^hel", "$options": "i"}}), d.clone()));
        assert!(!m(json!({"s": {"$regex": "^hel"}}), d.clone()));
        assert!(m(json!({"s": {"$regularExpression": {"pattern": "l+o$", "options": ""}}}), d.clone()));
        assert!(m(json!({"s": {"$in": [1, {"$regularExpression": {"pattern": "^H", "options": ""}}]}}), d.clone()));
        assert!(m(json!({"s": {"$not": {"$regularExpression": {"pattern": "^x", "options": ""}}}}), d.clone()));
        assert!(m(json!({"i": {"$mod": [2, 1]}}), d.clone()));
        assert!(m(json!({"f": {"$mod": [5, 0]}}), d.clone()));
        assert!(!m(json!({"s": {"$mod": [5, 0]}}), d));
    }

    #[test]
    fn dates_compare_as_dates() {
        let d = json!({"at": {"$date": "2024-06-01T00:00:00.000Z"}});
        assert!(!m(json!({"at": {"$gt": {"$date": "2024-05-31T23:00:00-02:00"}}}), d.clone()));
        assert!(m(json!({"at": {"$gte": {"$date": 1717200000000i64}}}), d.clone()));
        assert!(m(json!({"at": {"$date": "2024-06-01T02:00:00+02:00"}}), d.clone()));
        // A date is not a string.
        assert!(!m(json!({"at": {"$gt": "2000"}}), d));
    }

    #[test]
    fn the_offset_of_the_matching_element_is_reported() {
        let f = |q: Value, d: Value| Filter::parse(Some(&q)).unwrap().eval(&d);
        assert_eq!(f(json!({"a": 3}), json!({"a": [1, 3]})), Some(Some(1)));
        assert_eq!(f(json!({"a.b": 2}), json!({"a": [{"b": 1}, {"b": 2}]})), Some(Some(1)));
        assert_eq!(f(json!({"a": {"$elemMatch": {"b": 2}}}), json!({"a": [{"b": 1}, {"b": 2}]})), Some(Some(1)));
        assert_eq!(f(json!({"x": 1}), json!({"x": 1})), Some(None));
        assert_eq!(f(json!({"x": 2}), json!({"x": 1})), None);
    }

    #[test]
    fn bad_filters_are_invalid_filter() {
        for bad in [
            json!({"a": {"$regexx": 1}}),
            json!({"$where": "1"}),
            json!({"$expr": {}}),
            json!({"$or": {}}),
            json!({"$or": []}),
            json!({"a": {"$in": 1}}),
            json!({"a": {"$in": [{"$gt": 1}]}}),
            json!({"a": {"$not": 1}}),
            json!({"a": {"$gt": 1, "b": 2}}),
            json!({"a": {"$type": "color"}}),
            json!({"a": {"$type": 99}}),
            json!({"a": {"$mod": [0, 1]}}),
            json!({"a": {"$mod": [1]}}),
            json!({"a": {"$size": -1}}),
            json!({"a": {"$size": 1.5}}),
            json!({"a": {"$elemMatch": 1}}),
            json!({"a": {"$regex": "("}}),
            json!({"a": {"$regex": "a", "$options": "q"}}),
            json!({"a": {"$options": "i"}}),
            json!({"a": {"$regex": "(?=x)"}}),
            json!({"a": {"$date": "never"}}),
            json!({"a": {"$numberDecimal": "1"}}),
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
