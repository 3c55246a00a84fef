//! `DatabaseInstance`: one tenant database, served by a replica set in three zones.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// `status.migration` is the migration record's own status view: one type for the CRD,
// `playground.json` and the control plane, its schema bounds declared there.
use crate::controlplane::migration::MigrationStatus;

/// A tenant database. Apply one and the operator places it in a pool's replica set (three
/// members in three zones), writes its route and users, and reports it `Ready` with the
/// endpoint and a credentials Secret.
// The derive's repeated `printcolumn(type_ = ...)` keys trip this lint.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "nimbus.io",
    version = "v1alpha1",
    kind = "DatabaseInstance",
    namespaced,
    shortname = "dbi",
    status = "DatabaseInstanceStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "Members", type_ = "string", json_path = ".status.readyMembers"),
    printcolumn(name = "Zones", type_ = "string", json_path = ".status.zonesSummary"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.placement.leader"),
    printcolumn(name = "Migration", type_ = "string", json_path = ".status.migrationSummary"),
    printcolumn(name = "Last Backup", type_ = "date", json_path = ".status.backup.lastFull"),
    // A date column shows an age: how far back a point-in-time restore can go.
    printcolumn(name = "Restorable From", type_ = "date", json_path = ".status.backup.earliestRestorable"),
    printcolumn(name = "Restorable To", type_ = "string", json_path = ".status.backup.latestRestorable", priority = 1),
    printcolumn(name = "QPS", type_ = "integer", json_path = ".status.limits.qps", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 50").message("the name must be at most 50 characters"),
    // Replica sets, Services and Pods are named after instances: a DNS label, no dots.
    // On create only (`oldSelf` optional and absent): an instance made before this rule
    // can still be updated, and deleted (its finalizer removed).
    validation = Rule::new("oldSelf.hasValue() || self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .optional_old_self(true)
        .message("the name must be a DNS label: lowercase letters, digits and '-', starting with a letter"),
    // The database name is `spec.database`, else the instance's name; it never changes,
    // not even by setting `spec.database` later to another name.
    validation = Rule::new("!has(oldSelf.spec) || (has(self.spec) && has(self.spec.database) ? self.spec.database : self.metadata.name) == (has(oldSelf.spec.database) ? oldSelf.spec.database : oldSelf.metadata.name)")
        .message("the database name (spec.database, else the instance's name) cannot change: move data with a migration instead"),
    // A pool change starts a hot migration; another while one runs is refused here. The
    // stored status is visible to a rule on the root for a spec update (the API server puts
    // the old status into the new object before validating), and a status update keeps the
    // spec, so the operator's own writes always pass. A migration runs while
    // `status.migration` has no `finishedAt` (the operator clears it with a merge patch's
    // `null`, which removes the key). The race this cannot see (a second change before
    // the operator wrote the first one's status) is queued by the reconciler.
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.migration) || has(oldSelf.status.migration.finishedAt) || !has(oldSelf.spec) || !has(self.spec) || self.spec.pool == oldSelf.spec.pool")
        .message("spec.pool cannot change while a migration runs (retries between attempts included): wait until status.migration.finishedAt is set, phase Completed or Aborted for good (kubectl get dbi shows it in the MIGRATION column), then change it again"),
)]
#[x_kube(validation = Rule::new("self.tier == oldSelf.tier || (self.tier != 'dedicated' && oldSelf.tier != 'dedicated')")
    .message("spec.tier cannot change between shared (free, standard) and dedicated: a dedicated instance has a replica set of its own. To move a database to a replica set of its own, change spec.pool to a pool of mode Dedicated (a hot migration); to share again, change spec.pool to a shared pool"))]
#[x_kube(validation = Rule::new("self.replicas == oldSelf.replicas")
    .message("spec.replicas cannot change yet: a replica set keeps the size it was made with"))]
#[x_kube(validation = Rule::new("self.storage.size == oldSelf.storage.size && (has(self.storage.storageClassName) == has(oldSelf.storage.storageClassName)) && (!has(self.storage.storageClassName) || self.storage.storageClassName == oldSelf.storage.storageClassName)")
    .message("spec.storage cannot change yet: members keep the volumes they were made with"))]
#[x_kube(validation = Rule::new("!has(oldSelf.zones) || (has(self.zones) && self.zones == oldSelf.zones)")
    .message("spec.zones cannot change once set: each member's zone is fixed for its life"))]
