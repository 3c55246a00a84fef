//! Updates: MongoDB's update operators, or a whole-document replacement (an update document
//! with no `$` operator). Parsed once into [`Update`]; applied by [`apply`] to one document
//! at a time, deterministically (the time `$currentDate` sets is the command's).
//!
//! Operators: `$set $setOnInsert $unset $inc $mul $min $max $rename $currentDate $push
//! $addToSet $pop $pull $pullAll`; `$push` and `$addToSet` take `$each`, `$push` also
//! `$position $sort $slice`. Paths may hold the positional `$` (the array element the
//! filter matched), `$[]` (every element) and `$[<id>]` (the elements an array filter
//! selects). Fields are processed in the lexicographic order of their paths (numeric
//! components by number), as MongoDB 5.0 and later do, so new fields appear in that order.

mod apply;
mod parse;

use serde_json::{Map, Number, Value};

pub use apply::ApplyCtx;
pub use parse::{MAX_FILTERED_PER_PATH, MAX_UPDATE_FIELDS};

use super::filter::{Filter, ValueSet};
use super::sort::SortSpec;

/// A parsed update.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A replacement document (without `_id`, which a replacement never changes).
    Replace(Map<String, Value>),
    Ops(Ops),
}

/// Operators in the order they are applied, and the array filters they refer to.
#[derive(Debug, Clone, PartialEq)]
pub struct Ops {
    pub(crate) ops: Vec<(UpdatePath, Op)>,
    pub(crate) array_filters: Vec<(String, Filter)>,
    pub(crate) uses_positional: bool,
}

