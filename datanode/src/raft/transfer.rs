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
//!   is removed then. `DIR/incoming` is emptied at startup too. A chunk of a removed
//!   transfer is refused, and its sender starts over.
//! - **Verified and durable before Raft sees it.** Before the snapshot is handed to
//!   openraft, every file is read back, hashed and fsynced, and the transfer directory
//!   fsynced. A missing, short, unlisted or mismatching file refuses the transfer with an
//!   error its sender's openraft retries (a network error): it never reaches the state
//!   machine, where any error stops the member.
//!
//! The staging area is behind one lock, held from a transfer's verification until Raft has
//! installed it, so a new transfer cannot remove one being installed.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, MutexGuard};

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
    #[error("failed to continue snapshot transfer {0}: it is not staged here (abandoned, or replaced by a newer one)")]
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

/// `DIR/incoming`: snapshot transfers being received.
#[derive(Debug)]
pub struct Incoming {
    root: PathBuf,
    lock: Mutex<()>,
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
        Ok(Incoming { root, lock: Mutex::new(()) })
    }

    /// Exclusive use of the staging area until the returned guard is dropped.
    pub async fn lock(&self) -> Staging<'_> {
        Staging { root: &self.root, _guard: self.lock.lock().await }
    }
}

/// The staging area, locked.
pub struct Staging<'a> {
    root: &'a Path,
    _guard: MutexGuard<'a, ()>,
}

impl Staging<'_> {
    fn dir(&self, transfer: &TransferId) -> PathBuf {
        self.root.join(transfer.as_str())
    }

    /// Appends one chunk of `file` at `offset`. The first chunk of a transfer (offset 0,
    /// nothing staged under its id) removes every other transfer.
    pub async fn write_chunk(
        &mut self,
        transfer: &TransferId,
        file: &str,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), TransferError> {
        if !is_safe_file_name(file) || file == META_FILE {
            return Err(TransferError::BadName(file.to_owned()));
        }
        let dir = self.dir(transfer);
        if !tokio::fs::try_exists(&dir).await.map_err(io_error("look for", &dir))? {
            if offset != 0 {
                return Err(TransferError::Unknown(transfer.clone()));
            }
            self.remove_all().await?;
            tokio::fs::create_dir(&dir).await.map_err(io_error("create", &dir))?;
            tracing::info!(transfer = %transfer, "snapshot transfer started");
        }
        let path = dir.join(file);
        let have = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error("read the size of", &path)(e)),
        };
        if have != offset {
            return Err(TransferError::OutOfOrder { file: file.to_owned(), offset, have });
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(io_error("open", &path))?;
        f.write_all(bytes).await.map_err(io_error("write", &path))?;
        f.flush().await.map_err(io_error("write", &path))?;
        Ok(())
    }

    /// Checks that the transfer holds exactly `files`, each of the size and SHA-256 its
    /// sender read, and makes it durable (every file and the directory fsynced). Answers
    /// the directory, ready to install.
    pub async fn verify(&mut self, transfer: &TransferId, files: &[FileDigest]) -> Result<PathBuf, TransferError> {
        let dir = self.dir(transfer);
        if !tokio::fs::try_exists(&dir).await.map_err(io_error("look for", &dir))? {
            return Err(TransferError::Unknown(transfer.clone()));
        }
        let files = files.to_vec();
        let checked = dir.clone();
        tokio::task::spawn_blocking(move || verify_dir(&checked, &files))
            .await
            .map_err(|e| io_error("verify", &dir)(io::Error::other(e)))??;
        Ok(dir)
    }

    /// Removes one transfer (installed, refused, or stale).
    pub async fn remove(&mut self, transfer: &TransferId) {
        let dir = self.dir(transfer);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, path = %dir.display(), "failed to remove a snapshot transfer");
        }
    }

    async fn remove_all(&mut self) -> Result<(), TransferError> {
        let mut entries = tokio::fs::read_dir(self.root).await.map_err(io_error("list", self.root))?;
        while let Some(e) = entries.next_entry().await.map_err(io_error("list", self.root))? {
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

/// [`Staging::verify`]'s work, on a blocking thread: it reads the whole snapshot.
fn verify_dir(dir: &Path, files: &[FileDigest]) -> Result<(), TransferError> {
    let mut listed = BTreeSet::new();
    for f in files {
        if !is_safe_file_name(&f.name) || f.name == META_FILE {
            return Err(TransferError::BadName(f.name.clone()));
        }
        listed.insert(f.name.as_str());
    }
    for e in std::fs::read_dir(dir).map_err(io_error("list", dir))? {
        let name = e.map_err(io_error("list", dir))?.file_name().to_string_lossy().into_owned();
        if !listed.contains(name.as_str()) {
            return Err(TransferError::Unlisted(name));
        }
    }
    let mut buf = vec![0u8; 1024 * 1024];
    for want in files {
        let path = dir.join(&want.name);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(TransferError::Incomplete { file: want.name.clone(), want: want.size, got: 0 });
            }
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        let mut hasher = FileHasher::new(&want.name);
        loop {
            let n = f.read(&mut buf).map_err(io_error("read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = hasher.finish();
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
        f.sync_all().map_err(io_error("sync", &path))?;
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
                s.write_chunk(&t, name, 0, bytes).await.unwrap();
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
        let e = s.write_chunk(&t, "a.sst", 3, b"lo").await.unwrap_err();
        assert!(matches!(e, TransferError::OutOfOrder { have: 5, .. }), "{e}");
        s.write_chunk(&t, "a.sst", 5, b" world").await.unwrap();
        let other = TransferId::parse("t2").unwrap();
        let e = s.write_chunk(&other, "a.sst", 10, b"x").await.unwrap_err();
        assert!(matches!(e, TransferError::Unknown(_)), "{e}");
        let e = s.write_chunk(&t, META_FILE, 0, b"{}").await.unwrap_err();
        assert!(matches!(e, TransferError::BadName(_)), "{e}");
    }

    #[test]
    fn transfer_ids_are_short_and_alphanumeric() {
        assert!(TransferId::parse(TransferId::random().as_str()).is_some());
        for bad in ["", "..", "a/b", "a.b", &"x".repeat(65)] {
            assert!(TransferId::parse(bad).is_none(), "{bad:?}");
        }
    }
}
