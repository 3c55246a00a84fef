//! The query language of `API.md`: filters, updates, projections and sorts, parsed once
//! into typed trees and evaluated on documents; and the planner that picks an index.
//! Pure code: no storage, no I/O.

pub mod filter;
pub mod planner;
pub mod projection;
pub mod sort;
pub mod update;

pub use filter::Filter;
pub use projection::Projection;
pub use sort::SortSpec;
pub use update::Update;
