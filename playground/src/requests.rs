//! The control plane's `apply` and `delete` (`nimbus playground apply|delete`).
//!
//! The HTTP handlers only pass a request to the control loop, which owns the state: a
//! request is carried out between two ticks, never while a replica set is being driven,
//! and `playground.json` shows its outcome before the answer goes back.
//!
//! `POST /v1/apply` `{"documents": [{"source", "document"}]}` → `{"changes": [...]}`;
//! `POST /v1/delete` `{"instances": [NAME...]}` → `{"changes": [...]}`. Refusals are
//! `{"error": "..."}` with 400 (invalid manifest), 404 (unknown instance), 409 (cannot be
//! done now) or 500; a refused request changed nothing.

use std::path::Path;

use axum::http::StatusCode;
use nimbus_operator::controlplane::admin::AdminClient;
use nimbus_operator::controlplane::coord::Coordinator;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::manifest::Document;
use crate::state::State;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    pub documents: Vec<Document>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteRequest {
    pub instances: Vec<String>,
}

/// What a request changed, one line per object (`instance shop created`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Changes {
    pub changes: Vec<String>,
}

/// A request refused, with the status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal { status, message: message.into() }
    }
}

impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> axum::response::Response {
        (self.status, axum::Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

type Reply = oneshot::Sender<Result<Vec<String>, Refusal>>;

/// A request for the control loop, with where to send its answer.
pub enum Request {
    Apply(ApplyRequest, Reply),
    Delete(DeleteRequest, Reply),
}

/// The routes, to be put behind the cluster-secret check.
pub fn routes(loop_tx: mpsc::Sender<Request>) -> axum::Router {
    let apply_tx = loop_tx.clone();
    axum::Router::new()
        .route(
            "/v1/apply",
            axum::routing::post(move |axum::Json(req): axum::Json<ApplyRequest>| {
                let tx = apply_tx.clone();
                async move { ask(&tx, |reply| Request::Apply(req, reply)).await }
            }),
        )
        .route(
            "/v1/delete",
            axum::routing::post(move |axum::Json(req): axum::Json<DeleteRequest>| {
                let tx = loop_tx.clone();
                async move { ask(&tx, |reply| Request::Delete(req, reply)).await }
            }),
        )
}

async fn ask(
    tx: &mpsc::Sender<Request>,
    request: impl FnOnce(Reply) -> Request,
) -> Result<axum::Json<Changes>, Refusal> {
    let (reply, answer) = oneshot::channel();
    let stopping = || Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "the control plane is stopping");
    tx.send(request(reply)).await.map_err(|_| stopping())?;
    let changes = answer.await.map_err(|_| stopping())??;
    Ok(axum::Json(Changes { changes }))
}

fn internal(what: &str, e: impl std::fmt::Display) -> Refusal {
    Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, format!("failed to {what}: {e}"))
}

/// Applies `documents` to the state: checked again here (against this state), planned on
/// a copy, then committed (migrations are started by the control loop) and the changed instances' users and limits
/// rewritten in etcd.
pub async fn apply(
    st: &mut State,
    dir: &Path,
    store: &Coordinator,
    documents: &[Document],
) -> Result<Vec<String>, Refusal> {
    let bad = |e: crate::manifest::ManifestError| Refusal::new(StatusCode::BAD_REQUEST, e.to_string());
    let manifests = crate::manifest::parse(documents).map_err(bad)?;
    let outcome = crate::apply::plan(st, &manifests).map_err(bad)?;
    for req in &outcome.migrations {
        // Started by the control loop once the target replica set has a leader
        // (`migrate::start_wanted`).
        info!(
            instance = %req.instance, from = %req.from_replica_set, to = %req.to_replica_set,
            "migration to pool {} requested", req.to_pool
        );
    }
    *st = outcome.state;
    st.save(dir).map_err(|e| internal("save the state", e))?;
    for r in &outcome.republish {
        let Some(inst) = st.instances.get(&r.instance) else { continue };
        let removed =
            store.retain_users(&inst.database, &r.users).await.map_err(|e| internal("remove users from etcd", e))?;
        if !removed.is_empty() {
            info!(instance = %r.instance, users = ?removed, "users removed: their tokens no longer work");
        }
        for (user, token) in &inst.tokens {
            let Some(record) = nimbus_api::token::record_of(token, inst.role(user)) else { continue };
            store.put_user(&inst.database, user, &record).await.map_err(|e| internal("write a user to etcd", e))?;
        }
        if let Some(limits) = &inst.limits {
            store.put_limits(&inst.database, limits).await.map_err(|e| internal("write limits to etcd", e))?;
        }
    }
    for line in &outcome.lines {
        info!("{line}");
    }
    Ok(outcome.lines)
}

