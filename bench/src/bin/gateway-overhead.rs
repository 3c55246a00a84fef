//! `bench/gateway-overhead`: what the gateway costs, against a bare reverse proxy in the
//! same run. Three systems in front of the same datanode leader: nothing (direct), nginx
//! (Debian's, a plain keep-alive reverse proxy, started by the benchmark) and the gateway.
//!
//! 1. The direct capacity: closed loop, 64 clients, straight to the leader.
//! 2. At a fixed offered load of half that capacity (an open loop: requests at a steady
//!    rate whatever the answers, latency counted from when each was due), each system in
//!    turn, rotating the order every round: the p50 and p99, and the CPU the proxy (nginx's
//!    master and workers, or the gateway) spends per request, from `/proc`.
//!
//! On two shared cores the saturated throughput of a proxy only measures how the cores are
//! shared; CPU per request and latency at a load the machine carries are what a proxy
//! costs. The load is half reads by `_id`, half inserts, each insert with its own
//! `Idempotency-Key`.
//!
//! Also prints `unprovoked_leader_changes`: elections of the replica set during the runs
//! (nothing is killed here, so every one is unprovoked; goal 0).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nimbus_api::data::{IDEMPOTENCY_KEY_HEADER, ROUTE_EPOCH_HEADER};
use nimbus_api::etcd::{Limits, Tier, UserRole};
use nimbus_bench::nginx::Nginx;
use nimbus_bench::{
    LeaderChanges, Report, RunResult, admin_urls, cpu_time_of, http_outcome, median, run_load, run_rate, summarize,
};
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::poll;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Clients of the closed loop that measures the direct capacity.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Length of each run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Runs of each system (their medians are reported, with the spread).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The offered load as a fraction of the direct capacity.
    #[arg(long, default_value_t = 0.5)]
    load: f64,
    #[arg(long)]
    json: Option<PathBuf>,
}

