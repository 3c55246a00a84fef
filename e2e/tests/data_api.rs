//! The internal data API of a datanode, end to end against a real process: every operation
//! of `API.md` section 1, its errors, and that bad input changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use nimbus_e2e::Cluster;
use serde_json::{Value, json};

async fn cluster() -> anyhow::Result<(Cluster, String)> {
    let c = Cluster::start(1, &["--max-body-bytes", "20000000"]).await?;
    let base = c.coll_url(0, "shop", "orders");
    Ok((c, base))
}

#[tokio::test]
async fn every_operation_answers_in_the_shape_of_the_contract() -> anyhow::Result<()> {
    let (c, base) = cluster().await?;
    let cl = &c.client;
    let put = |url: String| async move { cl.call(reqwest::Method::PUT, &url, None, &[]).await };
    let del = |url: String| async move { cl.call(reqwest::Method::DELETE, &url, None, &[]).await };

    assert_eq!(put(base.clone()).await.0, 201);
    assert_eq!(put(base.clone()).await.0, 200);
    let (st, body) = cl
        .post(
            &format!("{base}/documents"),
            &json!({"documents": [{"_id": "a", "n": 1, "tags": ["x", "y"]}, {"n": 2}, {"_id": 7, "n": 3}]}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let ids = body["insertedIds"].as_array().expect("insertedIds").clone();
    assert_eq!(ids[0], json!("a"));
    assert_eq!(ids[2], json!(7));
    assert!(ids[1].as_str().is_some_and(|s| s.len() == 24), "generated id {}", ids[1]);

    let (st, body) = cl.post(&format!("{base}/documents"), &json!({"documents": [{"_id": "a"}]})).await;
    assert_eq!((st, body["error"]["code"].clone()), (409, json!("DuplicateKey")));
    let (st, body) = cl.get(&format!("{base}/documents/a")).await;
    assert_eq!((st, body), (200, json!({"_id": "a", "n": 1, "tags": ["x", "y"]})));
    let (st, body) = cl.get(&format!("{base}/documents/7")).await;
    assert_eq!((st, body["n"].clone()), (200, json!(3)));
    let (st, body) = cl.get(&format!("{base}/documents/nope")).await;
    assert_eq!((st, body["error"]["code"].clone()), (404, json!("NotFound")));

    let (st, body) = cl
        .post(
            &format!("{base}/find"),
            &json!({"filter": {"n": {"$gte": 2}}, "sort": {"n": -1}, "projection": {"n": 1, "_id": 0}}),
        )
        .await;
    assert_eq!((st, body), (200, json!({"documents": [{"n": 3}, {"n": 2}]})));
    let (_, body) = cl.post(&format!("{base}/find"), &json!({"filter": {"tags": "y"}})).await;
    assert_eq!(body["documents"].as_array().map(Vec::len), Some(1));
    let (_, body) = cl.post(&format!("{base}/find"), &json!({"sort": {"n": 1}, "skip": 1, "limit": 1})).await;
    assert_eq!(body["documents"][0]["n"], json!(2));
    let (st, body) = cl.post(&format!("{base}/count"), &json!({"filter": {"n": {"$in": [1, 3]}}})).await;
    assert_eq!((st, body), (200, json!({"count": 2})));

    let (st, body) = cl
        .post(
            &format!("{base}/update"),
            &json!({"filter": {"_id": "a"}, "update": {"$inc": {"n": 5}, "$push": {"tags": "z"}}}),
        )
        .await;
    assert_eq!((st, body), (200, json!({"matched": 1, "modified": 1, "upsertedId": null})));
    let (_, body) = cl
        .post(
            &format!("{base}/update"),
            &json!({"filter": {"n": {"$gt": 0}}, "update": {"$set": {"seen": true}}, "multi": true}),
        )
        .await;
    assert_eq!(body, json!({"matched": 3, "modified": 3, "upsertedId": null}));
    let (_, body) = cl
        .post(&format!("{base}/update"), &json!({"filter": {"_id": "u"}, "update": {"$set": {"n": 9}}, "upsert": true}))
        .await;
    assert_eq!(body, json!({"matched": 0, "modified": 0, "upsertedId": "u"}));
    let (_, body) = cl.post(&format!("{base}/update"), &json!({"filter": {"_id": "u"}, "update": {"other": 1}})).await;
    assert_eq!(body["modified"], json!(1));
    assert_eq!(cl.get(&format!("{base}/documents/u")).await.1, json!({"_id": "u", "other": 1}));

    let (st, body) = cl.post(&format!("{base}/indexes"), &json!({"keys": {"n": 1, "seen": -1}})).await;
    assert_eq!((st, body.clone()), (200, json!({"name": "n_1_seen_-1", "state": "ready"})));
    // Documents without the field count as null: several of them break a unique index.
    let (st, body) = cl.post(&format!("{base}/indexes"), &json!({"keys": {"other": 1}, "unique": true})).await;
    assert_eq!((st, body["error"]["code"].clone()), (409, json!("DuplicateKey")));
    let (_, body) =
        cl.post(&format!("{base}/indexes"), &json!({"keys": {"n": 1}, "unique": true, "name": "by_other"})).await;
    assert_eq!(body, json!({"name": "by_other", "state": "ready"}));
    let (st, body) = cl.post(&format!("{base}/documents"), &json!({"documents": [{"n": 2}]})).await;
    assert_eq!((st, body["error"]["code"].clone()), (409, json!("DuplicateKey")));
    let (st, body) = cl.get(&format!("{base}/indexes")).await;
    assert_eq!(st, 200);
    assert_eq!(
        body["indexes"][0],
        json!({"name": "n_1_seen_-1", "keys": {"n": 1, "seen": -1}, "unique": false, "auto": false, "state": "ready"})
    );
    let (_, body) = cl.post(&format!("{base}/find"), &json!({"filter": {"n": 6}})).await;
    assert_eq!(body["documents"][0]["_id"], json!("a"));
    assert_eq!(del(format!("{base}/indexes/by_other")).await.0, 200);
    assert_eq!(del(format!("{base}/indexes/by_other")).await.0, 404);

    let (st, body) = cl.get(&format!("{}/v1/databases/shop/collections", c.nodes[0].data)).await;
    assert_eq!((st, body), (200, json!({"collections": [{"name": "orders", "documents": 4}]})));
    let (st, body) = cl.post(&format!("{base}/delete"), &json!({"filter": {"seen": true}, "multi": true})).await;
    assert_eq!((st, body), (200, json!({"deleted": 3})));
    let (_, body) = cl.post(&format!("{base}/delete"), &json!({"filter": {}})).await;
    assert_eq!(body, json!({"deleted": 1}));
    assert_eq!(del(base.clone()).await.0, 200);
    let (st, body) = del(base.clone()).await;
    assert_eq!((st, body["error"]["code"].clone()), (404, json!("NotFound")));
    Ok(())
}

/// Every document of the collection, to compare before and after bad requests.
async fn contents(c: &Cluster, base: &str) -> Value {
    c.client.post(&format!("{base}/find"), &json!({"sort": {"_id": 1}})).await.1
}

#[tokio::test]
async fn bad_input_gets_its_error_and_changes_nothing() -> anyhow::Result<()> {
    let (c, base) = cluster().await?;
    let cl = &c.client;
    let (st, _) = cl
        .post(&format!("{base}/documents"), &json!({"documents": [{"_id": 1, "n": 1, "s": "x"}, {"_id": 2, "n": 2}]}))
        .await;
    assert_eq!(st, 201);
    let before = contents(&c, &base).await;

    let mut deep = json!(1);
    for _ in 0..120 {
        deep = json!({ "d": deep });
    }
    let mut very_deep = String::new();
    for _ in 0..100_000 {
        very_deep.push('[');
    }
    let cases: Vec<(&str, String, Value, u16, &str)> = vec![
        ("find", format!("{base}/find"), json!({"filter": {"n": {"$regexx": 1}}}), 400, "InvalidFilter"),
        ("find", format!("{base}/find"), json!({"filter": {"$where": "1"}}), 400, "InvalidFilter"),
        ("find", format!("{base}/find"), json!({"filter": 5}), 400, "InvalidFilter"),
        ("find", format!("{base}/find"), json!({"sort": {"n": 3}}), 400, "BadRequest"),
        ("find", format!("{base}/find"), json!({"limit": 1_000_000}), 400, "BadRequest"),
        ("find", format!("{base}/find"), json!({"filtre": {}}), 400, "BadRequest"),
        (
            "update",
            format!("{base}/update"),
            json!({"filter": {}, "update": {"$nope": {"n": 1}}}),
            400,
            "InvalidUpdate",
        ),
        (
            "update",
            format!("{base}/update"),
            json!({"filter": {"_id": 1}, "update": {"$inc": {"s": 1}}}),
            400,
            "InvalidUpdate",
        ),
        (
            "update",
            format!("{base}/update"),
            json!({"filter": {}, "update": {"$set": {"_id": 5}}, "multi": true}),
            400,
            "InvalidUpdate",
        ),
        (
            "update",
            format!("{base}/update"),
            json!({"filter": {}, "update": {"$inc": {"n": 1}, "x": 1}}),
            400,
            "InvalidUpdate",
        ),
        (
            "update",
            format!("{base}/update"),
            json!({"filter": {"$or": 1}, "update": {"$set": {"a": 1}}}),
            400,
            "InvalidFilter",
        ),
        ("insert", format!("{base}/documents"), json!({"documents": [{"_id": 3}, {"_id": 1}]}), 409, "DuplicateKey"),
        ("insert", format!("{base}/documents"), json!({"documents": [{"_id": 3}, {"_id": 3}]}), 409, "DuplicateKey"),
        ("insert", format!("{base}/documents"), json!({"documents": [[1, 2]]}), 400, "BadRequest"),
        ("insert", format!("{base}/documents"), json!({"documents": [{"_id": {"a": 1}}]}), 400, "BadRequest"),
        ("insert", format!("{base}/documents"), json!({"documents": [{"$bad": 1}]}), 400, "BadRequest"),
        ("insert", format!("{base}/documents"), json!({"documents": [deep]}), 400, "BadRequest"),
        ("insert", format!("{base}/documents"), json!({"documents": []}), 400, "BadRequest"),
        (
            "insert",
            format!("{}/v1/databases/shop/collections/bad.name/documents", c.nodes[0].data),
            json!({"documents": [{}]}),
            400,
            "BadRequest",
        ),
        ("index", format!("{base}/indexes"), json!({"keys": {"n": 2}}), 400, "BadRequest"),
        ("index", format!("{base}/indexes"), json!({"keys": {"s": 1}, "unique": true, "name": "u"}), 200, ""),
    ];
    for (what, url, body, status, code) in cases {
        let (st, resp) = cl.post(&url, &body).await;
        assert_eq!(st, status, "{what} {body}: {resp}");
        if !code.is_empty() {
            assert_eq!(resp["error"]["code"], json!(code), "{what} {body}: {resp}");
            assert!(resp["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    // A unique index that existing documents violate is refused whole.
    let (st, resp) =
        cl.post(&format!("{base}/indexes"), &json!({"keys": {"n": 1}, "unique": true, "name": "n_u"})).await;
    assert_eq!(st, 200, "{resp}");
    let (st, resp) =
        cl.post(&format!("{base}/update"), &json!({"filter": {"_id": 2}, "update": {"$set": {"n": 1}}})).await;
    assert_eq!((st, resp["error"]["code"].clone()), (409, json!("DuplicateKey")));

    // Raw bodies: malformed JSON, wrong content type, hostile nesting, over the size limit.
    let raw = |body: Vec<u8>, ct: &'static str| {
        let url = format!("{base}/find");
        async move {
            let r = cl.http.post(url).header("content-type", ct).body(body).send().await.expect("answer");
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for (body, ct, status, code) in [
        (b"{nope".to_vec(), "application/json", 400, "BadRequest"),
        (b"{}".to_vec(), "text/plain", 400, "BadRequest"),
        (very_deep.clone().into_bytes(), "application/json", 400, "BadRequest"),
        (vec![b' '; 21_000_000], "application/json", 413, "TooLarge"),
    ] {
        let (st, resp) = raw(body, ct).await;
        assert_eq!((st, resp["error"]["code"].clone()), (status, json!(code)));
    }
    let big = json!({"documents": [{"_id": "big", "s": "x".repeat(17 * 1024 * 1024)}]});
    // A fresh client: the server closes a connection whose oversized body it did not read.
    let (st, resp) = nimbus_e2e::DataClient::internal(&c.secret).post(&format!("{base}/documents"), &big).await;
    assert_eq!((st, resp["error"]["code"].clone()), (413, json!("TooLarge")), "{resp}");

    assert_eq!(contents(&c, &base).await, before, "bad input changed stored data");
    let (_, health) = c.client.get(&format!("{}/healthz", c.nodes[0].admin)).await;
    assert_eq!(health["status"], json!("ok"));
    Ok(())
}

#[tokio::test]
async fn a_retried_write_with_the_same_idempotency_key_applies_once() -> anyhow::Result<()> {
    let (c, base) = cluster().await?;
    let hdr = [("idempotency-key", "k-1")];
    let body = json!({"filter": {"_id": "c"}, "update": {"$inc": {"n": 1}}, "upsert": true});
    let first = c.client.call(reqwest::Method::POST, &format!("{base}/update"), Some(&body), &hdr).await;
    let again = c.client.call(reqwest::Method::POST, &format!("{base}/update"), Some(&body), &hdr).await;
    assert_eq!(first, again, "a retry gets the first answer");
    assert_eq!(c.client.get(&format!("{base}/documents/c")).await.1, json!({"_id": "c", "n": 1}));
    let other = c
        .client
        .call(reqwest::Method::POST, &format!("{base}/update"), Some(&body), &[("idempotency-key", "k-2")])
        .await;
    assert_eq!(other.1["matched"], json!(1));
    assert_eq!(c.client.get(&format!("{base}/documents/c")).await.1, json!({"_id": "c", "n": 2}));
    // A refused write's answer is remembered too.
    let dup = json!({"documents": [{"_id": "c"}]});
    let a = c
        .client
        .call(reqwest::Method::POST, &format!("{base}/documents"), Some(&dup), &[("idempotency-key", "k-3")])
        .await;
    assert_eq!(a.0, 409);
    let (st, _) = c
        .client
        .call(
            reqwest::Method::POST,
            &format!("{base}/documents"),
            Some(&json!({"documents": [{"_id": "d"}]})),
            &[("idempotency-key", "bad key")],
        )
        .await;
    assert_eq!(st, 400);
    Ok(())
}

#[tokio::test]
async fn status_metrics_and_oplog_are_served_on_the_admin_port() -> anyhow::Result<()> {
    let (c, base) = cluster().await?;
    let (st, _) = c.client.post(&format!("{base}/documents"), &json!({"documents": [{"_id": 1, "a": 1}]})).await;
    assert_eq!(st, 201);
    c.client.post(&format!("{base}/update"), &json!({"filter": {"_id": 1}, "update": {"$set": {"a": 2}}})).await;
    c.client.post(&format!("{base}/delete"), &json!({"filter": {"_id": 1}})).await;
    let admin = &c.nodes[0].admin;
    let (st, s) = c.client.get(&format!("{admin}/v1/status")).await;
    assert_eq!(st, 200);
    for k in ["id", "zone", "replicaSet", "role", "term", "leaderId", "commitIndex", "appliedIndex"] {
        assert!(s.get(k).is_some(), "status lacks {k}: {s}");
    }
    assert_eq!(s["role"], json!("leader"));
    let (st, page) = c.client.get(&format!("{admin}/v1/admin/oplog?from=0")).await;
    assert_eq!(st, 200);
    let ops: Vec<Value> = page["entries"].as_array().expect("entries").iter().map(|e| e["op"].clone()).collect();
    assert_eq!(
        ops,
        vec![
            json!({"kind": "createCollection"}),
            json!({"kind": "put", "id": 1, "doc": {"_id": 1, "a": 1}}),
            json!({"kind": "put", "id": 1, "doc": {"_id": 1, "a": 2}}),
            json!({"kind": "delete", "id": 1}),
        ]
    );
    let last = page["entries"][3]["index"].as_u64().expect("index");
    let (_, rest) = c.client.get(&format!("{admin}/v1/admin/oplog?from={}", last + 1)).await;
    assert_eq!(rest["entries"], json!([]));
    let metrics = c.client.http.get(format!("{admin}/metrics")).send().await?.text().await?;
    for name in [
        "nimbus_raft_term",
        "nimbus_raft_commit_index",
        "nimbus_write_seconds",
        "nimbus_rocksdb_sst_bytes",
        "nimbus_raft_log_syncs_total",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    let (st, _) = c.client.get(&format!("{admin}/readyz")).await;
    assert_eq!(st, 200);
    Ok(())
}
