//! A differential test of the query engine: random documents with nested objects, arrays
//! of objects and arrays of scalars; random filters on dotted paths, sorts, limits; and
//! random updates and deletes (with and without `multi`) run through the real engine
//! (RocksDB, planner, index scans, the apply path) under several index layouts, and
//! through a reference model written here independently, on typed documents rather than
//! JSON. After every write the whole collection must be the model's, and every query must
//! answer what the model answers.
//!
//! The model encodes MongoDB's rules as its documentation and jstests state them: a path
//! through an array continues through its object elements only; a branch without the field
//! is "missing", which `null` matches; ranges stay within a type; a multikey sort key is
//! the smallest element ascending and the largest descending, an empty array sorting
//! before null.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::cmp::Ordering;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use nimbus_api::data::FindRequest;
use nimbus_datanode::store::catalog::IndexSpec;
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::read::FindQuery;
use nimbus_datanode::store::{Command, Engine, WriteAnswer, WriteOp, WriteResult};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------
// The model

/// A scalar.
#[derive(Debug, Clone, PartialEq)]
enum S {
    Null,
    Int(i64),
    Str(String),
}

impl S {
    fn json(&self) -> Value {
        match self {
            S::Null => Value::Null,
            S::Int(i) => json!(i),
            S::Str(s) => json!(s),
        }
    }

    /// Rank of the type in MongoDB's order.
    fn rank(&self) -> u8 {
        match self {
            S::Null => 1,
            S::Int(_) => 2,
            S::Str(_) => 3,
        }
    }

    fn cmp(&self, o: &S) -> Ordering {
        match (self, o) {
            (S::Int(a), S::Int(b)) => a.cmp(b),
            (S::Str(a), S::Str(b)) => a.cmp(b),
            _ => self.rank().cmp(&o.rank()),
        }
    }
}

/// The `b` field of a sub-document: a scalar or an array of scalars.
#[derive(Debug, Clone, PartialEq)]
enum B {
    S(S),
    Arr(Vec<S>),
}

/// An object `{b, c}` (inside `a`).
#[derive(Debug, Clone, PartialEq)]
struct Sub {
    b: Option<B>,
    c: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Elem {
    S(S),
    Obj(Sub),
}

/// The `a` field: a scalar, an object or an array of scalars and objects.
#[derive(Debug, Clone, PartialEq)]
enum A {
    S(S),
    Obj(Sub),
    Arr(Vec<Elem>),
}

#[derive(Debug, Clone, PartialEq)]
struct Doc {
    id: i64,
    a: Option<A>,
    b: Option<i64>,
    t: Option<Vec<i64>>,
}

impl Sub {
    fn json(&self) -> Value {
        let mut m = Map::new();
        if let Some(b) = &self.b {
            m.insert(
                "b".into(),
                match b {
                    B::S(s) => s.json(),
                    B::Arr(v) => Value::Array(v.iter().map(S::json).collect()),
                },
            );
        }
        if let Some(c) = self.c {
            m.insert("c".into(), json!(c));
        }
        Value::Object(m)
    }
}

impl Doc {
    fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("_id".into(), json!(self.id));
        if let Some(a) = &self.a {
            m.insert(
                "a".into(),
                match a {
                    A::S(s) => s.json(),
                    A::Obj(sub) => sub.json(),
                    A::Arr(els) => Value::Array(
                        els.iter()
                            .map(|e| match e {
                                Elem::S(s) => s.json(),
                                Elem::Obj(sub) => sub.json(),
                            })
                            .collect(),
                    ),
                },
            );
        }
        if let Some(b) = self.b {
            m.insert("b".into(), json!(b));
        }
        if let Some(t) = &self.t {
            m.insert("t".into(), json!(t));
        }
        Value::Object(m)
    }
}

/// What a predicate sees at a path: a scalar, "missing", or a value that is no scalar (an
/// object, or an array as a whole), which equals no scalar operand.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Missing,
    S(S),
    Other,
}

fn seen_b(b: &Option<B>) -> Vec<Seen> {
    match b {
        None => vec![Seen::Missing],
        Some(B::S(s)) => vec![Seen::S(s.clone())],
        Some(B::Arr(v)) => v.iter().map(|s| Seen::S(s.clone())).chain([Seen::Other]).collect(),
    }
}

