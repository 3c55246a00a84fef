//! Counters. Two audiences, two views:
//!
//! - **Prometheus, without tenants.** Requests, rejections, bytes and latency by kind of
//!   operation, summed over every database: the global recorder, rendered by `/metrics` on
//!   both listeners. The public port names no tenant.
//! - **Per database.** A one-minute window per database (per-second slots), read by the
//!   control plane at `GET /v1/admin/usage` (billing, autoscaling), and rendered on the
//!   admin port's `/metrics` for the busiest databases only: the `--metrics-tenant-series`
//!   databases with the most requests in the last minute get series of their own, the rest
//!   are summed in `nimbus_gateway_other_tenants_last_60s`. The series are gauges of the last minute, so a database
//!   entering or leaving the top does not break a counter. Label cardinality is thus
//!   bounded by the setting whatever the number of tenants (10,000 databases per gateway
//!   cost 10,000 windows of about 3.4 KiB, and only the top 100 appear in Prometheus).
//!   A database idle for two minutes is forgotten (its window is empty by then).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nimbus_api::path::Access;
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

    fn requests(&self) -> u64 {
        self.reads + self.writes + self.deletes + self.rejected
    }

    fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("reads", self.reads),
            ("writes", self.writes),
            ("deletes", self.deletes),
            ("rejected", self.rejected),
            ("documents_returned", self.documents_returned),
            ("bytes_in", self.bytes_in),
            ("bytes_out", self.bytes_out),
        ]
    }
}

const WINDOW_SECS: usize = 60;
/// A database with no request for this long is forgotten.
const FORGET_AFTER_SECS: u64 = 120;

/// The last minute of one database, one slot per second.
#[derive(Debug, Clone)]
struct Window {
    slots: [(u64, Counts); WINDOW_SECS],
    last_sec: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window { slots: [(0, Counts::default()); WINDOW_SECS], last_sec: 0 }
    }
}

impl Window {
    fn record(&mut self, sec: u64, c: &Counts) {
        let slot = &mut self.slots[(sec % WINDOW_SECS as u64) as usize];
        if slot.0 != sec {
            *slot = (sec, Counts::default());
        }
        slot.1.add(c);
        self.last_sec = self.last_sec.max(sec);
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

/// The global series, registered once.
struct Global {
    requests: [metrics::Counter; 3],
    rejected: metrics::Counter,
    documents_returned: metrics::Counter,
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
    latency: [metrics::Histogram; 3],
}

impl Global {
    fn new() -> Global {
        let by_access = |name: &'static str| {
            [
                metrics::counter!(name, "access" => "read"),
                metrics::counter!(name, "access" => "write"),
                metrics::counter!(name, "access" => "delete"),
            ]
        };
        let h = |access: &'static str| metrics::histogram!("nimbus_gateway_request_seconds", "access" => access);
        Global {
            requests: by_access("nimbus_gateway_requests_total"),
            rejected: metrics::counter!("nimbus_gateway_rejected_total"),
            documents_returned: metrics::counter!("nimbus_gateway_documents_returned_total"),
            bytes_in: metrics::counter!("nimbus_gateway_bytes_in_total"),
            bytes_out: metrics::counter!("nimbus_gateway_bytes_out_total"),
            latency: [h("read"), h("write"), h("delete")],
        }
    }
}

fn index(access: Access) -> usize {
    match access {
        Access::Read => 0,
        Access::Write => 1,
        Access::Delete => 2,
    }
}

pub struct Usage {
    dbs: RwLock<HashMap<String, Arc<Mutex<Window>>>>,
    global: Global,
    tenant_series: usize,
}

impl Usage {
    /// `tenant_series`: how many databases get series of their own on the admin port.
    pub fn new(tenant_series: usize) -> Usage {
        Usage { dbs: RwLock::new(HashMap::new()), global: Global::new(), tenant_series }
    }

    fn window(&self, db: &str) -> Arc<Mutex<Window>> {
        if let Some(w) = self.dbs.read().unwrap_or_else(|p| p.into_inner()).get(db) {
            return w.clone();
        }
        let mut dbs = self.dbs.write().unwrap_or_else(|p| p.into_inner());
        dbs.entry(db.to_owned()).or_default().clone()
    }

