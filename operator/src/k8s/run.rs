//! The operator process: Lease-based leader election, then the controllers and the
//! migrations' driver ([`Migrator`], which stops with them).
//!
//! Only the replica holding the Lease reconciles; one that loses the Lease exits, and
//! Kubernetes restarts it as a follower (the way controller-runtime handles a lost lease:
//! no half-finished step continues without the lock).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use thiserror::Error;
use tracing::{error, info, warn};

use super::backup::Backups;
use super::failure::{Clock, Failover};
use super::health::Health;
use super::instance::{self, Context};
use super::metrics::Metrics;
use super::migration::{Migrations, PodDirectory};
use super::objects::{LABEL_REPLICA_SET, Settings};
use super::restore::{self, RestoreContext, RestoreRunner};
use super::{pool, replicaset};
use crate::controlplane::admin::AdminClient;
use crate::controlplane::backup::agent::AgentTuning;
use crate::controlplane::coord::Coordinator;
use crate::controlplane::migration::{LiveWorld, Migrator, Tuning};
use crate::crd::v1alpha1::{DatabaseInstance, DatabaseRestore, ResourcePool};

/// The Lease the operator replicas compete for.
pub const LEASE_NAME: &str = "nimbus-operator";
pub const LEASE_SECONDS: u64 = 15;
pub const LEASE_GRACE_SECONDS: u64 = 5;
/// Reconciles run at once, at most: each calls the Kubernetes API, etcd and datanodes.
pub const REPLICA_SET_CONCURRENCY: u16 = 4;
pub const INSTANCE_CONCURRENCY: u16 = 8;

