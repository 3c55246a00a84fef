//! The value lists of `$in`, `$nin` and `$all`, kept in MongoDB's order ([`compare`]) so
//! that testing an element is a binary search, not a pass over every value: 20,000 values
//! against a 20,000-element array were 400 million comparisons.
//!
//! `compare(a, b) == Equal` is exactly the equality `$eq` and `$in` use: same type bracket
//! (it compares brackets first), numbers by value (`1` equals `1.0`), arrays and objects
//! element by element. So an array or an object in the list still matches a whole array or
//! object equal to it.

use std::cmp::Ordering;
use std::ops::ControlFlow;

use serde_json::Value;

use super::Pred;
use crate::doc::order::compare;
use crate::doc::path::{FieldPath, LeafArrays, Root, for_each_element_in};

/// Most values one `$in`, `$nin` or `$all` may list.
pub const MAX_LIST_VALUES: usize = 100_000;

/// What a missing element is compared as: `null` matches it.
static NULL: Value = Value::Null;

/// The values of an `$in`: sorted in MongoDB's order, no two equal.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValueSet(Vec<Value>);

impl ValueSet {
    pub fn new(mut values: Vec<Value>) -> ValueSet {
        values.sort_by(compare);
        values.dedup_by(|a, b| compare(a, b) == Ordering::Equal);
        ValueSet(values)
    }

    /// The values, in MongoDB's order.
    pub fn values(&self) -> &[Value] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an element (`None`: missing, which `null` matches) equals one of the values.
    pub fn contains(&self, e: Option<&Value>) -> bool {
        let e = e.unwrap_or(&NULL);
        self.0.binary_search_by(|v| compare(v, e)).is_ok()
    }
}

/// `$all`: each condition met by some element (MongoDB reads it as an `$and` of `$eq`s, and
/// of `$elemMatch`es or patterns).
#[derive(Debug, Clone, PartialEq)]
pub struct AllOf {
    /// The conditions, in the order given.
    conds: Vec<Pred>,
    /// The positions in `conds` of the equalities, grouped by equal value, the groups in
    /// the values' order: one walk over the elements finds which values are there.
    eq_groups: Vec<Vec<usize>>,
}