fn seen_c(c: Option<i64>) -> Vec<Seen> {
    c.map_or(vec![Seen::Missing], |c| vec![Seen::S(S::Int(c))])
}

/// The sub-documents a path through `a` continues into, or `None` when `a` is missing or
/// a scalar (a dotted path then reaches "missing").
fn subs(a: &Option<A>) -> Option<Vec<&Sub>> {
    match a {
        None | Some(A::S(_)) => None,
        Some(A::Obj(sub)) => Some(vec![sub]),
        Some(A::Arr(els)) => Some(
            els.iter()
                .filter_map(|e| match e {
                    Elem::Obj(s) => Some(s),
                    Elem::S(_) => None,
                })
                .collect(),
        ),
    }
}

fn seen(d: &Doc, path: Path) -> Vec<Seen> {
    match path {
        Path::A => match &d.a {
            None => vec![Seen::Missing],
            Some(A::S(s)) => vec![Seen::S(s.clone())],
            Some(A::Obj(_)) => vec![Seen::Other],
            Some(A::Arr(els)) => els
                .iter()
                .map(|e| match e {
                    Elem::S(s) => Seen::S(s.clone()),
                    Elem::Obj(_) => Seen::Other,
                })
                .chain([Seen::Other])
                .collect(),
        },
        Path::AB => match subs(&d.a) {
            None => vec![Seen::Missing],
            Some(subs) => subs.iter().flat_map(|s| seen_b(&s.b)).collect(),
        },
        Path::AC => match subs(&d.a) {
            None => vec![Seen::Missing],
            Some(subs) => subs.iter().flat_map(|s| seen_c(s.c)).collect(),
        },
        Path::B => seen_c(d.b),
        Path::T => match &d.t {
            None => vec![Seen::Missing],
            Some(v) => v.iter().map(|i| Seen::S(S::Int(*i))).chain([Seen::Other]).collect(),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    A,
    AB,
    AC,
    B,
    T,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::A => "a",
            Path::AB => "a.b",
            Path::AC => "a.c",
            Path::B => "b",
            Path::T => "t",
        }
    }
}

#[derive(Debug, Clone)]
enum F {
    All,
    Eq(Path, S),
    Ne(Path, S),
    Gt(Path, S),
    Lte(Path, S),
    Between(Path, i64, i64),
    In(Path, Vec<S>),
    Nin(Path, Vec<S>),
    Exists(Path, bool),
    /// `{"a": {"$elemMatch": {"b": v, "c": {"$gte": lo}}}}`
    ElemMatch(S, i64),
    Size(Path, usize),
    AllOf(Vec<i64>),
    IsString(Path),
    And(Box<F>, Box<F>),
    Or(Box<F>, Box<F>),
    Nor(Box<F>),
    IdIn(Vec<i64>),
}

impl F {
    fn json(&self) -> Value {
        let list = |vs: &[S]| Value::Array(vs.iter().map(S::json).collect());
        match self {
            F::All => json!({}),
            F::Eq(p, v) => json!({ p.name(): v.json() }),
            F::Ne(p, v) => json!({ p.name(): {"$ne": v.json()} }),
            F::Gt(p, v) => json!({ p.name(): {"$gt": v.json()} }),
            F::Lte(p, v) => json!({ p.name(): {"$lte": v.json()} }),
            F::Between(p, lo, hi) => json!({ p.name(): {"$gte": lo, "$lt": hi} }),
            F::In(p, vs) => json!({ p.name(): {"$in": list(vs)} }),
            F::Nin(p, vs) => json!({ p.name(): {"$nin": list(vs)} }),
            F::Exists(p, e) => json!({ p.name(): {"$exists": e} }),
            F::ElemMatch(v, lo) => json!({"a": {"$elemMatch": {"b": v.json(), "c": {"$gte": lo}}}}),
            F::Size(p, n) => json!({ p.name(): {"$size": n} }),
            F::AllOf(vs) => json!({"t": {"$all": vs}}),
            F::IsString(p) => json!({ p.name(): {"$type": "string"} }),
            F::And(x, y) => json!({"$and": [x.json(), y.json()]}),
            F::Or(x, y) => json!({"$or": [x.json(), y.json()]}),
            F::Nor(x) => json!({"$nor": [x.json()]}),
            F::IdIn(ids) => json!({"_id": {"$in": ids}}),
        }
    }
}

