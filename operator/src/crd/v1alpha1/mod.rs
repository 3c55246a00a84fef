//! `nimbus.io/v1alpha1`: DatabaseInstance, ResourcePool and DatabaseRestore.

mod instance;
mod pool;
mod restore;

pub use instance::*;
pub use pool::*;
pub use restore::*;
