//! Snapshot transfers, the receiving side: where a snapshot's files are staged while they
//! arrive, how they are checked against what the sender read, and how abandoned transfers
//! go away.
//!
//! The leader sends a snapshot file by file in chunks, then one `install` call that lists
//! every file with its size and the SHA-256 of the bytes it read ([`super::network`]).
//! Chunks land in `DIR/incoming/<transfer>/`.
//!
//! - **One transfer at a time.** A member follows one leader, and openraft sends one
//!   snapshot at a time to a member; a transfer that starts while another is staged means
//!   the other was abandoned (its sender crashed, timed out, or lost its leadership), so it
//!   is removed then. `DIR/incoming` is emptied at startup too. A chunk of a transfer that
//!   ended here (installed, refused or removed) is refused, whatever its offset, and its
//!   sender starts over.
//! - **Checked as it arrives.** Each chunk is appended, fsynced and fed to its file's
//!   SHA-256, kept here with the transfer: the install call compares the sums, it does not
//!   read the snapshot again, so what is left to do then does not grow with its size. A
//!   missing, short, unlisted or mismatching file refuses the transfer with an error its
//!   sender's openraft retries (a network error): it never reaches the state machine, where
//!   any error stops the member.
//! - **Not cut short by its sender.** The staging area is behind one lock, taken as an
//!   owned guard. A chunk's write and an install (verification, then Raft's install) run
//!   in a task of their own holding it, not in the request that asked for them: a sender
//!   that times out or disconnects drops its request, not the work, and a new transfer
//!   waits for the lock, so it cannot remove files the state machine is still linking.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::snapshot::{META_FILE, is_safe_file_name, sync_dir};

/// One file of a snapshot as the sender read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub size: u64,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
}

/// Computes a [`FileDigest`] over bytes fed in order.
#[derive(Clone)]
pub struct FileHasher {
    name: String,
    size: u64,
    hasher: Sha256,
}

impl FileHasher {
    pub fn new(name: &str) -> FileHasher {
        FileHasher { name: name.to_owned(), size: 0, hasher: Sha256::new() }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.hasher.update(bytes);
    }

    /// How many bytes were fed.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(self) -> FileDigest {
        FileDigest { name: self.name, size: self.size, sha256: hex::encode(self.hasher.finalize()) }
    }
}

/// The id of one transfer: ASCII letters and digits, at most 64 of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferId(String);

impl TransferId {
    pub fn parse(s: &str) -> Option<TransferId> {
        let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| TransferId(s.to_owned()))
    }

    /// A fresh id for a transfer about to start.
    pub fn random() -> TransferId {
        TransferId(uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TransferId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a chunk or a whole transfer was refused. Every one but [`TransferError::BadName`]
/// and [`TransferError::Io`] is the transfer's fault, not the member's: the sender starts a
/// new transfer.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("failed to accept snapshot file {0:?}: not a valid file name")]
    BadName(String),
    #[error("failed to continue snapshot transfer {0}: it is not staged here (ended, or replaced by a newer one)")]
    Unknown(TransferId),
    #[error("failed to append to snapshot file {file}: chunk at offset {offset}, but {have} bytes of it are here")]
    OutOfOrder { file: String, offset: u64, have: u64 },
    #[error("failed to verify snapshot file {file}: {got} bytes received, {want} sent")]
    Incomplete { file: String, want: u64, got: u64 },
    #[error("failed to verify snapshot transfer: file {0} was received but not listed by the sender")]
    Unlisted(String),
    #[error("failed to verify snapshot file {file}: SHA-256 {got}, the sender read {want}")]
    ChecksumMismatch { file: String, want: String, got: String },
    #[error("failed to {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
}

impl TransferError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TransferError::BadName(_) => "bad_name",
            TransferError::Unknown(_) => "unknown_transfer",
            TransferError::OutOfOrder { .. } => "out_of_order",
            TransferError::Incomplete { .. } => "incomplete",
            TransferError::Unlisted(_) => "unlisted_file",
            TransferError::ChecksumMismatch { .. } => "checksum_mismatch",
            TransferError::Io { .. } => "io",
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TransferError {
    let path = path.to_owned();
    move |source| TransferError::Io { action, path, source }
}

/// How many ended transfers are remembered, so that a late chunk of one (a request its
/// sender gave up on, run after the next transfer started) is refused, not taken for the
/// start of a transfer.
const ENDED_KEPT: usize = 64;

/// `DIR/incoming`: snapshot transfers being received.
#[derive(Debug)]
pub struct Incoming {
    root: PathBuf,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// The transfer staged now.
    current: Option<Staged>,
    /// The latest transfers that ended here, oldest first.
    ended: VecDeque<TransferId>,
}

#[derive(Debug)]
struct Staged {
    id: TransferId,
    /// Every file received so far, with the size and SHA-256 of what was written to it.
    files: BTreeMap<String, FileHasher>,
}

impl std::fmt::Debug for FileHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileHasher").field("name", &self.name).field("size", &self.size).finish_non_exhaustive()
    }
}

