//! A full backup of one database: its export read page by page from the leader of the
//! replica set its route names, each page stored as it comes, the manifest last
//! (`docs/design/0004-backup.md`, "Writing: the manifest last").

use std::time::{Duration, Instant};

use nimbus_api::migration::{ExportPart, ExportRequest, OplogPosition, PinOplogRequest};

use super::{AgentError, AgentTuning, Source, now_ms};
use crate::controlplane::backup::{BackupStore, FORMAT_VERSION, FullId, FullManifest};
use crate::controlplane::migration::plan::{CopyPacer, pin_renewal};
use crate::controlplane::migration::{ReplicaSetAccess, Tuning};

use super::world::BackupWorld;

/// Reads of the oplog between the last page and the checksum marker, at most: past that the
/// database is written too much for the marker to tell the state at the full's end.
const CHECKSUM_PROBE_PAGES: usize = 8;

/// What a completed full read.
#[derive(Debug, Clone)]
pub struct TakenFull {
    pub manifest: FullManifest,
    /// The documents' JSON bytes read: the database's size, which `full_due` weighs the
    /// archived oplog against.
    pub doc_bytes: u64,
}

/// The name of the pin a full holds on its source's oplog from its first page on: the
/// changes after the full's start stay until the archiver (which may start only from this
/// full, on a new lineage) has pinned them under its own name. It lapses by itself.
pub fn full_pin_name(db: &str) -> String {
    format!("backup-full:{db}")
}

/// Takes a full backup of `source`'s database into `store` under a new id. Any failure
/// (a leader change, the store) fails the whole full: its pages stay without a manifest
/// (incomplete: never restorable, deleted by retention after its grace) and the caller
/// retries under a new id. The reads are paced by the migration's [`CopyPacer`] under
/// `tuning.read_bytes_per_sec`.
///
/// The manifest's `checksum` is the datanode's checksum marker taken after the last page,
/// kept only when the oplog shows no change of the database between the last page's
/// snapshot and the marker (then the sum at the marker is the sum at the full's `end`);
/// otherwise the full has none.
pub async fn take_full(
    world: &dyn BackupWorld,
    store: &BackupStore,
    source: &Source,
    tuning: &AgentTuning,
) -> Result<TakenFull, AgentError> {
    let db = store.location().db().to_owned();
    let started_ms = now_ms();
    let id = FullId::new(started_ms, rand::random::<u32>());
    let rs = &source.rs;
    let mut pacer = CopyPacer::new(&Tuning {
        copy_bytes_per_sec: tuning.read_bytes_per_sec,
        copy_min_bytes_per_sec: tuning.read_min_bytes_per_sec,
        page_bytes: tuning.page_bytes,
        ..Tuning::default()
    });
    let began = Instant::now();
    let mut pin_expires_ms = 0u64;
    let mut pages = Vec::new();
    let mut first = None::<(u64, u64)>;
    let mut last: (u64, u64);
    let (mut docs, mut bytes, mut doc_bytes) = (0u64, 0u64, 0u64);
    let mut after: Option<String> = None;
    loop {
        let req = ExportRequest {
            db: db.clone(),
            part: ExportPart::Documents,
            after: after.clone(),
            max_bytes: tuning.page_bytes,
            since_ms: None,
        };
        let reading = Instant::now();
        let page = world.export(rs, &req).await?;
        let took = reading.elapsed();
        let first_index = first.get_or_insert((page.index, page.clock_ms)).0;
        renew_pin(world, rs, &full_pin_name(&db), first_index, tuning.pin_ttl, &mut pin_expires_ms).await?;
        let page_doc_bytes: u64 = page.docs.iter().map(|d| d.doc.get().len() as u64).sum();
        let n = u32::try_from(pages.len()).map_err(|_| AgentError::TooLarge { db: db.clone() })?;
        let entry = store.put_page(&id, n, &page).await?;
        docs += entry.docs;
        bytes += entry.bytes;
        doc_bytes += page_doc_bytes;
        last = (page.index, page.clock_ms);
        pages.push(entry);
        after = page.next;
        if after.is_none() {
            break;
        }
        tokio::time::sleep(pacer.page(began.elapsed(), took, page_doc_bytes)).await;
    }
    let (last_index, last_ms) = last;
    let Some((first_index, first_ms)) = first else {
        // Set by the first page, which the loop always reads.
        return Err(AgentError::TooLarge { db });
    };
    let checksum = checksum_at(world, rs, &db, last_index).await;
    let manifest = FullManifest {
        format: FORMAT_VERSION,
        id,
        db: db.clone(),
        lineage: source.lineage.clone(),
        start: OplogPosition::end_of(first_index),
        end: OplogPosition::end_of(last_index),
        start_ms: first_ms,
        end_ms: last_ms.max(first_ms),
        docs,
        bytes,
        pages,
        checksum,
    };
    store.put_manifest(&manifest).await?;
    tracing::info!(
        db = %db, full = %manifest.id, lineage = %manifest.lineage, pages = manifest.pages.len(),
        docs, bytes, took_ms = began.elapsed().as_millis() as u64, checksum = manifest.checksum.is_some(),
        "full backup taken"
    );
    Ok(TakenFull { manifest, doc_bytes })
}

/// Pins `name` on the source's oplog from `from_index` once half its lifetime is gone.
pub(super) async fn renew_pin(
    world: &dyn BackupWorld,
    rs: &ReplicaSetAccess,
    name: &str,
    from_index: u64,
    ttl: Duration,
    expires_ms: &mut u64,
) -> Result<(), AgentError> {
    let Some(expiry) = pin_renewal(Some(*expires_ms), now_ms(), ttl) else { return Ok(()) };
    let req = PinOplogRequest { name: name.to_owned(), from_index, expires_ms: expiry };
    world.pin_oplog(rs, &req).await?;
    *expires_ms = req.expires_ms;
    Ok(())
}

/// The database's checksum at the end of `last_index`, if a marker taken now can tell it:
/// the marker's sum is the state at its own index, which is the state at `last_index` when
/// no change of the database lies between. `None` on any doubt (a failure included: the
/// checksum is a check, not needed to restore).
async fn checksum_at(world: &dyn BackupWorld, rs: &ReplicaSetAccess, db: &str, last_index: u64) -> Option<String> {
    let marker = match world.checksum(rs, db).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(db, error = %e, "no checksum for the full backup");
            return None;
        }
    };
    if marker.index < last_index {
        return None;
    }
    let until = OplogPosition::end_of(marker.index);
    let mut pos = OplogPosition::end_of(last_index);
    for _ in 0..CHECKSUM_PROBE_PAGES {
        if pos >= until {
            return Some(marker.checksum);
        }
        let page = world.oplog(rs, db, pos, 1).await.ok()?;
        if page.entries.iter().any(|e| e.index <= marker.index) || page.next <= pos {
            return None;
        }
        pos = page.next;
    }
    (pos >= until).then_some(marker.checksum)
}
