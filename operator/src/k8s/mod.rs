//! The Kubernetes provisioner: desired objects ([`objects`]), the reconcilers
//! ([`instance`], [`pool`]), their Kubernetes calls ([`api`]) and the controller runtime
//! with leader election ([`run`]).

pub mod api;
pub mod backup;
#[cfg(test)]
mod backup_tests;
pub mod failure;
#[cfg(test)]
mod fake;
#[cfg(test)]
mod fixtures;
pub mod health;
pub mod instance;
#[cfg(test)]
mod instance_tests;
pub mod metrics;
pub mod migration;
#[cfg(test)]
mod migration_tests;
pub mod objects;
pub mod pool;
mod provisioner;
pub mod replicaset;
#[cfg(test)]
mod replicaset_tests;
pub mod restore;
#[cfg(test)]
mod restore_resume_tests;
pub mod restore_runner;
#[cfg(test)]
mod restore_tests;
mod retire;
#[cfg(test)]
mod retire_tests;
mod run;

pub use run::{RunConfig, WATCHES, run};
use thiserror::Error;

use crate::controlplane::{AdminError, CoordError};

#[derive(Debug, Error)]
pub enum Error {
    /// A call of the reconcilers, with what it was doing ([`api::Objects`]).
    #[error("{0}")]
    Call(Box<api::CallError>),
    #[error("failed to run the finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("failed to reconcile: the object has no namespace")]
    MissingNamespace,
    #[error("failed to place the instance: no ResourcePool {0:?}")]
    PoolNotFound(String),
    #[error("failed to reach the replica set's leader")]
    NoLeader,
    #[error(
        "failed to drop database {database}: replica set {replica_set} has no leader (retried); to delete the \
         instance without dropping its data, annotate it nimbus.io/abandon-data=true"
    )]
    NoLeaderToDrop { database: String, replica_set: String },
    /// A restore writes into the instance's database: its deletion waits until it ended, so
    /// the drop comes after the restore's last step and finds every copy it made.
    #[error(
        "failed to drop database {database} yet: restore {restore} writes into it (phase Restoring); the \
         instance is deleted once the restore has ended"
    )]
    RestoreRunning { database: String, restore: String },
    /// Where a database lives could not be read: its deletion waits (dropping only where
    /// the placement says could leave its data on the replica set it moved to).
    #[error("failed to find the replica sets holding database {database}: {reason}")]
    Locate { database: String, reason: String },
    #[error("failed to read credentials: {0}")]
    BadSecret(String),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Coord(#[from] CoordError),
    #[error(transparent)]
    Driver(#[from] crate::controlplane::driver::DriverError),
}

impl Error {
    /// A write lost a race with another writer (409): retry soon.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Call(c) => c.status().is_some_and(|s| s.code == 409),
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.is_conflict()
                }
                kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s))
                | kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) => s.code == 409,
                _ => false,
            },
            _ => false,
        }
    }

    /// What a person should read when the Kubernetes API refused or failed a call (a
    /// sentence), or `None` for other errors and for conflicts, which are retried at once.
    pub fn api_failure(&self) -> Option<String> {
        use kube::runtime::finalizer::Error as F;
        match self {
            _ if self.is_conflict() => None,
            Error::Call(c) => c.status().is_some().then(|| c.to_string()),
            Error::Finalizer(e) => match e.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.api_failure(),
                F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s)) => {
                    let verb = if matches!(e.as_ref(), F::AddFinalizer(_)) { "add" } else { "remove" };
                    let hint = if s.code == 403 {
                        "; the operator's RBAC must grant patch on databaseinstances.nimbus.io"
                    } else {
                        ""
                    };
                    Some(format!(
                        "failed to {verb} the finalizer {}: the Kubernetes API answered {} {} ({}){hint}",
                        instance::FINALIZER,
                        s.code,
                        s.reason,
                        s.message.trim().trim_end_matches(':')
                    ))
                }
                _ => None,
            },
            _ => None,
        }
    }
}
