//! The query planner: picks an index whose left-most fields match the filter's equality
//! and range predicates (and, when it can, the sort), or a collection scan. Pure: it sees
//! index specifications and the parsed query, and returns key ranges to scan.
//!
//! An index scan only narrows the candidates: the executor always evaluates the whole
//! filter on each document it fetches, so the ranges may be generous but never too tight.

use serde_json::Value;

use super::filter::{CmpOp, Filter, Pred};
use super::sort::SortSpec;
use crate::doc::keycode::{encode_dir_into, prefix_end, tag};
use crate::doc::order::{Bracket, bracket, compare};

/// Most key ranges one index scan may use (the product of `$in` lists): `{"_id": {"$in":
/// [...]}}` with up to this many values is that many point lookups.
const MAX_RANGES: usize = 10_000;

/// The name of the implicit unique index on `_id`: the documents themselves, keyed by it.
pub const ID_INDEX: &str = "_id_";

/// What the planner knows of one index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexView<'a> {
    pub name: &'a str,
    /// (path, descending)
    pub fields: &'a [(String, bool)],
    /// Some document has an array in an indexed field: entries are per element, so the
    /// index order is not a document order.
    pub multikey: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    CollScan,
    IndexScan {
        index: String,
        /// Key ranges `[lo, hi)` relative to the index's key prefix, in ascending order.
        ranges: Vec<(Vec<u8>, Vec<u8>)>,
        /// The scan yields documents in the requested sort order.
        provides_sort: bool,
        /// Every range is one value of every field of the index, so within a range the
        /// entries come in `_id` order: the first match of each range is its smallest `_id`.
        exact: bool,
    },
}

impl Plan {
    pub fn describe(&self) -> String {
        match self {
            Plan::CollScan => "COLLSCAN".into(),
            Plan::IndexScan { index, provides_sort, .. } => {
                format!("IXSCAN {index}{}", if *provides_sort { " (sorted)" } else { "" })
            }
        }
    }
}

/// One usable constraint on a path from the filter's top-level conjunction.
#[derive(Debug, Clone)]
enum Constraint {
    /// Equal to one of these, sorted in MongoDB's order (a binary search finds a value).
    Points(Vec<Value>),
    Lower(Value, bool), // (value, inclusive)
    Upper(Value, bool),
}

/// The bounds an index scan uses on one field.
#[derive(Debug, Clone, Default)]
struct Bounds {
    points: Option<Vec<Value>>,
    lower: Option<(Value, bool)>,
    upper: Option<(Value, bool)>,
}

fn indexable_point(v: &Value) -> bool {
    // Arrays match by element or whole; null matches missing fields: both need a scan.
    !matches!(v, Value::Array(_) | Value::Null)
}

fn constraints_of(pred: &Pred, out: &mut Vec<Constraint>) {
    match pred {
        Pred::Eq(v) if indexable_point(v) => out.push(Constraint::Points(vec![v.clone()])),
        Pred::In(vs, patterns) if patterns.is_empty() && !vs.is_empty() && vs.values().iter().all(indexable_point) => {
            out.push(Constraint::Points(vs.values().to_vec()))
        }
        Pred::Cmp(op, v) if indexable_point(v) => out.push(match op {
            CmpOp::Gt => Constraint::Lower(v.clone(), false),
            CmpOp::Gte => Constraint::Lower(v.clone(), true),
            CmpOp::Lt => Constraint::Upper(v.clone(), false),
            CmpOp::Lte => Constraint::Upper(v.clone(), true),
        }),
        // Every condition of a conjunction holds; every value of `$all` is there.
        Pred::All(ps) => ps.iter().for_each(|p| constraints_of(p, out)),
        Pred::AllOf(all) => all.conds().iter().for_each(|p| constraints_of(p, out)),
        _ => {}
    }
}

fn collect_constraints<'f>(filter: &'f Filter, out: &mut Vec<(&'f str, Vec<Constraint>)>) {
    match filter {
        Filter::And(fs) => fs.iter().for_each(|f| collect_constraints(f, out)),
        Filter::Field { path, pred } => {
            let path = path.as_str();
            let idx = match out.iter().position(|(p, _)| *p == path) {
                Some(i) => i,
                None => {
                    out.push((path, Vec::new()));
                    out.len() - 1
                }
            };
            constraints_of(pred, &mut out[idx].1);
        }
        _ => {}
    }
}

/// Combines a field's constraints into scan bounds. On a multikey index each constraint may
/// be met by a different array element, so bounds must not be intersected: only the first
/// constraint bounds the scan (the filter still checks the rest on each document).
fn bounds_of(constraints: &[Constraint], multikey: bool) -> Option<Bounds> {
    let mut b = Bounds::default();
    let used = if multikey { &constraints[..constraints.len().min(1)] } else { constraints };
    for c in used {
        match c {
            Constraint::Points(vs) => {
                b.points = Some(match b.points.take() {
                    None => vs.clone(),
                    Some(cur) => cur.into_iter().filter(|p| vs.binary_search_by(|v| compare(v, p)).is_ok()).collect(),
                });
            }
            Constraint::Lower(v, incl) => tighten(&mut b.lower, v, *incl, std::cmp::Ordering::Greater),
            Constraint::Upper(v, incl) => tighten(&mut b.upper, v, *incl, std::cmp::Ordering::Less),
        }
    }
    (b.points.is_some() || b.lower.is_some() || b.upper.is_some()).then_some(b)
}

