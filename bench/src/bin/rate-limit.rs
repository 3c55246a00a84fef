//! `bench/rate-limit`: offered load at twice one database's QPS limit, and a second,
//! well-behaved tenant's latency with and without that flood.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use nimbus_api::etcd::{Limits, Tier, UserRole};
use nimbus_bench::Report;
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::poll;

#[derive(Parser)]
struct Args {
    /// The flooding database's QPS limit.
    #[arg(long, default_value_t = 500)]
    qps: u32,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The calm tenant's request rate.
    #[arg(long, default_value_t = 50)]
    calm_rate: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Sends GETs at a fixed rate (open loop), returning (served, latency histogram of
/// successes, time until the last answer: requests queued at the end finish after `dur`).
async fn paced(
    http: reqwest::Client,
    url: String,
    auth: String,
    rate: u64,
    dur: Duration,
    stop: Arc<AtomicBool>,
) -> (u64, Histogram<u64>, Duration) {
    let served = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!())));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < dur && !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let (http, url, auth, served, hist) = (http.clone(), url.clone(), auth.clone(), served.clone(), hist.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            if let Ok(r) = http.get(&url).header("authorization", auth).send().await
                && r.status().is_success()
            {
                served.fetch_add(1, Ordering::Relaxed);
                let _ = hist.lock().map(|mut h| h.record(t0.elapsed().as_micros().max(1) as u64));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let h = hist.lock().map(|h| h.clone()).unwrap_or_else(|p| p.into_inner().clone());
    (served.load(Ordering::Relaxed), h, started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut stack = Stack::start(3, &["flood", "calm"]).await?;
    let (etcd, control) = (&stack.etcd, &mut stack.control);
    let flood_tok = control.user("flood", "app", UserRole::ReadWrite).await?;
    let calm_tok = control.user("calm", "app", UserRole::ReadWrite).await?;
    let burst = (args.qps / 10).max(1);
    control
        .limits(
            "flood",
            &Limits { tier: Tier::Standard, qps: args.qps, burst, max_connections: 10_000, max_in_flight: 10_000 },
        )
        .await?;
    let gw = GatewayProc::start("gw-bench", &etcd.client_urls, &stack.cluster.secret_file, &[]).await?;
    let http = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(1024).build()?;
    let flood_url = format!("{}/v1/databases/flood/collections", gw.public);
    let calm_url = format!("{}/v1/databases/calm/collections", gw.public);
    let (fa, ca) = (format!("Bearer {flood_tok}"), format!("Bearer {calm_tok}"));
    poll("the gateway to route", Duration::from_secs(10), || async {
        let r = http.get(&calm_url).header("authorization", &ca).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await?;
    let dur = Duration::from_secs(args.seconds);
    let never = Arc::new(AtomicBool::new(false));
    let mut report = Report::default();

    // Phase 1: the calm tenant alone.
    let (_, alone, _) = paced(http.clone(), calm_url.clone(), ca.clone(), args.calm_rate, dur, never.clone()).await;
    // Phase 2: the calm tenant while the other floods at twice its limit.
    let flood =
        tokio::spawn(paced(http.clone(), flood_url.clone(), fa.clone(), u64::from(args.qps) * 2, dur, never.clone()));
    let (_, with_flood, _) =
        paced(http.clone(), calm_url.clone(), ca.clone(), args.calm_rate, dur, never.clone()).await;
    let (served, _, flood_elapsed) = flood.await?;
    let served_rate = served as f64 / flood_elapsed.as_secs_f64();
    report.add("flood_offered_per_sec", f64::from(args.qps) * 2.0, "req/s");
    report.add("flood_served_per_sec", served_rate.round(), "req/s");
    report.add("calm_p99_ms_alone", alone.value_at_quantile(0.99) as f64 / 1000.0, "ms");
    report.add("calm_p99_ms_with_flood", with_flood.value_at_quantile(0.99) as f64 / 1000.0, "ms");
    report.add(
        "calm_p99_ratio",
        with_flood.value_at_quantile(0.99) as f64 / alone.value_at_quantile(0.99).max(1) as f64,
        "x",
    );
    report.add("rate_limit_served_fraction", served_rate / f64::from(args.qps), "x");
    report.write_json(&args.json)?;
    drop(gw);
    drop(stack);
    Ok(())
}
