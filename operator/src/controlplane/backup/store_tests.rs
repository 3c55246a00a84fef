//! [`BackupStore`] against a real `object_store::local::LocalFileSystem` in a temporary
//! directory: what is written reads back, damage is found and named, incomplete fulls are
//! never restorable, retention's deletions are carried out.

use std::sync::Arc;

use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::migration::{ExportPage, OplogPosition};
use object_store::local::LocalFileSystem;
use serde_json::json;

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    store: BackupStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let fs = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let location = BackupLocation::new("backups", "playground", "shop", &Incarnation::new("inc-1").unwrap()).unwrap();
    Fixture { store: BackupStore::new(Arc::new(fs), location), dir }
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

fn entry(index: u64, ts_ms: u64) -> OplogEntry {
    OplogEntry {
        index,
        seq: 0,
        ts_ms,
        db: "shop".to_string(),
        coll: Some("orders".to_string()),
        op: OplogOp::Put { id: json!(index), doc: json!({"_id": index}) },
    }
}

/// Writes a two-page full, optionally without its manifest.
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
        checksum: Some("00ff".to_string()),
    };
    if with_manifest {
        store.put_manifest(&manifest).await.unwrap();
    }
    manifest
}

/// The one file under the fixture's directory whose name ends with `suffix`.
pub(super) fn file_ending(dir: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    assert_eq!(found.len(), 1, "files ending with {suffix}: {found:?}");
    found.remove(0)
}

#[tokio::test]
async fn backup_full_and_segments_round_trip_through_the_filesystem() {
    let f = fixture();
    let id = FullId::new(1_000, 7);
    let manifest = write_full(&f.store, &id, true).await;
    let seg = f
        .store
        .put_segment(&NewSegment {
            lineage: lineage(),
            after: OplogPosition::end_of(10),
            through: OplogPosition::end_of(14),
            covered_through_ms: 1_020,
            entries: vec![entry(11, 1_011), entry(13, 1_013)],
        })
        .await
        .unwrap();
    assert_eq!((seg.min_ts, seg.max_ts), (1_011, 1_020));

    let listing = f.store.list_fulls().await.unwrap();
    assert_eq!(listing.complete, vec![manifest.clone()]);
    assert!(listing.incomplete.is_empty());
    let segments = f.store.list_segments().await.unwrap();
    assert_eq!(segments, vec![seg.clone()]);

    let back = f.store.read_page(&id, &manifest.pages[1]).await.unwrap();
    assert_eq!(back.index, 12);
    assert_eq!(back.docs.len(), 30);
    assert_eq!(back.docs[0].doc.get(), r#"{"_id":50,"total":500}"#);
    let entries = f.store.read_segment(&seg).await.unwrap();
    assert_eq!(entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![11, 13]);

    let plan = plan_restore(&listing.complete, &segments, RestoreTarget::Latest).unwrap();
    assert_eq!((plan.full.id.clone(), plan.segments, plan.to_ms), (id, vec![seg], 1_020));
}

#[tokio::test]
async fn backup_page_with_a_flipped_byte_is_refused_naming_the_object() {
    let f = fixture();
    let id = FullId::new(1_000, 7);
    let manifest = write_full(&f.store, &id, true).await;
    let file = file_ending(f.dir.path(), "000001.page");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();

    let err = f.store.read_page(&id, &manifest.pages[1]).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, BackupError::Damaged { .. }), "{err:?}");
    assert!(
        message.starts_with(&format!(
            "backup object backups/playground/shop/inc-1/full/{id}/000001.page is damaged: SHA-256 "
        )),
        "{message}"
    );
    assert!(message.contains(&format!("expected {}", manifest.pages[1].sha256)), "{message}");
    assert!(!err.is_retryable());
    // The other page is intact.
    f.store.read_page(&id, &manifest.pages[0]).await.unwrap();
}

