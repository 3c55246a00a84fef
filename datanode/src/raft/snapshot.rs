//! Snapshots are RocksDB checkpoints of the state machine (its table files hard-linked after
//! a flush: no copy of the data, no serialisation into memory; see
//! `state_machine::SmShared::build_snapshot`), kept under `DIR/snapshots/<id>/` with a
//! [`META_FILE`]. They travel to a lagging member file by file in bounded chunks
//! ([`super::network`], [`super::transfer`]).
//!
//! Everything here is durable before it is visible: a snapshot directory is built under a
//! `tmp-` name, its files and the directory fsynced, then renamed into place and the parent
//! fsynced. A crash leaves a `tmp-` directory at worst, removed at startup.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::types::SnapshotMeta;

/// The file in a snapshot directory that holds its [`SnapshotMeta`]. Not part of what is
/// sent: the metadata travels in the install call.
pub const META_FILE: &str = "nimbus-snapshot-meta.json";

/// The data of a snapshot: a directory holding a RocksDB checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotData {
    pub dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct MetaFile {
    meta: SnapshotMeta,
}

/// The name prefix of a snapshot directory in the making, renamed once it is complete.
pub const TMP_PREFIX: &str = "tmp-";

/// How many snapshots to keep: the newest, and the one before it in case it is still being
/// sent to a member.
const KEEP: usize = 2;

/// The `DIR/snapshots` directory.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    root: PathBuf,
}

impl SnapshotDir {
    pub fn new(root: PathBuf) -> io::Result<SnapshotDir> {
        std::fs::create_dir_all(&root)?;
        // Leftovers of a build or adoption interrupted by a crash are not snapshots, and
        // their hard links would keep compacted table files on the disk for good. No build
        // runs yet: this is called once, when the state machine opens.
        for e in std::fs::read_dir(&root)? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                std::fs::remove_dir_all(e.path())?;
                tracing::info!(dir = %e.path().display(), "removed an unfinished snapshot left by a crash");
            }
        }
        Ok(SnapshotDir { root })
    }

    /// A fresh directory for a checkpoint in the making.
    pub fn temp_dir(&self) -> PathBuf {
        self.root.join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4().simple()))
    }

    /// Publishes a checkpoint made in `tmp` as the snapshot `meta` describes. The
    /// checkpoint's files must be durable already (RocksDB syncs a checkpoint; see
    /// [`SnapshotDir::adopt`] for received ones); the metadata, the directory and its new
    /// name are synced here, in that order.
    pub fn publish(&self, tmp: &Path, meta: &SnapshotMeta) -> io::Result<SnapshotData> {
        let index = meta.last_log_id.as_ref().map(|l| l.index()).unwrap_or(0);
        let name = format!("{index:020}-{}", uuid::Uuid::new_v4().simple());
        let body = serde_json::to_vec(&MetaFile { meta: meta.clone() }).map_err(io::Error::other)?;
        write_synced(&tmp.join(META_FILE), &body)?;
        sync_dir(tmp)?;
        let dir = self.root.join(name);
        std::fs::rename(tmp, &dir)?;
        sync_dir(&self.root)?;
        self.prune()?;
        Ok(SnapshotData { dir })
    }

    /// Makes the checkpoint in `src` (a received transfer, or another member's snapshot)
    /// one of this member's snapshots, by hard links: the files are shared, not copied,
    /// and `src` is left as it was. A directory that already is one of this member's
    /// snapshots is answered as is.
    pub fn adopt(&self, src: &Path, meta: &SnapshotMeta) -> io::Result<SnapshotData> {
        if src.parent() == Some(self.root.as_path()) && src.join(META_FILE).exists() {
            return Ok(SnapshotData { dir: src.to_owned() });
        }
        let tmp = self.temp_dir();
        std::fs::create_dir(&tmp)?;
        for (name, _) in data_files(src)? {
            link_or_copy(&src.join(&name), &tmp.join(&name))?;
        }
        self.publish(&tmp, meta)
    }

    fn list(&self) -> io::Result<Vec<PathBuf>> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.root)?
            .filter_map(|e| e.ok())
            // A snapshot being built or adopted beside this call (its metadata may be
            // written already) is neither the newest snapshot nor one to prune.
            .filter(|e| !e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .map(|e| e.path())
            .filter(|p| p.join(META_FILE).exists())
            .collect();
        dirs.sort();
        Ok(dirs)
    }

    /// Removes all but the [`KEEP`] newest snapshots. A build and an install may prune at
    /// once (a build runs beside the state machine): what the other removed first is gone
    /// already, not an error.
    fn prune(&self) -> io::Result<()> {
        let dirs = self.list()?;
        if dirs.len() > KEEP {
            for d in &dirs[..dirs.len() - KEEP] {
                match std::fs::remove_dir_all(d) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The newest snapshot, if any.
    pub fn current(&self) -> io::Result<Option<(SnapshotMeta, SnapshotData)>> {
        let Some(dir) = self.list()?.pop() else { return Ok(None) };
        Ok(Some((read_meta(&dir)?, SnapshotData { dir })))
    }
}

/// Reads the metadata a snapshot directory carries.
pub fn read_meta(dir: &Path) -> io::Result<SnapshotMeta> {
    let bytes = std::fs::read(dir.join(META_FILE))?;
    let f: MetaFile = serde_json::from_slice(&bytes).map_err(io::Error::other)?;
    Ok(f.meta)
}

/// The checkpoint files of a snapshot, as (name, size): what is sent to another member.
/// A checkpoint directory is flat; the metadata file is not among them.
pub fn data_files(dir: &Path) -> io::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_file() && name != META_FILE {
            out.push((name, e.metadata()?.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Makes `dst` (which must not exist) a RocksDB directory holding the checkpoint in
/// `snapshot`, durable, without changing the snapshot: table files (`.sst`, `.blob`),
/// which RocksDB never writes once made, are hard-linked; the others (`CURRENT`,
/// `MANIFEST-*`, `OPTIONS-*`, WAL files), which an open database may rewrite or append to,
/// are copied and synced.
pub fn materialize(snapshot: &Path, dst: &Path) -> io::Result<()> {
    std::fs::create_dir(dst)?;
    for (name, _) in data_files(snapshot)? {
        let (from, to) = (snapshot.join(&name), dst.join(&name));
        if name.ends_with(".sst") || name.ends_with(".blob") {
            link_or_copy(&from, &to)?;
        } else {
            copy_synced(&from, &to)?;
        }
    }
    sync_dir(dst)
}

/// A hard link to `from` at `to`, or a synced copy where links cannot be made (another
/// file system). The linked file's data is as durable as `from`'s; the new name becomes
/// durable when its directory is synced.
fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, from = %from.display(), "hard link failed; copying");
            copy_synced(from, to)
        }
    }
}

fn copy_synced(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    std::fs::write(path, bytes)?;
    std::fs::File::open(path)?.sync_all()
}

/// Fsyncs a directory: the names created, renamed or removed in it become durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A file name that a received snapshot may contain: no path separators, no `..`.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
