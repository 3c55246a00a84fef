//! A restore's `Publish` driven directly (no Raft): the staging database `shop~restore`,
//! imported with the ordinary import steps, switched into `shop` by one entry. Whole and
//! per collection (beside, refused onto an existing one, replacing it), repeated, refused
//! for every reason without a byte changed, bounded, waiting for index builds, and leaving
//! `shop`'s oplog such that replaying it rebuilds exactly what was published.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::collections::BTreeMap;

use nimbus_api::ErrorCode;
use nimbus_api::admin::OplogOp;
use nimbus_api::migration::{ExportedCollection, ExportedDoc, ImportStep, OplogPosition, PublishedCollection};
use nimbus_datanode::query::{Filter, SortSpec};
use nimbus_datanode::store::catalog::IndexSpec;
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::read::FindQuery;
use nimbus_datanode::store::{Command, Engine, WriteAnswer, WriteOp, WriteResult};
use serde_json::{Value, json};

const INTO: &str = "shop";
const STAGING: &str = "shop~restore";

struct Node {
    engine: Engine,
    index: u64,
    _dir: tempfile::TempDir,
}

impl Node {
    fn new(options: EngineOptions) -> Node {
        let dir = tempfile::tempdir().unwrap();
        Node { engine: Engine::open(dir.path(), options).unwrap(), index: 0, _dir: dir }
    }

    fn run(&mut self, db: &str, key: Option<&str>, op: WriteOp) -> WriteResult {
        self.index += 1;
        let cmd = Command {
            db: db.into(),
            op,
            idempotency_key: key.map(str::to_owned),
            ts_ms: 1_000 + self.index,
            route_epoch: None,
            request_hash: key.map(|_| "h".to_owned()),
        };
        let mut batch = rocksdb::WriteBatch::default();
        let (result, delta) = self.engine.apply_command(&mut batch, &cmd, self.index).unwrap();
        self.engine.commit_applied_for_tests(batch, delta, self.index);
        result
    }

    fn apply(&mut self, db: &str, op: WriteOp) -> WriteResult {
        self.run(db, None, op)
    }

    fn import(&mut self, db: &str, migration: &str, step: ImportStep) -> WriteResult {
        self.apply(db, WriteOp::Import { migration: migration.into(), step })
    }

    fn publish(&mut self, migration: &str, whole: bool, colls: &[(&str, &str)], replace: bool) -> WriteResult {
        let collections =
            colls.iter().map(|(f, t)| PublishedCollection { from: (*f).into(), to: (*t).into() }).collect();
        self.import(
            STAGING,
            migration,
            ImportStep::Publish { into: INTO.into(), whole, collections, replace, route_epoch: None },
        )
    }