fn eq_seen(y: &Seen, v: &S) -> bool {
    match y {
        Seen::Missing => *v == S::Null,
        Seen::S(x) => x.cmp(v) == Ordering::Equal && x.rank() == v.rank(),
        Seen::Other => false,
    }
}

fn eval(f: &F, d: &Doc) -> bool {
    let any = |p: Path, pred: &dyn Fn(&Seen) -> bool| seen(d, p).iter().any(pred);
    let same_type = |y: &Seen, v: &S, want: &dyn Fn(Ordering) -> bool| match y {
        Seen::S(x) => x.rank() == v.rank() && want(x.cmp(v)),
        _ => false,
    };
    match f {
        F::All => true,
        F::Eq(p, v) => any(*p, &|y| eq_seen(y, v)),
        F::Ne(p, v) => !any(*p, &|y| eq_seen(y, v)),
        F::Gt(p, v) => *v != S::Null && any(*p, &|y| same_type(y, v, &|o| o == Ordering::Greater)),
        // `$lte: null` is "null or missing".
        F::Lte(p, v) if *v == S::Null => any(*p, &|y| eq_seen(y, v)),
        F::Lte(p, v) => any(*p, &|y| same_type(y, v, &|o| o != Ordering::Greater)),
        // Each bound may be met by a different element.
        F::Between(p, lo, hi) => {
            any(*p, &|y| matches!(y, Seen::S(S::Int(i)) if i >= lo))
                && any(*p, &|y| matches!(y, Seen::S(S::Int(i)) if i < hi))
        }
        F::In(p, vs) => any(*p, &|y| vs.iter().any(|v| eq_seen(y, v))),
        F::Nin(p, vs) => !any(*p, &|y| vs.iter().any(|v| eq_seen(y, v))),
        F::Exists(p, e) => any(*p, &|y| *y != Seen::Missing) == *e,
        F::ElemMatch(v, lo) => match &d.a {
            Some(A::Arr(els)) => els.iter().any(|e| match e {
                Elem::Obj(sub) => seen_b(&sub.b).iter().any(|y| eq_seen(y, v)) && sub.c.is_some_and(|c| c >= *lo),
                Elem::S(_) => false,
            }),
            _ => false,
        },
        F::Size(Path::T, n) => d.t.as_ref().is_some_and(|t| t.len() == *n),
        F::Size(Path::A, n) => matches!(&d.a, Some(A::Arr(els)) if els.len() == *n),
        F::Size(Path::AB, n) => {
            subs(&d.a).is_some_and(|subs| subs.iter().any(|s| matches!(&s.b, Some(B::Arr(v)) if v.len() == *n)))
        }
        F::Size(..) => false,
        F::AllOf(vs) => vs.iter().all(|v| d.t.as_ref().is_some_and(|t| t.contains(v))),
        F::IsString(p) => any(*p, &|y| matches!(y, Seen::S(S::Str(_)))),
        F::And(x, y) => eval(x, d) && eval(y, d),
        F::Or(x, y) => eval(x, d) || eval(y, d),
        F::Nor(x) => !eval(x, d),
        F::IdIn(ids) => ids.contains(&d.id),
    }
}

/// A sort key: an empty array sorts before null.
#[derive(Debug, Clone, PartialEq)]
enum K {
    EmptyArray,
    S(S),
}

impl K {
    fn cmp(&self, o: &K) -> Ordering {
        match (self, o) {
            (K::EmptyArray, K::EmptyArray) => Ordering::Equal,
            (K::EmptyArray, _) => Ordering::Less,
            (_, K::EmptyArray) => Ordering::Greater,
            (K::S(a), K::S(b)) => a.cmp(b),
        }
    }
}

