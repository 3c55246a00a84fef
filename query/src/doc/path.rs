//! Dotted paths into documents, with MongoDB's array traversal.
//!
//! [`for_each_element`] is the matcher's view of a path, the same walk as MongoDB's
//! `BSONElementIterator`: objects are followed field by field; an array met before the
//! path ends is traversed (each object element continues the path, and a numeric
//! component also selects the element at that position); an array at the end of the path
//! yields its elements and then itself. Where a branch of the walk finds nothing, it
//! yields "missing" once, which is what `{"a.b": null}` matches: `{"a": [{"b": 1}, {}]}`
//! matches it through its second element; `{"a": [1, 2]}` does not (no element continues
//! the path).
//!
//! [`keys`] is the indexes' and sorts' view, MongoDB's key generation: every value the
//! path reaches, `null` where a branch ends without one, and whether an array was crossed
//! (the document is then *multikey* for that path).

use std::ops::ControlFlow;

use serde_json::Value;

/// A path split into its components once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldPath {
    text: String,
    parts: Vec<String>,
}

impl FieldPath {
    /// Splits a path that [`validate_path`] accepted.
    pub fn new(path: &str) -> FieldPath {
        FieldPath { text: path.to_owned(), parts: path.split('.').map(str::to_owned).collect() }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn parts(&self) -> &[String] {
        &self.parts
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One place a path reaches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Element<'a> {
    /// `None` where the path reaches nothing (missing).
    pub value: Option<&'a Value>,
    /// The position in the outermost array traversed on the way, when one was: what the
    /// positional update operator `$` refers to.
    pub array_offset: Option<usize>,
}

/// What the walk yields for an array at the end of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafArrays {
    /// Each element, then the array itself (equality, ranges, `$in`, `$exists`, ...).
    Traverse,
    /// The array itself only (`$size`, `$elemMatch`, `$all` with `$elemMatch`).
    Whole,
}

/// What a path is looked up in: a document, or a value the matcher reads as one without
/// building it (no copy of what may be a large subtree).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root<'a> {
    /// A document (anything but an object has no fields).
    Doc(&'a Value),
    /// The document `{name: value}`: an array filter's element under its identifier
    /// (`{"x.score": {"$gt": 5}}` for `$[x]`), a `$pull` condition's element.
    Bound { name: &'a str, value: &'a Value },
    /// An array read as the document `{"0": items[0], "1": items[1], ...}`: what
    /// `$elemMatch` sees of an element that is itself an array.
    Positions(&'a [Value]),
}

impl<'a> Root<'a> {
    /// The value of a top-level field.
    fn field(self, name: &str) -> Option<&'a Value> {
        match self {
            Root::Doc(Value::Object(m)) => m.get(name),
            Root::Doc(_) => None,
            Root::Bound { name: n, value } => (n == name).then_some(value),
            Root::Positions(items) => {
                let k = name.parse::<usize>().ok()?;
                if is_position(name, k) { items.get(k) } else { None }
            }
        }
    }
}

/// Calls `f` with every element `path` reaches in `doc` (an object), in document order,
/// until `f` breaks.
pub fn for_each_element<'a>(
    doc: &'a Value,
    path: &FieldPath,
    leaf: LeafArrays,
    f: &mut dyn FnMut(Element<'a>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    for_each_element_in(Root::Doc(doc), path, leaf, f)
}

/// [`for_each_element`] from any [`Root`].
pub fn for_each_element_in<'a>(
    root: Root<'a>,
    path: &FieldPath,
    leaf: LeafArrays,
    f: &mut dyn FnMut(Element<'a>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let parts = path.parts();
    let Some((first, rest)) = parts.split_first() else {
        return f(Element { value: None, array_offset: None });
    };
    match root.field(first) {
        Some(arr @ Value::Array(_)) => in_array(arr, rest, leaf, None, f),
        Some(v) if !rest.is_empty() => from_object(v, rest, leaf, None, f),
        value => f(Element { value, array_offset: None }),
    }
}

/// Whether any element `path` reaches satisfies `pred`; the offset of the first that does.
pub fn any_element<'a>(
    doc: &'a Value,
    path: &FieldPath,
    leaf: LeafArrays,
    mut pred: impl FnMut(Option<&'a Value>) -> bool,
) -> Option<Option<usize>> {
    let mut found = None;
    let _ = for_each_element(doc, path, leaf, &mut |e| {
        if pred(e.value) {
            found = Some(e.array_offset);
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    found
}

/// Follows objects from `obj` until the path ends or meets an array (MongoDB's
/// `getFieldDottedOrArray`): the value reached, or the array and the index of the component
/// that named it. Missing, or a scalar before the end, is `None`.
fn dotted_or_array<'a>(obj: &'a Value, parts: &[String]) -> (Option<&'a Value>, usize) {
    let mut cur = obj;
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(m) = cur else { return (None, i) };
        match m.get(part) {
            None => return (None, i),
            Some(v) if i + 1 == parts.len() || v.is_array() => return (Some(v), i),
            Some(v) => cur = v,
        }
    }
    (Some(cur), parts.len())
}

fn from_object<'a>(
    obj: &'a Value,
    parts: &[String],
    leaf: LeafArrays,
    offset: Option<usize>,
    f: &mut dyn FnMut(Element<'a>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    match dotted_or_array(obj, parts) {
        (Some(arr @ Value::Array(_)), i) => in_array(arr, &parts[i + 1..], leaf, offset, f),
        (value, _) => f(Element { value, array_offset: offset }),
    }
}

fn in_array<'a>(
    arr: &'a Value,
    rest: &[String],
    leaf: LeafArrays,
    offset: Option<usize>,
    f: &mut dyn FnMut(Element<'a>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let Value::Array(items) = arr else { return ControlFlow::Continue(()) };
    let Some((next, after)) = rest.split_first() else {
        // The path ends at this array.
        if leaf == LeafArrays::Traverse {
            for (k, item) in items.iter().enumerate() {
                f(Element { value: Some(item), array_offset: offset.or(Some(k)) })?;
            }
        }
        return f(Element { value: Some(arr), array_offset: offset });
    };
    for (k, item) in items.iter().enumerate() {
        let positional = is_position(next, k);
        match item {
            Value::Object(_) => {
                from_object(item, rest, leaf, offset.or(Some(k)), f)?;
                if positional {
                    if after.is_empty() {
                        f(Element { value: Some(item), array_offset: offset })?;
                    } else {
                        from_object(item, after, leaf, offset, f)?;
                    }
                }
            }
            _ if positional => {
                if after.is_empty() {
                    f(Element { value: Some(item), array_offset: offset })?;
                } else if item.is_array() {
                    in_array(item, after, leaf, offset, f)?;
                }
            }
            _ => {}
        }
    }
    ControlFlow::Continue(())
}

/// Whether a path component names array position `k` (digits only, as MongoDB reads them:
/// `"01"` is not position 1).
fn is_position(part: &str, k: usize) -> bool {
    !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) && part == k.to_string()
}

