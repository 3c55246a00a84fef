//! The Kubernetes objects the operator wants to exist: built from the resources and the
//! operator's settings, with no I/O. Written as JSON shaped like the YAML a person would
//! write, then typed; the tests below check every builder's output as data.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ResourceRequirements, Secret, Service, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crd::v1alpha1::labels;

pub const LABEL_REPLICA_SET: &str = "nimbus.io/replica-set";
pub const LABEL_MEMBER: &str = "nimbus.io/member-id";
pub const LABEL_ZONE: &str = "nimbus.io/zone";
pub const LABEL_POOL: &str = "nimbus.io/pool";
pub const LABEL_INSTANCE: &str = "nimbus.io/instance";
/// On a member Pod: its Raft role, `leader` or `follower` (kept by the replica-set
/// reconciler; absent until the replica set has a leader).
pub const LABEL_ROLE: &str = "nimbus.io/role";
pub const ROLE_LEADER: &str = "leader";
pub const ROLE_FOLLOWER: &str = "follower";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const ANNOTATION_SPEC_HASH: &str = "nimbus.io/spec-hash";
/// On a replica set's Service: the zone of each member slot, comma-separated. The replica
/// set's own record: written once at placement, never changed.
pub const ANNOTATION_ZONES: &str = "nimbus.io/zones";
/// On a replica set's Service: present once its Raft membership was initialised.
pub const ANNOTATION_BOOTSTRAPPED: &str = "nimbus.io/bootstrapped";
/// On a dedicated replica set's Service while the operator removes the replica set (its
/// instance moved away: `k8s::retire`), saying why: its reconciler steps it no more, so no
/// pass replaces the members being deleted.
pub const ANNOTATION_REMOVING: &str = "nimbus.io/removing";

pub const DATA_PORT: u16 = 7000;
pub const ADMIN_PORT: u16 = 7100;
pub const RAFT_PORT: u16 = 7200;
pub const GATEWAY_PORT: u16 = 8080;
pub const GATEWAY_ADMIN_PORT: u16 = 8081;
pub const GATEWAY_NAME: &str = "nimbus-gateway";
/// The uid and gid the images run as (distroless "nonroot").
pub const RUN_AS: i64 = 65532;
/// How long a stopping leader tries to hand its leadership over (the datanode's
/// `--shutdown-handoff-ms`; see docs/datanode.md, Shutdown).
pub const MEMBER_SHUTDOWN_HANDOFF_MS: u64 = 5_000;
/// The kubelet kills a member's datanode this long after SIGTERM: the handoff and what
/// follows it fit with room to spare (a slow disk's last sync). No preStop hook: the image
/// has no shell, and the datanode does the handoff on SIGTERM itself, which also covers a
/// drain, an eviction and a `kubectl delete pod`, none of which runs anything else first.
pub const MEMBER_TERMINATION_GRACE_SECONDS: i64 = 30;

/// The Secret the operator keeps in every namespace it runs datanodes and gateways in: the
/// cluster secret and the gateways' etcd credentials, copied from its own mount.
pub const INTERNAL_SECRET: &str = "nimbus-internal";
/// Where Pods mount it.
pub const INTERNAL_MOUNT: &str = "/etc/nimbus/internal";
/// Its keys (file names).
pub const CLUSTER_SECRET_KEY: &str = "cluster-secret";
pub const ETCD_CA_KEY: &str = "etcd-ca.crt";
pub const ETCD_GATEWAY_CERT_KEY: &str = "etcd-gateway.crt";
pub const ETCD_GATEWAY_KEY_KEY: &str = "etcd-gateway.key";
/// On a gateway Pod template: the hash of the internal Secret, so a rotation rolls them.
pub const ANNOTATION_INTERNAL_HASH: &str = "nimbus.io/internal-hash";