fn b_keys(b: &Option<B>) -> Vec<K> {
    match b {
        None => vec![K::S(S::Null)],
        Some(B::S(s)) => vec![K::S(s.clone())],
        Some(B::Arr(v)) if v.is_empty() => vec![K::EmptyArray],
        Some(B::Arr(v)) => v.iter().map(|s| K::S(s.clone())).collect(),
    }
}

/// The keys a document sorts by on `a.b` or `b`.
fn sort_keys(d: &Doc, p: Path) -> Vec<K> {
    match p {
        Path::B => vec![K::S(d.b.map_or(S::Null, S::Int))],
        _ => match &d.a {
            None | Some(A::S(_)) => vec![K::S(S::Null)],
            Some(A::Obj(sub)) => b_keys(&sub.b),
            Some(A::Arr(els)) if els.is_empty() => vec![K::S(S::Null)],
            Some(A::Arr(els)) => els
                .iter()
                .flat_map(|e| match e {
                    Elem::Obj(sub) => b_keys(&sub.b),
                    Elem::S(_) => vec![K::S(S::Null)],
                })
                .collect(),
        },
    }
}

fn sort_key(d: &Doc, p: Path, desc: bool) -> K {
    let keys = sort_keys(d, p);
    let pick = |x: &K, y: &K| if desc { x.cmp(y) } else { y.cmp(x) };
    keys.into_iter().reduce(|best, k| if pick(&k, &best) == Ordering::Greater { k } else { best }).unwrap()
}

/// An update, applied to one model document; `Err` where MongoDB refuses it.
#[derive(Debug, Clone)]
enum U {
    SetB(i64),
    IncB,
    UnsetB,
    PushT(i64),
    PullT(i64),
    SetAC(i64),
}

impl U {
    fn json(&self) -> Value {
        match self {
            U::SetB(v) => json!({"$set": {"b": v}}),
            U::IncB => json!({"$inc": {"b": 1}}),
            U::UnsetB => json!({"$unset": {"b": ""}}),
            U::PushT(v) => json!({"$push": {"t": v}}),
            U::PullT(v) => json!({"$pull": {"t": v}}),
            U::SetAC(v) => json!({"$set": {"a.c": v}}),
        }
    }

    fn apply(&self, d: &Doc) -> Result<Doc, ()> {
        let mut d = d.clone();
        match self {
            U::SetB(v) => d.b = Some(*v),
            U::IncB => d.b = Some(d.b.unwrap_or(0) + 1),
            U::UnsetB => d.b = None,
            U::PushT(v) => d.t.get_or_insert_with(Vec::new).push(*v),
            U::PullT(v) => {
                if let Some(t) = &mut d.t {
                    t.retain(|x| x != v);
                }
            }
            U::SetAC(v) => match &mut d.a {
                None => d.a = Some(A::Obj(Sub { b: None, c: Some(*v) })),
                Some(A::Obj(sub)) => sub.c = Some(*v),
                // A field cannot be created in a scalar, nor by name in an array.
                Some(A::S(_) | A::Arr(_)) => return Err(()),
            },
        }
        Ok(d)
    }
}

#[derive(Debug, Clone)]
enum Step {
    Find {
        f: F,
        sort: Option<(Path, bool)>,
        skip: u64,
        limit: Option<u64>,
    },
    Update {
        f: F,
        u: U,
        multi: bool,
    },
    Delete {
        f: F,
        multi: bool,
    },
    /// An upsert naming its `_id`: `{_id: id, b: v}` with `$set: {t: [v]}`.
    Upsert {
        id: i64,
        b: i64,
    },
}

// ---------------------------------------------------------------------------------------
// Generators

fn arb_s() -> impl Strategy<Value = S> {
    prop_oneof![4 => (0i64..5).prop_map(S::Int), 2 => (0..3).prop_map(|i| S::Str(format!("s{i}"))), 1 => Just(S::Null)]
}

fn arb_sub() -> impl Strategy<Value = Sub> {
    // Arrays in `b` are kept rare: one makes an index on `a.b` multikey for the whole
    // collection, and the cases where it is not are the ones that find planner bugs.
    let b = prop_oneof![8 => arb_s().prop_map(B::S), 1 => prop::collection::vec(arb_s(), 0..3).prop_map(B::Arr)];
    (prop::option::weighted(0.8, b), prop::option::weighted(0.5, 0i64..4)).prop_map(|(b, c)| Sub { b, c })
}

