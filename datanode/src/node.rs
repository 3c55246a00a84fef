//! Starting a datanode: storage, Raft, the two HTTP servers; and the context its handlers
//! share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use metrics_exporter_prometheus::PrometheusHandle;
use openraft::async_runtime::WatchReceiver;
use openraft::{Config as RaftConfig, ServerState, SnapshotPolicy};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::clock::ReplicaClock;
use crate::config::Config;
use crate::raft::Raft;
use crate::raft::log_store::LogStore;
use crate::raft::network::{DrainingPeers, Network};
use crate::raft::state_machine::{SmShared, StateMachine};
use crate::server;
use crate::shutdown::{self, StopBudget};
use crate::store::engine::EngineOptions;

/// The most bytes of entries one AppendEntries call carries beyond its first entry.
const MAX_APPEND_BYTES: usize = 8 << 20;

/// What every handler of a datanode shares.
pub struct NodeCtx {
    pub id: u64,
    pub zone: String,
    pub replica_set: String,
    pub raft: Raft,
    pub sm: Arc<SmShared>,
    pub prometheus: PrometheusHandle,
    pub write_timeout: Duration,
    /// A leader that heard from no majority for this long answers 503 at once instead of
    /// accepting writes and read barriers it cannot complete.
    pub quorum_lease: Duration,
    /// Largest request body on the data API.
    pub max_body_bytes: usize,
    /// The time stamped on proposed commands.
    pub clock: Arc<ReplicaClock>,
    /// Data API requests received so far: the index builder slows down while there are any.
    pub data_requests: AtomicU64,
    /// Set once the member is stopping (`crate::shutdown`): it takes no new write or
    /// linearizable read (`421 NotLeader`, retried elsewhere by the gateway), does not stand
    /// for election and does not take leadership.
    pub draining: AtomicBool,
    /// The peers whose Raft answers say they are stopping: never chosen as successor.
    pub peers_draining: Arc<DrainingPeers>,
}

impl NodeCtx {
    /// The time to stamp on a command this member proposes: the median of the voters'
    /// clocks (`crate::clock`).
    pub fn command_time(&self) -> u64 {
        let voters: Vec<u64> =
            self.raft.metrics().borrow_watched().membership_config.membership().voter_ids().collect();
        self.clock.now_ms(self.id, &voters)
    }

    /// Sets the gauges that mirror Raft's and RocksDB's state, just before a scrape.
    pub fn refresh_gauges(&self) {
        let status = server::admin::status_of(self);
        metrics::gauge!("nimbus_raft_term").set(status.term as f64);
        metrics::gauge!("nimbus_raft_commit_index").set(status.commit_index as f64);
        metrics::gauge!("nimbus_raft_applied_index").set(status.applied_index as f64);
        for role in ["leader", "follower", "learner", "candidate"] {
            let is =
                serde_json::to_value(status.role).ok().and_then(|v| v.as_str().map(|s| s == role)).unwrap_or(false);
            metrics::gauge!("nimbus_raft_role", "role" => role).set(if is { 1.0 } else { 0.0 });
        }
        for (id, lag) in &status.replication_lag {
            metrics::gauge!("nimbus_raft_replication_lag_entries", "follower" => id.to_string()).set(*lag as f64);
        }
        for (cf, size) in self.sm.engine().sizes() {
            metrics::gauge!("nimbus_rocksdb_sst_bytes", "cf" => cf).set(size as f64);
        }
    }
}

/// Where a started datanode can be reached; printed as one JSON line on stdout and written
/// to `DATA_DIR/endpoints.json`, so that whoever started it with port 0 learns the ports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    pub id: u64,
    pub data: String,
    pub admin: String,
    pub raft: String,
    pub pid: u32,
}

fn url(host: &Option<String>, addr: std::net::SocketAddr) -> String {
    let host = match host {
        Some(h) => h.clone(),
        None if addr.ip().is_unspecified() => "127.0.0.1".to_owned(),
        None => addr.ip().to_string(),
    };
    format!("http://{host}:{}", addr.port())
}