/// The operator's settings that shape what it builds.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub datanode_image: String,
    pub gateway_image: String,
    pub image_pull_policy: String,
    pub etcd_endpoints: Vec<String>,
    pub gateway_replicas: i32,
    /// Service-account name of the gateway Pods (it needs no API access).
    pub gateway_service_account: Option<String>,
    /// The operator's internal files: the cluster secret, and with a TLS etcd its CA and
    /// the gateways' client certificate and key. Each namespace's [`INTERNAL_SECRET`] holds
    /// them with the cluster secret replaced by the namespace's own ([`Settings::internal_files_for`]).
    pub internal_files: BTreeMap<String, String>,
    /// The operator's namespace: its Pods are the only ones outside a tenant namespace that
    /// reach datanodes and the gateways' admin port.
    pub operator_namespace: String,
    /// Build NetworkPolicies for datanodes and gateways.
    pub network_policies: bool,
    /// Namespaces (a label selector) whose Pods may scrape metrics from the admin ports.
    pub metrics_namespace_selector: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            datanode_image: "ghcr.io/nimbus-db/nimbus-datanode:0.1.0".into(),
            gateway_image: "ghcr.io/nimbus-db/nimbus-gateway:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            etcd_endpoints: vec!["http://nimbus-etcd:2379".into()],
            gateway_replicas: 2,
            gateway_service_account: None,
            internal_files: BTreeMap::from([(
                CLUSTER_SECRET_KEY.to_string(),
                "example-cluster-secret-0123456789abcdefghijklmno".to_string(),
            )]),
            operator_namespace: "nimbus-system".into(),
            network_policies: true,
            metrics_namespace_selector: BTreeMap::new(),
        }
    }
}

impl Settings {
    /// The etcd the gateways reach uses TLS (its CA is in the internal Secret).
    pub fn etcd_tls(&self) -> bool {
        self.internal_files.contains_key(ETCD_CA_KEY)
    }

    /// The files of namespace `ns`'s internal Secret: the cluster secret scoped to the
    /// namespace (its datanodes accept that one only), the gateways' etcd credentials.
    pub fn internal_files_for(&self, ns: &str) -> BTreeMap<String, String> {
        let mut files = self.internal_files.clone();
        // Fail closed: never the cluster's own secret, even if it does not parse (the
        // operator checks it at start; the namespace's datanodes then refuse everyone).
        let scoped = files
            .get(CLUSTER_SECRET_KEY)
            .and_then(|master| nimbus_net::ClusterSecret::parse(master).ok())
            .map(|secret| secret.scoped_file(ns))
            .unwrap_or_default();
        files.insert(CLUSTER_SECRET_KEY.to_string(), scoped);
        files
    }

    /// A hash of the files `keys` of namespace `ns`'s internal Secret: Pods that mount them
    /// roll when they change, and only then.
    pub fn internal_hash(&self, ns: &str, keys: &[&str]) -> String {
        let files = self.internal_files_for(ns);
        let mounted: BTreeMap<&String, &String> = files.iter().filter(|(k, _)| keys.contains(&k.as_str())).collect();
        let text = serde_json::to_string(&mounted).unwrap_or_default();
        hex::encode(&Sha256::digest(text.as_bytes())[..8])
    }
}

/// One replica set's shape, as the member objects need it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaSetShape {
    pub name: String,
    pub namespace: String,
    pub pool: String,
    pub storage_size: String,
    pub storage_class: Option<String>,
    pub resources: Option<ResourceRequirements>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// Owner of the replica set's objects: the instance (dedicated) or the pool (shared).
    pub owner: Option<OwnerReference>,
}

pub fn member_pod_name(replica_set: &str, id: u64) -> String {
    format!("{replica_set}-m{id}")
}

pub fn member_pvc_name(replica_set: &str, id: u64) -> String {
    format!("{}-data", member_pod_name(replica_set, id))
}

/// The stable DNS name of a member (through the replica set's headless Service).
pub fn member_host(rs: &ReplicaSetShape, id: u64) -> String {
    format!("{}.{}.{}.svc", member_pod_name(&rs.name, id), rs.name, rs.namespace)
}

pub fn gateway_endpoint(namespace: &str) -> String {
    format!("http://{GATEWAY_NAME}.{namespace}.svc:{GATEWAY_PORT}")
}

/// The object built as JSON, as its Kubernetes type. Deserialising drops fields the type
/// does not know; the builder tests (which call every builder) check that nothing was
/// dropped, so a misspelt or misplaced field fails a test instead of vanishing.
#[allow(clippy::expect_used)]
fn typed<T: DeserializeOwned + serde::Serialize>(v: Value) -> T {
    #[cfg(test)]
    let built = v.clone();
    let t: T =
        serde_json::from_value(v).expect("the built object matches its Kubernetes type (checked by the builder tests)");
    #[cfg(test)]
    tests::assert_nothing_dropped(&built, &serde_json::to_value(&t).expect("a Kubernetes object serialises"), "");
    t
}

fn meta(name: &str, rs: &ReplicaSetShape, component: &str, extra: &[(&str, &str)]) -> Value {
    let mut l = labels(component, extra);
    l.insert(LABEL_REPLICA_SET.into(), rs.name.clone());
    l.insert(LABEL_POOL.into(), rs.pool.clone());
    json!({
        "name": name,
        "namespace": rs.namespace,
        "labels": l,
        "ownerReferences": rs.owner.iter().collect::<Vec<_>>(),
    })
}

