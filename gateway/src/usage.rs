//! Per-database counters: Prometheus metrics for operators, and per-second windows the
//! control plane reads (`GET /v1/admin/usage`) for billing and autoscaling.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::state::now_ms;

/// What one request did, as counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub reads: u64,
    pub writes: u64,
    pub deletes: u64,
    pub documents_returned: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rejected: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.deletes += o.deletes;
        self.documents_returned += o.documents_returned;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.rejected += o.rejected;
    }
}

const WINDOW_SECS: usize = 60;

/// The last minute of one database, one slot per second.
#[derive(Debug, Clone)]
struct Window {
    slots: [(u64, Counts); WINDOW_SECS],
}

impl Default for Window {
    fn default() -> Self {
        Window { slots: [(0, Counts::default()); WINDOW_SECS] }
    }
}

impl Window {
    fn record(&mut self, sec: u64, c: &Counts) {
        let slot = &mut self.slots[(sec % WINDOW_SECS as u64) as usize];
        if slot.0 != sec {
            *slot = (sec, Counts::default());
        }
        slot.1.add(c);
    }

    fn sum(&self, now_sec: u64, secs: u64) -> Counts {
        let mut total = Counts::default();
        for (sec, c) in &self.slots {
            if *sec + secs > now_sec && *sec <= now_sec {
                total.add(c);
            }
        }
        total
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DbUsage {
    pub last_10s: Counts,
    pub last_60s: Counts,
}

/// One database's metric handles (registered once, not looked up per request) and window.
struct DbEntry {
    window: Mutex<Window>,
    counters: [metrics::Counter; 7],
    latency: [metrics::Histogram; 3],
}

impl DbEntry {
    fn new(db: &str) -> DbEntry {
        let c = |name: &'static str| metrics::counter!(name, "db" => db.to_owned());
        let h =
            |op: &'static str| metrics::histogram!("nimbus_gateway_request_seconds", "db" => db.to_owned(), "op" => op);
        DbEntry {
            window: Mutex::new(Window::default()),
            counters: [
                c("nimbus_gateway_reads_total"),
                c("nimbus_gateway_writes_total"),
                c("nimbus_gateway_deletes_total"),
                c("nimbus_gateway_documents_returned_total"),
                c("nimbus_gateway_bytes_in_total"),
                c("nimbus_gateway_bytes_out_total"),
                c("nimbus_gateway_rejected_total"),
            ],
            latency: [h("read"), h("write"), h("delete")],
        }
    }
}

/// The kinds of operation whose latency is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
    Delete = 2,
}

#[derive(Default)]
pub struct Usage {
    dbs: std::sync::RwLock<HashMap<String, std::sync::Arc<DbEntry>>>,
}

impl Usage {
    fn entry(&self, db: &str) -> std::sync::Arc<DbEntry> {
        if let Some(e) = self.dbs.read().unwrap_or_else(|p| p.into_inner()).get(db) {
            return e.clone();
        }
        let mut dbs = self.dbs.write().unwrap_or_else(|p| p.into_inner());
        dbs.entry(db.to_owned()).or_insert_with(|| std::sync::Arc::new(DbEntry::new(db))).clone()
    }

    pub fn record(&self, db: &str, c: Counts) {
        let e = self.entry(db);
        let values = [c.reads, c.writes, c.deletes, c.documents_returned, c.bytes_in, c.bytes_out, c.rejected];
        for (counter, v) in e.counters.iter().zip(values) {
            if v > 0 {
                counter.increment(v);
            }
        }
        let sec = now_ms() / 1000;
        e.window.lock().unwrap_or_else(|p| p.into_inner()).record(sec, &c);
    }

    pub fn record_latency(&self, db: &str, op: Op, seconds: f64) {
        self.entry(db).latency[op as usize].record(seconds);
    }

    /// Sums over the last 10 and 60 seconds, per database.
    pub fn snapshot(&self) -> HashMap<String, DbUsage> {
        let now = now_ms() / 1000;
        let dbs = self.dbs.read().unwrap_or_else(|p| p.into_inner());
        dbs.iter()
            .map(|(db, e)| {
                let w = e.window.lock().unwrap_or_else(|p| p.into_inner());
                (db.clone(), DbUsage { last_10s: w.sum(now, 10), last_60s: w.sum(now, 60) })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_sum_the_recent_seconds_only() {
        let mut w = Window::default();
        let one = Counts { reads: 1, ..Default::default() };
        w.record(100, &one);
        w.record(105, &one);
        w.record(105, &one);
        w.record(150, &one);
        assert_eq!(w.sum(150, 10).reads, 1);
        assert_eq!(w.sum(150, 60).reads, 4);
        assert_eq!(w.sum(165, 60).reads, 1);
        // A slot reused a minute later starts from zero (160 replaces 100).
        w.record(160, &one);
        assert_eq!(w.sum(160, 60).reads, 4);
        assert_eq!(w.sum(160, 1).reads, 1);
    }
}
