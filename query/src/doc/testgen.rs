//! Generators of JSON values for property tests.

use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON value, nested up to three levels, biased towards small numbers and short
/// strings (including NUL bytes) so that equal and near-equal values are common.
pub fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-3i64..3).prop_map(|i| json!(i)),
        any::<u64>().prop_map(|u| json!(u)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        (-3i64..3).prop_map(|i| json!(i as f64 + 0.5)),
        "[a-c\u{0}]{0,3}".prop_map(Value::String),
        (-3i64..3).prop_map(|d| super::ejson::date(d * 86_400_000)),
        any::<i64>().prop_map(super::ejson::date),
        "[0-9a-f]{24}".prop_map(|h| json!({ "$oid": h })),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec(("[ab$.\u{0}]{0,2}", inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}