/// The admin address of the member leading `rs`, if one does.
async fn leader_admin(st: &State, admin: &AdminClient, rs: &str) -> Option<String> {
    let set = st.replica_sets.get(rs)?;
    for m in set.members.values() {
        let addr = format!("http://{}:{}", st.host(&m.zone), m.admin_port);
        if let Ok(s) = admin.status(&addr).await
            && s.leader_id == Some(s.id)
        {
            return Some(addr);
        }
    }
    None
}

/// Deletes instances: every name must be known and its replica set led (else nothing
/// changes); then each database's data is dropped on its replica set, its records (route,
/// users, limits, claim) deleted from etcd and the instance forgotten. Replica sets left
/// empty stay (a shared one takes the next database; a dedicated one its instance again).
pub async fn delete(
    st: &mut State,
    dir: &Path,
    admin: &AdminClient,
    store: &Coordinator,
    names: &[String],
) -> Result<Vec<String>, Refusal> {
    if names.is_empty() {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "name at least one instance to delete"));
    }
    if let Some(unknown) = names.iter().find(|n| !st.instances.contains_key(*n)) {
        return Err(Refusal::new(StatusCode::NOT_FOUND, format!("no instance {unknown:?}: nothing deleted")));
    }
    if let Some((name, inst)) =
        names.iter().filter_map(|n| Some((n, st.instances.get(n)?))).find(|(_, i)| i.wanted_pool.is_some())
    {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            format!(
                "instance {name}: a migration to pool {} is running; nothing deleted, delete it once the migration has ended",
                inst.wanted_pool.as_deref().unwrap_or_default()
            ),
        ));
    }
    // Every replica set holding a copy: the one serving it, and the source of a migration
    // whose clean-up is still pending (a new instance of the name placed there must not
    // find the old data).
    let mut leaders: Vec<Vec<String>> = Vec::new();
    for name in names {
        let inst = &st.instances[name];
        let mut sets = vec![inst.replica_set.clone()];
        if let Some(m) = &inst.migration
            && m.phase == nimbus_operator::controlplane::migration::Phase::CleaningUp
            && m.from_replica_set != inst.replica_set
        {
            sets.push(m.from_replica_set.clone());
        }
        let mut found = Vec::new();
        for rs in sets {
            match leader_admin(st, admin, &rs).await {
                Some(addr) => found.push(addr),
                None => {
                    return Err(Refusal::new(
                        StatusCode::CONFLICT,
                        format!(
                            "instance {name}: replica set {rs} has no leader, so its data cannot be dropped now; \
                             nothing deleted, try again"
                        ),
                    ));
                }
            }
        }
        leaders.push(found);
    }
    let mut lines = Vec::new();
    for (name, leaders) in names.iter().zip(leaders) {
        let Some(inst) = st.instances.get(name).cloned() else { continue };
        // Fenced above the route's epoch before the drop: a restore of the instance running
        // now (`restore.rs`) publishes with the epoch it read, and is refused instead of
        // bringing collections back after the drop. It is not waited for: the restore
        // task's own clean-up of a failed `--into` deletes its instance while it runs.
        let route = store.route(&inst.database).await.map_err(|e| internal("read the database's route", e))?;
        let fence_epoch = route.map(|r| r.epoch + 1);
        for leader in leaders {
            // Through Raft; the database's route epoch stays on the replica set, so a
            // sender with the old route is still refused. Its restore staging and
            // verification scratch copies go too.
            nimbus_operator::controlplane::drop_instance_data(admin, &leader, &inst.database, fence_epoch)
                .await
                .map_err(|e| internal("drop the database's data", e))?;
        }
        store
            .delete_database(&inst.database, &crate::local::claim(name), true)
            .await
            .map_err(|e| internal("delete the database's records from etcd", e))?;
        st.instances.remove(name);
        st.save(dir).map_err(|e| internal("save the state", e))?;
        info!(instance = %name, database = %inst.database, "deleted");
        lines.push(format!("instance {name} deleted"));
    }
    Ok(lines)
}
