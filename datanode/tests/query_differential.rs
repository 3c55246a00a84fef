//! A differential test of the query engine: random documents, filters and sorts run
//! through the real engine (RocksDB, planner, index scans) with several index layouts, and
//! through a small reference evaluator written independently here. They must agree.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::cmp::Ordering;

use nimbus_api::data::FindRequest;
use nimbus_datanode::store::catalog::IndexSpec;
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::read::FindQuery;
use nimbus_datanode::store::{Command, Engine, WriteOp};
use proptest::prelude::*;
use serde_json::{Value, json};

/// The reference model of a field value.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Int(i64),
    Str(String),
    Arr(Vec<i64>),
}

impl V {
    fn json(&self) -> Value {
        match self {
            V::Int(i) => json!(i),
            V::Str(s) => json!(s),
            V::Arr(a) => json!(a),
        }
    }
}

#[derive(Debug, Clone)]
struct Doc {
    id: i64,
    a: Option<V>,
    b: Option<i64>,
}

/// A scalar operand: ints and strings.
#[derive(Debug, Clone, PartialEq)]
enum S {
    Int(i64),
    Str(String),
}

impl S {
    fn json(&self) -> Value {
        match self {
            S::Int(i) => json!(i),
            S::Str(s) => json!(s),
        }
    }
}