fn arb_a() -> impl Strategy<Value = A> {
    let elem = prop_oneof![1 => arb_s().prop_map(Elem::S), 4 => arb_sub().prop_map(Elem::Obj)];
    prop_oneof![
        1 => arb_s().prop_map(A::S),
        2 => arb_sub().prop_map(A::Obj),
        4 => prop::collection::vec(elem, 0..4).prop_map(A::Arr),
    ]
}

fn arb_docs() -> impl Strategy<Value = Vec<Doc>> {
    // Small collections as often as large ones (see `arb_sub`).
    let size = prop_oneof![0usize..8, 0usize..30];
    size.prop_flat_map(|n| {
        prop::collection::vec(
            (
                prop::option::weighted(0.9, arb_a()),
                prop::option::weighted(0.7, 0i64..4),
                prop::option::weighted(0.5, prop::collection::vec(0i64..4, 0..3)),
            ),
            n..=n,
        )
    })
    .prop_map(|v| v.into_iter().enumerate().map(|(i, (a, b, t))| Doc { id: i as i64, a, b, t }).collect())
}

fn arb_path() -> impl Strategy<Value = Path> {
    prop_oneof![1 => Just(Path::A), 3 => Just(Path::AB), 1 => Just(Path::AC), 1 => Just(Path::B), 1 => Just(Path::T)]
}

fn arb_f() -> impl Strategy<Value = F> {
    let leaf = prop_oneof![
        1 => Just(F::All),
        4 => (arb_path(), arb_s()).prop_map(|(p, v)| F::Eq(p, v)),
        2 => (arb_path(), arb_s()).prop_map(|(p, v)| F::Ne(p, v)),
        2 => (arb_path(), arb_s()).prop_map(|(p, v)| F::Gt(p, v)),
        2 => (arb_path(), arb_s()).prop_map(|(p, v)| F::Lte(p, v)),
        4 => (arb_path(), 0i64..5, 0i64..5).prop_map(|(p, lo, hi)| F::Between(p, lo, hi)),
        2 => (arb_path(), prop::collection::vec(arb_s(), 1..4)).prop_map(|(p, v)| F::In(p, v)),
        1 => (arb_path(), prop::collection::vec(arb_s(), 1..3)).prop_map(|(p, v)| F::Nin(p, v)),
        1 => (arb_path(), any::<bool>()).prop_map(|(p, e)| F::Exists(p, e)),
        1 => (arb_s(), 0i64..4).prop_map(|(v, lo)| F::ElemMatch(v, lo)),
        1 => (prop_oneof![Just(Path::A), Just(Path::AB), Just(Path::T)], 0usize..3).prop_map(|(p, n)| F::Size(p, n)),
        1 => prop::collection::vec(0i64..4, 1..3).prop_map(F::AllOf),
        1 => arb_path().prop_map(F::IsString),
        1 => prop::collection::vec(0i64..35, 1..5).prop_map(F::IdIn),
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(x, y)| F::And(Box::new(x), Box::new(y))),
            (inner.clone(), inner.clone()).prop_map(|(x, y)| F::Or(Box::new(x), Box::new(y))),
            inner.prop_map(|x| F::Nor(Box::new(x))),
        ]
    })
}

fn arb_u() -> impl Strategy<Value = U> {
    prop_oneof![
        (0i64..4).prop_map(U::SetB),
        Just(U::IncB),
        Just(U::UnsetB),
        (0i64..4).prop_map(U::PushT),
        (0i64..4).prop_map(U::PullT),
        (0i64..4).prop_map(U::SetAC),
    ]
}

fn arb_step() -> impl Strategy<Value = Step> {
    let sort = prop::option::of((prop_oneof![Just(Path::AB), Just(Path::B)], any::<bool>()));
    prop_oneof![
        5 => (arb_f(), sort, prop_oneof![3 => Just(0u64), 1 => 1u64..4], prop::option::of(1u64..8))
            .prop_map(|(f, sort, skip, limit)| Step::Find { f, sort, skip, limit }),
        2 => (arb_f(), arb_u(), any::<bool>()).prop_map(|(f, u, multi)| Step::Update { f, u, multi }),
        1 => (arb_f(), any::<bool>()).prop_map(|(f, multi)| Step::Delete { f, multi }),
        1 => (28i64..34, 0i64..4).prop_map(|(id, b)| Step::Upsert { id, b }),
    ]
}

