//! `bench/replicated-writes`: a three-member datanode replica set against a three-member
//! etcd cluster, all on 127.0.0.1, both fsyncing before they acknowledge. The same load
//! generator drives both (same runtime, same number of connections, ~256-byte values), in
//! turns, at concurrency 1, 16, 64 and 256.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nimbus_bench::{Report, RunResult, http_outcome, internal_headers, run_load, summarize};
use nimbus_e2e::Cluster;
use nimbus_e2e::etcd::EtcdCluster;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Runs per system and concurrency (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Client connections per system (HTTP/2 each: etcd's gRPC, the datanode's h2c).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const VALUE_BYTES: usize = 256;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::Builder::new().prefix("nimbus-bench-").tempdir()?;
    let mut etcd = EtcdCluster::start(3, tmp.path()).await?;
    let cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let value = "v".repeat(VALUE_BYTES);

    // One h2c connection per client, as etcd's gRPC client has one HTTP/2 connection.
    let mut dn_clients = Vec::new();
    let mut etcd_clients = Vec::new();
    for _ in 0..args.connections {
        dn_clients.push(
            reqwest::Client::builder()
                .default_headers(internal_headers(&cluster.secret))
                .http2_prior_knowledge()
                .tcp_nodelay(true)
                .build()?,
        );
        etcd_clients.push(etcd_client::Client::connect(etcd.client_urls.clone(), None).await?);
    }
    let dn_clients = Arc::new(dn_clients);
    let etcd_clients = Arc::new(etcd_clients);
    let url = Arc::new(format!("{}/documents", cluster.coll_url(leader, "bench", "kv")));
    let value = Arc::new(value);

    let mut report = Report::default();
    let mut ratio_c64 = None;
    let mut run_id = 0u64;
    for &c in &args.concurrency {
        let mut results: [Vec<RunResult>; 2] = [Vec::new(), Vec::new()];
        for round in 0..args.rounds {
            // Alternate which system goes first, so neither always runs on a warmer machine.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for system in order {
                run_id += 1;
                let r = if system == 0 {
                    let (clients, value) = (etcd_clients.clone(), value.clone());
                    run_load(c, Duration::from_secs(args.seconds), move |t, seq| {
                        let mut kv = clients[t % clients.len()].kv_client();
                        let key = format!("bench/{run_id}/{t}/{seq}");
                        let value = value.clone();
                        async move { kv.put(key, value.as_bytes(), None).await.map(drop).map_err(|e| e.to_string()) }
                    })
                    .await
                } else {
                    let (clients, url, value) = (dn_clients.clone(), url.clone(), value.clone());
                    run_load(c, Duration::from_secs(args.seconds), move |t, seq| {
                        let client = clients[t % clients.len()].clone();
                        let body = json!({"documents": [{"_id": format!("{run_id}/{t}/{seq}"), "v": value.as_str()}]});
                        let url = url.clone();
                        async move { http_outcome(client.post(url.as_str()).json(&body).send().await).await }
                    })
                    .await
                };
                r.warn_errors(&run_id.to_string());
                results[system].push(r);
            }
        }
        let etcd_s = summarize(&mut report, &format!("etcd_c{c}"), &results[0]);
        let dn = summarize(&mut report, &format!("datanode_c{c}"), &results[1]);
        if c == 64 {
            ratio_c64 = Some(dn.ops_per_sec / etcd_s.ops_per_sec);
            report.add("datanode_vs_etcd_p99_ratio_c64", dn.p99_ms / etcd_s.p99_ms, "x");
        }
    }
    etcd.stop().await;
    drop(cluster);
    if let Some(r) = ratio_c64 {
        report.add("datanode_vs_etcd_throughput_ratio_c64", r, "x");
    }
    report.write_json(&args.json)?;
    Ok(())
}
