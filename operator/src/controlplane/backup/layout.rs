//! Where a backup's objects live, and what their names say (`docs/design/0004-backup.md`,
//! "Object layout").
//!
//! ```text
//! {prefix}/{scope}/{db}/{incarnation}/full/{id}/manifest_{sha256}.json   written last: the full exists once it is there
//! {prefix}/{scope}/{db}/{incarnation}/full/{id}/{n:06}.page              zstd JSON of one export page
//! {prefix}/{scope}/{db}/{incarnation}/oplog/{lineage}/{after}_{through}_{min_ts:013}_{max_ts:013}_{sha256}.seg
//!     after, through = {index:020}-{seq:010}
//! ```
//!
//! `incarnation` tells apart two instances that had the same database name one after the
//! other (the Kubernetes UID of the `DatabaseInstance`, a random id in the playground): a
//! new instance never finds a deleted one's backups.
//!
//! Names sort in the order a restore reads them (zero-padded numbers), and a segment's
//! name holds everything the restore planner needs (positions, times, digest), so planning
//! a restore lists the archive without reading a segment. Every name is built here from
//! typed values ([`BackupLocation`], [`FullId`], [`SegmentName`]) and parsed back here:
//! nowhere else assembles a path from strings.

use std::fmt;
use std::str::FromStr;

use nimbus_api::migration::OplogPosition;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::BackupError;

/// A full's manifest is `{MANIFEST_PREFIX}{sha256}{MANIFEST_SUFFIX}`: its own digest in its
/// name, so a damaged manifest is found as pages and segments are.
const MANIFEST_PREFIX: &str = "manifest_";
const MANIFEST_SUFFIX: &str = ".json";
const PAGE_SUFFIX: &str = ".page";
const SEGMENT_SUFFIX: &str = ".seg";
/// A handoff is `{HANDOFF_PREFIX}{to_position}{HANDOFF_SUFFIX}` in its `to` lineage's folder.
const HANDOFF_PREFIX: &str = "handoff_";
const HANDOFF_SUFFIX: &str = ".json";

/// Checks one path segment chosen by a person or a tenant (a scope, a database, a lineage):
/// ASCII letters, digits, `_`, `-`, `.`, not empty, not `.` or `..`, at most 128 bytes. A
/// narrower alphabet than the object stores allow, so a name means the same on S3 and on a
/// filesystem and can never climb out of its prefix.
fn check_segment(what: &'static str, value: &str) -> Result<(), BackupError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value != "."
        && value != ".."
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok { Ok(()) } else { Err(BackupError::InvalidName { what, value: value.to_string() }) }
}

/// One instance's life under a database name: the instance's Kubernetes UID, or the
/// playground's random id given at the instance's first apply. A database name reused by a
/// new instance is a new incarnation, so its backups and archive record are its own, never
/// the deleted instance's (whose history a restore would otherwise bring back).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Incarnation(String);

