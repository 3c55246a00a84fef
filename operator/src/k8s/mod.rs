//! The Kubernetes provisioner: desired objects ([`objects`]), the reconcilers
//! ([`instance`], [`pool`]) and the controller runtime with leader election ([`run`]).

#[cfg(test)]
mod fixtures;
pub mod health;
pub mod instance;
#[cfg(test)]
mod instance_tests;
pub mod metrics;
pub mod objects;
pub mod pool;
mod run;

pub use run::{RunConfig, WATCHES, run};
use thiserror::Error;

use crate::controlplane::{AdminError, CoordError};

#[derive(Debug, Error)]
pub enum Error {
    #[error("failed to call the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("failed to run the finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("failed to reconcile: the object has no namespace")]
    MissingNamespace,
    #[error("failed to place the instance: no ResourcePool {0:?}")]
    PoolNotFound(String),
    #[error("failed to reach the replica set's leader")]
    NoLeader,
    #[error("failed to read credentials: {0}")]
    BadSecret(String),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Coord(#[from] CoordError),
}

impl Error {
    /// A write lost a race with another writer (409): retry soon.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(s)) => s.code == 409,
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
}
