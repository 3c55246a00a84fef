//! Tenant isolation tried as an attacker would: raw request lines (nothing normalises
//! them) that try to climb from database `a`, whose tokens the attacker holds, into
//! database `b` on the same replica set, on every route, with a read-only and a read-write
//! token; and a property test over generated paths. Nothing of `b` may be read, nothing of
//! `b` may change: its collections, indexes, documents and oplog are compared before and
//! after, and its marker never appears in an answer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use nimbus_api::etcd::UserRole;
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::raw::{self, addr_of};
use nimbus_e2e::{DataClient, poll};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// In every document of `b`, and the name of one of its collections and of an index: an
/// answer containing it read `b`.
const MARKER: &str = "Bsecret3f9c1a";

struct World {
    stack: Stack,
    gw: GatewayProc,
    a_rw: String,
    a_ro: String,
}

async fn world() -> World {
    let mut stack = Stack::start(1, &["a", "b"]).await.unwrap();
    let a_rw = stack.control.user("a", "app", UserRole::ReadWrite).await.unwrap();
    let a_ro = stack.control.user("a", "viewer", UserRole::Read).await.unwrap();
    let b_rw = stack.control.user("b", "app", UserRole::ReadWrite).await.unwrap();
    let gw = GatewayProc::start("gw-iso", &stack.etcd.client_urls, &stack.cluster.secret_file, &[]).await.unwrap();
    let client = DataClient::new();
    let call = |method: reqwest::Method, url: String, body: Option<Value>, tok: String| {
        let client = client.clone();
        async move {
            let auth = format!("Bearer {tok}");
            client.call(method, &url, body.as_ref(), &[("authorization", auth.as_str())]).await
        }
    };
    let url = |db: &str, rest: &str| format!("{}/v1/databases/{db}{rest}", gw.public);
    poll("the gateway to serve b", Duration::from_secs(15), || async {
        (call(reqwest::Method::GET, url("b", "/collections"), None, b_rw.clone()).await.0 == 200).then_some(())
    })
    .await
    .unwrap();
    // b: two collections (one named with the marker), documents that carry it, an index
    // named with it.
    for coll in ["x", MARKER] {
        let docs: Vec<Value> = (0..5).map(|i| json!({"_id": format!("{i}"), "secret": MARKER, "n": i})).collect();
        let (st, body) = call(
            reqwest::Method::POST,
            url("b", &format!("/collections/{coll}/documents")),
            Some(json!({ "documents": docs })),
            b_rw.clone(),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
    let (st, _) = call(
        reqwest::Method::POST,
        url("b", "/collections/x/indexes"),
        Some(json!({"keys": {"n": 1}, "name": MARKER})),
        b_rw.clone(),
    )
    .await;
    assert_eq!(st, 200);
    // a: a collection `c` with a document `y`, so that routes on `a` have something to do.
    let (st, _) = call(
        reqwest::Method::POST,
        url("a", "/collections/c/documents"),
        Some(json!({"documents": [{"_id": "y", "public": true}]})),
        a_rw.clone(),
    )
    .await;
    assert_eq!(st, 201);
    World { stack, gw, a_rw, a_ro }
}

/// Everything of database `b` as the datanode holds it, and its oplog entries.
async fn snapshot_b(w: &World) -> Value {
    let c = &w.stack.cluster;
    let node = &c.nodes[0];
    let (_, colls) = c.client.get(&format!("{}/v1/databases/b/collections", node.data)).await;
    let mut out = json!({"collections": colls});
    let mut names: Vec<String> =
        colls["collections"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect();
    names.sort();
    for name in names {
        let base = format!("{}/v1/databases/b/collections/{name}", node.data);
        let (_, idx) = c.client.get(&format!("{base}/indexes")).await;
        let (_, docs) = c.client.post(&format!("{base}/find"), &json!({"sort": {"_id": 1}, "limit": 10000})).await;
        out[name] = json!({"indexes": idx, "documents": docs});
    }
    let (_, oplog) = c.client.get(&format!("{}/v1/admin/oplog?from=0&limit=10000", node.admin)).await;
    let of_b: Vec<&Value> = oplog["entries"].as_array().unwrap().iter().filter(|e| e["db"] == "b").collect();
    out["oplog"] = json!(of_b);
    out
}

/// What climbs out of a database, a collection, a document id or an index name into `b`.
fn climbs(levels: usize) -> Vec<String> {
    let up = |sep: &str, dots: &str| std::iter::repeat_n(dots, levels).collect::<Vec<_>>().join(sep);
    let target = "b/collections/x/documents/0";
    let mut v = vec![];
    for (sep, dots) in [
        ("/", ".."),
        ("\\", ".."),
        ("/", "%2e%2e"),
        ("/", "%2E%2E"),
        ("/", ".%2e"),
        ("/", "%2e."),
        ("/", "%252e%252e"),
        ("%2f", ".."),
        ("%2F", "%2e%2e"),
        ("%5c", ".."),
        ("%5C", "%2e%2e"),
        ("/", "..;"),
        ("/", "..%00"),
        ("/", "..%20"),
        ("/", ".. "),
        ("//", ".."),
        ("/./", ".."),
    ] {
        let path = format!("{}{sep}{}", up(sep, dots), target.replace('/', sep));
        v.push(path);
    }
    v.push(format!("{}/b", up("/", "..")));
    v.push(format!("{}%2fb", up("%2f", "..")));
    v
}

/// The routes of `API.md` section 1 (and the datanode-only drop of a database), with the
/// slot an attacker fills: (method, path template, body).
fn routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    let filter = json!({"filter": {}});
    vec![
        ("GET", "/v1/databases/{db}/collections", None),
        ("PUT", "/v1/databases/{db}/collections/{coll}", None),
        ("DELETE", "/v1/databases/{db}/collections/{coll}", None),
        ("POST", "/v1/databases/{db}/collections/{coll}/documents", Some(json!({"documents": [{"_id": "pwn"}]}))),
        ("GET", "/v1/databases/{db}/collections/{coll}/documents/{id}", None),
        ("POST", "/v1/databases/{db}/collections/{coll}/find", Some(filter.clone())),
        ("POST", "/v1/databases/{db}/collections/{coll}/count", Some(filter.clone())),
        (
            "POST",
            "/v1/databases/{db}/collections/{coll}/update",
            Some(json!({"filter": {}, "update": {"$set": {"pwned": true}}, "multi": true})),
        ),
        ("POST", "/v1/databases/{db}/collections/{coll}/delete", Some(json!({"filter": {}, "multi": true}))),
        ("POST", "/v1/databases/{db}/collections/{coll}/indexes", Some(json!({"keys": {"pwn": 1}}))),
        ("GET", "/v1/databases/{db}/collections/{coll}/indexes", None),
        ("DELETE", "/v1/databases/{db}/collections/{coll}/indexes/{idx}", None),
        ("DELETE", "/v1/databases/{db}", None),
    ]
}

/// Every attack path: each route with each slot filled by each trick.
fn attack_paths() -> Vec<(&'static str, String, Option<Value>)> {
    let mut out = Vec::new();
    let db_tricks = [
        "b",
        "B",
        "b.",
        "%62",
        "b%00",
        "a%2f..%2fb",
        "a/../b",
        "a%2F%2E%2E%2Fb",
        "a\\..\\b",
        "a%5c..%5cb",
        "a;/../b",
        "a/./../b",
        "./b",
        "a//../b",
        "%2e%2e/b",
        "a/%2e%2e/b",
        "a/%252e%252e/b",
        "a%252f..%252fb",
        "b%23",
        "b#",
        "b?",
        "%20b",
        "b%09",
        "%E2%80%AEb",
    ];
    for (method, template, body) in routes() {
        let fill = |db: &str, coll: &str, id: &str, idx: &str| {
            template.replace("{db}", db).replace("{coll}", coll).replace("{id}", id).replace("{idx}", idx)
        };
        for t in db_tricks {
            out.push((method, fill(t, "x", "0", "n_1"), body.clone()));
        }
        if template.contains("{coll}") {
            for t in climbs(2) {
                out.push((method, fill("a", &t, "0", "n_1"), body.clone()));
            }
        }
        if template.contains("{id}") {
            for t in climbs(4) {
                out.push((method, fill("a", "c", &t, "n_1"), body.clone()));
            }
        }
        if template.contains("{idx}") {
            for t in climbs(4) {
                out.push((method, fill("a", "c", "0", &t), body.clone()));
            }
        }
        // Absolute-form request targets (a proxy's form): the host part means nothing.
        out.push((method, format!("http://nimbus{}", fill("b", "x", "0", "n_1")), body.clone()));
        out.push((method, format!("http://b{}", fill("a/../b", "x", "0", "n_1")), body.clone()));
        // Case: the API's literal segments are lower case.
        out.push((method, fill("b", "x", "0", "n_1").replacen("/v1/databases", "/V1/Databases", 1), body.clone()));
        // A query or a fragment never changes the path.
        out.push((method, format!("{}?db=b&path=/v1/databases/b", fill("a", "c", "y", "n_1")), body.clone()));
        out.push((method, format!("{}#/../../b", fill("a", "c", "y", "n_1")), body.clone()));
        // Over-long.
        out.push((method, fill("a", "c", &"%2e".repeat(4000), "n_1"), body.clone()));
    }
    out
}

/// The answer to an attack on `target`: never b's data, never a server error, and a
/// success only for a request whose path (the part before any query) names database `a`.
fn check(method: &str, target: &[u8], a: &raw::RawAnswer) {
    let target = String::from_utf8_lossy(target);
    let what = format!("{method} {target}");
    assert!(a.status != 0, "{what}: no answer (the gateway closed the connection): {}", a.head);
    assert!(a.status < 500 || a.status == 503, "{what}: server error {} {}", a.status, a.text());
    assert!(!a.text().contains(MARKER), "{what}: answered with database b's data: {}", a.text());
    if a.status < 300 || a.status == 409 {
        let path = target.split(['?', '#']).next().unwrap_or_default();
        let path = path.strip_prefix("http://nimbus").unwrap_or(path);
        let parsed = nimbus_api::path::DataPath::parse(method, path);
        assert!(
            parsed.as_ref().is_ok_and(|p| p.db.as_str() == "a"),
            "{what}: {} for a request not on a: {}",
            a.status,
            a.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_trick_in_the_path_reaches_another_database() {
    let w = world().await;
    let before = snapshot_b(&w).await;
    let addr = addr_of(&w.gw.public);
    let attacks = attack_paths();
    let tokens = [w.a_rw.clone(), w.a_ro.clone()];
    let results = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for (method, path, body) in &attacks {
            for tok in &tokens {
                let auth = format!("Bearer {tok}");
                let body = body.as_ref().map(|b| b.to_string().into_bytes());
                let a = raw::send(&addr, method, path.as_bytes(), &[("Authorization", &auth)], body.as_deref());
                seen.push((method.to_owned(), path.clone(), a));
            }
        }
        seen
    })
    .await
    .unwrap();
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for (method, path, a) in &results {
        check(method, path.as_bytes(), a);
        *by_status.entry(a.status).or_default() += 1;
    }
    // Raw bytes no client library would send: invalid UTF-8 and control characters.
    let addr = addr_of(&w.gw.public);
    let auth = format!("Bearer {}", w.a_rw);
    for target in [
        &b"/v1/databases/a/collections/c/documents/\xff\xfe"[..],
        b"/v1/databases/b\xc0\xae/collections",
        b"/v1/databases/a/collections/c/documents/..\x00/../b",
        b"/v1/databases/a/collections/c/documents/\x7f",
    ] {
        let a = raw::send(&addr, "GET", target, &[("Authorization", &auth)], None);
        assert!(
            matches!(a.status, 400 | 403 | 404),
            "{:?}: {} {}",
            String::from_utf8_lossy(target),
            a.status,
            a.text()
        );
        check("GET", target, &a);
    }
    assert!(results.len() > 1000, "{} attacks", results.len());
    // Most are refused as another database's (403) or, on `a`, as unparsable (400); the
    // rest are requests on `a` itself (a query string, a fragment, an id that looks like a
    // path), which `check` allows only when the path names `a`.
    let n = |s: u16| by_status.get(&s).copied().unwrap_or(0);
    assert!(n(400) > 100 && n(403) > 100, "{by_status:?}");
    assert_eq!(snapshot_b(&w).await, before, "database b changed");
    // The gateway is still up and still serves a to a's token (the attacks that were plain
    // requests on `a` may have changed `a`: that is theirs to do).
    let a = raw::send(&addr, "GET", b"/v1/databases/a/collections", &[("Authorization", &auth)], None);
    assert_eq!(a.status, 200, "{}", a.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_id_holds_any_character_and_is_only_ever_one_id() {
    let w = world().await;
    let addr = addr_of(&w.gw.public);
    let auth = format!("Bearer {}", w.a_rw);
    // Ids that look like paths, escapes and tricks are stored and found as themselves.
    let ids = ["../../../../b/collections/x/documents/0", "a/b", "a\\b", "%2e%2e", "100%", "x;y=1", "?#", " ", "é✓"];
    let docs: Vec<Value> = ids.iter().map(|id| json!({"_id": id, "mine": true})).collect();
    let body = json!({ "documents": docs }).to_string();
    let a = raw::send(
        &addr,
        "POST",
        b"/v1/databases/a/collections/ids/documents",
        &[("Authorization", &auth)],
        Some(body.as_bytes()),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    for id in ids {
        let mut encoded = String::new();
        for b in id.bytes() {
            encoded.push_str(&format!("%{b:02X}"));
        }
        let path = format!("/v1/databases/a/collections/ids/documents/{encoded}");
        let a = raw::send(&addr, "GET", path.as_bytes(), &[("Authorization", &auth)], None);
        assert_eq!(a.status, 200, "{id:?}: {}", a.text());
        assert_eq!(a.json()["_id"], json!(id));
    }
}

/// Segments an attacker's generated paths are made of.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "a", "b", "c", "x", "y", "0", "n_1", "collections", "documents", "find", "count", "update", "delete",
            "indexes", "..", ".", "", "%2e%2e", "%2E.", ".%2e", "%252e%252e", "%2f", "%2F", "%5c", "\\", "..\\..",
            ";", "..;", "%00", "b%2f..", "%62", "B", "b.", "?", "#", "%3f", "%23", "%",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z0-9.%/\\\\;_~-]{1,10}",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_authorised_is_always_the_database_served() {
    let w = world().await;
    let before = snapshot_b(&w).await;
    let addr = addr_of(&w.gw.public);
    let tok = w.a_rw.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config { cases: 1500, failure_persistence: None, ..Config::default() });
        let strategy = (
            prop::sample::select(vec!["GET", "POST", "PUT", "DELETE"]),
            prop::collection::vec(segment(), 0..8),
            prop::sample::select(vec![
                None,
                Some(r#"{"filter": {}}"#),
                Some(r#"{"filter": {}, "multi": true}"#),
                Some(r#"{"filter": {}, "update": {"$set": {"pwned": 1}}, "multi": true}"#),
                Some(r#"{"documents": [{"pwned": 1}]}"#),
                Some(r#"{"keys": {"pwned": 1}}"#),
            ]),
        );
        runner.run(&strategy, |(method, segments, body)| {
            let path = format!("/v1/databases/{}", segments.join("/"));
            let auth = format!("Bearer {tok}");
            let a = raw::send(&addr, method, path.as_bytes(), &[("Authorization", &auth)], body.map(str::as_bytes));
            prop_assert!(
                a.status != 0 && (a.status < 500 || a.status == 503),
                "{method} {path}: {} {}",
                a.status,
                a.text()
            );
            prop_assert!(!a.text().contains(MARKER), "{method} {path} read b: {}", a.text());
            Ok(())
        })
    })
    .await
    .unwrap();
    outcome.unwrap();
    assert_eq!(snapshot_b(&w).await, before, "database b changed");
}