/// The spec hash of a member Pod: what, when it changes, needs a (rolling) restart.
pub fn member_spec_hash(settings: &Settings, rs: &ReplicaSetShape) -> String {
    let secret = settings.internal_hash(&rs.namespace, &[CLUSTER_SECRET_KEY]);
    let inputs = json!([settings.datanode_image, rs.resources, rs.node_selector, rs.tolerations, secret]);
    hex::encode(&Sha256::digest(inputs.to_string().as_bytes())[..8])
}

/// The Pod of member `id`, pinned to its zone and spread from its siblings.
pub fn member_pod(settings: &Settings, rs: &ReplicaSetShape, id: u64, zone: &str) -> Pod {
    let name = member_pod_name(&rs.name, id);
    let id_s = id.to_string();
    let mut metadata = meta(&name, rs, "datanode", &[(LABEL_MEMBER, &id_s), (LABEL_ZONE, zone)]);
    metadata["annotations"] = json!({ ANNOTATION_SPEC_HASH: member_spec_hash(settings, rs) });
    let mut node_terms = vec![json!({"key": ZONE_LABEL, "operator": "In", "values": [zone]})];
    for (k, v) in &rs.node_selector {
        node_terms.push(json!({"key": k, "operator": "In", "values": [v]}));
    }
    typed(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "hostname": name,
            "subdomain": rs.name,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": MEMBER_TERMINATION_GRACE_SECONDS,
            "enableServiceLinks": false,
            "automountServiceAccountToken": false,
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": node_terms}]
                    }
                },
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {LABEL_REPLICA_SET: rs.name}}
                        }
                    }]
                }
            },
            "tolerations": rs.tolerations,
            "securityContext": {
                "runAsNonRoot": true, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                "seccompProfile": {"type": "RuntimeDefault"}
            },
            "containers": [{
                "name": "datanode",
                "image": settings.datanode_image,
                "imagePullPolicy": settings.image_pull_policy,
                "env": [
                    {"name": "NIMBUS_NODE_ID", "value": id_s},
                    {"name": "NIMBUS_ZONE", "value": zone},
                    {"name": "NIMBUS_REPLICA_SET", "value": rs.name},
                    {"name": "NIMBUS_DATA_DIR", "value": "/data/nimbus"},
                    {"name": "NIMBUS_DATA_LISTEN", "value": format!("0.0.0.0:{DATA_PORT}")},
                    {"name": "NIMBUS_ADMIN_LISTEN", "value": format!("0.0.0.0:{ADMIN_PORT}")},
                    {"name": "NIMBUS_RAFT_LISTEN", "value": format!("0.0.0.0:{RAFT_PORT}")},
                    {"name": "NIMBUS_ADVERTISE_HOST", "value": member_host(rs, id)},
                    {"name": "NIMBUS_CLUSTER_SECRET_FILE", "value": format!("{INTERNAL_MOUNT}/{CLUSTER_SECRET_KEY}")},
                    {"name": "NIMBUS_SHUTDOWN_HANDOFF_MS", "value": MEMBER_SHUTDOWN_HANDOFF_MS.to_string()},
                    {"name": "RUST_LOG", "value": "info"}
                ],
                "ports": [
                    {"name": "data", "containerPort": DATA_PORT},
                    {"name": "admin", "containerPort": ADMIN_PORT},
                    {"name": "raft", "containerPort": RAFT_PORT}
                ],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 2, "failureThreshold": 3},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "admin"}, "periodSeconds": 10, "failureThreshold": 6},
                "resources": rs.resources.clone().unwrap_or_default(),
                "securityContext": {
                    "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}
                },
                "volumeMounts": [
                    {"name": "data", "mountPath": "/data"},
                    {"name": "internal", "mountPath": INTERNAL_MOUNT, "readOnly": true}
                ]
            }],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": member_pvc_name(&rs.name, id)}},
                // A datanode needs the cluster secret only, not the gateways' etcd identity.
                internal_volume(&[CLUSTER_SECRET_KEY])
            ]
        }
    }))
}

