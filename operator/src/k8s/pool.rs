//! The ResourcePool reconciler: reports the pool's replica sets and how full they are.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use serde_json::json;

use super::Error;
use super::api::Objects;
use super::instance::{Context, set_condition};
use super::objects::{ANNOTATION_ZONES, LABEL_POOL};
use crate::crd::v1alpha1::{DatabaseInstance, ReplicaSetStatus, ResourcePool, ResourcePoolStatus};

pub async fn reconcile(pool: Arc<ResourcePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = report(&pool, &ctx).await;
    ctx.metrics.reconciled("ResourcePool", started.elapsed(), result.is_ok());
    result
}

pub fn error_policy(_pool: Arc<ResourcePool>, _err: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(10))
}

async fn report(pool: &ResourcePool, ctx: &Context) -> Result<Action, Error> {
    let ns = pool.namespace().ok_or(Error::MissingNamespace)?;
    let name = pool.name_any();
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), &ns);
    let instances: Objects<DatabaseInstance> = Objects::namespaced(ctx.client.clone(), &ns);
    let mut sets: BTreeMap<String, ReplicaSetStatus> = BTreeMap::new();
    for svc in services.list(&ListParams::default().labels(&format!("{LABEL_POOL}={name}"))).await? {
        let zones = svc.annotations().get(ANNOTATION_ZONES).map(|z| z.split(',').map(str::to_string).collect());
        if let Some(zones) = zones {
            let n = svc.name_any();
            sets.insert(n.clone(), ReplicaSetStatus { name: n, databases: 0, zones });
        }
    }
    for i in instances.list(&ListParams::default()).await? {
        if let Some(p) = i.status.as_ref().and_then(|s| s.placement.as_ref())
            && p.pool == name
            && let Some(s) = sets.get_mut(&p.replica_set)
        {
            s.databases += 1;
        }
    }
    let old = pool.status.clone().unwrap_or_default();
    let mut conditions = old.conditions.clone();
    set_condition(&mut conditions, "Ready", "True", "Reconciled", "pool is usable", pool.metadata.generation);
    let database_count = sets.values().map(|s| s.databases).sum();
    let status = ResourcePoolStatus {
        conditions,
        observed_generation: pool.metadata.generation,
        replica_set_count: sets.len() as u32,
        database_count,
        replica_sets: sets.into_values().collect(),
    };
    if pool.status.as_ref() != Some(&status) {
        let api: Objects<ResourcePool> = Objects::namespaced(ctx.client.clone(), &ns);
        api.patch_status(&name, &json!({ "status": status })).await?;
    }
    Ok(Action::requeue(Duration::from_secs(60)))
}
