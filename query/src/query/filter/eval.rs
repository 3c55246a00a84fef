//! Evaluating predicates on the elements a path reaches.

use std::cmp::Ordering;

use serde_json::Value;

use super::{CmpOp, Pred, TypeSel};
use crate::doc::order::{Bracket, bracket, compare};
use crate::doc::path::{FieldPath, LeafArrays, Root, for_each_element_in};

impl Pred {
    pub fn matches(&self, doc: &Value, path: &FieldPath) -> bool {
        self.eval(doc, path).is_some()
    }

    /// Whether the values at `path` satisfy the predicate (see [`Filter::eval`]).
    pub fn eval(&self, doc: &Value, path: &FieldPath) -> Option<Option<usize>> {
        self.eval_in(Root::Doc(doc), path)
    }

    /// [`Pred::eval`] in the document `root` stands for.
    pub fn eval_in(&self, root: Root<'_>, path: &FieldPath) -> Option<Option<usize>> {
        match self {
            Pred::Not(p) => p.eval_in(root, path).is_none().then_some(None),
            Pred::AllOf(all) => all.eval(root, path),
            Pred::All(ps) => {
                let mut offset = None;
                for p in ps {
                    offset = p.eval_in(root, path)?.or(offset);
                }
                Some(offset)
            }
            _ => {
                let leaf = match self {
                    Pred::Size(_) | Pred::ElemMatchObject(_) | Pred::ElemMatchValue(_) => LeafArrays::Whole,
                    _ => LeafArrays::Traverse,
                };
                let mut found = None;
                let _ = for_each_element_in(root, path, leaf, &mut |e| match self.single(e.value) {
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

    /// The position of the first element of the array `v` that an `$elemMatch` holds of:
    /// what the projection `{"a": {"$elemMatch": ...}}` returns. `None` for other predicates.
    pub fn first_match(&self, v: &Value) -> Option<usize> {
        match self {
            Pred::ElemMatchObject(_) | Pred::ElemMatchValue(_) => self.single(Some(v)).flatten(),
            _ => None,
        }
    }

    /// Whether one element (`None`: missing) satisfies the predicate; with the position of
    /// the array element that did, for `$elemMatch`.
    pub(super) fn single(&self, e: Option<&Value>) -> Option<Option<usize>> {
        let hit = |b: bool| b.then_some(None);
        match self {
            Pred::Eq(v) => hit(eq_single(e, v)),
            Pred::Cmp(op, v) => hit(cmp_single(e, *op, v)),
            Pred::In(vs, ps) => {
                hit(vs.contains(e) || ps.iter().any(|p| matches!(e, Some(Value::String(s)) if p.is_match(s))))
            }
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
                        Value::Array(inner) => f.matches_in(Root::Positions(inner)),
                        _ => false,
                    })
                    .map(Some)
            }
            Pred::ElemMatchValue(ps) => {
                let Some(Value::Array(items)) = e else { return None };
                items.iter().position(|item| ps.iter().all(|p| p.single(Some(item)).is_some())).map(Some)
            }
            Pred::Not(p) => hit(p.single(e).is_none()),
            Pred::All(ps) => hit(ps.iter().all(|p| p.single(e).is_some())),
            Pred::AllOf(all) => hit(all.single(e)),
        }
    }

    pub(super) fn shape(&self) -> String {
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
            Pred::AllOf(all) => format!("$all({})", all.conds().iter().map(Pred::shape).collect::<Vec<_>>().join(",")),
        }
    }
}

/// Equality of one element: `null` also matches a missing one.
pub(super) fn eq_single(e: Option<&Value>, v: &Value) -> bool {
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