    /// The database's checksum marker: sum, count and catalog digest (without the index).
    fn checksum(&mut self, db: &str) -> Value {
        match self.apply(db, WriteOp::Checksum).unwrap() {
            WriteAnswer::Checksum(at) => {
                let mut v = serde_json::to_value(at).unwrap();
                v.as_object_mut().unwrap().remove("index");
                v
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Every collection of `db`: its documents in `_id` order, its catalog entry as the
    /// data API lists it, and its indexes.
    fn dump(&self, db: &str) -> BTreeMap<String, (Vec<Value>, Value, Vec<IndexSpec>)> {
        let mut out = BTreeMap::new();
        for info in self.engine.list_collections(db) {
            let q =
                FindQuery { filter: Filter::all(), sort: SortSpec::default(), projection: None, skip: 0, limit: None };
            let docs = self.engine.find(db, &info.name, &q).unwrap();
            let indexes = self.engine.list_indexes(db, &info.name).unwrap();
            out.insert(info.name.clone(), (docs, serde_json::to_value(&info).unwrap(), indexes));
        }
        out
    }

    fn oplog(&self, db: &str) -> Vec<nimbus_api::admin::OplogEntry> {
        self.engine.read_db_oplog(db, OplogPosition { index: 0, seq: 0 }, 100_000).unwrap().entries
    }

    /// The oplog of `db`, comparable.
    fn oplog_json(&self, db: &str) -> Vec<Value> {
        self.oplog(db).iter().map(|e| serde_json::to_value(e).unwrap()).collect()
    }
}

fn insert(coll: &str, docs: &[Value]) -> WriteOp {
    WriteOp::Insert {
        coll: coll.into(),
        docs: docs.iter().map(|d| serde_json::value::to_raw_value(d).unwrap()).collect(),
    }
}

fn index(name: &str, keys: Value, unique: bool) -> IndexSpec {
    IndexSpec::from_request(&keys, unique, Some(name)).unwrap()
}

fn user(id: u64, email: &str, n: u64) -> Value {
    json!({"_id": id, "email": email, "n": n, "tags": ["a", {"deep": [n]}]})
}

/// What the backup holds: `users` (a unique and a multikey index), `orders`, `archive`.
fn backup_users() -> Vec<Value> {
    (1..=5).map(|i| user(i, &format!("old{i}@x"), i % 3)).collect()
}

fn backup_orders() -> Vec<Value> {
    vec![json!({"_id": "o1", "items": [{"sku": 1}]}), json!({"_id": "o2", "total": 3.5})]
}

fn backup_archive() -> Vec<Value> {
    vec![json!({"_id": 1, "year": 2020})]
}

fn backup_indexes() -> Vec<IndexSpec> {
    vec![index("by_email", json!({"email": 1}), true), index("by_tags", json!({"tags": 1, "n": -1}), false)]
}

/// `shop` as it is served now: other documents in `users` and `orders`, and `extra`,
/// which the backup does not have; its route epoch set, an idempotent write remembered.
fn served() -> Node {
    let mut n = Node::new(EngineOptions::default());
    populate_served(&mut n);
    n
}

fn populate_served(n: &mut Node) {
    n.apply(INTO, WriteOp::SetRouteEpoch { epoch: 5 }).unwrap();
    n.apply(INTO, WriteOp::CreateIndex { coll: "users".into(), spec: index("by_email", json!({"email": 1}), true) })
        .unwrap();
    n.apply(INTO, insert("users", &[user(1, "now1@x", 1), user(9, "now9@x", 9)])).unwrap();
    n.apply(INTO, insert("orders", &[json!({"_id": "o1", "items": []}), json!({"_id": "o9"})])).unwrap();
    n.run(INTO, Some("k1"), insert("extra", &[json!({"_id": "e"})])).unwrap();
    n.apply(
        INTO,
        WriteOp::Update {
            coll: "users".into(),
            filter: json!({"_id": 9}),
            update: json!({"$set": {"n": 10}}),
            multi: false,
            upsert: false,
            upsert_id: json!("unused"),
            array_filters: None,
        },
    )
    .unwrap();
}

/// Imports the backup into the staging database as a restore does (`Begin`, collections,
/// documents, a checksum marker).
fn stage(n: &mut Node, migration: &str) {
    n.import(STAGING, migration, ImportStep::Begin).unwrap();
    let spec = |ixs: &[IndexSpec]| ixs.iter().map(|i| serde_json::to_value(i).unwrap()).collect::<Vec<_>>();
    let collections = vec![
        ExportedCollection { name: "users".into(), indexes: spec(&backup_indexes()) },
        ExportedCollection { name: "orders".into(), indexes: vec![] },
        ExportedCollection { name: "archive".into(), indexes: vec![] },
    ];
    n.import(STAGING, migration, ImportStep::Collections { collections }).unwrap();
    let mut docs = Vec::new();
    for (coll, ds) in [("users", backup_users()), ("orders", backup_orders()), ("archive", backup_archive())] {
        for d in ds {
            docs.push(ExportedDoc { coll: coll.into(), doc: serde_json::value::to_raw_value(&d).unwrap() });
        }
    }
    n.import(STAGING, migration, ImportStep::Docs { docs }).unwrap();
    n.checksum(STAGING);
}

/// `shop` written by ordinary client writes: the collections given, with the backup's
/// indexes on `users`.
fn written_normally(colls: &[(&str, Vec<Value>)]) -> Node {
    let mut n = Node::new(EngineOptions::default());
    for (coll, docs) in colls {
        if *coll == "users" {
            for ix in backup_indexes() {
                n.apply(INTO, WriteOp::CreateIndex { coll: "users".into(), spec: ix }).unwrap();
            }
        }
        n.apply(INTO, WriteOp::CreateCollection { coll: (*coll).into() }).unwrap();
        n.apply(INTO, insert(coll, docs)).unwrap();
    }
    n
}

fn docs_of(n: &Node, coll: &str) -> Vec<Value> {
    n.dump(INTO).remove(coll).map(|c| c.0).unwrap_or_default()
}

/// The documents found by email, the plan, and the documents the finds by email examined
/// so far.
fn find_by_email(n: &Node, email: &str) -> (Vec<Value>, String, u64) {
    let q = FindQuery {
        filter: Filter::parse(Some(&json!({"email": email}))).unwrap(),
        sort: SortSpec::default(),
        projection: None,
        skip: 0,
        limit: None,
    };
    let found = n.engine.find(INTO, "users", &q).unwrap();
    let stats = n.engine.stats.snapshot();
    let s = stats.iter().find(|s| s.db == INTO && s.coll == "users" && s.shape.contains("email")).unwrap();
    (found, s.plan.clone(), s.docs_examined)
}

#[test]
fn a_whole_publish_makes_the_database_exactly_the_import_with_usable_indexes() {
    let mut n = served();
    stage(&mut n, "r1");
    assert_eq!(n.publish("r1", true, &[], false).unwrap(), WriteAnswer::Done);

    let now = n.dump(INTO);
    assert_eq!(now.keys().collect::<Vec<_>>(), vec!["archive", "orders", "users"], "extra was not dropped");
    assert_eq!(docs_of(&n, "users"), backup_users());
    assert_eq!(docs_of(&n, "orders"), backup_orders());
    assert_eq!(docs_of(&n, "archive"), backup_archive());
    let users = &now["users"];
    assert_eq!(users.1["documents"], json!(5));
    let names: Vec<_> = users.2.iter().map(|i| (i.name.as_str(), i.is_ready(), i.unique)).collect();
    assert_eq!(names, vec![("by_email", true, true), ("by_tags", true, false)]);
    assert!(users.2[1].multikey, "the multikey index was not marked so");

    // The unique index answers a query at once, and holds.
    let (found, plan, examined) = find_by_email(&n, "old3@x");
    assert_eq!(found, vec![user(3, "old3@x", 0)]);
    assert_eq!((plan.as_str(), examined), ("IXSCAN by_email", 1));
    let e = n.apply(INTO, insert("users", &[user(77, "old4@x", 1)])).unwrap_err();
    assert_eq!(e.code, ErrorCode::DuplicateKey, "{e:?}");
    // The old documents are gone from the indexes too.
    assert!(find_by_email(&n, "now9@x").0.is_empty());
    n.apply(INTO, insert("users", &[user(78, "now9@x", 1)])).unwrap();

    // The staging database is gone; the route epoch and the remembered write stay.
    assert!(n.dump(STAGING).is_empty());
    assert_eq!(n.engine.incoming_migration(STAGING), None);
    assert!(n.engine.check_route_epoch(INTO, 4).is_err());
    assert!(n.engine.check_route_epoch(INTO, 5).is_ok());
    let again = n.run(INTO, Some("k1"), insert("extra", &[json!({"_id": "e"})])).unwrap();
    assert_eq!(again, WriteAnswer::Inserted { ids: vec![json!("e")] });
    assert!(!n.dump(INTO).contains_key("extra"), "the retried write applied again");
}

#[test]
fn a_published_database_has_the_checksum_of_the_same_documents_written_normally() {
    let mut n = served();
    stage(&mut n, "r1");
    n.publish("r1", true, &[], false).unwrap();
    let mut normal =
        written_normally(&[("users", backup_users()), ("orders", backup_orders()), ("archive", backup_archive())]);
    assert_eq!(n.checksum(INTO), normal.checksum(INTO));
    let v = n.engine.verify_checksum(INTO).unwrap();
    assert!(v.mismatched.is_empty() && v.recorded == v.scanned, "{v:?}");
}

#[test]
fn a_collection_published_beside_under_a_new_name_leaves_the_others_alone() {
    let mut n = served();
    let before = n.dump(INTO);
    stage(&mut n, "r1");
    n.publish("r1", false, &[("users", "users_restored")], false).unwrap();
    let after = n.dump(INTO);
    for coll in ["users", "orders", "extra"] {
        assert_eq!(after[coll], before[coll], "{coll} changed");
    }
    assert_eq!(docs_of(&n, "users_restored"), backup_users());
    assert_eq!(after.len(), 4, "{:?}", after.keys());
    // Sums recomputed under the new name: storage and catalog agree.
    let v = n.engine.verify_checksum(INTO).unwrap();
    assert!(v.mismatched.is_empty() && v.recorded == v.scanned, "{v:?}");
    assert!(n.dump(STAGING).is_empty());
}

#[test]
fn a_publish_onto_an_existing_collection_is_refused_unless_it_replaces() {
    let mut n = served();
    stage(&mut n, "r1");
    let (shop, staging, oplog) = (n.dump(INTO), n.dump(STAGING), n.oplog_json(INTO));
    let e = n.publish("r1", false, &[("orders", "o2"), ("users", "users")], false).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("collection users exists in database shop"), "{e:?}");
    assert_eq!((n.dump(INTO), n.dump(STAGING), n.oplog_json(INTO)), (shop.clone(), staging, oplog));
    assert_eq!(n.engine.incoming_migration(STAGING).as_deref(), Some("r1"));

    n.publish("r1", false, &[("users", "users")], true).unwrap();
    let after = n.dump(INTO);
    assert_eq!(docs_of(&n, "users"), backup_users());
    assert_eq!(after["users"].2.len(), 2, "the import's indexes replace the served ones");
    assert_eq!(after["orders"], shop["orders"]);
    assert_eq!(after["extra"], shop["extra"]);
    assert!(!after.contains_key("archive"));
    let v = n.engine.verify_checksum(INTO).unwrap();
    assert!(v.mismatched.is_empty() && v.recorded == v.scanned, "{v:?}");
}

#[test]
fn a_repeated_publish_answers_done_and_changes_nothing() {
    let mut n = served();
    stage(&mut n, "r1");
    n.publish("r1", true, &[], false).unwrap();
    let (shop, oplog) = (n.dump(INTO), n.oplog_json(INTO));
    assert_eq!(n.publish("r1", true, &[], false).unwrap(), WriteAnswer::Done);
    assert_eq!((n.dump(INTO), n.oplog_json(INTO)), (shop, oplog));
    // Another import's Publish is not answered by it.
    let e = n.publish("r2", true, &[], false).unwrap_err();
    assert!(e.message.contains("send Begin first"), "{e:?}");
    // Nor can the published import be aborted.
    let e = n.import(STAGING, "r1", ImportStep::Abort).unwrap_err();
    assert!(e.message.contains("cannot be aborted"), "{e:?}");
}

#[test]
fn a_publish_without_its_import_or_to_the_wrong_database_is_refused_and_changes_nothing() {
    let mut n = served();
    let shop = n.dump(INTO);
    let e = n.publish("r1", true, &[], false).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("send Begin first"), "{e:?}");

    stage(&mut n, "r1");
    let staging = n.dump(STAGING);
    let refused = |n: &mut Node, db: &str, migration: &str, step: ImportStep| {
        let e = n.import(db, migration, step).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
        e.message
    };
    let whole = |into: &str| ImportStep::Publish {
        into: into.into(),
        whole: true,
        collections: vec![],
        replace: false,
        route_epoch: None,
    };
    // Another import's id.
    assert!(refused(&mut n, STAGING, "r2", whole(INTO)).contains("incoming for migration r1"));
    // Sent to the database itself, or to another database's staging.
    assert!(refused(&mut n, INTO, "r1", whole(INTO)).contains("staging database shop~restore"));
    assert!(refused(&mut n, STAGING, "r1", whole("other")).contains("staging database other~restore"));
    assert!(refused(&mut n, STAGING, "r1", whole("shop~x")).contains("database"));
    // A collection the import does not have; a whole publish naming collections.
    let missing = ImportStep::Publish {
        into: INTO.into(),
        whole: false,
        collections: vec![PublishedCollection { from: "nope".into(), to: "x".into() }],
        replace: true,
        route_epoch: None,
    };
    assert!(refused(&mut n, STAGING, "r1", missing).contains("collection nope is not in the import"));
    let both = ImportStep::Publish {
        into: INTO.into(),
        whole: true,
        collections: vec![PublishedCollection { from: "users".into(), to: "x".into() }],
        replace: true,
        route_epoch: None,
    };
    assert!(refused(&mut n, STAGING, "r1", both).contains("names no collections"));
    assert_eq!((n.dump(INTO), n.dump(STAGING)), (shop, staging));

    // Into a database that is itself being imported.
    n.import("fresh", "m", ImportStep::Begin).unwrap();
    n.import("fresh~restore", "r3", ImportStep::Begin).unwrap();
    let msg = refused(&mut n, "fresh~restore", "r3", whole("fresh"));
    assert!(msg.contains("fresh is itself being imported"), "{msg}");
}

#[test]
fn a_publish_over_the_bound_is_refused_and_changes_nothing() {
    let bytes: u64 = [backup_users(), backup_orders(), backup_archive()]
        .iter()
        .flatten()
        .map(|d| serde_json::to_string(d).unwrap().len() as u64)
        .sum();
    let mut n = Node::new(EngineOptions { max_publish_bytes: bytes - 1, ..Default::default() });
    populate_served(&mut n);
    stage(&mut n, "r1");
    let (shop, staging, oplog) = (n.dump(INTO), n.dump(STAGING), n.oplog_json(INTO));
    let e = n.publish("r1", true, &[], false).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("restore into a new database instance"), "{e:?}");
    assert_eq!((n.dump(INTO), n.dump(STAGING), n.oplog_json(INTO)), (shop, staging, oplog));
    // Within the bound (fewer collections) it applies.
    n.publish("r1", false, &[("users", "users")], true).unwrap();
    assert_eq!(docs_of(&n, "users"), backup_users());
}