/// The volume of member `id`. It outlives its Pod: a Pod recreated on it keeps the data.
pub fn member_pvc(rs: &ReplicaSetShape, id: u64, zone: &str) -> PersistentVolumeClaim {
    let id_s = id.to_string();
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": rs.storage_size}}
    });
    if let Some(class) = &rs.storage_class {
        spec["storageClassName"] = json!(class);
    }
    let mut metadata =
        meta(&member_pvc_name(&rs.name, id), rs, "datanode", &[(LABEL_MEMBER, &id_s), (LABEL_ZONE, zone)]);
    // No owner: a volume must outlive anything a user deletes casually (a pool, an
    // uninstall). The operator deletes a dedicated replica set's volumes with its instance.
    metadata["ownerReferences"] = json!([]);
    typed(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": spec
    }))
}

/// The instance a replica set is dedicated to, if it is: its Service is controller-owned
/// by a DatabaseInstance (placement makes it so for a dedicated pool or the `dedicated`
/// tier, and a replica set keeps what it was made as). A shared one is owned by its pool,
/// or by no one.
pub fn dedicated_owner(svc: &Service) -> Option<&OwnerReference> {
    svc.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true) && o.kind == "DatabaseInstance")
}

/// The other instance a replica set is dedicated to, when it is not `uid`'s: a dedicated
/// name can be another's (pool `a` with instance `b-c`, pool `a-b` with instance `c`), and
/// such a replica set is never joined nor moved onto.
pub fn dedicated_to_another<'s>(svc: &'s Service, uid: Option<&str>) -> Option<&'s OwnerReference> {
    dedicated_owner(svc).filter(|o| Some(o.uid.as_str()) != uid)
}

/// The headless Service giving each member a stable DNS name; Raft addresses must resolve
/// before the members are ready, hence `publishNotReadyAddresses`.
pub fn replica_set_service(rs: &ReplicaSetShape, zones: &[String], bootstrapped: bool) -> Service {
    let mut metadata = meta(&rs.name, rs, "datanode", &[]);
    metadata["annotations"] = json!({ ANNOTATION_ZONES: zones.join(",") });
    if bootstrapped {
        metadata["annotations"][ANNOTATION_BOOTSTRAPPED] = json!("true");
    }
    typed(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": {LABEL_REPLICA_SET: rs.name},
            "ports": [
                {"name": "data", "port": DATA_PORT, "targetPort": "data"},
                {"name": "admin", "port": ADMIN_PORT, "targetPort": "admin"},
                {"name": "raft", "port": RAFT_PORT, "targetPort": "raft"}
            ]
        }
    }))
}

/// At most one member of a replica set of `members` evicted at a time (drains, upgrades):
/// `minAvailable: members - 1`. Not `maxUnavailable: 1`: with it the disruption controller
/// needs the scale of the Pods' controller, and member Pods have none (their owner is a
/// pool or an instance), so it would allow no eviction at all and every drain would hang.
pub fn replica_set_pdb(rs: &ReplicaSetShape, members: usize) -> PodDisruptionBudget {
    typed(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(&rs.name, rs, "datanode", &[]),
        "spec": {
            "minAvailable": members.saturating_sub(1).max(1),
            "selector": {"matchLabels": {LABEL_REPLICA_SET: rs.name}}
        }
    }))
}

/// The gateways of a namespace: stateless, spread over zones.
pub fn gateway_deployment(settings: &Settings, namespace: &str, owner: Option<&OwnerReference>) -> Deployment {
    let l = labels("gateway", &[]);
    let mut env = vec![
        json!({"name": "NIMBUS_GATEWAY_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "NIMBUS_ETCD", "value": settings.etcd_endpoints.join(",")}),
        json!({"name": "NIMBUS_LISTEN", "value": format!("0.0.0.0:{GATEWAY_PORT}")}),
        json!({"name": "NIMBUS_ADMIN_LISTEN", "value": format!("0.0.0.0:{GATEWAY_ADMIN_PORT}")}),
        json!({"name": "NIMBUS_CLUSTER_SECRET_FILE", "value": format!("{INTERNAL_MOUNT}/{CLUSTER_SECRET_KEY}")}),
        json!({"name": "RUST_LOG", "value": "info"}),
    ];
    let mut files = vec![CLUSTER_SECRET_KEY];
    if settings.etcd_tls() {
        for (var, key) in [
            ("NIMBUS_ETCD_CA_FILE", ETCD_CA_KEY),
            ("NIMBUS_ETCD_CERT_FILE", ETCD_GATEWAY_CERT_KEY),
            ("NIMBUS_ETCD_KEY_FILE", ETCD_GATEWAY_KEY_KEY),
        ] {
            env.push(json!({"name": var, "value": format!("{INTERNAL_MOUNT}/{key}")}));
            files.push(key);
        }
    }
    let selector = json!({"app.kubernetes.io/name": "nimbus", "app.kubernetes.io/component": "gateway"});
    typed(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": GATEWAY_NAME, "namespace": namespace, "labels": l, "ownerReferences": owner.iter().collect::<Vec<_>>()},
        "spec": {
            "replicas": settings.gateway_replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": l, "annotations": {ANNOTATION_INTERNAL_HASH: settings.internal_hash(namespace, &files)}},
                "spec": {
                    "serviceAccountName": settings.gateway_service_account,
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": ZONE_LABEL, "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": selector}
                    }],
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                        // The internal Secret's files are group-readable (0440).
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    "containers": [{
                        "name": "gateway",
                        "image": settings.gateway_image,
                        "imagePullPolicy": settings.image_pull_policy,
                        "env": env,
                        "ports": [
                            {"name": "http", "containerPort": GATEWAY_PORT},
                            {"name": "admin", "containerPort": GATEWAY_ADMIN_PORT}
                        ],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 2},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "admin"}, "periodSeconds": 10},
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                        "securityContext": {
                            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}
                        },
                        "volumeMounts": [{"name": "internal", "mountPath": INTERNAL_MOUNT, "readOnly": true}]
                    }],
                    "volumes": [internal_volume(&files)]
                }
            }
        }
    }))
}

