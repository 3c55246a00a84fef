//! `bench/index-build`: what building an index on a large collection costs the other
//! tenants of its replica set. A three-member replica set; tenant A's collection is loaded
//! with `--docs` documents of ~100 bytes; tenant B (another database on the same replica
//! set) runs at a fixed offered rate, point reads and single inserts (half and half by
//! default), first alone (the baseline) and then while tenant A builds an index on the
//! loaded field, until the index is ready. The headline is tenant B's p99 during the build
//! over its p99 before it. Nothing is killed, so every Raft term increase during the run is
//! an unprovoked election.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use nimbus_bench::{Report, RunResult, http_outcome, internal_headers, median, run_rate_until};
use nimbus_e2e::Cluster;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Documents in tenant A's collection when the index build starts.
    #[arg(long, default_value_t = 1_000_000)]
    docs: u64,
    /// Documents per insert while loading.
    #[arg(long, default_value_t = 1_000)]
    batch: u64,
    /// Inserts in flight while loading.
    #[arg(long, default_value_t = 8)]
    load_concurrency: usize,
    /// Tenant B's offered rate, requests per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Percent of tenant B's requests that are point reads (the rest are single inserts).
    #[arg(long, default_value_t = 50)]
    read_percent: u64,
    /// Seconds of tenant B's load alone, before the build (the baseline).
    #[arg(long, default_value_t = 20)]
    baseline_seconds: u64,
    /// Builds of the index (dropped between them); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Give up when the index is not ready after this many seconds.
    #[arg(long, default_value_t = 3600)]
    build_timeout_seconds: u64,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const DB_A: &str = "tenant-a";
const COLL_A: &str = "items";
const DB_B: &str = "tenant-b";
const COLL_B: &str = "orders";
/// The indexed field of tenant A's documents: document `i` has `group: i % GROUPS`.
const FIELD: &str = "group";
const GROUPS: u64 = 1_000;
/// The index on [`FIELD`].
const INDEX: &str = "group_1";
/// The group the final query asks for.
const PROBE_GROUP: u64 = 7;
/// Tenant B's documents loaded before the baseline, which its point reads read.
const B_DOCS: u64 = 10_000;
/// Tenant B's requests unanswered before a due one counts as an `overload` error.
const MAX_IN_FLIGHT: usize = 512;
/// Time for the members to settle after loading (flushes, compactions) before the baseline.
const SETTLE: Duration = Duration::from_secs(5);
/// How often the build's state is polled.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Padding that makes a document about 100 bytes of JSON.
const PAD: &str = "the quick brown fox jumps over the lazy dog, again and again";

/// Where the replica set is, and which member is the leader as far as the clients know
/// (updated from the leader hints of 421 answers).
struct Members {
    data: Vec<String>,
    leader: AtomicUsize,
}

impl Members {
    fn leader_url(&self) -> &str {
        &self.data[self.leader.load(Ordering::Relaxed) % self.data.len()]
    }

    fn coll_url(&self, db: &str, coll: &str) -> String {
        format!("{}/v1/databases/{db}/collections/{coll}", self.leader_url())
    }

    /// Follows a 421's leader hint, or tries the next member.
    fn follow(&self, body: &Value) {
        let hint = body["error"]["leader"]["dataAddr"].as_str().and_then(|a| self.data.iter().position(|m| m == a));
        let next = hint.unwrap_or_else(|| (self.leader.load(Ordering::Relaxed) + 1) % self.data.len());
        self.leader.store(next, Ordering::Relaxed);
    }