#[test]
fn a_publish_waits_until_the_imports_indexes_are_built() {
    let mut n = served();
    n.import(STAGING, "r1", ImportStep::Begin).unwrap();
    // Documents first, then the index: its build takes steps (the leader's builder
    // proposes them on a staging database as on any other).
    let docs: Vec<ExportedDoc> = (0..600)
        .map(|i| ExportedDoc {
            coll: "big".into(),
            doc: serde_json::value::to_raw_value(&json!({"_id": i, "k": format!("v{i}")})).unwrap(),
        })
        .collect();
    n.import(STAGING, "r1", ImportStep::Docs { docs }).unwrap();
    let spec = serde_json::to_value(index("by_k", json!({"k": 1}), true)).unwrap();
    let collections = vec![ExportedCollection { name: "big".into(), indexes: vec![spec] }];
    n.import(STAGING, "r1", ImportStep::Collections { collections }).unwrap();
    assert!(!n.engine.building_indexes().is_empty(), "the index built in one step: the test needs more documents");

    let (shop, staging) = (n.dump(INTO), n.dump(STAGING));
    let e = n.publish("r1", false, &[("big", "big")], false).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert!(e.code.is_retryable() && e.message.contains("index by_k of collection big"), "{e:?}");
    assert_eq!((n.dump(INTO), n.dump(STAGING)), (shop, staging));

    while let Some((db, coll, name)) = n.engine.building_indexes().pop() {
        assert_eq!(db, STAGING);
        n.apply(&db, WriteOp::BuildIndex { coll, name }).unwrap();
    }
    n.publish("r1", false, &[("big", "big")], false).unwrap();
    let big = &n.dump(INTO)["big"];
    assert_eq!(big.0.len(), 600);
    assert!(big.2.iter().all(IndexSpec::is_ready));
    let e = n.apply(INTO, insert("big", &[json!({"_id": "new", "k": "v42"})])).unwrap_err();
    assert_eq!(e.code, ErrorCode::DuplicateKey, "{e:?}");
}

