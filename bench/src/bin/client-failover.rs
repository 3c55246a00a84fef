//! `bench/client-failover`: failover as an application sees it. The whole playground
//! (control plane, etcd, gateway, three zones); steady writes through the gateway at
//! concurrency 16, each with its own `Idempotency-Key` and sent once; `kill -9` the leader
//! five times, letting the control plane restart it each time. Prints the client-visible
//! errors (goal 0) and, last, `client_write_stall_ms_p100`: the longest any write waited
//! (goal under 2000 ms). Afterwards every acknowledged write is checked present, once.
//!
//! Unlike `bench/failover`, nothing here asks which member answered or when a write was
//! sent: each write's figure is its own latency, from when the application sent it to when
//! the gateway answered it. An answer the killed leader gave just before it died (still in
//! a socket buffer) makes that one write fast and leaves the others' waits as they were,
//! so it cannot shorten the longest stall or hide an error.
//!
//! Also prints `unprovoked_leader_changes`, from the datanodes' Raft terms: elections
//! beyond the one each kill provokes (a second round of voting, an election when the
//! restarted member comes back) and any while writes flow between kills.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nimbus_bench::{LeaderChanges, Report, median};
use nimbus_e2e::playground::{Playground, all_running, kill9, ready};
use nimbus_e2e::workload::{self, Writers};
use nimbus_e2e::{DataClient, poll};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    kills: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Writes answered between the recovery from one kill and the next kill.
    #[arg(long, default_value_t = 2_000)]
    writes_between: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A dedicated-tier instance: the benchmark measures failover, not the QPS limit.
const INSTANCE: &str = "apiVersion: nimbus.io/v1alpha1
kind: DatabaseInstance
metadata:
  name: bench
spec:
  tier: dedicated
  replicas: 3
  users:
    - name: app
      role: readWrite
";

const RECOVERY: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut manifest = tempfile::Builder::new().suffix(".yaml").tempfile()?;
    // `nimbus playground down` runs when `pg` is dropped, also when a step below fails.
    manifest.write_all(INSTANCE.as_bytes())?;
    let path = manifest.path().to_str().unwrap_or_default().to_owned();
    let pg = tokio::task::spawn_blocking(move || Playground::up(&["--instances", &path])).await??;
    let client = DataClient::new();
    let (gw, token) = (pg.gateway()?, pg.token("bench")?);
    workload::prepare(&client, &gw, "bench", &token).await?;
    let writers = Writers::start(&client, &gw, "bench", &token, args.concurrency);
    let mut elections = LeaderChanges::start(&admin_urls(&pg)?).await?;
    writers.wait_for(args.writes_between, RECOVERY).await?;

    let mut stalls_ms = Vec::new();
    let (mut steady_elections, mut kill_elections) = (0, 0);
    for kill in 1..=args.kills {
        let (leader, _) = pg.leader(&client.http).await.ok_or_else(|| anyhow::anyhow!("no leader"))?;
        let pid = leader["pid"].as_u64().unwrap_or_default() as u32;
        // Writes flowing, nothing killed since the last sample.
        steady_elections += elections.sample(&admin_urls(&pg)?, 0).await?;
        writers.take_max_latency_us();
        kill9(pid)?;
        poll("a leader after the kill", RECOVERY, || async {
            pg.leader(&client.http).await.filter(|(d, _)| d["pid"].as_u64().is_some_and(|p| p as u32 != pid))
        })
        .await?;
        // The killed member back and Ready, and steady writes again.
        poll("every member running and Ready", RECOVERY, || async {
            pg.json().ok().filter(|v| ready(v) && all_running(v))
        })
        .await?;
        // From the kill until the killed member is back: the kill provokes one election, or
        // none when the control plane restarts the member before the others' election
        // timeout and it resumes leading in its own term (openraft keeps a leader's
        // committed vote across a restart).
        kill_elections += elections.sample(&admin_urls(&pg)?, 1).await?;
        writers.wait_for(args.writes_between, RECOVERY).await?;
        let stall = writers.take_max_latency_us() as f64 / 1000.0;
        eprintln!(
            "kill {kill}: leader {} (zone {}) killed; longest write {stall:.1} ms; term now {}",
            leader["id"],
            leader["zone"],
            elections.term()
        );
        stalls_ms.push(stall);
    }
    let report = writers.stop().await?;
    steady_elections += elections.sample(&admin_urls(&pg)?, 0).await?;
    workload::verify(&client, &gw, "bench", &token, &report).await?;
    for e in report.errors.iter().take(5) {
        eprintln!("client-visible error: {e}");
    }

    let mut out = Report::default();
    out.add("writes_acknowledged", (report.inserted.len() as u64 + report.increments) as f64, "writes");
    out.add("client_write_p50_ms", workload::quantile(&report.latencies_us, 0.5) as f64 / 1000.0, "ms");
    out.add("client_write_p99_ms", workload::quantile(&report.latencies_us, 0.99) as f64 / 1000.0, "ms");
    // The longest write around each kill: median and spread over the kills.
    out.add("kill_stall_ms_median", median(&stalls_ms), "ms");
    out.add("kill_stall_ms_min", stalls_ms.iter().copied().fold(f64::INFINITY, f64::min), "ms");
    out.add("kill_stall_ms_max", stalls_ms.iter().copied().fold(0.0, f64::max), "ms");
    out.add("unprovoked_leader_changes_steady", steady_elections as f64, "count");
    out.add("unprovoked_leader_changes_around_kills", kill_elections as f64, "count");
    elections.report(&mut out);
    out.add("client_visible_errors", report.errors.len() as f64, "errors");
    out.add("client_write_stall_ms_p100", workload::quantile(&report.latencies_us, 1.0) as f64 / 1000.0, "ms");
    out.write_json(&args.json)?;
    drop(pg);
    Ok(())
}

/// The admin API addresses of the instance's datanodes, as `playground.json` lists them now.
fn admin_urls(pg: &Playground) -> anyhow::Result<Vec<String>> {
    let v = pg.json()?;
    let rs = &v["instances"]["bench"]["replicaSet"];
    let members = v["datanodes"].as_array().into_iter().flatten().filter(|d| &d["replicaSet"] == rs);
    Ok(members.filter_map(|d| d["admin"].as_str().map(str::to_owned)).collect())
}
