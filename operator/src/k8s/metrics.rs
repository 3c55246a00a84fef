//! Operator metrics: reconcile counts, durations and errors, by kind.

use std::time::Duration;

/// Handles to the reconcile metrics (the global `metrics` recorder serves `/metrics`).
#[derive(Clone, Default)]
pub struct Metrics;

impl Metrics {
    pub fn reconciled(&self, kind: &'static str, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        metrics::counter!("nimbus_operator_reconciles_total", "kind" => kind, "result" => result).increment(1);
        metrics::histogram!("nimbus_operator_reconcile_duration_seconds", "kind" => kind).record(took.as_secs_f64());
    }
}