fn tighten(slot: &mut Option<(Value, bool)>, v: &Value, incl: bool, tighter: std::cmp::Ordering) {
    match slot {
        Some((cur, cur_incl)) if bracket(cur) == bracket(v) => {
            let o = compare(v, cur);
            if o == tighter {
                *slot = Some((v.clone(), incl));
            } else if o == std::cmp::Ordering::Equal {
                *cur_incl &= incl;
            }
        }
        Some(_) => {} // different brackets: the filter matches nothing; the check finds it
        None => *slot = Some((v.clone(), incl)),
    }
}

/// Encoded `[lo, hi)` range for one field under its bounds.
fn field_ranges(b: &Bounds, desc: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let enc = |v: &Value| {
        let mut out = Vec::new();
        encode_dir_into(v, desc, &mut out);
        out
    };
    let after = |v: &Value| prefix_end(&enc(v)).unwrap_or_else(|| vec![0xFF; 32]);
    if let Some(points) = &b.points {
        let mut rs: Vec<_> = points.iter().map(|p| (enc(p), after(p))).collect();
        rs.sort();
        rs.dedup();
        return rs;
    }
    let br = b.lower.as_ref().or(b.upper.as_ref()).map(|(v, _)| bracket(v)).unwrap_or(Bracket::Null);
    let t = tag(br);
    let (bracket_lo, bracket_hi) = if desc { (vec![!t], vec![!t + 1]) } else { (vec![t], vec![t + 1]) };
    // In ascending order the lower value bound gives `lo`; descending swaps the roles.
    let (mut lo, mut hi) = (bracket_lo, bracket_hi);
    let lower = b.lower.as_ref().filter(|(v, _)| bracket(v) == br);
    let upper = b.upper.as_ref().filter(|(v, _)| bracket(v) == br);
    if !desc {
        if let Some((v, incl)) = lower {
            lo = if *incl { enc(v) } else { after(v) };
        }
        if let Some((v, incl)) = upper {
            hi = if *incl { after(v) } else { enc(v) };
        }
    } else {
        if let Some((v, incl)) = upper {
            lo = if *incl { enc(v) } else { after(v) };
        }
        if let Some((v, incl)) = lower {
            hi = if *incl { after(v) } else { enc(v) };
        }
    }
    if lo >= hi { vec![] } else { vec![(lo, hi)] }
}

