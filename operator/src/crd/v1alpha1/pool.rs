//! `ResourcePool`: where replica sets run, and how databases share them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::StorageSpec;

/// A pool of replica sets. `shared` pools pack many small databases into each replica set
/// (up to `databasesPerReplicaSet`); `dedicated` pools give each database its own. Instances
/// name their pool; moving an instance to another pool is a hot migration.
// The derive's repeated `printcolumn(type_ = ...)` keys trip this lint.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "nimbus.io",
    version = "v1alpha1",
    kind = "ResourcePool",
    namespaced,
    shortname = "nrp",
    status = "ResourcePoolStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Replica sets", type_ = "integer", json_path = ".status.replicaSetCount"),
    printcolumn(name = "Databases", type_ = "integer", json_path = ".status.databaseCount"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // Replica sets are named `{pool}-rs{n}`: Service names (DNS labels) with room for the
    // suffix and the members' `-m{id}`.
    // On create only, as the instance's name rule: an older pool can still be deleted.
    validation = Rule::new("oldSelf.hasValue() || (self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$'))")
        .optional_old_self(true)
        .message("the name must be a DNS label of at most 40 characters: lowercase letters, digits and '-', starting with a letter")
)]
#[x_kube(validation = Rule::new("self.mode == oldSelf.mode").message("spec.mode cannot change"))]
#[x_kube(validation = Rule::new("self.replicasPerSet == oldSelf.replicasPerSet")
    .message("spec.replicasPerSet cannot change: existing replica sets keep their size"))]
#[serde(rename_all = "camelCase")]
pub struct ResourcePoolSpec {
    /// `shared` or `dedicated`.
    #[serde(default)]
    pub mode: PoolMode,
    /// Members of each replica set: 3, or 5.
    #[serde(default = "default_replicas_per_set")]
    #[x_kube(validation = Rule::new("self == 3 || self == 5").message("replicasPerSet is 3 or 5"))]
    pub replicas_per_set: i32,
    /// Shared pools: databases a replica set takes before a new one is made.
    #[serde(default = "default_databases_per_set")]
    #[schemars(range(min = 1, max = 100000))]
    pub databases_per_replica_set: u32,
    /// Nodes the pool's datanodes may run on (in addition to their zone).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pool's datanodes (for tainted, pool-dedicated nodes).
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Each member's volume.
    #[serde(default)]
    pub storage: StorageSpec,
    /// CPU and memory of each datanode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PoolMode {
    /// Many databases per replica set.
    #[default]
    Shared,
    /// One replica set per database.
    Dedicated,
}

fn default_replicas_per_set() -> i32 {
    3
}

fn default_databases_per_set() -> u32 {
    200
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourcePoolStatus {
    /// `Ready` and `Degraded`, with reasons.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The pool's replica sets.
    #[serde(default)]
    pub replica_sets: Vec<ReplicaSetStatus>,
    #[serde(default)]
    pub replica_set_count: u32,
    #[serde(default)]
    pub database_count: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSetStatus {
    pub name: String,
    /// Databases placed in it.
    pub databases: u32,
    /// Member zones, in member order.
    #[serde(default)]
    pub zones: Vec<String>,
}
