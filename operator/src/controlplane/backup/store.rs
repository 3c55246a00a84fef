//! Writing and reading one database's backup objects over any [`ObjectStore`] (the local
//! filesystem in the playground and tests, S3 in production).
//!
//! Writes follow one rule: an object another reader could act on is written only after
//! everything it refers to. A full's manifest is put after its last page, so a full whose
//! writer died is only pages without a manifest: never listed as restorable, deleted by
//! retention after a grace period. Deleting goes the other way: the manifest first.
//! Reads verify each object's SHA-256 against the manifest (pages) or the name (segments and
//! manifests) before decoding it, so a damaged object is refused with its path, never
//! half-restored; and its size before reading it (a page's against the manifest, segments and
//! manifests against a cap), so a damaged or planted object never fills memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use nimbus_api::admin::OplogEntry;
use nimbus_api::migration::{ExportPage, OplogPosition};
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutPayload};

use super::BackupError;
use super::format::{self, FORMAT_VERSION, FullManifest, Handoff, HandoffBody, PageEntry, SegmentBody, sha256_hex};
use super::layout::{BackupLocation, FullId, FullObject, Lineage, SegmentName, parse_full_object};
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

/// The largest object of each kind a reader accepts: checked against the store's size
/// before the body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLimits {
    /// A manifest lists ~150 bytes per page: 64 MiB is a full of some 400,000 pages (400
    /// GiB at the default 1 MiB pages).
    pub manifest_bytes: u64,
    /// The archiver closes a segment at a few MiB of changes; its stored (compressed) size
    /// is below its decoded size, which decoding bounds anyway.
    pub segment_bytes: u64,
}

impl Default for ObjectLimits {
    fn default() -> ObjectLimits {
        ObjectLimits { manifest_bytes: 64 << 20, segment_bytes: format::MAX_DECODED_BYTES }
    }
}

/// How large an object read must be.
#[derive(Debug, Clone, Copy)]
enum Size {
    Exactly(u64),
    AtMost(u64),
}

/// One database's backups in one object store.
#[derive(Debug, Clone)]
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    location: BackupLocation,
    limits: ObjectLimits,
}

impl BackupStore {
    pub fn new(store: Arc<dyn ObjectStore>, location: BackupLocation) -> BackupStore {
        BackupStore { store, location, limits: ObjectLimits::default() }
    }

