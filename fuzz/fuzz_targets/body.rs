//! A request body: the gateway's depth scan agrees with the parsed depth, and a parsed body
//! goes through the document checks without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_api::limits::{nesting_depth, text_nesting_depth};
use nimbus_query::doc::validate::check_document;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    assert_eq!(text_nesting_depth(data), nesting_depth(&v), "depth of {v}");
    let _ = check_document(&v);
});