impl Incoming {
    /// Opens the staging area at `root`, removing whatever an earlier run left there: a
    /// transfer does not survive a restart (its sender's requests failed meanwhile).
    pub fn open(root: PathBuf) -> io::Result<Incoming> {
        match std::fs::remove_dir_all(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&root)?;
        Ok(Incoming { root, state: Arc::new(Mutex::new(State::default())) })
    }

    /// Exclusive use of the staging area until the returned guard is dropped. The guard
    /// owns the lock: it can be moved into a task that outlives the request which took it.
    pub async fn lock(&self) -> Staging {
        Staging { root: self.root.clone(), state: self.state.clone().lock_owned().await }
    }
}

/// The staging area, locked.
pub struct Staging {
    root: PathBuf,
    state: OwnedMutexGuard<State>,
}

impl Staging {
    fn dir(&self, transfer: &TransferId) -> PathBuf {
        self.root.join(transfer.as_str())
    }

    fn staged(&mut self, transfer: &TransferId) -> Option<&mut Staged> {
        self.state.current.as_mut().filter(|s| &s.id == transfer)
    }

    /// Appends one chunk of `file` at `offset`, durably, and adds it to the file's SHA-256.
    /// The first chunk of a transfer (offset 0, a transfer that neither is staged nor
    /// ended here) removes every other transfer.
    pub async fn write_chunk(
        &mut self,
        transfer: &TransferId,
        file: &str,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), TransferError> {
        if !is_safe_file_name(file) || file == META_FILE {
            return Err(TransferError::BadName(file.to_owned()));
        }
        let dir = self.dir(transfer);
        if self.staged(transfer).is_none() {
            if offset != 0 || self.state.ended.contains(transfer) {
                return Err(TransferError::Unknown(transfer.clone()));
            }
            self.remove_all().await?;
            tokio::fs::create_dir(&dir).await.map_err(io_error("create", &dir))?;
            self.state.current = Some(Staged { id: transfer.clone(), files: BTreeMap::new() });
            tracing::info!(transfer = %transfer, "snapshot transfer started");
        }
        let Some(staged) = self.staged(transfer) else { return Err(TransferError::Unknown(transfer.clone())) };
        let hasher = staged.files.remove(file).unwrap_or_else(|| FileHasher::new(file));
        if hasher.size() != offset {
            let have = hasher.size();
            staged.files.insert(file.to_owned(), hasher);
            return Err(TransferError::OutOfOrder { file: file.to_owned(), offset, have });
        }
        let path = dir.join(file);
        let written = tokio::task::spawn_blocking(move || append_synced(&path, hasher, &bytes))
            .await
            .unwrap_or_else(|e| Err(io_error("append to", &dir.join(file))(io::Error::other(e))));
        match written {
            Ok(hasher) => {
                if let Some(staged) = self.staged(transfer) {
                    staged.files.insert(file.to_owned(), hasher);
                }
                Ok(())
            }
            Err(e) => {
                // What the file holds is not known any more: the sender starts over.
                self.remove(transfer).await;
                Err(e)
            }
        }
    }

