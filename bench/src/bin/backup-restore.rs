//! `bench/backup-restore`: a tenant's backups while it serves (issue 15). The playground
//! with one tenant (`shop`, limits far above the load) preloaded with `--size` of documents
//! (1 GiB by default, `--doc-size` bytes each).
//!
//! 1. The write rate the gateway sustains for the tenant, measured (closed loop,
//!    `--baseline-concurrency` clients, `--baseline-seconds`); then open loops (requests at
//!    a fixed rate whatever the answers, latency counted from when each was due): inserts at
//!    `--load-fraction` of that rate and reads of preloaded documents.
//! 2. Each round: `--before-seconds` of that load, then `nimbus playground backup shop`
//!    (it returns when the full is written), timed: its throughput (the database's bytes
//!    over its wall time) and the tenant's p99 during it over its p99 before. The backup
//!    agent paces a full's reads (`AgentTuning::read_bytes_per_sec`, 32 MiB/s by default),
//!    so the throughput is that ceiling's, or what the machine allows below it.
//! 3. RPO, still under the load: every `--marker-every-ms` for `--rpo-seconds` a marker
//!    document is inserted and the time of its acknowledgement noted; `playground.json`
//!    (`instances.shop.backup.latestRestorable`) is polled until it reaches that time. The
//!    lag is when that was seen minus the marker's time. The control plane rewrites
//!    `playground.json` once per pass of its loop (every `serve::TICK` plus the pass), and
//!    the agent closes an oplog segment every 2 s or 4 MiB: both are in the lag.
//! 4. The load stopped, and once the archive covers its last write, `nimbus playground
//!    restore shop --to-time latest --into shop-restored-N`, timed (it creates the new
//!    instance, imports the backup into a staging database and publishes it): throughput
//!    and seconds per GiB. The restored instance's documents are counted through the
//!    gateway, collection by collection, against the source's: any difference fails the
//!    run (after the figures are printed). The restored instance is deleted again.
//!
//! `--rounds N` repeats 2-4; medians are printed with their spread (`_min`, `_max`).
//! Headline, last: `restore_seconds_per_gib`. Goals: `rpo_seconds` <= 5,
//! `backup_p99_ratio` <= 1.5, `restore_mb_per_sec` >= 50.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use clap::Parser;
use nimbus_bench::open_loop::{OpenLoop, Sample, get, insert, latency_ms, warn_failures, window};
use nimbus_bench::{LeaderChanges, Report, median, parse_size, run_load};
use nimbus_e2e::migration::{PRELOAD, SOURCE_POOL, Tenant, instance_yaml, preload, write_manifest};
use nimbus_e2e::playground::Playground;
use reqwest::Method;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// The tenant's data: bytes, or with KiB, MiB, GiB (or kB, MB, GB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Bytes per preloaded document.
    #[arg(long, default_value_t = 4096)]
    doc_size: usize,
    /// Preload requests in flight at once (each about 1 MiB of documents).
    #[arg(long, default_value_t = 8)]
    preload_concurrency: usize,
    /// Clients of the closed loop that measures the rate the gateway sustains.
    #[arg(long, default_value_t = 64)]
    baseline_concurrency: usize,
    #[arg(long, default_value_t = 10)]
    baseline_seconds: u64,
    /// The offered write rate, as a fraction of the measured sustained rate.
    #[arg(long, default_value_t = 0.5)]
    load_fraction: f64,
    /// The tenant's reads per second, as a fraction of its offered write rate.
    #[arg(long, default_value_t = 0.3)]
    read_fraction: f64,
    /// Seconds of load before each full backup (the first second is left out of the p99).
    #[arg(long, default_value_t = 10)]
    before_seconds: u64,
    /// Seconds of markers for the RPO, each round.
    #[arg(long, default_value_t = 20)]
    rpo_seconds: u64,
    /// Milliseconds between two markers.
    #[arg(long, default_value_t = 200)]
    marker_every_ms: u64,
    /// Rounds of backup, RPO and restore; medians are reported, with the spread.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

const TENANT: &str = "shop";
/// The collection of the tenant's measured inserts.
const LOAD: &str = "load";
/// The collection of the baseline's inserts (kept apart from the measured ones).
const BASELINE: &str = "baseline";
/// The collection of the RPO's markers.
const MARKERS: &str = "markers";
/// Requests the tenant's loops send at once: under the gateway's 1,000 connections from
/// one client address (`--max-connections-per-ip`); an HTTP/1.1 request in flight holds a
/// connection. A request waiting here counts the wait in its latency.
static SENDING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(800);
/// A marker not restorable this long after the last one was written fails the run: the
/// archive has stopped.
const RPO_GIVE_UP: Duration = Duration::from_secs(60);
/// How often `playground.json` is read while waiting for the archive.
const POLL: Duration = Duration::from_millis(20);
const GIB: f64 = (1u64 << 30) as f64;

