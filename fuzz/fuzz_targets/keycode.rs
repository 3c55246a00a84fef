//! Two values, as `[a, b]`: their encodings order as the values do (MongoDB's order), in
//! both directions, and equal values encode equally.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_query::doc::keycode::{encode, encode_dir_into};
use nimbus_query::doc::order::compare;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(parts)) = serde_json::from_slice::<Value>(data) else { return };
    let (Some(a), Some(b)) = (parts.first(), parts.get(1)) else { return };
    let by_value = compare(a, b);
    assert_eq!(encode(a).cmp(&encode(b)), by_value, "ascending order of {a} and {b}");
    let (mut da, mut db) = (Vec::new(), Vec::new());
    encode_dir_into(a, true, &mut da);
    encode_dir_into(b, true, &mut db);
    assert_eq!(da.cmp(&db), by_value.reverse(), "descending order of {a} and {b}");
});
