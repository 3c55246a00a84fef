//! The operator's backups to S3, from its flags to the bucket: `nimbus-operator run`'s
//! backup flags parsed as clap parses them (`--backup-url s3://...` and its S3 settings,
//! credentials from the environment), opened as the operator opens them, and the
//! operator's `Backups` (one agent per namespace, the store's prefix) taking a database's
//! first full into moto's S3 server, where it lists and reads back under
//! `{prefix}/{namespace}/{db}/`. The database is a small model of a replica set (the agent's
//! datanode and etcd calls); the store, the S3 client and the agent are the real ones.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod moto;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use nimbus_api::etcd::{Route, RouteState};
use nimbus_api::migration::{
    DbOplogPage, ExportPage, ExportRequest, ExportedCollection, ExportedDoc, OplogPosition, PinOplogRequest,
};
use nimbus_operator::controlplane::backup::Incarnation;
use nimbus_operator::controlplane::backup::agent::{AgentTuning, ArchiveRecord, BackupWorld, now_ms};
use nimbus_operator::controlplane::migration::{ChecksumMarker, Failure, ReplicaSetAccess};
use nimbus_operator::crd::v1alpha1::DatabaseInstance;
use nimbus_operator::k8s::backup::{BackupArgs, Backups};
use object_store::ObjectStore;
use serde_json::json;
use serde_json::value::RawValue;

use moto::{BUCKET, start_moto};

const NS: &str = "apps";
const DB: &str = "shop";
/// How long the agent may take to list the bucket and take the first full.
const FULL_DEADLINE: Duration = Duration::from_secs(30);

/// `nimbus-operator run`'s backup flags.
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    backup: BackupArgs,
}

/// One database on one replica set, three documents, nobody writing: what a full exports.
#[derive(Default)]
struct Shop {
    record: Mutex<Option<(ArchiveRecord, u64)>>,
}

const APPLIED: u64 = 10;

fn access() -> ReplicaSetAccess {
    ReplicaSetAccess { namespace: NS.into(), name: "rs-a".into(), leader_admin: "leader".into(), members: vec![] }
}

#[async_trait]
impl BackupWorld for Shop {
    async fn route(&self, db: &str) -> Result<Option<Route>, Failure> {
        Ok((db == DB).then(|| Route {
            replica_set: "rs-a".into(),
            members: vec![],
            epoch: 1,
            state: RouteState::Serving,
            hold_deadline_ms: None,
            hold_timeout_ms: None,
        }))
    }

    async fn replica_set(&self, _namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
        Ok((name == "rs-a").then(access))
    }