#[x_kube(validation = Rule::new("!has(self.zones) || self.zones.size() == 0 || self.zones.size() >= 3")
    .message("spec.zones lists at least three zones (or none: the operator chooses)"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || !has(self.autoscaling.minQps) || !has(self.autoscaling.maxQps) || self.autoscaling.minQps <= self.autoscaling.maxQps")
    .message("autoscaling.minQps must not exceed autoscaling.maxQps"))]
#[serde(rename_all = "camelCase")]
pub struct DatabaseInstanceSpec {
    /// Name of the database in the data API (`/v1/databases/{database}`). Defaults to the
    /// instance's name. Cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"), length(max = 64))]
    pub database: Option<String>,

    /// Service tier: sets the default limits and whether the database shares a replica set.
    #[serde(default)]
    pub tier: Tier,

    /// The ResourcePool (same namespace) whose replica sets hold this database. Changing it
    /// moves the database to a replica set of the new pool while it serves (a hot
    /// migration, shown in `status.migration`); refused while a migration runs.
    #[serde(default = "default_pool")]
    #[schemars(length(min = 1, max = 40))]
    pub pool: String,

    /// Availability zones (values of `topology.kubernetes.io/zone`) for the members, at least
    /// three, each once. Empty: three distinct zones found on the nodes. Cannot change once set.
    // Bounded (a label value is at most 63 characters) so the rules comparing zones stay
    // cheap in the API server's cost estimate (tests/cel_cost.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_ZONES), inner(length(min = 1, max = 63)), extend("x-kubernetes-list-type" = "set"))]
    pub zones: Option<Vec<String>>,

    /// Members of a dedicated replica set: 3, or 5 to survive two failures. Shared pools use
    /// the pool's size.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self == 3 || self == 5").message("replicas is 3 or 5"))]
    pub replicas: i32,

    /// Each member's volume.
    #[serde(default)]
    pub storage: StorageSpec,

    /// CPU and memory of each datanode of a dedicated replica set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Per-database limits the gateways enforce; unset fields take the tier's defaults.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// Elastic scaling of the limits (and, past the pool's room, a migration). NOT YET
    /// ACTIVE: accepted and kept, but no controller scales yet; `status.notYetActive` says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Backups and point-in-time restore (`docs/backup.md`): on by default. Taken by the
    /// operator when it runs with a backup store (`--backup-url` or `--backup-dir`, the
    /// chart's `backup` values); without one, `status.notYetActive` lists `backup`.
    #[serde(default)]
    pub backup: BackupSpec,

    /// Users of the database. One `readWrite` user named `app` and one `read` user named
    /// `reader` are created when the list is empty. At most 32, names unique.
    // A list-map keyed by name: the API server refuses duplicate names itself (a CEL rule
    // comparing every pair was quadratic, and refused for its estimated cost), and
    // server-side apply merges users by name.
    #[serde(default)]
    #[schemars(length(max = MAX_USERS), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub users: Vec<UserSpec>,

    /// Automatic index management from the query statistics. NOT YET ACTIVE: no index is
    /// created or dropped automatically yet; `status.notYetActive` lists it while that is so.
    #[serde(default)]
    pub indexing: IndexingSpec,
}

/// Most zones an instance can name.
pub const MAX_ZONES: u32 = 8;
/// Most users an instance can have.
pub const MAX_USERS: u32 = 32;

fn default_pool() -> String {
    "default".into()
}

fn default_replicas() -> i32 {
    3
}

/// Service tiers, each with default limits (see `nimbus_api::etcd::Limits::for_tier`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Tier {
    /// Small limits, a shared replica set.
    Free,
    /// The default: moderate limits, a shared replica set.
    #[default]
    Standard,
    /// High limits and a replica set of its own.
    Dedicated,
}

impl From<Tier> for nimbus_api::etcd::Tier {
    fn from(t: Tier) -> Self {
        match t {
            Tier::Free => nimbus_api::etcd::Tier::Free,
            Tier::Standard => nimbus_api::etcd::Tier::Standard,
            Tier::Dedicated => nimbus_api::etcd::Tier::Dedicated,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Volume size of each member, as a Kubernetes quantity.
    #[serde(default = "default_storage_size")]
    #[schemars(length(min = 1, max = 32))]
    pub size: String,
    /// StorageClass of the members' PVCs; the cluster default when unset. Use a class with
    /// `volumeBindingMode: WaitForFirstConsumer` so volumes follow the zone pinning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec { size: default_storage_size(), storage_class_name: None }
    }
}

fn default_storage_size() -> String {
    "10Gi".into()
}

/// Limits; each unset field takes the tier's default.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Sustained requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub qps: Option<u32>,
    /// Requests allowed at once above the sustained rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Concurrent client connections per gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests in flight at once per gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight: Option<u32>,
}