#[tokio::test]
async fn backup_segment_damaged_or_missing_is_refused_naming_the_object() {
    let f = fixture();
    let seg = f
        .store
        .put_segment(&NewSegment {
            lineage: lineage(),
            after: OplogPosition::end_of(10),
            through: OplogPosition::end_of(11),
            covered_through_ms: 1_011,
            entries: vec![entry(11, 1_011)],
        })
        .await
        .unwrap();
    let file = file_ending(f.dir.path(), ".seg");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let err = f.store.read_segment(&seg).await.unwrap_err();
    assert!(err.to_string().contains(&seg.file_name()), "{err}");
    assert!(matches!(err, BackupError::Damaged { .. }), "{err:?}");

    std::fs::remove_file(&file).unwrap();
    let err = f.store.read_segment(&seg).await.unwrap_err();
    assert!(matches!(err, BackupError::Missing { .. }), "{err:?}");
    assert!(err.to_string().ends_with(&format!("{} is missing", seg.file_name())), "{err}");
}

#[tokio::test]
async fn backup_full_without_a_manifest_is_incomplete_and_never_restorable() {
    let f = fixture();
    let complete = FullId::new(1_000, 1);
    let unfinished = FullId::new(2_000, 2);
    write_full(&f.store, &complete, true).await;
    write_full(&f.store, &unfinished, false).await;

    let listing = f.store.list_fulls().await.unwrap();
    assert_eq!(listing.complete.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), vec![complete.clone()]);
    assert_eq!(listing.incomplete, vec![unfinished.clone()]);

    // Retention deletes it once its grace is over, and never the complete one (the newest).
    let policy = RetentionPolicy { window_ms: 10_000, incomplete_grace_ms: 5_000 };
    let segments = f.store.list_segments().await.unwrap();
    assert!(retention(&listing, &segments, 6_000, &policy).fulls.is_empty());
    let deletions = retention(&listing, &segments, 8_000, &policy);
    assert_eq!(deletions.fulls, vec![unfinished]);
    f.store.apply(&deletions).await.unwrap();
    let after = f.store.list_fulls().await.unwrap();
    assert_eq!(after.complete.len(), 1);
    assert!(after.incomplete.is_empty());
    // Deleting again (an interrupted retention run redone) is not an error.
    f.store.apply(&deletions).await.unwrap();
}

#[tokio::test]
async fn backup_deleted_full_loses_its_manifest_first_and_all_its_pages() {
    let f = fixture();
    let id = FullId::new(1_000, 1);
    write_full(&f.store, &id, true).await;
    f.store.delete_full(&id).await.unwrap();
    let listing = f.store.list_fulls().await.unwrap();
    assert!(listing.complete.is_empty() && listing.incomplete.is_empty(), "{listing:?}");
}

