//! Applying a parsed update to one document, and building the document an upsert inserts.

use std::cmp::Ordering;

use nimbus_api::ApiError;
use serde_json::{Map, Number, Value};

use super::{Op, Ops, Part, Push, PushSort, Update, UpdatePath, err};
use crate::doc::ejson;
use crate::doc::order::{compare, values_equal};
use crate::doc::path::Root;
use crate::query::filter::{Filter, Pred};

/// Largest array position an update may create (`{"$set": {"a.99999": 1}}` pads with
/// nulls; a bigger one is a mistake or an attempt to exhaust memory).
pub const MAX_CREATED_POSITION: usize = 100_000;

/// What applying an update needs besides the document.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyCtx {
    /// The command's time: what `$currentDate` sets.
    pub now_ms: i64,
    /// The document is being inserted by an upsert: `$setOnInsert` applies.
    pub inserting: bool,
    /// The position in the array the filter matched (`Filter::eval`), for the `$` operator.
    pub positional: Option<usize>,
}

pub(super) fn apply(update: &Update, doc: &Value, ctx: &ApplyCtx) -> Result<Value, ApiError> {
    let id = doc.get("_id").cloned();
    match update {
        Update::Replace(new) => {
            if let (Some(old), Some(new_id)) = (&id, new.get("_id"))
                && !values_equal(old, new_id)
            {
                return Err(err("a replacement cannot change _id"));
            }
            let mut out = Map::with_capacity(new.len() + 1);
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
            for (path, op) in &ops.ops {
                apply_one(&mut out, path, op, ops, ctx)?;
            }
            match (&id, out.get_mut("_id")) {
                (Some(old), Some(new)) if values_equal(old, new) => *new = old.clone(),
                (Some(_), _) => return Err(err("_id cannot be modified")),
                (None, _) => {}
            }
            Ok(out)
        }
    }
}

/// Whether an operator creates what its path lacks (the others leave a missing path alone).
fn creates(op: &Op, ctx: &ApplyCtx) -> bool {
    match op {
        Op::Unset | Op::Pop(_) | Op::Pull(_) | Op::PullAll(_) | Op::Rename(_) => false,
        Op::SetOnInsert(_) => ctx.inserting,
        _ => true,
    }
}

fn apply_one(doc: &mut Value, path: &UpdatePath, op: &Op, ops: &Ops, ctx: &ApplyCtx) -> Result<(), ApiError> {
    if matches!(op, Op::SetOnInsert(_)) && !ctx.inserting {
        return Ok(());
    }
    if let Op::Rename(to) = op {
        return rename(doc, path, to);
    }
    let w = Walk { op, ops, ctx, path };
    w.step(doc, &path.parts, 0)
}

/// One operator's walk down its path.
struct Walk<'a> {
    op: &'a Op,
    ops: &'a Ops,
    ctx: &'a ApplyCtx,
    path: &'a UpdatePath,
}