#[derive(Debug, Clone)]
enum F {
    All,
    Eq(&'static str, S),
    Ne(&'static str, S),
    Gt(&'static str, S),
    Lte(&'static str, S),
    Between(&'static str, i64, i64),
    In(&'static str, Vec<S>),
    Exists(&'static str, bool),
    And(Box<F>, Box<F>),
    Or(Box<F>, Box<F>),
}

impl F {
    fn json(&self) -> Value {
        match self {
            F::All => json!({}),
            F::Eq(f, v) => json!({ *f: v.json() }),
            F::Ne(f, v) => json!({ *f: {"$ne": v.json()} }),
            F::Gt(f, v) => json!({ *f: {"$gt": v.json()} }),
            F::Lte(f, v) => json!({ *f: {"$lte": v.json()} }),
            F::Between(f, lo, hi) => json!({ *f: {"$gte": lo, "$lt": hi} }),
            F::In(f, vs) => json!({ *f: {"$in": vs.iter().map(S::json).collect::<Vec<_>>()} }),
            F::Exists(f, e) => json!({ *f: {"$exists": e} }),
            F::And(x, y) => json!({"$and": [x.json(), y.json()]}),
            F::Or(x, y) => json!({"$or": [x.json(), y.json()]}),
        }
    }
}

/// The scalars a predicate sees in a field: the value, or each element of an array.
fn scalars(d: &Doc, field: &str) -> Option<Vec<S>> {
    match field {
        "a" => d.a.as_ref().map(|v| match v {
            V::Int(i) => vec![S::Int(*i)],
            V::Str(s) => vec![S::Str(s.clone())],
            V::Arr(a) => a.iter().map(|i| S::Int(*i)).collect(),
        }),
        _ => d.b.map(|b| vec![S::Int(b)]),
    }
}

fn cmp_same_type(x: &S, y: &S) -> Option<Ordering> {
    match (x, y) {
        (S::Int(a), S::Int(b)) => Some(a.cmp(b)),
        (S::Str(a), S::Str(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

fn eval(f: &F, d: &Doc) -> bool {
    let any = |field: &str, p: &dyn Fn(&S) -> bool| scalars(d, field).is_some_and(|vs| vs.iter().any(p));
    match f {
        F::All => true,
        F::Eq(field, v) => any(field, &|s| s == v),
        F::Ne(field, v) => !any(field, &|s| s == v),
        F::Gt(field, v) => any(field, &|s| cmp_same_type(s, v) == Some(Ordering::Greater)),
        F::Lte(field, v) => any(field, &|s| matches!(cmp_same_type(s, v), Some(Ordering::Less | Ordering::Equal))),
        // Each bound may be met by a different element of an array (MongoDB's semantics).
        F::Between(field, lo, hi) => {
            any(field, &|s| matches!(s, S::Int(i) if i >= lo)) && any(field, &|s| matches!(s, S::Int(i) if i < hi))
        }
        F::In(field, vs) => any(field, &|s| vs.contains(s)),
        F::Exists(field, e) => scalars(d, field).is_some() == *e,
        F::And(x, y) => eval(x, d) && eval(y, d),
        F::Or(x, y) => eval(x, d) || eval(y, d),
    }
}

/// Sort rank of a field: missing < ints < strings; arrays by their smallest element
/// ascending and largest descending.
fn sort_key(d: &Doc, desc: bool) -> (u8, i64, String) {
    match &d.a {
        None => (0, 0, String::new()),
        Some(V::Int(i)) => (1, *i, String::new()),
        Some(V::Str(s)) => (2, 0, s.clone()),
        Some(V::Arr(a)) if a.is_empty() => (0, 0, String::new()),
        Some(V::Arr(a)) => {
            (1, if desc { *a.iter().max().unwrap_or(&0) } else { *a.iter().min().unwrap_or(&0) }, String::new())
        }
    }
}

fn arb_v() -> impl Strategy<Value = V> {
    prop_oneof![
        4 => (0i64..6).prop_map(V::Int),
        2 => (0..3).prop_map(|i| V::Str(format!("s{i}"))),
        1 => prop::collection::vec(0i64..6, 0..3).prop_map(V::Arr),
    ]
}

fn arb_s() -> impl Strategy<Value = S> {
    prop_oneof![4 => (0i64..6).prop_map(S::Int), 1 => (0..3).prop_map(|i| S::Str(format!("s{i}")))]
}

fn arb_field() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("a"), Just("b")]
}

fn arb_f() -> impl Strategy<Value = F> {
    let leaf = prop_oneof![
        Just(F::All),
        (arb_field(), arb_s()).prop_map(|(f, v)| F::Eq(f, v)),
        (arb_field(), arb_s()).prop_map(|(f, v)| F::Ne(f, v)),
        (arb_field(), arb_s()).prop_map(|(f, v)| F::Gt(f, v)),
        (arb_field(), arb_s()).prop_map(|(f, v)| F::Lte(f, v)),
        (arb_field(), 0i64..6, 0i64..6).prop_map(|(f, lo, hi)| F::Between(f, lo, hi)),
        (arb_field(), prop::collection::vec(arb_s(), 1..4)).prop_map(|(f, v)| F::In(f, v)),
        (arb_field(), any::<bool>()).prop_map(|(f, e)| F::Exists(f, e)),
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(x, y)| F::And(Box::new(x), Box::new(y))),
            (inner.clone(), inner).prop_map(|(x, y)| F::Or(Box::new(x), Box::new(y))),
        ]
    })
}

fn arb_docs() -> impl Strategy<Value = Vec<Doc>> {
    prop::collection::vec((prop::option::weighted(0.85, arb_v()), prop::option::weighted(0.7, 0i64..4)), 0..40)
        .prop_map(|v| v.into_iter().enumerate().map(|(i, (a, b))| Doc { id: i as i64, a, b }).collect())
}

fn command(op: WriteOp) -> Command {
    Command { db: "d".into(), op, idempotency_key: None, ts_ms: 1, route_epoch: None, request_hash: None }
}

fn apply(engine: &Engine, index: u64, op: WriteOp) {
    let mut batch = rocksdb::WriteBatch::default();
    let (result, delta) = engine.apply_command(&mut batch, &command(op), index).expect("apply");
    result.expect("command accepted");
    engine.write_batch_for_tests(batch);
    engine.install_delta(delta);
}

fn index(name: &str, fields: &[(&str, bool)]) -> IndexSpec {
    IndexSpec {
        name: name.into(),
        fields: fields.iter().map(|(f, d)| (f.to_string(), *d)).collect(),
        unique: false,
        auto: false,
        multikey: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_agrees_with_the_reference_evaluator(
        docs in arb_docs(),
        queries in prop::collection::vec((arb_f(), prop::option::of(any::<bool>()), prop::option::of(1u64..10)), 1..6),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let layouts: [&[IndexSpec]; 3] = [&[], &[index("a", &[("a", false)])], &[index("ab", &[("a", true), ("b", false)]), index("ba", &[("b", false), ("a", false)])]];
        for (li, layout) in layouts.iter().enumerate() {
            let engine = Engine::open(&dir.path().join(li.to_string()), EngineOptions::default()).expect("open");
            let mut n = 1;
            for spec in layout.iter() {
                apply(&engine, n, WriteOp::CreateIndex { coll: "c".into(), spec: spec.clone() });
                n += 1;
            }
            if !docs.is_empty() {
                let jdocs: Vec<Value> = docs.iter().map(|d| {
                    let mut m = serde_json::Map::new();
                    m.insert("_id".into(), json!(d.id));
                    if let Some(a) = &d.a { m.insert("a".into(), a.json()); }
                    if let Some(b) = d.b { m.insert("b".into(), json!(b)); }
                    Value::Object(m)
                }).collect();
                let docs = jdocs.iter().map(|d| serde_json::value::to_raw_value(d).unwrap()).collect();
                apply(&engine, n, WriteOp::Insert { coll: "c".into(), docs });
            }
            for (f, sort, limit) in &queries {
                let mut expected: Vec<&Doc> = docs.iter().filter(|d| eval(f, d)).collect();
                let sort_json = match sort {
                    Some(desc) => {
                        expected.sort_by(|x, y| {
                            let o = sort_key(x, *desc).cmp(&sort_key(y, *desc));
                            (if *desc { o.reverse() } else { o }).then(x.id.cmp(&y.id))
                        });
                        Some(json!({"a": if *desc { -1 } else { 1 }, "_id": 1}))
                    }
                    None => None,
                };
                let req = FindRequest { filter: Some(f.json()), sort: sort_json, limit: *limit, ..Default::default() };
                let q = FindQuery::parse(&req).expect("valid query");
                let got: Vec<i64> = engine.find("d", "c", &q).expect("find").iter().map(|d| d["_id"].as_i64().expect("int id")).collect();
                let mut want: Vec<i64> = expected.iter().map(|d| d.id).collect();
                if sort.is_none() {
                    // Unsorted results come in some order; with a limit, any `limit` of them.
                    let mut got_sorted = got.clone();
                    got_sorted.sort();
                    want.sort();
                    match limit {
                        Some(l) => {
                            prop_assert_eq!(got.len(), want.len().min(*l as usize), "layout {} filter {}", li, f.json());
                            prop_assert!(got_sorted.iter().all(|g| want.contains(g)), "layout {} filter {}", li, f.json());
                        }
                        None => prop_assert_eq!(got_sorted, want, "layout {} filter {}", li, f.json()),
                    }
                } else {
                    if let Some(l) = limit { want.truncate(*l as usize); }
                    prop_assert_eq!(got, want, "layout {} filter {} sort {:?}", li, f.json(), sort);
                }
                let count = engine.count("d", "c", &nimbus_datanode::query::Filter::parse(Some(&f.json())).expect("filter")).expect("count");
                prop_assert_eq!(count as usize, expected.len());
            }
        }
    }
}