    /// Checks that the transfer holds exactly `files`, each of the size and SHA-256 its
    /// sender read (against the sums taken as the chunks arrived: nothing is read again),
    /// and makes it durable (the files, whose chunks were synced as they came, and the
    /// directory). Answers the directory, ready to install.
    pub async fn verify(&mut self, transfer: &TransferId, files: &[FileDigest]) -> Result<PathBuf, TransferError> {
        let dir = self.dir(transfer);
        let Some(staged) = self.staged(transfer) else { return Err(TransferError::Unknown(transfer.clone())) };
        let mut listed = BTreeSet::new();
        for f in files {
            if !is_safe_file_name(&f.name) || f.name == META_FILE {
                return Err(TransferError::BadName(f.name.clone()));
            }
            listed.insert(f.name.as_str());
        }
        if let Some(name) = staged.files.keys().find(|name| !listed.contains(name.as_str())) {
            return Err(TransferError::Unlisted(name.clone()));
        }
        for want in files {
            let Some(got) = staged.files.get(&want.name) else {
                return Err(TransferError::Incomplete { file: want.name.clone(), want: want.size, got: 0 });
            };
            let got = got.clone().finish();
            if got.size != want.size {
                return Err(TransferError::Incomplete { file: want.name.clone(), want: want.size, got: got.size });
            }
            if got.sha256 != want.sha256 {
                return Err(TransferError::ChecksumMismatch {
                    file: want.name.clone(),
                    want: want.sha256.clone(),
                    got: got.sha256,
                });
            }
        }
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        let checked = dir.clone();
        tokio::task::spawn_blocking(move || sync_transfer(&checked, &names))
            .await
            .unwrap_or_else(|e| Err(io_error("sync", &dir)(io::Error::other(e))))?;
        Ok(dir)
    }

    /// Removes one transfer (installed, refused, or stale); a late chunk of it is refused.
    pub async fn remove(&mut self, transfer: &TransferId) {
        if self.staged(transfer).is_some() {
            self.state.current = None;
        }
        self.ended(transfer.clone());
        let dir = self.dir(transfer);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, path = %dir.display(), "failed to remove a snapshot transfer");
        }
    }

    fn ended(&mut self, transfer: TransferId) {
        if !self.state.ended.contains(&transfer) {
            if self.state.ended.len() >= ENDED_KEPT {
                self.state.ended.pop_front();
            }
            self.state.ended.push_back(transfer);
        }
    }

    async fn remove_all(&mut self) -> Result<(), TransferError> {
        if let Some(staged) = self.state.current.take() {
            self.ended(staged.id);
        }
        let root = self.root.clone();
        let mut entries = tokio::fs::read_dir(&root).await.map_err(io_error("list", &root))?;
        while let Some(e) = entries.next_entry().await.map_err(io_error("list", &root))? {
            let path = e.path();
            let removed = if e.file_type().await.map_err(io_error("inspect", &path))?.is_dir() {
                tokio::fs::remove_dir_all(&path).await
            } else {
                tokio::fs::remove_file(&path).await
            };
            removed.map_err(io_error("remove", &path))?;
            tracing::info!(path = %path.display(), "removed an abandoned snapshot transfer");
            metrics::counter!("nimbus_snapshot_transfers_abandoned_total").increment(1);
        }
        Ok(())
    }
}

/// [`Staging::write_chunk`]'s work, on a blocking thread: appends `bytes` to `path`, which
/// must hold exactly what `hasher` was fed, syncs it, and answers the hasher fed `bytes`.
fn append_synced(path: &Path, mut hasher: FileHasher, bytes: &[u8]) -> Result<FileHasher, TransferError> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io_error("open", path))?;
    let have = f.metadata().map_err(io_error("read the size of", path))?.len();
    if have != hasher.size() {
        return Err(io_error("append to", path)(io::Error::other(format!(
            "it holds {have} bytes, {} were received",
            hasher.size()
        ))));
    }
    f.write_all(bytes).map_err(io_error("write", path))?;
    // Synced chunk by chunk: the install call then has no backlog of writes to wait for.
    f.sync_all().map_err(io_error("sync", path))?;
    hasher.update(bytes);
    Ok(hasher)
}

