//! MongoDB Extended JSON (v2) for the types a JSON client needs beyond JSON's own: dates
//! and ObjectIds as values of their own type (compared, sorted and indexed as such), and
//! 64-bit integers written as `$numberLong`.
//!
//! Input is normalised once, at the edge, into one canonical stored form:
//!
//! | input | stored and answered as |
//! | --- | --- |
//! | `{"$date": "2024-05-01T12:00:00+02:00"}`, `{"$date": 1714557600000}`, `{"$date": {"$numberLong": "..."}}` | `{"$date": "2024-05-01T10:00:00.000Z"}` (years 1970 to 9999), else `{"$date": {"$numberLong": "<ms>"}}` |
//! | `{"$oid": "65F0..."}` | `{"$oid": "65f0..."}` (24 lower-case hex digits) |
//! | `{"$numberLong": "42"}`, `{"$numberInt": "42"}` | `42` |
//! | `{"$numberDouble": "1.5"}` | `1.5` (finite values only: JSON has no NaN or infinity) |
//!
//! Refused with a message: `$numberDecimal` (the engine has no exact decimal arithmetic or
//! order; a decimal stored as a double would compare and sum wrongly), and the BSON types
//! without a use in a JSON API (`$binary`, `$timestamp`, `$regularExpression` in documents,
//! `$minKey`, `$maxKey`, `$symbol`, `$code`, `$dbPointer`, `$undefined`).

use serde_json::{Map, Number, Value};

/// A value of a type beyond JSON's, in its canonical stored form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special<'a> {
    /// Milliseconds since the Unix epoch.
    Date(i64),
    /// 24 lower-case hex digits.
    ObjectId(&'a str),
}

/// Recognises a canonical date or ObjectId. Cheap on ordinary objects: one length check
/// and one byte.
pub fn special(v: &Value) -> Option<Special<'_>> {
    let Value::Object(m) = v else { return None };
    if m.len() != 1 {
        return None;
    }
    let (k, inner) = m.iter().next()?;
    if !k.starts_with('$') {
        return None;
    }
    match (k.as_str(), inner) {
        ("$date", Value::String(s)) => parse_canonical_iso(s).map(Special::Date),
        ("$date", Value::Object(n)) => match n.get("$numberLong") {
            Some(Value::String(s)) if n.len() == 1 => s.parse().ok().map(Special::Date),
            _ => None,
        },
        ("$oid", Value::String(s)) if is_canonical_oid(s) => Some(Special::ObjectId(s)),
        _ => None,
    }
}

/// The canonical value of a date.
pub fn date(ms: i64) -> Value {
    let inner = match format_canonical_iso(ms) {
        Some(s) => Value::String(s),
        None => {
            let mut n = Map::new();
            n.insert("$numberLong".into(), Value::String(ms.to_string()));
            Value::Object(n)
        }
    };
    let mut m = Map::new();
    m.insert("$date".into(), inner);
    Value::Object(m)
}

