//! Projections, as MongoDB applies them:
//!
//! - inclusion `{"a": 1, "b.c": 1}`: only those fields (and `_id` unless `"_id": 0`), in
//!   the document's order; through arrays, each object element keeps its named fields,
//!   nested arrays are projected alike and other elements are dropped;
//! - exclusion `{"a": 0}`: every field but those;
//! - `{"a": {"$slice": n}}` or `{"$slice": [skip, limit]}`: part of an array (alone or with
//!   exclusions, the other fields stay; with inclusions, only the named ones);
//! - `{"a": {"$elemMatch": {...}}}`: the first element of a top-level array that matches,
//!   as a one-element array (the field is left out when none does); an inclusion. The
//!   condition is the filter's `$elemMatch`: a query on each element (`{"k": 1}`) or
//!   operators on its value (`{"$gte": 80}`).
//!
//! A date or an ObjectId (an Extended JSON object) is a value, not a document: a dotted
//! inclusion through it leaves it out, as through a number.
//!
//! Inclusion and exclusion do not mix, except `_id`; a path and one inside it conflict.

use nimbus_api::ApiError;
use serde_json::{Map, Value};

use super::filter::{Pred, parse_elem_match};
use super::pattern::PatternBudget;
use crate::doc::ejson;
use crate::doc::path::validate_path;

#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    include: bool,
    tree: Tree,
}

type Tree = Vec<(String, Node)>;

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Include,
    Exclude,
    Slice {
        skip: i64,
        limit: Option<i64>,
    },
    /// `$elemMatch`'s predicate ([`Pred::ElemMatchObject`] or [`Pred::ElemMatchValue`]).
    ElemMatch(Box<Pred>),
    Children(Tree),
}

fn err(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

impl Projection {
    /// `None` when the projection is absent or empty (whole documents).
    pub fn parse(v: Option<&Value>) -> Result<Option<Projection>, ApiError> {
        let map = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) if m.is_empty() => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(err("projection must be an object")),
        };
        let mut include: Option<bool> = None;
        let mut keep_id = None;
        let mut tree: Tree = Vec::new();
        // The regular expressions of all the `$elemMatch`es count together.
        let mut budget = PatternBudget::default();
        for (path, spec) in map {
            validate_path(path).map_err(err)?;
            if path.split('.').any(|p| p.starts_with('$')) {
                return Err(err(format!("projection of {path:?}: the positional operator is not supported")));
            }
            let node = parse_node(path, spec, &mut budget)?;
            let mode = match &node {
                Node::Include | Node::ElemMatch(_) => Some(true),
                Node::Exclude => Some(false),
                _ => None,
            };
            if path == "_id" && matches!(node, Node::Include | Node::Exclude) {
                keep_id = Some(node == Node::Include);
                continue;
            }
            if let Some(m) = mode {
                if include.is_some_and(|i| i != m) {
                    return Err(err("projection cannot mix inclusion and exclusion (except _id)"));
                }
                include = Some(m);
            }
            insert(&mut tree, path, node)?;
        }
        // `{"_id": 1}` alone includes `_id` only; `{"_id": 0}` alone excludes it.
        let include = include.unwrap_or(keep_id == Some(true) && tree.is_empty());
        match keep_id {
            Some(true) if include => insert(&mut tree, "_id", Node::Include)?,
            Some(false) if !include => insert(&mut tree, "_id", Node::Exclude)?,
            None if include => insert(&mut tree, "_id", Node::Include)?,
            // Included by default in an exclusion; left out of an inclusion by `"_id": 0`.
            _ => {}
        }
        Ok(Some(Projection { include, tree }))
    }

    pub fn apply(&self, doc: &Value) -> Value {
        let Value::Object(map) = doc else { return doc.clone() };
        Value::Object(if self.include { include(map, &self.tree) } else { exclude(map, &self.tree) })
    }
}