impl AllOf {
    pub fn new(conds: Vec<Pred>) -> AllOf {
        let mut eqs: Vec<(usize, &Value)> = conds
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                Pred::Eq(v) => Some((i, v)),
                _ => None,
            })
            .collect();
        eqs.sort_by(|(_, a), (_, b)| compare(a, b));
        let eq_groups = eqs
            .chunk_by(|(_, a), (_, b)| compare(a, b) == Ordering::Equal)
            .map(|g| g.iter().map(|(i, _)| *i).collect())
            .collect();
        AllOf { conds, eq_groups }
    }

    /// The conditions, in the order given.
    pub fn conds(&self) -> &[Pred] {
        &self.conds
    }

    /// The value of a group of equalities.
    fn value(&self, group: &[usize]) -> &Value {
        match group.first().map(|&i| &self.conds[i]) {
            Some(Pred::Eq(v)) => v,
            _ => &NULL, // never: groups are made of equalities, and are not empty
        }
    }

    /// [`Pred::eval`] of `$all`: the result (and the offset) of each condition in turn, as
    /// an `$and` would give them; the equalities from one walk.
    pub(super) fn eval(&self, root: Root<'_>, path: &FieldPath) -> Option<Option<usize>> {
        // Where each equality first held: the offset of the first element equal to it.
        let mut first: Vec<Option<Option<usize>>> = vec![None; self.conds.len()];
        let mut left = self.eq_groups.len();
        if left > 0 {
            let _ = for_each_element_in(root, path, LeafArrays::Traverse, &mut |e| {
                let v = e.value.unwrap_or(&NULL);
                if let Ok(g) = self.eq_groups.binary_search_by(|g| compare(self.value(g), v)) {
                    let group = &self.eq_groups[g];
                    if first[group[0]].is_none() {
                        group.iter().for_each(|&i| first[i] = Some(e.array_offset));
                        left -= 1;
                    }
                }
                if left == 0 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            });
            if left > 0 {
                return None;
            }
        }
        let mut offset = None;
        for (i, c) in self.conds.iter().enumerate() {
            let r = match c {
                Pred::Eq(_) => first[i]?,
                _ => c.eval_in(root, path)?,
            };
            offset = r.or(offset);
        }
        Some(offset)
    }

    /// Whether one element meets every condition (`$all` inside `$elemMatch` or `$not`).
    pub(super) fn single(&self, e: Option<&Value>) -> bool {
        // One element equals every value when it equals the smallest and the largest.
        let v = e.unwrap_or(&NULL);
        let equal = |g: Option<&Vec<usize>>| g.is_none_or(|g| compare(self.value(g), v) == Ordering::Equal);
        equal(self.eq_groups.first())
            && equal(self.eq_groups.last())
            && self.conds.iter().all(|c| matches!(c, Pred::Eq(_)) || c.single(e).is_some())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::doc::testgen::arb_value;
    use crate::query::filter::eval::eq_single;

    /// Values that are often equal to one another, or equal as numbers only (`1`, `1.0`).
    fn arb_close_values() -> impl Strategy<Value = Vec<Value>> {
        prop::collection::vec(prop_oneof![arb_value(), (-3i64..3).prop_map(|i| json!(i as f64))], 0..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A binary search in the set finds exactly what comparing with every value finds.
        #[test]
        fn membership_is_equality_with_one_of_the_values(values in arb_close_values(), e in arb_value(), pick in any::<prop::sample::Index>()) {
            let set = ValueSet::new(values.clone());
            let linear = |e: Option<&Value>| values.iter().any(|v| eq_single(e, v));
            prop_assert_eq!(set.contains(Some(&e)), linear(Some(&e)));
            prop_assert_eq!(set.contains(None), linear(None));
            if !values.is_empty() {
                let member = &values[pick.index(values.len())];
                prop_assert!(set.contains(Some(member)));
            }
        }

        /// `$all` answers (with the same offset) what its conditions answer one after the other.
        #[test]
        fn all_of_answers_what_its_conditions_answer_in_turn(
            elems in arb_close_values(),
            extra in arb_close_values(),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
            whole in any::<bool>(),
        ) {
            let mut values: Vec<Value> = picks.iter().filter(|_| !elems.is_empty()).map(|i| elems[i.index(elems.len())].clone()).collect();
            values.extend(extra);
            if values.is_empty() {
                return Ok(());
            }
            let conds: Vec<Pred> = values.into_iter().map(Pred::Eq).collect();
            let doc = if whole { json!({"a": elems}) } else { json!({"a": [{"b": elems}, {"c": 1}]}) };
            let path = FieldPath::new(if whole { "a" } else { "a.b" });
            let in_turn = conds.iter().try_fold(None, |off, c| c.eval(&doc, &path).map(|r| r.or(off)));
            let all = AllOf::new(conds);
            prop_assert_eq!(all.eval(Root::Doc(&doc), &path), in_turn);
            for e in elems.iter().map(Some).chain([None]) {
                prop_assert_eq!(all.single(e), all.conds().iter().all(|c| eq_single(e, match c { Pred::Eq(v) => v, _ => &NULL })));
            }
        }
    }

    #[test]
    fn a_set_holds_each_value_once_in_order() {
        let s =
            ValueSet::new(vec![json!(2), json!("a"), json!(1.0), json!(null), json!(1), json!([1]), json!({"k": 1})]);
        assert_eq!(s.values(), &[json!(null), json!(1.0), json!(2), json!("a"), json!({"k": 1}), json!([1])]);
        assert!(s.contains(None));
        assert!(s.contains(Some(&json!(1))));
        assert!(s.contains(Some(&json!([1.0]))));
        assert!(!s.contains(Some(&json!("1"))));
        assert!(!s.contains(Some(&json!([1, 2]))));
    }
}
