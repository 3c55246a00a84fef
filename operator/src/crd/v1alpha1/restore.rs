//! `DatabaseRestore`: a point-in-time restore of one instance's database (or some of its
//! collections) from its backups, in place, beside the originals under new names, or into
//! a new instance (`docs/backup.md`, "On Kubernetes").

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most collections one restore names.
pub const MAX_RESTORE_COLLECTIONS: u32 = 64;

/// A restore of a DatabaseInstance's data as it was at a moment of its recoverable window
/// (`kubectl get dbi` shows the window). Its spec cannot change: to restore again, create
/// another. Progress and result are in its status, with Events.
// The derive's repeated `printcolumn(type_ = ...)` keys trip this lint.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "nimbus.io",
    version = "v1alpha1",
    kind = "DatabaseRestore",
    namespaced,
    shortname = "dbr",
    status = "DatabaseRestoreStatus",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.target.mode"),
    printcolumn(name = "Restored To", type_ = "string", json_path = ".status.restoredTo"),
    printcolumn(name = "Documents", type_ = "integer", json_path = ".status.documents", priority = 1),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
// A restore is one request: changing it half-way would leave a person unable to tell what
// was restored. Every string and list below is bounded, so the API server's cost estimate
// of this rule stays small (`tests/cel_cost.rs`).
#[x_kube(validation = Rule::new("self == oldSelf").message("spec cannot change: create another DatabaseRestore"))]
#[serde(rename_all = "camelCase")]
pub struct DatabaseRestoreSpec {
    /// The DatabaseInstance (same namespace) whose backups are restored.
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,50}$"), length(min = 1, max = 50))]
    pub source: String,
    /// The moment to restore to: an RFC 3339 time (`2026-03-01T12:30:00Z`) inside the
    /// source's recoverable window, or `latest` (the end of the window).
    #[schemars(length(min = 1, max = 40))]
    pub to_time: String,
    /// Only these collections (each as it was at `toTime`); all of them when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = MAX_RESTORE_COLLECTIONS),
        inner(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"), length(min = 1, max = 64)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub collections: Option<Vec<String>>,
    /// Where the restored data goes.
    #[serde(default)]
    pub target: RestoreTargetSpec,
}

/// Where a restore writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[x_kube(validation = Rule::new("self.mode == 'NewInstance' ? has(self.instance) : !has(self.instance)")
    .message("target.instance names the new instance, and only with mode NewInstance"))]
#[x_kube(validation = Rule::new("self.mode == 'Beside' ? (has(self.suffix) || has(self.renames)) : (!has(self.suffix) && !has(self.renames))")
    .message("mode Beside needs target.suffix or target.renames (the restored collections' new names), and only Beside takes them"))]
#[serde(rename_all = "camelCase")]
pub struct RestoreTargetSpec {
    /// `InPlace` (the default): the source's collections are replaced by their restored
    /// state. `Beside`: restored next to them in the same database under new names.
    /// `NewInstance`: into a new DatabaseInstance (`instance`), made by the operator with
    /// the source's spec.
    #[serde(default)]
    pub mode: RestoreMode,
    /// The new instance's name (mode `NewInstance`): no instance may have it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,50}$"), length(min = 1, max = 50))]
    pub instance: Option<String>,
    /// Mode `Beside`: each restored collection is named `<name><suffix>` unless `renames`
    /// names it, e.g. `_restored`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,32}$"), length(min = 1, max = 32))]
    pub suffix: Option<String>,
    /// Mode `Beside`: new names of restored collections, each `from` once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = MAX_RESTORE_COLLECTIONS),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["from"])
    )]
    pub renames: Option<Vec<CollectionRename>>,
}

/// How a restore's target relates to its source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RestoreMode {
    #[default]
    InPlace,
    Beside,
    NewInstance,
}

impl std::fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A restored collection's new name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct CollectionRename {
    /// The collection in the backup.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"), length(min = 1, max = 64))]
    pub from: String,
    /// Its name once restored (no collection of the database may have it yet).
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"), length(min = 1, max = 64))]
    pub to: String,
}

/// What became of the restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseRestoreStatus {
    /// `Pending` (waiting: for another restore of the same instance, say), `Restoring`,
    /// `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// The exact moment restored to (RFC 3339): the time of the last change replayed, at
    /// or before `toTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub restored_to: Option<String>,
    /// Documents in the restored data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<u64>,
    /// Bytes restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// What is happening or what happened, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub message: Option<String>,
    /// When the restore started running (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub started_at: Option<String>,
    /// When it succeeded or failed for good (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub finished_at: Option<String>,
    /// Times the restore was started (a retry after a passing failure or an operator
    /// restart starts it over, or sends `commit` again when it is set).
    #[serde(default)]
    pub attempts: u32,
    /// The step that makes the restore visible, recorded before it is sent: once it is set,
    /// a retry or an operator restart sends this step again (answered as the first time
    /// when it took effect) rather than restoring anew, which would overwrite what clients
    /// wrote since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<RestoreCommit>,
    /// `Progressing` and `Succeeded`, with reasons.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A restore's last step, as `status.commit` records it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreCommit {
    /// `Publish`: the import, a staging database (`<database>~restore`), becomes the
    /// restored collections of `database`. `Finish` (mode `NewInstance`): the import is
    /// `database` itself, served from then on.
    pub step: CommitStep,
    /// The import's id: the step, sent again, names it.
    #[schemars(length(max = 256))]
    pub import_id: String,
    /// The replica set holding the import.
    #[schemars(length(max = 128))]
    pub replica_set: String,
    /// The database restored into.
    #[schemars(length(max = 64))]
    pub database: String,
    /// The route epoch of `database` the step was made for (a datanode refuses a
    /// `Publish` not applied yet once a migration has moved the database past it).
    pub route_epoch: u64,
    /// `Publish`: `database` becomes exactly the restored collections (the others
    /// dropped).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole: bool,
    /// `Publish`: a collection of `collections` replaces the one of its new name (else
    /// such a name is refused).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
    /// `Publish` not `whole`: each restored collection (`from`) and the name it gets
    /// (`to`, replaced with `replace`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collections: Vec<CollectionRename>,
    /// The status's `restoredTo` once the step is answered.
    #[schemars(length(max = 40))]
    pub restored_to: String,
    /// The status's `documents` once the step is answered.
    pub documents: u64,
    /// The status's `bytes` once the step is answered.
    pub bytes: u64,
}

/// The step a [`RestoreCommit`] sends.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CommitStep {
    Publish,
    Finish,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    Pending,
    Restoring,
    Succeeded,
    Failed,
}

impl std::fmt::Display for RestorePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl DatabaseRestoreSpec {
    /// Mode `Beside`: the name `collection` is restored under.
    pub fn beside_name(&self, collection: &str) -> Option<String> {
        let renamed = self.target.renames.iter().flatten().find(|r| r.from == collection).map(|r| r.to.clone());
        renamed.or_else(|| self.target.suffix.as_ref().map(|s| format!("{collection}{s}")))
    }
}