    /// The same store with other size caps (tests use small ones).
    pub fn with_limits(self, limits: ObjectLimits) -> BackupStore {
        BackupStore { limits, ..self }
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
    /// hole, positions and times in order), so a wrong one is never published. Its name
    /// carries its own SHA-256 (`manifest_{sha256}.json`).
    pub async fn put_manifest(&self, manifest: &FullManifest) -> Result<(), BackupError> {
        check_manifest(&self.location, manifest)?;
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|e| BackupError::Encode { what: "backup manifest", message: e.to_string() })?;
        if bytes.len() as u64 > self.limits.manifest_bytes {
            return Err(BackupError::InvalidManifest {
                id: manifest.id.to_string(),
                message: format!(
                    "it is {} bytes, more than a reader accepts ({})",
                    bytes.len(),
                    self.limits.manifest_bytes
                ),
            });
        }
        let path = self.location.manifest(&manifest.id, &sha256_hex(&bytes));
        self.put(&path, bytes).await
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
        if bytes.len() as u64 > self.limits.segment_bytes {
            return Err(invalid(format!(
                "it is {} bytes, more than a reader accepts ({})",
                bytes.len(),
                self.limits.segment_bytes
            )));
        }
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
    /// damaged ones (a manifest that does not decode or check, or is larger than a manifest
    /// may be). Fails only when the store does.
    pub async fn list_fulls(&self) -> Result<FullListing, BackupError> {
        let objects = self.list(&self.location.fulls()).await?;
        // id → its manifest (digest, size), if any.
        let mut fulls: BTreeMap<FullId, Option<(String, u64)>> = BTreeMap::new();
        for (path, size) in &objects {
            if let Some((id, what)) = parse_full_object(&self.location, path) {
                let manifest = fulls.entry(id).or_default();
                if let FullObject::Manifest(sha) = what {
                    *manifest = Some((sha, *size));
                }
            }
        }
        let mut listing = FullListing::default();
        for (id, manifest) in fulls {
            let Some((sha, size)) = manifest else {
                listing.incomplete.push(id);
                continue;
            };
            match self.read_manifest_at(&id, &sha, size).await {
                Ok(manifest) => listing.complete.push(manifest),
                // Deleted since it was listed (retention running meanwhile).
                Err(BackupError::Missing { .. }) => {}
                Err(
                    e @ (BackupError::Undecodable { .. }
                    | BackupError::Damaged { .. }
                    | BackupError::TooLarge { .. }
                    | BackupError::UnsupportedFormat { .. }),
                ) => listing.damaged.push((id, e.to_string())),
                Err(e) => return Err(e),
            }
        }
        Ok(listing)
    }

    /// A full's manifest, found by listing the full (its name carries its digest), checked
    /// as [`put_manifest`](Self::put_manifest) checks it.
    pub async fn read_manifest(&self, id: &FullId) -> Result<FullManifest, BackupError> {
        let found = self.list(&self.location.full(id)).await?.into_iter().find_map(|(path, size)| {
            match parse_full_object(&self.location, &path) {
                Some((_, FullObject::Manifest(sha))) => Some((sha, size)),
                _ => None,
            }
        });
        let Some((sha, size)) = found else {
            return Err(BackupError::Missing { object: format!("{}/manifest", self.location.full(id)) });
        };
        self.read_manifest_at(id, &sha, size).await
    }

    /// The manifest `manifest_{sha}.json` of full `id`, listed with `listed_size` bytes.
    async fn read_manifest_at(&self, id: &FullId, sha: &str, listed_size: u64) -> Result<FullManifest, BackupError> {
        let path = self.location.manifest(id, sha);
        let cap = self.limits.manifest_bytes;
        if listed_size > cap {
            return Err(BackupError::TooLarge {
                object: path.to_string(),
                size: listed_size,
                expected: format!("at most {cap}"),
            });
        }
        let bytes = self.get(&path, Size::AtMost(cap)).await?;
        verify(&path, &bytes, sha)?;
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
            objects.iter().filter_map(|(p, _)| SegmentName::parse(&self.location, p)).collect();
        segments.sort_by(|a, b| (&a.lineage, a.after, a.through).cmp(&(&b.lineage, b.after, b.through)));
        Ok(segments)
    }

    /// Stores a hot migration's handoff (`oplog/{to}/handoff_{to_position}.json`): written
    /// by the archiver once the old lineage is archived through `from_position`, so a
    /// restore that finds it finds the segments it joins. Writing it again is harmless.
    pub async fn put_handoff(&self, handoff: &Handoff) -> Result<(), BackupError> {
        let body = HandoffBody { format: FORMAT_VERSION, db: self.location.db().to_string(), handoff: handoff.clone() };
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| BackupError::Encode { what: "oplog handoff", message: e.to_string() })?;
        self.put(&self.location.handoff(&handoff.to, handoff.to_position), bytes).await
    }