/// Runs a datanode until SIGINT or SIGTERM, then stops as `crate::shutdown` describes.
pub async fn run(config: Config, prometheus: PrometheusHandle) -> anyhow::Result<()> {
    // Before anything else: a signal from now on means a clean stop, not the default action.
    let mut signals = Signals::install().context("failed to install the signal handlers")?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("failed to create {}", config.data_dir.display()))?;
    let secret = config.cluster.load().context("failed to load the cluster secret")?;
    let log = LogStore::open(&config.data_dir.join("raft")).context("failed to open the raft log")?;
    let options = EngineOptions {
        oplog_retention: Duration::from_secs(config.oplog_retention_secs),
        max_publish_bytes: config.max_publish_bytes,
        ..Default::default()
    };
    let sm = StateMachine::open(&config.data_dir, options).context("failed to open the state machine")?;
    let sm_shared = sm.shared();

    let clock = Arc::new(ReplicaClock::new(config.clock_skew_ms));
    let peers_draining = Arc::new(DrainingPeers::default());
    let raft_config = RaftConfig {
        cluster_name: config.replica_set.clone(),
        heartbeat_interval: config.heartbeat_ms,
        election_timeout_min: config.election_timeout_ms,
        // openraft's leader lease is `election_timeout_max`: a follower does not start an
        // election before it passes. A narrow range keeps failover short; pre-vote keeps
        // the resulting near-simultaneous candidacies from disrupting each other.
        election_timeout_max: config.election_timeout_ms + config.election_timeout_ms / 3,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
        max_in_snapshot_log_to_keep: config.keep_logs,
        enable_pre_vote: Some(true),
        ..Default::default()
    }
    .validate()
    .context("invalid raft configuration")?;
    let raft = Raft::new(
        config.id,
        Arc::new(raft_config),
        // At most 8 MiB of entries per call (a follower parses and syncs it within the append
        // timeout), never more than half the Raft port's body limit below; one entry, up to
        // a whole request body, is always sent.
        Network::new(
            Duration::from_millis(config.election_timeout_ms),
            (config.max_body_bytes * 2).min(MAX_APPEND_BYTES),
            clock.clone(),
            &secret,
        )
        .with_draining_peers(peers_draining.clone()),
        log,
        sm,
    )
    .await
    .context("failed to start raft")?;
    // What openraft applied again at its start (the entries after the state machine's last
    // flush, lost with its memtables if the member was killed) is flushed at once: a member
    // killed again (a probe's timeout, say) does not apply the same entries once more.
    sm_shared.engine().flush().context("failed to flush the state machine after its start")?;

    let ctx = Arc::new(NodeCtx {
        id: config.id,
        zone: config.zone.clone(),
        replica_set: config.replica_set.clone(),
        raft: raft.clone(),
        sm: sm_shared,
        prometheus,
        write_timeout: config.request_timeout(),
        // Twice the election timeout: by then the majority has elected another leader.
        quorum_lease: Duration::from_millis(2 * config.election_timeout_ms),
        max_body_bytes: config.max_body_bytes,
        clock,
        data_requests: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        peers_draining,
    });

    let data_listener = TcpListener::bind(config.data_listen)
        .await
        .with_context(|| format!("failed to bind {}", config.data_listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("failed to bind {}", config.admin_listen))?;
    let raft_listener = TcpListener::bind(config.raft_listen)
        .await
        .with_context(|| format!("failed to bind {}", config.raft_listen))?;
    let endpoints = Endpoints {
        id: config.id,
        data: url(&config.advertise_host, data_listener.local_addr()?),
        admin: url(&config.advertise_host, admin_listener.local_addr()?),
        raft: url(&config.advertise_host, raft_listener.local_addr()?),
        pid: std::process::id(),
    };
    std::fs::write(config.data_dir.join("endpoints.json"), serde_json::to_vec(&endpoints)?)?;
    println!("{}", serde_json::to_string(&endpoints)?);
    tracing::info!(node = config.id, replica_set = %config.replica_set, zone = %config.zone, data = %endpoints.data, admin = %endpoints.admin, "datanode started");

    // Every port but the probes' routes needs the cluster secret: nothing behind the
    // gateway serves a caller it cannot verify.
    let require = || axum::middleware::from_fn_with_state(secret.clone(), nimbus_net::cluster::require);
    let data_app =
        server::data::router(ctx.clone()).layer(require()).route("/healthz", axum::routing::get(|| async { "ok" }));
    let admin_app = server::admin::router(ctx.clone(), secret.clone()).layer(DefaultBodyLimit::max(1024 * 1024));
    // Snapshot chunks are 1 MiB; Raft appends carry batches of documents.
    let raft_app =
        server::raft_rpc::router(ctx.clone()).layer(DefaultBodyLimit::max(config.max_body_bytes * 4)).layer(require());

    // Two stops: first the data and admin ports (and the tasks that serve them), then, last
    // before Raft itself, the Raft port, so that a stopping member keeps replicating and
    // voting while its clients drain.
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let (raft_stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut rx1 = stop_tx.subscribe();
    let mut rx2 = stop_tx.subscribe();
    let mut rx3 = raft_stop_tx.subscribe();
    let builder = tokio::spawn(crate::index_builder::run(ctx.clone(), stop_tx.subscribe()));
    let watch = tokio::spawn(crate::leader_watch::run(
        ctx.clone(),
        Duration::from_millis(config.heartbeat_ms),
        stop_tx.subscribe(),
    ));
    let data_srv = tokio::spawn(async move {
        axum::serve(data_listener, data_app)
            .with_graceful_shutdown(async move {
                let _ = rx1.recv().await;
            })
            .await
    });
    let admin_srv = tokio::spawn(async move {
        axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async move {
                let _ = rx2.recv().await;
            })
            .await
    });
    let raft_srv = tokio::spawn(async move {
        axum::serve(raft_listener, raft_app)
            .with_graceful_shutdown(async move {
                let _ = rx3.recv().await;
            })
            .await
    });
    let signal = signals.next().await;
    let stopping = std::time::Instant::now();
    let budget = StopBudget::new(Duration::from_millis(config.shutdown_handoff_ms));
    let election_timeout = Duration::from_millis(config.election_timeout_ms);
    tracing::info!(node = config.id, signal, "stopping");

    // 1. No new writes, no campaigning; a leader hands its leadership over. A second signal
    //    cuts the handoffs short.
    shutdown::start_draining(&ctx);
    // Asking again after the drain is for a member that did not lead when the handoff ended.
    let handoff = shutdown::hand_off(&ctx, budget.handoff_within(stopping.elapsed()), election_timeout);
    let ask_again = tokio::select! {
        h = handoff => {
            h.log(config.id);
            !h.still_leading()
        }
        signal = signals.next() => {
            tracing::warn!(node = config.id, signal, "stopping at once: the handoff is cut short");
            false
        }
    };

    // 2. Stop the data and admin servers: no new connections; requests in flight get their
    //    answers.
    let _ = stop_tx.send(());
    let within = budget.drain_within(stopping.elapsed());
    let drained = tokio::time::timeout(within, async {
        let _ = data_srv.await;
        let _ = admin_srv.await;
        let _ = builder.await;
        let _ = watch.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            node = config.id,
            within_ms = within.as_millis() as u64,
            "requests still in flight: stopping anyway"
        );
    }

    // 3. A member elected after all (an election under way at the signal) hands over again
    //    rather than exit as leader.
    let within = budget.handoff_again_within(stopping.elapsed());
    if ask_again && !within.is_zero() && ctx.raft.metrics().borrow_watched().state == ServerState::Leader {
        tracing::warn!(node = config.id, "this member leads again while stopping: handing over again");
        tokio::select! {
            h = shutdown::hand_off(&ctx, within, election_timeout) => h.log(config.id),
            signal = signals.next() => tracing::warn!(node = config.id, signal, "stopping at once: the handoff is cut short"),
        }
    }

    // 4. The Raft port and Raft, then storage: the applied state synced, so a restart
    //    replays nothing.
    let _ = raft_stop_tx.send(());
    let within = budget.raft_within(stopping.elapsed());
    let raft_stopped = tokio::time::timeout(within, async {
        let r = raft.shutdown().await;
        let _ = raft_srv.await;
        r
    })
    .await;
    match raft_stopped {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(node = config.id, error = %e, "raft shutdown failed"),
        Err(_) => tracing::warn!(
            node = config.id,
            within_ms = within.as_millis() as u64,
            "raft did not shut down in time: stopping anyway (its log is durable)"
        ),
    }
    if let Err(e) = ctx.sm.engine().flush() {
        tracing::warn!(node = config.id, error = %e, "failed to flush the state machine");
    }
    tracing::info!(node = config.id, took_ms = stopping.elapsed().as_millis() as u64, "stopped");
    Ok(())
}

/// SIGTERM (the kubelet, `kill`) and SIGINT (Ctrl-C), registered once at startup.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
