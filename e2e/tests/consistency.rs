//! Replica consistency checks on a real replica set: every member records the same
//! database checksum at a marker's log index, and a member whose stored bytes were changed
//! under it is found by scanning.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use nimbus_datanode::store::keys::{ALL_CFS, CF_DOCS, doc_key};
use nimbus_e2e::{Cluster, poll};
use serde_json::{Value, json};

/// Long enough that a starved process on two busy cores does not trigger an election.
const STABLE_ELECTION_MS: &str = "1000";

/// Writes a checksum marker through the leader. Sent again when leadership moved: a second
/// marker only records the sums once more, at a later index, and every member then holds
/// the one answered.
async fn marker(cluster: &Cluster, db: &str) -> Value {
    let (_, st, body) = cluster
        .leader_post(|i| format!("{}/v1/admin/checksum", cluster.nodes[i].admin), &json!({"db": db}), None)
        .await
        .unwrap();
    assert_eq!(st, 200, "{body}");
    body
}

/// POSTs `body` to `path` of collection `db.coll` through the leader, under the
/// idempotency key `key` (the write is applied once however often it is sent); answers
/// the member that served it and its answer.
async fn write(cluster: &Cluster, db: &str, coll: &str, path: &str, body: &Value, key: &str) -> (usize, u16, Value) {
    cluster.leader_post(|i| format!("{}/{path}", cluster.coll_url(i, db, coll)), body, Some(key)).await.unwrap()
}

/// Waits until every running member recorded the marker at `at["index"]`, and returns what
/// each recorded.
async fn recorded(cluster: &Cluster, at: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        if !n.is_running() {
            continue;
        }
        let url = format!("{}/v1/admin/checksum?db=app", n.admin);
        let body = poll(&format!("member {i} to record the marker"), Duration::from_secs(20), || async {
            let (st, body) = cluster.client.get(&url).await;
            (st == 200 && body["index"] == at["index"]).then_some(body)
        })
        .await
        .unwrap();
        out.push(body);
    }
    out
}

async fn verify(cluster: &Cluster, i: usize) -> Value {
    let (st, body) = cluster.client.get(&format!("{}/v1/admin/checksum/verify?db=app", cluster.nodes[i].admin)).await;
    assert_eq!(st, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_record_the_same_checksum_and_a_changed_byte_is_found() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &["--election-timeout-ms", STABLE_ELECTION_MS]).await?;
    let docs: Vec<Value> = (0..40).map(|i| json!({"_id": i, "n": i, "tags": [i % 3, {"k": i % 5}]})).collect();
    let (_, st, body) = write(&cluster, "app", "a", "documents", &json!({"documents": docs}), "insert-a").await;
    assert_eq!(st, 201, "{body}");
    let (_, st, body) = write(&cluster, "app", "b", "documents", &json!({"documents": [{"x": 1}]}), "insert-b").await;
    assert_eq!(st, 201, "{body}");
    for (step, (path, body)) in [
        (
            "update",
            json!({"filter": {"n": {"$lt": 10}}, "update": {"$inc": {"n": 100}, "$push": {"tags": 9}}, "multi": true}),
        ),
        ("update", json!({"filter": {"_id": "new"}, "update": {"$set": {"v": 1}}, "upsert": true})),
        ("delete", json!({"filter": {"n": {"$gte": 30}}, "multi": true})),
    ]
    .into_iter()
    .enumerate()
    {
        let (_, st, resp) = write(&cluster, "app", "a", path, &body, &format!("change-{step}")).await;
        assert_eq!(st, 200, "{resp}");
    }

    let at = marker(&cluster, "app").await;
    // 40, less 30..39 and the ten raised past 100, plus the upsert and b's document.
    assert_eq!(at["documents"], json!(40 - 20 + 1 + 1), "{at}");
    for r in recorded(&cluster, &at).await {
        assert_eq!(r, at, "a member recorded another sum at the same index");
    }
    for i in 0..3 {
        let v = verify(&cluster, i).await;
        assert_eq!(v["mismatched"], json!([]), "member {i}: {v}");
        assert_eq!(v["recorded"], v["scanned"], "member {i}: {v}");
    }

    // Another database's writes leave the checksum as it was; a change of one field does not.
    let (_, st, body) =
        write(&cluster, "other", "a", "documents", &json!({"documents": [{"_id": 1}]}), "insert-other").await;
    assert_eq!(st, 201, "{body}");
    let again = marker(&cluster, "app").await;
    assert_eq!((&again["checksum"], &again["documents"]), (&at["checksum"], &at["documents"]));
    assert!(again["index"].as_u64() > at["index"].as_u64());
    let body = json!({"filter": {"_id": 12}, "update": {"$set": {"n": 13}}});
    let (_, st, resp) = write(&cluster, "app", "a", "update", &body, "change-12").await;
    assert_eq!(st, 200, "{resp}");
    let changed = marker(&cluster, "app").await;
    assert_ne!(changed["checksum"], at["checksum"]);
    assert_eq!(changed["documents"], at["documents"]);

    // A byte changed under a stopped member: the apply loop's sums cannot see it, the scan
    // does. Any member will do, the leader too (no write follows). Stopped cleanly, so its
    // state machine is flushed (it writes no WAL: a killed member's last entries are only in
    // its Raft log, applied again at its restart).
    let stopped = 1;
    cluster.nodes[stopped].terminate(Duration::from_secs(30)).await?;
    let sm = cluster.nodes[stopped].dir.join("sm");
    let live = std::fs::read_dir(&sm)?
        .filter_map(|e| e.ok())
        .find(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .expect("the state machine's directory")
        .path();
    {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &live, ALL_CFS)?;
        let cf = db.cf_handle(CF_DOCS).unwrap();
        let key = doc_key("app", "a", &json!(15));
        let stored = db.get_cf(cf, &key)?.expect("document 15 stored");
        let mut doc: Value = serde_json::from_slice(&stored)?;
        doc["n"] = json!(16);
        db.put_cf(cf, &key, serde_json::to_vec(&doc)?)?;
    }
    cluster.nodes[stopped].restart().await?;
    let v = poll("the restarted member to answer", Duration::from_secs(20), || async {
        let (st, body) =
            cluster.client.get(&format!("{}/v1/admin/checksum/verify?db=app", cluster.nodes[stopped].admin)).await;
        (st == 200).then_some(body)
    })
    .await?;
    assert_eq!(v["mismatched"], json!(["a"]), "{v}");
    assert_ne!(v["recorded"]["checksum"], v["scanned"]["checksum"]);
    for i in (0..3).filter(|i| *i != stopped) {
        assert_eq!(verify(&cluster, i).await["mismatched"], json!([]), "member {i}");
    }
    Ok(())
}
