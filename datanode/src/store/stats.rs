//! Per-query-shape statistics: how often each shape of query runs, how many documents it
//! examines for each it returns, and how long it takes. Automatic index management reads
//! them (`GET /v1/admin/query-stats`) to find shapes that scan far more than they return.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// What one query execution did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecStats {
    pub plan: String,
    pub keys_examined: u64,
    pub docs_examined: u64,
    pub returned: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShapeStats {
    pub db: String,
    pub coll: String,
    pub op: String,
    /// Filter and sort with values replaced by `?`.
    pub shape: String,
    pub plan: String,
    pub count: u64,
    pub keys_examined: u64,
    pub docs_examined: u64,
    pub returned: u64,
    pub total_micros: u64,
    pub max_micros: u64,
}

/// Shapes are bounded: past this many, new shapes are counted under one overflow entry so a
/// client generating random field names cannot grow memory without bound.
const MAX_SHAPES: usize = 10_000;

#[derive(Debug, Default)]
pub struct QueryStats {
    shapes: Mutex<HashMap<(String, String, String, String), ShapeStats>>,
}

impl QueryStats {
    pub fn record(&self, db: &str, coll: &str, op: &str, shape: &str, exec: &ExecStats, took: Duration) {
        let mut shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (db.to_owned(), coll.to_owned(), op.to_owned(), shape.to_owned());
        if !shapes.contains_key(&key) && shapes.len() >= MAX_SHAPES {
            key.3 = "<overflow>".into();
        }
        let s = shapes.entry(key.clone()).or_insert_with(|| ShapeStats {
            db: key.0.clone(),
            coll: key.1.clone(),
            op: key.2.clone(),
            shape: key.3.clone(),
            ..Default::default()
        });
        let micros = took.as_micros() as u64;
        s.plan = exec.plan.clone();
        s.count += 1;
        s.keys_examined += exec.keys_examined;
        s.docs_examined += exec.docs_examined;
        s.returned += exec.returned;
        s.total_micros += micros;
        s.max_micros = s.max_micros.max(micros);
    }

    pub fn snapshot(&self) -> Vec<ShapeStats> {
        let shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = shapes.values().cloned().collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.docs_examined));
        out
    }
}
