//! An update and a document, as `[update, document]`: parsing and applying never panic,
//! and an update that applies never changes `_id` nor yields a document the storage checks
//! would panic on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_query::doc::validate::check_document;
use nimbus_query::query::Update;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(parts)) = serde_json::from_slice::<Value>(data) else { return };
    let (Some(update), Some(doc)) = (parts.first(), parts.get(1)) else { return };
    let Ok(u) = Update::parse(update) else { return };
    if let Ok(new) = u.apply(doc) {
        if doc.get("_id").is_some() {
            assert_eq!(new.get("_id"), doc.get("_id"), "an update changed _id");
        }
        let _ = check_document(&new);
    }
});
