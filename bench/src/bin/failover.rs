//! `bench/failover`: steady writes at concurrency 16 against a three-member replica set;
//! `kill -9` the leader; the time from the kill until writes succeed again. Five trials;
//! the killed member is restarted and caught up between trials.
//!
//! Only a write that was sent after the kill and answered by another member counts as the
//! first write after it: an answer the killed leader gave before it died, still in a socket
//! buffer, is not a recovery. Also prints `unprovoked_leader_changes`: elections beyond the
//! one each kill provokes (a second round of voting after the kill, an election when the
//! killed member comes back) and any during the steady writes between kills.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use nimbus_bench::{LeaderChanges, Report, admin_urls, internal_headers, median};
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

/// The kill being measured: which member, and when (microseconds since the benchmark's
/// epoch, taken just before the signal).
#[derive(Clone, Copy)]
struct Kill {
    member: usize,
    at_us: u64,
}

/// What the writers share with the trial loop.
#[derive(Default)]
struct Shared {
    /// Set while a kill is being measured.
    kill: Mutex<Option<Kill>>,
    /// When the first write that proves recovery was acknowledged (0: not yet).
    first_ack_us: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    /// Records the acknowledgement of a write sent at `sent_us` to member `target`, if it
    /// is the first one after the kill that only a new leader can have given: sent after
    /// the kill, answered by a member other than the killed one.
    fn acknowledged(&self, target: usize, sent_us: u64, now_us: u64) {
        let kill = *self.kill.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = kill
            && target != k.member
            && sent_us >= k.at_us
        {
            let _ = self.first_ack_us.compare_exchange(0, now_us, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn set_kill(&self, kill: Option<Kill>) {
        *self.kill.lock().unwrap_or_else(|p| p.into_inner()) = kill;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Every member stops when `cluster` is dropped, also when a step below fails.
    let mut cluster = Cluster::start(3, &[]).await?;
    let members: Arc<Vec<String>> = Arc::new(cluster.nodes.iter().map(|d| d.data.clone()).collect());
    let admins = admin_urls(&cluster);
    let epoch = Instant::now();
    let shared = Arc::new(Shared::default());
    let client = reqwest::Client::builder()
        .default_headers(internal_headers(&cluster.secret))
        .timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .build()?;
    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let (client, members, shared) = (client.clone(), members.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let mut target = t % members.len();
            let mut seq = 0u64;
            while !shared.stop.load(Ordering::Relaxed) {
                let key = format!("{t}-{seq}");
                let url = format!("{}/v1/databases/bench/collections/f/documents", members[target]);
                let body = json!({"documents": [{"_id": key, "v": "x".repeat(100)}]});
                let sent_us = epoch.elapsed().as_micros() as u64;
                match client.post(&url).header("idempotency-key", &key).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        shared.acknowledged(target, sent_us, epoch.elapsed().as_micros() as u64);
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
    cluster.wait_leader(Duration::from_secs(20)).await?;
    let mut elections = LeaderChanges::start(&admins).await?;
    let (mut steady_elections, mut kill_elections) = (0, 0);
    for trial in 1..=args.trials {
        let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
        // Steady state first: writes flowing for a second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Since the last trial's member caught up: steady writes, nothing killed.
        steady_elections += elections.sample(&admins, 0).await?;
        shared.first_ack_us.store(0, Ordering::Release);
        let killed_at = epoch.elapsed().as_micros() as u64;
        shared.set_kill(Some(Kill { member: leader, at_us: killed_at }));
        cluster.nodes[leader].kill().await;
        let first = poll("writes to succeed after the kill", Duration::from_secs(30), || async {
            let t = shared.first_ack_us.load(Ordering::Acquire);
            (t > 0).then_some(t)
        })
        .await?;
        shared.set_kill(None);
        // From the kill to the first write acknowledged by the new leader.
        let gap_ms = (first - killed_at) as f64 / 1000.0;
        report.add(format!("trial_{trial}_write_unavailability_ms"), gap_ms, "ms");
        gaps.push(gap_ms);
        cluster.nodes[leader].restart().await?;
        let new_leader = cluster.wait_leader(Duration::from_secs(20)).await?;
        let applied = cluster.status(new_leader).await.map(|s| s.applied_index).unwrap_or(0);
        cluster.wait_applied(leader, applied, Duration::from_secs(30)).await?;
        // From the kill until the killed member caught up: the kill provokes one election.
        kill_elections += elections.sample(&admins, 1).await?;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    report.add("write_unavailability_ms_min", gaps.iter().copied().fold(f64::MAX, f64::min), "ms");
    report.add("write_unavailability_ms_max", gaps.iter().copied().fold(0.0, f64::max), "ms");
    report.add("unprovoked_leader_changes_steady", steady_elections as f64, "count");
    report.add("unprovoked_leader_changes_around_kills", kill_elections as f64, "count");
    elections.report(&mut report);
    report.add("write_unavailability_ms_median", median(&gaps), "ms");
    report.write_json(&args.json)?;
    Ok(())
}