impl Incarnation {
    pub fn new(id: &str) -> Result<Incarnation, BackupError> {
        check_segment("instance incarnation", id)?;
        Ok(Incarnation(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Incarnation {
    type Error = BackupError;

    fn try_from(s: String) -> Result<Incarnation, BackupError> {
        Incarnation::new(&s)
    }
}

impl From<Incarnation> for String {
    fn from(i: Incarnation) -> String {
        i.0
    }
}

/// `{prefix}/{scope}`: every database's backups in one scope, checked as a location's.
pub fn scope_root(prefix: &str, scope: &str) -> Result<Path, BackupError> {
    let mut root = Path::default();
    for part in prefix.split('/').filter(|p| !p.is_empty()) {
        check_segment("backup prefix segment", part)?;
        root = root.join(part);
    }
    check_segment("backup scope", scope)?;
    Ok(root.join(scope))
}

/// The backups of one incarnation of one database: `{prefix}/{scope}/{db}/{incarnation}`.
/// `scope` keeps tenants of different clusters or namespaces that share a bucket apart (the
/// Kubernetes namespace, or the playground's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLocation {
    root: Path,
    db: String,
    incarnation: Incarnation,
}

impl BackupLocation {
    /// `prefix` may be empty (the bucket's root) or several segments (`a/b`); `scope` and
    /// `db` are one segment each.
    pub fn new(prefix: &str, scope: &str, db: &str, incarnation: &Incarnation) -> Result<BackupLocation, BackupError> {
        let root = scope_root(prefix, scope)?;
        check_segment("database name", db)?;
        Ok(BackupLocation {
            root: root.join(db).join(incarnation.as_str()),
            db: db.to_string(),
            incarnation: incarnation.clone(),
        })
    }

    pub fn db(&self) -> &str {
        &self.db
    }

    pub fn incarnation(&self) -> &Incarnation {
        &self.incarnation
    }

    /// `{prefix}/{scope}/{db}/{incarnation}`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every full backup of the database lives under this.
    pub fn fulls(&self) -> Path {
        self.root.clone().join("full")
    }

    pub fn full(&self, id: &FullId) -> Path {
        self.fulls().join(id.as_str())
    }

    /// The manifest of full `id` whose bytes have digest `sha256`.
    pub fn manifest(&self, id: &FullId, sha256: &str) -> Path {
        self.full(id).join(format!("{MANIFEST_PREFIX}{sha256}{MANIFEST_SUFFIX}"))
    }

    /// Page `n` (from 0) of full `id`.
    pub fn page(&self, id: &FullId, n: u32) -> Path {
        self.full(id).join(format!("{n:06}{PAGE_SUFFIX}"))
    }

    /// Every oplog segment of every lineage lives under this.
    pub fn oplog(&self) -> Path {
        self.root.clone().join("oplog")
    }

    pub fn segment(&self, name: &SegmentName) -> Path {
        self.oplog().join(name.lineage.as_str()).join(name.file_name())
    }

    /// `oplog/{to}/handoff_{to_position}.json`: the hot migration the lineage `to` began
    /// with at `to_position` (`super::format::Handoff`). One per arrival: a database can
    /// come to a replica set more than once, each time at a later position of its log.
    pub fn handoff(&self, to: &Lineage, to_position: OplogPosition) -> Path {
        self.oplog()
            .join(to.as_str())
            .join(format!("{HANDOFF_PREFIX}{:020}-{:010}{HANDOFF_SUFFIX}", to_position.index, to_position.seq))
    }

    /// The lineage and position a handoff object's path names; `None` for any other path.
    pub fn parse_handoff(&self, path: &Path) -> Option<(Lineage, OplogPosition)> {
        let mut rest = path.prefix_match(&self.oplog())?;
        let lineage = Lineage::new(rest.next()?.as_ref()).ok()?;
        let file = rest.next()?;
        if rest.next().is_some() {
            return None;
        }
        let position = file.as_ref().strip_prefix(HANDOFF_PREFIX)?.strip_suffix(HANDOFF_SUFFIX)?;
        Some((lineage, parse_position(position)?))
    }
}

/// A full backup's id: `{started_ms:013}-{nonce:08x}`. Sorts by the time the backup started;
/// the nonce (chosen by the caller, at random) keeps two attempts started in the same
/// millisecond (a retry on a new leader) apart, so an abandoned attempt's pages are never
/// mixed with a completed one's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FullId(String);

impl FullId {
    pub fn new(started_ms: u64, nonce: u32) -> FullId {
        FullId(format!("{started_ms:013}-{nonce:08x}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When the backup started (ms since the Unix epoch), read from the id: how retention
    /// ages an incomplete full, which has no manifest to say.
    pub fn started_ms(&self) -> u64 {
        // The id was checked on construction: 13 digits, then the nonce.
        self.0.get(..13).and_then(|s| s.parse().ok()).unwrap_or(0)
    }
}

impl fmt::Display for FullId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for FullId {
    type Err = BackupError;

    fn from_str(s: &str) -> Result<FullId, BackupError> {
        let invalid = || BackupError::InvalidName { what: "full backup id", value: s.to_string() };
        let (ms, nonce) = s.split_once('-').ok_or_else(invalid)?;
        let digits = |t: &str, n: usize, radix: u32| t.len() == n && t.chars().all(|c| c.is_digit(radix));
        if !digits(ms, 13, 10) || !digits(nonce, 8, 16) || nonce.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid());
        }
        Ok(FullId(s.to_string()))
    }
}

// Read back from manifests: checked as when built.
impl TryFrom<String> for FullId {
    type Error = BackupError;

    fn try_from(s: String) -> Result<FullId, BackupError> {
        s.parse()
    }
}

impl From<FullId> for String {
    fn from(id: FullId) -> String {
        id.0
    }
}

/// An oplog lineage: one replica set's Raft log, whose positions a database's oplog
/// positions are. A database that moved (hot migration) starts a new lineage whose
/// positions have nothing to do with the old one's; a full and the segments replayed on it
/// must be of the same lineage. The agent names it by the replica set and its incarnation
/// (`{replica_set}.r{n}`: `super::agent::lineage_of`), not by the route epoch, which an
/// aborted migration raises on the same log; this type reads no meaning into the name, so
/// names of earlier versions (`{replica_set}.e{epoch}`) stay readable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Lineage(String);

impl Lineage {
    pub fn new(name: &str) -> Result<Lineage, BackupError> {
        check_segment("oplog lineage", name)?;
        Ok(Lineage(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Lineage {
    type Error = BackupError;

    fn try_from(s: String) -> Result<Lineage, BackupError> {
        Lineage::new(&s)
    }
}

impl From<Lineage> for String {
    fn from(l: Lineage) -> String {
        l.0
    }
}

/// What an oplog segment's name says: it holds every change of the database in the
/// positions `(after, through]` of `lineage`, their times are in `[min_ts, max_ts]`, and
/// every change with a time at or before `max_ts` is at or before `through` (the archiver
/// reads the oplog in order and the leader's times only grow, so the segment covers the
/// database's history up to `max_ts`). A segment with no change (`after == through`, an idle
/// database) still moves the covered time on. `sha256` is the stored object's digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SegmentName {
    pub lineage: Lineage,
    pub after: OplogPosition,
    pub through: OplogPosition,
    pub min_ts: u64,
    pub max_ts: u64,
    /// Lowercase hex SHA-256 of the object's bytes.
    pub sha256: String,
}

/// The digest field of a record-only segment name (see [`SegmentName::record_only`]): not
/// a SHA-256, so no listed segment ([`SegmentName::parse`] requires one) can have it.
const RECORD_ONLY_SHA256: &str = "record-only";

impl SegmentName {
    /// The archive record's idle progress as a segment name: no change of the database in
    /// `(after, through]`, every change at or before `covered_ms` at or before `through`.
    /// It has no object (the archiver keeps an idle database's covered time in its etcd
    /// record rather than writing an empty segment every few seconds); a restore plan
    /// counts its covered time and never lists it for reading. Its `sha256` is `record-only`, which no listed name has.
    pub fn record_only(lineage: Lineage, after: OplogPosition, through: OplogPosition, covered_ms: u64) -> SegmentName {
        SegmentName {
            lineage,
            after,
            through,
            min_ts: covered_ms,
            max_ts: covered_ms,
            sha256: RECORD_ONLY_SHA256.into(),
        }
    }

    /// Whether this name stands for the archive record's idle progress, not an object.
    pub fn is_record_only(&self) -> bool {
        self.sha256 == RECORD_ONLY_SHA256
    }

    /// `{after}_{through}_{min_ts:013}_{max_ts:013}_{sha256}.seg`.
    pub fn file_name(&self) -> String {
        format!(
            "{:020}-{:010}_{:020}-{:010}_{:013}_{:013}_{}{SEGMENT_SUFFIX}",
            self.after.index,
            self.after.seq,
            self.through.index,
            self.through.seq,
            self.min_ts,
            self.max_ts,
            self.sha256
        )
    }

    /// Reads a segment's name back from its path (`.../oplog/{lineage}/{file}`); `None` for
    /// anything that is not a segment (a temporary file of an upload, a stray object), which
    /// the listing skips.
    pub fn parse(location: &BackupLocation, path: &Path) -> Option<SegmentName> {
        let mut rest = path.prefix_match(&location.oplog())?;
        let lineage = Lineage::new(rest.next()?.as_ref()).ok()?;
        let file = rest.next()?;
        if rest.next().is_some() {
            return None;
        }
        let stem = file.as_ref().strip_suffix(SEGMENT_SUFFIX)?;
        let mut fields = stem.split('_');
        let after = parse_position(fields.next()?)?;
        let through = parse_position(fields.next()?)?;
        let min_ts = parse_fixed(fields.next()?, 13)?;
        let max_ts = parse_fixed(fields.next()?, 13)?;
        let sha256 = fields.next()?;
        if fields.next().is_some() || !is_sha256_hex(sha256) || after > through || min_ts > max_ts {
            return None;
        }
        Some(SegmentName { lineage, after, through, min_ts, max_ts, sha256: sha256.to_string() })
    }
}

/// What an object under `.../full/{id}/` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FullObject {
    /// `{n:06}.page`.
    Page(u32),
    /// `manifest_{sha256}.json`: the digest its bytes must have.
    Manifest(String),
    /// Anything else (a temporary file of an upload, a stray object).
    Other,
}

/// Which full a path belongs to, and what it is of it.
pub(crate) fn parse_full_object(location: &BackupLocation, path: &Path) -> Option<(FullId, FullObject)> {
    let mut rest = path.prefix_match(&location.fulls())?;
    let id: FullId = rest.next()?.as_ref().parse().ok()?;
    let Some(file) = rest.next() else { return Some((id, FullObject::Other)) };
    let file = file.as_ref();
    let what = if rest.next().is_some() {
        FullObject::Other
    } else if let Some(n) = file.strip_suffix(PAGE_SUFFIX).and_then(|n| parse_fixed(n, 6)) {
        u32::try_from(n).map(FullObject::Page).unwrap_or(FullObject::Other)
    } else {
        match file.strip_prefix(MANIFEST_PREFIX).and_then(|f| f.strip_suffix(MANIFEST_SUFFIX)) {
            Some(sha) if is_sha256_hex(sha) => FullObject::Manifest(sha.to_string()),
            _ => FullObject::Other,
        }
    };
    Some((id, what))
}

fn parse_position(s: &str) -> Option<OplogPosition> {
    let (index, seq) = s.split_once('-')?;
    Some(OplogPosition { index: parse_fixed(index, 20)?, seq: u32::try_from(parse_fixed(seq, 10)?).ok()? })
}

fn parse_fixed(s: &str, width: usize) -> Option<u64> {
    if s.len() != width || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incarnation() -> Incarnation {
        Incarnation::new("5f0c-uid").unwrap()
    }

    fn location() -> BackupLocation {
        BackupLocation::new("backups/v1", "team-a", "orders", &incarnation()).unwrap()
    }

    #[test]
    fn backup_paths_are_built_from_checked_names() {
        let loc = location();
        let id = FullId::new(1_700_000_000_000, 0xab);
        let sha = "ab".repeat(32);
        assert_eq!(
            loc.manifest(&id, &sha).as_ref(),
            format!("backups/v1/team-a/orders/5f0c-uid/full/1700000000000-000000ab/manifest_{sha}.json")
        );
        assert_eq!(
            loc.page(&id, 7).as_ref(),
            "backups/v1/team-a/orders/5f0c-uid/full/1700000000000-000000ab/000007.page"
        );
        assert_eq!(parse_full_object(&loc, &loc.manifest(&id, &sha)), Some((id.clone(), FullObject::Manifest(sha))));
        assert_eq!(parse_full_object(&loc, &loc.page(&id, 7)), Some((id.clone(), FullObject::Page(7))));
        assert_eq!(id.started_ms(), 1_700_000_000_000);
        assert_eq!("1700000000000-000000ab".parse::<FullId>().unwrap(), id);
        for bad in ["", "..", "a/b", "x y", "é"] {
            assert!(BackupLocation::new("", "s", bad, &incarnation()).is_err(), "{bad:?} accepted as a database name");
            assert!(Incarnation::new(bad).is_err(), "{bad:?} accepted as an incarnation");
        }
        assert!(BackupLocation::new("../up", "s", "db", &incarnation()).is_err());
        for bad in ["1700000000000", "170000000000-000000ab", "1700000000000-000000AB", "1700000000000-0000zzab"] {
            assert!(bad.parse::<FullId>().is_err(), "{bad:?} accepted as a full id");
        }
    }

    #[test]
    fn segment_names_round_trip_and_sort_by_position() {
        let loc = location();
        let name = |index: u64, seq: u32| SegmentName {
            lineage: Lineage::new("rs-1.e3").unwrap(),
            after: OplogPosition { index, seq },
            through: OplogPosition { index: index + 10, seq: u32::MAX },
            min_ts: 5,
            max_ts: 1_700_000_000_123,
            sha256: "ab".repeat(32),
        };
        let a = name(9, 2);
        let path = loc.segment(&a);
        assert_eq!(SegmentName::parse(&loc, &path), Some(a.clone()));
        assert!(loc.segment(&name(9, 2)).as_ref() < loc.segment(&name(10, 0)).as_ref());
        assert!(loc.segment(&name(99, 0)).as_ref() < loc.segment(&name(100, 0)).as_ref());
        // Not segments: another db's, another incarnation's, a bad digest, a temporary upload.
        let other = BackupLocation::new("backups/v1", "team-a", "orders2", &incarnation()).unwrap();
        assert_eq!(SegmentName::parse(&other, &path), None);
        let reused =
            BackupLocation::new("backups/v1", "team-a", "orders", &Incarnation::new("new-uid").unwrap()).unwrap();
        assert_eq!(SegmentName::parse(&reused, &path), None);
        let bad = Path::from(path.as_ref().replace(&"ab".repeat(32), &"zz".repeat(32)));
        assert_eq!(SegmentName::parse(&loc, &bad), None);
        let tmp = Path::from(format!("{}#1", path.as_ref()));
        assert_eq!(SegmentName::parse(&loc, &tmp), None);
    }

    proptest::proptest! {
        /// Any segment's name reads back as itself, and names sort as positions do (what a
        /// listing's order relies on).
        #[test]
        fn segment_names_read_back_and_sort_by_position(
            a in (proptest::prelude::any::<u64>(), proptest::prelude::any::<u32>()),
            b in (proptest::prelude::any::<u64>(), proptest::prelude::any::<u32>()),
            ts in (0u64..10_000_000_000_000, 0u64..10_000_000_000_000),
        ) {
            let loc = location();
            let (after, through) = {
                let (x, y) = (OplogPosition { index: a.0, seq: a.1 }, OplogPosition { index: b.0, seq: b.1 });
                (x.min(y), x.max(y))
            };
            let name = SegmentName {
                lineage: Lineage::new("l").unwrap(),
                after,
                through,
                min_ts: ts.0.min(ts.1),
                max_ts: ts.0.max(ts.1),
                sha256: "0f".repeat(32),
            };
            let path = loc.segment(&name);
            proptest::prop_assert_eq!(SegmentName::parse(&loc, &path), Some(name.clone()));
            let other = SegmentName { after: through, through, ..name.clone() };
            proptest::prop_assert_eq!(
                path.as_ref().cmp(loc.segment(&other).as_ref()),
                (after, through).cmp(&(through, through))
            );
        }
    }
}