fn is_canonical_oid(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The Extended JSON wrapper an object is, if it is one: a single field whose name is one
/// of the wrappers of the spec.
pub fn wrapper_name(m: &Map<String, Value>) -> Option<&str> {
    if m.len() != 1 {
        return None;
    }
    let k = m.keys().next()?;
    WRAPPERS.contains(&k.as_str()).then_some(k.as_str())
}

const WRAPPERS: [&str; 15] = [
    "$date",
    "$oid",
    "$numberLong",
    "$numberInt",
    "$numberDouble",
    "$numberDecimal",
    "$binary",
    "$timestamp",
    "$regularExpression",
    "$minKey",
    "$maxKey",
    "$symbol",
    "$code",
    "$dbPointer",
    "$undefined",
];

/// Rewrites every Extended JSON wrapper in `v` into its canonical form, refusing the
/// unsupported and malformed ones. Other objects are left as they are (a document's
/// field names are checked elsewhere).
pub fn normalize(v: &mut Value) -> Result<(), String> {
    match v {
        Value::Object(m) => {
            if let Some(name) = wrapper_name(m) {
                let name = name.to_owned();
                *v = canonical(&name, &m[&name])?;
                return Ok(());
            }
            for child in m.values_mut() {
                normalize(child)?;
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(normalize),
        _ => Ok(()),
    }
}

/// `v` normalised, as a new value.
pub fn normalized(v: &Value) -> Result<Value, String> {
    let mut out = v.clone();
    normalize(&mut out)?;
    Ok(out)
}

fn canonical(name: &str, arg: &Value) -> Result<Value, String> {
    match name {
        "$date" => parse_date_arg(arg).map(date),
        "$oid" => match arg {
            Value::String(s) if s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                let mut m = Map::new();
                m.insert("$oid".into(), Value::String(s.to_ascii_lowercase()));
                Ok(Value::Object(m))
            }
            _ => Err("$oid must be a string of 24 hex digits".into()),
        },
        "$numberLong" | "$numberInt" => match arg {
            Value::String(s) => {
                let n: i64 = s.parse().map_err(|_| format!("{name} must be a decimal integer string, not {s:?}"))?;
                if name == "$numberInt" && i32::try_from(n).is_err() {
                    return Err(format!("$numberInt {s} is out of the 32-bit range"));
                }
                Ok(Value::Number(n.into()))
            }
            _ => Err(format!("{name} must be a string such as \"42\"")),
        },
        "$numberDouble" => match arg {
            Value::String(s) => s
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("$numberDouble {s:?} is not a finite number (JSON has no NaN or infinity)")),
            _ => Err("$numberDouble must be a string such as \"1.5\"".into()),
        },
        "$numberDecimal" => Err("$numberDecimal is not supported: store the value as a number or a string".into()),
        other => Err(format!("the Extended JSON type {other} is not supported")),
    }
}

/// A `$date`'s argument: an RFC 3339 / ISO 8601 string, milliseconds as a number, or
/// `{"$numberLong": "<ms>"}`.
fn parse_date_arg(arg: &Value) -> Result<i64, String> {
    match arg {
        Value::String(s) => {
            if let Some(ms) = parse_canonical_iso(s) {
                return Ok(ms);
            }
            let ts: jiff::Timestamp =
                s.parse().map_err(|e| format!("$date {s:?} is not an ISO 8601 date-time with a time zone: {e}"))?;
            Ok(ts.as_millisecond())
        }
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18).map(|f| f as i64))
            .ok_or_else(|| format!("$date {n} is not a whole number of milliseconds")),
        Value::Object(m) if m.len() == 1 => match m.get("$numberLong") {
            Some(Value::String(s)) => s.parse().map_err(|_| format!("$date's $numberLong {s:?} is not an integer")),
            _ => Err("$date needs a string, a number or {\"$numberLong\": \"<ms>\"}".into()),
        },
        _ => Err("$date needs a string, a number or {\"$numberLong\": \"<ms>\"}".into()),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DDTHH:MM:SS.sssZ` for years 1970 to 9999 (the relaxed form of the spec).
fn format_canonical_iso(ms: i64) -> Option<String> {
    // 1970-01-01 to 9999-12-31T23:59:59.999Z
    if !(0..=253_402_300_799_999).contains(&ms) {
        return None;
    }
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    Some(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z"))
}

/// Parses exactly the canonical form (fast: dates are compared often).
fn parse_canonical_iso(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |acc, c| c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0')))
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec, milli) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let ms = days_from_civil(y, mo, d) * 86_400_000 + h * 3_600_000 + mi * 60_000 + sec * 1000 + milli;
    (ms >= 0).then_some(ms)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn dates_normalise_to_one_form() {
        let want = json!({"$date": "2024-05-01T10:00:00.000Z"});
        for input in [
            json!({"$date": "2024-05-01T12:00:00+02:00"}),
            json!({"$date": "2024-05-01T10:00:00Z"}),
            json!({"$date": 1714557600000i64}),
            json!({"$date": {"$numberLong": "1714557600000"}}),
        ] {
            assert_eq!(normalized(&input).unwrap(), want, "{input}");
        }
        assert_eq!(special(&want), Some(Special::Date(1_714_557_600_000)));
        assert_eq!(normalized(&json!({"$date": -1})).unwrap(), json!({"$date": {"$numberLong": "-1"}}));
        assert_eq!(special(&json!({"$date": {"$numberLong": "-1"}})), Some(Special::Date(-1)));
    }

    #[test]
    fn numbers_and_ids_normalise() {
        assert_eq!(
            normalized(&json!({"a": {"$numberLong": "9007199254740993"}})).unwrap(),
            json!({"a": 9007199254740993i64})
        );
        assert_eq!(normalized(&json!([{"$numberInt": "-5"}])).unwrap(), json!([-5]));
        assert_eq!(normalized(&json!({"$numberDouble": "1.5"})).unwrap(), json!(1.5));
        assert_eq!(
            normalized(&json!({"$oid": "65F0AAAAAAAAAAAAAAAAAAAA"})).unwrap(),
            json!({"$oid": "65f0aaaaaaaaaaaaaaaaaaaa"})
        );
    }

    #[test]
    fn unsupported_and_malformed_wrappers_are_refused() {
        for bad in [
            json!({"$numberDecimal": "1.1"}),
            json!({"$numberDouble": "NaN"}),
            json!({"$numberInt": "3000000000"}),
            json!({"$numberLong": 5}),
            json!({"$oid": "xyz"}),
            json!({"$date": "yesterday"}),
            json!({"$date": "2024-05-01T10:00:00"}),
            json!({"$date": 1.5}),
            json!({"$binary": {"base64": "", "subType": "00"}}),
            json!({"a": [{"$timestamp": {"t": 1, "i": 1}}]}),
        ] {
            assert!(normalized(&bad).is_err(), "{bad}");
        }
        // Not wrappers: left for the document checks (or the query parser) to judge.
        assert_eq!(normalized(&json!({"$date": 1, "x": 2})).unwrap(), json!({"$date": 1, "x": 2}));
        assert_eq!(normalized(&json!({"$gt": 1})).unwrap(), json!({"$gt": 1}));
    }

    #[test]
    fn the_canonical_parser_refuses_impossible_dates() {
        assert!(parse_canonical_iso("2023-02-29T00:00:00.000Z").is_none());
        assert!(parse_canonical_iso("2024-02-29T00:00:00.000Z").is_some());
        assert!(parse_canonical_iso("2024-13-01T00:00:00.000Z").is_none());
        assert!(parse_canonical_iso("2024-01-01T24:00:00.000Z").is_none());
    }

    proptest! {
        #[test]
        fn canonical_dates_round_trip(ms in -62_135_596_800_000i64..253_402_300_799_999) {
            let v = date(ms);
            prop_assert_eq!(special(&v), Some(Special::Date(ms)));
            prop_assert_eq!(normalized(&v).unwrap(), v.clone());
            if let Some(iso) = format_canonical_iso(ms) {
                let ts: jiff::Timestamp = iso.parse().unwrap();
                prop_assert_eq!(ts.as_millisecond(), ms);
            }
        }
    }
}