#[tokio::test]
async fn backup_refuses_wrong_manifests_and_segments_before_writing() {
    let f = fixture();
    let id = FullId::new(1_000, 1);
    let mut manifest = write_full(&f.store, &id, false).await;
    manifest.pages.remove(0);
    let err = f.store.put_manifest(&manifest).await.unwrap_err();
    assert!(err.to_string().contains("without a hole"), "{err}");
    let mut late_start = write_full(&f.store, &id, false).await;
    late_start.start = OplogPosition::end_of(11);
    let err = f.store.put_manifest(&late_start).await.unwrap_err();
    assert!(err.to_string().contains("snapshot indexes (10, 12)"), "{err}");
    manifest.pages.clear();
    assert!(f.store.put_manifest(&manifest).await.is_err());
    assert!(f.store.list_fulls().await.unwrap().complete.is_empty());

    let segment = |entries: Vec<OplogEntry>, covered: u64| NewSegment {
        lineage: lineage(),
        after: OplogPosition::end_of(10),
        through: OplogPosition::end_of(20),
        covered_through_ms: covered,
        entries,
    };
    for (bad, why) in [
        (segment(vec![entry(12, 5), entry(11, 5)], 10), "out of order"),
        (segment(vec![entry(10, 5)], 10), "out of order"),
        (segment(vec![entry(21, 5)], 10), "outside"),
        (segment(vec![entry(12, 50)], 10), "after the covered time"),
    ] {
        let err = f.store.put_segment(&bad).await.unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    let mut other_db = entry(12, 5);
    other_db.db = "other".to_string();
    assert!(f.store.put_segment(&segment(vec![other_db], 10)).await.is_err());
    assert!(f.store.list_segments().await.unwrap().is_empty());
    // An idle segment (no change) only moves the covered time.
    let idle = NewSegment { through: OplogPosition::end_of(10), ..segment(vec![], 99) };
    let name = f.store.put_segment(&idle).await.unwrap();
    assert_eq!((name.min_ts, name.max_ts), (99, 99));
    assert!(f.store.read_segment(&name).await.unwrap().is_empty());
}

#[tokio::test]
async fn backup_manifest_damaged_is_listed_as_damaged_not_restorable() {
    let f = fixture();
    let id = FullId::new(1_000, 1);
    write_full(&f.store, &id, true).await;
    let file = file_ending(f.dir.path(), ".json");
    let text = std::fs::read_to_string(&file).unwrap().replace("\"shop\"", "\"other\"");
    std::fs::write(&file, &text).unwrap();
    // Its own digest (in its name) finds the change.
    let listing = f.store.list_fulls().await.unwrap();
    assert!(listing.complete.is_empty() && listing.incomplete.is_empty(), "{listing:?}");
    assert_eq!(listing.damaged.len(), 1);
    assert_eq!(listing.damaged[0].0, id);
    assert!(listing.damaged[0].1.contains(".json is damaged: SHA-256"), "{listing:?}");
    let err = f.store.read_manifest(&id).await.unwrap_err();
    assert!(matches!(err, BackupError::Damaged { .. }), "{err:?}");

    // Renamed to its new digest (a writer's bug rather than damage): its content is still
    // checked.
    std::fs::remove_file(&file).unwrap();
    let renamed = file.with_file_name(format!("manifest_{}.json", sha256_hex(text.as_bytes())));
    std::fs::write(&renamed, &text).unwrap();
    let listing = f.store.list_fulls().await.unwrap();
    assert_eq!(listing.damaged.len(), 1, "{listing:?}");
    let err = f.store.read_manifest(&id).await.unwrap_err();
    assert!(err.to_string().contains("of database \"other\""), "{err}");
}

#[tokio::test]
async fn backup_page_of_another_size_than_its_manifest_says_is_refused_before_reading() {
    let f = fixture();
    let id = FullId::new(1_000, 7);
    let manifest = write_full(&f.store, &id, true).await;
    let file = file_ending(f.dir.path(), "000000.page");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend(std::iter::repeat_n(0u8, 1 << 20));
    std::fs::write(&file, &bytes).unwrap();
    let err = f.store.read_page(&id, &manifest.pages[0]).await.unwrap_err();
    assert!(matches!(err, BackupError::TooLarge { .. }), "{err:?}");
    let expected = format!("000000.page is damaged: {} bytes, expected {}", bytes.len(), manifest.pages[0].bytes);
    assert!(err.to_string().contains(&expected), "{err}");
    assert!(!err.is_retryable());
    bytes.truncate(manifest.pages[0].bytes as usize - 1);
    std::fs::write(&file, &bytes).unwrap();
    let err = f.store.read_page(&id, &manifest.pages[0]).await.unwrap_err();
    assert!(matches!(err, BackupError::TooLarge { .. }), "{err:?}");
}

#[tokio::test]
async fn backup_segments_and_manifests_over_their_cap_are_refused() {
    let f = fixture();
    let id = FullId::new(1_000, 7);
    write_full(&f.store, &id, true).await;
    let seg = f
        .store
        .put_segment(&NewSegment {
            lineage: lineage(),
            after: OplogPosition::end_of(10),
            through: OplogPosition::end_of(11),
            covered_through_ms: 1_011,
            entries: vec![entry(11, 1_011)],
        })
        .await
        .unwrap();
    let small = f.store.clone().with_limits(ObjectLimits { manifest_bytes: 64, segment_bytes: 16 });
    // A segment past the cap: refused before its body is read, naming it.
    let err = small.read_segment(&seg).await.unwrap_err();
    assert!(matches!(err, BackupError::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("{} is damaged", seg.file_name())), "{err}");
    assert!(err.to_string().contains("expected at most 16"), "{err}");
    // A manifest past the cap: listed as damaged, never read.
    let listing = small.list_fulls().await.unwrap();
    assert!(listing.complete.is_empty(), "{listing:?}");
    assert_eq!(listing.damaged.len(), 1, "{listing:?}");
    assert!(listing.damaged[0].1.contains("expected at most 64"), "{listing:?}");
    // Nor written past it.
    let manifest = f.store.read_manifest(&id).await.unwrap();
    let err = small.put_manifest(&manifest).await.unwrap_err();
    assert!(err.to_string().contains("more than a reader accepts"), "{err}");
    // The default caps read them.
    f.store.read_segment(&seg).await.unwrap();
}
