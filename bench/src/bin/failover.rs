//! `bench/failover`: steady writes at concurrency 16 against a three-member replica set;
//! `kill -9` the leader; the time from the kill until writes succeed again. Five trials;
//! the killed member is restarted and caught up between trials.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nimbus_bench::{Report, internal_headers, median};
use nimbus_e2e::{Cluster, poll};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    trials: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cluster = Cluster::start(3, &[]).await?;
    let members: Arc<Vec<String>> = Arc::new(cluster.nodes.iter().map(|d| d.data.clone()).collect());
    let epoch = Instant::now();
    // Microseconds since `epoch`: when the killed leader was confirmed gone, and the first
    // acknowledgement after that (which only a new leader can have given).
    let dead_at = Arc::new(AtomicU64::new(u64::MAX));
    let first_ack_after = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .default_headers(internal_headers(&cluster.secret))
        .timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .build()?;
    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let (client, members, stop) = (client.clone(), members.clone(), stop.clone());
        let (dead_at, first_ack_after) = (dead_at.clone(), first_ack_after.clone());
        tasks.push(tokio::spawn(async move {
            let mut target = t % members.len();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("{t}-{seq}");
                let url = format!("{}/v1/databases/bench/collections/f/documents", members[target]);
                let body = json!({"documents": [{"_id": key, "v": "x".repeat(100)}]});
                match client.post(&url).header("idempotency-key", &key).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        let now = epoch.elapsed().as_micros() as u64;
                        if now > dead_at.load(Ordering::Acquire) {
                            let _ = first_ack_after.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
                        }
                        seq += 1;
                    }
                    Ok(r) if r.status().as_u16() == 421 => {
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        let hint =
                            v["error"]["leader"]["dataAddr"].as_str().and_then(|a| members.iter().position(|m| m == a));
                        target = hint.unwrap_or((target + 1) % members.len());
                    }
                    _ => {
                        target = (target + 1) % members.len();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    let mut report = Report::default();
    let mut gaps = Vec::new();
    for trial in 1..=args.trials {
        let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
        // Steady state first: writes flowing for a second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        first_ack_after.store(0, Ordering::Release);
        let killed_at = epoch.elapsed().as_micros() as u64;
        cluster.nodes[leader].kill().await;
        dead_at.store(epoch.elapsed().as_micros() as u64, Ordering::Release);
        let first = poll("writes to succeed after the kill", Duration::from_secs(30), || async {
            let t = first_ack_after.load(Ordering::Acquire);
            (t > 0).then_some(t)
        })
        .await?;
        dead_at.store(u64::MAX, Ordering::Release);
        // From the kill to the first write acknowledged by the new leader.
        let gap_ms = (first - killed_at) as f64 / 1000.0;
        report.add(format!("trial_{trial}_write_unavailability_ms"), gap_ms, "ms");
        gaps.push(gap_ms);
        cluster.nodes[leader].restart().await?;
        let new_leader = cluster.wait_leader(Duration::from_secs(20)).await?;
        let applied = cluster.status(new_leader).await.map(|s| s.applied_index).unwrap_or(0);
        cluster.wait_applied(leader, applied, Duration::from_secs(30)).await?;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    report.add("write_unavailability_ms_min", gaps.iter().copied().fold(f64::MAX, f64::min), "ms");
    report.add("write_unavailability_ms_max", gaps.iter().copied().fold(0.0, f64::max), "ms");
    report.add("write_unavailability_ms_median", median(&gaps), "ms");
    report.write_json(&args.json)?;
    Ok(())
}
