//! openraft's own storage test suite, run against the RocksDB log store and the state
//! machine.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use nimbus_datanode::raft::TypeConfig;
use nimbus_datanode::raft::log_store::LogStore;
use nimbus_datanode::raft::state_machine::StateMachine;
use nimbus_datanode::store::engine::EngineOptions;
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new().map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let log =
            LogStore::open(&dir.path().join("raft")).map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let sm = StateMachine::open(dir.path(), EngineOptions::default())
            .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_store_and_state_machine_pass_openraft_storage_suite() {
    Suite::test_all(Builder).await.expect("storage suite");
}
