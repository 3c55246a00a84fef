//! A projection and a document, as `[projection, document]`: parsing and applying never
//! panic, and the result is an object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_query::query::Projection;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(parts)) = serde_json::from_slice::<Value>(data) else { return };
    let (Some(projection), Some(doc @ Value::Object(_))) = (parts.first(), parts.get(1)) else { return };
    if let Ok(Some(p)) = Projection::parse(Some(projection)) {
        assert!(p.apply(doc).is_object());
    }
});