impl Walk<'_> {
    /// The path's text up to component `depth` (exclusive), for messages.
    fn prefix(&self, depth: usize) -> String {
        self.path.text.split('.').take(depth).collect::<Vec<_>>().join(".")
    }

    fn step(&self, container: &mut Value, parts: &[Part], depth: usize) -> Result<(), ApiError> {
        let Some((part, rest)) = parts.split_first() else { return Ok(()) };
        let creates = creates(self.op, self.ctx);
        match part {
            Part::Field(name) => match container {
                Value::Object(map) => {
                    if rest.is_empty() {
                        return self.leaf_in_object(map, name);
                    }
                    if !map.contains_key(name) {
                        if is_array_part(&rest[0]) {
                            return Err(err(format!(
                                "the path {:?} must exist in the document to apply array updates",
                                self.prefix(depth + 1)
                            )));
                        }
                        if !creates {
                            return Ok(());
                        }
                        map.insert(name.clone(), Value::Object(Map::new()));
                    }
                    match map.get_mut(name) {
                        Some(child) => self.descend(child, rest, depth + 1),
                        None => Ok(()),
                    }
                }
                Value::Array(items) => {
                    let Some(i) = position(name) else {
                        if creates {
                            return Err(err(format!(
                                "cannot create field {name:?} in the array {:?}",
                                self.prefix(depth)
                            )));
                        }
                        return Ok(());
                    };
                    self.at_position(items, i, rest, depth)
                }
                _ => Ok(()),
            },
            Part::Positional => {
                let Some(i) = self.ctx.positional else {
                    return Err(err("the positional operator $ did not find the match needed from the filter"));
                };
                match container {
                    Value::Array(items) => self.at_position(items, i, rest, depth),
                    _ => Err(err(format!("the positional operator $ needs {:?} to be an array", self.prefix(depth)))),
                }
            }
            Part::AllElements | Part::Filtered(_) => {
                let Value::Array(items) = container else {
                    return Err(err(format!(
                        "cannot apply array updates to {:?}: it is not an array",
                        self.prefix(depth)
                    )));
                };
                let selected: Vec<usize> = match part {
                    Part::Filtered(id) => {
                        // Each element is matched as the document `{id: element}`, unbuilt.
                        let filter = self.array_filter(id)?;
                        (0..items.len())
                            .filter(|&i| filter.matches_in(Root::Bound { name: id, value: &items[i] }))
                            .collect()
                    }
                    _ => (0..items.len()).collect(),
                };
                for i in selected {
                    if rest.is_empty() {
                        self.leaf_present(&mut items[i], true)?;
                    } else {
                        self.descend(&mut items[i], rest, depth + 1)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn array_filter(&self, id: &str) -> Result<&Filter, ApiError> {
        self.ops
            .array_filters
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, f)| f)
            .ok_or_else(|| err(format!("no array filter for the identifier {id:?}")))
    }

    fn at_position(&self, items: &mut Vec<Value>, i: usize, rest: &[Part], depth: usize) -> Result<(), ApiError> {
        if rest.is_empty() {
            return self.leaf_in_array(items, i);
        }
        if i >= items.len() {
            if !creates(self.op, self.ctx) {
                return Ok(());
            }
            pad(items, i)?;
            items[i] = Value::Object(Map::new());
        }
        self.descend(&mut items[i], rest, depth + 1)
    }

    /// Continues into a value found on the path: objects and arrays only.
    fn descend(&self, child: &mut Value, rest: &[Part], depth: usize) -> Result<(), ApiError> {
        if child.is_object() || child.is_array() {
            return self.step(child, rest, depth);
        }
        if is_array_part(&rest[0]) {
            return Err(err(format!("cannot apply array updates to {:?}: it is not an array", self.prefix(depth))));
        }
        if creates(self.op, self.ctx) {
            return Err(err(format!(
                "cannot create field {:?} in {:?}: it holds a {}",
                self.path.text.split('.').nth(depth).unwrap_or_default(),
                self.prefix(depth),
                type_name(child)
            )));
        }
        Ok(())
    }

    fn leaf_in_object(&self, map: &mut Map<String, Value>, name: &str) -> Result<(), ApiError> {
        if matches!(self.op, Op::Unset) {
            map.shift_remove(name);
            return Ok(());
        }
        match map.get_mut(name) {
            Some(slot) => self.leaf_present(slot, false),
            None => {
                if let Some(v) = self.leaf_missing()? {
                    map.insert(name.to_owned(), v);
                }
                Ok(())
            }
        }
    }

    fn leaf_in_array(&self, items: &mut Vec<Value>, i: usize) -> Result<(), ApiError> {
        if i < items.len() {
            return self.leaf_present(&mut items[i], true);
        }
        if let Some(v) = self.leaf_missing()? {
            pad(items, i)?;
            items[i] = v;
        }
        Ok(())
    }

    /// The value an operator gives a missing field, if it creates one.
    fn leaf_missing(&self) -> Result<Option<Value>, ApiError> {
        Ok(match self.op {
            Op::Set(v) | Op::SetOnInsert(v) | Op::Min(v) | Op::Max(v) => Some(v.clone()),
            Op::Inc(n) => Some(Value::Number(n.clone())),
            Op::Mul(n) => Some(if n.is_f64() { Value::from(0.0) } else { Value::from(0) }),
            Op::CurrentDate => Some(ejson::date(self.ctx.now_ms)),
            Op::Push(p) => {
                let mut arr = Vec::new();
                push(&mut arr, p);
                Some(Value::Array(arr))
            }
            Op::AddToSet(vals) => {
                let mut arr = Vec::new();
                add_to_set(&mut arr, vals);
                Some(Value::Array(arr))
            }
            Op::Unset | Op::Pop(_) | Op::Pull(_) | Op::PullAll(_) | Op::Rename(_) => None,
        })
    }

    /// Applies the operator to a value that is there (`in_array`: an array element).
    fn leaf_present(&self, slot: &mut Value, in_array: bool) -> Result<(), ApiError> {
        let path = &self.path.text;
        match self.op {
            Op::Set(v) | Op::SetOnInsert(v) => *slot = v.clone(),
            Op::Unset => {
                if in_array {
                    *slot = Value::Null;
                }
            }
            Op::Inc(n) => match slot {
                Value::Number(cur) => *slot = Value::Number(add(cur, n)?),
                other => {
                    return Err(err(format!("cannot $inc {path:?}: it holds a {}, not a number", type_name(other))));
                }
            },
            Op::Mul(n) => match slot {
                Value::Number(cur) => *slot = Value::Number(mul(cur, n)?),
                other => {
                    return Err(err(format!("cannot $mul {path:?}: it holds a {}, not a number", type_name(other))));
                }
            },
            Op::Min(v) => {
                if compare(v, slot) == Ordering::Less {
                    *slot = v.clone();
                }
            }
            Op::Max(v) => {
                if compare(v, slot) == Ordering::Greater {
                    *slot = v.clone();
                }
            }
            Op::CurrentDate => *slot = ejson::date(self.ctx.now_ms),
            Op::Push(p) => match slot {
                Value::Array(arr) => push(arr, p),
                other => {
                    return Err(err(format!(
                        "cannot $push to {path:?}: it holds a {}, not an array",
                        type_name(other)
                    )));
                }
            },
            Op::AddToSet(vals) => match slot {
                Value::Array(arr) => add_to_set(arr, vals),
                other => {
                    return Err(err(format!(
                        "cannot $addToSet to {path:?}: it holds a {}, not an array",
                        type_name(other)
                    )));
                }
            },
            Op::Pop(first) => match slot {
                Value::Array(arr) if arr.is_empty() => {}
                Value::Array(arr) if *first => {
                    arr.remove(0);
                }
                Value::Array(arr) => {
                    arr.pop();
                }
                other => {
                    return Err(err(format!(
                        "cannot $pop from {path:?}: it holds a {}, not an array",
                        type_name(other)
                    )));
                }
            },
            Op::Pull(cond) => match slot {
                Value::Array(arr) => arr.retain(|e| !cond.matches(e)),
                other => {
                    return Err(err(format!(
                        "cannot $pull from {path:?}: it holds a {}, not an array",
                        type_name(other)
                    )));
                }
            },
            Op::PullAll(vals) => match slot {
                Value::Array(arr) => arr.retain(|e| !vals.contains(Some(e))),
                other => {
                    return Err(err(format!(
                        "cannot $pullAll from {path:?}: it holds a {}, not an array",
                        type_name(other)
                    )));
                }
            },
            Op::Rename(_) => {}
        }
        Ok(())
    }
}

fn is_array_part(p: &Part) -> bool {
    !matches!(p, Part::Field(_))
}

/// An array position named by a path component: digits only, as MongoDB reads them.
fn position(name: &str) -> Option<usize> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) || (name.len() > 1 && name.starts_with('0')) {
        return None;
    }
    name.parse().ok()
}