    /// Every handoff stored, in name order. A handoff that cannot be read as its name says
    /// (damaged, of a newer format) is left out with a warning: a restore then plans as if
    /// the move had none (the times after it wait for a full of the new lineage), never
    /// across a join it cannot check.
    pub async fn list_handoffs(&self) -> Result<Vec<Handoff>, BackupError> {
        let objects = self.list(&self.location.oplog()).await?;
        let mut handoffs = Vec::new();
        for (path, _) in objects {
            let Some((to, to_position)) = self.location.parse_handoff(&path) else { continue };
            let read = async {
                let bytes = self.get(&path, Size::AtMost(self.limits.manifest_bytes)).await?;
                let body: HandoffBody = serde_json::from_slice(&bytes)
                    .map_err(|e| BackupError::Undecodable { object: path.to_string(), message: e.to_string() })?;
                let matches = body.format <= FORMAT_VERSION
                    && body.db == self.location.db()
                    && body.handoff.to == to
                    && body.handoff.to_position == to_position;
                if !matches {
                    return Err(BackupError::Undecodable {
                        object: path.to_string(),
                        message: "its content does not match its name".to_string(),
                    });
                }
                Ok(body.handoff)
            };
            match read.await {
                Ok(h) => handoffs.push(h),
                // Deleted since it was listed (the incarnation swept meanwhile).
                Err(BackupError::Missing { .. }) => {}
                Err(e @ (BackupError::Undecodable { .. } | BackupError::TooLarge { .. })) => {
                    tracing::warn!(db = %self.location.db(), error = %e, "oplog handoff left out of the plan");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(handoffs)
    }

    /// Page `entry.n` of full `id`, its size and digest verified against the manifest's.
    pub async fn read_page(&self, id: &FullId, entry: &PageEntry) -> Result<ExportPage, BackupError> {
        let path = self.location.page(id, entry.n);
        let bytes = self.get(&path, Size::Exactly(entry.bytes)).await?;
        verify(&path, &bytes, &entry.sha256)?;
        format::decode(path.as_ref(), &bytes)
    }

    /// A segment's changes, its digest verified against its name and its content against
    /// the rest of the name.
    pub async fn read_segment(&self, name: &SegmentName) -> Result<Vec<OplogEntry>, BackupError> {
        let path = self.location.segment(name);
        let bytes = self.get(&path, Size::AtMost(self.limits.segment_bytes)).await?;
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
        let objects = self.list(&self.location.full(id)).await?;
        let is_manifest = |p: &Path| matches!(parse_full_object(&self.location, p), Some((_, FullObject::Manifest(_))));
        for (path, _) in objects.iter().filter(|(p, _)| is_manifest(p)) {
            self.delete(path).await?;
        }
        for (path, _) in objects.iter().filter(|(p, _)| !is_manifest(p)) {
            self.delete(path).await?;
        }
        Ok(())
    }

    /// Deletes every object of this incarnation (fulls first, manifests before their pages,
    /// then segments): how a deleted instance's backups expire.
    pub async fn delete_all(&self) -> Result<(), BackupError> {
        let listing = self.list_fulls().await?;
        let ids = listing.complete.iter().map(|m| m.id.clone());
        for id in ids.chain(listing.incomplete).chain(listing.damaged.into_iter().map(|(id, _)| id)) {
            self.delete_full(&id).await?;
        }
        for (path, _) in self.list(self.location.root()).await? {
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

    /// Reads an object whose size the store reports (with the response, before its body)
    /// as `size` allows; the body read is bounded by the same size, should the store's
    /// figure be wrong.
    async fn get(&self, path: &Path, size: Size) -> Result<bytes::Bytes, BackupError> {
        let store_error = |source: object_store::Error| match source {
            object_store::Error::NotFound { .. } => BackupError::Missing { object: path.to_string() },
            source => BackupError::Store { op: "read", object: path.to_string(), source },
        };
        let too_large = |actual: u64| {
            let expected = match size {
                Size::Exactly(n) => format!("{n}"),
                Size::AtMost(n) => format!("at most {n}"),
            };
            BackupError::TooLarge { object: path.to_string(), size: actual, expected }
        };
        let fits = |n: u64| match size {
            Size::Exactly(expected) => n == expected,
            Size::AtMost(cap) => n <= cap,
        };
        let limit = match size {
            Size::Exactly(n) | Size::AtMost(n) => n,
        };
        let got = self.store.get_opts(path, GetOptions::default()).await.map_err(store_error)?;
        if !fits(got.meta.size) {
            return Err(too_large(got.meta.size));
        }
        let mut body = got.into_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.try_next().await.map_err(store_error)? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(too_large((bytes.len() + chunk.len()) as u64));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !fits(bytes.len() as u64) {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes::Bytes::from(bytes))
    }

    /// Every object under `prefix`, with its size.
    async fn list(&self, prefix: &Path) -> Result<Vec<(Path, u64)>, BackupError> {
        self.store
            .list(Some(prefix))
            .map_ok(|meta| (meta.location, meta.size))
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

/// Every incarnation of every database with objects under `{prefix}/{scope}`: what
/// [`super::agent::BackupAgent::sweep`] looks for backups nobody backs up any more in. Names
/// that are not a valid location (a stray object) are skipped.
pub async fn list_incarnations(
    objects: &dyn ObjectStore,
    prefix: &str,
    scope: &str,
) -> Result<Vec<BackupLocation>, BackupError> {
    let root = super::layout::scope_root(prefix, scope)?;
    let list = |at: Path| async move {
        objects.list_with_delimiter(Some(&at)).await.map(|l| l.common_prefixes).map_err(|source| BackupError::Store {
            op: "list",
            object: at.to_string(),
            source,
        })
    };
    let mut found = Vec::new();
    for db_dir in list(root.clone()).await? {
        let Some(db) = db_dir.filename().map(str::to_owned) else { continue };
        for inc_dir in list(db_dir).await? {
            let incarnation = inc_dir.filename().and_then(|i| super::layout::Incarnation::new(i).ok());
            if let Some(location) = incarnation.and_then(|i| BackupLocation::new(prefix, scope, &db, &i).ok()) {
                found.push(location);
            }
        }
    }
    Ok(found)
}

impl BackupStore {
    /// The newest time this incarnation's objects hold (a segment's covered time, a full's
    /// end, an unfinished full's start); `None` when it holds none of them.
    pub async fn newest_ms(&self) -> Result<Option<u64>, BackupError> {
        let listing = self.list_fulls().await?;
        let segments = self.list_segments().await?;
        let times = segments.iter().map(|s| s.max_ts).chain(listing.complete.iter().map(|f| f.end_ms));
        let started = listing.incomplete.iter().chain(listing.damaged.iter().map(|(id, _)| id)).map(FullId::started_ms);
        Ok(times.chain(started).max())
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
