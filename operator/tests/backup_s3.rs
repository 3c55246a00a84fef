//! The backup store through `object_store`'s real S3 client (signed requests, XML listings,
//! bulk deletes) and our hyper + rustls transport, against moto's S3-compatible server
//! started here on 127.0.0.1, port 0: what is written reads back verified, damage is
//! refused naming the object, retention deletes, and a restore reads a full and its
//! segments from the bucket. moto comes from `scripts/setup.sh`; without it these tests
//! fail saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod moto;

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::migration::{ExportPage, ImportAnswer, ImportRequest, ImportStep, OplogPosition};
use nimbus_operator::controlplane::backup::restore::{RestoreInto, RestoreWorld, restore};
use nimbus_operator::controlplane::backup::{
    BackupError, BackupStorage, BackupStore, FORMAT_VERSION, FullId, FullManifest, Lineage, NewSegment, OpenedStorage,
    RestoreTarget, RetentionPolicy, S3Credentials, S3Options, StorageError, plan_restore, retention,
};
use nimbus_operator::controlplane::migration::{ChecksumMarker, Failure, ReplicaSetAccess};
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{Value, json};

use moto::{BUCKET, Moto, start_moto};

/// The bucket through [`BackupStorage`], as the operator opens it.
fn open(moto: &Moto, bucket: &str) -> OpenedStorage {
    let options = S3Options {
        endpoint: Some(moto.endpoint.clone()),
        region: Some("eu-west-3".to_string()),
        allow_http: true,
        credentials: S3Credentials::Static {
            access_key_id: "AKIDNIMBUSTEST".to_string(),
            secret_access_key: "nimbus-test-secret".to_string(),
            session_token: None,
        },
        ..S3Options::default()
    };
    BackupStorage::parse(&format!("s3://{bucket}/nimbus/prod"), options).unwrap().open().unwrap()
}

fn lineage() -> Lineage {
    Lineage::new("rs-1.e1").unwrap()
}

fn page(index: u64, ids: std::ops::Range<u32>) -> ExportPage {
    let docs: Vec<_> = ids.map(|i| json!({"coll": "orders", "doc": {"_id": i, "total": i * 10}})).collect();
    serde_json::from_value(json!({
        "index": index, "clockMs": 1_000 + index,
        "collections": [{"name": "orders", "indexes": []}],
        "docs": docs, "idempotency": []
    }))
    .unwrap()
}

fn change(index: u64, id: u64, total: Option<u64>) -> OplogEntry {
    let op = match total {
        Some(t) => OplogOp::Put { id: json!(id), doc: json!({"_id": id, "total": t}) },
        None => OplogOp::Delete { id: json!(id) },
    };
    OplogEntry { index, seq: 0, ts_ms: 1_000 + index, db: "shop".to_string(), coll: Some("orders".to_string()), op }
}

/// A two-page full (snapshots at 10 and 12), with its manifest or not.
async fn write_full(store: &BackupStore, id: &FullId, with_manifest: bool) -> FullManifest {
    let p0 = store.put_page(id, 0, &page(10, 0..50)).await.unwrap();
    let p1 = store.put_page(id, 1, &page(12, 50..80)).await.unwrap();
    let manifest = FullManifest {
        format: FORMAT_VERSION,
        id: id.clone(),
        db: "shop".to_string(),
        lineage: lineage(),
        start: OplogPosition::end_of(10),
        end: OplogPosition::end_of(12),
        start_ms: 1_010,
        end_ms: 1_012,
        docs: p0.docs + p1.docs,
        bytes: p0.bytes + p1.bytes,
        pages: vec![p0, p1],
        checksum: None,
    };
    if with_manifest {
        store.put_manifest(&manifest).await.unwrap();
    }
    manifest
}

fn segment(after: u64, through: u64, entries: Vec<OplogEntry>) -> NewSegment {
    NewSegment {
        lineage: lineage(),
        after: OplogPosition::end_of(after),
        through: OplogPosition::end_of(through),
        covered_through_ms: 1_000 + through,
        entries,
    }
}

