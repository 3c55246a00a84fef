//! The bad-input sweep, through the gateway, with raw requests: malformed, oversize and
//! deeply nested bodies, unknown operators, bad names, wrong types, on every route. Every
//! answer is an error of `API.md` (never a 500, never a dropped connection), and no stored
//! byte changes: every collection, index and document of both databases is compared.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use nimbus_api::etcd::UserRole;
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::raw::{self, addr_of};
use nimbus_e2e::{DataClient, poll};
use serde_json::{Value, json};

/// Everything of database `db`, as its datanode holds it.
async fn contents(stack: &Stack, db: &str) -> Value {
    let c = &stack.cluster;
    let node = &c.nodes[0];
    let (_, colls) = c.client.get(&format!("{}/v1/databases/{db}/collections", node.data)).await;
    let mut out = json!({"collections": colls});
    for coll in colls["collections"].as_array().unwrap() {
        let name = coll["name"].as_str().unwrap();
        let base = format!("{}/v1/databases/{db}/collections/{name}", node.data);
        let (_, idx) = c.client.get(&format!("{base}/indexes")).await;
        let (_, docs) = c.client.post(&format!("{base}/find"), &json!({"sort": {"_id": 1}, "limit": 10000})).await;
        out[name] = json!({"indexes": idx, "documents": docs});
    }
    out
}

fn deep(open: &str, close: &str, n: usize, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(n), close.repeat(n))
}

/// Bodies no route accepts, or that each route must refuse.
fn bad_bodies() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = [
        ("empty", ""),
        ("truncated", "{\"filter\": {"),
        ("not JSON", "{nope"),
        ("a bare string", "\"x\""),
        ("a number", "12"),
        ("null", "null"),
        ("an array", "[]"),
        ("an array of the fields in order", "[{}, null, null, null, 1]"),
        ("trailing garbage", "{} {}"),
        ("a lone surrogate", "{\"filter\": {\"a\": \"\\ud800\"}}"),
        ("a huge number", "{\"filter\": {\"a\": 1e999}}"),
        ("unknown field", "{\"filter\": {}, \"sneaky\": 1}"),
        ("filter of a wrong type", "{\"filter\": []}"),
        ("an unknown filter operator", "{\"filter\": {\"a\": {\"$where\": \"1\"}}}"),
        ("a top-level unknown operator", "{\"filter\": {\"$where\": \"sleep(1)\"}}"),
        ("$in without an array", "{\"filter\": {\"a\": {\"$in\": 1}}}"),
        ("$and of a non-array", "{\"filter\": {\"$and\": {}}}"),
        ("a negative limit", "{\"filter\": {}, \"limit\": -1}"),
        ("a limit too large", "{\"filter\": {}, \"limit\": 100000000}"),
        ("a skip of a wrong type", "{\"filter\": {}, \"skip\": \"x\"}"),
        ("a bad sort", "{\"filter\": {}, \"sort\": {\"a\": 2}}"),
        ("a bad projection", "{\"filter\": {}, \"projection\": {\"a\": 1, \"b\": 0}}"),
        ("an unknown update operator", "{\"filter\": {}, \"update\": {\"$nope\": {\"a\": 1}}}"),
        ("an update of a wrong type", "{\"filter\": {}, \"update\": 5}"),
        ("an update mixing operators and fields", "{\"filter\": {}, \"update\": {\"$set\": {\"a\": 1}, \"b\": 2}}"),
        ("an update of _id", "{\"filter\": {}, \"update\": {\"$set\": {\"_id\": 9}}}"),
        ("$inc of a string", "{\"filter\": {}, \"update\": {\"$inc\": {\"n\": \"x\"}}}"),
        ("multi of a wrong type", "{\"filter\": {}, \"update\": {\"$set\": {\"a\": 1}}, \"multi\": \"yes\"}"),
        ("documents of a wrong type", "{\"documents\": {}}"),
        ("no documents", "{\"documents\": []}"),
        ("a document that is not an object", "{\"documents\": [1]}"),
        ("an _id object", "{\"documents\": [{\"_id\": {\"$gt\": 1}}]}"),
        ("an _id array", "{\"documents\": [{\"_id\": [1]}]}"),
        ("an _id null", "{\"documents\": [{\"_id\": null}]}"),
        ("a field starting with $", "{\"documents\": [{\"$set\": 1}]}"),
        ("a dotted field name", "{\"documents\": [{\"a.b\": 1}]}"),
        ("index keys of a wrong type", "{\"keys\": [\"a\"]}"),
        ("index keys empty", "{\"keys\": {}}"),
        ("an index direction of 2", "{\"keys\": {\"a\": 2}}"),
        ("an index name with a slash", "{\"keys\": {\"a\": 1}, \"name\": \"a/b\"}"),
        ("the reserved index name", "{\"keys\": {\"a\": 1}, \"name\": \"_id_\"}"),
        ("an index on a $ path", "{\"keys\": {\"$a\": 1}}"),
    ]
    .into_iter()
    .map(|(what, body)| (what.to_owned(), body.as_bytes().to_vec()))
    .collect();
    v.push(("invalid UTF-8".into(), b"{\"filter\": {\"a\": \"\xff\xfe\"}}".to_vec()));
    v.push((
        "an array nested 200 deep".into(),
        format!("{{\"filter\": {{\"a\": {}}}}}", deep("[", "]", 200, "1")).into_bytes(),
    ));
    v.push((
        "an object nested 200 deep".into(),
        format!("{{\"documents\": [{}]}}", deep("{\"a\": ", "}", 200, "1")).into_bytes(),
    ));
    v.push((
        "$and nested 150 deep".into(),
        format!("{{\"filter\": {}}}", deep("{\"$and\": [", "]}", 150, "{}")).into_bytes(),
    ));
    v.push((
        "a body over the limit".into(),
        format!("{{\"documents\": [{{\"s\": \"{}\"}}]}}", "x".repeat(18 * 1024 * 1024)).into_bytes(),
    ));
    v.push((
        "a document over 16 MiB".into(),
        format!("{{\"documents\": [{{\"s\": \"{}\"}}]}}", "x".repeat(16 * 1024 * 1024 + 10)).into_bytes(),
    ));
    v
}