    /// What a load run counts of an answer; a 421 is an error, and moves to the leader.
    async fn outcome(&self, r: Result<reqwest::Response, reqwest::Error>) -> Result<(), String> {
        match r {
            Ok(r) if r.status().as_u16() == 421 => {
                self.follow(&r.json().await.unwrap_or_default());
                Err("421 NotLeader".into())
            }
            other => http_outcome(other).await,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The cluster's processes are killed when it is dropped: on an error, a panic, or here
    // when the run is interrupted (Ctrl-C, SIGTERM).
    tokio::select! {
        r = run(args) => r,
        () = interrupted() => bail!("interrupted"),
    }
}

async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    let first_term = max_term(&cluster).await;
    let members = Arc::new(Members {
        data: cluster.nodes.iter().map(|d| d.data.clone()).collect(),
        leader: AtomicUsize::new(leader),
    });
    let client = reqwest::Client::builder()
        .default_headers(internal_headers(&cluster.secret))
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()?;
    let mut report = Report::default();

    // Tenant A's collection, in large batches.
    let started = Instant::now();
    let loader = Loader {
        client: client.clone(),
        members: members.clone(),
        batch: args.batch,
        concurrency: args.load_concurrency,
    };
    loader.insert_all(DB_A, COLL_A, args.docs, doc_a).await?;
    let load = started.elapsed();
    report.add("load_docs", args.docs as f64, "docs");
    report.add("load_seconds", load.as_secs_f64(), "s");
    report.add("load_docs_per_sec", (args.docs as f64 / load.as_secs_f64()).round(), "docs/s");
    // Tenant B's documents, for its point reads.
    loader.insert_all(DB_B, COLL_B, B_DOCS, doc_b).await?;
    settle(&cluster).await?;

    // Rounds of: tenant B alone, then tenant B while tenant A builds the index (dropped
    // again between rounds). Medians over the rounds: a compile elsewhere on the machine
    // moves one round's figures, not the median.
    let mut rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        if round > 1 {
            drop_index(&cluster, &members).await?;
            settle(&cluster).await?;
        }
        let r = one_round(&args, &cluster, &client, &members, round).await?;
        report.add(format!("round_{round}_other_tenant_p99_ms_before"), r.before.p99_ms(), "ms");
        report.add(format!("round_{round}_other_tenant_p99_ms_during"), r.during.p99_ms(), "ms");
        report.add(format!("round_{round}_index_build_seconds"), r.build.as_secs_f64(), "s");
        report.add(format!("round_{round}_other_tenant_p99_ratio_during_build"), ratio(&r.during, &r.before), "x");
        rounds.push(r);
    }

    // The index answers a query on its field.
    let (steps, step_seconds) = build_steps(&cluster, &members).await;
    let plan = check_index_used(&cluster, &members, args.docs).await?;
    eprintln!("index-build: the query on {FIELD} ran as {plan}");
    let last_term = max_term(&cluster).await;

    let med = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let build_seconds = med(&|r| r.build.as_secs_f64());
    report.add("other_tenant_offered_per_sec", med(&|r| r.during.offered_per_sec()).round(), "req/s");
    report.add("other_tenant_p50_ms_before", med(&|r| r.before.p50_ms()), "ms");
    report.add("other_tenant_p99_ms_before", med(&|r| r.before.p99_ms()), "ms");
    report.add("other_tenant_errors_before", rounds.iter().map(|r| r.before.errors()).sum::<u64>() as f64, "errors");
    report.add("other_tenant_p50_ms_during", med(&|r| r.during.p50_ms()), "ms");
    report.add("other_tenant_p99_ms_during", med(&|r| r.during.p99_ms()), "ms");
    report.add("index_build_seconds", build_seconds, "s");
    report.add("index_build_docs_per_sec", (args.docs as f64 / build_seconds).round(), "docs/s");
    report.add("index_build_steps", (steps / rounds.len() as f64).round(), "steps");
    report.add("index_build_step_ms_mean", step_seconds * 1000.0 / steps.max(1.0), "ms");
    report.add("unprovoked_leader_changes", last_term.saturating_sub(first_term) as f64, "elections");
    report.add("other_tenant_errors", rounds.iter().map(|r| r.during.errors()).sum::<u64>() as f64, "errors");
    report.add("other_tenant_p99_ratio_during_build", med(&|r| ratio(&r.during, &r.before)), "x");
    report.write_json(&args.json)?;
    drop(cluster);
    Ok(())
}

/// Tenant B's latencies alone and during one build, and how long the build took.
struct Round {
    before: RunResult,
    during: RunResult,
    build: Duration,
}