// ---------------------------------------------------------------------------------------
// The engine side

fn index(name: &str, fields: &[(&str, bool)]) -> IndexSpec {
    let keys: Map<String, Value> =
        fields.iter().map(|(f, d)| (f.to_string(), json!(if *d { -1 } else { 1 }))).collect();
    IndexSpec::from_request(&Value::Object(keys), false, Some(name)).unwrap()
}

/// The index layouts every case runs under: none, single, dotted, compound with dotted and
/// descending fields, several at once.
fn layouts() -> Vec<Vec<IndexSpec>> {
    vec![
        vec![],
        vec![index("a", &[("a", false)])],
        vec![index("ab", &[("a.b", false)])],
        vec![index("ab_b", &[("a.b", true), ("b", false)])],
        vec![index("b_ab", &[("b", false), ("a.b", false)]), index("t", &[("t", false)])],
        vec![index("ac", &[("a.c", false)]), index("a_b", &[("a", true), ("b", true)]), index("ab", &[("a.b", false)])],
    ]
}

/// One engine per layout for a whole test; each case writes to a collection of its own.
struct Engines {
    engines: Vec<Engine>,
    _dir: tempfile::TempDir,
}

impl Engines {
    fn open() -> Engines {
        let dir = tempfile::tempdir().expect("tempdir");
        let engines = (0..layouts().len())
            .map(|i| Engine::open(&dir.path().join(i.to_string()), EngineOptions::default()).expect("open"))
            .collect();
        Engines { engines, _dir: dir }
    }
}

/// Raft indexes of the applied commands (only garbage collection looks at them).
static NEXT_INDEX: AtomicU64 = AtomicU64::new(1);

fn apply(engine: &Engine, op: WriteOp) -> WriteResult {
    let index = NEXT_INDEX.fetch_add(1, AtomicOrdering::Relaxed);
    let cmd = Command { db: "d".into(), op, idempotency_key: None, ts_ms: 1, route_epoch: None, request_hash: None };
    let mut batch = rocksdb::WriteBatch::default();
    let (result, delta) = engine.apply_command(&mut batch, &cmd, index).expect("apply");
    engine.commit_for_tests(batch, delta);
    result
}

fn find_ids(
    engine: &Engine,
    coll: &str,
    filter: Value,
    sort: Option<Value>,
    skip: u64,
    limit: Option<u64>,
) -> Vec<i64> {
    let req = FindRequest { filter: Some(filter), sort, skip: Some(skip), limit, ..Default::default() };
    let q = FindQuery::parse(&req).expect("valid query");
    engine.find("d", coll, &q).expect("find").iter().map(|d| d["_id"].as_i64().expect("int id")).collect()
}

fn all_docs(engine: &Engine, coll: &str) -> Vec<Value> {
    let req = FindRequest { sort: Some(json!({"_id": 1})), ..Default::default() };
    engine.find("d", coll, &FindQuery::parse(&req).unwrap()).unwrap()
}

static CASE: AtomicU64 = AtomicU64::new(0);

