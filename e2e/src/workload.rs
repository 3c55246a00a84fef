//! A steady stream of writes through the gateway, as an application would send them: each
//! write carries its own `Idempotency-Key` and is sent once (the gateway must hide
//! failovers), or is sent again with that key after a failure a client retries
//! ([`Delivery`]). Half the writes insert a document with a known `_id`, half `$inc` a
//! shared counter, so that afterwards "every acknowledged write present" and "none applied
//! twice" can both be checked exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use reqwest::Method;
use serde_json::json;

use crate::DataClient;

pub const COLLECTION: &str = "stream";
pub const COUNTER_ID: &str = "counter";

/// What one writer saw.
#[derive(Debug, Default)]
pub struct WriterReport {
    /// `_id`s whose insert was acknowledged.
    pub inserted: Vec<String>,
    /// Acknowledged `$inc`s of the counter.
    pub increments: u64,
    /// Client-visible failures: `(write, status, body)`.
    pub errors: Vec<String>,
    /// Every write's latency, in microseconds.
    pub latencies_us: Vec<u64>,
}

/// How a writer sends each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Once, with an `Idempotency-Key` of its own: the gateway must hide failovers.
    Once,
    /// Once, without a key: only the one the gateway makes protects its own retries.
    OnceWithoutKey,
    /// With a key of its own, and sent again with the same key after no answer, a `502` or
    /// a `503` (failures a client retries: a gateway killed, etcd unreachable, a request
    /// held past its deadline) until it gets another answer, for at most this long. The key
    /// makes the retry safe: each acknowledged write must still be there exactly once.
    Retried(Duration),
}

/// How long a retried write waits before it is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

pub struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    /// Requests sent again ([`Delivery::Retried`]).
    retries: Arc<AtomicU64>,
    /// Longest write latency (µs) since the last [`Writers::take_max_latency`].
    max_latency_us: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<WriterReport>>,
}

/// Creates the counter document the writers increment.
pub async fn prepare(client: &DataClient, gateway: &str, db: &str, token: &str) -> anyhow::Result<()> {
    let auth = format!("Bearer {token}");
    let (st, body) = client
        .call(
            Method::POST,
            &format!("{gateway}/v1/databases/{db}/collections/{COLLECTION}/documents"),
            Some(&json!({"documents": [{"_id": COUNTER_ID, "n": 0}]})),
            &[("authorization", &auth), ("idempotency-key", "prepare-counter")],
        )
        .await;
    if st != 201 && st != 200 {
        bail!("creating the counter failed: {st} {body}");
    }
    Ok(())
}

impl Writers {
    /// Starts `concurrency` writers against database `db` through `gateway`, each write
    /// sent once with its own key.
    pub fn start(client: &DataClient, gateway: &str, db: &str, token: &str, concurrency: usize) -> Writers {
        Self::start_with(client, gateway, db, token, concurrency, Delivery::Once)
    }

    /// Like [`Writers::start`], but the writes carry no `Idempotency-Key`: only the one the
    /// gateway makes protects its own retries.
    pub fn start_without_keys(
        client: &DataClient,
        gateway: &str,
        db: &str,
        token: &str,
        concurrency: usize,
    ) -> Writers {
        Self::start_with(client, gateway, db, token, concurrency, Delivery::OnceWithoutKey)
    }

