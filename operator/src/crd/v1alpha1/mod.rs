//! `nimbus.io/v1alpha1`: DatabaseInstance and ResourcePool.

mod instance;
mod pool;

pub use instance::*;
pub use pool::*;