#[test]
fn the_oplog_of_the_database_replays_to_what_was_published() {
    let mut n = served();
    stage(&mut n, "r1");
    let before = n.oplog(INTO).len();
    n.publish("r1", true, &[], false).unwrap();
    let oplog = n.oplog(INTO);

    // The publish's changes: one entry's, in order, as ordinary changes.
    let published = &oplog[before..];
    assert!(published.iter().all(|e| e.index == n.index && e.db == INTO), "{published:?}");
    assert!(published.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    let kinds: Vec<(String, &str)> = published
        .iter()
        .map(|e| {
            let kind = match &e.op {
                OplogOp::DropCollection => "drop",
                OplogOp::CreateCollection => "create",
                OplogOp::CreateIndex { .. } => "index",
                OplogOp::Put { .. } => "put",
                other => panic!("unexpected change {other:?}"),
            };
            (e.coll.clone().unwrap(), kind)
        })
        .collect();
    let mut expected: Vec<(String, &str)> =
        ["extra", "orders", "users"].iter().map(|c| (c.to_string(), "drop")).collect();
    for (coll, docs, indexes) in [("archive", 1, 0), ("orders", 2, 0), ("users", 5, 2)] {
        expected.push((coll.into(), "create"));
        expected.extend(std::iter::repeat_n((coll.to_string(), "index"), indexes));
        expected.extend(std::iter::repeat_n((coll.to_string(), "put"), docs));
    }
    assert_eq!(kinds, expected);

    // Replayed from the start into another replica set (as a migration's catch-up or a
    // restore from the archive does), the whole history gives the published database.
    let mut replica = Node::new(EngineOptions::default());
    replica.import(INTO, "m", ImportStep::Begin).unwrap();
    replica.import(INTO, "m", ImportStep::Ops { entries: oplog }).unwrap();
    replica.import(INTO, "m", ImportStep::Finish { epoch: 1 }).unwrap();
    while let Some((db, coll, name)) = replica.engine.building_indexes().pop() {
        replica.apply(&db, WriteOp::BuildIndex { coll, name }).unwrap();
    }
    let strip = |d: BTreeMap<String, (Vec<Value>, Value, Vec<IndexSpec>)>| {
        d.into_iter()
            .map(|(c, (docs, info, ixs))| {
                let ixs: Vec<_> = ixs.into_iter().map(|i| (i.is_ready(), i.name, i.fields, i.unique)).collect();
                (c, docs, info, ixs)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(replica.dump(INTO)), strip(n.dump(INTO)));
    assert_eq!(replica.checksum(INTO), n.checksum(INTO));
}

/// A migration fenced the database here (its route epoch raised past the one the restore
/// saw): the publish is refused as a stale route and changes nothing; at the epoch in
/// force it goes through.
#[test]
fn a_publish_with_an_older_route_epoch_than_the_replica_sets_is_refused() {
    let mut n = served();
    stage(&mut n, "r1");
    let (shop, staging) = (n.dump(INTO), n.dump(STAGING));
    let publish = |epoch: u64| ImportStep::Publish {
        into: INTO.into(),
        whole: true,
        collections: vec![],
        replace: true,
        route_epoch: Some(epoch),
    };
    let e = n.import(STAGING, "r1", publish(4)).unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleRoute, "{e:?}");
    assert_eq!((n.dump(INTO), n.dump(STAGING)), (shop.clone(), staging));
    n.import(STAGING, "r1", publish(5)).unwrap();
    assert_ne!(n.dump(INTO), shop, "published at the epoch in force");
    // Repeated after a fence raised the epoch: answered as done, not refused as stale (the
    // restore would otherwise start over and publish again over newer writes).
    n.apply(INTO, WriteOp::SetRouteEpoch { epoch: 6 }).unwrap();
    n.import(STAGING, "r1", publish(5)).unwrap();
}

/// A database being imported is not exported (a full backup of a new instance taken while
/// its restore imports would be partial for good); once served, it is.
#[test]
fn a_database_being_imported_is_not_exported_until_it_is_served() {
    let mut n = served();
    stage(&mut n, "r1");
    let err =
        n.engine.export_page(STAGING, nimbus_api::migration::ExportPart::Documents, None, 1 << 20, None).unwrap_err();
    assert!(err.to_string().contains("is being imported"), "{err}");
    let page = n.engine.export_page(INTO, nimbus_api::migration::ExportPart::Documents, None, 1 << 20, None).unwrap();
    assert!(!page.docs.is_empty());
}

/// A node importing `db` under import `id`: its `users` copied in, not finished.
fn imported_users(db: &str, id: &str) -> Node {
    let mut n = Node::new(EngineOptions::default());
    n.import(db, id, ImportStep::Begin).unwrap();
    let collections = vec![ExportedCollection { name: "users".into(), indexes: vec![] }];
    n.import(db, id, ImportStep::Collections { collections }).unwrap();
    let docs = backup_users()
        .iter()
        .map(|d| ExportedDoc { coll: "users".into(), doc: serde_json::value::to_raw_value(d).unwrap() })
        .collect();
    n.import(db, id, ImportStep::Docs { docs }).unwrap();
    n
}

/// A restore into a new instance imports straight into the database and `Finish`es it at
/// the route's epoch. The instance deleted meanwhile fenced the database (its route epoch
/// raised here): the `Finish` is refused as a stale route and the copy stays unserved; a
/// `Finish` at the epoch in force (a migration's new route) serves it.
#[test]
fn a_finish_older_than_the_fence_is_refused_and_the_copy_stays_unserved() {
    const NEW: &str = "fresh";
    let mut n = imported_users(NEW, "r1");
    // The deletion's fence: `SetRouteEpoch { route.epoch + 1 }`.
    n.apply(NEW, WriteOp::SetRouteEpoch { epoch: 6 }).unwrap();

    let e = n.import(NEW, "r1", ImportStep::Finish { epoch: 5 }).unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleRoute, "{e:?}");
    assert!(e.message.contains("epoch 6"), "{e:?}");
    for epoch in [5, 6, 7] {
        assert!(n.engine.check_route_epoch(NEW, epoch).is_err(), "still imported, not served, at {epoch}");
    }
    assert_eq!(n.engine.incoming_migration(NEW).as_deref(), Some("r1"));
    // A migration's `Finish` carries its new route's epoch, newer than any fence it knows.
    n.import(NEW, "r1", ImportStep::Finish { epoch: 7 }).unwrap();
    assert!(n.engine.check_route_epoch(NEW, 7).is_ok());
    assert_eq!(n.dump(NEW)["users"].0.len(), backup_users().len());
}

#[test]
fn a_finished_import_leaves_one_mark_in_the_oplog_and_no_replay_crosses_it() {
    const NEW: &str = "fresh";
    let mut n = imported_users(NEW, "r1");
    assert!(n.oplog(NEW).is_empty(), "an import writes no changes of its own");
    n.import(NEW, "r1", ImportStep::Finish { epoch: 5 }).unwrap();
    // Repeated: answered, and no second mark.
    n.import(NEW, "r1", ImportStep::Finish { epoch: 5 }).unwrap();
    let oplog = n.oplog(NEW);
    assert_eq!(oplog.len(), 1, "{oplog:?}");
    assert!(matches!(&oplog[0].op, OplogOp::Imported { import } if import == "r1"), "{oplog:?}");

    // The mark replayed into another import (a restore's replay, a migration's catch-up)
    // is refused, and that import keeps what it had.
    const OTHER: &str = "other";
    n.import(OTHER, "r2", ImportStep::Begin).unwrap();
    let mut entry = oplog[0].clone();
    entry.db = OTHER.into();
    let e = n.import(OTHER, "r2", ImportStep::Ops { entries: vec![entry] }).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
    assert!(e.message.contains("marks import r1"), "{e:?}");
    assert_eq!(n.engine.incoming_migration(OTHER).as_deref(), Some("r2"));
}
