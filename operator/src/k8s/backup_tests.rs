//! Backups on Kubernetes: which instances are backed up, and `status.backup` written from a
//! real backup agent (a filesystem store holding one full) through the in-memory API server
//! with the chart's RBAC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nimbus_api::etcd::Route;
use nimbus_api::migration::{DbOplogPage, ExportPage, ExportRequest, OplogPosition, PinOplogRequest};
use serde_json::json;

use super::backup::{self, BackupArgs, Backups, SetupError};
use super::fixtures::{FakeApi, INSTANCES, NS};
use crate::controlplane::backup::agent::{AgentTuning, ArchiveRecord, BackupWorld};
use crate::controlplane::backup::{
    BackupStorage, FORMAT_VERSION, FullId, FullManifest, Incarnation, Lineage, OpenedStorage, PageEntry, S3Credentials,
    StorageError,
};
use crate::controlplane::migration::{ChecksumMarker, Failure, ReplicaSetAccess};
use crate::crd::v1alpha1::DatabaseInstance;

/// A world where no database has a route yet: the agent lists its store and takes nothing.
struct Unrouted;

#[async_trait]
impl BackupWorld for Unrouted {
    async fn route(&self, _db: &str) -> Result<Option<Route>, Failure> {
        Ok(None)
    }
    async fn replica_set(&self, _ns: &str, _name: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
        Ok(None)
    }
    async fn export(&self, _rs: &ReplicaSetAccess, _req: &ExportRequest) -> Result<ExportPage, Failure> {
        Err(Failure::Gone("no replica set".into()))
    }
    async fn oplog(&self, _: &ReplicaSetAccess, _: &str, _: OplogPosition, _: u32) -> Result<DbOplogPage, Failure> {
        Err(Failure::Gone("no replica set".into()))
    }
    async fn pin_oplog(&self, _rs: &ReplicaSetAccess, _req: &PinOplogRequest) -> Result<(), Failure> {
        Err(Failure::Gone("no replica set".into()))
    }
    async fn checksum(&self, _rs: &ReplicaSetAccess, _db: &str) -> Result<ChecksumMarker, Failure> {
        Err(Failure::Gone("no replica set".into()))
    }
    async fn archive_record(
        &self,
        _db: &str,
        _incarnation: &Incarnation,
    ) -> Result<Option<(ArchiveRecord, u64)>, Failure> {
        Ok(None)
    }
    async fn save_archive_record(&self, _: &ArchiveRecord, _: Option<u64>) -> Result<Option<u64>, Failure> {
        Ok(Some(1))
    }
    async fn delete_archive_record(&self, _: &str, _: &Incarnation) -> Result<(), Failure> {
        Ok(())
    }
}

fn instance(name: &str, backup: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
        "spec": {"backup": backup},
        "status": {"phase": "Ready", "database": name, "placement": {"replicaSet": "default-rs0", "pool": "default"}}})
}

fn parsed(v: serde_json::Value) -> DatabaseInstance {
    serde_json::from_value(v).unwrap()
}

/// A complete full of `db` ending at `end_ms`, in namespace `NS`'s scope.
async fn store_full(storage: &OpenedStorage, db: &str, end_ms: u64) {
    // The instance's UID is its backups' incarnation (`instance` sets `uid-{name}`).
    let inc = Incarnation::new(&format!("uid-{db}")).unwrap();
    let store = storage.backup_store(NS, db, &inc).unwrap();
    let manifest = FullManifest {
        format: FORMAT_VERSION,
        id: FullId::new(end_ms - 1_000, 7),
        db: db.into(),
        lineage: Lineage::new("default-rs0.e1").unwrap(),
        start: OplogPosition::end_of(10),
        end: OplogPosition::end_of(10),
        start_ms: end_ms - 1_000,
        end_ms,
        docs: 3,
        bytes: 100,
        pages: vec![PageEntry { n: 0, bytes: 100, sha256: "0".repeat(64), docs: 3, index: 10 }],
        checksum: None,
    };
    store.put_manifest(&manifest).await.unwrap();
}

#[test]
fn every_instance_with_backups_on_is_a_target_of_its_namespaces_agent() {
    let on = parsed(instance("shop", json!({"retentionDays": 3})));
    let off = parsed(instance("logs", json!({"enabled": false})));
    let mut deleting = parsed(instance("old", json!({})));
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:00Z".parse().unwrap()));
    let mut elsewhere = parsed(instance("blog", json!({})));
    elsewhere.metadata.namespace = Some("other".into());
    // One whose database name is another's (refused its claim: never placed) is no target:
    // it would take over that one's backups.
    let mut usurper = instance("usurper", json!({}));
    usurper["spec"]["database"] = json!("shop");
    usurper["status"] = json!({"phase": "Failed"});
    let usurper = parsed(usurper);
    let targets = backup::targets_by_namespace("nimbus", [&on, &off, &deleting, &elsewhere, &usurper]);
    assert_eq!(targets.keys().collect::<Vec<_>>(), ["apps", "other"]);
    let apps = &targets["apps"];
    assert_eq!(apps.len(), 1);
    assert_eq!((apps[0].db.as_str(), apps[0].namespace.as_str()), ("shop", "apps"));
    assert_eq!(apps[0].retention.window_ms, 3 * 24 * 3_600_000);
    // The default: 7 days.
    assert_eq!(targets["other"][0].retention.window_ms, 7 * 24 * 3_600_000);
}