fn parse_node(path: &str, spec: &Value, budget: &mut PatternBudget) -> Result<Node, ApiError> {
    match spec {
        Value::Bool(b) => Ok(if *b { Node::Include } else { Node::Exclude }),
        Value::Number(n) => Ok(if n.as_f64() == Some(0.0) { Node::Exclude } else { Node::Include }),
        Value::Object(m) if m.len() == 1 && m.contains_key("$slice") => parse_slice(&m["$slice"]),
        Value::Object(m) if m.len() == 1 && m.contains_key("$elemMatch") => {
            if path.contains('.') {
                return Err(err(format!("$elemMatch projection of {path:?}: only top-level fields")));
            }
            let p = parse_elem_match(&m["$elemMatch"], budget).map_err(|e| err(e.message))?;
            Ok(Node::ElemMatch(Box::new(p)))
        }
        _ => Err(err(format!(
            "projection of {path:?} must be 0, 1, true, false, {{\"$slice\": ...}} or {{\"$elemMatch\": ...}}"
        ))),
    }
}

fn parse_slice(arg: &Value) -> Result<Node, ApiError> {
    let int = |v: &Value| v.as_i64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64));
    match arg {
        Value::Array(items) if items.len() == 2 => match (int(&items[0]), int(&items[1])) {
            (Some(skip), Some(limit)) if limit > 0 => Ok(Node::Slice { skip, limit: Some(limit) }),
            _ => Err(err("$slice [skip, limit] needs whole numbers and a positive limit")),
        },
        v => match int(v) {
            Some(n) => Ok(Node::Slice { skip: n, limit: None }),
            None => Err(err("$slice needs a whole number or [skip, limit]")),
        },
    }
}

/// Adds `path` to the tree, refusing a path inside (or around) one already there.
fn insert(tree: &mut Tree, path: &str, node: Node) -> Result<(), ApiError> {
    let collision = || err(format!("projection path collision at {path:?}"));
    let (first, rest) = match path.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (path, None),
    };
    let pos = tree.iter().position(|(k, _)| k == first);
    match (rest, pos) {
        (None, None) => tree.push((first.to_owned(), node)),
        (None, Some(_)) => return Err(collision()),
        (Some(rest), None) => {
            let mut sub = Vec::new();
            insert(&mut sub, rest, node)?;
            tree.push((first.to_owned(), Node::Children(sub)));
        }
        (Some(rest), Some(i)) => match &mut tree[i].1 {
            Node::Children(sub) => insert(sub, rest, node)?,
            _ => return Err(collision()),
        },
    }
    Ok(())
}

fn find<'t>(tree: &'t Tree, key: &str) -> Option<&'t Node> {
    tree.iter().find(|(k, _)| k == key).map(|(_, n)| n)
}

fn include(src: &Map<String, Value>, tree: &Tree) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in src {
        let Some(node) = find(tree, k) else { continue };
        let projected = match node {
            Node::Include | Node::Exclude => Some(v.clone()),
            Node::Slice { skip, limit } => Some(slice(v, *skip, *limit)),
            Node::ElemMatch(p) => match v {
                Value::Array(items) => p.first_match(v).map(|i| Value::Array(vec![items[i].clone()])),
                _ => None,
            },
            Node::Children(sub) => match v {
                Value::Object(child) if !is_value(v) => Some(Value::Object(include(child, sub))),
                Value::Array(items) => Some(include_array(items, sub)),
                _ => None,
            },
        };
        if let Some(p) = projected {
            out.insert(k.clone(), p);
        }
    }
    out
}

fn include_array(items: &[Value], tree: &Tree) -> Value {
    Value::Array(
        items
            .iter()
            .filter_map(|i| match i {
                Value::Object(child) if !is_value(i) => Some(Value::Object(include(child, tree))),
                Value::Array(inner) => Some(include_array(inner, tree)),
                _ => None,
            })
            .collect(),
    )
}

fn exclude(src: &Map<String, Value>, tree: &Tree) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in src {
        let projected = match find(tree, k) {
            None | Some(Node::Include | Node::ElemMatch(_)) => v.clone(),
            Some(Node::Exclude) => continue,
            Some(Node::Slice { skip, limit }) => slice(v, *skip, *limit),
            Some(Node::Children(sub)) => match v {
                Value::Object(child) if !is_value(v) => Value::Object(exclude(child, sub)),
                Value::Array(items) => exclude_array(items, sub),
                other => other.clone(),
            },
        };
        out.insert(k.clone(), projected);
    }
    out
}

fn exclude_array(items: &[Value], tree: &Tree) -> Value {
    Value::Array(
        items
            .iter()
            .map(|i| match i {
                Value::Object(child) if !is_value(i) => Value::Object(exclude(child, tree)),
                Value::Array(inner) => exclude_array(inner, tree),
                other => other.clone(),
            })
            .collect(),
    )
}

