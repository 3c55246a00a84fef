//! A full backup of one database: its export read page by page from the leader of the
//! replica set its route names, each page stored as it comes, the manifest last
//! (`docs/design/0004-backup.md`, "Writing: the manifest last").

use std::time::{Duration, Instant};

use nimbus_api::migration::{ExportPart, ExportRequest, OplogPosition, PinOplogRequest};

use super::{AgentError, AgentTuning, Source, now_ms};
use crate::controlplane::backup::{BackupStore, FORMAT_VERSION, FullId, FullManifest};
use crate::controlplane::migration::plan::{CopyPacer, pin_renewal};
use crate::controlplane::migration::{ChecksumMarker, ReplicaSetAccess, Tuning};

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
    /// The members' checksums at the full's checksum marker compared
    /// ([`replica_check`]); `None` when no marker was taken.
    pub replicas: Option<ReplicaCheck>,
}

/// The replica consistency check made with every full: each member's checksum of the
/// database at the same checksum marker (one Raft entry: every member records its own sum
/// at that index) compared with the leader's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaCheck {
    /// Every member that recorded the marker agrees (`compared` of them).
    Agree { index: u64, compared: usize },
    /// Members whose sum differs from the leader's at the same index: (admin address,
    /// their checksum and document count).
    Mismatch { index: u64, leader: String, leader_documents: u64, differing: Vec<(String, String, u64)> },
}

impl std::fmt::Display for ReplicaCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaCheck::Agree { index, compared } => write!(f, "{compared} members agree at index {index}"),
            ReplicaCheck::Mismatch { index, leader, leader_documents, differing } => {
                write!(
                    f,
                    "replicas differ at checksum marker {index}: the leader has {leader} ({leader_documents} documents)"
                )?;
                for (member, sum, docs) in differing {
                    write!(f, "; {member} has {sum} ({docs} documents)")?;
                }
                Ok(())
            }
        }
    }
}

/// How long a member may take to apply the marker before it is left out of the check.
const REPLICA_CHECK_WAIT: Duration = Duration::from_secs(5);