#[derive(Clone)]
pub struct RunConfig {
    pub settings: Settings,
    /// The operator's own etcd connection (its client certificate or user).
    pub etcd: nimbus_net::EtcdArgs,
    /// Sent with every call to a datanode.
    pub secret: nimbus_net::ClusterSecret,
    /// Namespace of the leader-election Lease (the operator's own).
    pub lease_namespace: String,
    /// This replica's identity in the election (its Pod name).
    pub identity: String,
    /// How long a member may be down before it is declared lost and replaced.
    pub member_failure_period: Duration,
    /// Hot migration's knobs (hold timeout, copy rate, concurrency, clean-up grace).
    pub migration: Tuning,
    /// Where backups go ([`super::backup::object_store`]); `None`: backups are off.
    pub backup_store: Option<Arc<dyn object_store::ObjectStore>>,
    /// What runs a DatabaseRestore; `None`: restores wait in `Pending`, saying why.
    pub restore_runner: Option<Arc<dyn RestoreRunner>>,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("failed to connect to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("failed to run leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("failed to connect to etcd: {0}")]
    Etcd(#[from] crate::controlplane::CoordError),
    #[error("lost the leader-election lease")]
    LostLease,
}

/// The resources the leader's controllers watch, as `/readyz` names them.
pub const WATCHES: [&str; 3] = ["databaseinstances", "resourcepools", "databaserestores"];

/// Runs the controllers once this replica holds the Lease, telling `health` how far it got.
pub async fn run(cfg: RunConfig, health: Arc<Health>) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let manager = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(&cfg.lease_namespace)
        .with_identity(&cfg.identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await?;
    // Building the manager read (or created) the Lease: the API answers.
    health.following();
    let (mut leading, _task) = manager.watch().await;
    info!(identity = %cfg.identity, "waiting for the leader-election lease");
    while !*leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            return Err(RunError::LostLease);
        }
    }
    info!(identity = %cfg.identity, "leading: starting the controllers");

    let store = Arc::new(Coordinator::connect(&cfg.etcd).await?);
    // Hot migrations: datanodes through the admin client, etcd through the coordinator,
    // members found from the Pods the replica-set reconciler manages.
    let world = Arc::new(LiveWorld {
        admin: AdminClient::new(&cfg.secret),
        coord: store.clone(),
        directory: Arc::new(PodDirectory { client: client.clone() }),
    });
    // Backups: the same world (datanodes, etcd, the members' Pods) as the migrations.
    let backups = Arc::new(match &cfg.backup_store {
        Some(objects) => Backups::new(world.clone(), objects.clone(), AgentTuning::default()),
        None => Backups::off(),
    });
    // Restores: the same world again, and the store the agents write (a test's runner, if
    // given, instead).
    let restore_runner = cfg.restore_runner.clone().or_else(|| {
        let store = cfg.backup_store.clone()?;
        Some(Arc::new(super::restore_runner::LiveRestoreRunner { world: world.clone(), store })
            as Arc<dyn RestoreRunner>)
    });
    let migrations = Migrations::new(world, cfg.migration.clone());
    let reporter = Reporter { controller: "nimbus-operator".into(), instance: Some(cfg.identity.clone()) };
    // One watch of the nodes for every replica-set pass (their health decides the failure
    // period, force deletes and where a replacement can go), rather than a list per pass.
    // Kept lean: a node's image list and managed fields are large and never read.
    let (nodes, writer) = reflector::store::<Node>();
    let node_watch = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|n: &mut Node| {
            n.metadata.managed_fields = None;
            if let Some(s) = n.status.as_mut() {
                s.images = None;
            }
        })
        .reflect(writer)
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "node watch");
            }
        });
    tokio::spawn(node_watch);
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: cfg.settings.clone(),
        datanodes: Arc::new(AdminClient::new(&cfg.secret)),
        store: store.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics: Metrics,
        reports: Default::default(),
        backoff: Default::default(),
        failover: Failover { period: cfg.member_failure_period, clock: Clock::default() },
        nodes,
        migrations: migrations.clone(),
        backups: backups.clone(),
    });
    // The migrations run on the leader only, and stop with the controllers (a signal) or
    // with the lease: dropping `stop` ends the run, whose drivers stop at once (every
    // step is idempotent; the next leader resumes from the records).
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let migrator: Arc<Migrator> = migrations.migrator.clone();
    let migrator_task = tokio::spawn(migrator.run(async move {
        let _ = stopped.await;
    }));

    health.leading(&WATCHES);
    // Replica sets, by their Service: the only reconciler that steps members. Woken by
    // their member Pods, and requeued with jitter.
    let member_pods = watcher::Config::default().labels(LABEL_REPLICA_SET);
    let replica_sets =
        Controller::new(Api::<Service>::all(client.clone()), watcher::Config::default().labels(LABEL_REPLICA_SET))
            .with_config(controller::Config::default().concurrency(REPLICA_SET_CONCURRENCY))
            .watches(Api::<Pod>::all(client.clone()), member_pods, |pod| {
                let rs = pod.labels().get(LABEL_REPLICA_SET)?;
                Some(ObjectRef::<Service>::new(rs).within(&pod.namespace()?))
            })
            .shutdown_on_signal()
            .run(replicaset::reconcile, replicaset::error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    warn!(error = %e, "replica-set controller");
                }
            });

    let instances = Controller::new(Api::<DatabaseInstance>::all(client.clone()), watcher::Config::default())
        .with_config(controller::Config::default().concurrency(INSTANCE_CONCURRENCY));
    let reader = instances.store();
    report_synced(&health, WATCHES[0], reader.clone());
    // The agents' targets and `status.backup`, from the instance controller's cache; it
    // ends with this task (dropped with the runtime when the process exits).
    let backup_status = tokio::spawn(super::backup::run(backups.clone(), client.clone(), reader.clone()));
    // A member Pod changing (gone, ready, failed) wakes every instance on its replica set.
    let pods = watcher::Config::default().labels(LABEL_REPLICA_SET);
    let instances = instances
        .watches(Api::<Pod>::all(client.clone()), pods, move |pod| {
            let rs = pod.labels().get(LABEL_REPLICA_SET).cloned().unwrap_or_default();
            let ns = pod.namespace();
            reader
                .state()
                .into_iter()
                .filter(|i| {
                    i.namespace() == ns
                        && i.status.as_ref().and_then(|s| s.placement.as_ref()).is_some_and(|p| p.replica_set == rs)
                })
                .map(|i| ObjectRef::from_obj(i.as_ref()))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(instance::reconcile, instance::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "instance controller");
            }
        });
    let restore_reporter = Reporter { controller: "nimbus-operator".into(), instance: Some(cfg.identity.clone()) };
    let restore_ctx = Arc::new(RestoreContext {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), restore_reporter),
        runner: restore_runner,
        jobs: Default::default(),
        poll: restore::POLL,
    });
    let restores = Controller::new(Api::<DatabaseRestore>::all(client.clone()), watcher::Config::default());
    report_synced(&health, WATCHES[2], restores.store());
    let restores = restores.shutdown_on_signal().run(restore::reconcile, restore::error_policy, restore_ctx).for_each(
        |r| async move {
            if let Err(e) = r {
                warn!(error = %e, "restore controller");
            }
        },
    );
    let pools = Controller::new(Api::<ResourcePool>::all(client.clone()), watcher::Config::default());
    report_synced(&health, WATCHES[1], pools.store());
    let pools = pools.shutdown_on_signal().run(pool::reconcile, pool::error_policy, ctx).for_each(|_| async {});

    let lost = async move {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow() {
                return;
            }
        }
    };
    let result = tokio::select! {
        _ = futures::future::join4(replica_sets, instances, pools, restores) => Ok(()),
        _ = lost => {
            error!("lost the leader-election lease: exiting so a restart begins as a follower");
            Err(RunError::LostLease)
        }
    };
    drop(stop);
    backup_status.abort();
    if tokio::time::timeout(Duration::from_secs(5), migrator_task).await.is_err() {
        warn!("the migrations did not stop within 5 s");
    }
    if result.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    result
}

/// Tells `health` once the watch behind `store` has listed its objects.
fn report_synced<K>(health: &Arc<Health>, resource: &'static str, store: kube::runtime::reflector::Store<K>)
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let health = health.clone();
    tokio::spawn(async move {
        // Asked again every half second: the store's readiness wakes one waiter only (a
        // oneshot's single waker, which the controller's own wait takes over), but a new
        // ask after the first list is answered at once.
        loop {
            match tokio::time::timeout(Duration::from_millis(500), store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    info!(resource, "watch synced");
                    health.watch_synced(resource);
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });
}