impl LimitsSpec {
    /// The limits the gateways enforce: these fields over the tier's defaults.
    pub fn resolve(&self, tier: Tier) -> nimbus_api::etcd::Limits {
        let d = nimbus_api::etcd::Limits::for_tier(tier.into());
        nimbus_api::etcd::Limits {
            tier: d.tier,
            qps: self.qps.unwrap_or(d.qps),
            burst: self.burst.unwrap_or(d.burst),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_in_flight: self.max_in_flight.unwrap_or(d.max_in_flight),
        }
    }
}

/// Elastic scaling: the per-database load over a sliding window, spikes filtered out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Turn elastic scaling on.
    #[serde(default)]
    pub enabled: bool,
    /// The QPS limit never goes below this.
    #[serde(default = "default_min_qps")]
    pub min_qps: u32,
    /// The QPS limit never goes above this (past the pool's room, the database migrates).
    #[serde(default = "default_max_qps")]
    pub max_qps: u32,
    /// Length of the sliding window the load is measured over.
    #[serde(default = "default_window")]
    pub window_seconds: u32,
    /// Least time between two scaling decisions.
    #[serde(default = "default_cooldown")]
    pub cooldown_seconds: u32,
}

fn default_min_qps() -> u32 {
    100
}
fn default_max_qps() -> u32 {
    20_000
}
fn default_window() -> u32 {
    300
}
fn default_cooldown() -> u32 {
    600
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Take full backups and archive the oplog continuously for point-in-time restore.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Kept for manifests written for the first CRD; not used. Full backups are taken
    /// when the written data makes one worthwhile (more writes, more fulls; at least one a
    /// day), and the oplog is archived every few seconds (`docs/backup.md`).
    #[serde(default = "default_schedule")]
    #[schemars(length(max = 128))]
    pub schedule: String,
    /// How far back a point-in-time restore can go, in days (at most 35).
    #[serde(default = "default_retention_days")]
    #[schemars(range(min = 1, max = 35))]
    pub retention_days: u32,
}

impl Default for BackupSpec {
    fn default() -> Self {
        BackupSpec { enabled: true, schedule: default_schedule(), retention_days: default_retention_days() }
    }
}

fn default_true() -> bool {
    true
}
fn default_schedule() -> String {
    "0 3 * * *".into()
}
fn default_retention_days() -> u32 {
    7
}

/// A user of the database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    /// User name, unique in the instance.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"), length(max = 64))]
    pub name: String,
    /// `readWrite`, or `read` for a read-only account.
    #[serde(default)]
    pub role: UserRole,
    /// A Secret key holding this user's token secret (at least 22 characters). Unset: the
    /// operator generates one and writes the token to `<instance>-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum UserRole {
    #[default]
    ReadWrite,
    Read,
}