/// The internal Secret as a volume with only `keys` in it, readable by the Pod's group.
fn internal_volume(keys: &[&str]) -> Value {
    let items: Vec<Value> = keys.iter().map(|k| json!({"key": k, "path": k})).collect();
    json!({"name": "internal", "secret": {"secretName": INTERNAL_SECRET, "items": items, "defaultMode": 0o440}})
}

/// The internal Secret of a namespace (see [`INTERNAL_SECRET`]).
pub fn internal_secret(settings: &Settings, namespace: &str) -> Secret {
    typed(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": INTERNAL_SECRET, "namespace": namespace, "labels": labels("internal", &[])},
        "type": "Opaque",
        "stringData": settings.internal_files_for(namespace)
    }))
}

/// Who may reach the datanodes of a namespace: gateways (same namespace) and the
/// operator their data port; the operator (and metrics scrapers) their admin port; other
/// datanodes (same namespace) their Raft port. Nothing else.
pub fn datanode_network_policy(settings: &Settings, namespace: &str) -> NetworkPolicy {
    let pods = |component: &str| json!({"podSelector": {"matchLabels": component_selector(component)}});
    let mut admin_from = vec![operator_peer(settings)];
    admin_from.extend(metrics_peer(settings));
    typed(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "nimbus-datanodes", "namespace": namespace, "labels": labels("datanode", &[])},
        "spec": {
            "podSelector": {"matchLabels": component_selector("datanode")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [pods("gateway"), operator_peer(settings)], "ports": [{"port": "data"}]},
                {"from": admin_from, "ports": [{"port": "admin"}]},
                {"from": [pods("datanode")], "ports": [{"port": "raft"}]}
            ]
        }
    }))
}

/// Who may reach the gateways of a namespace: anyone their public port (clients), the
/// operator (and metrics scrapers) their admin port.
pub fn gateway_network_policy(settings: &Settings, namespace: &str) -> NetworkPolicy {
    let mut admin_from = vec![operator_peer(settings)];
    admin_from.extend(metrics_peer(settings));
    typed(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "nimbus-gateways", "namespace": namespace, "labels": labels("gateway", &[])},
        "spec": {
            "podSelector": {"matchLabels": component_selector("gateway")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"port": "http"}]},
                {"from": admin_from, "ports": [{"port": "admin"}]}
            ]
        }
    }))
}

fn component_selector(component: &str) -> Value {
    json!({"app.kubernetes.io/name": "nimbus", "app.kubernetes.io/component": component})
}

fn operator_peer(settings: &Settings) -> Value {
    json!({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.operator_namespace}},
        "podSelector": {"matchLabels": component_selector("operator")}
    })
}

fn metrics_peer(settings: &Settings) -> Option<Value> {
    (!settings.metrics_namespace_selector.is_empty())
        .then(|| json!({"namespaceSelector": {"matchLabels": settings.metrics_namespace_selector}}))
}

pub fn gateway_service(namespace: &str, owner: Option<&OwnerReference>) -> Service {
    typed(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": GATEWAY_NAME, "namespace": namespace, "labels": labels("gateway", &[]), "ownerReferences": owner.iter().collect::<Vec<_>>()},
        "spec": {
            "selector": {"app.kubernetes.io/name": "nimbus", "app.kubernetes.io/component": "gateway"},
            "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http"}]
        }
    }))
}

