//! An update, a document, and optionally array filters and a query filter, as
//! `[update, document, arrayFilters?, filter?]`: parsing and applying never panic (the
//! positional `$` gets the offset the filter reports), an update that applies never changes
//! `_id` nor yields a document the storage checks would panic on, and an upsert document
//! built from the filter is applied the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_query::doc::validate::check_document;
use nimbus_query::query::update::ApplyCtx;
use nimbus_query::query::{Filter, Update};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(parts)) = serde_json::from_slice::<Value>(data) else { return };
    let (Some(update), Some(doc)) = (parts.first(), parts.get(1)) else { return };
    let Ok(u) = Update::parse_with_array_filters(update, parts.get(2)) else { return };
    let filter = parts.get(3).and_then(|f| Filter::parse(Some(f)).ok());
    let positional = filter.as_ref().and_then(|f| f.eval(doc)).flatten();
    let ctx = ApplyCtx { now_ms: 1_700_000_000_000, inserting: false, positional };
    if let Ok(new) = u.apply(doc, &ctx) {
        if doc.get("_id").is_some() {
            assert_eq!(new.get("_id"), doc.get("_id"), "an update changed _id");
        }
        let _ = check_document(&new);
    }
    if let Some(f) = filter {
        if let Ok(new) = u.upsert_document(&f, &Value::from("fuzz"), &ctx) {
            let _ = check_document(&new);
        }
    }
});
