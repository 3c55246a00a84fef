//! Control-plane decisions (pure) and the clients that carry them out.

pub mod admin;
pub mod coord;
pub mod members;
pub mod placement;