/// What one round measured.
struct Round {
    /// The tenant's p99 (writes and reads) before the backup and during it.
    before_p99_ms: f64,
    backup_p99_ms: f64,
    backup_seconds: f64,
    /// The full's stored (compressed) bytes, from its manifest.
    backup_stored_bytes: u64,
    /// Seconds from each marker's acknowledgement until `playground.json` showed it
    /// restorable.
    rpo_lags: Vec<f64>,
    /// Milliseconds between two rewrites of `playground.json` seen while polling.
    refreshes_ms: Vec<f64>,
    /// The tenant's requests that failed during the round.
    failed_requests: u64,
    restore_seconds: f64,
    restored_documents: u64,
    /// Documents counted differently in the restored instance than in the source, summed
    /// over collections.
    mismatch: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let manifests = tempfile::Builder::new().prefix("nimbus-manifests-").tempdir()?;
    let up = write_manifest(manifests.path(), "up.yaml", &[instance_yaml(TENANT, SOURCE_POOL)])?;
    let up = up.to_str().context("a temporary path that is not UTF-8")?.to_owned();
    // `nimbus playground down` runs when `pg` is dropped, also when a step below fails.
    let pg = tokio::task::spawn_blocking(move || Playground::up(&["--instances", &up])).await??;
    let client = nimbus_e2e::DataClient {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            // Below the gateway's idle timeout (60 s): a connection left idle since the
            // preload and reused as the gateway closes it fails the request (docs/gateway.md).
            .pool_idle_timeout(nimbus_e2e::POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()?,
    };
    let tenant = Tenant::of(&pg, &client, TENANT)?;
    let mut out = Report::default();

    let started = Instant::now();
    let docs = preload(&tenant, args.size, args.doc_size, args.preload_concurrency).await?;
    let secs = started.elapsed().as_secs_f64();
    // The database's size, as a restore or a backup moves it: the documents preloaded (the
    // load's small inserts are left out).
    let db_bytes = docs * args.doc_size as u64;
    eprintln!("preloaded {docs} documents ({} MiB) in {secs:.1} s", db_bytes >> 20);
    out.add("preloaded_documents", docs as f64, "documents");
    out.add("preload_mb_per_sec", db_bytes as f64 / 1e6 / secs, "MB/s");
    out.add("database_mb", db_bytes as f64 / 1e6, "MB");

    // What the gateway sustains for the tenant, no backup asked for.
    let baseline = {
        let t = tenant.clone();
        run_load(args.baseline_concurrency, Duration::from_secs(args.baseline_seconds), move |task, seq| {
            let t = t.clone();
            async move { insert(&t, BASELINE, &format!("b{task}-{seq}")).await }
        })
        .await
    };
    baseline.warn_errors("baseline");
    let sustained = baseline.ops_per_sec();
    out.add("baseline_write_rate", sustained.round(), "writes/s");
    let write_rate = sustained * args.load_fraction;

    // Nothing is killed: every election from here on is unprovoked.
    let admins: Vec<String> = pg.datanodes()?.iter().filter_map(|d| d["admin"].as_str().map(str::to_owned)).collect();
    let mut elections = LeaderChanges::start(&admins).await?;

    let mut rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let r = one_round(&args, &pg, &tenant, round, write_rate, docs).await?;
        elections.sample(&admins, 0).await?;
        out.add(format!("round_{round}_before_p99_ms"), r.before_p99_ms, "ms");
        out.add(format!("round_{round}_backup_p99_ms"), r.backup_p99_ms, "ms");
        out.add(format!("round_{round}_backup_seconds"), r.backup_seconds, "s");
        out.add(format!("round_{round}_rpo_seconds"), r.rpo_lags.iter().copied().fold(0.0, f64::max), "s");
        out.add(format!("round_{round}_restore_seconds"), r.restore_seconds, "s");
        rounds.push(r);
    }

    let each = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
    out.add("offered_write_rate", write_rate.round(), "writes/s");
    out.add("offered_read_rate", (write_rate * args.read_fraction).max(1.0).round(), "reads/s");
    out.add("tenant_failed_requests", rounds.iter().map(|r| r.failed_requests).sum::<u64>() as f64, "requests");

