//! `bench/rate-limit`: offered load at twice one database's QPS limit, and a second,
//! well-behaved tenant's latency with and without that flood.
//!
//! Both tenants send open loops (requests at a fixed rate, whatever the answers; latency
//! counted from when each request was due). The offered rates printed are measured, the
//! requests sent over the time it took, not the rates asked for. Every failure of the
//! calm tenant counts in `calm_errors` (goal 0): an answer other than success, or no
//! answer at all. Also prints `unprovoked_leader_changes`: elections of the replica set
//! during the phases (nothing is killed here; goal 0).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nimbus_api::etcd::{Limits, Tier, UserRole};
use nimbus_bench::{LeaderChanges, Report, RunResult, admin_urls, http_outcome, run_rate};
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

/// Requests one tenant may have unanswered before the load generator counts a due
/// request as an `overload` error instead of sending it: far above what either sends.
const MAX_IN_FLIGHT: usize = 10_000;

/// GETs of `url` at `rate` per second for `dur`, as an open loop.
async fn paced(http: &reqwest::Client, url: &str, auth: &str, rate: f64, dur: Duration) -> RunResult {
    let (http, url, auth) = (http.clone(), Arc::new(url.to_owned()), Arc::new(auth.to_owned()));
    run_rate(rate, dur, MAX_IN_FLIGHT, move |_| {
        let req = http.get(url.as_str()).header("authorization", auth.as_str());
        async move { http_outcome(req.send().await).await }
    })
    .await
}

/// Whether a failure (as [`http_outcome`] names it) is the limiter's refusal.
fn is_rejection(kind: &str) -> bool {
    kind.starts_with("429")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // etcd and the datanodes stop when `stack` is dropped, the gateway with `gw`, also when
    // a step below fails.
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
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(nimbus_e2e::POOL_IDLE_TIMEOUT)
        .build()?;
    let flood_url = format!("{}/v1/databases/flood/collections", gw.public);
    let calm_url = format!("{}/v1/databases/calm/collections", gw.public);
    let (fa, ca) = (format!("Bearer {flood_tok}"), format!("Bearer {calm_tok}"));
    poll("the gateway to route", Duration::from_secs(10), || async {
        let r = http.get(&calm_url).header("authorization", &ca).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await?;
    let dur = Duration::from_secs(args.seconds);
    let calm_rate = args.calm_rate as f64;
    let flood_rate = f64::from(args.qps) * 2.0;
    let admins = admin_urls(&stack.cluster);
    let mut elections = LeaderChanges::start(&admins).await?;
    let mut report = Report::default();

    // Phase 1: the calm tenant alone.
    let alone = paced(&http, &calm_url, &ca, calm_rate, dur).await;
    alone.warn_errors("calm tenant alone");
    elections.sample(&admins, 0).await?;
    // Phase 2: the calm tenant while the other floods at twice its limit.
    let flood = tokio::spawn({
        let (http, flood_url, fa) = (http.clone(), flood_url.clone(), fa.clone());
        async move { paced(&http, &flood_url, &fa, flood_rate, dur).await }
    });
    let with_flood = paced(&http, &calm_url, &ca, calm_rate, dur).await;
    let flood = flood.await?;
    with_flood.warn_errors("calm tenant with the flood");
    elections.sample(&admins, 0).await?;
    let flood_other: BTreeMap<_, _> = flood.error_kinds.iter().filter(|(k, _)| !is_rejection(k)).collect();
    if !flood_other.is_empty() {
        eprintln!("warning: flood failures other than the limiter's 429: {flood_other:?}");
    }
    let rejected: u64 = flood.error_kinds.iter().filter(|(k, _)| is_rejection(k)).map(|(_, n)| n).sum();

    // Served over the time the gateway served them: requests queued when the flood stopped
    // sending are answered (and let through by the limiter) after it.
    let served_rate = flood.ops as f64 / flood.until_last_answer.as_secs_f64();
    report.add("flood_offered_per_sec", flood.offered_per_sec().round(), "req/s");
    report.add("flood_served_per_sec", served_rate.round(), "req/s");
    report.add("flood_rejected", rejected as f64, "count");
    report.add("flood_other_errors", (flood.errors() - rejected) as f64, "count");
    report.add("calm_offered_per_sec_alone", alone.offered_per_sec(), "req/s");
    report.add("calm_offered_per_sec_with_flood", with_flood.offered_per_sec(), "req/s");
    report.add("calm_p99_ms_alone", alone.p99_ms(), "ms");
    report.add("calm_p99_ms_with_flood", with_flood.p99_ms(), "ms");
    report.add("calm_p99_ratio", with_flood.p99_ms() / alone.p99_ms().max(0.001), "x");
    report.add("calm_errors_alone", alone.errors() as f64, "count");
    report.add("calm_errors_with_flood", with_flood.errors() as f64, "count");
    report.add("calm_errors", (alone.errors() + with_flood.errors()) as f64, "count");
    elections.report(&mut report);
    report.add("rate_limit_served_fraction", served_rate / f64::from(args.qps), "x");
    report.write_json(&args.json)?;
    drop(gw);
    drop(stack);
    Ok(())
}
