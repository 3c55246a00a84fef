//! Writing and reading one database's backup objects over any [`ObjectStore`] (the local
//! filesystem in the playground and tests, S3 in production).
//!
//! Writes follow one rule: an object another reader could act on is written only after
//! everything it refers to. A full's manifest is put after its last page, so a full whose
//! writer died is only pages without a manifest: never listed as restorable, deleted by
//! retention after a grace period. Deleting goes the other way: the manifest first.
//! Reads verify each object's SHA-256 against the manifest (pages) or the name (segments)
//! before decoding it, so a damaged object is refused with its path, never half-restored.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use nimbus_api::admin::OplogEntry;
use nimbus_api::migration::{ExportPage, OplogPosition};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::BackupError;
use super::format::{self, FORMAT_VERSION, FullManifest, PageEntry, SegmentBody, sha256_hex};
use super::layout::{BackupLocation, FullId, Lineage, SegmentName, parse_full_object};
use super::plan::Deletions;

/// The full backups found for a database.
#[derive(Debug, Clone, Default)]
pub struct FullListing {
    /// Fulls with a manifest, oldest first (by id: by start time).
    pub complete: Vec<FullManifest>,
    /// Fulls with pages but no manifest: being written, or abandoned by a writer that died.
    pub incomplete: Vec<FullId>,
    /// Fulls whose manifest cannot be read or trusted, with why: never restored from, shown
    /// to a person (status, an Event) rather than failing every restore of the database.
    pub damaged: Vec<(FullId, String)>,
}

/// A segment to archive: the database's changes in `(after, through]` of `lineage`, in
/// oplog order, and the time through which they are complete (see [`SegmentName`]).
#[derive(Debug, Clone)]
pub struct NewSegment {
    pub lineage: Lineage,
    pub after: OplogPosition,
    /// The oplog reader's `next` after the last page read into this segment.
    pub through: OplogPosition,
    /// Every change of the database with a time at or before this is at or before
    /// `through`: at least the newest change's time.
    pub covered_through_ms: u64,
    pub entries: Vec<OplogEntry>,
}

/// One database's backups in one object store.
#[derive(Debug, Clone)]
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    location: BackupLocation,
}

impl BackupStore {
    pub fn new(store: Arc<dyn ObjectStore>, location: BackupLocation) -> BackupStore {
        BackupStore { store, location }
    }

    pub fn location(&self) -> &BackupLocation {
        &self.location
    }

    /// Writes page `n` of full `id`; the returned entry goes into the manifest.
    pub async fn put_page(&self, id: &FullId, n: u32, page: &ExportPage) -> Result<PageEntry, BackupError> {
        let bytes = format::encode("backup page", page)?;
        let entry = PageEntry {
            n,
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            docs: format::page_docs(page),
            index: page.index,
        };
        self.put(&self.location.page(id, n), bytes).await?;
        Ok(entry)
    }