async fn one_round(
    args: &Args,
    cluster: &Cluster,
    client: &reqwest::Client,
    members: &Arc<Members>,
    round: usize,
) -> anyhow::Result<Round> {
    // Tenant B alone.
    let before = run_rate_until(
        args.rate,
        Some(Duration::from_secs(args.baseline_seconds)),
        std::future::pending(),
        MAX_IN_FLIGHT,
        tenant_b(client, members, format!("r{round}-before"), args.read_percent),
    )
    .await;
    before.warn_errors(&format!("{round} before"));

    // Tenant B while tenant A builds the index, until it is ready.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let during = tokio::spawn(run_rate_until(
        args.rate,
        None,
        async {
            let _ = ready_rx.await;
        },
        MAX_IN_FLIGHT,
        tenant_b(client, members, format!("r{round}-during"), args.read_percent),
    ));
    let started = Instant::now();
    let name = create_index(cluster, members).await?;
    wait_ready(cluster, members, &name, Duration::from_secs(args.build_timeout_seconds)).await?;
    let build = started.elapsed();
    let _ = ready_tx.send(());
    let during = during.await?;
    during.warn_errors(&format!("{round} during"));
    Ok(Round { before, during, build })
}

/// Tenant A's document `i`: about 100 bytes of JSON, `group` the indexed field.
fn doc_a(i: u64) -> Value {
    json!({"_id": format!("a{i:09}"), FIELD: i % GROUPS, "pad": PAD})
}

fn doc_b(i: u64) -> Value {
    json!({"_id": format!("b{i:09}"), "qty": i % 100, "pad": PAD})
}

/// Inserts documents in large batches, several at a time.
struct Loader {
    client: reqwest::Client,
    members: Arc<Members>,
    batch: u64,
    concurrency: usize,
}