fn run_case(engines: &Engines, docs: Vec<Doc>, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let coll = format!("c{}", CASE.fetch_add(1, AtomicOrdering::Relaxed));
    for (li, layout) in layouts().iter().enumerate() {
        let engine = &engines.engines[li];
        for spec in layout {
            apply(engine, WriteOp::CreateIndex { coll: coll.clone(), spec: spec.clone() }).expect("index");
        }
        let mut model = docs.clone();
        if !docs.is_empty() {
            let raw = docs.iter().map(|d| serde_json::value::to_raw_value(&d.json()).unwrap()).collect();
            apply(engine, WriteOp::Insert { coll: coll.clone(), docs: raw }).expect("insert");
        }
        for step in &steps {
            let ctx = format!("layout {li}, step {step:?}");
            match step {
                Step::Find { f, sort, skip, limit } => {
                    let mut want: Vec<&Doc> = model.iter().filter(|d| eval(f, d)).collect();
                    want.sort_by_key(|d| d.id);
                    let sort_json = sort.map(|(p, desc)| {
                        want.sort_by(|x, y| {
                            let o = sort_key(x, p, desc).cmp(&sort_key(y, p, desc));
                            (if desc { o.reverse() } else { o }).then(x.id.cmp(&y.id))
                        });
                        json!({ p.name(): if desc { -1 } else { 1 }, "_id": 1 })
                    });
                    let count = want.len();
                    let mut want: Vec<i64> = want.iter().map(|d| d.id).skip(*skip as usize).collect();
                    if let Some(l) = limit {
                        want.truncate(*l as usize);
                    }
                    let got = find_ids(engine, &coll, f.json(), sort_json.clone(), *skip, *limit);
                    if sort.is_none() && (limit.is_some() || *skip > 0) {
                        // Without a sort, any `limit` of the matches after any `skip` of them.
                        prop_assert_eq!(got.len(), want.len(), "{} filter {}", ctx, f.json());
                        let all = find_ids(engine, &coll, f.json(), Some(json!({"_id": 1})), 0, None);
                        prop_assert!(got.iter().all(|g| all.contains(g)), "{} filter {}", ctx, f.json());
                    } else if sort.is_none() {
                        let mut got = got;
                        got.sort();
                        prop_assert_eq!(got, want, "{} filter {}", ctx, f.json());
                    } else {
                        prop_assert_eq!(got, want, "{} filter {} sort {:?}", ctx, f.json(), sort_json);
                    }
                    let filter = nimbus_datanode::query::Filter::parse(Some(&f.json())).unwrap();
                    prop_assert_eq!(engine.count("d", &coll, &filter).unwrap() as usize, count, "{} count", ctx);
                }
                Step::Update { f, u, multi } => {
                    let mut targets: Vec<usize> = (0..model.len()).filter(|i| eval(f, &model[*i])).collect();
                    if !*multi {
                        targets.sort_by_key(|i| model[*i].id);
                        targets.truncate(1);
                    }
                    let updated: Result<Vec<Doc>, ()> = targets.iter().map(|i| u.apply(&model[*i])).collect();
                    let op = WriteOp::Update {
                        coll: coll.clone(),
                        filter: f.json(),
                        update: u.json(),
                        multi: *multi,
                        upsert: false,
                        upsert_id: json!("unused"),
                        array_filters: None,
                    };
                    let got = apply(engine, op);
                    match updated {
                        Ok(new) => {
                            let modified = targets.iter().zip(&new).filter(|(i, n)| model[**i] != **n).count();
                            prop_assert_eq!(
                                got,
                                Ok(WriteAnswer::Updated {
                                    matched: targets.len() as u64,
                                    modified: modified as u64,
                                    upserted_id: None
                                }),
                                "{}",
                                ctx
                            );
                            for (i, n) in targets.iter().zip(new) {
                                model[*i] = n;
                            }
                        }
                        Err(()) => prop_assert!(got.is_err(), "{} should be refused, got {:?}", ctx, got),
                    }
                }
                Step::Delete { f, multi } => {
                    let mut targets: Vec<i64> = model.iter().filter(|d| eval(f, d)).map(|d| d.id).collect();
                    targets.sort();
                    if !*multi {
                        targets.truncate(1);
                    }
                    let got = apply(engine, WriteOp::Delete { coll: coll.clone(), filter: f.json(), multi: *multi });
                    prop_assert_eq!(got, Ok(WriteAnswer::Deleted { deleted: targets.len() as u64 }), "{}", ctx);
                    model.retain(|d| !targets.contains(&d.id));
                }
                Step::Upsert { id, b } => {
                    let existing = model.iter().position(|d| d.id == *id && d.b == Some(*b));
                    let op = WriteOp::Update {
                        coll: coll.clone(),
                        filter: json!({"_id": id, "b": b}),
                        update: json!({"$set": {"t": [b]}}),
                        multi: false,
                        upsert: true,
                        upsert_id: json!("unused"),
                        array_filters: None,
                    };
                    let got = apply(engine, op);
                    match existing {
                        Some(i) => {
                            let new = Doc { t: Some(vec![*b]), ..model[i].clone() };
                            let modified = u64::from(new != model[i]);
                            prop_assert_eq!(
                                got,
                                Ok(WriteAnswer::Updated { matched: 1, modified, upserted_id: None }),
                                "{}",
                                ctx
                            );
                            model[i] = new;
                        }
                        None if model.iter().any(|d| d.id == *id) => {
                            prop_assert!(
                                got.is_err(),
                                "{}: an upsert of an existing _id must fail, got {:?}",
                                ctx,
                                got
                            );
                        }
                        None => {
                            prop_assert_eq!(
                                got,
                                Ok(WriteAnswer::Updated { matched: 0, modified: 0, upserted_id: Some(json!(id)) }),
                                "{}",
                                ctx
                            );
                            model.push(Doc { id: *id, a: None, b: Some(*b), t: Some(vec![*b]) });
                        }
                    }
                }
            }
            if !matches!(step, Step::Find { .. }) {
                let mut want: Vec<Value> = model.iter().map(Doc::json).collect();
                want.sort_by_key(|d| d["_id"].as_i64());
                prop_assert_eq!(all_docs(engine, &coll), want, "{}: the collection after the write", ctx);
                let count = nimbus_datanode::query::Filter::all();
                prop_assert_eq!(
                    engine.count("d", &coll, &count).unwrap() as usize,
                    model.len(),
                    "{}: document count",
                    ctx
                );
            }
        }
    }
    Ok(())
}

