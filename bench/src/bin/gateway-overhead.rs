//! `bench/gateway-overhead`: the same load (concurrency 64, half reads by `_id`, half
//! inserts) straight to the datanode leader and through the gateway, in turns in one run;
//! before it, one client at a time, for the hop's own latency. Also prints the CPU each
//! process spends per operation: on a machine where the load saturates every core, the
//! throughput ratio is the ratio of CPU per operation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nimbus_api::data::IDEMPOTENCY_KEY_HEADER;
use nimbus_api::etcd::{Limits, Tier, UserRole};
use nimbus_bench::{Report, RunResult, cpu_time_of, http_outcome, median, run_load, summarize};
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::poll;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Whether the clients send an Idempotency-Key with each write (API.md asks clients to, for
    /// safe retries). Without one the gateway makes one, and the datanodes then keep an
    /// idempotency record for gateway writes but not for direct ones.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    idempotency_keys: bool,
}

const PRELOADED: u64 = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut stack = Stack::start(3, &["bench"]).await?;
    let (etcd, cluster, control) = (&stack.etcd, &stack.cluster, &mut stack.control);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let token = control.user("bench", "app", UserRole::ReadWrite).await?;
    // Limits far above the load: this measures the gateway's cost, not its limiter.
    let unlimited = Limits {
        tier: Tier::Dedicated,
        qps: 1_000_000,
        burst: 1_000_000,
        max_connections: 100_000,
        max_in_flight: 100_000,
    };
    control.limits("bench", &unlimited).await?;
    let gw = GatewayProc::start("gw-bench", &etcd.client_urls, &cluster.secret_file, &[]).await?;
    // Straight to the leader, the load generator is another Nimbus component: the cluster
    // secret and a route epoch on every request (the gateway ignores the epoch header).
    let mut defaults = reqwest::header::HeaderMap::new();
    defaults.insert(nimbus_api::data::ROUTE_EPOCH_HEADER, reqwest::header::HeaderValue::from_static("0"));
    let http =
        reqwest::Client::builder().default_headers(defaults).tcp_nodelay(true).pool_max_idle_per_host(256).build()?;
    let internal_auth = cluster.secret.authorization().to_str()?.to_owned();
    let direct = format!("{}/v1/databases/bench/collections/kv", cluster.nodes[leader].data);
    let through = format!("{}/v1/databases/bench/collections/kv", gw.public);
    let auth = format!("Bearer {token}");
    poll("the gateway to route", Duration::from_secs(10), || async {
        let r = http
            .get(format!("{}/v1/databases/bench/collections", gw.public))
            .header("authorization", &auth)
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await?;
    let docs: Vec<_> = (0..PRELOADED).map(|i| json!({"_id": format!("p{i}"), "v": "x".repeat(200)})).collect();
    for chunk in docs.chunks(100) {
        http.post(format!("{direct}/documents"))
            .header("authorization", &internal_auth)
            .json(&json!({"documents": chunk}))
            .send()
            .await?
            .error_for_status()?;
    }

    let mut report = Report::default();
    let mut results: [Vec<RunResult>; 2] = [Vec::new(), Vec::new()];
    // CPU per operation of [gateway, datanodes, load generator], per path and run.
    let mut cpu: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    let groups = [
        gw.pid().into_iter().collect::<Vec<_>>(),
        cluster.nodes.iter().filter_map(|n| n.pid()).collect(),
        vec![std::process::id()],
    ];
    // First one client at a time (the hop's own latency, nothing queued), then the load.
    let mut unloaded: [Vec<RunResult>; 2] = [Vec::new(), Vec::new()];
    let mut run = 0u64;
    for (round, concurrency) in
        std::iter::repeat_n(1, args.rounds).chain(std::iter::repeat_n(args.concurrency, args.rounds)).enumerate()
    {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for path in order {
            run += 1;
            let base = Arc::new(if path == 0 { direct.clone() } else { through.clone() });
            let auth = if path == 0 { internal_auth.clone() } else { auth.clone() };
            let (http, auth, keyed) = (http.clone(), Arc::new(auth), args.idempotency_keys);
            let before = groups.each_ref().map(|g| cpu_time_of(g));
            let r = run_load(concurrency, Duration::from_secs(args.seconds), move |t, seq| {
                let (http, base, auth) = (http.clone(), base.clone(), auth.clone());
                async move {
                    let req = if seq % 2 == 0 {
                        http.get(format!("{base}/documents/p{}", (t as u64 * 7919 + seq) % PRELOADED))
                    } else {
                        let id = format!("{run}-{t}-{seq}");
                        let req = http.post(format!("{base}/documents"));
                        let req = if keyed { req.header(IDEMPOTENCY_KEY_HEADER, format!("k-{id}")) } else { req };
                        req.json(&json!({"documents": [{"_id": id, "v": "x".repeat(200)}]}))
                    };
                    http_outcome(req.header("authorization", auth.as_str()).send().await).await
                }
            })
            .await;
            r.warn_errors(&format!("{run} ({}, concurrency {concurrency})", ["direct", "gateway"][path]));
            if concurrency == 1 {
                unloaded[path].push(r);
                continue;
            }
            let after = groups.each_ref().map(|g| cpu_time_of(g));
            let per_op =
                |i: usize| after[i].saturating_sub(before[i]).as_secs_f64() * 1e6 / (r.ops + r.errors()).max(1) as f64;
            cpu[path].push([per_op(0), per_op(1), per_op(2)]);
            results[path].push(r);
        }
    }
    let direct_c1 = summarize(&mut report, "direct_c1", &unloaded[0]);
    let gateway_c1 = summarize(&mut report, "gateway_c1", &unloaded[1]);
    report.add("gateway_added_p50_ms_c1", gateway_c1.p50_ms - direct_c1.p50_ms, "ms");
    let direct = summarize(&mut report, "direct", &results[0]);
    let gateway = summarize(&mut report, "gateway", &results[1]);
    // Where the CPU goes (µs of CPU per operation, medians over the runs): the machine is
    // CPU-bound, so throughput follows the sum.
    let cpu_median = |path: usize, i: usize| median(&cpu[path].iter().map(|c| c[i]).collect::<Vec<_>>());
    report.add("direct_datanodes_cpu_us_per_op", cpu_median(0, 1), "us");
    report.add("direct_client_cpu_us_per_op", cpu_median(0, 2), "us");
    report.add("gateway_gateway_cpu_us_per_op", cpu_median(1, 0), "us");
    report.add("gateway_datanodes_cpu_us_per_op", cpu_median(1, 1), "us");
    report.add("gateway_client_cpu_us_per_op", cpu_median(1, 2), "us");
    report.add("gateway_added_p50_ms", gateway.p50_ms - direct.p50_ms, "ms");
    report.add("gateway_throughput_ratio", gateway.ops_per_sec / direct.ops_per_sec, "x");
    report.write_json(&args.json)?;
    drop(gw);
    drop(stack);
    Ok(())
}
