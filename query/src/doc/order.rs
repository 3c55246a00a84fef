//! MongoDB's comparison order for the BSON types a JSON document can hold: null < numbers <
//! strings < objects < arrays < ObjectIds < booleans < dates, numbers compared by value
//! whatever their representation. Dates and ObjectIds are the canonical Extended JSON
//! objects of [`super::ejson`].

use std::cmp::Ordering;

use serde_json::{Number, Value};

use super::ejson::{Special, special};

/// The type bracket of a value: values of different brackets compare by bracket alone, and
/// range operators (`$gt`, ...) only match values of the operand's bracket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bracket {
    Null = 1,
    Number = 2,
    String = 3,
    Object = 4,
    Array = 5,
    ObjectId = 7,
    Bool = 8,
    Date = 9,
}

pub fn bracket(v: &Value) -> Bracket {
    match v {
        Value::Null => Bracket::Null,
        Value::Number(_) => Bracket::Number,
        Value::String(_) => Bracket::String,
        Value::Object(_) => match special(v) {
            Some(Special::Date(_)) => Bracket::Date,
            Some(Special::ObjectId(_)) => Bracket::ObjectId,
            None => Bracket::Object,
        },
        Value::Array(_) => Bracket::Array,
        Value::Bool(_) => Bracket::Bool,
    }
}

/// A number as a totally ordered pair: its nearest f64 and, for integers that an f64
/// cannot hold exactly, the remainder. `1`, `1.0` and `1e0` all give `(1.0, 0)`.
pub fn number_key(n: &Number) -> (f64, i64) {
    fn norm(f: f64) -> f64 {
        if f == 0.0 { 0.0 } else { f }
    }
    if let Some(i) = n.as_i64() {
        let f = i as f64;
        (norm(f), clamp_i64(i as i128 - f as i128))
    } else if let Some(u) = n.as_u64() {
        let f = u as f64;
        (norm(f), clamp_i64(u as i128 - f as i128))
    } else {
        // serde_json only makes finite floats.
        (norm(n.as_f64().unwrap_or(0.0)), 0)
    }
}

fn clamp_i64(x: i128) -> i64 {
    x.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

pub fn compare_numbers(a: &Number, b: &Number) -> Ordering {
    let (fa, ra) = number_key(a);
    let (fb, rb) = number_key(b);
    fa.total_cmp(&fb).then(ra.cmp(&rb))
}

/// Total order of values, as MongoDB sorts them.
pub fn compare(a: &Value, b: &Value) -> Ordering {
    let (ba, bb) = (bracket(a), bracket(b));
    if ba != bb {
        return ba.cmp(&bb);
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y),
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => {
            for (ex, ey) in x.iter().zip(y) {
                let o = compare(ex, ey);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Object(_), Value::Object(_)) if ba != Bracket::Object => match (special(a), special(b)) {
            (Some(Special::Date(x)), Some(Special::Date(y))) => x.cmp(&y),
            (Some(Special::ObjectId(x)), Some(Special::ObjectId(y))) => x.cmp(y),
            _ => Ordering::Equal, // unreachable: same bracket, so same special type
        },
        (Value::Object(x), Value::Object(y)) => {
            for ((kx, vx), (ky, vy)) in x.iter().zip(y) {
                let o = bracket(vx)
                    .cmp(&bracket(vy))
                    .then_with(|| kx.as_bytes().cmp(ky.as_bytes()))
                    .then_with(|| compare(vx, vy));
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        _ => Ordering::Equal, // both null
    }
}

/// Equality as queries see it: `1 == 1.0`, objects equal only with fields in the same order.
pub fn values_equal(a: &Value, b: &Value) -> bool {
    compare(a, b) == Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn brackets_order_across_types() {
        let ordered = [
            json!(null),
            json!(-5),
            json!(2.5),
            json!(""),
            json!("a"),
            json!({}),
            json!([]),
            json!({"$oid": "000000000000000000000000"}),
            json!(false),
            json!(true),
            json!({"$date": {"$numberLong": "-1"}}),
            json!({"$date": "1970-01-01T00:00:00.000Z"}),
        ];
        for w in ordered.windows(2) {
            assert_eq!(compare(&w[0], &w[1]), Ordering::Less, "{} < {}", w[0], w[1]);
        }
    }

    #[test]
    fn numbers_compare_by_value() {
        assert_eq!(compare(&json!(1), &json!(1.0)), Ordering::Equal);
        assert_eq!(compare(&json!(-0.0), &json!(0)), Ordering::Equal);
        assert_eq!(compare(&json!(9007199254740993u64), &json!(9007199254740992u64)), Ordering::Greater);
        assert_eq!(compare(&json!(9007199254740993i64), &json!(9007199254740994.0)), Ordering::Less);
        assert_eq!(compare(&json!(u64::MAX), &json!(i64::MAX)), Ordering::Greater);
    }

    #[test]
    fn objects_compare_pair_by_pair() {
        assert_eq!(compare(&json!({"a": 1}), &json!({"a": 1, "b": 0})), Ordering::Less);
        assert_eq!(compare(&json!({"a": 1}), &json!({"b": 0})), Ordering::Less);
        // The value's type bracket decides before the field name.
        assert_eq!(compare(&json!({"b": 1}), &json!({"a": "x"})), Ordering::Less);
    }
}