    /// Counts one request of `db`.
    pub fn record(&self, db: &str, access: Access, c: &Counts, elapsed: Duration) {
        let g = &self.global;
        if c.rejected > 0 {
            g.rejected.increment(c.rejected);
        } else {
            g.requests[index(access)].increment(1);
        }
        g.documents_returned.increment(c.documents_returned);
        g.bytes_in.increment(c.bytes_in);
        g.bytes_out.increment(c.bytes_out);
        g.latency[index(access)].record(elapsed.as_secs_f64());
        let sec = now_ms() / 1000;
        self.window(db).lock().unwrap_or_else(|p| p.into_inner()).record(sec, c);
    }

    /// Sums over the last 10 and 60 seconds, per database; forgets idle databases.
    pub fn snapshot(&self) -> HashMap<String, DbUsage> {
        let now = now_ms() / 1000;
        self.forget_idle(now);
        let dbs = self.dbs.read().unwrap_or_else(|p| p.into_inner());
        dbs.iter()
            .map(|(db, w)| {
                let w = w.lock().unwrap_or_else(|p| p.into_inner());
                (db.clone(), DbUsage { last_10s: w.sum(now, 10), last_60s: w.sum(now, 60) })
            })
            .collect()
    }

    fn forget_idle(&self, now_sec: u64) {
        let mut dbs = self.dbs.write().unwrap_or_else(|p| p.into_inner());
        dbs.retain(|_, w| w.lock().unwrap_or_else(|p| p.into_inner()).last_sec + FORGET_AFTER_SECS > now_sec);
    }

    /// Prometheus text of the busiest databases' last minute (see the module comment).
    pub fn render_tenants(&self) -> String {
        let mut usage: Vec<(String, Counts)> = self.snapshot().into_iter().map(|(db, u)| (db, u.last_60s)).collect();
        usage.sort_by(|a, b| b.1.requests().cmp(&a.1.requests()).then_with(|| a.0.cmp(&b.0)));
        let mut other = Counts::default();
        let tracked = usage.len();
        for (_, c) in usage.iter().skip(self.tenant_series) {
            other.add(c);
        }
        usage.truncate(self.tenant_series);
        let mut out = String::new();
        out.push_str(
            "# HELP nimbus_gateway_tenant_last_60s What each of the busiest databases did in the last minute.\n",
        );
        out.push_str("# TYPE nimbus_gateway_tenant_last_60s gauge\n");
        for (db, c) in &usage {
            for (kind, v) in c.fields() {
                let _ = writeln!(out, "nimbus_gateway_tenant_last_60s{{db=\"{}\",kind=\"{kind}\"}} {v}", escape(db));
            }
        }
        // A series of its own (a database may well be named `_other`).
        out.push_str("# HELP nimbus_gateway_other_tenants_last_60s What the databases without series of their own did in the last minute, summed.\n");
        out.push_str("# TYPE nimbus_gateway_other_tenants_last_60s gauge\n");
        for (kind, v) in other.fields() {
            let _ = writeln!(out, "nimbus_gateway_other_tenants_last_60s{{kind=\"{kind}\"}} {v}");
        }
        out.push_str("# HELP nimbus_gateway_tenants_tracked Databases with requests in the last two minutes.\n");
        out.push_str("# TYPE nimbus_gateway_tenants_tracked gauge\n");
        let _ = writeln!(out, "nimbus_gateway_tenants_tracked {tracked}");
        out
    }
}

/// A label value as Prometheus text needs it (database names never need it: defence only).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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

    #[test]
    fn only_the_busiest_databases_get_series_of_their_own() {
        let usage = Usage::new(2);
        let read = Counts { reads: 1, ..Default::default() };
        for i in 0..50u64 {
            for _ in 0..=i {
                usage.record(&format!("db{i:02}"), Access::Read, &read, Duration::ZERO);
            }
        }
        let text = usage.render_tenants();
        let series: Vec<&str> = text.lines().filter(|l| l.contains("kind=\"reads\"")).collect();
        assert_eq!(series.len(), 3, "{text}");
        assert!(series[0].starts_with("nimbus_gateway_tenant_last_60s{db=\"db49\"") && series[0].ends_with(" 50"));
        assert!(series[1].contains("db=\"db48\"") && series[1].ends_with(" 49"));
        // The other 48 databases: 1 + 2 + ... + 48 reads.
        assert!(
            series[2].starts_with("nimbus_gateway_other_tenants_last_60s")
                && series[2].ends_with(&format!(" {}", 48 * 49 / 2))
        );
        assert!(text.contains("nimbus_gateway_tenants_tracked 50"));
    }
}
