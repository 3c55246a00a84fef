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

#[derive(Debug, Default)]
pub struct Usage {
    windows: Mutex<HashMap<String, Window>>,
}

impl Usage {
    pub fn record(&self, db: &str, c: Counts) {
        metrics::counter!("nimbus_gateway_reads_total", "db" => db.to_owned()).increment(c.reads);
        metrics::counter!("nimbus_gateway_writes_total", "db" => db.to_owned()).increment(c.writes);
        metrics::counter!("nimbus_gateway_deletes_total", "db" => db.to_owned()).increment(c.deletes);
        metrics::counter!("nimbus_gateway_documents_returned_total", "db" => db.to_owned())
            .increment(c.documents_returned);
        metrics::counter!("nimbus_gateway_bytes_in_total", "db" => db.to_owned()).increment(c.bytes_in);
        metrics::counter!("nimbus_gateway_bytes_out_total", "db" => db.to_owned()).increment(c.bytes_out);
        metrics::counter!("nimbus_gateway_rejected_total", "db" => db.to_owned()).increment(c.rejected);
        let sec = now_ms() / 1000;
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(db.to_owned()).or_default().record(sec, &c);
    }

    /// Sums over the last 10 and 60 seconds, per database.
    pub fn snapshot(&self) -> HashMap<String, DbUsage> {
        let now = now_ms() / 1000;
        let w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        w.iter()
            .map(|(db, win)| (db.clone(), DbUsage { last_10s: win.sum(now, 10), last_60s: win.sum(now, 60) }))
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