/// What applications need to connect, in `<instance>-credentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub endpoint: String,
    pub database: String,
    /// Token of each user, by user name.
    pub tokens: BTreeMap<String, String>,
    /// The first readWrite user's token and the first read user's token.
    pub token: Option<String>,
    pub read_only_token: Option<String>,
}

pub fn credentials_secret_name(instance: &str) -> String {
    format!("{instance}-credentials")
}

pub fn credentials_secret(instance: &str, namespace: &str, owner: &OwnerReference, c: &Credentials) -> Secret {
    let mut data =
        BTreeMap::from([("endpoint".to_string(), c.endpoint.clone()), ("database".to_string(), c.database.clone())]);
    if let Some(t) = &c.token {
        data.insert("token".into(), t.clone());
    }
    if let Some(t) = &c.read_only_token {
        data.insert("readOnlyToken".into(), t.clone());
    }
    for (user, token) in &c.tokens {
        data.insert(format!("token-{user}"), token.clone());
    }
    let mut secret: Secret = typed(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": credentials_secret_name(instance), "namespace": namespace,
            "labels": labels("credentials", &[(LABEL_INSTANCE, instance)]),
            "ownerReferences": [owner]
        },
        "type": "Opaque"
    }));
    // `data`, not `stringData`: the API server folds stringData into data and keeps no
    // record of who set which key, so a key dropped from a later apply (a removed user's
    // token) would stay; keys of `data` are owned by this field manager and go with it.
    secret.data = Some(data.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect());
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of `built` is in `typed` with the same value (nulls and empty lists or
    /// objects may be left out by the type's serialiser).
    pub(super) fn assert_nothing_dropped(built: &Value, typed: &Value, path: &str) {
        match built {
            Value::Object(fields) => {
                for (k, v) in fields {
                    let empty = v.is_null()
                        || v.as_array().is_some_and(Vec::is_empty)
                        || v.as_object().is_some_and(|o| o.is_empty());
                    match typed.get(k) {
                        Some(t) => assert_nothing_dropped(v, t, &format!("{path}.{k}")),
                        None if empty => {}
                        None => panic!("{path}.{k} was dropped: the Kubernetes type has no such field ({v})"),
                    }
                }
            }
            Value::Array(items) => {
                let typed = typed.as_array().unwrap_or_else(|| panic!("{path}: not a list after typing"));
                assert_eq!(items.len(), typed.len(), "{path}: items dropped");
                for (i, (a, b)) in items.iter().zip(typed).enumerate() {
                    assert_nothing_dropped(a, b, &format!("{path}[{i}]"));
                }
            }
            // Numbers may come back as strings (quantities, int-or-string) and vice versa.
            Value::Number(n) => {
                assert!(typed == built || typed.as_str() == Some(&n.to_string()), "{path}: {built} became {typed}")
            }
            other => assert!(
                typed == other || typed.as_str().is_some() && other.is_number(),
                "{path}: {other} became {typed}"
            ),
        }
    }

    #[test]
    #[should_panic(expected = "was dropped")]
    fn a_field_the_type_does_not_know_fails_the_build() {
        let _: Pod = typed(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
            "spec": {"containers": [], "restartPolcy": "Always"}}));
    }

    fn shape() -> ReplicaSetShape {
        ReplicaSetShape {
            name: "default-rs0".into(),
            namespace: "apps".into(),
            pool: "default".into(),
            storage_size: "5Gi".into(),
            storage_class: Some("zonal-ssd".into()),
            resources: Some(typed(json!({"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}))),
            node_selector: BTreeMap::from([("nimbus.io/pool".into(), "default".into())]),
            tolerations: vec![],
            owner: Some(OwnerReference {
                api_version: "nimbus.io/v1alpha1".into(),
                kind: "ResourcePool".into(),
                name: "default".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }),
        }
    }

    fn v<T: serde::Serialize>(t: &T) -> Value {
        serde_json::to_value(t).unwrap()
    }

    #[test]
    fn a_member_pod_is_pinned_to_its_zone_and_spread_from_its_siblings() {
        let pod = v(&member_pod(&Settings::default(), &shape(), 2, "zone-b"));
        assert_eq!(pod["metadata"]["name"], "default-rs0-m2");
        let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"];
        assert_eq!(terms[0], json!({"key": ZONE_LABEL, "operator": "In", "values": ["zone-b"]}));
        assert_eq!(terms[1]["key"], "nimbus.io/pool");
        let anti = &pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
        assert_eq!(anti["podAffinityTerm"]["labelSelector"]["matchLabels"][LABEL_REPLICA_SET], "default-rs0");
        assert_eq!(pod["spec"]["hostname"], "default-rs0-m2");
        assert_eq!(pod["spec"]["subdomain"], "default-rs0");
    }

    #[test]
    fn a_member_pod_carries_its_identity_labels_owner_and_resources() {
        let pod = v(&member_pod(&Settings::default(), &shape(), 2, "zone-b"));
        let labels = &pod["metadata"]["labels"];
        assert_eq!(labels[LABEL_MEMBER], "2");
        assert_eq!(labels[LABEL_ZONE], "zone-b");
        assert_eq!(labels[LABEL_REPLICA_SET], "default-rs0");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "nimbus-operator");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "ResourcePool");
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["resources"]["requests"]["cpu"], "500m");
        let env: BTreeMap<String, Value> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().into(), e["value"].clone()))
            .collect();
        assert_eq!(env["NIMBUS_NODE_ID"], "2");
        assert_eq!(env["NIMBUS_ZONE"], "zone-b");
        assert_eq!(env["NIMBUS_ADVERTISE_HOST"], "default-rs0-m2.default-rs0.apps.svc");
        assert_eq!(pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"], "default-rs0-m2-data");
    }

    #[test]
    fn member_pods_run_as_non_root_with_a_read_only_root_filesystem() {
        let pod = v(&member_pod(&Settings::default(), &shape(), 1, "a"));
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        let sc = &pod["spec"]["containers"][0]["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        let gw = v(&gateway_deployment(&Settings::default(), "apps", None));
        assert_eq!(gw["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(gw["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
    }

    #[test]
    fn a_member_pods_grace_period_covers_the_leadership_handoff_and_the_drain_after_it() {
        let pod = v(&member_pod(&Settings::default(), &shape(), 1, "a"));
        let grace = pod["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap();
        let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
        let handoff_ms: i64 = env.iter().find(|e| e["name"] == "NIMBUS_SHUTDOWN_HANDOFF_MS").unwrap()["value"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        // After the handoff the servers drain for at most 5 s, Raft gets at most 3 s to shut
        // down and what still runs 2 s to end (the datanode also caps the whole stop at 25 s:
        // `STOP_WITHIN` in datanode/src/shutdown.rs).
        let needed = (handoff_ms + 999) / 1000 + 10;
        assert!(grace >= 2 * needed, "grace {grace} s for a stop that may take {needed} s");
        assert!(pod["spec"]["containers"][0]["lifecycle"].is_null(), "SIGTERM does the handoff: no preStop hook");
    }

    #[test]
    fn the_spec_hash_changes_with_the_image_and_resources_only() {
        let s = Settings::default();
        let a = member_spec_hash(&s, &shape());
        assert_eq!(a, member_spec_hash(&s, &shape()));
        let s2 = Settings { datanode_image: "other:1".into(), ..s.clone() };
        assert_ne!(a, member_spec_hash(&s2, &shape()));
        let mut r = shape();
        r.resources = None;
        assert_ne!(a, member_spec_hash(&s, &r));
        let s3 = Settings { gateway_replicas: 9, ..s };
        assert_eq!(a, member_spec_hash(&s3, &shape()));
    }

    #[test]
    fn each_namespace_gets_its_own_cluster_secret_and_pods_roll_only_for_what_they_mount() {
        let mut s = Settings::default();
        s.internal_files.insert(ETCD_GATEWAY_CERT_KEY.into(), "cert-1".into());
        let apps = v(&internal_secret(&s, "apps"));
        let other = v(&internal_secret(&s, "other"));
        let master = &s.internal_files[CLUSTER_SECRET_KEY];
        let scoped = apps["stringData"][CLUSTER_SECRET_KEY].as_str().unwrap();
        assert!(!scoped.contains(master.as_str()), "the cluster's own secret never leaves the operator");
        assert_ne!(apps["stringData"][CLUSTER_SECRET_KEY], other["stringData"][CLUSTER_SECRET_KEY]);
        assert_eq!(apps["stringData"][ETCD_GATEWAY_CERT_KEY], "cert-1");
        // A new gateway certificate rolls gateways, not datanodes; a new cluster secret both.
        let pod_hash = |s: &Settings| member_spec_hash(s, &shape());
        let gw_hash = |s: &Settings| {
            v(&gateway_deployment(s, "apps", None))["spec"]["template"]["metadata"]["annotations"]
                [ANNOTATION_INTERNAL_HASH]
                .clone()
        };
        let mut cert = s.clone();
        cert.internal_files.insert(ETCD_GATEWAY_CERT_KEY.into(), "cert-2".into());
        assert_eq!(pod_hash(&s), pod_hash(&cert));
        let mut rotated = s.clone();
        rotated
            .internal_files
            .insert(CLUSTER_SECRET_KEY.into(), format!("{master}\nnew-cluster-secret-0123456789abcdefghijkl"));
        assert_ne!(pod_hash(&s), pod_hash(&rotated));
        assert_ne!(gw_hash(&s), gw_hash(&rotated));
        // The gateways mount the cluster secret only when etcd has no TLS.
        let vols =
            v(&gateway_deployment(&s, "apps", None))["spec"]["template"]["spec"]["volumes"][0]["secret"]["items"]
                .clone();
        assert_eq!(vols.as_array().unwrap().len(), 1);
    }

    #[test]
    fn datanodes_and_gateways_are_reachable_only_from_whom_they_serve() {
        let s = Settings {
            metrics_namespace_selector: BTreeMap::from([("team".into(), "monitoring".into())]),
            ..Settings::default()
        };
        let dn = v(&datanode_network_policy(&s, "apps"));
        let rules = dn["spec"]["ingress"].as_array().unwrap();
        let port_of = |r: &Value| r["ports"][0]["port"].as_str().unwrap().to_owned();
        let from = |r: &Value| r["from"].to_string();
        let data = rules.iter().find(|r| port_of(r) == "data").unwrap();
        assert!(from(data).contains("\"gateway\"") && from(data).contains("\"operator\""));
        assert!(!from(data).contains("monitoring"));
        let raft = rules.iter().find(|r| port_of(r) == "raft").unwrap();
        assert_eq!(raft["from"].as_array().unwrap().len(), 1);
        assert!(from(raft).contains("\"datanode\"") && !from(raft).contains("namespaceSelector"));
        let admin = rules.iter().find(|r| port_of(r) == "admin").unwrap();
        assert!(from(admin).contains("monitoring") && from(admin).contains("nimbus-system"));
        let gw = v(&gateway_network_policy(&s, "apps"));
        assert!(gw["spec"]["ingress"][0]["from"].is_null(), "clients reach the public port from anywhere");
    }

    #[test]
    fn a_member_pvc_keeps_the_class_size_and_zone() {
        let pvc = v(&member_pvc(&shape(), 3, "c"));
        assert_eq!(pvc["metadata"]["name"], "default-rs0-m3-data");
        assert_eq!(pvc["spec"]["storageClassName"], "zonal-ssd");
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
        assert_eq!(pvc["metadata"]["labels"][LABEL_ZONE], "c");
    }

    #[test]
    fn the_replica_set_service_is_headless_and_records_the_zones() {
        let zones = vec!["a".to_string(), "b".into(), "c".into()];
        let svc = v(&replica_set_service(&shape(), &zones, false));
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
        assert_eq!(svc["metadata"]["annotations"][ANNOTATION_ZONES], "a,b,c");
        assert!(svc["metadata"]["annotations"][ANNOTATION_BOOTSTRAPPED].is_null());
        let svc = v(&replica_set_service(&shape(), &zones, true));
        assert_eq!(svc["metadata"]["annotations"][ANNOTATION_BOOTSTRAPPED], "true");
        // One member evicted at a time, counted over the Pods themselves (they have no
        // controller with a scale subresource, which `maxUnavailable` needs).
        let pdb = v(&replica_set_pdb(&shape(), 3));
        assert_eq!(pdb["spec"]["minAvailable"], 2);
        assert!(pdb["spec"]["maxUnavailable"].is_null());
        assert_eq!(v(&replica_set_pdb(&shape(), 5))["spec"]["minAvailable"], 4);
    }

    #[test]
    fn the_credentials_secret_holds_endpoint_database_and_both_tokens() {
        let owner = shape().owner.unwrap();
        let c = Credentials {
            endpoint: gateway_endpoint("apps"),
            database: "shop".into(),
            tokens: BTreeMap::from([("app".into(), "t1".into()), ("reader".into(), "t2".into())]),
            token: Some("t1".into()),
            read_only_token: Some("t2".into()),
        };
        let s = credentials_secret("shop", "apps", &owner, &c);
        assert_eq!(s.metadata.name.as_deref(), Some("shop-credentials"));
        let data = s.data.unwrap();
        let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
        assert_eq!(text("endpoint"), "http://nimbus-gateway.apps.svc:8080");
        assert_eq!(text("token"), "t1");
        assert_eq!(text("readOnlyToken"), "t2");
        assert_eq!(text("token-reader"), "t2");
        assert!(s.string_data.is_none());
    }
}
