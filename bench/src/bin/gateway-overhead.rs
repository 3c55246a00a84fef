//! `bench/gateway-overhead`: the same load (concurrency 64, half reads by `_id`, half
//! inserts) straight to the datanode leader and through the gateway, in turns in one run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nimbus_api::etcd::{Limits, Tier, UserRole};
use nimbus_bench::{Report, RunResult, run_load, summarize};
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
    let gw = GatewayProc::start("gw-bench", &etcd.client_urls, &[]).await?;
    let http = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(256).build()?;
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
        http.post(format!("{direct}/documents")).json(&json!({"documents": chunk})).send().await?.error_for_status()?;
    }

    let mut report = Report::default();
    let mut results: [Vec<RunResult>; 2] = [Vec::new(), Vec::new()];
    let mut run = 0u64;
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for path in order {
            run += 1;
            let base = Arc::new(if path == 0 { direct.clone() } else { through.clone() });
            let (http, auth) = (http.clone(), Arc::new(auth.clone()));
            let r = run_load(args.concurrency, Duration::from_secs(args.seconds), move |t, seq| {
                let (http, base, auth) = (http.clone(), base.clone(), auth.clone());
                async move {
                    let req = if seq % 2 == 0 {
                        http.get(format!("{base}/documents/p{}", (t as u64 * 7919 + seq) % PRELOADED))
                    } else {
                        http.post(format!("{base}/documents"))
                            .json(&json!({"documents": [{"_id": format!("{run}-{t}-{seq}"), "v": "x".repeat(200)}]}))
                    };
                    req.header("authorization", auth.as_str()).send().await.is_ok_and(|r| r.status().is_success())
                }
            })
            .await;
            if r.errors > 0 {
                eprintln!("warning: {} errors in run {run}", r.errors);
            }
            results[path].push(r);
        }
    }
    let direct = summarize(&mut report, "direct", &results[0]);
    let gateway = summarize(&mut report, "gateway", &results[1]);
    report.add("gateway_added_p50_ms", gateway.p50_ms - direct.p50_ms, "ms");
    report.add("gateway_throughput_ratio", gateway.ops_per_sec / direct.ops_per_sec, "x");
    report.write_json(&args.json)?;
    drop(gw);
    drop(stack);
    Ok(())
}