fn pad(items: &mut Vec<Value>, i: usize) -> Result<(), ApiError> {
    if i > MAX_CREATED_POSITION {
        return Err(err(format!("an update may create array positions up to {MAX_CREATED_POSITION}")));
    }
    if items.len() <= i {
        items.resize(i + 1, Value::Null);
    }
    Ok(())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => match ejson::special(v) {
            Some(ejson::Special::Date(_)) => "date",
            Some(ejson::Special::ObjectId(_)) => "ObjectId",
            None => "object",
        },
    }
}

/// Moves the value at `from` to `to`; neither may cross an array.
fn rename(doc: &mut Value, from: &UpdatePath, to: &UpdatePath) -> Result<(), ApiError> {
    let fields = |p: &UpdatePath| -> Vec<String> {
        p.parts
            .iter()
            .map(|x| match x {
                Part::Field(f) => f.clone(),
                _ => String::new(),
            })
            .collect()
    };
    let (src, dst) = (fields(from), fields(to));
    // Take the value out, if it is there.
    let mut cur = &mut *doc;
    for (i, part) in src.iter().enumerate() {
        match cur {
            Value::Object(map) if i + 1 == src.len() => {
                let Some(v) = map.shift_remove(part) else { return Ok(()) };
                return put(doc, &dst, v, to);
            }
            Value::Object(map) => match map.get_mut(part) {
                Some(next) => cur = next,
                None => return Ok(()),
            },
            Value::Array(_) => return Err(err(format!("$rename of {from}: the source cannot be inside an array"))),
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// Sets `value` at the plain path `dst`, creating objects on the way.
fn put(doc: &mut Value, dst: &[String], value: Value, to: &UpdatePath) -> Result<(), ApiError> {
    let mut cur = doc;
    for (i, part) in dst.iter().enumerate() {
        let Value::Object(map) = cur else {
            return Err(err(format!("$rename to {to}: the destination cannot be inside an array or a value")));
        };
        if i + 1 == dst.len() {
            map.insert(part.clone(), value);
            return Ok(());
        }
        cur = map.entry(part.clone()).or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

fn push(arr: &mut Vec<Value>, p: &Push) {
    let len = arr.len() as i64;
    let at = match p.position {
        None => len,
        Some(pos) if pos >= 0 => pos.min(len),
        Some(pos) => (len + pos).max(0),
    } as usize;
    arr.splice(at..at, p.each.iter().cloned());
    match &p.sort {
        Some(PushSort::Value(desc)) => arr.sort_by(|a, b| {
            let o = compare(a, b);
            if *desc { o.reverse() } else { o }
        }),
        Some(PushSort::Fields(spec)) => {
            let mut keyed: Vec<_> = arr.drain(..).map(|v| (spec.keys_of(&v), v)).collect();
            keyed.sort_by(|(a, _), (b, _)| spec.compare_keys(a, b));
            arr.extend(keyed.into_iter().map(|(_, v)| v));
        }
        None => {}
    }
    match p.slice {
        Some(n) if n >= 0 => arr.truncate(n as usize),
        Some(n) => {
            let keep = n.unsigned_abs() as usize;
            if arr.len() > keep {
                arr.drain(..arr.len() - keep);
            }
        }
        None => {}
    }
}

/// Appends the values not already in `arr`, the first of equal ones, in their order. By
/// sorting both sides rather than comparing every value with every element: 100,000 values
/// into a 100,000-element array are not 10 billion comparisons.
fn add_to_set(arr: &mut Vec<Value>, vals: &[Value]) {
    let mut there: Vec<&Value> = arr.iter().collect();
    there.sort_by(|a, b| compare(a, b));
    // A stable sort: among equal values the first given comes first.
    let mut order: Vec<usize> = (0..vals.len()).collect();
    order.sort_by(|&a, &b| compare(&vals[a], &vals[b]));
    let mut keep = vec![false; vals.len()];
    for equal in order.chunk_by(|&a, &b| values_equal(&vals[a], &vals[b])) {
        let first = equal[0];
        keep[first] = there.binary_search_by(|e| compare(e, &vals[first])).is_err();
    }
    let new: Vec<Value> = vals.iter().zip(keep).filter(|(_, k)| *k).map(|(v, _)| v.clone()).collect();
    arr.extend(new);
}

/// Both integers: exact 64-bit arithmetic, an error past its range (never a silent
/// float). Otherwise a double, which must be finite.
fn add(a: &Number, b: &Number) -> Result<Number, ApiError> {
    arith(a, b, "$inc", i128::checked_add, |x, y| x + y)
}

fn mul(a: &Number, b: &Number) -> Result<Number, ApiError> {
    arith(a, b, "$mul", i128::checked_mul, |x, y| x * y)
}

fn arith(
    a: &Number,
    b: &Number,
    op: &str,
    int: fn(i128, i128) -> Option<i128>,
    float: fn(f64, f64) -> f64,
) -> Result<Number, ApiError> {
    let as_int = |n: &Number| n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    if let (Some(x), Some(y)) = (as_int(a), as_int(b)) {
        return int(x, y)
            .and_then(|r| i64::try_from(r).ok())
            .map(Number::from)
            .ok_or_else(|| err(format!("{op} overflows a 64-bit integer")));
    }
    let r = float(a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
    Number::from_f64(r).ok_or_else(|| err(format!("{op} result is not a finite number")))
}

impl Update {
    /// The document an upsert inserts when its filter matched nothing: the filter's
    /// equality conditions (top level and inside `$and`) as fields, then the update
    /// (`$setOnInsert` included). A replacement keeps only the filter's `_id`.
    pub fn upsert_document(&self, filter: &Filter, generated_id: &Value, ctx: &ApplyCtx) -> Result<Value, ApiError> {
        let ctx = ApplyCtx { inserting: true, positional: None, ..*ctx };
        let mut eqs = Vec::new();
        equalities(filter, &mut eqs);
        let mut base = Value::Object(Map::new());
        let mut paths: Vec<&str> = Vec::new();
        for (path, v) in &eqs {
            if let Some(other) = paths.iter().find(|p| overlaps(p, path)) {
                return Err(err(format!(
                    "cannot build the upserted document: the filter names both {other:?} and {path:?}"
                )));
            }
            paths.push(path);
            if matches!(self, Update::Replace(_)) && path != "_id" {
                continue;
            }
            let set =
                UpdatePath { text: path.clone(), parts: path.split('.').map(|p| Part::Field(p.to_owned())).collect() };
            let ops = Ops { ops: vec![], array_filters: vec![], uses_positional: false };
            Walk { op: &Op::Set(v.clone()), ops: &ops, ctx: &ctx, path: &set }.step(&mut base, &set.parts, 0)?;
        }
        let mut doc = match self {
            Update::Replace(new) => {
                let mut m = Map::with_capacity(new.len() + 1);
                let filter_id = base.get("_id");
                if let Some(id) = filter_id {
                    // The filter's `_id` is the document's: as for an update, the
                    // replacement may repeat it but not change it.
                    if new.get("_id").is_some_and(|new_id| !values_equal(id, new_id)) {
                        return Err(err("a replacement cannot change _id: it differs from the filter's"));
                    }
                    m.insert("_id".into(), id.clone());
                }
                let kept = new.iter().filter(|(k, _)| filter_id.is_none() || k.as_str() != "_id");
                m.extend(kept.map(|(k, v)| (k.clone(), v.clone())));
                Value::Object(m)
            }
            Update::Ops(_) => self.apply(&base, &ctx)?,
        };
        if let Value::Object(m) = &mut doc {
            if !m.contains_key("_id") {
                m.insert("_id".into(), generated_id.clone());
            }
            *m = id_first(std::mem::take(m));
        }
        Ok(doc)
    }
}

fn overlaps(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long == short || (long.starts_with(short) && long.as_bytes().get(short.len()) == Some(&b'.'))
}

/// Equality conditions of the filter's top-level conjunction (nested `$and` included).
fn equalities(filter: &Filter, out: &mut Vec<(String, Value)>) {
    match filter {
        Filter::And(fs) => fs.iter().for_each(|f| equalities(f, out)),
        Filter::Field { path, pred } => pred_equalities(path.as_str(), pred, out),
        _ => {}
    }
}

fn pred_equalities(path: &str, pred: &Pred, out: &mut Vec<(String, Value)>) {
    match pred {
        Pred::Eq(v) => out.push((path.to_owned(), v.clone())),
        Pred::All(ps) => ps.iter().for_each(|p| pred_equalities(path, p, out)),
        _ => {}
    }
}

/// The same object with `_id` as its first field, the others in their order.
pub fn id_first(mut map: Map<String, Value>) -> Map<String, Value> {
    let Some(id) = map.shift_remove("_id") else { return map };
    let mut out = Map::with_capacity(map.len() + 1);
    out.insert("_id".into(), id);
    out.extend(map);
    out
}
