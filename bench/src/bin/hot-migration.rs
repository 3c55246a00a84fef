//! `bench/hot-migration`: one tenant's database moved to another pool while it serves
//! (issue 14). The playground with two pools; the tenant (`tenant`, pool `default`, limits
//! far above the load) preloaded with `--size` of documents (512 MiB by default) and
//! sharing its replica set with a second tenant (`other`); the target pool's replica set
//! already running (an `anchor` instance in it).
//!
//! 1. The write rate the gateway sustains for the tenant without a migration, measured
//!    (closed loop, `--baseline-concurrency` clients, `--baseline-seconds`).
//! 2. Open loops (requests at a fixed rate whatever the answers, latency counted from when
//!    each was due): the tenant's inserts at `--load-fraction` of that rate, each with
//!    its own `Idempotency-Key` and sent once; the tenant's reads of preloaded documents;
//!    the other tenant's writes and reads.
//! 3. `--before-seconds` of that, then `nimbus playground apply --wait` of the tenant's
//!    manifest with `spec.pool: paid`, the phases watched in `playground.json`, then
//!    `--after-seconds` more.
//!
//! Prints the offered and served write rates (measured), the migration's time and copy
//! throughput, the tenant's latency before, during and at the cutover (requests due within
//! a second of the hold), the other tenant's p99 before and during, `hold_ms` (from
//! `playground.json`), `acknowledged_writes_lost` (inserts acknowledged, then not found) and
//! last `migration_failed_requests`: the tenant's requests that failed from the start of
//! the migration to the end of the load. Goals: 0 failed, 0 lost, `hold_ms` < 300,
//! `served_vs_offered_write_rate` 1.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use nimbus_bench::open_loop::{OpenLoop, Sample, get, insert, latency_ms, warn_failures, window};
use nimbus_bench::{LeaderChanges, Report, parse_size, run_load};
use nimbus_e2e::migration::{ANCHOR, PRELOAD, RUNNING, SWITCHED, Tenant, TwoPools, in_phase, migration_of, preload};
use reqwest::Method;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// The tenant's data before the migration: bytes, or with KiB, MiB, GiB (or kB, MB, GB).
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
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
    #[arg(long, default_value_t = 0.7)]
    load_fraction: f64,
    /// The tenant's reads per second, as a fraction of its offered write rate.
    #[arg(long, default_value_t = 0.3)]
    read_fraction: f64,
    /// The other tenant's requests per second (half writes, half reads).
    #[arg(long, default_value_t = 200.0)]
    other_rate: f64,
    /// Seconds of load before the migration starts.
    #[arg(long, default_value_t = 10)]
    before_seconds: u64,
    /// Seconds of load after it completed.
    #[arg(long, default_value_t = 5)]
    after_seconds: u64,
    /// The niceness (0-19) given to the target replica set's datanodes, every thread:
    /// with 19 they take only the CPU the source's leave idle, as if on machines of their
    /// own (on a cluster the target replica set runs on other nodes). 0, the default:
    /// both replica sets share this machine's cores equally.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
    target_nice: u8,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Writes a second-by-second timeline here (TSV: second, phase, then p50/p99/max ms of
    /// the tenant's writes and of the other tenant's requests): where the latency went.
    #[arg(long)]
    timeline: Option<PathBuf>,
}

const TENANT: &str = "tenant";
const OTHER: &str = "other";
/// The collection of the tenant's measured inserts.
const LOAD: &str = "load";
/// Requests the tenant's loops send at once. The gateway takes at most 1,000 connections
/// from one client address (its abuse bound, `--max-connections-per-ip`) and the load
/// generator is one address; an HTTP/1.1 request in flight holds a connection. A request
/// waiting here counts the wait in its latency (it is measured from when it was due).
static TENANT_SENDING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(800);
/// The other tenant's, apart (with its own connections): another application, whose
/// requests must not queue behind the migrating tenant's held ones in the load generator.
/// 800 + 100 stay under the gateway's bound.
static OTHER_SENDING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(100);
/// The half-width of the cutover window around the hold.
const CUTOVER: Duration = Duration::from_secs(1);
/// The collection of the baseline's inserts (kept apart from the measured ones).
const BASELINE: &str = "baseline";

/// When each migration phase was first seen in `playground.json`, since the run's start.
type Phases = BTreeMap<String, Duration>;

