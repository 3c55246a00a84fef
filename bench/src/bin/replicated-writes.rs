//! `bench/replicated-writes`: a three-member datanode replica set against a three-member
//! etcd cluster, all on 127.0.0.1, both fsyncing before they acknowledge. The same load
//! generator drives both (same runtime, ~256-byte values), in turns, at concurrency 1, 16,
//! 64 and 256.
//!
//! Both systems get the same clients: `--connections` clients, each one HTTP/2 connection
//! (etcd's gRPC, the datanode's h2c), all to the leader. A put sent to an etcd follower
//! would be forwarded to the leader, a hop the datanode clients never pay; so before each
//! run the leader of each system is looked up again (etcd: the member every member's
//! `Status` names), and the clients follow it if it moved.
//!
//! Besides throughput and latency, it prints the failed requests of each system and
//! concurrency (`errors` sums the datanode's) and the elections that happened with nothing
//! killed (`unprovoked_leader_changes` for the datanodes, `etcd_leader_changes` for etcd):
//! a leader change under load alone fails requests a quiet replica set would have served.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nimbus_bench::{LeaderChanges, Report, RunResult, admin_urls, http_outcome, internal_headers, run_load, summarize};
use nimbus_e2e::etcd::EtcdCluster;
use nimbus_e2e::{Cluster, poll};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Runs per system and concurrency (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Client connections per system, all to its leader (HTTP/2 each: etcd's gRPC, the
    /// datanode's h2c).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const VALUE_BYTES: usize = 256;
const ETCD: usize = 0;
const DATANODE: usize = 1;

/// etcd's leader as its members see it.
struct EtcdLeader {
    /// The leader's client URL.
    url: String,
    /// The highest Raft term any member reported.
    term: u64,
}

/// Asks every member of the etcd cluster for its status; answers once all of them name
/// the same leader.
async fn etcd_leader(urls: &[String]) -> anyhow::Result<EtcdLeader> {
    poll("the etcd members to agree on a leader", Duration::from_secs(10), || async {
        let (mut leaders, mut ids, mut term) = (Vec::new(), Vec::new(), 0);
        for url in urls {
            let mut c = etcd_client::Client::connect([url], None).await.ok()?;
            let s = c.status().await.ok()?;
            ids.push((s.header()?.member_id(), url));
            leaders.push(s.leader());
            term = term.max(s.raft_term());
        }
        let leader = *leaders.first()?;
        if leader == 0 || leaders.iter().any(|l| *l != leader) {
            return None;
        }
        let url = ids.iter().find(|(id, _)| *id == leader)?.1.clone();
        Some(EtcdLeader { url, term })
    })
    .await
}

/// `n` etcd clients, each with one connection, to `url` only.
async fn etcd_clients(url: &str, n: usize) -> anyhow::Result<Arc<Vec<etcd_client::Client>>> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(etcd_client::Client::connect([url], None).await?);
    }
    Ok(Arc::new(clients))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::Builder::new().prefix("nimbus-bench-").tempdir()?;
    // Both stop when dropped, also when a step below fails.
    let mut etcd = EtcdCluster::start(3, tmp.path()).await?;
    let cluster = Cluster::start(3, &[]).await?;
    cluster.wait_leader(Duration::from_secs(10)).await?;
    let admins = admin_urls(&cluster);
    let mut elections = LeaderChanges::start(&admins).await?;
    let value = Arc::new("v".repeat(VALUE_BYTES));

    let etcd_start = etcd_leader(&etcd.client_urls).await?;
    eprintln!("etcd's leader: {} (term {})", etcd_start.url, etcd_start.term);
    let mut etcd_url = etcd_start.url.clone();
    let mut etcd_clients_now = etcd_clients(&etcd_url, args.connections).await?;
    // One h2c connection per client, as etcd's gRPC client has one HTTP/2 connection.
    let mut dn_clients = Vec::new();
    for _ in 0..args.connections {
        dn_clients.push(
            reqwest::Client::builder()
                .default_headers(internal_headers(&cluster.secret))
                .http2_prior_knowledge()
                .tcp_nodelay(true)
                .build()?,
        );
    }
    let dn_clients = Arc::new(dn_clients);

    let mut report = Report::default();
    let mut ratio_c64 = None;
    let mut datanode_errors = 0;
    let mut run_id = 0u64;
    for &c in &args.concurrency {
        let mut results: [Vec<RunResult>; 2] = [Vec::new(), Vec::new()];
        let mut dn_elections = 0;
        for round in 0..args.rounds {
            // Alternate which system goes first, so neither always runs on a warmer machine.
            let order = if round % 2 == 0 { [ETCD, DATANODE] } else { [DATANODE, ETCD] };
            for system in order {
                run_id += 1;
                let r = if system == ETCD {
                    let leader = etcd_leader(&etcd.client_urls).await?;
                    if leader.url != etcd_url {
                        eprintln!("etcd's leader moved to {}: the clients follow", leader.url);
                        etcd_clients_now = etcd_clients(&leader.url, args.connections).await?;
                        etcd_url = leader.url;
                    }
                    let (clients, value) = (etcd_clients_now.clone(), value.clone());
                    run_load(c, Duration::from_secs(args.seconds), move |t, seq| {
                        let mut kv = clients[t % clients.len()].kv_client();
                        let key = format!("bench/{run_id}/{t}/{seq}");
                        let value = value.clone();
                        async move { kv.put(key, value.as_bytes(), None).await.map(drop).map_err(|e| e.to_string()) }
                    })
                    .await
                } else {
                    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
                    let url = Arc::new(format!("{}/documents", cluster.coll_url(leader, "bench", "kv")));
                    let (clients, value) = (dn_clients.clone(), value.clone());
                    run_load(c, Duration::from_secs(args.seconds), move |t, seq| {
                        let client = clients[t % clients.len()].clone();
                        let body = json!({"documents": [{"_id": format!("{run_id}/{t}/{seq}"), "v": value.as_str()}]});
                        let url = url.clone();
                        async move { http_outcome(client.post(url.as_str()).json(&body).send().await).await }
                    })
                    .await
                };
                // Nothing is ever killed here: every election is unprovoked. Those while
                // the datanodes were idle (during etcd's runs) count in the total too.
                let changed = elections.sample(&admins, 0).await?;
                if system == DATANODE {
                    dn_elections += changed;
                }
                r.warn_errors(&run_id.to_string());
                results[system].push(r);
            }
        }
        let etcd_s = summarize(&mut report, &format!("etcd_c{c}"), &results[ETCD]);
        let dn = summarize(&mut report, &format!("datanode_c{c}"), &results[DATANODE]);
        // Failed requests, summed over the rounds (a failure is an event to count, not a
        // rate to take the median of).
        let errors = |rs: &[RunResult]| rs.iter().map(RunResult::errors).sum::<u64>();
        report.add(format!("etcd_c{c}_errors"), errors(&results[ETCD]) as f64, "count");
        report.add(format!("datanode_c{c}_errors"), errors(&results[DATANODE]) as f64, "count");
        datanode_errors += errors(&results[DATANODE]);
        // Elections during the datanode's runs at this concurrency, summed over the rounds.
        report.add(format!("datanode_c{c}_leader_changes"), dn_elections as f64, "count");
        if c == 64 {
            ratio_c64 = Some(dn.ops_per_sec / etcd_s.ops_per_sec);
            report.add("datanode_vs_etcd_p99_ratio_c64", dn.p99_ms / etcd_s.p99_ms, "x");
        }
    }
    let etcd_end = etcd_leader(&etcd.client_urls).await?;
    etcd.stop().await;
    drop(cluster);
    report.add("etcd_leader_changes", etcd_end.term.saturating_sub(etcd_start.term) as f64, "count");
    report.add("errors", datanode_errors as f64, "count");
    elections.report(&mut report);
    if let Some(r) = ratio_c64 {
        report.add("datanode_vs_etcd_throughput_ratio_c64", r, "x");
    }
    report.write_json(&args.json)?;
    Ok(())
}
