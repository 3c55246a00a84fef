//! The query language of `API.md`: filters, updates, projections and sorts, parsed once
//! into typed trees and evaluated on documents; and the planner that picks an index.
//! Pure code: no storage, no I/O.

pub mod filter;
pub mod pattern;
pub mod planner;
pub mod projection;
pub mod sort;
pub mod update;

pub use filter::Filter;
pub use projection::Projection;
pub use sort::SortSpec;
pub use update::Update;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::doc::testgen::arb_value;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Whatever a client sends as filter, update, sort or projection, the query layer
        /// answers with a value or an error: it never panics.
        #[test]
        fn arbitrary_json_never_panics(q in arb_value(), doc in arb_value(), op in prop_oneof![
            Just("$set"), Just("$unset"), Just("$inc"), Just("$push"), Just("$pull"), Just("$eq"), Just("$gt"), Just("$in"), Just("$not"), Just("$or"),
            Just("$elemMatch"), Just("$all"), Just("$size"), Just("$type"), Just("$mod"), Just("$regex"), Just("$mul"), Just("$rename"), Just("$addToSet"), Just("$pop"), Just("$min"), Just("$slice"), Just("$each")
        ]) {
            let doc = json!({"_id": 1, "a": doc, "b": {"c": [1, {"d": 2}]}});
            for candidate in [q.clone(), json!({ op: q.clone() }), json!({ "a": { op: q.clone() } }), json!({ op: { "a.b": q.clone() } })] {
                if let Ok(f) = Filter::parse(Some(&candidate)) {
                    let _ = f.matches(&doc);
                    let _ = f.shape();
                }
                if let Ok(u) = Update::parse(&candidate) {
                    let _ = u.apply(&doc, &update::ApplyCtx::default());
                    let _ = u.upsert_document(&Filter::parse(Some(&candidate)).unwrap_or(Filter::all()), &json!(1), &update::ApplyCtx::default());
                }
                if let Ok(s) = SortSpec::parse(Some(&candidate)) {
                    let _ = s.compare(&doc, &candidate);
                }
                if let Ok(Some(p)) = Projection::parse(Some(&candidate)) {
                    let _ = p.apply(&doc);
                }
            }
        }
    }
}