/// Polls `playground.json` every 10 ms until `done`, noting when each phase of the
/// tenant's migration was first seen; returns those and the last migration object seen.
async fn watch(two: Arc<TwoPools>, t0: Instant, done: Arc<AtomicBool>) -> (Phases, Value) {
    let mut phases = Phases::new();
    let mut last = Value::Null;
    while !done.load(Ordering::Relaxed) {
        if let Ok(v) = two.pg.json() {
            let m = migration_of(&v, TENANT);
            if let Some(p) = m["phase"].as_str() {
                phases.entry(p.to_owned()).or_insert_with(|| t0.elapsed());
            }
            if !m.is_null() {
                last = m;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (phases, last)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // `nimbus playground down` runs when `two` is dropped, also when a step below fails.
    let two = Arc::new(tokio::task::spawn_blocking(|| TwoPools::up(TENANT, &[OTHER], &[])).await??);
    let http = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(nimbus_e2e::POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()
    };
    let client = nimbus_e2e::DataClient { http: http()? };
    let tenant = Tenant::of(&two.pg, &client, TENANT)?;
    // The other tenant: another application, with connections of its own.
    let other = Tenant::of(&two.pg, &nimbus_e2e::DataClient { http: http()? }, OTHER)?;
    let mut out = Report::default();

    let started = Instant::now();
    let docs = preload(&tenant, args.size, args.doc_size, args.preload_concurrency).await?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!("preloaded {docs} documents ({} MiB) in {secs:.1} s", args.size >> 20);
    out.add("preloaded_documents", docs as f64, "documents");
    out.add("preload_mb_per_sec", args.size as f64 / 1e6 / secs, "MB/s");

    // 1. What the gateway sustains for the tenant, no migration running.
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
    out.add("baseline_write_p99_ms", baseline.p99_ms(), "ms");
    if sustained < 3_000.0 {
        eprintln!("warning: the gateway sustains {sustained:.0} writes/s for the tenant, under the 3,000/s goal");
    }
    let write_rate = sustained * args.load_fraction;
    out.add("target_nice", f64::from(args.target_nice), "nice");

    // Elections of either replica set from here on are unprovoked: nothing is killed.
    let v = two.pg.json()?;
    let (source_rs, target_rs) =
        (v["instances"][TENANT]["replicaSet"].clone(), v["instances"][ANCHOR]["replicaSet"].clone());
    let members = |rs: &Value| -> Vec<String> {
        let ds = v["datanodes"].as_array().into_iter().flatten().filter(|d| &d["replicaSet"] == rs);
        ds.filter_map(|d| d["admin"].as_str().map(str::to_owned)).collect()
    };
    let (source_admins, target_admins) = (members(&source_rs), members(&target_rs));
    let target_pids: Vec<u32> = v["datanodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["replicaSet"] == target_rs)
        .filter_map(|d| d["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect();
    if args.target_nice > 0 {
        let threads = renice(&target_pids, args.target_nice)?;
        eprintln!(
            "target replica set {target_rs}: {threads} threads of {} datanodes at nice {}",
            target_pids.len(),
            args.target_nice
        );
    }
    let mut source_elections = LeaderChanges::start(&source_admins).await?;
    let mut target_elections = LeaderChanges::start(&target_admins).await?;

    // 2. The load: the tenant's writes and reads, the other tenant's.
    let t0 = Instant::now();
    let writes = {
        let t = tenant.clone();
        OpenLoop::start(t0, write_rate, &TENANT_SENDING, move |seq| {
            let t = t.clone();
            async move { insert(&t, LOAD, &format!("w{seq}")).await }
        })
    };
    let reads = {
        let t = tenant.clone();
        OpenLoop::start(t0, (write_rate * args.read_fraction).max(1.0), &TENANT_SENDING, move |seq| {
            let t = t.clone();
            // Spread over the preloaded documents (a multiplicative hash of seq).
            let n = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) % docs;
            async move { get(&t, &format!("collections/{PRELOAD}/documents/p{n:09}")).await }
        })
    };
    // The other tenant reads a document that exists (one written by its own open loop
    // may not be acknowledged yet when the next request is due).
    insert(&other, LOAD, "o-seed").await.map_err(|e| anyhow::anyhow!("failed to seed the other tenant: {e}"))?;
    let others = {
        let t = other.clone();
        OpenLoop::start(t0, args.other_rate, &OTHER_SENDING, move |seq| {
            let t = t.clone();
            async move {
                if seq.is_multiple_of(2) {
                    insert(&t, LOAD, &format!("o{seq}")).await
                } else {
                    get(&t, &format!("collections/{LOAD}/documents/o-seed")).await
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(args.before_seconds)).await;

    // 3. The migration.
    if args.target_nice > 0 {
        // Threads started since (a runtime's blocking pool) inherit it, but not all.
        renice(&target_pids, args.target_nice)?;
    }
    let migration_start = t0.elapsed();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch(two.clone(), t0, done.clone()));
    let applied = {
        let two = two.clone();
        tokio::task::spawn_blocking(move || two.pg.apply(&[&two.to_target], true)).await?
    };
    let migration_end = t0.elapsed();
    done.store(true, Ordering::Relaxed);
    let (phases, _) = watcher.await?;
    if let Err(e) = applied {
        bail!("the migration failed: {e:#}");
    }
    tokio::time::sleep(Duration::from_secs(args.after_seconds)).await;
    let load_end = t0.elapsed();
    let (writes, write_errors) = writes.stop().await?;
    let (reads, read_errors) = reads.stop().await?;
    let (others, other_errors) = others.stop().await?;
    for (who, kinds) in [("tenant writes", &write_errors), ("tenant reads", &read_errors), ("other", &other_errors)] {
        warn_failures(who, kinds);
    }

    source_elections.sample(&source_admins, 0).await?;
    target_elections.sample(&target_admins, 0).await?;
    let v = two.pg.json()?;
    let i = &v["instances"][TENANT];
    let m = migration_of(&v, TENANT);
    if i["pool"] != "paid" || !in_phase(i, SWITCHED) || in_phase(i, RUNNING) {
        bail!("apply --wait returned, but the tenant is not settled in pool paid: {i}");
    }
    eprintln!("migration: {m}");
    eprintln!("phases first seen (s since the load started): {phases:?}");

    // Rates over the migration's window, measured: due requests sent, and answered.
    let during = window(&writes, migration_start, migration_end);
    let span = (migration_end - migration_start).as_secs_f64();
    let offered = during.len() as f64 / span;
    let served = during.iter().filter(|s| s.ok).count() as f64 / span;
    out.add("offered_write_rate", offered.round(), "writes/s");
    out.add("served_write_rate", served.round(), "writes/s");
    out.add("migration_seconds", span, "s");
    let copy_start = phases.get("Copying").copied().unwrap_or(migration_start);
    let copy_end =
        ["CatchingUp", "Holding", "Switching"].iter().find_map(|p| phases.get(*p).copied()).unwrap_or(migration_end);
    let bytes_copied = m["bytesCopied"].as_u64().unwrap_or(0) as f64;
    out.add("documents_copied", m["documentsCopied"].as_u64().unwrap_or(0) as f64, "documents");
    out.add(
        "copy_mb_per_sec",
        bytes_copied / 1e6 / copy_end.saturating_sub(copy_start).as_secs_f64().max(1e-3),
        "MB/s",
    );

    let before = Duration::from_secs(1);
    let cut = phases.get("Holding").or(phases.get("Switching")).copied().unwrap_or(migration_end);
    let catch_up_start = phases.get("CatchingUp").copied().unwrap_or(copy_end);
    // The phases apart too: what the copy costs the tenants, what the catch-up (the target
    // applying the tenant's writes as well) does, and whether they are back after it.
    let windows = [
        ("before", before, migration_start),
        ("during", migration_start, migration_end),
        ("copy", copy_start, copy_end),
        ("catchup", catch_up_start, cut),
        ("cutover", cut.saturating_sub(CUTOVER), cut + CUTOVER),
        ("after", migration_end, load_end),
    ];
    for (name, from, to) in windows {
        let (p50, p99, max) = latency_ms(&window(&writes, from, to));
        out.add(format!("write_p50_ms_{name}"), p50, "ms");
        out.add(format!("write_p99_ms_{name}"), p99, "ms");
        out.add(format!("write_max_ms_{name}"), max, "ms");
        let (_, p99, max) = latency_ms(&window(&reads, from, to));
        out.add(format!("read_p99_ms_{name}"), p99, "ms");
        out.add(format!("read_max_ms_{name}"), max, "ms");
    }
    if let Some(path) = &args.timeline {
        write_timeline(path, &phases, &writes, &others, load_end)?;
    }
    let (_, other_before, _) = latency_ms(&window(&others, before, migration_start));
    let (_, other_during, _) = latency_ms(&window(&others, migration_start, migration_end));
    for (name, from, to) in windows {
        let (_, p99, _) = latency_ms(&window(&others, from, to));
        out.add(format!("other_p99_ms_{name}"), p99, "ms");
    }
    out.add("other_p99_ratio", other_during / other_before.max(1e-3), "ratio");
    out.add("other_failed_requests", others.iter().filter(|s| !s.ok).count() as f64, "requests");
    out.add("hold_ms", m["holdMs"].as_f64().unwrap_or(f64::NAN), "ms");
    out.add("migration_attempts", m["attempt"].as_f64().unwrap_or(f64::NAN), "attempts");

    let unprovoked = source_elections.unprovoked() + target_elections.unprovoked();
    out.add("unprovoked_leader_changes", unprovoked as f64, "count");

    let acked: Vec<u64> = writes.iter().filter(|s| s.ok).map(|s| s.seq).collect();
    let lost = lost_writes(&tenant, &acked).await?;
    out.add("acknowledged_writes", acked.len() as f64, "writes");
    out.add("acknowledged_writes_lost", lost as f64, "writes");
    out.add("served_vs_offered_write_rate", served / offered.max(1e-9), "ratio");
    let failed = window(&writes, migration_start, load_end).iter().filter(|s| !s.ok).count()
        + window(&reads, migration_start, load_end).iter().filter(|s| !s.ok).count();
    out.add("migration_failed_requests", failed as f64, "requests");
    out.write_json(&args.json)?;
    Ok(())
}

/// The `--timeline` file: for each second of the load, the latest migration phase seen by
/// then and the latency of the tenant's writes and of the other tenant's requests due in
/// that second.
fn write_timeline(
    path: &PathBuf,
    phases: &Phases,
    writes: &[Sample],
    others: &[Sample],
    end: Duration,
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut tsv = String::from(
        "second\tphase\twrite_p50_ms\twrite_p99_ms\twrite_max_ms\tother_p50_ms\tother_p99_ms\tother_max_ms\n",
    );
    for sec in 0..end.as_secs() {
        let (from, to) = (Duration::from_secs(sec), Duration::from_secs(sec + 1));
        let phase =
            phases.iter().filter(|(_, at)| **at < to).max_by_key(|(_, at)| **at).map_or("-", |(p, _)| p.as_str());
        let (w50, w99, wmax) = latency_ms(&window(writes, from, to));
        let (o50, o99, omax) = latency_ms(&window(others, from, to));
        let _ = writeln!(tsv, "{sec}\t{phase}\t{w50:.1}\t{w99:.1}\t{wmax:.1}\t{o50:.1}\t{o99:.1}\t{omax:.1}");
    }
    std::fs::write(path, tsv).with_context(|| format!("failed to write {}", path.display()))
}

/// Gives every thread of the processes `pids` the niceness `nice` (`renice`, util-linux:
/// on Linux a niceness belongs to a thread, and `renice -p` sets one thread's); returns
/// how many threads.
///
/// A thread that ended between the listing and `renice` (a runtime retires idle blocking
/// threads) is only warned about: the run goes on.
fn renice(pids: &[u32], nice: u8) -> anyhow::Result<usize> {
    if pids.is_empty() {
        bail!("--target-nice: no datanode of the target replica set in playground.json");
    }
    let mut threads = Vec::new();
    for pid in pids {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("datanode {pid}"))?;
        threads.extend(tasks.filter_map(|t| t.ok()).map(|t| t.file_name().to_string_lossy().into_owned()));
    }
    let status = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(&threads)
        .stdout(std::process::Stdio::null())
        .status()
        .context("failed to run renice (util-linux)")?;
    if !status.success() {
        eprintln!("warning: renice -n {nice} of the target replica set's threads: {status} (a thread may have ended)");
    }
    Ok(threads.len())
}

/// How many of the acknowledged inserts `w{seq}` are missing from [`LOAD`], read in pages
/// of `_id`s through the gateway.
async fn lost_writes(t: &Tenant, acked: &[u64]) -> anyhow::Result<usize> {
    let mut found = std::collections::HashSet::new();
    let mut last: Option<String> = None;
    loop {
        let filter = match &last {
            Some(id) => json!({"_id": {"$gt": id}}),
            None => json!({}),
        };
        let body = json!({"filter": filter, "projection": {"_id": 1}, "sort": {"_id": 1},
                          "limit": nimbus_api::limits::MAX_FIND_LIMIT});
        let (st, answer) = t.call(Method::POST, &format!("collections/{LOAD}/find"), Some(&body), None).await;
        if st != 200 {
            bail!("reading back the inserts failed: {st} {answer}");
        }
        let page = answer["documents"].as_array().context("no documents in the answer")?;
        let Some(tail) = page.last() else { break };
        last = tail["_id"].as_str().map(str::to_owned);
        found.extend(page.iter().filter_map(|d| d["_id"].as_str().map(str::to_owned)));
        if last.is_none() {
            bail!("an insert with a non-string _id in {LOAD}: {tail}");
        }
    }
    Ok(acked.iter().filter(|seq| !found.contains(&format!("w{seq}"))).count())
}