    add_median(&mut out, "backup_seconds", &each(&|r| r.backup_seconds), "s");
    add_median(&mut out, "backup_mb_per_sec", &each(&|r| db_bytes as f64 / 1e6 / r.backup_seconds), "MB/s");
    out.add("backup_stored_mb", median(&each(&|r| r.backup_stored_bytes as f64)) / 1e6, "MB");
    out.add("before_p99_ms", median(&each(&|r| r.before_p99_ms)), "ms");
    out.add("backup_p99_ms", median(&each(&|r| r.backup_p99_ms)), "ms");
    add_median(&mut out, "backup_p99_ratio", &each(&|r| r.backup_p99_ms / r.before_p99_ms.max(1e-3)), "x");

    let lags: Vec<f64> = rounds.iter().flat_map(|r| r.rpo_lags.iter().copied()).collect();
    let refreshes: Vec<f64> = rounds.iter().flat_map(|r| r.refreshes_ms.iter().copied()).collect();
    eprintln!(
        "note: the control plane rewrites playground.json once per pass of its loop (a pass, then {:?}); \
         the RPO seen here includes that",
        nimbus_playground::serve::TICK
    );
    out.add("playground_json_refresh_ms_median", median(&refreshes), "ms");
    out.add("rpo_samples", lags.len() as f64, "markers");
    out.add("rpo_seconds_median", median(&lags), "s");
    out.add("rpo_seconds", lags.iter().copied().fold(0.0, f64::max), "s");

    elections.report(&mut out);
    let mismatch = rounds.iter().map(|r| r.mismatch).sum::<u64>();
    out.add("restored_documents", median(&each(&|r| r.restored_documents as f64)), "documents");
    out.add("restored_documents_mismatch", mismatch as f64, "documents");
    add_median(&mut out, "restore_seconds", &each(&|r| r.restore_seconds), "s");
    add_median(&mut out, "restore_mb_per_sec", &each(&|r| db_bytes as f64 / 1e6 / r.restore_seconds), "MB/s");
    add_median(
        &mut out,
        "restore_seconds_per_gib",
        &each(&|r| r.restore_seconds * GIB / db_bytes.max(1) as f64),
        "s/GiB",
    );
    out.write_json(&args.json)?;
    if mismatch != 0 {
        bail!("the restored instances hold {mismatch} documents more or fewer than the source did (see above)");
    }
    drop(manifests);
    Ok(())
}

/// Adds `{name}_min` and `{name}_max` of `values`, then their median as `{name}` (last, so
/// a headline stays the last line).
fn add_median(out: &mut Report, name: &str, values: &[f64], unit: &str) {
    out.add(format!("{name}_min"), values.iter().copied().fold(f64::INFINITY, f64::min), unit);
    out.add(format!("{name}_max"), values.iter().copied().fold(f64::NEG_INFINITY, f64::max), unit);
    out.add(name, median(values), unit);
}

