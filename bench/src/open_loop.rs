//! An open loop that keeps every request's sample (when it was due, its latency, whether it
//! succeeded), so that a benchmark can cut its run into windows afterwards (before, during
//! and after a migration or a backup); and the tenant requests such loops send through the
//! gateway. [`crate::run_rate`] is the open loop that only keeps a histogram.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nimbus_e2e::migration::Tenant;
use nimbus_e2e::workload::quantile;
use reqwest::Method;
use serde_json::json;

use crate::http_outcome;

/// Requests one loop may have unanswered before a due request counts as an `overload`
/// failure instead of being sent: far above what the loops send.
pub const MAX_IN_FLIGHT: usize = 20_000;

/// One request of an open loop: when it was due (since the run's start), how long until
/// its answer, and whether it succeeded.
#[derive(Clone, Copy)]
pub struct Sample {
    pub seq: u64,
    pub due: Duration,
    pub latency_us: u64,
    pub ok: bool,
}

/// What an open loop recorded: every request's sample in `seq` order, and how many
/// failures of each kind.
pub type Samples = (Vec<Sample>, BTreeMap<String, u64>);

/// An open loop running until [`OpenLoop::stop`]: `op(seq)` due every `1/rate` seconds,
/// whatever the answers. Latency counts from when a request was due, so time waiting to be
/// sent (for a permit of `sending`, which bounds the connections a loop holds) counts too.
pub struct OpenLoop {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Samples>,
}

impl OpenLoop {
    /// Starts the loop; its samples' `due` count from `t0`.
    pub fn start<F, Fut>(t0: Instant, rate: f64, sending: &'static tokio::sync::Semaphore, op: F) -> OpenLoop
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let op = Arc::new(op);
        let task = tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Sample, Option<String>)>();
            let in_flight = Arc::new(AtomicUsize::new(0));
            let start = tokio::time::Instant::now();
            let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            let mut seq = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let due = start + period.mul_f64(seq as f64);
                tokio::time::sleep_until(due).await;
                let due_since_t0 = due.into_std().saturating_duration_since(t0);
                if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                    let s = Sample { seq, due: due_since_t0, latency_us: 0, ok: false };
                    let _ = tx.send((s, Some("overload".into())));
                } else {
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let (op, in_flight, tx) = (op.clone(), in_flight.clone(), tx.clone());
                    tokio::spawn(async move {
                        let r = match sending.acquire().await {
                            Ok(_sending) => op(seq).await,
                            Err(_) => Err("the load generator stopped".to_string()),
                        };
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        let latency_us = due.elapsed().as_micros().max(1) as u64;
                        let s = Sample { seq, due: due_since_t0, latency_us, ok: r.is_ok() };
                        let _ = tx.send((s, r.err()));
                    });
                }
                seq += 1;
            }
            drop(tx);
            let (mut samples, mut kinds) = (Vec::new(), BTreeMap::new());
            while let Some((s, kind)) = rx.recv().await {
                samples.push(s);
                if let Some(k) = kind {
                    *kinds.entry(k).or_insert(0u64) += 1;
                }
            }
            samples.sort_by_key(|s| s.seq);
            (samples, kinds)
        });
        OpenLoop { stop, task }
    }

    /// Stops sending and waits for every answer.
    pub async fn stop(self) -> anyhow::Result<Samples> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.context("a load loop panicked")
    }
}

/// Samples due in `[from, to)`.
pub fn window(samples: &[Sample], from: Duration, to: Duration) -> Vec<Sample> {
    samples.iter().filter(|s| s.due >= from && s.due < to).copied().collect()
}

/// p50, p99 and max latency (ms) of the successful samples.
pub fn latency_ms(samples: &[Sample]) -> (f64, f64, f64) {
    let l: Vec<u64> = samples.iter().filter(|s| s.ok).map(|s| s.latency_us).collect();
    let ms = |q| quantile(&l, q) as f64 / 1000.0;
    (ms(0.5), ms(0.99), ms(1.0))
}

/// Prints a warning naming the most frequent failures of the loop `who`, if there were any
/// (only the most frequent: an error message naming ids is one kind per id).
pub fn warn_failures(who: &str, kinds: &BTreeMap<String, u64>) {
    if !kinds.is_empty() {
        let mut top: Vec<(&String, &u64)> = kinds.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        top.truncate(8);
        eprintln!("warning: failures of the {who} ({} kinds), the most frequent: {top:?}", kinds.len());
    }
}

/// Inserts `{_id: id}` into `coll` through the gateway, with `id` as its idempotency key.
pub async fn insert(t: &Tenant, coll: &str, id: &str) -> Result<(), String> {
    let req = t
        .client
        .http
        .request(Method::POST, t.url(&format!("collections/{coll}/documents")))
        .bearer_auth(&t.token)
        .header("idempotency-key", id)
        .json(&json!({"documents": [{"_id": id, "v": 1}]}));
    http_outcome(req.send().await).await
}

/// `GET` of `rest` (under the tenant's database) through the gateway.
pub async fn get(t: &Tenant, rest: &str) -> Result<(), String> {
    http_outcome(t.client.http.get(t.url(rest)).bearer_auth(&t.token).send().await).await
}