/// Whether an object is a value (a date, an ObjectId) rather than a document.
fn is_value(v: &Value) -> bool {
    ejson::special(v).is_some()
}

/// `$slice`: `n` first (last when negative) elements, or `limit` from `skip` (from the end
/// when negative). Not an array: as it is.
fn slice(v: &Value, skip: i64, limit: Option<i64>) -> Value {
    let Value::Array(items) = v else { return v.clone() };
    let len = items.len() as i64;
    let (from, count) = match limit {
        None if skip >= 0 => (0, skip),
        None => ((len + skip).max(0), len),
        Some(l) if skip >= 0 => (skip.min(len), l),
        Some(l) => ((len + skip).max(0), l),
    };
    Value::Array(items.iter().skip(from as usize).take(count.max(0) as usize).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(spec: Value, doc: Value) -> Value {
        Projection::parse(Some(&spec)).unwrap().unwrap().apply(&doc)
    }

    #[test]
    fn inclusion_keeps_id_and_named_fields_in_document_order() {
        let d = json!({"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "e": [{"c": 1, "x": 0}, 5]});
        assert_eq!(p(json!({"a": 1}), d.clone()), json!({"_id": 1, "a": 1}));
        assert_eq!(p(json!({"b.c": 1, "_id": 0}), d.clone()), json!({"b": {"c": 2}}));
        assert_eq!(p(json!({"e.c": 1, "_id": 0}), d.clone()), json!({"e": [{"c": 1}]}));
        assert_eq!(p(json!({"e": 1, "a": 1}), d.clone()).to_string(), r#"{"_id":1,"a":1,"e":[{"c":1,"x":0},5]}"#);
        assert_eq!(p(json!({"_id": 1}), d.clone()), json!({"_id": 1}));
        assert_eq!(p(json!({"_id": true}), d), json!({"_id": 1}));
    }

    /// MongoDB's answers for `{"a.b": 1}` (jstest `null_query_semantics.js`).
    #[test]
    fn inclusion_through_arrays_is_mongodbs() {
        let proj = json!({"_id": 0, "a.b": 1});
        assert_eq!(p(proj.clone(), json!({"a": [[]]})), json!({"a": [[]]}));
        assert_eq!(p(proj.clone(), json!({"a": [1, "string", null]})), json!({"a": []}));
        assert_eq!(p(proj.clone(), json!({"a": [{"b": 3}, {}]})), json!({"a": [{"b": 3}, {}]}));
        assert_eq!(p(proj.clone(), json!({"a": {}})), json!({"a": {}}));
        assert_eq!(p(proj.clone(), json!({"a": 4})), json!({}));
        assert_eq!(p(proj, json!({"a": [[{"b": 1, "c": 2}]]})), json!({"a": [[{"b": 1}]]}));
    }

    #[test]
    fn exclusion_drops_named_fields() {
        let d = json!({"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "e": [{"c": 1, "x": 0}, 5, [{"c": 2}]]});
        assert_eq!(p(json!({"b.c": 0}), d.clone())["b"], json!({"d": 3}));
        assert_eq!(p(json!({"_id": 0}), d.clone()).get("_id"), None);
        assert_eq!(p(json!({"e.c": 0}), d)["e"], json!([{"x": 0}, 5, [{}]]));
    }

    #[test]
    fn slice_and_elem_match() {
        let d = json!({"_id": 1, "t": [1, 2, 3, 4, 5], "o": [{"k": 1}, {"k": 2}, {"k": 2, "z": 1}], "s": "x"});
        assert_eq!(p(json!({"t": {"$slice": 2}}), d.clone())["t"], json!([1, 2]));
        assert_eq!(p(json!({"t": {"$slice": -2}}), d.clone())["t"], json!([4, 5]));
        assert_eq!(p(json!({"t": {"$slice": [1, 2]}}), d.clone())["t"], json!([2, 3]));
        assert_eq!(p(json!({"t": {"$slice": [-2, 5]}}), d.clone())["t"], json!([4, 5]));
        assert_eq!(p(json!({"t": {"$slice": [9, 1]}}), d.clone())["t"], json!([]));
        // Alone, $slice keeps the other fields; with an inclusion, only the named ones.
        assert_eq!(p(json!({"t": {"$slice": 1}}), d.clone())["s"], json!("x"));
        assert_eq!(p(json!({"t": {"$slice": 1}, "s": 1}), d.clone()), json!({"_id": 1, "t": [1], "s": "x"}));
        assert_eq!(p(json!({"s": {"$slice": 1}}), d.clone())["s"], json!("x"));
        assert_eq!(p(json!({"o": {"$elemMatch": {"k": 2}}}), d.clone()), json!({"_id": 1, "o": [{"k": 2}]}));
        assert_eq!(p(json!({"o": {"$elemMatch": {"k": 9}}}), d), json!({"_id": 1}));
    }

    #[test]
    fn the_elem_matches_of_a_projection_hold_64_regular_expressions_in_all() {
        let res = |from: usize| (from..from + 40).map(|i| json!({"$regex": format!("^{i}$")})).collect::<Vec<_>>();
        let one = |from: usize| json!({"$elemMatch": {"$or": res(from).into_iter().map(|r| json!({"k": r})).collect::<Vec<_>>()}});
        assert!(Projection::parse(Some(&json!({"a": one(0)}))).is_ok());
        let e = Projection::parse(Some(&json!({"a": one(0), "b": one(40)}))).unwrap_err();
        assert_eq!(e.code, nimbus_api::ErrorCode::BadRequest);
        assert!(e.message.contains("more than 64 regular expressions"), "{}", e.message);
    }

    #[test]
    fn elem_match_takes_operators_on_values_as_the_filter_does() {
        let d = json!({"_id": 1, "a": [70, 85, 90], "m": ["x", {"k": 1}, 5, [3]], "s": 5});
        assert_eq!(p(json!({"a": {"$elemMatch": {"$gte": 80}}}), d.clone()), json!({"_id": 1, "a": [85]}));
        assert_eq!(p(json!({"a": {"$elemMatch": {"$gt": 80, "$lt": 90}}}), d.clone()), json!({"_id": 1, "a": [85]}));
        assert_eq!(p(json!({"a": {"$elemMatch": {"$gt": 95}}}), d.clone()), json!({"_id": 1}));
        assert_eq!(p(json!({"m": {"$elemMatch": {"$type": "number"}}}), d.clone())["m"], json!([5]));
        assert_eq!(p(json!({"m": {"$elemMatch": {"k": 1}}}), d.clone())["m"], json!([{"k": 1}]));
        assert_eq!(p(json!({"m": {"$elemMatch": {"0": 3}}}), d.clone())["m"], json!([[3]]));
        assert_eq!(p(json!({"s": {"$elemMatch": {"$gte": 1}}, "_id": 0}), d), json!({}));
    }

    #[test]
    fn dotted_inclusion_through_a_date_or_an_object_id_leaves_it_out() {
        let d = json!({
            "_id": 1,
            "at": {"$date": "2024-01-01T00:00:00.000Z"},
            "id": {"$oid": "65f0a1b2c3d4e5f6a7b8c9d0"},
            "l": [{"$date": "2024-01-01T00:00:00.000Z"}, {"x": 1, "y": 2}],
        });
        assert_eq!(p(json!({"at.x": 1, "_id": 0}), d.clone()), json!({}));
        assert_eq!(p(json!({"id.x": 1, "_id": 0}), d.clone()), json!({}));
        assert_eq!(p(json!({"l.x": 1, "_id": 0}), d.clone()), json!({"l": [{"x": 1}]}));
        // Excluding inside one leaves it whole.
        assert_eq!(
            p(json!({"at.x": 0, "l.y": 0}), d.clone()),
            json!({"_id": 1, "at": d["at"], "id": d["id"], "l": [d["l"][0], {"x": 1}]})
        );
    }

    #[test]
    fn bad_projections_are_refused() {
        for bad in [
            json!({"a": 1, "b": 0}),
            json!({"a": "yes"}),
            json!({"a": 1, "a.b": 1}),
            json!({"a.b": 1, "a": 1}),
            json!({"a.$": 1}),
            json!({"a": {"$slice": [1, 0]}}),
            json!({"a": {"$slice": "1"}}),
            json!({"a.b": {"$elemMatch": {"x": 1}}}),
            json!({"a": {"$elemMatch": {"$bad": 1}}}),
            json!({"a": {"$add": [1, 2]}}),
        ] {
            assert!(Projection::parse(Some(&bad)).is_err(), "{bad}");
        }
    }
}