/// Compares what each member recorded at `marker` (see [`ReplicaCheck`]). Members that
/// have not applied it within [`REPLICA_CHECK_WAIT`] (a lagging or unreachable member)
/// or recorded a newer marker since are left out; `None` when the members cannot be
/// asked.
pub async fn replica_check(
    world: &dyn BackupWorld,
    rs: &ReplicaSetAccess,
    db: &str,
    marker: &ChecksumMarker,
) -> Option<ReplicaCheck> {
    let began = Instant::now();
    loop {
        let recorded = world.recorded_checksums(rs, db).await.ok()?;
        if recorded.is_empty() {
            return None;
        }
        let behind = recorded.iter().any(|(_, m)| m.as_ref().is_none_or(|m| m.index < marker.index));
        if !behind || began.elapsed() >= REPLICA_CHECK_WAIT {
            let at_marker: Vec<_> = recorded
                .into_iter()
                .filter_map(|(member, m)| m.filter(|m| m.index == marker.index).map(|m| (member, m)))
                .collect();
            let differing: Vec<_> = at_marker
                .iter()
                .filter(|(_, m)| m.checksum != marker.checksum || m.documents != marker.documents)
                .map(|(member, m)| (member.clone(), m.checksum.clone(), m.documents))
                .collect();
            return Some(if differing.is_empty() {
                ReplicaCheck::Agree { index: marker.index, compared: at_marker.len() }
            } else {
                ReplicaCheck::Mismatch {
                    index: marker.index,
                    leader: marker.checksum.clone(),
                    leader_documents: marker.documents,
                    differing,
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
        pause_at_failpoint().await;
        tokio::time::sleep(pacer.page(began.elapsed(), took, page_doc_bytes)).await;
    }
    let (last_index, last_ms) = last;
    let Some((first_index, first_ms)) = first else {
        // Set by the first page, which the loop always reads.
        return Err(AgentError::TooLarge { db });
    };
    let marker = match world.checksum(rs, &db).await {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::debug!(db = %db, error = %e, "no checksum for the full backup");
            None
        }
    };
    let checksum = match &marker {
        Some(m) => checksum_at(world, rs, &db, last_index, m).await,
        None => None,
    };
    let replicas = match &marker {
        Some(m) => replica_check(world, rs, &db, m).await,
        None => None,
    };
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
    Ok(TakenFull { manifest, doc_bytes, replicas })
}

/// The failpoint `backup-between-pages`: `return(MS)` pauses a full that long after each
/// page but the last (tests kill the leader there). Nothing without the `failpoints`
/// feature.
async fn pause_at_failpoint() {
    #[cfg(feature = "failpoints")]
    {
        let pause = (|| {
            fail::fail_point!("backup-between-pages", |ms| ms.and_then(|ms| ms.parse::<u64>().ok()));
            None
        })();
        if let Some(ms) = pause {
            tracing::info!("full backup paused between pages for {ms} ms (failpoint)");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
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
async fn checksum_at(
    world: &dyn BackupWorld,
    rs: &ReplicaSetAccess,
    db: &str,
    last_index: u64,
    marker: &ChecksumMarker,
) -> Option<String> {
    if marker.index < last_index {
        return None;
    }
    let until = OplogPosition::end_of(marker.index);
    let mut pos = OplogPosition::end_of(last_index);
    for _ in 0..CHECKSUM_PROBE_PAGES {
        if pos >= until {
            return Some(marker.checksum.clone());
        }
        let page = world.oplog(rs, db, pos, 1).await.ok()?;
        if page.entries.iter().any(|e| e.index <= marker.index) || page.next <= pos {
            return None;
        }
        pos = page.next;
    }
    (pos >= until).then(|| marker.checksum.clone())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use nimbus_api::etcd::Route;
    use nimbus_api::migration::{DbOplogPage, ExportPage};

    use super::*;
    use crate::controlplane::backup::Incarnation;
    use crate::controlplane::backup::agent::ArchiveRecord;
    use crate::controlplane::migration::Failure;

    /// A replica set whose members answer the recorded checksums given, one list per call
    /// (the last one repeated); nothing else.
    struct Members(Mutex<Vec<Recorded>>);

    /// One answer of the members: each one's recorded marker.
    type Recorded = Vec<(String, Option<ChecksumMarker>)>;

    fn none<T>() -> Result<T, Failure> {
        Err(Failure::Refused("not in this test".into()))
    }

    #[async_trait]
    impl BackupWorld for Members {
        async fn route(&self, _: &str) -> Result<Option<Route>, Failure> {
            none()
        }
        async fn replica_set(&self, _: &str, _: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
            none()
        }
        async fn export(&self, _: &ReplicaSetAccess, _: &ExportRequest) -> Result<ExportPage, Failure> {
            none()
        }
        async fn oplog(&self, _: &ReplicaSetAccess, _: &str, _: OplogPosition, _: u32) -> Result<DbOplogPage, Failure> {
            none()
        }
        async fn pin_oplog(&self, _: &ReplicaSetAccess, _: &PinOplogRequest) -> Result<(), Failure> {
            none()
        }
        async fn checksum(&self, _: &ReplicaSetAccess, _: &str) -> Result<ChecksumMarker, Failure> {
            none()
        }
        async fn archive_record(&self, _: &str, _: &Incarnation) -> Result<Option<(ArchiveRecord, u64)>, Failure> {
            none()
        }
        async fn save_archive_record(&self, _: &ArchiveRecord, _: Option<u64>) -> Result<Option<u64>, Failure> {
            none()
        }
        async fn delete_archive_record(&self, _: &str, _: &Incarnation) -> Result<(), Failure> {
            none()
        }
        async fn recorded_checksums(
            &self,
            _: &ReplicaSetAccess,
            _: &str,
        ) -> Result<Vec<(String, Option<ChecksumMarker>)>, Failure> {
            let mut answers = self.0.lock().unwrap();
            Ok(if answers.len() > 1 { answers.remove(0) } else { answers[0].clone() })
        }
    }

    fn marker(index: u64, checksum: &str, documents: u64) -> ChecksumMarker {
        ChecksumMarker { index, checksum: checksum.into(), documents, catalog: None }
    }

    fn rs() -> ReplicaSetAccess {
        ReplicaSetAccess { namespace: String::new(), name: "rs0".into(), leader_admin: "a".into(), members: vec![] }
    }

    async fn check(answers: Vec<Vec<(&str, Option<ChecksumMarker>)>>, leader: ChecksumMarker) -> Option<ReplicaCheck> {
        let answers = answers.into_iter().map(|a| a.into_iter().map(|(m, c)| (m.to_owned(), c)).collect()).collect();
        replica_check(&Members(Mutex::new(answers)), &rs(), "shop", &leader).await
    }

    #[tokio::test]
    async fn members_that_agree_at_the_marker_pass_and_one_that_differs_is_named() {
        let at = marker(7, "aa", 3);
        let agree = vec![("a", Some(at.clone())), ("b", Some(at.clone())), ("c", Some(at.clone()))];
        assert_eq!(check(vec![agree], at.clone()).await, Some(ReplicaCheck::Agree { index: 7, compared: 3 }));

        let differ = vec![("a", Some(at.clone())), ("b", Some(marker(7, "bb", 3))), ("c", Some(marker(7, "aa", 2)))];
        let Some(ReplicaCheck::Mismatch { index, differing, .. }) = check(vec![differ], at).await else {
            panic!("no mismatch found")
        };
        assert_eq!(index, 7);
        assert_eq!(differing, vec![("b".to_owned(), "bb".to_owned(), 3), ("c".to_owned(), "aa".to_owned(), 2)]);
    }

    #[tokio::test]
    async fn a_member_behind_is_waited_for_and_one_past_the_marker_is_left_out() {
        let at = marker(7, "aa", 3);
        // b has not applied the marker at first, then has; c recorded a newer marker.
        let first = vec![("a", Some(at.clone())), ("b", Some(marker(5, "old", 1))), ("c", Some(marker(9, "zz", 4)))];
        let then = vec![("a", Some(at.clone())), ("b", Some(at.clone())), ("c", Some(marker(9, "zz", 4)))];
        assert_eq!(check(vec![first, then], at).await, Some(ReplicaCheck::Agree { index: 7, compared: 2 }));
    }

    #[tokio::test]
    async fn no_members_to_ask_is_no_check() {
        assert_eq!(check(vec![vec![]], marker(1, "x", 0)).await, None);
    }
}