impl From<UserRole> for nimbus_api::etcd::UserRole {
    fn from(r: UserRole) -> Self {
        match r {
            UserRole::ReadWrite => nimbus_api::etcd::UserRole::ReadWrite,
            UserRole::Read => nimbus_api::etcd::UserRole::Read,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name, in the instance's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IndexingSpec {
    /// Create indexes for frequent slow query shapes, and drop automatic ones left unused.
    #[serde(default = "default_true")]
    pub automatic: bool,
    /// At most this many automatic indexes per collection.
    #[serde(default = "default_max_auto_indexes")]
    #[schemars(range(min = 0, max = 64))]
    pub max_automatic_indexes: u32,
}

impl Default for IndexingSpec {
    fn default() -> Self {
        IndexingSpec { automatic: true, max_automatic_indexes: default_max_auto_indexes() }
    }
}

fn default_max_auto_indexes() -> u32 {
    8
}

/// What the operator observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseInstanceStatus {
    /// `Pending`, `Provisioning`, `Ready`, `Degraded`, `Deleting` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready`, `Progressing` and `Degraded`, with reasons.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The gateway URL applications connect to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The database name in the data API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The Secret holding endpoint, database, token and read-only token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Where the database lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    /// The member zones, comma-separated (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones_summary: Option<String>,
    /// The limits in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsStatus>,
    /// The running migration between replica sets, or the last one (kept until the next
    /// one starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// The migration's phase and progress in a few words (for `kubectl get`), e.g.
    /// `Copying 41 MB`, `CatchingUp 1,240 ops behind`, `Completed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub migration_summary: Option<String>,
    /// Where a pool change moves the database: chosen once, kept until the migration
    /// completes (or spec.pool goes back to the pool the database is on).
    // Written as `null` to clear it: the status is a merge patch, which keeps a key left out.
    #[serde(default)]
    pub migration_target: Option<MigrationTarget>,
    /// Backups and the restorable window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
    /// Spec sections that ask for something the operator does not do yet (`backup`,
    /// `autoscaling`, `indexing`): accepted and kept, not acted on.
    // Always written, `[]` included: the status is a merge patch, which keeps a key left out.
    #[serde(default)]
    pub not_yet_active: Vec<String>,
    /// Members ready out of members, e.g. `3/3` (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_members: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Provisioning,
    Ready,
    Degraded,
    Deleting,
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// The replica set holding the database.
    pub replica_set: String,
    /// The pool the replica set belongs to.
    pub pool: String,
    /// The member that leads now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The members with their zones and roles.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// The member's Raft id in its replica set.
    pub id: u64,
    /// Its Pod.
    pub name: String,
    /// Its zone, fixed for its life.
    pub zone: String,
    /// `leader`, `follower`, `learner`, or `unknown` while it does not answer.
    pub role: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsStatus {
    pub qps: u32,
    pub burst: u32,
    pub max_connections: u32,
    pub max_in_flight: u32,
}

/// The replica set a pool change moves the database to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationTarget {
    /// The replica set chosen in the new pool.
    #[schemars(length(max = 63))]
    pub replica_set: String,
    /// The pool it belongs to (spec.pool when it was chosen).
    #[schemars(length(max = 40))]
    pub pool: String,
    /// The migration started for it (its id), once started: an attempt given up is not
    /// started again by itself.
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub migration: Option<String>,
}

/// An instance's backups: the newest full and the window a point-in-time restore can
/// reach (times in RFC 3339, UTC), as the playground's `backup` object shows them
/// (`API.md` section 3).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// When the newest complete full backup ended (its consistent point).
    #[serde(default)]
    #[schemars(length(max = 40))]
    pub last_full: Option<String>,
    /// The earliest moment a `DatabaseRestore` can return to.
    #[serde(default)]
    #[schemars(length(max = 40))]
    pub earliest_restorable: Option<String>,
    /// The latest moment a `DatabaseRestore` can return to (seconds behind now while the
    /// oplog archive keeps up).
    #[serde(default)]
    #[schemars(length(max = 40))]
    pub latest_restorable: Option<String>,
    /// The backups' latest failure, until the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub error: Option<String>,
    /// The replica consistency check of the newest full backup failed: the members whose
    /// checksum of the database differed from the leader's at the same log index (also an
    /// Event `ReplicaChecksumMismatch`). Cleared when a later full finds them agreeing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub replica_mismatch: Option<String>,
    /// The end of the newest full backup verified by restoring it to scratch space and
    /// comparing its checksum (right after the first full, then daily).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub last_verified: Option<String>,
    /// The latest verification's failure (a damaged object, a checksum that differs),
    /// until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub verify_error: Option<String>,
}

impl DatabaseInstance {
    /// The spec sections that ask for what the operator does not do yet; `backups_running`:
    /// whether this operator takes backups (it has a backup store).
    pub fn not_yet_active(&self, backups_running: bool) -> Vec<String> {
        let mut out = Vec::new();
        if self.spec.autoscaling.as_ref().is_some_and(|a| a.enabled) {
            out.push("autoscaling".to_string());
        }
        if self.spec.backup.enabled && !backups_running {
            out.push("backup".to_string());
        }
        if self.spec.indexing.automatic {
            out.push("indexing".to_string());
        }
        out
    }

    /// The database name: `spec.database`, else the instance's name.
    pub fn database(&self) -> String {
        self.spec.database.clone().unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }

    /// The users to create: the spec's, or `app` (readWrite) and `reader` (read).
    pub fn users(&self) -> Vec<UserSpec> {
        if !self.spec.users.is_empty() {
            return self.spec.users.clone();
        }
        vec![
            UserSpec { name: "app".into(), role: UserRole::ReadWrite, secret_ref: None },
            UserSpec { name: "reader".into(), role: UserRole::Read, secret_ref: None },
        ]
    }
}

/// Labels shared by everything the operator makes, keyed by a name.
pub fn labels(component: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "nimbus".to_string()),
        ("app.kubernetes.io/component".to_string(), component.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "nimbus-operator".to_string()),
    ]);
    for (k, v) in extra {
        l.insert((*k).to_string(), (*v).to_string());
    }
    l
}
