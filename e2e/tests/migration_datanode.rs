//! Hot migration's datanode calls between two real replica sets of three processes each:
//! a database exported from one and imported into the other (copied while it changes, the
//! oplog replayed, the fence, the idempotency records), compared by checksum, switched;
//! what is refused while it is incoming, after the switch and on bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use nimbus_e2e::raw::{addr_of, send};
use nimbus_e2e::{Cluster, DataClient};
use reqwest::Method;
use serde_json::{Value, json};

/// The admin URL of the leader of `c`.
async fn leader_admin(c: &Cluster) -> String {
    let i = c.wait_leader(Duration::from_secs(20)).await.unwrap();
    c.nodes[i].admin.clone()
}

async fn post_ok(client: &DataClient, url: &str, body: &Value) -> Value {
    let (st, resp) = client.post(url, body).await;
    assert_eq!(st, 200, "{url} {body}: {resp}");
    resp
}

/// A data request straight to a member at route epoch `epoch`.
async fn data(
    c: &Cluster,
    i: usize,
    method: Method,
    path: &str,
    body: Option<&Value>,
    epoch: &str,
    extra: &[(&str, &str)],
) -> (u16, Value) {
    let mut headers = vec![("x-nimbus-route-epoch", epoch)];
    headers.extend_from_slice(extra);
    c.client.call(method, &format!("{}{path}", c.nodes[i].data), body, &headers).await
}

async fn checksum(c: &Cluster, db: &str) -> Value {
    let mut at = post_ok(&c.client, &format!("{}/v1/admin/checksum", leader_admin(c).await), &json!({"db": db})).await;
    at.as_object_mut().unwrap().remove("index");
    at
}

async fn import(c: &Cluster, migration: &str, step: Value) -> (u16, Value) {
    let url = format!("{}/v1/admin/import", leader_admin(c).await);
    c.client.post(&url, &json!({"db": "shop", "migration": migration, "step": step})).await
}

