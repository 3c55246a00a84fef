//! Filters: MongoDB's query language. Implicit equality, dotted paths with array traversal
//! ([`crate::doc::path`]), `$eq $ne $gt $gte $lt $lte $in $nin $exists $type $regex $mod
//! $size $all $elemMatch $not $and $or $nor`.
//!
//! Every leaf predicate is tested against each element its path reaches, as MongoDB's
//! matcher does: a document matches when one element does, and each predicate of
//! `{"a": {"$gt": 1, "$lt": 5}}` may be met by a different element of an array.

mod eval;
mod lists;
mod parse;

pub use lists::{AllOf, MAX_LIST_VALUES, ValueSet};
pub(crate) use parse::parse_elem_match;

use std::cmp::Ordering;

use nimbus_api::ApiError;
use serde_json::Value;

use super::pattern::{Pattern, PatternBudget};
use crate::doc::path::{FieldPath, Root};

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
    In(ValueSet, Vec<Pattern>),
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
    AllOf(AllOf),
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
        Filter::parse_with(v, &mut PatternBudget::default())
    }

    /// Parses a filter that is part of something bigger (a projection's `$elemMatch`, an
    /// update's `$pull` conditions and array filters): its regular expressions count against
    /// the whole's budget.
    pub(crate) fn parse_with(v: Option<&Value>, budget: &mut PatternBudget) -> Result<Filter, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(Filter::all()),
            Some(Value::Object(map)) => parse::parse_doc(map, budget),
            Some(other) => Err(err(format!("filter must be an object, not {}", type_name(other)))),
        }
    }

    pub fn matches(&self, doc: &Value) -> bool {
        self.eval(doc).is_some()
    }

    /// `None` when `doc` does not match; otherwise the position in the outermost array that
    /// made it match, when an array did (what the positional update operator `$` uses).
    pub fn eval(&self, doc: &Value) -> Option<Option<usize>> {
        self.eval_in(Root::Doc(doc))
    }

    /// Whether the document `root` stands for matches, without building it.
    pub fn matches_in(&self, root: Root<'_>) -> bool {
        self.eval_in(root).is_some()
    }

    /// [`Filter::eval`] of the document `root` stands for.
    pub fn eval_in(&self, root: Root<'_>) -> Option<Option<usize>> {
        match self {
            Filter::And(fs) => {
                let mut offset = None;
                for f in fs {
                    offset = f.eval_in(root)?.or(offset);
                }
                Some(offset)
            }
            Filter::Or(fs) => fs.iter().find_map(|f| f.eval_in(root)),
            Filter::Nor(fs) => (!fs.iter().any(|f| f.matches_in(root))).then_some(None),
            Filter::Field { path, pred } => pred.eval_in(root, path),
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
    fn in_and_all_compare_by_value_and_match_whole_arrays() {
        assert!(m(json!({"a": {"$in": [1.0, "x"]}}), json!({"a": 1})));
        assert!(m(json!({"a": {"$in": [1]}}), json!({"a": [3, 1.0]})));
        assert!(m(json!({"a": {"$in": [[1, 2]]}}), json!({"a": [1, 2]})));
        assert!(m(json!({"a": {"$in": [[1, 2]]}}), json!({"a": [[1.0, 2], 3]})));
        assert!(!m(json!({"a": {"$in": [[1, 2]]}}), json!({"a": [2, 1]})));
        assert!(m(json!({"a": {"$in": [{"b": 1}]}}), json!({"a": [{"b": 1.0}]})));
        assert!(!m(json!({"a": {"$in": [{"b": 1}]}}), json!({"a": {"b": 1, "c": 1}})));
        assert!(m(json!({"a": {"$in": [null, 5]}}), json!({})));
        assert!(!m(json!({"a": {"$in": ["1"]}}), json!({"a": 1})));
        assert!(m(json!({"a": {"$nin": [2, [1]]}}), json!({"a": [3]})));
        assert!(!m(json!({"a": {"$nin": [2, [1]]}}), json!({"a": [1]})));
        assert!(m(json!({"a": {"$all": [[1], 2.0, 2]}}), json!({"a": [[1], 2]})));
        assert!(!m(json!({"a": {"$all": [[1], 3]}}), json!({"a": [[1], 2]})));
        assert!(m(json!({"a": {"$all": [null]}}), json!({"b": 1})));
        assert!(m(json!({"a": {"$elemMatch": {"$all": [1, 1.0]}}}), json!({"a": [2, 1]})));
        assert!(!m(json!({"a": {"$elemMatch": {"$all": [1, 2]}}}), json!({"a": [2, 1]})));
    }

    /// 20,000 values against a 20,000-element array took 7.5 s (every value against every
    /// element); now each element is a binary search in the sorted values.
    #[test]
    fn long_in_and_all_lists_are_searched_not_scanned() {
        let n = 50_000i64;
        let doc = json!({"a": (0..n).collect::<Vec<_>>()});
        let absent: Vec<i64> = (1..=n).map(|i| -i).collect();
        assert!(!m(json!({"a": {"$in": absent}}), doc.clone()));
        assert!(m(json!({"a": {"$nin": absent}}), doc.clone()));
        let present: Vec<i64> = (0..n).rev().collect();
        assert!(m(json!({"a": {"$all": present}}), doc.clone()));
        let f = Filter::parse(Some(&json!({"a": {"$all": present}}))).unwrap();
        assert_eq!(f.eval(&doc), Some(Some(0)));
        let mut almost = present.clone();
        almost.push(n);
        assert!(!m(json!({"a": {"$all": almost}}), doc));
    }

    #[test]
    fn in_nin_and_all_take_100000_values_at_most() {
        let values: Vec<i64> = (0..=MAX_LIST_VALUES as i64).collect();
        for op in ["$in", "$nin", "$all"] {
            let e = Filter::parse(Some(&json!({"a": {op: values}}))).unwrap_err();
            assert_eq!(e.code, nimbus_api::ErrorCode::InvalidFilter);
            assert!(e.message.contains(&format!("{op} takes at most 100000 values")), "{}", e.message);
            assert!(Filter::parse(Some(&json!({"a": {op: values[1..]}}))).is_ok());
        }
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
    fn a_filter_holds_at_most_64_regular_expressions_wherever_they_are() {
        let re = |i: usize| json!({"$regularExpression": {"pattern": format!("^x{i}$"), "options": ""}});
        let refused = |f: Value| {
            let e = Filter::parse(Some(&f)).unwrap_err();
            assert_eq!(e.code, nimbus_api::ErrorCode::InvalidFilter);
            assert!(e.message.contains("more than 64 regular expressions"), "{}", e.message);
        };
        let in_list = |n: usize| json!({"s": {"$in": (0..n).map(re).collect::<Vec<_>>()}});
        assert!(Filter::parse(Some(&in_list(64))).is_ok());
        refused(in_list(65));
        // 2,000 patterns took 5 s and 2 GB to compile: now refused before any is compiled.
        let slow =
            (0..2000).map(|i| json!({"$regularExpression": {"pattern": format!("\\w{{12}}{i}"), "options": ""}}));
        refused(json!({"s": {"$in": slow.collect::<Vec<_>>()}}));
        // Counted across operators and branches.
        let mut branches: Vec<Value> = (0..20).map(|i| json!({"a": {"$regex": format!("{i}")}})).collect();
        branches.extend((20..40).map(|i| json!({"a": {"$not": re(i)}})));
        branches.extend((40..60).map(|i| json!({"a": {"$all": [re(i)]}})));
        branches.extend((60..65).map(|i| json!({"a": {"$elemMatch": {"b": re(i)}}})));
        refused(json!({"$or": branches}));
    }

    #[test]
    fn the_regular_expressions_of_a_filter_compile_to_8_mib_at_most() {
        // Each `\w{12}` (Unicode word characters) compiles to over half a megabyte.
        let pats: Vec<Value> = (0..20).map(|i| json!({"$regex": format!("\\w{{12}}{i}")})).collect();
        let f = json!({"$or": pats.iter().map(|p| json!({"s": p})).collect::<Vec<_>>()});
        let e = Filter::parse(Some(&f)).unwrap_err();
        assert_eq!(e.code, nimbus_api::ErrorCode::InvalidFilter);
        assert!(e.message.contains("compile to more than 8 MiB"), "{}", e.message);
        let few = pats[..4].iter().map(|p| json!({"s": p})).collect::<Vec<_>>();
        assert!(Filter::parse(Some(&json!({ "$or": few }))).is_ok());
    }

    #[test]
    fn shapes_ignore_values() {
        let a = Filter::parse(Some(&json!({"a": 1, "b": {"$gt": 2}}))).unwrap();
        let b = Filter::parse(Some(&json!({"a": "x", "b": {"$gt": 9}}))).unwrap();
        assert_eq!(a.shape(), b.shape());
    }
}
