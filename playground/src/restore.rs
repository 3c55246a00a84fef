//! Point-in-time restore in the playground (`API.md` section 3): `nimbus playground
//! restore NAME --to-time RFC3339|latest [--collections a,b] [--into NEW_NAME]` runs the
//! operator's restore job (`controlplane::backup::restore_job`) against the playground's
//! processes and its backups under `{dir}/backups`.
//!
//! In place, the whole database (or the collections named) becomes what it was at that
//! time; with `--into`, a new instance with the source's spec is created first and the
//! backup restored into it (on failure it is deleted again). That instance is applied
//! create-only (`apply`, [`crate::apply::ANNOTATION_RESTORED_BY`]): the control loop
//! refuses it when the name was taken meanwhile, so the restore never reconfigures, fills
//! or deletes an instance it did not make. The time is checked against
//! the recoverable window before anything is done; every later failure leaves the
//! collections as they were (the import goes to a staging database no client can address,
//! published in one Raft entry).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use nimbus_operator::controlplane::backup::restore::RestoreCause;
use nimbus_operator::controlplane::backup::restore_job::{self, JobError, RestoreJob, RestoreMode};
use nimbus_operator::controlplane::backup::{BackupLocation, BackupStore, Incarnation, RestoreTarget};
use nimbus_operator::controlplane::migration::LiveWorld;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::backup::rfc3339;
use crate::requests::{Changes, Refusal, Request};
use crate::state::State;

/// How long a restore retries passing failures (a leader change, a restarting datanode).
const RETRY_FOR: Duration = Duration::from_secs(120);
/// How long a new instance of `--into` may take to be served.
const NEW_INSTANCE_WITHIN: Duration = Duration::from_secs(120);

/// `POST /v1/restore` → `{"changes": ["restored to: RFC3339"]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRequest {
    pub instance: String,
    /// RFC 3339, or `latest`.
    pub to_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collections: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
}

/// What the restore handler works with.
#[derive(Clone)]
pub struct Restorer {
    pub world: Arc<LiveWorld>,
    pub store: Arc<dyn object_store::ObjectStore>,
    pub dir: PathBuf,
    pub loop_tx: mpsc::Sender<Request>,
    /// Databases a restore is running into: one at a time each.
    pub busy: Arc<Mutex<BTreeSet<String>>>,
}

/// The `restore` route, to be put behind the cluster-secret check; served outside the
/// control loop (a restore takes as long as the backup is large).
pub fn routes(restorer: Restorer) -> axum::Router {
    axum::Router::new().route(
        "/v1/restore",
        axum::routing::post(move |axum::Json(req): axum::Json<RestoreRequest>| {
            let restorer = restorer.clone();
            async move {
                // Run apart from the request: a client that goes away (Ctrl-C) must not cut a
                // restore between its steps (an instance made for `--into` left unfilled).
                let run = tokio::spawn(async move { restorer.restore(&req).await });
                let changes = run.await.map_err(|e| {
                    Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the restore stopped: {e}"))
                })??;
                Ok::<_, Refusal>(axum::Json(Changes { changes }))
            }
        }),
    )
}

/// The time asked for: `latest` or an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<RestoreTarget, String> {
    if text == "latest" {
        return Ok(RestoreTarget::Latest);
    }
    let t: jiff::Timestamp = text
        .parse()
        .map_err(|e| format!("invalid time {text:?}: use RFC 3339 (2026-11-28T10:00:00Z) or latest: {e}"))?;
    u64::try_from(t.as_millisecond())
        .map(RestoreTarget::Time)
        .map_err(|_| format!("invalid time {text:?}: before 1970"))
}

/// Marks `db` busy while alive.
struct Busy {
    set: Arc<Mutex<BTreeSet<String>>>,
    db: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.db);
    }
}