#[tokio::test]
async fn backups_round_trip_through_s3_verified_and_damage_is_refused_naming_the_object() {
    let moto = start_moto();
    let opened = open(&moto, BUCKET);
    let store = opened.backup_store("ns", "shop", &incarnation()).unwrap();
    let id = FullId::new(1_000, 7);
    let manifest = write_full(&store, &id, true).await;
    let s1 = store.put_segment(&segment(10, 14, vec![change(11, 1, None), change(13, 2, Some(7))])).await.unwrap();
    let s2 = store.put_segment(&segment(14, 20, vec![change(17, 90, Some(9))])).await.unwrap();

    // Listed and read back through S3, every read checked against its digest.
    let listing = store.list_fulls().await.unwrap();
    assert_eq!(listing.complete, vec![manifest.clone()]);
    assert!(listing.incomplete.is_empty() && listing.damaged.is_empty(), "{listing:?}");
    assert_eq!(store.list_segments().await.unwrap(), vec![s1.clone(), s2.clone()]);
    assert_eq!(store.read_manifest(&id).await.unwrap(), manifest);
    let back = store.read_page(&id, &manifest.pages[1]).await.unwrap();
    assert_eq!((back.index, back.docs.len()), (12, 30));
    assert_eq!(back.docs[0].doc.get(), r#"{"_id":50,"total":500}"#);
    let entries = store.read_segment(&s1).await.unwrap();
    assert_eq!(entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![11, 13]);

    // The objects are where the layout says, under the location's prefix, in the bucket.
    let page_path = store.location().page(&id, 1);
    assert_eq!(page_path.as_ref(), format!("nimbus/prod/ns/shop/uid-1/full/{id}/000001.page"));
    let bytes = opened.store.get(&page_path).await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, manifest.pages[1].bytes);

    // One flipped byte in the bucket: the page is refused, naming it; its neighbour reads.
    let mut damaged = bytes.to_vec();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    opened.store.put(&page_path, PutPayload::from(damaged)).await.unwrap();
    let err = store.read_page(&id, &manifest.pages[1]).await.unwrap_err();
    assert!(matches!(err, BackupError::Damaged { .. }), "{err:?}");
    assert!(err.to_string().starts_with(&format!("backup object {page_path} is damaged: SHA-256 ")), "{err}");
    assert!(!err.is_retryable());
    store.read_page(&id, &manifest.pages[0]).await.unwrap();

    // A segment gone from the bucket is missing, by name.
    opened.store.delete(&store.location().segment(&s2)).await.unwrap();
    let err = store.read_segment(&s2).await.unwrap_err();
    assert!(matches!(err, BackupError::Missing { .. }), "{err:?}");
    assert!(err.to_string().ends_with(&format!("{} is missing", s2.file_name())), "{err}");
}

#[tokio::test]
async fn retention_deletes_backups_from_s3_and_a_missing_bucket_is_an_error() {
    let moto = start_moto();
    let store = open(&moto, BUCKET).backup_store("ns", "shop", &incarnation()).unwrap();
    let old = FullId::new(1_000, 1);
    let newer = FullId::new(5_000, 2);
    let unfinished = FullId::new(9_000, 3);
    write_full(&store, &old, true).await;
    write_full(&store, &newer, true).await;
    write_full(&store, &unfinished, false).await;
    let listing = store.list_fulls().await.unwrap();
    assert_eq!(listing.complete.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), vec![old.clone(), newer.clone()]);
    assert_eq!(listing.incomplete, vec![unfinished.clone()]);

    // Past the window and the grace: the old full and the unfinished one go, in bulk deletes.
    let policy = RetentionPolicy { window_ms: 1_000, incomplete_grace_ms: 1_000 };
    let segments = store.list_segments().await.unwrap();
    let deletions = retention(&listing, &segments, 20_000, &policy);
    assert!(deletions.fulls.contains(&old) && deletions.fulls.contains(&unfinished), "{deletions:?}");
    assert!(!deletions.fulls.contains(&newer), "{deletions:?}");
    store.apply(&deletions).await.unwrap();
    let after = store.list_fulls().await.unwrap();
    assert_eq!(after.complete.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), vec![newer]);
    assert!(after.incomplete.is_empty(), "{after:?}");
    // Redone (a retention run interrupted): nothing left to delete is not an error.
    store.apply(&deletions).await.unwrap();

    // A bucket that does not exist: an error naming what failed, not an empty listing.
    let missing = open(&moto, "no-such-bucket").backup_store("ns", "shop", &incarnation()).unwrap();
    let err = missing.list_fulls().await.unwrap_err();
    assert!(err.to_string().starts_with("failed to list backup object nimbus/prod/ns/shop/uid-1/full"), "{err}");
}

