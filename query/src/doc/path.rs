//! Dotted paths into documents, with MongoDB's array traversal: `a.b` reaches `b` in `a`
//! when `a` is an object, and in every object element when `a` is an array; a numeric
//! component also indexes into an array.

use serde_json::Value;

/// Every value found at `path` in `root`. Empty when the path reaches nothing (missing).
pub fn lookup<'a>(root: &'a Value, path: &str) -> Vec<&'a Value> {
    let parts: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    walk(root, &parts, &mut out);
    out
}

fn walk<'a>(v: &'a Value, parts: &[&str], out: &mut Vec<&'a Value>) {
    let Some((first, rest)) = parts.split_first() else {
        out.push(v);
        return;
    };
    match v {
        Value::Object(map) => {
            if let Some(child) = map.get(*first) {
                walk(child, rest, out);
            }
        }
        Value::Array(items) => {
            if let Ok(i) = first.parse::<usize>()
                && let Some(child) = items.get(i)
            {
                walk(child, rest, out);
            }
            for item in items {
                if item.is_object() {
                    walk(item, parts, out);
                }
            }
        }
        _ => {}
    }
}

/// The values a query predicate sees at `path`: each value found, and the elements of each
/// array found (so `{tags: "x"}` matches `{tags: ["x", "y"]}`).
pub fn candidates<'a>(root: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut out = Vec::new();
    for v in lookup(root, path) {
        out.push(v);
        if let Value::Array(items) = v {
            out.extend(items.iter());
        }
    }
    out
}

/// The single value at a plain path (objects only, no array traversal), for updates and
/// projections.
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

    #[test]
    fn lookup_traverses_arrays_of_objects() {
        let d = json!({"a": [{"b": 1}, {"b": [2, 3]}, 4], "c": {"d": null}});
        assert_eq!(lookup(&d, "a.b"), vec![&json!(1), &json!([2, 3])]);
        assert_eq!(candidates(&d, "a.b"), vec![&json!(1), &json!([2, 3]), &json!(2), &json!(3)]);
        assert_eq!(lookup(&d, "a.2"), vec![&json!(4)]);
        assert_eq!(lookup(&d, "c.d"), vec![&json!(null)]);
        assert!(lookup(&d, "c.e").is_empty());
        assert!(lookup(&d, "x.y").is_empty());
    }

    #[test]
    fn plain_get_follows_objects_and_indexes() {
        let d = json!({"a": {"b": [10, 20]}});
        assert_eq!(get_plain(&d, "a.b.1"), Some(&json!(20)));
        assert_eq!(get_plain(&d, "a.c"), None);
    }
}