#[test]
fn the_engine_agrees_with_the_reference_model() {
    // Each case runs its steps under every layout: 2,000 cases are over 80,000 checked
    // answers (queries, counts, write results, whole collections).
    let engines = Engines::open();
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 2000, ..ProptestConfig::default() });
    let strategy = (arb_docs(), prop::collection::vec(arb_step(), 1..8));
    if let Err(e) = runner.run(&strategy, |(docs, steps)| run_case(&engines, docs, steps)) {
        panic!("{e}");
    }
}

/// The cases of the issue, one by one: each failed before the fix.
#[test]
fn multikey_dotted_paths_are_neither_missed_nor_counted_twice() {
    let engines = Engines::open();
    let engine = &engines.engines[2]; // index on a.b
    let coll = "regression";
    apply(engine, WriteOp::CreateIndex { coll: coll.into(), spec: index("ab", &[("a.b", false)]) }).unwrap();
    let doc = json!({"_id": 1, "a": [{"b": 1}, {"b": 9}]});
    apply(engine, WriteOp::Insert { coll: coll.into(), docs: vec![serde_json::value::to_raw_value(&doc).unwrap()] })
        .unwrap();
    // Each bound met by a different element: the index scan must not intersect them.
    assert_eq!(find_ids(engine, coll, json!({"a.b": {"$gt": 5, "$lt": 3}}), None, 0, None), vec![1]);
    // Two keys of one document: one result, one update, one delete.
    assert_eq!(find_ids(engine, coll, json!({"a.b": {"$gte": 0}}), None, 0, None), vec![1]);
    let op = WriteOp::Update {
        coll: coll.into(),
        filter: json!({"a.b": {"$gte": 0}}),
        update: json!({"$inc": {"n": 1}}),
        multi: true,
        upsert: false,
        upsert_id: json!(0),
        array_filters: None,
    };
    assert_eq!(apply(engine, op), Ok(WriteAnswer::Updated { matched: 1, modified: 1, upserted_id: None }));
    assert_eq!(all_docs(engine, coll)[0]["n"], json!(1));
    assert_eq!(
        apply(engine, WriteOp::Delete { coll: coll.into(), filter: json!({"a.b": {"$gte": 0}}), multi: true }),
        Ok(WriteAnswer::Deleted { deleted: 1 })
    );
    assert_eq!(engine.list_collections("d").iter().find(|c| c.name == coll).unwrap().documents, 0);
    assert!(engine.list_indexes("d", coll).unwrap()[0].multikey);
}