async fn import_ok(c: &Cluster, step: Value) -> u64 {
    let (st, body) = import(c, "m1", step).await;
    assert_eq!(st, 200, "{body}");
    body["index"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_moved_between_replica_sets_is_equal_and_served_at_the_new_epoch_only() -> anyhow::Result<()> {
    let src = Cluster::start(3, &[]).await?;
    let dst = Cluster::start(3, &[]).await?;
    let sl = src.wait_leader(Duration::from_secs(20)).await?;
    let users = "/v1/databases/shop/collections/users";
    let orders = "/v1/databases/shop/collections/orders";

    // The source: two collections, nested documents, a unique and a compound index, and a
    // write made with an idempotency key.
    for (keys, unique) in [(json!({"email": 1}), true), (json!({"addr.city": 1, "age": -1}), false)] {
        let (st, b) = data(
            &src,
            sl,
            Method::POST,
            &format!("{users}/indexes"),
            Some(&json!({"keys": keys, "unique": unique})),
            "0",
            &[],
        )
        .await;
        assert!(st == 200 || st == 201, "{b}");
    }
    let docs: Vec<Value> = (0..60)
        .map(|i| json!({"_id": i, "email": format!("u{i}@x"), "age": i % 9, "addr": {"city": format!("c{}", i % 4), "tags": [i, {"deep": [1, 2]}]}}))
        .collect();
    let (st, b) =
        data(&src, sl, Method::POST, &format!("{users}/documents"), Some(&json!({"documents": docs})), "0", &[]).await;
    assert_eq!(st, 201, "{b}");
    let (st, b) = data(
        &src,
        sl,
        Method::POST,
        &format!("{orders}/documents"),
        Some(&json!({"documents": [{"_id": "o1", "n": 0}]})),
        "0",
        &[],
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let bump = json!({"filter": {"_id": "o1"}, "update": {"$inc": {"n": 1}}});
    let (st, first_answer) =
        data(&src, sl, Method::POST, &format!("{orders}/update"), Some(&bump), "0", &[("idempotency-key", "k1")]).await;
    assert_eq!(st, 200, "{first_answer}");

    // Export on a follower: refused with the leader's id.
    let follower = (sl + 1) % 3;
    let (st, b) = src
        .client
        .post(
            &format!("{}/v1/admin/export", src.nodes[follower].admin),
            &json!({"db": "shop", "part": "documents", "maxBytes": 1000}),
        )
        .await;
    assert_eq!((st, b["error"]["code"].as_str()), (421, Some("NotLeader")), "{b}");

    // An import step before Begin is refused, and changes nothing.
    let (st, b) = import(&dst, "m1", json!({"docs": {"docs": [{"coll": "users", "doc": {"_id": 1}}]}})).await;
    assert_eq!(st, 400, "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("send Begin first"), "{b}");
    let dl = dst.wait_leader(Duration::from_secs(20)).await?;
    let (st, b) = data(&dst, dl, Method::GET, "/v1/databases/shop/collections", None, "0", &[]).await;
    assert_eq!((st, b["collections"].as_array().map(Vec::len)), (200, Some(0)), "{b}");

    // Copy, page by page, while the source changes.
    import_ok(&dst, json!("begin")).await;
    let src_admin = leader_admin(&src).await;
    let mut after: Option<String> = None;
    let mut first_index = None;
    let mut pages = 0;
    loop {
        let mut req = json!({"db": "shop", "part": "documents", "maxBytes": 1500});
        if let Some(a) = &after {
            req["after"] = json!(a);
        }
        let page = post_ok(&src.client, &format!("{src_admin}/v1/admin/export"), &req).await;
        if first_index.is_none() {
            let index = page["index"].as_u64().unwrap();
            first_index = Some(index);
            let pin = format!("{src_admin}/v1/admin/oplog/pin");
            // A pin that would never lapse is refused (at most a day ahead), and changes nothing.
            let forever = json!({"name": "m1", "fromIndex": index, "expiresMs": u64::MAX / 2});
            let (st, resp) = src.client.post(&pin, &forever).await;
            assert_eq!((st, resp["error"]["code"].as_str()), (400, Some("BadRequest")), "{resp}");
            let hour = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
                + 3_600_000;
            post_ok(&src.client, &pin, &json!({"name": "m1", "fromIndex": index, "expiresMs": hour})).await;
        }
        pages += 1;
        assert_eq!(page["collections"].as_array().unwrap().len(), 2, "{page}");
        import_ok(&dst, json!({"collections": {"collections": page["collections"]}})).await;
        import_ok(&dst, json!({"docs": {"docs": page["docs"]}})).await;
        // Changes behind and ahead of the cursor, a delete and a multi-update.
        let (st, _) = data(
            &src,
            sl,
            Method::POST,
            &format!("{users}/update"),
            Some(&json!({"filter": {"age": pages % 9}, "update": {"$set": {"page": pages}}, "multi": true})),
            "0",
            &[],
        )
        .await;
        assert_eq!(st, 200);
        let (st, _) = data(
            &src,
            sl,
            Method::POST,
            &format!("{users}/delete"),
            Some(&json!({"filter": {"_id": 59 - pages}})),
            "0",
            &[],
        )
        .await;
        assert_eq!(st, 200);
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");

    // While incoming: every client request for the database is refused on every member,
    // raw, reads and writes alike.
    let auth = dst.secret.authorization().to_str().unwrap().to_owned();
    for n in &dst.nodes {
        for (method, target, body) in [
            ("POST", format!("{users}/find"), Some(&b"{}"[..])),
            ("GET", format!("{users}/documents/1"), None),
            ("POST", format!("{users}/documents"), Some(&br#"{"documents":[{"_id":"x"}]}"#[..])),
            ("POST", format!("{users}/count"), Some(&b"{}"[..])),
            ("GET", format!("{users}/indexes"), None),
            ("GET", "/v1/databases/shop/collections".to_owned(), None),
        ] {
            let a = send(
                &addr_of(&n.data),
                method,
                target.as_bytes(),
                &[("authorization", &auth), ("x-nimbus-route-epoch", "0")],
                body,
            );
            assert_eq!(
                (a.status, a.json()["error"]["code"].as_str()),
                (421, Some("StaleRoute")),
                "{method} {target}: {}",
                a.text()
            );
        }
    }

    // The fence, then the oplog from the first page's index through it, twice over.
    let fence =
        post_ok(&src.client, &format!("{src_admin}/v1/admin/route-epoch"), &json!({"db": "shop", "epoch": 1})).await;
    let final_index = fence["index"].as_u64().unwrap();
    assert_eq!(fence["epoch"], 1);
    let (st, b) = data(&src, sl, Method::POST, &format!("{users}/find"), Some(&json!({})), "0", &[]).await;
    assert_eq!((st, b["error"]["code"].as_str()), (421, Some("StaleRoute")), "{b}");
    for _ in 0..2 {
        let (mut index, mut seq) = (first_index.unwrap(), u32::MAX);
        loop {
            let url = format!("{src_admin}/v1/admin/oplog?db=shop&afterIndex={index}&afterSeq={seq}&limit=7");
            let (st, page) = src.client.get(&url).await;
            assert_eq!(st, 200, "{page}");
            if !page["entries"].as_array().unwrap().is_empty() {
                import_ok(&dst, json!({"ops": {"entries": page["entries"]}})).await;
            }
            index = page["next"]["index"].as_u64().unwrap();
            seq = page["next"]["seq"].as_u64().unwrap() as u32;
            if index >= final_index {
                break;
            }
        }
    }
    let idem = post_ok(
        &src.client,
        &format!("{src_admin}/v1/admin/export"),
        &json!({"db": "shop", "part": "idempotency", "maxBytes": 100000}),
    )
    .await;
    assert_eq!(idem["idempotency"].as_array().unwrap().len(), 1, "{idem}");
    import_ok(&dst, json!({"idempotency": {"records": idem["idempotency"]}})).await;

    // Equal: documents, checksum and catalog (indexes included).
    let (s, d) = (checksum(&src, "shop").await, checksum(&dst, "shop").await);
    assert_eq!(s, d);
    assert_eq!(s["documents"], 60 - pages + 1, "{s}");
    assert_eq!(s["catalog"].as_str().unwrap().len(), 64);

    // The switch: served at epoch 1, an older epoch refused.
    import_ok(&dst, json!({"finish": {"epoch": 1}})).await;
    import_ok(&dst, json!({"finish": {"epoch": 1}})).await;
    let dl = dst.wait_leader(Duration::from_secs(20)).await?;
    let (st, b) = data(&dst, dl, Method::POST, &format!("{users}/count"), Some(&json!({})), "1", &[]).await;
    assert_eq!((st, b["count"].as_u64()), (200, Some(60 - pages)), "{b}");
    let (st, b) = data(&dst, dl, Method::POST, &format!("{users}/count"), Some(&json!({})), "0", &[]).await;
    assert_eq!((st, b["error"]["code"].as_str()), (421, Some("StaleRoute")), "{b}");
    // The unique index holds on the target.
    let (st, b) = data(
        &dst,
        dl,
        Method::POST,
        &format!("{users}/documents"),
        Some(&json!({"documents": [{"email": "u1@x"}]})),
        "1",
        &[],
    )
    .await;
    assert_eq!((st, b["error"]["code"].as_str()), (409, Some("DuplicateKey")), "{b}");
    // The idempotent write retried after the switch gets its first answer, not applied again.
    let (st, retry) =
        data(&dst, dl, Method::POST, &format!("{orders}/update"), Some(&bump), "1", &[("idempotency-key", "k1")]).await;
    assert_eq!((st, &retry), (200, &first_answer));
    let (_, o1) = data(&dst, dl, Method::GET, &format!("{orders}/documents/o1"), None, "1", &[]).await;
    assert_eq!(o1["n"], 1, "{o1}");

    // The source's clean-up: dropped, its epoch kept (an old route still refused).
    post_ok(&src.client, &format!("{src_admin}/v1/admin/oplog/unpin"), &json!({"name": "m1"})).await;
    let dropped = post_ok(&src.client, &format!("{src_admin}/v1/admin/drop-database"), &json!({"db": "shop"})).await;
    assert_eq!(dropped["found"], true, "{dropped}");
    let (st, b) = data(&src, sl, Method::POST, &format!("{users}/count"), Some(&json!({})), "0", &[]).await;
    assert_eq!((st, b["error"]["code"].as_str()), (421, Some("StaleRoute")), "{b}");
    let (st, b) = data(&src, sl, Method::POST, &format!("{users}/count"), Some(&json!({})), "1", &[]).await;
    assert_eq!((st, b["count"].as_u64()), (200, Some(0)), "{b}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migration_calls_are_refused_clearly_and_change_nothing() -> anyhow::Result<()> {
    let c = Cluster::start(1, &[]).await?;
    let admin = leader_admin(&c).await;
    let auth = c.secret.authorization().to_str().unwrap().to_owned();
    let addr = addr_of(&admin);
    let post = |target: &str, body: &[u8], auth: Option<&str>| {
        let mut headers = vec![];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        send(&addr, "POST", target.as_bytes(), &headers.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), Some(body))
    };
    let a = post("/v1/admin/import", br#"{"db":"shop","migration":"m1","step":"explode"}"#, Some(&auth));
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("unknown variant"), "{}", a.text());
    let a = post("/v1/admin/import", br#"{"db":"shop","migration":"m1","step":"begin""#, Some(&auth));
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("malformed JSON"), "{}", a.text());
    let a = post("/v1/admin/import", br#"{"db":"shop","migration":"m1","step":"begin"}"#, None);
    assert_eq!(a.status, 401, "{}", a.text());
    let a = post("/v1/admin/import", br#"{"db":"shop","migration":"","step":"begin"}"#, Some(&auth));
    assert_eq!(a.status, 400, "{}", a.text());
    let a = post("/v1/admin/export", br#"{"db":"shop","part":"documents","maxBytes":10,"after":"zz"}"#, Some(&auth));
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("cursor"), "{}", a.text());
    let a = post("/v1/admin/oplog/pin", br#"{"name":"m1"}"#, Some(&auth));
    assert_eq!(a.status, 400, "{}", a.text());
    // None of it marked the database incoming: it is served.
    let (st, b) = data(&c, 0, Method::GET, "/v1/databases/shop/collections", None, "0", &[]).await;
    assert_eq!(st, 200, "{b}");
    // An oplog read from before what retention kept is not reachable here without days of
    // writes; the store's tests cover OplogTruncated. A position past the end answers an
    // empty page at the member's applied index.
    let (st, page) = c.client.get(&format!("{admin}/v1/admin/oplog?db=shop&afterIndex=0&afterSeq=0&limit=5")).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["next"]["index"], page["appliedIndex"], "{page}");
    // A Begin for a database this replica set serves (a stale driver, a wrong target) is
    // refused, naming it, and drops nothing.
    let docs = "/v1/databases/shop/collections/users/documents";
    let (st, b) =
        data(&c, 0, Method::POST, docs, Some(&json!({"documents": [{"_id": 1}, {"_id": 2}]})), "0", &[]).await;
    assert_eq!(st, 201, "{b}");
    let a = post("/v1/admin/import", br#"{"db":"shop","migration":"m9","step":"begin"}"#, Some(&auth));
    assert_eq!((a.status, a.json()["error"]["code"].as_str()), (400, Some("BadRequest")), "{}", a.text());
    assert!(a.text().contains("database shop is served by this replica set"), "{}", a.text());
    let (st, b) =
        data(&c, 0, Method::POST, "/v1/databases/shop/collections/users/count", Some(&json!({})), "0", &[]).await;
    assert_eq!((st, b["count"].as_u64()), (200, Some(2)), "{b}");
    Ok(())
}

/// A migration's clean-up arriving after a new instance of the name wrote to the source:
/// the drop, bounded by the fence's epoch (`maxEpoch`), keeps what a client wrote at a
/// newer route's epoch; bounded at that epoch, or without a bound, it drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_bounded_by_an_older_epoch_keeps_what_a_newer_route_wrote() -> anyhow::Result<()> {
    let c = Cluster::start(1, &[]).await?;
    let admin = leader_admin(&c).await;
    let l = c.wait_leader(Duration::from_secs(20)).await?;
    let users = "/v1/databases/shop/collections/users";
    // The fence of a migration away from here, at epoch 3.
    let fenced = post_ok(&c.client, &format!("{admin}/v1/admin/route-epoch"), &json!({"db": "shop", "epoch": 3})).await;
    assert_eq!(fenced["epoch"], 3, "{fenced}");
    // A new instance of the name, its route at epoch 8 (3 + 5), writes here.
    let (st, b) =
        data(&c, l, Method::POST, &format!("{users}/documents"), Some(&json!({"documents": [{"_id": 1}]})), "8", &[])
            .await;
    assert_eq!(st, 201, "{b}");
    // The clean-up: kept, saying so.
    let kept =
        post_ok(&c.client, &format!("{admin}/v1/admin/drop-database"), &json!({"db": "shop", "maxEpoch": 3})).await;
    assert_eq!((&kept["kept"], &kept["epoch"], &kept["found"]), (&json!(true), &json!(8), &json!(true)), "{kept}");
    let (st, b) = data(&c, l, Method::POST, &format!("{users}/count"), Some(&json!({})), "8", &[]).await;
    assert_eq!((st, b["count"].as_u64()), (200, Some(1)), "{b}");
    // The write recorded its epoch for bounded drops; senders are still held to the
    // route epoch the control plane set (3), not to it.
    let (st, b) = data(&c, l, Method::POST, &format!("{users}/count"), Some(&json!({})), "3", &[]).await;
    assert_eq!((st, b["count"].as_u64()), (200, Some(1)), "{b}");
    let (st, b) = data(&c, l, Method::POST, &format!("{users}/count"), Some(&json!({})), "2", &[]).await;
    assert_eq!((st, b["error"]["code"].as_str()), (421, Some("StaleRoute")), "{b}");

    // A bound that is not a number is refused, and drops nothing.
    let auth = c.secret.authorization().to_str().unwrap().to_owned();
    for body in [&br#"{"db":"shop","maxEpoch":"3"}"#[..], br#"{"db":"shop","maxEpoch":-1}"#] {
        let a = send(&addr_of(&admin), "POST", b"/v1/admin/drop-database", &[("authorization", &auth)], Some(body));
        assert_eq!((a.status, a.json()["error"]["code"].as_str()), (400, Some("BadRequest")), "{}", a.text());
    }
    let (st, b) = data(&c, l, Method::POST, &format!("{users}/count"), Some(&json!({})), "8", &[]).await;
    assert_eq!((st, b["count"].as_u64()), (200, Some(1)), "{b}");

    // Bounded at the epoch known here: dropped, answered as before (no `kept`).
    let dropped =
        post_ok(&c.client, &format!("{admin}/v1/admin/drop-database"), &json!({"db": "shop", "maxEpoch": 8})).await;
    assert_eq!(dropped["found"], true, "{dropped}");
    assert!(dropped.get("kept").is_none() && dropped["index"].as_u64().is_some(), "{dropped}");
    let (st, b) = data(&c, l, Method::POST, &format!("{users}/count"), Some(&json!({})), "8", &[]).await;
    assert_eq!((st, b["count"].as_u64()), (200, Some(0)), "{b}");
    // Without a bound: dropped whatever the epoch.
    let (st, b) =
        data(&c, l, Method::POST, &format!("{users}/documents"), Some(&json!({"documents": [{"_id": 2}]})), "9", &[])
            .await;
    assert_eq!(st, 201, "{b}");
    let dropped = post_ok(&c.client, &format!("{admin}/v1/admin/drop-database"), &json!({"db": "shop"})).await;
    assert_eq!(dropped["found"], true, "{dropped}");
    let (st, b) = data(&c, l, Method::POST, &format!("{users}/count"), Some(&json!({})), "9", &[]).await;
    assert_eq!((st, b["count"].as_u64()), (200, Some(0)), "{b}");
    Ok(())
}
