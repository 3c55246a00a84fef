//! Backups and point-in-time restore of one database (`docs/design/0004-backup.md`, issue
//! 15): full backups written page by page from the export hot migration uses, a continuous
//! archive of the database's oplog in segments, and the decisions over them. One library
//! for the Kubernetes operator and the playground.
//!
//! - [`layout`]: where each object lives and what its name says ([`BackupLocation`],
//!   [`FullId`], [`Lineage`], [`SegmentName`]).
//! - [`format`]: what the objects hold ([`FullManifest`], pages and segments as zstd JSON,
//!   SHA-256 digests).
//! - [`store`]: writing and reading them over any `object_store` ([`BackupStore`]), every
//!   read verified against its digest.
//! - [`location`]: where backups go, a local directory or an S3 bucket
//!   ([`BackupStorage`]), opened as an `object_store`; [`s3_client`] is S3's HTTP transport.
//! - [`plan`]: the decisions, pure: [`plan_restore`], [`recoverable_window`],
//!   [`retention`], [`full_due`].
//!
//! Not here yet: taking a full from a datanode, the archiver tailing the oplog, the restore
//! through the import protocol, the CRDs and the playground verbs.

pub mod agent;
pub mod format;
pub mod layout;
pub mod location;
pub mod plan;
pub mod restore;
pub mod restore_job;
pub mod s3_client;
pub mod store;
pub mod verify;

#[cfg(test)]
mod plan_tests;
#[cfg(test)]
mod restore_tests;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod verify_tests;

pub use format::{FORMAT_VERSION, FullManifest, PageEntry, sha256_hex};
pub use layout::{BackupLocation, FullId, Incarnation, Lineage, SegmentName, scope_root};
pub use location::{BackupStorage, OpenedStorage, S3Credentials, S3Options, StorageError};
pub use plan::{
    Deletions, FullPolicy, RecoverableWindow, RestoreError, RestorePlan, RestoreTarget, RetentionPolicy, TimeRange,
    full_due, plan_restore, plan_to_full_end, recoverable_window, retention,
};
pub use store::{BackupStore, FullListing, NewSegment, ObjectLimits};

/// Why a backup object could not be written, listed, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A name that would not be one path segment of the same meaning on every store.
    #[error("invalid {what} {value:?}: only ASCII letters, digits, '_', '-' and '.' are allowed")]
    InvalidName { what: &'static str, value: String },
    #[error("failed to encode the {what}: {message}")]
    Encode { what: &'static str, message: String },
    /// The object store refused or failed (network, permissions, a full disk).
    #[error("failed to {op} backup object {object}: {source}")]
    Store {
        op: &'static str,
        object: String,
        #[source]
        source: object_store::Error,
    },
    /// An object the manifest or the listing named is not there.
    #[error("backup object {object} is missing")]
    Missing { object: String },
    /// An object of another size than its manifest says, or larger than its kind may be:
    /// refused before its body is read.
    #[error("backup object {object} is damaged: {size} bytes, expected {expected}")]
    TooLarge { object: String, size: u64, expected: String },
    /// The bytes read are not the bytes written.
    #[error("backup object {object} is damaged: SHA-256 {actual}, expected {expected}")]
    Damaged { object: String, actual: String, expected: String },
    /// The digest matched (or there is none, for a manifest) but the content is not what
    /// this code writes.
    #[error("backup object {object} is damaged: {message}")]
    Undecodable { object: String, message: String },
    #[error("backup object {object} has format {format}, newer than this code's {}", FORMAT_VERSION)]
    UnsupportedFormat { object: String, format: u32 },
    /// A manifest the caller built is wrong: refused before it is published.
    #[error("failed to write the manifest of full {id}: {message}")]
    InvalidManifest { id: String, message: String },
    /// A segment the caller built is wrong: refused before it is written.
    #[error("failed to archive an oplog segment of database {db}: {message}")]
    InvalidSegment { db: String, message: String },
}

impl BackupError {
    /// Whether trying the same call again may succeed: only the object store's own
    /// failures. A missing or damaged object stays so, and a wrong name or manifest is a bug.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackupError::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotSupported { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            _ => false,
        }
    }
}
