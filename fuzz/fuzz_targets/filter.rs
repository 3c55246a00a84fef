//! A filter and a document, as a JSON array `[filter, document]`: parsing never panics, and
//! a filter that parses evaluates on any document without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_query::query::Filter;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(parts)) = serde_json::from_slice::<Value>(data) else { return };
    let (Some(filter), doc) = (parts.first(), parts.get(1).cloned().unwrap_or(Value::Null)) else { return };
    if let Ok(f) = Filter::parse(Some(filter)) {
        let _ = f.matches(&doc);
        let _ = f.shape();
    }
});