/// A path of an update, split into its components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatePath {
    pub(crate) text: String,
    pub(crate) parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Part {
    Field(String),
    /// `$`: the element of the array the filter matched.
    Positional,
    /// `$[]`: every element.
    AllElements,
    /// `$[<id>]`: the elements the array filter `<id>` selects.
    Filtered(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    Set(Value),
    SetOnInsert(Value),
    Unset,
    Inc(Number),
    Mul(Number),
    Min(Value),
    Max(Value),
    /// Moves the value to this path.
    Rename(UpdatePath),
    CurrentDate,
    Push(Push),
    AddToSet(Vec<Value>),
    /// `$pop`: the first element when true, else the last.
    Pop(bool),
    Pull(PullCond),
    PullAll(ValueSet),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Push {
    pub each: Vec<Value>,
    pub position: Option<i64>,
    pub slice: Option<i64>,
    pub sort: Option<PushSort>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PushSort {
    /// Elements by their value; descending when true.
    Value(bool),
    /// Documents by fields.
    Fields(SortSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PullCond {
    /// Elements equal to the value.
    Equal(Value),
    /// Operators applied to each element as to a field: `{"$gte": 6}`, held as the filter
    /// `{"v": {"$gte": 6}}` on `{"v": element}`.
    Operators(Filter),
    /// A query each object element must match: `{"k": 1}`.
    Filter(Filter),
}

impl Update {
    /// Parses an update document without array filters.
    pub fn parse(v: &Value) -> Result<Update, nimbus_api::ApiError> {
        parse::parse(v, None)
    }

    /// Parses an update document and the `arrayFilters` its `$[<id>]` refer to.
    pub fn parse_with_array_filters(v: &Value, array_filters: Option<&Value>) -> Result<Update, nimbus_api::ApiError> {
        parse::parse(v, array_filters)
    }

    /// A whole-document replacement.
    pub fn is_replacement(&self) -> bool {
        matches!(self, Update::Replace(_))
    }

    /// Whether a path uses the positional `$` (which needs the filter's matched element).
    pub fn uses_positional(&self) -> bool {
        matches!(self, Update::Ops(o) if o.uses_positional)
    }

    /// Applies the update to `doc` (which has an `_id`), giving the new document.
    pub fn apply(&self, doc: &Value, ctx: &ApplyCtx) -> Result<Value, nimbus_api::ApiError> {
        apply::apply(self, doc, ctx)
    }
}

impl std::fmt::Display for UpdatePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn err(msg: impl Into<String>) -> nimbus_api::ApiError {
    nimbus_api::ApiError::invalid_update(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_api::ErrorCode;
    use serde_json::json;

    fn u(update: Value, doc: Value) -> Result<Value, nimbus_api::ApiError> {
        Update::parse(&update)?.apply(&doc, &ApplyCtx { now_ms: 1_700_000_000_000, ..ApplyCtx::default() })
    }

    fn ua(update: Value, filters: Value, doc: Value) -> Result<Value, nimbus_api::ApiError> {
        Update::parse_with_array_filters(&update, Some(&filters))?.apply(&doc, &ApplyCtx::default())
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
    fn unset_keeps_the_order_of_the_other_fields() {
        let d = json!({"_id": 1, "a": 1, "b": 2, "c": 3});
        assert_eq!(u(json!({"$unset": {"a": 1}}), d).unwrap().to_string(), r#"{"_id":1,"b":2,"c":3}"#);
    }

    #[test]
    fn new_fields_appear_in_lexicographic_order() {
        let d = json!({"_id": 1});
        assert_eq!(
            u(json!({"$set": {"b": 1, "a": 1, "c.10": 1, "c.9": 1}}), d).unwrap().to_string(),
            r#"{"_id":1,"a":1,"b":1,"c":{"9":1,"10":1}}"#
        );
    }

    #[test]
    fn inc_and_push_on_null_are_errors_and_inc_never_overflows_into_a_float() {
        let d = json!({"_id": 1, "n": null, "big": i64::MAX, "f": 1.5});
        assert_eq!(u(json!({"$inc": {"n": 1}}), d.clone()).unwrap_err().code, ErrorCode::InvalidUpdate);
        assert_eq!(u(json!({"$push": {"n": 1}}), d.clone()).unwrap_err().code, ErrorCode::InvalidUpdate);
        assert_eq!(u(json!({"$inc": {"big": 1}}), d.clone()).unwrap_err().code, ErrorCode::InvalidUpdate);
        assert_eq!(u(json!({"$mul": {"big": 2}}), d.clone()).unwrap_err().code, ErrorCode::InvalidUpdate);
        assert_eq!(u(json!({"$inc": {"big": -1}}), d.clone()).unwrap()["big"], json!(i64::MAX - 1));
        assert_eq!(u(json!({"$inc": {"f": 1}}), d.clone()).unwrap()["f"], json!(2.5));
        assert_eq!(
            u(json!({"$mul": {"f": 2, "m": 3, "m2": 1.5}}), d).unwrap(),
            json!({"_id": 1, "n": null, "big": i64::MAX, "f": 3.0, "m": 0, "m2": 0.0})
        );
    }

    #[test]
    fn push_with_modifiers() {
        let d = json!({"_id": 1, "t": [5, 1, 4]});
        let push = |spec: Value| u(json!({"$push": {"t": spec}}), d.clone()).unwrap()["t"].clone();
        assert_eq!(push(json!(2)), json!([5, 1, 4, 2]));
        assert_eq!(push(json!([2])), json!([5, 1, 4, [2]]));
        assert_eq!(push(json!({"$each": [2, 3]})), json!([5, 1, 4, 2, 3]));
        assert_eq!(push(json!({"$each": [2], "$position": 0})), json!([2, 5, 1, 4]));
        assert_eq!(push(json!({"$each": [2], "$position": -1})), json!([5, 1, 2, 4]));
        assert_eq!(push(json!({"$each": [2], "$sort": 1})), json!([1, 2, 4, 5]));
        assert_eq!(push(json!({"$each": [2], "$sort": -1, "$slice": 2})), json!([5, 4]));
        assert_eq!(push(json!({"$each": [], "$slice": -2})), json!([1, 4]));
        let docs = json!({"_id": 1, "s": [{"k": 3}, {"k": 1}]});
        assert_eq!(
            u(json!({"$push": {"s": {"$each": [{"k": 2}], "$sort": {"k": 1}}}}), docs).unwrap()["s"],
            json!([{"k": 1}, {"k": 2}, {"k": 3}])
        );
    }

    #[test]
    fn array_operators() {
        let d = json!({"_id": 1, "t": [1, 2, 3, 2], "o": [{"k": 1}, {"k": 2}]});
        assert_eq!(u(json!({"$pull": {"t": 2}}), d.clone()).unwrap()["t"], json!([1, 3]));
        assert_eq!(u(json!({"$pull": {"t": {"$gte": 2}}}), d.clone()).unwrap()["t"], json!([1]));
        assert_eq!(u(json!({"$pull": {"o": {"k": 1}}}), d.clone()).unwrap()["o"], json!([{"k": 2}]));
        assert_eq!(u(json!({"$pullAll": {"t": [2, 3]}}), d.clone()).unwrap()["t"], json!([1]));
        assert_eq!(u(json!({"$addToSet": {"t": 2}}), d.clone()).unwrap()["t"], json!([1, 2, 3, 2]));
        assert_eq!(
            u(json!({"$addToSet": {"t": {"$each": [4, 4, 1]}}}), d.clone()).unwrap()["t"],
            json!([1, 2, 3, 2, 4])
        );
        assert_eq!(u(json!({"$addToSet": {"n": 1}}), d.clone()).unwrap()["n"], json!([1]));
        assert_eq!(u(json!({"$pop": {"t": 1}}), d.clone()).unwrap()["t"], json!([1, 2, 3]));
        assert_eq!(u(json!({"$pop": {"t": -1}}), d.clone()).unwrap()["t"], json!([2, 3, 2]));
        assert_eq!(u(json!({"$pop": {"missing": 1}}), d.clone()).unwrap(), d);
    }

    #[test]
    fn add_to_set_and_pull_all_compare_by_value() {
        let d = json!({"_id": 1, "t": [1, [2], 2, 1]});
        assert_eq!(
            u(json!({"$addToSet": {"t": {"$each": [4, 4.0, 1.0, [1], [1.0], [2.0], 3]}}}), d.clone()).unwrap()["t"],
            json!([1, [2], 2, 1, 4, [1], 3])
        );
        assert_eq!(u(json!({"$pullAll": {"t": [1.0, [2]]}}), d).unwrap()["t"], json!([2]));
    }

    /// Every value was compared with every element: 50,000 of each were 2.5 billion
    /// comparisons on the apply loop.
    #[test]
    fn long_add_to_set_and_pull_all_lists_are_sorted_not_scanned() {
        let n = 50_000i64;
        let d = json!({"_id": 1, "t": (0..n).collect::<Vec<_>>()});
        let each: Vec<i64> = (n / 2..n + n / 2).rev().collect();
        let got = u(json!({"$addToSet": {"t": {"$each": each}}}), d.clone()).unwrap();
        let want: Vec<i64> = (0..n).chain((n..n + n / 2).rev()).collect();
        assert_eq!(got["t"], json!(want));
        let got = u(json!({"$pullAll": {"t": (1..n).collect::<Vec<_>>()}}), d).unwrap();
        assert_eq!(got["t"], json!([0]));
        let too_many: Vec<i64> = (0..=crate::query::filter::MAX_LIST_VALUES as i64).collect();
        for bad in [json!({"$addToSet": {"t": {"$each": too_many}}}), json!({"$pullAll": {"t": too_many}})] {
            let e = Update::parse(&bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidUpdate);
            assert!(e.message.contains("at most 100000 values"), "{}", e.message);
        }
    }

    #[test]
    fn min_max_rename_current_date() {
        let d = json!({"_id": 1, "a": 5, "b": {"c": 1}, "z": 0});
        assert_eq!(u(json!({"$min": {"a": 3}}), d.clone()).unwrap()["a"], json!(3));
        assert_eq!(u(json!({"$min": {"a": 9}}), d.clone()).unwrap()["a"], json!(5));
        assert_eq!(u(json!({"$max": {"a": 9, "new": 1}}), d.clone()).unwrap()["new"], json!(1));
        assert_eq!(
            u(json!({"$rename": {"b.c": "x.y"}}), d.clone()).unwrap(),
            json!({"_id": 1, "a": 5, "b": {}, "z": 0, "x": {"y": 1}})
        );
        assert_eq!(u(json!({"$rename": {"nope": "x"}}), d.clone()).unwrap(), d.clone());
        assert_eq!(
            u(json!({"$currentDate": {"at": true, "b.at": {"$type": "date"}}}), d).unwrap()["at"],
            json!({"$date": "2023-11-14T22:13:20.000Z"})
        );
    }

    #[test]
    fn positional_and_array_filters() {
        let d = json!({"_id": 1, "g": [{"s": 80, "n": 0}, {"s": 95, "n": 0}, {"s": 70, "n": 0}], "t": [1, 2, 3]});
        let pos = Update::parse(&json!({"$set": {"g.$.n": 1}})).unwrap();
        let at = |p: Option<usize>| pos.apply(&d, &ApplyCtx { positional: p, ..ApplyCtx::default() });
        assert_eq!(at(Some(1)).unwrap()["g"][1]["n"], json!(1));
        assert_eq!(at(None).unwrap_err().code, ErrorCode::InvalidUpdate);
        assert_eq!(u(json!({"$inc": {"t.$[]": 10}}), d.clone()).unwrap()["t"], json!([11, 12, 13]));
        assert_eq!(u(json!({"$set": {"g.$[].n": 2}}), d.clone()).unwrap()["g"][2]["n"], json!(2));
        let got = ua(json!({"$set": {"g.$[hi].n": 9}}), json!([{"hi.s": {"$gte": 80}}]), d.clone()).unwrap();
        assert_eq!(got["g"], json!([{"s": 80, "n": 9}, {"s": 95, "n": 9}, {"s": 70, "n": 0}]));
        let got = ua(json!({"$inc": {"t.$[x]": 100}}), json!([{"x": {"$gt": 1}}]), d.clone()).unwrap();
        assert_eq!(got["t"], json!([1, 102, 103]));
        assert_eq!(u(json!({"$set": {"missing.$[].n": 1}}), d).unwrap_err().code, ErrorCode::InvalidUpdate);
    }

    #[test]
    fn array_filters_see_each_element_under_their_identifier() {
        let d = json!({"_id": 1, "m": [[1, 2], [3], {"0": 1}, 4], "o": [{"k": [1, 5]}, {"k": 2}]});
        // Numeric components of a filter reach into elements that are arrays.
        let got = ua(json!({"$set": {"m.$[x]": 0}}), json!([{"x.0": 1}]), d.clone()).unwrap();
        assert_eq!(got["m"], json!([0, [3], 0, 4]));
        let got = ua(json!({"$set": {"m.$[x]": 0}}), json!([{"x": {"$size": 1}}]), d.clone()).unwrap();
        assert_eq!(got["m"], json!([[1, 2], 0, {"0": 1}, 4]));
        let got = ua(json!({"$set": {"o.$[e].z": 1}}), json!([{"e.k": 5}]), d.clone()).unwrap();
        assert_eq!(got["o"], json!([{"k": [1, 5], "z": 1}, {"k": 2}]));
        let got = ua(json!({"$set": {"m.$[x].$[y]": 9}}), json!([{"x": {"$type": "array"}}, {"y": {"$gte": 2}}]), d);
        assert_eq!(got.unwrap()["m"], json!([[1, 9], [9], {"0": 1}, 4]));
    }

    #[test]
    fn an_update_path_holds_at_most_8_array_filter_identifiers() {
        let nested = |depth: usize| {
            let path: Vec<String> =
                std::iter::once("a".to_owned()).chain((0..depth).map(|i| format!("$[x{i}]"))).collect();
            let filters: Vec<Value> = (0..depth).map(|i| json!({ format!("x{i}"): {"$exists": true} })).collect();
            Update::parse_with_array_filters(&json!({"$set": { path.join("."): 1 }}), Some(&json!(filters)))
        };
        // 60 levels over a 1M-element array took 4.6 s (each level copied its subtree).
        let e = nested(MAX_FILTERED_PER_PATH + 1).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidUpdate);
        assert!(e.message.contains("at most 8 $[<id>] per path"), "{}", e.message);
        let mut inner = json!(vec![0; 100_000]);
        for _ in 1..MAX_FILTERED_PER_PATH {
            inner = json!([inner]);
        }
        let got = nested(MAX_FILTERED_PER_PATH).unwrap().apply(&json!({"_id": 1, "a": inner}), &ApplyCtx::default());
        let mut leaf = &got.unwrap()["a"];
        while leaf.as_array().is_some_and(|a| a.len() == 1) {
            leaf = &leaf[0];
        }
        assert_eq!(leaf, &json!(vec![1; 100_000]));
    }

    #[test]
    fn array_filters_are_checked() {
        for (update, filters) in [
            (json!({"$set": {"a.$[x]": 1}}), json!([])),
            (json!({"$set": {"a.$[x]": 1}}), json!([{"y": 1}])),
            (json!({"$set": {"a.$[x]": 1}}), json!([{"x": 1}, {"x": 2}])),
            (json!({"$set": {"a.$[x]": 1}}), json!([{"x.a": 1, "y.b": 1}])),
            (json!({"$set": {"a.$[X]": 1}}), json!([{"X": 1}])),
            (json!({"$set": {"a": 1}}), json!([{"x": 1}])),
            (json!({"a": 1}), json!([{"x": 1}])),
        ] {
            assert!(Update::parse_with_array_filters(&update, Some(&filters)).is_err(), "{update} {filters}");
        }
    }

    #[test]
    fn pull_conditions_and_array_filters_hold_64_regular_expressions_in_all() {
        let regexes = |from: usize, n: usize| {
            (from..from + n)
                .map(|i| json!({"$regularExpression": {"pattern": format!("^{i}$"), "options": ""}}))
                .collect::<Vec<_>>()
        };
        let update = json!({"$pull": {"t": {"$in": regexes(0, 40)}}, "$set": {"g.$[x].n": 1}});
        let filters = |n: usize| json!([{"x.s": {"$in": regexes(40, n)}}]);
        assert!(Update::parse_with_array_filters(&update, Some(&filters(24))).is_ok());
        let e = Update::parse_with_array_filters(&update, Some(&filters(25))).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidUpdate);
        assert!(e.message.contains("more than 64 regular expressions"), "{}", e.message);
    }

    #[test]
    fn upserts_build_from_every_equality() {
        let ctx = ApplyCtx::default();
        let id = json!("gen");
        let up = |f: Value, upd: Value| {
            let filter = Filter::parse(Some(&f)).unwrap();
            Update::parse(&upd).unwrap().upsert_document(&filter, &id, &ctx)
        };
        assert_eq!(
            up(
                json!({"a": 1, "b.c": "x", "$and": [{"d": {"$eq": 2}}, {"e": {"$gt": 0}}]}),
                json!({"$set": {"f": 1}, "$setOnInsert": {"g": 1}})
            )
            .unwrap(),
            json!({"_id": "gen", "a": 1, "b": {"c": "x"}, "d": 2, "f": 1, "g": 1})
        );
        assert_eq!(up(json!({"_id": 7, "a": 1}), json!({"z": 1})).unwrap(), json!({"_id": 7, "z": 1}));
        assert!(up(json!({"a": 1, "a.b": 2}), json!({"$set": {"c": 1}})).is_err());
        assert!(up(json!({"a": 1}), json!({"$set": {"b.$": 1}})).is_err());
        // $setOnInsert does nothing to an existing document.
        assert_eq!(u(json!({"$setOnInsert": {"g": 1}}), json!({"_id": 1})).unwrap(), json!({"_id": 1}));
    }

    #[test]
    fn an_upserted_replacement_keeps_the_filters_id() {
        let ctx = ApplyCtx::default();
        let up = |f: Value, upd: Value| {
            let filter = Filter::parse(Some(&f)).unwrap();
            Update::parse(&upd).unwrap().upsert_document(&filter, &json!("gen"), &ctx)
        };
        // What an update of an existing document answers: InvalidUpdate.
        let e = up(json!({"_id": 1}), json!({"_id": 2, "x": 1})).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidUpdate);
        assert!(e.message.contains("cannot change _id"), "{}", e.message);
        assert_eq!(up(json!({"_id": 1}), json!({"_id": 1.0, "x": 1})).unwrap(), json!({"_id": 1, "x": 1}));
        assert_eq!(up(json!({"_id": 1}), json!({"x": 1})).unwrap(), json!({"_id": 1, "x": 1}));
        // Without an _id equality in the filter, the replacement's _id, or a new one.
        assert_eq!(up(json!({"_id": {"$gt": 1}}), json!({"_id": 2, "x": 1})).unwrap(), json!({"_id": 2, "x": 1}));
        assert_eq!(up(json!({"a": 1}), json!({"x": 1})).unwrap(), json!({"_id": "gen", "x": 1}));
    }

    #[test]
    fn replacement_keeps_id() {
        let d = json!({"_id": 7, "a": 1});
        assert_eq!(u(json!({"b": 2}), d.clone()).unwrap(), json!({"_id": 7, "b": 2}));
        assert!(u(json!({"_id": 8, "b": 2}), d.clone()).is_err());
        assert!(u(json!({"$set": {"_id": 8}}), d.clone()).is_err());
        assert_eq!(u(json!({"$set": {"_id": 7.0}}), d).unwrap()["_id"], json!(7));
    }

    #[test]
    fn extended_json_values_are_normalised() {
        let d = json!({"_id": 1});
        assert_eq!(
            u(json!({"$set": {"at": {"$date": 0}, "n": {"$numberLong": "5"}}}), d.clone()).unwrap(),
            json!({"_id": 1, "at": {"$date": "1970-01-01T00:00:00.000Z"}, "n": 5})
        );
        assert!(u(json!({"$set": {"x": {"$numberDecimal": "1"}}}), d).is_err());
    }

    #[test]
    fn type_errors_are_invalid_update() {
        let d = json!({"_id": 1, "s": "x", "n": 1, "arr": [1]});
        for bad in [
            json!({"$inc": {"s": 1}}),
            json!({"$push": {"s": 1}}),
            json!({"$set": {"s.t": 1}}),
            json!({"$set": {"arr.x": 1}}),
            json!({"$set": {"arr.100001": 1}}),
            json!({"$pop": {"s": 1}}),
            json!({"$rename": {"arr.0": "b"}}),
        ] {
            assert_eq!(u(bad.clone(), d.clone()).unwrap_err().code, ErrorCode::InvalidUpdate, "{bad}");
        }
        for bad in [
            json!({}),
            json!({"$set": 1}),
            json!({"$set": {"a": 1}, "b": 2}),
            json!({"$set": {"a": 1, "a.b": 2}}),
            json!({"$set": {"a.$[]": 1}, "$inc": {"a.0": 1}}),
            json!({"$inc": {"a": "1"}}),
            json!({"$unset": {"_id": ""}}),
            json!({"$rename": {"a": "_id"}}),
            json!({"$rename": {"a": "a"}}),
            json!({"$rename": {"a": "a.b"}}),
            json!({"$set": {"$.a": 1}}),
            json!({"$set": {"a.$.b.$": 1}}),
            json!({"$set": {"a.$[bad id]": 1}}),
            json!({"$pop": {"a": 2}}),
            json!({"$push": {"a": {"$each": 1}}}),
            json!({"$push": {"a": {"$each": [1], "$bogus": 1}}}),
            json!({"$currentDate": {"a": {"$type": "timestamp"}}}),
            json!({"$bogus": {"a": 1}}),
            json!({"a.b": 1}),
            json!({"$x": 1}),
            json!([1]),
        ] {
            assert_eq!(Update::parse(&bad).unwrap_err().code, ErrorCode::InvalidUpdate, "{bad}");
        }
    }

    #[test]
    fn the_number_of_fields_is_bounded() {
        let many: serde_json::Map<String, Value> =
            (0..=parse::MAX_UPDATE_FIELDS).map(|i| (format!("f{i}"), json!(1))).collect();
        let e = Update::parse(&json!({"$set": many})).unwrap_err();
        assert!(e.message.contains("at most 1000 fields"), "{}", e.message);
        let fine: serde_json::Map<String, Value> =
            (0..parse::MAX_UPDATE_FIELDS).map(|i| (format!("f{i}"), json!(1))).collect();
        assert!(Update::parse(&json!({"$set": fine})).is_ok());
    }
}