/// One round: the load, a full backup under it, the RPO's markers, then a restore into a
/// new instance with the load stopped.
async fn one_round(
    args: &Args,
    pg: &Playground,
    tenant: &Tenant,
    round: usize,
    write_rate: f64,
    docs: u64,
) -> anyhow::Result<Round> {
    let t0 = Instant::now();
    let writes = {
        let t = tenant.clone();
        OpenLoop::start(t0, write_rate, &SENDING, move |seq| {
            let t = t.clone();
            async move { insert(&t, LOAD, &format!("r{round}-w{seq}")).await }
        })
    };
    let reads = {
        let t = tenant.clone();
        OpenLoop::start(t0, (write_rate * args.read_fraction).max(1.0), &SENDING, move |seq| {
            let t = t.clone();
            // Spread over the preloaded documents (a multiplicative hash of seq).
            let n = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) % docs.max(1);
            async move { get(&t, &format!("collections/{PRELOAD}/documents/p{n:09}")).await }
        })
    };
    tokio::time::sleep(Duration::from_secs(args.before_seconds)).await;

    // The full backup.
    let backup_start = t0.elapsed();
    let ran = {
        let dir = pg.dir.path().to_owned();
        tokio::task::spawn_blocking(move || backup(&dir)).await?
    };
    let backup_end = t0.elapsed();
    let backup_id = match ran {
        Ok(id) => id,
        Err(e) => {
            let _ = (writes.stop().await, reads.stop().await);
            return Err(e);
        }
    };
    let backup_stored_bytes = full_manifest(pg.dir.path(), &backup_id)?["bytes"].as_u64().unwrap_or(0);
    eprintln!("round {round}: full {backup_id} in {:.1} s", (backup_end - backup_start).as_secs_f64());

    // The archive's lag, under the same load.
    let rpo = rpo(pg, tenant, round, args).await;
    let (writes, write_errors) = writes.stop().await?;
    let (reads, read_errors) = reads.stop().await?;
    let last_answer_ms = now_ms();
    warn_failures("tenant writes", &write_errors);
    warn_failures("tenant reads", &read_errors);
    let (rpo_lags, refreshes_ms) = rpo?;
    let requests = |from, to| -> Vec<Sample> {
        let mut all = window(&writes, from, to);
        all.extend(window(&reads, from, to));
        all
    };
    let (_, before_p99_ms, _) = latency_ms(&requests(Duration::from_secs(1), backup_start));
    let (_, backup_p99_ms, _) = latency_ms(&requests(backup_start, backup_end));
    let failed_requests = writes.iter().chain(&reads).filter(|s| !s.ok).count() as u64;

    // The restore, of everything written: the load stopped, once the archive covers its
    // last answer.
    restorable(pg, last_answer_ms).await?;
    let source = counts(tenant).await?;
    let into = format!("{TENANT}-restored-{round}");
    let restore_start = Instant::now();
    let restored_to = {
        let (dir, into) = (pg.dir.path().to_owned(), into.clone());
        tokio::task::spawn_blocking(move || restore(&dir, &into)).await??
    };
    let restore_seconds = restore_start.elapsed().as_secs_f64();
    eprintln!("round {round}: restored to {restored_to} into {into} in {restore_seconds:.1} s");
    let copy = Tenant::of(pg, &tenant.client, &into)?;
    let restored = counts(&copy).await?;
    let mismatch = mismatch(&source, &restored);
    if mismatch != 0 {
        eprintln!("error: round {round}: documents per collection, source {source:?}, restored {restored:?}");
    }
    {
        let into = into.clone();
        let dir = pg.dir.path().to_owned();
        // A restored instance left behind would be backed up too, beside the next round.
        tokio::task::spawn_blocking(move || delete(&dir, &into)).await??;
    }
    Ok(Round {
        before_p99_ms,
        backup_p99_ms,
        backup_seconds: (backup_end - backup_start).as_secs_f64(),
        backup_stored_bytes,
        rpo_lags,
        refreshes_ms,
        failed_requests,
        restore_seconds,
        restored_documents: restored.values().sum(),
        mismatch,
    })
}

/// `nimbus playground backup shop`: the full's id (it prints `backup: ID at RFC3339`).
fn backup(dir: &Path) -> anyhow::Result<String> {
    let out = nimbus(dir, &["backup", TENANT])?;
    out.strip_prefix("backup: ")
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .with_context(|| format!("unexpected output of nimbus playground backup: {out:?}"))
}

/// `nimbus playground restore shop --to-time latest --into INTO`: the time restored to.
fn restore(dir: &Path, into: &str) -> anyhow::Result<String> {
    let out = nimbus(dir, &["restore", TENANT, "--to-time", "latest", "--into", into])?;
    out.strip_prefix("restored to: ")
        .map(str::to_owned)
        .with_context(|| format!("unexpected output of nimbus playground restore: {out:?}"))
}

/// `nimbus playground delete NAME`.
fn delete(dir: &Path, name: &str) -> anyhow::Result<()> {
    nimbus(dir, &["delete", name]).map(drop)
}

/// Runs `nimbus playground ARGS --dir DIR`; its output's first line, or an error with its
/// output.
fn nimbus(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(nimbus_e2e::binary("nimbus")?)
        .arg("playground")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .context("failed to run nimbus")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "nimbus playground {} failed: {}{}",
            args.join(" "),
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout.lines().next().unwrap_or_default().trim().to_owned())
}

/// The manifest of full `id`: `{dir}/backups/.../full/{id}/manifest_{sha256}.json`.
fn full_manifest(dir: &Path, id: &str) -> anyhow::Result<Value> {
    let root = dir.join(nimbus_playground::backup::BACKUPS_DIR);
    let missing = || format!("no manifest of full {id} under {}", root.display());
    let full = find(&root, &Path::new("full").join(id)).with_context(missing)?;
    let is_manifest = |p: &Path| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("manifest") && n.ends_with(".json"))
    };
    let path = std::fs::read_dir(&full)?.flatten().map(|e| e.path()).find(|p| is_manifest(p)).with_context(missing)?;
    let text = std::fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// The first path under `dir` that ends with `tail`.
