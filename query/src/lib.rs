//! nimbus-query: MongoDB's query language over JSON documents, pure (no storage, no I/O), so
//! that the datanode's engine, the reference evaluator of the differential test and the
//! fuzzers all exercise the same code.
//!
//! - [`doc`]: documents as values: MongoDB's cross-type order, an order-preserving byte
//!   encoding of values (index and `_id` keys), dotted paths.
//! - [`query`]: filters, updates, projections, sorts and the planner.

pub mod doc;
pub mod query;
