//! Storage of one replica-set member's state machine in RocksDB: documents, secondary
//! indexes, the collection/index catalog, the oplog and the idempotency table, each in its
//! own column family. Writes are applied as one RocksDB write batch per Raft entry, so a
//! write's documents, index entries, oplog entries and the applied log id are atomic.

pub mod apply;
pub mod catalog;
pub mod checksum;
pub mod command;
pub mod engine;
pub mod export;
pub mod gc;
pub mod import;
pub mod index;
pub mod keys;
pub mod publish;
pub mod read;
pub mod stats;

pub use command::{Command, WriteAnswer, WriteOp, WriteResult};
pub use engine::{Engine, StoreError};