    /// Writes a full's manifest, which makes the full exist: call it after every page was
    /// put. The manifest is checked first (this database, pages numbered from 0 without a
    /// hole, positions and times in order), so a wrong one is never published.
    pub async fn put_manifest(&self, manifest: &FullManifest) -> Result<(), BackupError> {
        check_manifest(&self.location, manifest)?;
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|e| BackupError::Encode { what: "backup manifest", message: e.to_string() })?;
        self.put(&self.location.manifest(&manifest.id), bytes).await
    }

    /// Archives one segment of the oplog. Its name (positions, times, digest) is derived from
    /// it, so what the planner reads from listings is what the object holds.
    pub async fn put_segment(&self, segment: &NewSegment) -> Result<SegmentName, BackupError> {
        let invalid = |message: String| BackupError::InvalidSegment { db: self.location.db().to_string(), message };
        if segment.after > segment.through {
            return Err(invalid(format!("it ends ({:?}) before it starts ({:?})", segment.through, segment.after)));
        }
        let mut previous = segment.after;
        for e in &segment.entries {
            let at = OplogPosition { index: e.index, seq: e.seq };
            if e.db != self.location.db() {
                return Err(invalid(format!("it holds a change of database {:?}", e.db)));
            }
            if at <= previous || at > segment.through {
                return Err(invalid(format!(
                    "change at index {} seq {} is out of order or outside (after, through]",
                    e.index, e.seq
                )));
            }
            if e.ts_ms > segment.covered_through_ms {
                return Err(invalid(format!(
                    "change at index {} has time {} after the covered time {}",
                    e.index, e.ts_ms, segment.covered_through_ms
                )));
            }
            previous = at;
        }
        let min_ts = segment.entries.iter().map(|e| e.ts_ms).min().unwrap_or(segment.covered_through_ms);
        let body = SegmentBody {
            format: FORMAT_VERSION,
            db: self.location.db().to_string(),
            lineage: segment.lineage.clone(),
            after: segment.after,
            through: segment.through,
            min_ts,
            max_ts: segment.covered_through_ms,
            entries: segment.entries.clone(),
        };
        let bytes = format::encode("oplog segment", &body)?;
        let name = SegmentName {
            lineage: segment.lineage.clone(),
            after: segment.after,
            through: segment.through,
            min_ts,
            max_ts: segment.covered_through_ms,
            sha256: sha256_hex(&bytes),
        };
        self.put(&self.location.segment(&name), bytes).await?;
        Ok(name)
    }

    /// Every full of the database: complete ones (manifest read), incomplete ones, and
    /// damaged ones (a manifest that does not decode or check). Fails only when the store
    /// does.
    pub async fn list_fulls(&self) -> Result<FullListing, BackupError> {
        let prefix = self.location.fulls();
        let objects = self.list(&prefix).await?;
        // id → whether its manifest is there.
        let mut fulls: BTreeMap<FullId, bool> = BTreeMap::new();
        for path in &objects {
            if let Some((id, _page)) = parse_full_object(&self.location, path) {
                let manifest = path == &self.location.manifest(&id);
                *fulls.entry(id).or_default() |= manifest;
            }
        }
        let mut listing = FullListing::default();
        for (id, has_manifest) in fulls {
            if !has_manifest {
                listing.incomplete.push(id);
                continue;
            }
            match self.read_manifest(&id).await {
                Ok(manifest) => listing.complete.push(manifest),
                // Deleted since it was listed (retention running meanwhile).
                Err(BackupError::Missing { .. }) => {}
                Err(e @ (BackupError::Undecodable { .. } | BackupError::UnsupportedFormat { .. })) => {
                    listing.damaged.push((id, e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(listing)
    }

    /// A full's manifest, checked as [`put_manifest`](Self::put_manifest) checks it.
    pub async fn read_manifest(&self, id: &FullId) -> Result<FullManifest, BackupError> {
        let path = self.location.manifest(id);
        let bytes = self.get(&path).await?;
        let manifest: FullManifest = serde_json::from_slice(&bytes)
            .map_err(|e| BackupError::Undecodable { object: path.to_string(), message: e.to_string() })?;
        if &manifest.id != id {
            return Err(BackupError::Undecodable {
                object: path.to_string(),
                message: format!("it names full {}", manifest.id),
            });
        }
        check_manifest(&self.location, &manifest)
            .map_err(|e| BackupError::Undecodable { object: path.to_string(), message: e.to_string() })?;
        Ok(manifest)
    }

    /// Every segment of every lineage, in name order (by lineage, then position).
    pub async fn list_segments(&self) -> Result<Vec<SegmentName>, BackupError> {
        let objects = self.list(&self.location.oplog()).await?;
        let mut segments: Vec<SegmentName> =
            objects.iter().filter_map(|p| SegmentName::parse(&self.location, p)).collect();
        segments.sort_by(|a, b| (&a.lineage, a.after, a.through).cmp(&(&b.lineage, b.after, b.through)));
        Ok(segments)
    }

    /// Page `entry.n` of full `id`, its digest verified against the manifest's.
    pub async fn read_page(&self, id: &FullId, entry: &PageEntry) -> Result<ExportPage, BackupError> {
        let path = self.location.page(id, entry.n);
        let bytes = self.get(&path).await?;
        verify(&path, &bytes, &entry.sha256)?;
        format::decode(path.as_ref(), &bytes)
    }

    /// A segment's changes, its digest verified against its name and its content against
    /// the rest of the name.
    pub async fn read_segment(&self, name: &SegmentName) -> Result<Vec<OplogEntry>, BackupError> {
        let path = self.location.segment(name);
        let bytes = self.get(&path).await?;
        verify(&path, &bytes, &name.sha256)?;
        let body: SegmentBody = format::decode(path.as_ref(), &bytes)?;
        if body.format > FORMAT_VERSION {
            return Err(BackupError::UnsupportedFormat { object: path.to_string(), format: body.format });
        }
        let matches = body.db == self.location.db()
            && body.lineage == name.lineage
            && body.after == name.after
            && body.through == name.through
            && body.min_ts == name.min_ts
            && body.max_ts == name.max_ts;
        if !matches {
            return Err(BackupError::Undecodable {
                object: path.to_string(),
                message: "its content does not match its name".to_string(),
            });
        }
        Ok(body.entries)
    }

    /// Deletes a full: its manifest first (from then on it is incomplete, never half
    /// restorable), then every other object under it. Deleting what is already gone is not
    /// an error, so an interrupted deletion is simply done again.
    pub async fn delete_full(&self, id: &FullId) -> Result<(), BackupError> {
        self.delete(&self.location.manifest(id)).await?;
        for path in self.list(&self.location.full(id)).await? {
            self.delete(&path).await?;
        }
        Ok(())
    }

    pub async fn delete_segment(&self, name: &SegmentName) -> Result<(), BackupError> {
        self.delete(&self.location.segment(name)).await
    }

    /// Carries out a retention decision ([`super::plan::retention`]): fulls first, then
    /// segments, so that a restore planned while it runs never picks a full whose segments
    /// are already gone.
    pub async fn apply(&self, deletions: &Deletions) -> Result<(), BackupError> {
        for id in &deletions.fulls {
            self.delete_full(id).await?;
        }
        for name in &deletions.segments {
            self.delete_segment(name).await?;
        }
        Ok(())
    }

    async fn put(&self, path: &Path, bytes: Vec<u8>) -> Result<(), BackupError> {
        self.store.put(path, PutPayload::from(bytes)).await.map(|_| ()).map_err(|source| BackupError::Store {
            op: "write",
            object: path.to_string(),
            source,
        })
    }

    async fn get(&self, path: &Path) -> Result<bytes::Bytes, BackupError> {
        let store_error = |source: object_store::Error| match source {
            object_store::Error::NotFound { .. } => BackupError::Missing { object: path.to_string() },
            source => BackupError::Store { op: "read", object: path.to_string(), source },
        };
        let got = self.store.get(path).await.map_err(store_error)?;
        got.bytes().await.map_err(store_error)
    }

    async fn list(&self, prefix: &Path) -> Result<Vec<Path>, BackupError> {
        self.store
            .list(Some(prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(|source| BackupError::Store { op: "list", object: prefix.to_string(), source })
    }

    async fn delete(&self, path: &Path) -> Result<(), BackupError> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(BackupError::Store { op: "delete", object: path.to_string(), source }),
        }
    }
}

fn verify(path: &Path, bytes: &[u8], expected: &str) -> Result<(), BackupError> {
    let actual = sha256_hex(bytes);
    if actual == expected {
        Ok(())
    } else {
        Err(BackupError::Damaged { object: path.to_string(), actual, expected: expected.to_string() })
    }
}

fn check_manifest(location: &BackupLocation, m: &FullManifest) -> Result<(), BackupError> {
    let invalid = |message: String| BackupError::InvalidManifest { id: m.id.to_string(), message };
    if m.format > FORMAT_VERSION {
        return Err(invalid(format!("format {} is newer than this code's {FORMAT_VERSION}", m.format)));
    }
    if m.db != location.db() {
        return Err(invalid(format!("it is of database {:?}, not {:?}", m.db, location.db())));
    }
    let (Some(first), Some(last)) = (m.pages.first(), m.pages.last()) else {
        return Err(invalid("it lists no page".to_string()));
    };
    let (first, last) = (first.index, last.index);
    if let Some((i, p)) = m.pages.iter().enumerate().find(|(i, p)| p.n as usize != *i) {
        return Err(invalid(format!("page {} is listed at place {i}: pages are numbered from 0 without a hole", p.n)));
    }
    if m.start > m.end || m.start_ms > m.end_ms {
        return Err(invalid("it ends before it starts".to_string()));
    }
    if m.pages.windows(2).any(|w| w[0].index > w[1].index) {
        return Err(invalid("its pages' snapshot indexes go backwards".to_string()));
    }
    // The replay starts after the first page's snapshot and is consistent after the last's
    // (see `FullManifest`): anything else would restore a state no time had.
    if m.start != OplogPosition::end_of(first) || m.end != OplogPosition::end_of(last) {
        return Err(invalid(format!(
            "start and end must be the ends of the first and last pages' snapshot indexes ({first}, {last})"
        )));
    }
    if let Some(p) = m.pages.iter().find(|p| !super::layout::is_sha256_hex(&p.sha256)) {
        return Err(invalid(format!("page {} has no valid SHA-256", p.n)));
    }
    Ok(())
}
