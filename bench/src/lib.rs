//! Shared parts of the benchmarks: the report format of `API.md` section 4, a closed-loop
//! load generator (a number of clients, each sending its next request when the last is
//! answered) and an open-loop one (requests at a fixed rate, whatever the answers), with
//! latency histograms; an open loop that keeps every request's sample ([`open_loop`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub mod leader_changes;
pub mod nginx;
pub mod open_loop;
pub use leader_changes::{LeaderChanges, admin_urls};
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
    /// Requests sent (open loop: the offered load, as measured). A request the open loop
    /// did not send ([`run_rate`]'s `overload`) is not among them, only among the errors.
    pub issued: u64,
    /// How many failures of each kind (an HTTP status, or the client error's text).
    pub error_kinds: BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// From the start until the last answer arrived (an open loop's last requests are
    /// answered after its `elapsed`).
    pub until_last_answer: Duration,
    pub latency_us: Histogram<u64>,
}

impl RunResult {
    /// A run with nothing counted yet.
    fn empty() -> RunResult {
        RunResult {
            ops: 0,
            issued: 0,
            error_kinds: BTreeMap::new(),
            elapsed: Duration::ZERO,
            until_last_answer: Duration::ZERO,
            latency_us: histogram(),
        }
    }

    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    pub fn p50_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.5) as f64 / 1000.0
    }
    pub fn p99_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64 / 1000.0
    }
    pub fn p999_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.999) as f64 / 1000.0
    }
    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }
}

/// Runs `concurrency` tasks, each calling `op(task, seq)` in a loop for `duration`, and
/// records each successful call's latency; a failed call returns what went wrong.
pub async fn run_load<F, Fut>(concurrency: usize, duration: Duration, op: F) -> RunResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (op, stop) = (op.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let (mut ok, mut seq, mut kinds) = (0u64, 0u64, BTreeMap::<String, u64>::new());
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                match op(t, seq).await {
                    Ok(()) => {
                        ok += 1;
                        let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                    }
                    Err(kind) => *kinds.entry(kind).or_default() += 1,
                }
                seq += 1;
            }
            (ok, kinds, h)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = RunResult::empty();
    for t in tasks {
        if let Ok((ok, kinds, h)) = t.await {
            total.ops += ok;
            total.issued += ok + kinds.values().sum::<u64>();
            for (k, n) in kinds {
                *total.error_kinds.entry(k).or_default() += n;
            }
            let _ = total.latency_us.add(h);
        }
    }
    total.elapsed = started.elapsed();
    total.until_last_answer = total.elapsed;
    total
}

/// Sends `op(seq)` at `rate` per second for `duration`, whatever the answers (an open loop:
/// a slow server meets the same offered load, unlike a closed loop, which slows down with
/// it). Latency counts from when a request was due, so time waiting to be sent counts too.
/// With `max_in_flight` requests unanswered, a due request is not sent and counts as an
/// `overload` error. The offered rate is measured: requests sent over the time it took.
pub async fn run_rate<F, Fut>(rate: f64, duration: Duration, max_in_flight: usize, op: F) -> RunResult
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    run_rate_until(rate, Some(duration), std::future::pending(), max_in_flight, op).await
}

/// [`run_rate`] until `until` completes (or `duration`, if given, has passed): the offered
/// load for a phase whose length is not known in advance.
pub async fn run_rate_until<F, Fut, U>(
    rate: f64,
    duration: Option<Duration>,
    until: U,
    max_in_flight: usize,
    op: F,
) -> RunResult
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
    U: Future<Output = ()>,
{
    let op = Arc::new(op);
    let mut until = std::pin::pin!(until);
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(Result<(), String>, Duration)>();
    let started = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let mut total = RunResult::empty();
    let mut seq = 0u64;
    let mut ended_early = false;
    loop {
        let due = started + period.mul_f64(seq as f64);
        if duration.is_some_and(|d| due >= started + d) {
            break;
        }
        tokio::select! {
            biased;
            () = &mut until => {
                ended_early = true;
                break;
            }
            () = tokio::time::sleep_until(due) => {}
        }
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            *total.error_kinds.entry("overload".into()).or_default() += 1;
        } else {
            total.issued += 1;
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (op, in_flight, done) = (op.clone(), in_flight.clone(), done_tx.clone());
            tokio::spawn(async move {
                let r = op(seq).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let _ = done.send((r, due.elapsed()));
            });
        }
        seq += 1;
    }
    // The window ends when the next request would have been due (or later, if sending fell
    // behind): `rate * duration` requests over `duration` when the generator kept up; or
    // when `until` completed.
    if let Some(d) = duration
        && !ended_early
    {
        tokio::time::sleep_until(started + d).await;
    }
    total.elapsed = started.elapsed();
    drop(done_tx);
    while let Some((r, latency)) = done_rx.recv().await {
        match r {
            Ok(()) => {
                total.ops += 1;
                let _ = total.latency_us.record(latency.as_micros().max(1) as u64);
            }
            Err(kind) => *total.error_kinds.entry(kind).or_default() += 1,
        }
    }
    total.until_last_answer = started.elapsed();
    total
}