/// A key the path gives a document for an index or a sort.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Key<'a> {
    /// An empty array at the end of the path: below every value in a sort.
    EmptyArray,
    Value(&'a Value),
    /// Nothing there: sorts and indexes as `null`.
    Null,
}

/// The keys `path` gives `doc` and whether an array was crossed (MongoDB's key generation
/// for indexes and sorts). Never empty.
pub fn keys<'a>(doc: &'a Value, path: &FieldPath) -> (Vec<Key<'a>>, bool) {
    let mut out = Vec::new();
    let mut multikey = false;
    keys_of(doc, path.parts(), &mut out, &mut multikey);
    if out.is_empty() {
        out.push(Key::Null);
    }
    (out, multikey)
}

fn keys_of<'a>(v: &'a Value, parts: &[String], out: &mut Vec<Key<'a>>, multikey: &mut bool) {
    let Some((first, rest)) = parts.split_first() else {
        match v {
            Value::Array(items) => {
                *multikey = true;
                if items.is_empty() {
                    out.push(Key::EmptyArray);
                }
                out.extend(items.iter().map(Key::Value));
            }
            other => out.push(Key::Value(other)),
        }
        return;
    };
    match v {
        Value::Object(m) => match m.get(first) {
            Some(child) => keys_of(child, rest, out, multikey),
            None => out.push(Key::Null),
        },
        Value::Array(items) => {
            *multikey = true;
            if items.is_empty() {
                out.push(Key::Null);
            }
            for (k, item) in items.iter().enumerate() {
                if is_position(first, k) {
                    keys_of(item, rest, out, multikey);
                }
                match item {
                    Value::Object(_) => keys_of(item, parts, out, multikey),
                    _ => out.push(Key::Null),
                }
            }
        }
        _ => out.push(Key::Null),
    }
}