fn find(dir: &Path, tail: &Path) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.ends_with(tail) {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = find(&path, tail)
        {
            return Some(found);
        }
    }
    None
}

/// Markers every `--marker-every-ms` for `--rpo-seconds`, each awaited in
/// `playground.json`: the lags (seconds), and the intervals (ms) between two rewrites of
/// `playground.json` seen meanwhile.
async fn rpo(pg: &Playground, t: &Tenant, round: usize, args: &Args) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let file = pg.dir.path().join("playground.json");
    let every = Duration::from_millis(args.marker_every_ms.max(1));
    let start = Instant::now();
    let end = start + Duration::from_secs(args.rpo_seconds);
    let (mut next_marker, mut n) = (start, 0u64);
    let mut pending: VecDeque<i64> = VecDeque::new();
    let (mut lags, mut refreshes) = (Vec::new(), Vec::new());
    let mut last_write: Option<(SystemTime, Instant)> = None;
    loop {
        let now = Instant::now();
        if now < end && now >= next_marker {
            n += 1;
            match insert(t, MARKERS, &format!("r{round}-m{n}")).await {
                Ok(()) => pending.push_back(now_ms()),
                Err(e) => eprintln!("warning: marker r{round}-m{n} not written: {e}"),
            }
            next_marker += every;
        }
        if let Ok(modified) = std::fs::metadata(&file).and_then(|m| m.modified()) {
            match last_write {
                Some((at, seen)) if at != modified => {
                    refreshes.push(seen.elapsed().as_secs_f64() * 1000.0);
                    last_write = Some((modified, Instant::now()));
                }
                None => last_write = Some((modified, Instant::now())),
                Some(_) => {}
            }
        }
        if let Some(latest) = pg.json().ok().and_then(|v| latest_restorable(&v)) {
            let seen = now_ms();
            while pending.front().is_some_and(|&m| m <= latest) {
                if let Some(m) = pending.pop_front() {
                    lags.push((seen - m) as f64 / 1000.0);
                }
            }
        }
        if now >= end && pending.is_empty() {
            return Ok((lags, refreshes));
        }
        if now >= end + RPO_GIVE_UP {
            bail!(
                "round {round}: {} markers not restorable {RPO_GIVE_UP:?} after the last was written; \
                 backup is {}",
                pending.len(),
                pg.instance(TENANT).map(|i| i["backup"].to_string()).unwrap_or_default()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the tenant is restorable to `ms` (its archive covers it).
async fn restorable(pg: &Playground, ms: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + RPO_GIVE_UP;
    loop {
        if pg.json().ok().and_then(|v| latest_restorable(&v)).is_some_and(|l| l >= ms) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the tenant was not restorable to the end of the load within {RPO_GIVE_UP:?}: backup is {}",
                pg.instance(TENANT).map(|i| i["backup"].to_string()).unwrap_or_default()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `instances.shop.backup.latestRestorable` of `playground.json`, in ms since the epoch.
fn latest_restorable(v: &Value) -> Option<i64> {
    let text = v["instances"][TENANT]["backup"]["latestRestorable"].as_str()?;
    text.parse::<jiff::Timestamp>().ok().map(|t| t.as_millisecond())
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Documents per collection, counted through the gateway.
async fn counts(t: &Tenant) -> anyhow::Result<BTreeMap<String, u64>> {
    let (st, list) = t.call(Method::GET, "collections", None, None).await;
    if st != 200 {
        bail!("listing the collections of {} failed: {st} {list}", t.db);
    }
    let mut out = BTreeMap::new();
    for c in list["collections"].as_array().context("no collections in the answer")? {
        let name = c["name"].as_str().context("a collection without a name")?;
        let body = json!({"filter": {}});
        let (st, count) = t.call(Method::POST, &format!("collections/{name}/count"), Some(&body), None).await;
        let n = count["count"].as_u64().filter(|_| st == 200);
        out.insert(name.to_owned(), n.with_context(|| format!("counting {name} of {} failed: {st} {count}", t.db))?);
    }
    Ok(out)
}

/// Documents more or fewer in `b` than in `a`, summed over the collections of either.
fn mismatch(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> u64 {
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names.iter().map(|n| a.get(*n).copied().unwrap_or(0).abs_diff(b.get(*n).copied().unwrap_or(0))).sum()
}