impl RunResult {
    /// The offered rate, as measured: requests sent per second.
    pub fn offered_per_sec(&self) -> f64 {
        self.issued as f64 / self.elapsed.as_secs_f64()
    }

    /// Failed calls, of every kind.
    pub fn errors(&self) -> u64 {
        self.error_kinds.values().sum()
    }

    /// Prints a warning naming the failures of run `name`, if there were any.
    pub fn warn_errors(&self, name: &str) {
        if !self.error_kinds.is_empty() {
            eprintln!("warning: {} errors in run {name}: {:?}", self.errors(), self.error_kinds);
        }
    }
}

/// What an HTTP answer was, as a load run counts it: success, or its status and error code.
pub async fn http_outcome(r: Result<reqwest::Response, reqwest::Error>) -> Result<(), String> {
    match r {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            let message: String = body["error"]["message"].as_str().unwrap_or("").chars().take(80).collect();
            Err(format!("{status} {}: {message}", body["error"]["code"].as_str().unwrap_or("")))
        }
        Err(e) => Err(if e.is_timeout() {
            "timeout".into()
        } else if e.is_connect() {
            "connect".into()
        } else {
            // The innermost cause (a connection closed under a request, say).
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            format!("request: {}", cause.to_string().chars().take(60).collect::<String>())
        }),
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`; `None` if
/// the process is gone or this is not Linux.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_micros(ticks * 1_000_000 / clock_ticks_per_sec()))
}

/// The kernel's clock tick rate (`getconf CLK_TCK`; 100 on every common Linux).
fn clock_ticks_per_sec() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    })
}

/// The processes whose parent is `pid` (an nginx master's workers).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let ppid =
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// CPU time used by a group of processes, summed.
pub fn cpu_time_of(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|&p| cpu_time(p)).sum()
}

/// Medians over repeated runs of one system.
pub struct Summary {
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Reports `{prefix}_ops_per_sec` (median, min, max), `{prefix}_p50_ms`, `{prefix}_p99_ms`
/// and `{prefix}_p999_ms` (medians) and `{prefix}_max_ms` (the slowest answer of all runs:
/// a stall shorter than a thousandth of a run shows only there) of `runs`, and returns the
/// medians.
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
    report.add(format!("{prefix}_p999_ms"), median(&runs.iter().map(RunResult::p999_ms).collect::<Vec<_>>()), "ms");
    report.add(format!("{prefix}_max_ms"), runs.iter().map(RunResult::max_ms).fold(0.0, f64::max), "ms");
    s
}

/// A latency histogram from 1 µs to 60 s with 3 significant digits.
fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; failure would be a bug here.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// A size given on the command line: `512MiB`, `64MB`, `1GiB`, `1048576` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size such as 512MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?}: use KiB, MiB, GiB, kB, MB or GB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s} is too large"))
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

/// Headers of a client talking to datanodes directly, as a Nimbus component does: the
/// cluster secret and route epoch 0.
pub fn internal_headers(secret: &nimbus_net::ClusterSecret) -> reqwest::header::HeaderMap {
    let mut h = secret.default_headers();
    h.insert(nimbus_api::data::ROUTE_EPOCH_HEADER, reqwest::header::HeaderValue::from_static("0"));
    h
}