/// Chooses how to run a query.
pub fn plan(filter: &Filter, sort: &SortSpec, has_limit: bool, indexes: &[IndexView<'_>]) -> Plan {
    let mut constraints = Vec::new();
    collect_constraints(filter, &mut constraints);

    let mut best: Option<((usize, bool, bool), Plan)> = None;
    for ix in indexes {
        // Equality prefix, then at most one range field.
        let mut ranges: Vec<(Vec<u8>, Vec<u8>)> = vec![(vec![], vec![])];
        let mut eq_fields = 0;
        let mut multi_point = false;
        let mut has_range = false;
        for (path, desc) in ix.fields {
            let Some(b) = constraints.iter().find(|(p, _)| p == path).and_then(|(_, cs)| bounds_of(cs, ix.multikey))
            else {
                break;
            };
            let frs = field_ranges(&b, *desc);
            if frs.len() * ranges.len() > MAX_RANGES {
                break;
            }
            let is_point = b.points.is_some();
            ranges = ranges
                .iter()
                .flat_map(|(plo, _)| {
                    frs.iter().map(move |(lo, hi)| {
                        let mut l = plo.clone();
                        l.extend_from_slice(lo);
                        let mut h = plo.clone();
                        h.extend_from_slice(hi);
                        (l, h)
                    })
                })
                .collect();
            if is_point {
                eq_fields += 1;
                multi_point |= frs.len() > 1;
            } else {
                has_range = true;
                break;
            }
        }
        // The index gives the sort order when the sort keys follow the equality prefix.
        let rest = &ix.fields[eq_fields.min(ix.fields.len())..];
        let provides_sort = !sort.is_empty()
            && !ix.multikey
            && !multi_point
            && sort.keys.len() <= rest.len()
            && sort.keys.iter().zip(rest).all(|((sp, sd), (ip, id))| sp == ip && sd == id);
        if eq_fields == 0 && !has_range && !(provides_sort && has_limit) {
            continue;
        }
        if ranges.is_empty() {
            // Contradictory bounds: the filter matches nothing through this index.
            return Plan::IndexScan { index: ix.name.to_owned(), ranges, provides_sort: true, exact: true };
        }
        // A fully open range (sort-only use) scans the whole index.
        if eq_fields == 0 && !has_range {
            ranges = vec![(vec![], vec![0xFF; 1])];
        }
        let exact = !has_range && eq_fields == ix.fields.len();
        if ix.name == ID_INDEX && eq_fields == 1 {
            // Point lookups by `_id`: nothing does better.
            return Plan::IndexScan { index: ix.name.to_owned(), ranges, provides_sort, exact };
        }
        let score = (eq_fields, has_range, provides_sort);
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, Plan::IndexScan { index: ix.name.to_owned(), ranges, provides_sort, exact }));
        }
    }
    best.map(|(_, p)| p).unwrap_or(Plan::CollScan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(spec: &[(&str, bool)]) -> Vec<(String, bool)> {
        spec.iter().map(|(p, d)| (p.to_string(), *d)).collect()
    }

    fn plan_for(filter: Value, sort: Value, limit: bool, ixs: &[(&str, Vec<(String, bool)>)]) -> Plan {
        let f = Filter::parse(Some(&filter)).unwrap();
        let s = SortSpec::parse(Some(&sort)).unwrap();
        let views: Vec<_> = ixs.iter().map(|(n, f)| IndexView { name: n, fields: f, multikey: false }).collect();
        plan(&f, &s, limit, &views)
    }

    #[test]
    fn uses_the_index_with_the_longest_equality_prefix() {
        let ixs = [("a", fields(&[("a", false)])), ("a_b", fields(&[("a", false), ("b", false)]))];
        match plan_for(json!({"a": 1, "b": 2}), json!({}), false, &ixs) {
            Plan::IndexScan { index, ranges, .. } => {
                assert_eq!(index, "a_b");
                assert_eq!(ranges.len(), 1);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn scans_when_no_prefix_matches() {
        let ixs = [("a_b", fields(&[("a", false), ("b", false)]))];
        assert_eq!(plan_for(json!({"b": 2}), json!({}), false, &ixs), Plan::CollScan);
        assert_eq!(plan_for(json!({"$or": [{"a": 1}, {"a": 2}]}), json!({}), false, &ixs), Plan::CollScan);
        assert_eq!(plan_for(json!({"a": {"$ne": 1}}), json!({}), false, &ixs), Plan::CollScan);
        assert_eq!(plan_for(json!({"a": null}), json!({}), false, &ixs), Plan::CollScan);
    }

    #[test]
    fn in_lists_become_several_ranges() {
        let ixs = [("a", fields(&[("a", false)]))];
        match plan_for(json!({"a": {"$in": [3, 1, 2]}}), json!({"a": 1}), false, &ixs) {
            Plan::IndexScan { ranges, provides_sort, .. } => {
                assert_eq!(ranges.len(), 3);
                assert!(ranges.windows(2).all(|w| w[0] < w[1]));
                assert!(!provides_sort);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn sort_after_the_equality_prefix_comes_from_the_index() {
        let ixs = [("a_b", fields(&[("a", false), ("b", true)]))];
        match plan_for(json!({"a": 1}), json!({"b": -1}), false, &ixs) {
            Plan::IndexScan { provides_sort, .. } => assert!(provides_sort),
            p => panic!("{p:?}"),
        }
        match plan_for(json!({"a": 1}), json!({"b": 1}), false, &ixs) {
            Plan::IndexScan { provides_sort, .. } => assert!(!provides_sort),
            p => panic!("{p:?}"),
        }
        // Sort alone uses the index only when a limit makes the order worth it.
        assert_eq!(plan_for(json!({}), json!({"a": 1}), false, &ixs), Plan::CollScan);
        assert!(matches!(
            plan_for(json!({}), json!({"a": 1}), true, &ixs),
            Plan::IndexScan { provides_sort: true, .. }
        ));
    }

    #[test]
    fn multikey_indexes_do_not_intersect_bounds() {
        let f = Filter::parse(Some(&json!({"a": {"$gt": 5, "$lt": 3}}))).unwrap();
        let fields = fields(&[("a", false)]);
        let views = [IndexView { name: "a", fields: &fields, multikey: true }];
        match plan(&f, &SortSpec::default(), false, &views) {
            // [1, 9] matches: 9 > 5 and 1 < 3. The scan must not be empty.
            Plan::IndexScan { ranges, .. } => assert_eq!(ranges.len(), 1),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn id_equalities_are_point_lookups() {
        let id = fields(&[("_id", false)]);
        let a = fields(&[("a", false)]);
        let ixs = [(ID_INDEX, id), ("a", a)];
        match plan_for(json!({"a": 1, "_id": {"$in": [3, 1]}}), json!({}), false, &ixs) {
            Plan::IndexScan { index, ranges, .. } => {
                assert_eq!(index, ID_INDEX);
                assert_eq!(ranges.len(), 2);
            }
            p => panic!("{p:?}"),
        }
        match plan_for(json!({"_id": {"$gt": "k"}}), json!({}), false, &ixs) {
            Plan::IndexScan { index, .. } => assert_eq!(index, ID_INDEX),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn contradictory_ranges_scan_nothing() {
        let ixs = [("a", fields(&[("a", false)]))];
        match plan_for(json!({"a": {"$gt": 5, "$lt": 3}}), json!({}), false, &ixs) {
            Plan::IndexScan { ranges, .. } => assert!(ranges.is_empty()),
            p => panic!("{p:?}"),
        }
    }
}