#[tokio::test]
async fn status_backup_is_written_from_the_agent_and_removed_when_backups_are_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let args = BackupArgs { backup_dir: Some(dir.path().join("backups")), ..BackupArgs::default() };
    let (_, storage) = args.open_with(|_| None).unwrap().unwrap();
    let end_ms = 1_767_225_600_000;
    store_full(&storage, "shop", end_ms).await;
    let tuning = AgentTuning { poll: Duration::from_millis(10), ..AgentTuning::default() };
    let backups = Backups::new(Arc::new(Unrouted), storage, tuning);
    let api = FakeApi::default();
    api.put(INSTANCES, instance("shop", json!({})));
    let client = api.client();
    let shop = || Arc::new(parsed(api.get(INSTANCES, "shop").unwrap()));
    backups.set_instances([shop().as_ref()]);
    // The agent lists its store in the background: poll until the instance shows the full.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        backup::write_statuses(&backups, &client, None, &[shop()]).await;
        if api.get(INSTANCES, "shop").unwrap()["status"]["backup"]["lastFull"].is_string() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{:#}", api.get(INSTANCES, "shop").unwrap()["status"]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = api.get(INSTANCES, "shop").unwrap()["status"].clone();
    assert_eq!(status["backup"]["lastFull"], "2026-01-01T00:00:00.000Z");
    assert_eq!(status["phase"], "Ready", "only status.backup is written: {status:#}");
    // Unchanged: nothing more is written.
    let calls = api.calls().len();
    backup::write_statuses(&backups, &client, None, &[shop()]).await;
    assert_eq!(api.calls().len(), calls);

    // Turned off for the instance: its agent lets it go and the window goes from the status.
    let mut off = api.get(INSTANCES, "shop").unwrap();
    off["spec"]["backup"] = json!({"enabled": false});
    api.put(INSTANCES, off);
    backups.set_instances([shop().as_ref()]);
    assert_eq!(backup::write_statuses(&backups, &client, None, &[shop()]).await, 1);
    let status = api.get(INSTANCES, "shop").unwrap()["status"].clone();
    assert!(status.get("backup").is_none_or(|b| b.is_null()), "{status:#}");
}

/// The namespace's last instance deleted: its agent stops, and the deleted instance's
/// backups (past `orphan_retention`, zero here) are still swept, by the operator's sweep
/// of namespaces without an agent; while the namespace had an agent (and the instance was
/// its target) they were kept.
#[tokio::test]
async fn a_namespaces_former_instances_are_swept_after_its_agent_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let args = BackupArgs { backup_dir: Some(dir.path().join("backups")), ..BackupArgs::default() };
    let (_, storage) = args.open_with(|_| None).unwrap().unwrap();
    store_full(&storage, "shop", 1_767_225_600_000).await;
    // The objects under the namespace's scope (a swept incarnation leaves empty directories
    // on the filesystem, which S3 does not have).
    let objects = || {
        let storage = storage.clone();
        async move {
            use futures::TryStreamExt as _;
            let scope = crate::controlplane::backup::scope_root(&storage.prefix, NS).unwrap();
            storage.store.list(Some(&scope)).map_ok(|m| m.location.to_string()).try_collect::<Vec<_>>().await.unwrap()
        }
    };
    // A directory under the prefix that cannot be a namespace is not taken for one.
    std::fs::create_dir_all(dir.path().join("backups/Not_A_Namespace/shop/uid-x")).unwrap();
    let tuning =
        AgentTuning { poll: Duration::from_millis(10), orphan_retention: Duration::ZERO, ..AgentTuning::default() };
    let backups = Backups::new(Arc::new(Unrouted), storage.clone(), tuning);
    let shop = parsed(instance("shop", json!({})));
    backups.set_instances([&shop]);
    assert!(backups.sweep_namespaces_without_agent().await.unwrap().is_empty(), "the namespace has its agent");
    assert_eq!(objects().await.len(), 1, "the full's manifest");

    backups.set_instances([]);
    let swept = backups.sweep_namespaces_without_agent().await.unwrap();
    assert_eq!(swept.iter().map(|l| l.incarnation().to_string()).collect::<Vec<_>>(), ["uid-shop"]);
    assert_eq!(objects().await, Vec::<String>::new());
    assert!(dir.path().join("backups/Not_A_Namespace/shop/uid-x").is_dir());
    assert_eq!(backups.sweep_every(), Some(AgentTuning::default().retention_every));
}

