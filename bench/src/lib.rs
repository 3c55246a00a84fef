//! Shared parts of the benchmarks: the report format of `API.md` section 4 and a
//! closed-loop load generator with latency histograms.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Map, Value};

/// Figures printed as `name: value unit` lines and optionally written as JSON.
#[derive(Default)]
pub struct Report {
    figures: Vec<(String, f64, String)>,
}

impl Report {
    pub fn add(&mut self, name: impl Into<String>, value: f64, unit: &str) {
        let name = name.into();
        println!("{name}: {} {unit}", format_value(value));
        self.figures.push((name, value, unit.to_owned()));
    }

    /// Writes `{"name": {"value": v, "unit": u}, ...}` to `path`.
    pub fn write_json(&self, path: &Option<PathBuf>) -> anyhow::Result<()> {
        if let Some(p) = path {
            let mut m = Map::new();
            for (n, v, u) in &self.figures {
                m.insert(n.clone(), serde_json::json!({"value": v, "unit": u}));
            }
            std::fs::write(p, serde_json::to_vec_pretty(&Value::Object(m))?)?;
        }
        Ok(())
    }
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.3}") }
}

/// Result of one load run.
pub struct RunResult {
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl RunResult {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    pub fn p50_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.5) as f64 / 1000.0
    }
    pub fn p99_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64 / 1000.0
    }
}

/// Runs `concurrency` tasks, each calling `op(task, seq)` in a loop for `duration`, and
/// records each successful call's latency.
pub async fn run_load<F, Fut>(concurrency: usize, duration: Duration, op: F) -> RunResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (op, stop) = (op.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let (mut ok, mut err, mut seq) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                if op(t, seq).await {
                    ok += 1;
                    let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                } else {
                    err += 1;
                }
                seq += 1;
            }
            (ok, err, h)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = RunResult { ops: 0, errors: 0, elapsed: Duration::ZERO, latency_us: histogram() };
    for t in tasks {
        if let Ok((ok, err, h)) = t.await {
            total.ops += ok;
            total.errors += err;
            let _ = total.latency_us.add(h);
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// Medians over repeated runs of one system.
pub struct Summary {
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Reports `{prefix}_ops_per_sec` (median, min, max), `{prefix}_p50_ms` and
/// `{prefix}_p99_ms` (medians) of `runs`, and returns the medians.
pub fn summarize(report: &mut Report, prefix: &str, runs: &[RunResult]) -> Summary {
    let ops: Vec<f64> = runs.iter().map(RunResult::ops_per_sec).collect();
    let s = Summary {
        ops_per_sec: median(&ops),
        p50_ms: median(&runs.iter().map(RunResult::p50_ms).collect::<Vec<_>>()),
        p99_ms: median(&runs.iter().map(RunResult::p99_ms).collect::<Vec<_>>()),
    };
    report.add(format!("{prefix}_ops_per_sec"), s.ops_per_sec.round(), "ops/s");
    report.add(format!("{prefix}_ops_per_sec_min"), ops.iter().copied().fold(f64::MAX, f64::min).round(), "ops/s");
    report.add(format!("{prefix}_ops_per_sec_max"), ops.iter().copied().fold(0.0, f64::max).round(), "ops/s");
    report.add(format!("{prefix}_p50_ms"), s.p50_ms, "ms");
    report.add(format!("{prefix}_p99_ms"), s.p99_ms, "ms");
    s
}

/// A latency histogram from 1 µs to 60 s with 3 significant digits.
fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; failure would be a bug here.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// Median of a non-empty list.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}