/// The single value at a plain path (objects, and arrays by position; no traversal), for
/// updates and projections.
pub fn get_plain<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = root;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Checks a field path as used in filters, updates, sorts and index keys.
pub fn validate_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.split('.').any(|p| p.is_empty()) {
        return Err(format!("invalid field path {path:?}: empty component"));
    }
    if path.starts_with('$') {
        return Err(format!("invalid field path {path:?}: starts with $"));
    }
    if path.len() > 1024 {
        return Err("field path longer than 1024 bytes".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn walk(doc: Value, path: &str, leaf: LeafArrays) -> Vec<(Option<Value>, Option<usize>)> {
        let mut out = Vec::new();
        let _ = for_each_element(&doc, &FieldPath::new(path), leaf, &mut |e| {
            out.push((e.value.cloned(), e.array_offset));
            ControlFlow::Continue(())
        });
        out
    }

    fn values(doc: Value, path: &str) -> Vec<Option<Value>> {
        walk(doc, path, LeafArrays::Traverse).into_iter().map(|(v, _)| v).collect()
    }

    #[test]
    fn objects_are_followed_and_missing_is_yielded_once() {
        assert_eq!(values(json!({"a": {"b": 1}}), "a.b"), vec![Some(json!(1))]);
        assert_eq!(values(json!({"a": {"c": 1}}), "a.b"), vec![None]);
        assert_eq!(values(json!({"a": 4}), "a.b"), vec![None]);
        assert_eq!(values(json!({}), "a"), vec![None]);
    }

    #[test]
    fn arrays_before_the_end_continue_through_object_elements_only() {
        assert_eq!(values(json!({"a": [{"b": 1}, {"c": 1}]}), "a.b"), vec![Some(json!(1)), None]);
        assert_eq!(values(json!({"a": [1, 2]}), "a.b"), Vec::<Option<Value>>::new());
        assert_eq!(values(json!({"a": []}), "a.b"), Vec::<Option<Value>>::new());
        // Arrays of arrays are not traversed.
        assert_eq!(values(json!({"a": [[{"b": 1}]]}), "a.b"), Vec::<Option<Value>>::new());
    }

    #[test]
    fn an_array_at_the_end_yields_its_elements_then_itself() {
        assert_eq!(
            walk(json!({"a": {"b": [1, [2]]}}), "a.b", LeafArrays::Traverse),
            vec![(Some(json!(1)), Some(0)), (Some(json!([2])), Some(1)), (Some(json!([1, [2]])), None)]
        );
        assert_eq!(walk(json!({"a": [1, 2]}), "a", LeafArrays::Whole), vec![(Some(json!([1, 2])), None)]);
    }

    #[test]
    fn numeric_components_index_arrays_and_name_fields() {
        assert_eq!(values(json!({"a": [5, 6]}), "a.1"), vec![Some(json!(6))]);
        assert_eq!(values(json!({"a": [[7, 8]]}), "a.0.1"), vec![Some(json!(8))]);
        // An object element is looked at both ways: field "0" (missing) and position 0.
        assert_eq!(values(json!({"a": [{"b": 1}]}), "a.0.b"), vec![None, Some(json!(1))]);
        assert_eq!(values(json!({"a": [5]}), "a.01"), Vec::<Option<Value>>::new());
    }

    #[test]
    fn the_offset_is_the_outermost_arrays() {
        let d = json!({"a": [{"b": [1, 2]}, {"b": [3]}]});
        let got = walk(d, "a.b", LeafArrays::Traverse);
        assert_eq!(got[0], (Some(json!(1)), Some(0)));
        assert_eq!(got[1], (Some(json!(2)), Some(0)));
        assert_eq!(got[3], (Some(json!(3)), Some(1)));
    }

    proptest::proptest! {
        /// A [`Root`] walks as the document it stands for would, built.
        #[test]
        fn roots_walk_as_the_documents_they_stand_for(
            v in crate::doc::testgen::arb_value(),
            path in proptest::sample::select(vec!["x", "y", "x.0", "x.1", "x.a", "x.0.a", "x.a.0", "0", "1", "01", "0.0", "1.a", "+1"]),
        ) {
            let walk_in = |root: Root<'_>| {
                let mut out = Vec::new();
                for leaf in [LeafArrays::Traverse, LeafArrays::Whole] {
                    let _ = for_each_element_in(root, &FieldPath::new(path), leaf, &mut |e| {
                        out.push((e.value.cloned(), e.array_offset));
                        ControlFlow::Continue(())
                    });
                }
                out
            };
            let bound = json!({ "x": v });
            proptest::prop_assert_eq!(walk_in(Root::Bound { name: "x", value: &v }), walk_in(Root::Doc(&bound)));
            if let Value::Array(items) = &v {
                let keyed = Value::Object(items.iter().enumerate().map(|(i, e)| (i.to_string(), e.clone())).collect());
                proptest::prop_assert_eq!(walk_in(Root::Positions(items)), walk_in(Root::Doc(&keyed)));
            }
        }
    }

    #[test]
    fn keys_follow_mongodb_key_generation() {
        let k = |d: Value, p: &str| {
            let (keys, multi) = keys(&d, &FieldPath::new(p));
            (keys.into_iter().map(|k| format!("{k:?}")).collect::<Vec<_>>(), multi)
        };
        assert_eq!(k(json!({"a": 1}), "a"), (vec!["Value(Number(1))".into()], false));
        assert_eq!(k(json!({}), "a"), (vec!["Null".into()], false));
        assert_eq!(k(json!({"a": []}), "a"), (vec!["EmptyArray".into()], true));
        // Dotted paths through arrays of objects are multikey.
        let (keys, multi) = k(json!({"a": [{"b": 1}, {"c": 1}]}), "a.b");
        assert!(multi);
        assert_eq!(keys, vec!["Value(Number(1))".to_string(), "Null".into()]);
        assert_eq!(k(json!({"a": [1, {"b": 2}]}), "a.b").0, vec!["Null".to_string(), "Value(Number(2))".into()]);
    }

    #[test]
    fn plain_get_follows_objects_and_indexes() {
        let d = json!({"a": {"b": [10, 20]}});
        assert_eq!(get_plain(&d, "a.b.1"), Some(&json!(20)));
        assert_eq!(get_plain(&d, "a.c"), None);
    }
}