    async fn export(&self, _rs: &ReplicaSetAccess, req: &ExportRequest) -> Result<ExportPage, Failure> {
        assert_eq!(req.db, DB);
        let docs = (1..=3)
            .map(|id| ExportedDoc {
                coll: "orders".into(),
                doc: RawValue::from_string(format!(r#"{{"_id":{id},"total":{}}}"#, id * 10)).unwrap(),
            })
            .collect();
        Ok(ExportPage {
            index: APPLIED,
            clock_ms: now_ms(),
            collections: vec![ExportedCollection { name: "orders".into(), indexes: vec![] }],
            docs,
            idempotency: vec![],
            next: None,
        })
    }

    async fn oplog(&self, _: &ReplicaSetAccess, _: &str, after: OplogPosition, _: u32) -> Result<DbOplogPage, Failure> {
        Ok(DbOplogPage {
            entries: vec![],
            next: after.max(OplogPosition::end_of(APPLIED)),
            applied_index: APPLIED,
            clock_ms: now_ms(),
        })
    }

    async fn pin_oplog(&self, _rs: &ReplicaSetAccess, _req: &PinOplogRequest) -> Result<(), Failure> {
        Ok(())
    }

    async fn checksum(&self, _rs: &ReplicaSetAccess, _db: &str) -> Result<ChecksumMarker, Failure> {
        Err(Failure::Refused("no checksums here".into()))
    }

    async fn archive_record(
        &self,
        _db: &str,
        _incarnation: &Incarnation,
    ) -> Result<Option<(ArchiveRecord, u64)>, Failure> {
        Ok(self.record.lock().unwrap().clone())
    }

    async fn save_archive_record(&self, record: &ArchiveRecord, expected: Option<u64>) -> Result<Option<u64>, Failure> {
        let mut stored = self.record.lock().unwrap();
        if stored.as_ref().map(|(_, r)| *r) != expected {
            return Ok(None);
        }
        let revision = expected.unwrap_or(0) + 1;
        *stored = Some((record.clone(), revision));
        Ok(Some(revision))
    }

    async fn delete_archive_record(&self, db: &str, incarnation: &Incarnation) -> Result<(), Failure> {
        let mut stored = self.record.lock().unwrap();
        if stored.as_ref().is_some_and(|(r, _)| r.db == db && &r.incarnation == incarnation) {
            *stored = None;
        }
        Ok(())
    }
}

fn shop_instance() -> DatabaseInstance {
    serde_json::from_value(json!({
        "apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
        "metadata": {"name": DB, "namespace": NS, "uid": "uid-shop", "generation": 1},
        "spec": {"backup": {"retentionDays": 3}},
        "status": {"phase": "Ready", "database": DB, "placement": {"replicaSet": "default-rs0", "pool": "default"}}
    }))
    .unwrap()
}

#[tokio::test]
async fn the_operators_s3_flags_open_the_bucket_and_its_backup_agent_writes_a_full_there() {
    let moto = start_moto();
    let flags = Flags::try_parse_from([
        "run",
        "--backup-url",
        &format!("s3://{BUCKET}/nimbus/prod"),
        "--backup-s3-endpoint",
        &moto.endpoint,
        "--backup-s3-region",
        "eu-west-3",
        "--backup-s3-allow-http",
    ])
    .unwrap();
    // The credentials as the chart's Secret gives them: the process's environment.
    let env = |name: &str| match name {
        "AWS_ACCESS_KEY_ID" => Some("AKIDNIMBUSTEST".to_string()),
        "AWS_SECRET_ACCESS_KEY" => Some("nimbus-test-secret".to_string()),
        _ => None,
    };
    let (storage, opened) = flags.backup.open_with(env).unwrap().expect("backups on");
    assert_eq!(storage.to_string(), format!("s3://{BUCKET}/nimbus/prod"));
    assert_eq!(opened.prefix, "nimbus/prod");

    let tuning = AgentTuning {
        read_bytes_per_sec: 0,
        poll: Duration::from_millis(20),
        retry: Duration::from_millis(50),
        idle_tick: Duration::from_millis(50),
        segment_time: Duration::from_millis(100),
        ..AgentTuning::default()
    };
    let backups = Backups::new(Arc::new(Shop::default()), opened.clone(), tuning);
    assert!(backups.running());
    let shop = shop_instance();
    backups.set_instances([&shop]);

    // The namespace's agent takes the new database's first full at once: poll its status.
    let deadline = tokio::time::Instant::now() + FULL_DEADLINE;
    let status = loop {
        match backups.status(&shop) {
            Some(s) if s.last_full.is_some() => break s,
            other => assert!(tokio::time::Instant::now() < deadline, "no full in time; status: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.error, None);

    // In the bucket, under the URL's prefix, the namespace (the agent's scope) and the
    // database, readable through the store the restore runner opens the same way.
    // The instance's UID is its backups' incarnation.
    let store = opened.backup_store(NS, DB, &Incarnation::new("uid-shop").unwrap()).unwrap();
    let fulls = store.list_fulls().await.unwrap().complete;
    assert_eq!(fulls.len(), 1, "{fulls:?}");
    let full = &fulls[0];
    assert_eq!((full.db.as_str(), full.docs, full.pages.len()), (DB, 3, 1));
    let page = store.read_page(&full.id, &full.pages[0]).await.unwrap();
    assert_eq!(page.docs[2].doc.get(), r#"{"_id":3,"total":30}"#);
    let mut keys = BTreeMap::new();
    let mut listing = opened.store.list(None);
    while let Some(meta) = futures::StreamExt::next(&mut listing).await {
        let meta = meta.unwrap();
        keys.insert(meta.location.to_string(), meta.size);
    }
    let full_dir = format!("nimbus/prod/{NS}/{DB}/uid-shop/full/{}/", full.id);
    assert!(
        keys.keys().any(|k| k.starts_with(&format!("{full_dir}manifest_")) && k.ends_with(".json")),
        "no manifest under {full_dir} in the bucket: {keys:#?}"
    );
    assert!(keys.keys().all(|k| k.starts_with(&format!("nimbus/prod/{NS}/{DB}/uid-shop/"))), "{keys:#?}");
    drop(backups);
}