const PRELOADED: u64 = 1000;
const SYSTEMS: [&str; 3] = ["direct", "nginx", "gateway"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // An election timeout of a second: on two cores saturated by design, the default 300 ms
    // makes the replica set change leaders now and then, and a proxy that rides a leader
    // change out (the gateway) then spends retries the others answer with errors: noise in
    // what is measured here, the proxy's own cost. (`bench/failover` measures elections.)
    let mut stack = Stack::start_with(3, &["bench"], &["--election-timeout-ms", "1000"]).await?;
    let leader = stack.cluster.wait_leader(Duration::from_secs(10)).await?;
    let token = stack.control.user("bench", "app", UserRole::ReadWrite).await?;
    // Limits far above the load: this measures the gateway's cost, not its limiter.
    let unlimited = Limits {
        tier: Tier::Dedicated,
        qps: 1_000_000,
        burst: 1_000_000,
        max_connections: 100_000,
        max_in_flight: 100_000,
    };
    stack.control.limits("bench", &unlimited).await?;
    let (etcd, cluster) = (&stack.etcd, &stack.cluster);
    // One client address stands for many clients here: no per-address connection limit.
    let gw =
        GatewayProc::start("gw-bench", &etcd.client_urls, &cluster.secret_file, &["--max-connections-per-ip", "20000"])
            .await?;
    // A bare proxy in front of the leader, as a user would put one there: it adds what
    // every request to a datanode carries (the cluster secret, a route epoch) and nothing
    // else.
    let secret = cluster.secret.authorization().to_str()?.to_owned();
    let leader_addr = cluster.nodes[leader].data.trim_start_matches("http://").to_owned();
    let nginx = Nginx::start(&leader_addr, &[("Authorization", &secret), (ROUTE_EPOCH_HEADER, "0")]).await?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(nimbus_e2e::POOL_IDLE_TIMEOUT)
        .build()?;
    let path = "/v1/databases/bench/collections/kv";
    let bases = [
        format!("{}{path}", cluster.nodes[leader].data),
        format!("{}{path}", nginx.url),
        format!("{}{path}", gw.public),
    ];
    // Direct, the load generator is a Nimbus component; through the gateway, a tenant.
    let auth = [secret.clone(), String::new(), format!("Bearer {token}")];
    poll("the gateway to route", Duration::from_secs(10), || async {
        let r = http.get(format!("{}/v1/databases/bench/collections", gw.public)).header("authorization", &auth[2]);
        r.send().await.ok()?.status().is_success().then_some(())
    })
    .await?;
    let docs: Vec<_> = (0..PRELOADED).map(|i| json!({"_id": format!("p{i}"), "v": "x".repeat(200)})).collect();
    for chunk in docs.chunks(100) {
        let r = http.post(format!("{}/documents", bases[1])).json(&json!({"documents": chunk})).send().await?;
        r.error_for_status()?;
    }

    let op = |system: usize, run: u64| {
        let (http, base, auth) = (http.clone(), Arc::new(bases[system].clone()), Arc::new(auth[system].clone()));
        move |seq: u64| {
            let (http, base, auth) = (http.clone(), base.clone(), auth.clone());
            async move {
                let req = if seq.is_multiple_of(2) {
                    http.get(format!("{base}/documents/p{}", (seq * 7919) % PRELOADED))
                } else {
                    let id = format!("{run}-{seq}");
                    http.post(format!("{base}/documents"))
                        .header(IDEMPOTENCY_KEY_HEADER, format!("k-{id}"))
                        .json(&json!({"documents": [{"_id": id, "v": "x".repeat(200)}]}))
                };
                let req = match (system, auth.is_empty()) {
                    (_, true) => req,
                    // Straight to a datanode: the route epoch every request there carries.
                    (0, false) => req.header("authorization", auth.as_str()).header(ROUTE_EPOCH_HEADER, "0"),
                    (_, false) => req.header("authorization", auth.as_str()),
                };
                http_outcome(req.send().await).await
            }
        }
    };

    let mut report = Report::default();
    let admins = admin_urls(&stack.cluster);
    let mut elections = LeaderChanges::start(&admins).await?;
    // 1. The direct capacity.
    let mut capacity_runs = Vec::new();
    for round in 0..args.rounds {
        let run = op(0, 1000 + round as u64);
        let r = run_load(args.concurrency, Duration::from_secs(args.seconds), move |t, seq| run(seq * 1024 + t as u64))
            .await;
        r.warn_errors(&format!("capacity {round}"));
        elections.sample(&admins, 0).await?;
        capacity_runs.push(r);
    }
    let capacity = summarize(&mut report, "direct_capacity", &capacity_runs).ops_per_sec;
    if capacity < 10.0 {
        anyhow::bail!("the direct runs served {capacity:.0} ops/s: nothing to measure against");
    }
    let rate = capacity * args.load;

    // 2. Each system at the same offered load, in rotating order.
    let proxies = [Vec::new(), nginx.pids(), gw.pid().into_iter().collect::<Vec<_>>()];
    let mut runs: [Vec<RunResult>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut cpu_us: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut offered = Vec::new();
    for round in 0..args.rounds {
        for k in 0..3 {
            let system = (round + k) % 3;
            let before = cpu_time_of(&proxies[system]);
            let r = run_rate(rate, Duration::from_secs(args.seconds), 4096, op(system, (round * 3 + k) as u64)).await;
            let after = cpu_time_of(&proxies[system]);
            r.warn_errors(&format!("{} at {rate:.0}/s, round {round}", SYSTEMS[system]));
            elections.sample(&admins, 0).await?;
            // The requests sent (one the open loop could not send cost the proxy nothing).
            let requests = r.issued.max(1) as f64;
            cpu_us[system].push(after.saturating_sub(before).as_secs_f64() * 1e6 / requests);
            offered.push(r.offered_per_sec());
            runs[system].push(r);
        }
    }
    report.add("offered_ops_per_sec_half_load", median(&offered).round(), "ops/s");
    let mut p50 = [0.0; 3];
    for (system, name) in SYSTEMS.iter().enumerate() {
        let rs = &runs[system];
        p50[system] = median(&rs.iter().map(RunResult::p50_ms).collect::<Vec<_>>());
        report.add(format!("{name}_p50_ms_half_load"), p50[system], "ms");
        report.add(
            format!("{name}_p99_ms_half_load"),
            median(&rs.iter().map(RunResult::p99_ms).collect::<Vec<_>>()),
            "ms",
        );
        report.add(
            format!("{name}_served_ops_per_sec_half_load"),
            median(&rs.iter().map(RunResult::ops_per_sec).collect::<Vec<_>>()).round(),
            "ops/s",
        );
        report.add(format!("{name}_errors_half_load"), rs.iter().map(RunResult::errors).sum::<u64>() as f64, "errors");
    }
    for (system, name) in [(1, "nginx"), (2, "gateway")] {
        let v = &cpu_us[system];
        report.add(format!("{name}_cpu_us_per_request"), median(v), "us");
        report.add(format!("{name}_cpu_us_per_request_min"), v.iter().copied().fold(f64::MAX, f64::min), "us");
        report.add(format!("{name}_cpu_us_per_request_max"), v.iter().copied().fold(0.0, f64::max), "us");
    }
    elections.report(&mut report);
    report.add("gateway_vs_nginx_cpu_ratio", median(&cpu_us[2]) / median(&cpu_us[1]).max(1e-9), "x");
    report.add("nginx_added_p50_ms_half_load", p50[1] - p50[0], "ms");
    report.add("gateway_added_p50_ms_half_load", p50[2] - p50[0], "ms");
    report.write_json(&args.json)?;
    drop(nginx);
    drop(gw);
    drop(stack);
    Ok(())
}
