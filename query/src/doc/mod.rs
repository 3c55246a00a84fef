//! Documents as values: MongoDB's cross-type order ([`order`]), an order-preserving byte
//! encoding of values for storage keys ([`keycode`]), and dotted-path access ([`path`]).

pub mod ejson;
pub mod keycode;
pub mod order;
pub mod path;
#[cfg(test)]
pub(crate) mod testgen;
pub mod validate;

pub use nimbus_api::data::Document;