/// [`Staging::verify`]'s work, on a blocking thread: every file of the transfer synced
/// (each was synced as its chunks came, so this is quick), then the directory.
fn sync_transfer(dir: &Path, names: &[String]) -> Result<(), TransferError> {
    for name in names {
        let path = dir.join(name);
        std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io_error("sync", &path))?;
    }
    sync_dir(dir).map_err(io_error("sync", dir))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn digest(name: &str, bytes: &[u8]) -> FileDigest {
        let mut h = FileHasher::new(name);
        h.update(bytes);
        h.finish()
    }

    async fn staged(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Incoming, TransferId) {
        let tmp = tempfile::tempdir().unwrap();
        let incoming = Incoming::open(tmp.path().join("incoming")).unwrap();
        let t = TransferId::parse("t1").unwrap();
        {
            let mut s = incoming.lock().await;
            for (name, bytes) in files {
                s.write_chunk(&t, name, 0, Bytes::copy_from_slice(bytes)).await.unwrap();
            }
        }
        (tmp, incoming, t)
    }

    #[tokio::test]
    async fn a_transfer_matching_its_digests_is_accepted() {
        let (_tmp, incoming, t) = staged(&[("a.sst", b"hello"), ("CURRENT", b"MANIFEST-1\n")]).await;
        let dir =
            incoming.lock().await.verify(&t, &[digest("a.sst", b"hello"), digest("CURRENT", b"MANIFEST-1\n")]).await;
        assert!(dir.unwrap().join("a.sst").exists());
    }

    #[tokio::test]
    async fn a_changed_byte_is_a_checksum_mismatch() {
        let (_tmp, incoming, t) = staged(&[("a.sst", b"hellp")]).await;
        let e = incoming.lock().await.verify(&t, &[digest("a.sst", b"hello")]).await.unwrap_err();
        assert!(matches!(e, TransferError::ChecksumMismatch { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_short_missing_or_unlisted_file_is_refused() {
        let (_tmp, incoming, t) = staged(&[("a.sst", b"hell"), ("b.sst", b"x")]).await;
        let mut s = incoming.lock().await;
        let e = s.verify(&t, &[digest("a.sst", b"hello"), digest("b.sst", b"x")]).await.unwrap_err();
        assert!(matches!(e, TransferError::Incomplete { want: 5, got: 4, .. }), "{e}");
        let e = s.verify(&t, &[digest("a.sst", b"hell")]).await.unwrap_err();
        assert!(matches!(e, TransferError::Unlisted(ref f) if f == "b.sst"), "{e}");
        let e =
            s.verify(&t, &[digest("a.sst", b"hell"), digest("b.sst", b"x"), digest("c.sst", b"")]).await.unwrap_err();
        assert!(matches!(e, TransferError::Incomplete { got: 0, .. }), "{e}");
        let e = s.verify(&t, &[digest("../a.sst", b"hell")]).await.unwrap_err();
        assert!(matches!(e, TransferError::BadName(_)), "{e}");
    }

    #[tokio::test]
    async fn chunks_must_arrive_in_order_and_for_a_staged_transfer() {
        let (_tmp, incoming, t) = staged(&[("a.sst", b"hello")]).await;
        let mut s = incoming.lock().await;
        let e = s.write_chunk(&t, "a.sst", 3, Bytes::from_static(b"lo")).await.unwrap_err();
        assert!(matches!(e, TransferError::OutOfOrder { have: 5, .. }), "{e}");
        s.write_chunk(&t, "a.sst", 5, Bytes::from_static(b" world")).await.unwrap();
        let other = TransferId::parse("t2").unwrap();
        let e = s.write_chunk(&other, "a.sst", 10, Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(e, TransferError::Unknown(_)), "{e}");
        let e = s.write_chunk(&t, META_FILE, 0, Bytes::from_static(b"{}")).await.unwrap_err();
        assert!(matches!(e, TransferError::BadName(_)), "{e}");
    }

    #[tokio::test]
    async fn a_late_chunk_of_an_ended_transfer_does_not_start_it_again() {
        let (tmp, incoming, t1) = staged(&[("a.sst", b"hello")]).await;
        let mut s = incoming.lock().await;
        let t2 = TransferId::parse("t2").unwrap();
        s.write_chunk(&t2, "a.sst", 0, Bytes::from_static(b"world")).await.unwrap();
        assert!(!tmp.path().join("incoming/t1").exists(), "the abandoned transfer was kept");
        // A request of the abandoned transfer, run late: even its first chunk is refused.
        let e = s.write_chunk(&t1, "a.sst", 0, Bytes::from_static(b"hello")).await.unwrap_err();
        assert!(matches!(e, TransferError::Unknown(_)), "{e}");
        assert!(s.verify(&t2, &[digest("a.sst", b"world")]).await.is_ok(), "the new transfer was disturbed");
        s.remove(&t2).await;
        let e = s.write_chunk(&t2, "a.sst", 0, Bytes::from_static(b"world")).await.unwrap_err();
        assert!(matches!(e, TransferError::Unknown(_)), "{e}");
        let e = s.verify(&t2, &[digest("a.sst", b"world")]).await.unwrap_err();
        assert!(matches!(e, TransferError::Unknown(_)), "{e}");
    }

    #[test]
    fn transfer_ids_are_short_and_alphanumeric() {
        assert!(TransferId::parse(TransferId::random().as_str()).is_some());
        for bad in ["", "..", "a/b", "a.b", &"x".repeat(65)] {
            assert!(TransferId::parse(bad).is_none(), "{bad:?}");
        }
    }
}