impl Restorer {
    pub async fn restore(&self, req: &RestoreRequest) -> Result<Vec<String>, Refusal> {
        let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
        let to = parse_time(&req.to_time).map_err(bad)?;
        let st = State::load(&self.dir)
            .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, format!("failed to read the state: {e}")))?
            .unwrap_or_default();
        let Some(source) = st.instances.get(&req.instance) else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                format!("no instance {:?}: nothing restored", req.instance),
            ));
        };
        if !source.spec.as_ref().map(|s| s.backup.enabled).unwrap_or(true) {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                format!("instance {} has backups off (spec.backup.enabled: false): nothing to restore", req.instance),
            ));
        }
        let migrating = source.wanted_replica_set.is_some()
            || source.migration.as_ref().is_some_and(|m| {
                use nimbus_operator::controlplane::migration::Phase;
                !matches!(m.phase, Phase::Completed | Phase::CleaningUp | Phase::Aborted)
            });
        if migrating {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                format!(
                    "instance {} is being moved to another replica set: nothing restored, try again when the migration ended",
                    req.instance
                ),
            ));
        }
        let collections = match &req.collections {
            None => None,
            Some(list) => {
                let set: BTreeSet<String> =
                    list.iter().map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect();
                if set.is_empty() {
                    return Err(bad("--collections names no collection".into()));
                }
                Some(set)
            }
        };
        let store = BackupStore::new(
            self.store.clone(),
            Incarnation::new(&source.incarnation)
                .and_then(|inc| BackupLocation::new("", crate::backup::SCOPE, &source.database, &inc))
                .map_err(|e| bad(e.to_string()))?,
        );
        // Refused before anything is created or changed.
        restore_job::plan(self.world.as_ref(), &store, to).await.map_err(|e| refusal(&req.instance, e))?;
        let id = format!("restore-{:08x}", rand::random::<u32>());
        let (into_db, created) = match &req.into {
            None => (source.database.clone(), None),
            Some(new) => {
                // Checked again, with the creation, by the control loop (`create_like`).
                if st.instances.contains_key(new) {
                    return Err(exists(new));
                }
                nimbus_api::limits::validate_name("instance", new).map_err(|e| bad(e.message))?;
                (self.create_like(&st, &req.instance, new, &id).await?, Some(new.clone()))
            }
        };
        let _busy = self.claim(&into_db)?;
        let job = RestoreJob {
            source_db: source.database.clone(),
            namespace: crate::migrate::NAMESPACE.into(),
            to,
            collections,
            into_db: into_db.clone(),
            mode: if created.is_some() { RestoreMode::IntoNew } else { RestoreMode::Replace },
            id,
            deadline: RETRY_FOR,
        };
        match restore_job::run(self.world.as_ref(), &store, &job, &restore_job::Unrecorded).await {
            Ok(report) => {
                tracing::info!(
                    instance = %req.instance, into = %into_db, full = %report.full, documents = report.documents,
                    bytes = report.bytes, changes = report.changes_applied, attempts = report.attempts,
                    "restored to {}", rfc3339(report.restored_to_ms)
                );
                Ok(vec![format!("restored to: {}", rfc3339(report.restored_to_ms))])
            }
            Err(e) => {
                if let Some(new) = created
                    && let Err(d) = self
                        .ask(|reply| {
                            Request::Delete(crate::requests::DeleteRequest { instances: vec![new.clone()] }, reply)
                        })
                        .await
                {
                    tracing::warn!(instance = %new, error = %d.message, "failed to delete the instance a failed restore created");
                }
                Err(refusal(&req.instance, e))
            }
        }
    }

    fn claim(&self, db: &str) -> Result<Busy, Refusal> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(db.to_owned()) {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                format!("a restore into database {db} is running: nothing restored, try again when it ended"),
            ));
        }
        Ok(Busy { set: self.busy.clone(), db: db.to_owned() })
    }

    async fn ask(
        &self,
        request: impl FnOnce(tokio::sync::oneshot::Sender<Result<Vec<String>, Refusal>>) -> Request,
    ) -> Result<Vec<String>, Refusal> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let stopping = || Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "the control plane is stopping");
        self.loop_tx.send(request(reply)).await.map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())?
    }

    /// Creates instance `new` with `source`'s spec (its own database, named `new`), only
    /// if no instance has the name when the control loop applies it, and waits until its
    /// database is served; its database.
    async fn create_like(&self, st: &State, source: &str, new: &str, restore_id: &str) -> Result<String, Refusal> {
        let mut spec = st.instances.get(source).and_then(|i| i.spec.clone()).unwrap_or_default();
        spec.database = None;
        let document = serde_json::json!({
            "apiVersion": crate::manifest::API_VERSION,
            "kind": "DatabaseInstance",
            "metadata": {"name": new, "annotations": {crate::apply::ANNOTATION_RESTORED_BY: restore_id}},
            "spec": spec,
        });
        let doc = crate::manifest::Document { source: format!("restore of {source}"), document };
        let applied = self.ask(|reply| Request::Apply(crate::requests::ApplyRequest { documents: vec![doc] }, reply));
        if let Err(refused) = applied.await {
            // Taken since the check above: said as that check says it.
            let taken = State::load(&self.dir).ok().flatten().is_some_and(|st| st.instances.contains_key(new));
            return Err(if taken { exists(new) } else { refused });
        }
        let started = Instant::now();
        loop {
            let served = match nimbus_operator::controlplane::backup::agent::BackupWorld::route(
                self.world.as_ref(),
                new,
            )
            .await
            {
                Ok(Some(route)) => route.state == nimbus_api::etcd::RouteState::Serving,
                _ => false,
            };
            if served {
                return Ok(new.to_owned());
            }
            if started.elapsed() > NEW_INSTANCE_WITHIN {
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "instance {new} was created but not served within {NEW_INSTANCE_WITHIN:?}: nothing restored into it"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `--into` names an instance that exists.
fn exists(new: &str) -> Refusal {
    Refusal::new(StatusCode::CONFLICT, format!("instance {new} exists: --into names a new instance; nothing restored"))
}

/// A failed restore as the answer: what the user asked wrong is 400, what cannot be done
/// now 409, the rest 500/503.
fn refusal(instance: &str, e: JobError) -> Refusal {
    let status = match &e {
        JobError::Plan(_) | JobError::Invalid(_) => StatusCode::BAD_REQUEST,
        JobError::Restore(f) => match &f.cause {
            RestoreCause::MissingCollections(_) | RestoreCause::Invalid(_) => StatusCode::BAD_REQUEST,
            RestoreCause::Backup(_) | RestoreCause::ChecksumMismatch { .. } | RestoreCause::Imported { .. } => {
                StatusCode::CONFLICT
            }
            RestoreCause::Target { .. } => StatusCode::SERVICE_UNAVAILABLE,
        },
        JobError::Backup(_) => StatusCode::CONFLICT,
        JobError::Publish { .. } | JobError::Resumed { .. } => StatusCode::CONFLICT,
        // Not made here: the playground records nothing (`Unrecorded`).
        JobError::Record { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        JobError::Target { .. } | JobError::GaveUp { .. } => StatusCode::SERVICE_UNAVAILABLE,
    };
    Refusal::new(status, format!("instance {instance} not restored: {e}"))
}