const ROUTES: [(&str, &str); 12] = [
    ("GET", "/collections"),
    ("PUT", "/collections/c"),
    ("DELETE", "/collections/c"),
    ("POST", "/collections/c/documents"),
    ("GET", "/collections/c/documents/1"),
    ("POST", "/collections/c/find"),
    ("POST", "/collections/c/count"),
    ("POST", "/collections/c/update"),
    ("POST", "/collections/c/delete"),
    ("POST", "/collections/c/indexes"),
    ("GET", "/collections/c/indexes"),
    ("DELETE", "/collections/c/indexes/a_1"),
];

/// Sends a request; a 503 (a leader election on a busy machine) is retried a few times,
/// since what is checked is the answer to the input, not to the moment.
fn send_settled(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> raw::RawAnswer {
    let mut a = raw::send(addr, method, path.as_bytes(), headers, Some(body));
    for _ in 0..5 {
        if a.status != 503 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        a = raw::send(addr, method, path.as_bytes(), headers, Some(body));
    }
    a
}

/// Statuses and codes of `API.md` section 1 (503 `Unavailable` aside: retried, see
/// [`send_settled`]).
fn is_contract_error(a: &raw::RawAnswer) -> bool {
    let code = a.json()["error"]["code"].as_str().map(str::to_owned);
    let expected = match a.status {
        400 => vec!["BadRequest", "InvalidFilter", "InvalidUpdate"],
        401 => vec!["Unauthenticated"],
        403 => vec!["Forbidden"],
        404 => vec!["NotFound"],
        409 => vec!["DuplicateKey"],
        413 => vec!["TooLarge"],
        429 => vec!["RateLimited"],
        _ => vec![],
    };
    code.is_some_and(|c| expected.contains(&c.as_str())) && a.json()["error"]["message"].is_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_route_gets_a_contract_error_and_changes_no_byte() {
    let mut stack = Stack::start(1, &["a", "b"]).await.unwrap();
    let rw = stack.control.user("a", "app", UserRole::ReadWrite).await.unwrap();
    let ro = stack.control.user("a", "viewer", UserRole::Read).await.unwrap();
    let b_rw = stack.control.user("b", "app", UserRole::ReadWrite).await.unwrap();
    let gw = GatewayProc::start("gw-sweep", &stack.etcd.client_urls, &stack.cluster.secret_file, &[]).await.unwrap();
    let client = DataClient::new();
    // Data in both databases: documents, an index.
    for (db, tok) in [("a", &rw), ("b", &b_rw)] {
        let auth = format!("Bearer {tok}");
        let base = format!("{}/v1/databases/{db}/collections/c", gw.public);
        poll("the gateway to serve", Duration::from_secs(15), || async {
            let body = json!({"documents": [{"_id": 1, "a": 1, "n": 5}, {"_id": "two", "a": [1, 2], "s": "x"}]});
            let (st, _) = client
                .call(reqwest::Method::POST, &format!("{base}/documents"), Some(&body), &[("authorization", &auth)])
                .await;
            (st == 201).then_some(())
        })
        .await
        .unwrap();
        let (st, _) = client
            .call(
                reqwest::Method::POST,
                &format!("{base}/indexes"),
                Some(&json!({"keys": {"a": 1}})),
                &[("authorization", &auth)],
            )
            .await;
        assert_eq!(st, 200);
    }
    let before = (contents(&stack, "a").await, contents(&stack, "b").await);

    let addr = addr_of(&gw.public);
    let tokens = [rw.clone(), ro.clone(), b_rw.clone()];
    let failures = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        let mut sent = 0;
        let bodies = bad_bodies();
        for (method, route) in ROUTES {
            // Routes without a body ignore one: bad bodies go to the routes that read them.
            let bodies = if method == "POST" { &bodies[..] } else { &[] };
            for (what, body) in bodies {
                // The read-write and read-only tokens of `a` and a token of `b`.
                for tok in &tokens {
                    let path = format!("/v1/databases/a{route}");
                    let auth = format!("Bearer {tok}");
                    let a = send_settled(&addr, method, &path, &[("Authorization", &auth)], body);
                    sent += 1;
                    if !is_contract_error(&a) {
                        failures.push(format!(
                            "{method} {route} with {what}: {} {}",
                            a.status,
                            &a.text()[..a.text().len().min(200)]
                        ));
                    }
                }
            }
            // Bad names on every route, and a body that says it is not JSON.
            let mut bad = vec![
                (route.replace("/c", "/bad.name"), "application/json"),
                (route.replace("/c", "/%24cmd"), "application/json"),
                (route.replace("/c", &format!("/{}", "x".repeat(65))), "application/json"),
                (route.replace("/c", "/-c"), "application/json"),
                (route.replace("a_1", "bad%2Fname"), "application/json"),
                (route.replace("a_1", &"i".repeat(129)), "application/json"),
            ];
            bad.retain(|(p, _)| p != route);
            if method == "POST" {
                bad.push((route.to_owned(), "text/plain"));
            }
            for (bad_path, ct) in bad {
                let path = format!("/v1/databases/a{bad_path}");
                let auth = format!("Bearer {}", tokens[0]);
                let head = [("Authorization", auth.as_str()), ("Content-Type", ct)];
                let a = send_settled(&addr, method, &path, &head, b"{\"filter\": {}}");
                sent += 1;
                if !is_contract_error(&a) {
                    failures.push(format!("{method} {path} ({ct}): {} {}", a.status, a.text()));
                }
            }
        }
        (failures, sent)
    })
    .await
    .unwrap();
    let (failures, sent) = failures;
    assert!(sent > 800, "{sent} requests");
    assert!(failures.is_empty(), "{} of {sent} answers outside the contract:\n{}", failures.len(), failures.join("\n"));
    assert_eq!((contents(&stack, "a").await, contents(&stack, "b").await), before, "bad input changed stored data");
    // Everything still runs.
    assert_eq!(raw::send(&addr_of(&gw.public), "GET", b"/healthz", &[], None).status, 200);
    let (st, _) = stack.cluster.client.get(&format!("{}/healthz", stack.cluster.nodes[0].admin)).await;
    assert_eq!(st, 200);
}
