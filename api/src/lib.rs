//! Wire contracts shared by every Nimbus binary: the data API of `API.md` section 1, the
//! datanode admin API (section 2 and the control-plane operations), the error model and
//! the limits every component enforces, and user tokens. Pure types and checks; no I/O.

pub mod admin;
pub mod data;
pub mod error;
pub mod etcd;
pub mod limits;
pub mod migration;
pub mod path;
pub mod token;

pub use error::{ApiError, ErrorCode, LeaderHint};