    /// Starts `concurrency` writers sending their writes as `delivery` says.
    pub fn start_with(
        client: &DataClient,
        gateway: &str,
        db: &str,
        token: &str,
        concurrency: usize,
        delivery: Delivery,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let retries = Arc::new(AtomicU64::new(0));
        let max_latency_us = Arc::new(AtomicU64::new(0));
        let base = format!("{gateway}/v1/databases/{db}/collections/{COLLECTION}");
        let run = format!(
            "{:x}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        );
        let tasks = (0..concurrency)
            .map(|w| {
                let (client, base, stop, acked, run) =
                    (client.clone(), base.clone(), stop.clone(), acked.clone(), run.clone());
                let (retries, max_latency_us) = (retries.clone(), max_latency_us.clone());
                let auth = format!("Bearer {token}");
                tokio::spawn(async move {
                    let mut report = WriterReport::default();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("{w}-{n}");
                        let key = format!("{run}-{id}");
                        let insert = n.is_multiple_of(2);
                        let (url, body) = if insert {
                            (format!("{base}/documents"), json!({"documents": [{"_id": id, "w": w}]}))
                        } else {
                            (
                                format!("{base}/update"),
                                json!({"filter": {"_id": COUNTER_ID}, "update": {"$inc": {"n": 1}}}),
                            )
                        };
                        let started = Instant::now();
                        let headers: &[(&str, &str)] = if delivery == Delivery::OnceWithoutKey {
                            &[("authorization", &auth)]
                        } else {
                            &[("authorization", &auth), ("idempotency-key", &key)]
                        };
                        let (st, answer) = loop {
                            let (st, answer) = client.call(Method::POST, &url, Some(&body), headers).await;
                            match delivery {
                                Delivery::Retried(limit)
                                    if matches!(st, 0 | 502 | 503) && started.elapsed() < limit =>
                                {
                                    retries.fetch_add(1, Ordering::Relaxed);
                                    tokio::time::sleep(RETRY_PAUSE).await;
                                }
                                _ => break (st, answer),
                            }
                        };
                        let latency = started.elapsed().as_micros() as u64;
                        report.latencies_us.push(latency);
                        max_latency_us.fetch_max(latency, Ordering::Relaxed);
                        match (insert, st) {
                            (true, 201) => report.inserted.push(id),
                            (false, 200) if answer["modified"] == 1 => report.increments += 1,
                            _ => report.errors.push(format!("write {id}: {st} {answer}")),
                        }
                        acked.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    report
                })
            })
            .collect();
        Writers { stop, acked, retries, max_latency_us, tasks }
    }

    /// Writes answered so far (acknowledged or not).
    pub fn answered(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Requests sent again so far (each a failure a client saw and retried).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// The longest latency of a write answered since the last call, in microseconds.
    pub fn take_max_latency_us(&self) -> u64 {
        self.max_latency_us.swap(0, Ordering::Relaxed)
    }

    /// Waits until `more` further writes have been answered.
    pub async fn wait_for(&self, more: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.answered() + more;
        crate::poll(&format!("{more} more writes"), timeout, || async { (self.answered() >= target).then_some(()) })
            .await
    }

    /// Stops the writers and sums their reports.
    pub async fn stop(self) -> anyhow::Result<WriterReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = WriterReport::default();
        for t in self.tasks {
            let r = t.await.context("a writer panicked")?;
            all.inserted.extend(r.inserted);
            all.increments += r.increments;
            all.errors.extend(r.errors);
            all.latencies_us.extend(r.latencies_us);
        }
        Ok(all)
    }
}

/// Checks the database against what the writers saw acknowledged: every inserted `_id`
/// present, no other document, the counter equal to the acknowledged increments (a write
/// applied twice would show as one too many).
pub async fn verify(
    client: &DataClient,
    gateway: &str,
    db: &str,
    token: &str,
    report: &WriterReport,
) -> anyhow::Result<()> {
    let auth = format!("Bearer {token}");
    let base = format!("{gateway}/v1/databases/{db}/collections/{COLLECTION}");
    // Page through by `_id` (a find returns at most `MAX_FIND_LIMIT` documents).
    let mut found: Vec<String> = Vec::new();
    loop {
        let filter = match found.last() {
            Some(last) => json!({"_id": {"$ne": COUNTER_ID, "$gt": last}}),
            None => json!({"_id": {"$ne": COUNTER_ID}}),
        };
        let (st, body) = client
            .call(
                Method::POST,
                &format!("{base}/find"),
                Some(&json!({"filter": filter, "projection": {"_id": 1}, "sort": {"_id": 1}, "limit": 10_000})),
                &[("authorization", &auth)],
            )
            .await;
        if st != 200 {
            bail!("find failed: {st} {body}");
        }
        let page: Vec<String> = body["documents"]
            .as_array()
            .context("no documents")?
            .iter()
            .filter_map(|d| d["_id"].as_str().map(str::to_owned))
            .collect();
        if page.is_empty() {
            break;
        }
        found.extend(page);
    }
    found.sort();
    let mut expected = report.inserted.clone();
    expected.sort();
    if found != expected {
        let missing: Vec<&String> = expected.iter().filter(|e| found.binary_search(e).is_err()).take(10).collect();
        let extra: Vec<&String> = found.iter().filter(|f| expected.binary_search(f).is_err()).take(10).collect();
        bail!(
            "documents differ from the acknowledged inserts: {} found, {} acknowledged; missing {missing:?}, unexpected {extra:?}",
            found.len(),
            expected.len()
        );
    }
    let (st, counter) =
        client.call(Method::GET, &format!("{base}/documents/{COUNTER_ID}"), None, &[("authorization", &auth)]).await;
    if st != 200 || counter["n"] != report.increments {
        bail!("counter is {counter} ({st}) but {} increments were acknowledged", report.increments);
    }
    Ok(())
}

/// The `q` quantile (0..=1) of `values`, or 0 when empty.
pub fn quantile(values: &[u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}