#[tokio::test]
async fn plain_http_to_s3_needs_allow_http() {
    let options = S3Options { endpoint: Some("http://127.0.0.1:9000".to_string()), ..S3Options::default() };
    let err = BackupStorage::parse("s3://bucket", options).unwrap_err();
    assert!(matches!(err, StorageError::InvalidOption { option: "endpoint", .. }), "{err:?}");
}

/// A restore target that keeps what it is sent (the import protocol's rules are tested
/// with the engine; here only the bytes from S3 matter).
#[derive(Default)]
struct Target {
    docs: Mutex<BTreeMap<String, String>>,
}

#[async_trait]
impl RestoreWorld for Target {
    async fn import(&self, _rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        let mut docs = self.docs.lock().unwrap();
        match &req.step {
            ImportStep::Docs { docs: page } => {
                for d in page {
                    let v: Value = serde_json::from_str(d.doc.get()).unwrap();
                    docs.insert(v["_id"].to_string(), v.to_string());
                }
            }
            ImportStep::Ops { entries } => {
                for e in entries {
                    match &e.op {
                        OplogOp::Put { id, doc } => docs.insert(id.to_string(), doc.to_string()),
                        OplogOp::Delete { id } => docs.remove(&id.to_string()),
                        other => panic!("unexpected change {other:?}"),
                    };
                }
            }
            _ => {}
        }
        Ok(ImportAnswer { index: 1 })
    }

    async fn checksum(&self, _rs: &ReplicaSetAccess, _db: &str) -> Result<ChecksumMarker, Failure> {
        let documents = self.docs.lock().unwrap().len() as u64;
        Ok(ChecksumMarker { index: 1, checksum: String::new(), documents, catalog: None })
    }
}

#[tokio::test]
async fn a_restore_reads_its_full_and_segments_from_s3() {
    let moto = start_moto();
    let store = open(&moto, BUCKET).backup_store("ns", "shop", &incarnation()).unwrap();
    let id = FullId::new(1_000, 7);
    write_full(&store, &id, true).await;
    store.put_segment(&segment(10, 14, vec![change(11, 1, None), change(13, 2, Some(7))])).await.unwrap();
    store.put_segment(&segment(14, 20, vec![change(17, 90, Some(9)), change(19, 3, None)])).await.unwrap();

    let fulls = store.list_fulls().await.unwrap().complete;
    let plan = plan_restore(&fulls, &store.list_segments().await.unwrap(), RestoreTarget::Time(1_017)).unwrap();
    let target = Target::default();
    let rs =
        ReplicaSetAccess { namespace: "ns".into(), name: "rs-2".into(), leader_admin: "x".into(), members: vec![] };
    let outcome =
        restore(&target, &store, &plan, &RestoreInto::new(rs, "shop-restored", "restore-1", Some(3))).await.unwrap();

    // 80 documents of the full; 1 deleted, 2 changed, 90 added; 3's deletion is after the time.
    let docs = target.docs.lock().unwrap();
    assert_eq!(docs.len(), 80);
    assert!(!docs.contains_key("1") && docs.contains_key("3"));
    assert_eq!(docs["2"], r#"{"_id":2,"total":7}"#);
    assert_eq!(docs["90"], r#"{"_id":90,"total":9}"#);
    assert_eq!((outcome.full, outcome.documents_loaded, outcome.changes_applied), (id, 80, 3));
}

/// The instance incarnation every test here writes under.
fn incarnation() -> nimbus_operator::controlplane::backup::Incarnation {
    nimbus_operator::controlplane::backup::Incarnation::new("uid-1").unwrap()
}