impl Loader {
    /// Inserts documents `0..total` of `make` into `db.coll`; a failed batch is sent again
    /// with the same idempotency key.
    async fn insert_all(
        &self,
        db: &'static str,
        coll: &'static str,
        total: u64,
        make: fn(u64) -> Value,
    ) -> anyhow::Result<()> {
        let batch = self.batch.max(1);
        let batches = total.div_ceil(batch);
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..self.concurrency.max(1) {
            let (client, members, next) = (self.client.clone(), self.members.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return Ok(());
                    }
                    let docs: Vec<Value> = (b * batch..((b + 1) * batch).min(total)).map(make).collect();
                    let body = json!({ "documents": docs });
                    let key = format!("load-{db}-{b}");
                    let mut outcome = Err(String::new());
                    for attempt in 0..20 {
                        if attempt > 0 {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        let url = format!("{}/documents", members.coll_url(db, coll));
                        let r = client.post(&url).header("idempotency-key", &key).json(&body).send().await;
                        outcome = members.outcome(r).await;
                        if outcome.is_ok() {
                            break;
                        }
                    }
                    let Err(last) = outcome else { continue };
                    anyhow::bail!("failed to insert batch {b} into {db}.{coll}: {last}");
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    }
}

/// Waits until every member has applied all the leader has, then a little longer for the
/// flushes and compactions that a large load leaves behind.
async fn settle(cluster: &Cluster) -> anyhow::Result<()> {
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    let target = cluster.status(leader).await.map(|s| s.commit_index).unwrap_or(0);
    for i in 0..cluster.nodes.len() {
        cluster.wait_applied(i, target, Duration::from_secs(120)).await?;
    }
    tokio::time::sleep(SETTLE).await;
    Ok(())
}

/// Tenant B's request number `seq`: a point read of one of its documents (`read_percent`
/// of them), or an insert of one new document (ids prefixed by `phase`, so each phase inserts new ones).
fn tenant_b(
    client: &reqwest::Client,
    members: &Arc<Members>,
    phase: String,
    read_percent: u64,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> + Send + Sync + 'static
{
    let (client, members, phase) = (client.clone(), members.clone(), Arc::new(phase));
    move |seq| {
        let (client, members, phase) = (client.clone(), members.clone(), phase.clone());
        Box::pin(async move {
            let url = members.coll_url(DB_B, COLL_B);
            // Reads and inserts spread evenly: request seq is a read when the running
            // count of reads steps up at it.
            let is_read = (seq + 1) * read_percent / 100 > seq * read_percent / 100;
            let r = if is_read {
                // Spread the reads over the documents: a multiplicative hash of seq.
                let id = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) % B_DOCS;
                client.get(format!("{url}/documents/b{id:09}")).send().await
            } else {
                let doc = json!({"_id": format!("{phase}-{seq}"), "qty": seq % 100, "pad": PAD});
                client.post(format!("{url}/documents")).json(&json!({ "documents": [doc] })).send().await
            };
            members.outcome(r).await
        })
    }
}

/// Asks for the index on tenant A's field; it should answer 202, building.
async fn create_index(cluster: &Cluster, members: &Members) -> anyhow::Result<String> {
    let url = format!("{}/indexes", members.coll_url(DB_A, COLL_A));
    let (st, body) = cluster.client.post(&url, &json!({"keys": {FIELD: 1}, "name": INDEX})).await;
    match st {
        202 => {}
        200 => eprintln!("warning: the index was ready before the write timeout (200, not 202): a short build"),
        _ => bail!("create index answered {st}: {body}"),
    }
    body["name"].as_str().map(str::to_owned).with_context(|| format!("no index name in {body}"))
}

/// Drops the index on tenant A's field, for the next round to build it again.
async fn drop_index(cluster: &Cluster, members: &Members) -> anyhow::Result<()> {
    let url = format!("{}/indexes/{INDEX}", members.coll_url(DB_A, COLL_A));
    let (st, body) = cluster.client.call(reqwest::Method::DELETE, &url, None, &[]).await;
    if st != 200 {
        bail!("drop index answered {st}: {body}");
    }
    Ok(())
}

/// Polls the list of indexes until `name` is ready.
async fn wait_ready(cluster: &Cluster, members: &Members, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let url = format!("{}/indexes", members.coll_url(DB_A, COLL_A));
    let deadline = Instant::now() + timeout;
    loop {
        let (st, body) = cluster.client.get(&url).await;
        if st == 200 {
            let ix = body["indexes"].as_array().and_then(|l| l.iter().find(|i| i["name"] == name));
            match ix.and_then(|i| i["state"].as_str()) {
                Some("ready") => return Ok(()),
                Some(_) => {}
                None => bail!("index {name} is gone from {body}"),
            }
        }
        if Instant::now() >= deadline {
            bail!("index {name} not ready after {timeout:?}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Finds tenant A's documents of one group, checks their number, and returns the plan the
/// leader used (from its query statistics), which must be an index scan.
async fn check_index_used(cluster: &Cluster, members: &Members, docs: u64) -> anyhow::Result<String> {
    let expected = docs / GROUPS + u64::from(docs % GROUPS > PROBE_GROUP);
    let url = format!("{}/find", members.coll_url(DB_A, COLL_A));
    let (st, body) = cluster.client.post(&url, &json!({"filter": {FIELD: PROBE_GROUP}, "limit": 10_000})).await;
    if st != 200 {
        bail!("find on {FIELD} answered {st}: {body}");
    }
    let found = body["documents"].as_array().map_or(0, Vec::len) as u64;
    if found != expected {
        bail!("find on {FIELD} returned {found} documents, expected {expected}");
    }
    let leader = members.leader.load(Ordering::Relaxed);
    let (st, stats) = cluster.client.get(&format!("{}/v1/admin/query-stats", cluster.nodes[leader].admin)).await;
    if st != 200 {
        bail!("query-stats answered {st}: {stats}");
    }
    let shape = stats["shapes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["db"] == DB_A && s["coll"] == COLL_A && s["op"] == "find"))
        .with_context(|| format!("no find on {DB_A}.{COLL_A} in the query statistics: {stats}"))?;
    let plan = shape["plan"].as_str().unwrap_or_default().to_owned();
    let examined = shape["docsExamined"].as_u64().unwrap_or(u64::MAX);
    if !plan.starts_with("IXSCAN") || examined != expected {
        bail!("the find on {FIELD} ran as {plan:?} and examined {examined} documents for {expected}");
    }
    Ok(plan)
}

/// How many build steps the leader proposed, and the seconds they took in all (from the
/// proposal to its application on the leader): its `nimbus_write_seconds{op="build_index"}`.
async fn build_steps(cluster: &Cluster, members: &Members) -> (f64, f64) {
    let leader = members.leader.load(Ordering::Relaxed);
    let text = match cluster.client.http.get(format!("{}/metrics", cluster.nodes[leader].admin)).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("op=\"build_index\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("nimbus_write_seconds_count"), value("nimbus_write_seconds_sum"))
}

/// The highest Raft term any running member reports.
async fn max_term(cluster: &Cluster) -> u64 {
    let mut term = 0;
    for i in 0..cluster.nodes.len() {
        if let Some(s) = cluster.status(i).await {
            term = term.max(s.term);
        }
    }
    term
}

fn ratio(during: &RunResult, before: &RunResult) -> f64 {
    during.p99_ms() / before.p99_ms().max(0.001)
}
