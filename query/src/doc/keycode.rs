//! An order-preserving, self-delimiting byte encoding of JSON values: for any values `a`
//! and `b`, `encode(a).cmp(&encode(b)) == order::compare(a, b)`. Storage keys of
//! documents (`_id`) and of index entries are built from it, so RocksDB's byte order is
//! MongoDB's value order and index range scans are plain key ranges.
//!
//! Each value is a tag byte (ascending with the type bracket) and a payload:
//! - null: nothing
//! - number: the f64 in sign-flipped big-endian form, then the integer remainder
//!   ([`order::number_key`]) as a sign-flipped big-endian i64
//! - string: the bytes with `00` escaped as `00 FF`, then `00 01`
//! - object: per field, the value's tag, the name as a string, the value's payload; then `00`
//! - array: each element with its tag; then `00`
//! - ObjectId: its 12 bytes
//! - bool: `00` or `01`
//! - date: the milliseconds as a sign-flipped big-endian i64
//!
//! Descending index fields store the bitwise complement of the encoding; since every
//! encoding is self-delimiting (no encoding is a prefix of another), the complement sorts in
//! exactly the reverse order.

use serde_json::Value;

use super::ejson::{Special, special};
use super::order::{Bracket, bracket, number_key};

pub const TAG_NULL: u8 = 0x0A;
pub const TAG_NUMBER: u8 = 0x14;
pub const TAG_STRING: u8 = 0x1E;
pub const TAG_OBJECT: u8 = 0x28;
pub const TAG_ARRAY: u8 = 0x32;
pub const TAG_OBJECT_ID: u8 = 0x46;
pub const TAG_BOOL: u8 = 0x50;
pub const TAG_DATE: u8 = 0x5A;
const END: u8 = 0x00;

/// The tag byte of a bracket; the first byte of the encoding of every value in it.
pub fn tag(b: Bracket) -> u8 {
    match b {
        Bracket::Null => TAG_NULL,
        Bracket::Number => TAG_NUMBER,
        Bracket::String => TAG_STRING,
        Bracket::Object => TAG_OBJECT,
        Bracket::Array => TAG_ARRAY,
        Bracket::ObjectId => TAG_OBJECT_ID,
        Bracket::Bool => TAG_BOOL,
        Bracket::Date => TAG_DATE,
    }
}

/// Appends the encoding of `v` to `out`.
pub fn encode_into(v: &Value, out: &mut Vec<u8>) {
    out.push(tag(bracket(v)));
    encode_payload(v, out);
}

pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    encode_into(v, &mut out);
    out
}

/// Appends the encoding of `v`, complemented when `descending`.
pub fn encode_dir_into(v: &Value, descending: bool, out: &mut Vec<u8>) {
    let start = out.len();
    encode_into(v, out);
    if descending {
        for b in &mut out[start..] {
            *b = !*b;
        }
    }
}

fn encode_payload(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => {}
        Value::Number(n) => {
            let (f, rem) = number_key(n);
            let bits = f.to_bits();
            let ordered = if bits >> 63 == 1 { !bits } else { bits ^ (1 << 63) };
            out.extend_from_slice(&ordered.to_be_bytes());
            out.extend_from_slice(&((rem as u64) ^ (1 << 63)).to_be_bytes());
        }
        Value::String(s) => encode_str(s, out),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Array(items) => {
            for item in items {
                encode_into(item, out);
            }
            out.push(END);
        }
        Value::Object(map) => match special(v) {
            Some(Special::Date(ms)) => out.extend_from_slice(&((ms as u64) ^ (1 << 63)).to_be_bytes()),
            Some(Special::ObjectId(hex)) => {
                for pair in hex.as_bytes().chunks(2) {
                    out.push((nibble(pair[0]) << 4) | nibble(pair[1]));
                }
            }
            None => {
                for (k, item) in map {
                    out.push(tag(bracket(item)));
                    encode_str(k, out);
                    encode_payload(item, out);
                }
                out.push(END);
            }
        },
    }
}

/// The value of a lower-case hex digit (a canonical ObjectId holds nothing else).
fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c.wrapping_sub(b'a').wrapping_add(10) & 0x0F,
    }
}

/// A string, escaped and terminated so that it sorts by its bytes and delimits itself.
pub fn encode_str(s: &str, out: &mut Vec<u8>) {
    for &b in s.as_bytes() {
        if b == 0 {
            out.extend_from_slice(&[0x00, 0xFF]);
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

/// The smallest byte string greater than every encoding that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::order::compare;
    use super::super::testgen::arb_value;
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn byte_order_is_value_order(a in arb_value(), b in arb_value()) {
            prop_assert_eq!(encode(&a).cmp(&encode(&b)), compare(&a, &b), "{} vs {}", a, b);
        }

        #[test]
        fn descending_reverses_the_order(a in arb_value(), b in arb_value()) {
            let (mut ea, mut eb) = (vec![], vec![]);
            encode_dir_into(&a, true, &mut ea);
            encode_dir_into(&b, true, &mut eb);
            prop_assert_eq!(ea.cmp(&eb), compare(&b, &a));
        }

        #[test]
        fn compound_keys_order_field_by_field(a in arb_value(), b in arb_value(), c in arb_value(), d in arb_value()) {
            let mut x = encode(&a); encode_into(&b, &mut x);
            let mut y = encode(&c); encode_into(&d, &mut y);
            prop_assert_eq!(x.cmp(&y), compare(&a, &c).then(compare(&b, &d)));
        }
    }

    #[test]
    fn equal_numbers_encode_equal() {
        assert_eq!(encode(&json!(1)), encode(&json!(1.0)));
        assert_eq!(encode(&json!(-0.0)), encode(&json!(0)));
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF]), None);
    }
}
