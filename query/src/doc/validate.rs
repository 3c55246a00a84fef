//! Checks on documents before they are proposed: shape, `_id`, field names, size, depth.

use nimbus_api::ApiError;
use nimbus_api::limits::{MAX_DOCUMENT_BYTES, MAX_ID_BYTES, check_depth};
use serde_json::Value;
use serde_json::value::RawValue;

use super::ejson::{Special, special};

/// Checks a document to be stored (after `_id` assignment) and returns its JSON text.
pub fn check_document(doc: &Value) -> Result<Box<RawValue>, ApiError> {
    check_shape(doc)?;
    let text = serde_json::to_string(doc).map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_size(text.len())?;
    RawValue::from_string(text).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Checks a document whose JSON text (`size` bytes) is already at hand.
pub fn check_parsed(doc: &Value, size: usize) -> Result<(), ApiError> {
    check_shape(doc)?;
    check_size(size)
}

fn check_shape(doc: &Value) -> Result<(), ApiError> {
    let Value::Object(map) = doc else {
        return Err(ApiError::bad_request("a document must be a JSON object"));
    };
    check_depth("document", doc)?;
    match map.get("_id") {
        Some(id) => check_id(id)?,
        None => return Err(ApiError::bad_request("document has no _id")),
    }
    check_field_names(doc)
}

fn check_size(size: usize) -> Result<(), ApiError> {
    if size > MAX_DOCUMENT_BYTES {
        return Err(ApiError::too_large(format!("document is {size} bytes; the limit is {MAX_DOCUMENT_BYTES}")));
    }
    Ok(())
}

/// `_id` is a string or a number (`API.md`), or an ObjectId (`{"$oid": "..."}`).
pub fn check_id(id: &Value) -> Result<(), ApiError> {
    match id {
        Value::String(s) if s.len() <= MAX_ID_BYTES => Ok(()),
        Value::String(_) => Err(ApiError::bad_request(format!("_id longer than {MAX_ID_BYTES} bytes"))),
        Value::Number(_) => Ok(()),
        _ if matches!(special(id), Some(Special::ObjectId(_))) => Ok(()),
        _ => Err(ApiError::bad_request("_id must be a string, a number or an ObjectId")),
    }
}

/// Field names are non-empty, do not start with `$` and contain no `.`: either would make
/// the field unreachable by queries. Dates and ObjectIds (canonical Extended JSON, see
/// [`super::ejson`]) are values, not objects with fields.
fn check_field_names(v: &Value) -> Result<(), ApiError> {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(_) if special(v).is_some() => {}
            Value::Object(map) => {
                for (k, child) in map {
                    if k.is_empty() || k.starts_with('$') || k.contains('.') {
                        return Err(ApiError::bad_request(format!(
                            "invalid field name {k:?}: names are non-empty, without '.' and not starting with '$'"
                        )));
                    }
                    stack.push(child);
                }
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_are_checked() {
        assert!(check_document(&json!({"_id": "a", "x": {"y": [1]}})).is_ok());
        assert!(check_document(&json!({"_id": 1.5})).is_ok());
        assert!(
            check_document(
                &json!({"_id": {"$oid": "65f0aaaaaaaaaaaaaaaaaaaa"}, "at": [{"$date": "2024-01-01T00:00:00.000Z"}]})
            )
            .is_ok()
        );
        for bad in [
            json!([1]),
            json!({"_id": {"a": 1}}),
            json!({"_id": null}),
            json!({"_id": 1, "$x": 1}),
            json!({"_id": 1, "a": {"b.c": 1}}),
            json!({"x": 1}),
            json!({"_id": 1, "d": {"$date": "not canonical"}}),
            json!({"_id": {"$date": "2024-01-01T00:00:00.000Z"}}),
        ] {
            assert!(check_document(&bad).is_err(), "{bad}");
        }
        let big = json!({"_id": 1, "s": "x".repeat(MAX_DOCUMENT_BYTES)});
        assert_eq!(check_document(&big).unwrap_err().code, nimbus_api::ErrorCode::TooLarge);
    }
}