#[test]
fn without_a_store_backups_are_off_and_the_instance_says_so() {
    let backups = Backups::off();
    let dbi = parsed(instance("shop", json!({})));
    assert!(!backups.running());
    assert_eq!(backups.status(&dbi), None);
    assert_eq!(dbi.not_yet_active(backups.running()), ["backup", "indexing"]);
    assert_eq!(dbi.not_yet_active(true), ["indexing"]);
}

/// `nimbus-operator run`'s backup flags, parsed as clap parses them.
#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    backup: BackupArgs,
}

fn flags(args: &[&str]) -> Result<BackupArgs, clap::Error> {
    use clap::Parser as _;
    Flags::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|f| f.backup)
}

#[test]
fn the_backup_flags_name_a_directory_or_a_url_with_its_s3_settings() {
    // Nothing given: backups are off.
    assert_eq!(flags(&[]).unwrap().storage().unwrap(), None);
    // --backup-dir: the filesystem.
    let dir = flags(&["--backup-dir", "/var/lib/nimbus/backups"]).unwrap().storage().unwrap();
    assert_eq!(dir, Some(BackupStorage::Local { root: "/var/lib/nimbus/backups".into() }));
    // --backup-url: S3 with its settings beside; the credentials are the environment's.
    let args = flags(&[
        "--backup-url",
        "s3://nimbus-backups/prod/eu",
        "--backup-s3-endpoint",
        "http://minio.infra:9000",
        "--backup-s3-region",
        "eu-west-3",
        "--backup-s3-allow-http",
    ])
    .unwrap();
    let Some(BackupStorage::S3(s3)) = args.storage().unwrap() else { panic!("not S3: {args:?}") };
    assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("nimbus-backups", "prod/eu"));
    assert_eq!(s3.options.endpoint.as_deref(), Some("http://minio.infra:9000"));
    assert_eq!(s3.options.region.as_deref(), Some("eu-west-3"));
    assert!(s3.options.allow_http);
    assert_eq!(s3.options.credentials, S3Credentials::Environment);
    // A path or file:// URL as --backup-url: the filesystem too.
    let file = flags(&["--backup-url", "file:///srv/backups"]).unwrap().storage().unwrap();
    assert_eq!(file, Some(BackupStorage::Local { root: "/srv/backups".into() }));
}

#[test]
fn bad_backup_flags_are_refused_saying_why() {
    // Both: clap refuses them, naming the two.
    let err = flags(&["--backup-dir", "/b", "--backup-url", "s3://bucket"]).map(|_| ()).unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict, "{err}");
    // ...and so does storage() for flags built by hand.
    let both =
        BackupArgs { backup_dir: Some("/b".into()), backup_url: Some("s3://bucket".into()), ..BackupArgs::default() };
    assert!(matches!(both.storage(), Err(SetupError::Both)));
    // A URL that is not one.
    let err = flags(&["--backup-url", "gs://bucket"]).unwrap().storage().unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"invalid backup location "gs://bucket": unknown scheme "gs": expected a path, file:// or s3://"#
    );
    // Plain HTTP without --backup-s3-allow-http.
    let err = flags(&["--backup-url", "s3://bucket", "--backup-s3-endpoint", "http://minio:9000"])
        .unwrap()
        .storage()
        .unwrap_err();
    assert!(matches!(err, SetupError::Storage(StorageError::InvalidOption { option: "endpoint", .. })), "{err}");
    // An S3 setting with no S3 URL would go unused: refused.
    let err = flags(&["--backup-s3-region", "eu-west-3"]).unwrap().storage().unwrap_err();
    assert_eq!(
        err.to_string(),
        "--backup-s3-region (NIMBUS_BACKUP_S3_REGION) applies to an s3:// --backup-url (NIMBUS_BACKUP_URL) \
         only (no --backup-url given)"
    );
    let err = flags(&["--backup-dir", "/b", "--backup-s3-allow-http"]).unwrap().storage().unwrap_err();
    assert!(err.to_string().ends_with("only (backups go to /b)"), "{err}");
}

#[test]
fn half_an_s3_key_pair_in_the_environment_is_refused_at_start() {
    let args = flags(&["--backup-url", "s3://bucket/nimbus"]).unwrap();
    let only_id = |name: &str| (name == "AWS_ACCESS_KEY_ID").then(|| "AKID".to_string());
    let err = args.open_with(only_id).unwrap_err();
    assert_eq!(err.to_string(), "incomplete S3 credentials: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not");
    // Both halves: opened (nothing is sent until the first backup), under the URL's prefix.
    let pair = |name: &str| match name {
        "AWS_ACCESS_KEY_ID" => Some("AKID".to_string()),
        "AWS_SECRET_ACCESS_KEY" => Some("secret".to_string()),
        _ => None,
    };
    let (storage, opened) = args.open_with(pair).unwrap().unwrap();
    assert_eq!(storage.to_string(), "s3://bucket/nimbus");
    assert_eq!(opened.prefix, "nimbus");
}
