//! Hot migration's control plane: moves one database from its replica set to another
//! while it serves (`docs/design/0003-hot-migration.md`, `ARCHITECTURE.md` "Hot
//! migration"). One state machine for the Kubernetes operator and the playground.
//!
//! - [`record`]: the persisted record (`/nimbus/migrations/{db}`) and the status view
//!   (`API.md` section 3).
//! - [`plan`]: the decisions, pure (hold, abort, retry, resume, throttle, concurrency).
//! - [`io`]: what the driver needs from the world ([`MigrationWorld`]) and the real one
//!   ([`LiveWorld`]: the admin client and the coordinator).
//! - [`driver`]: the steps carried out, the record persisted after each; [`Migrator`]
//!   runs them with bounded concurrency.
//!
//! The steps:
//!
//! | step | what it does | a control plane restarted here |
//! | --- | --- | --- |
//! | `Copy` | `Begin` on the target, then the source's export page by page, imported (throttled) | continues from the persisted cursor (`Begin` again if no page was recorded) |
//! | `CatchUp` | the source's oplog after the first page's index, applied on the target; the source's oplog pinned; aborts when not close enough to hold within its budget (10 min) | continues from the persisted position, its budget counted from the persisted start |
//! | `Hold` | route `Holding` with a deadline (5 s), then every registered gateway's acknowledgement | continues until the deadline, aborts after it |
//! | `Fence` | the source's route epoch raised to `epoch + 1`: its index is the final index | sends it again (idempotent) until the deadline, aborts after it |
//! | `Verify` | the oplog through the final index, the idempotency records moved, checksum markers compared | redoes it until the deadline, aborts after it |
//! | `Switch` | `Finish{epoch + 1}` on the target, then one guarded etcd transaction: route = target, `epoch + 1`, `Serving` | goes forward, never back |
//! | `CleanUp` | after the grace period: the source's copy dropped unless the source knows an epoch above the fence's (a newer instance of the name writes there), its oplog unpinned | goes forward |
//! | `Abort` | route back to the source `Serving` (`epoch + 1` if the fence may be in force), the target's import dropped, unpinned; then the next attempt after a back-off | finishes rolling back |
//!
//! An oplog truncated under the catch-up restarts the copy; a failure that does not go away
//! before the hold, a catch-up past its budget, a hold past its deadline, a mismatch, a
//! replica set gone, abort the attempt. Attempts are retried 10 s, 20 s, ... up to 5 min apart, 10 at most.

pub mod driver;
pub mod io;
pub mod plan;
pub mod record;

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;

pub use driver::{
    FAILPOINTS, MigrationError, Migrator, Outcome, StartError, StartRequest, cancel, drive, now_ms, start,
};
pub use io::{
    ChecksumMarker, DropOutcome, FenceAnswer, HoldView, LiveWorld, MigrationWorld, ReplicaSetAccess,
    ReplicaSetDirectory,
};
pub use plan::{Failure, Tuning};
pub use record::{MigrationRecord, MigrationStatus, Phase, Step};
