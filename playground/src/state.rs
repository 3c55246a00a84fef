//! What the playground keeps in its directory: the durable state it needs to come back
//! (`state.json`: ports, replica sets and members, tokens) and what it shows
//! (`playground.json`, the contract of `API.md` section 3).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::netns::{Network, ZoneState};

pub const STATE_FILE: &str = "state.json";
pub const PLAYGROUND_FILE: &str = "playground.json";
pub const PID_FILE: &str = "control-plane.pid";

/// Durable: written on every change, read by the next `up` with the same directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub etcd_client_port: u16,
    pub etcd_peer_port: u16,
    pub gateway_port: u16,
    pub gateway_admin_port: u16,
    pub control_plane_port: u16,
    pub zones: Vec<String>,
    pub replica_sets: BTreeMap<String, ReplicaSetState>,
    pub instances: BTreeMap<String, InstanceState>,
    /// The pools applied (`ResourcePool` documents), by name. `default` is there
    /// implicitly (see [`State::pool`]) until a `default` pool is applied.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolState>,
    /// Zones in network namespaces (`--isolate-zones`): fixed once the directory has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// etcd's users, roles and authentication are set up (once, on the first start).
    #[serde(default)]
    pub etcd_auth: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSetState {
    /// The pool the replica set belongs to (`default` in a state written before pools).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Made for one dedicated instance: never given to another.
    #[serde(default)]
    pub dedicated: bool,
    /// The zone of each member slot.
    pub zones: Vec<String>,
    /// Raft was initialised once: never again.
    pub bootstrapped: bool,
    pub members: BTreeMap<u64, MemberState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberState {
    pub id: u64,
    pub zone: String,
    pub data_port: u16,
    pub admin_port: u16,
    /// 0 in a directory made before the Raft port existed (which cannot be reused).
    #[serde(default)]
    pub raft_port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceState {
    pub database: String,
    /// This instance's life under its database name, given at its first apply: a new
    /// instance with a deleted one's name gets a new one, so it never finds the deleted
    /// one's backups (`docs/design/0004-backup.md`). Empty in a state written before it
    /// was kept: [`State::load`] gives each such instance one and saves it.
    #[serde(default)]
    pub incarnation: String,
    /// The pool of the replica set the database is on now (`default` in a state written
    /// before pools).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// The pool the instance's last applied spec asks for, while it differs from `pool`:
    /// a hot migration's goal (`crate::migrate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted_pool: Option<String>,
    /// The replica set of `wanted_pool` placement chose: the migration's target, started
    /// once that replica set has a leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted_replica_set: Option<String>,
    pub replica_set: String,
    /// Token by user name.
    pub tokens: BTreeMap<String, String>,
    pub token: String,
    pub read_only_token: String,
    /// Role by user name. Absent in a state written before roles were kept: each user
    /// then counts as `read` unless its token is the instance's read-write `token`.
    #[serde(default)]
    pub roles: BTreeMap<String, nimbus_api::etcd::UserRole>,
    /// The limits the gateways enforce (the instance's over its tier's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<nimbus_api::etcd::Limits>,
    /// The spec last applied (`kubectl`'s last-applied configuration): what the next apply
    /// compares with, for its immutable fields and to say `unchanged`. Absent in a state
    /// written before `apply`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<nimbus_operator::crd::v1alpha1::DatabaseInstanceSpec>,
    /// The latest migration of the database, kept after it ends until the next one starts
    /// (`playground.json` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<PlaygroundMigration>,
}

/// What the playground keeps of a `ResourcePool`: what placement needs. Scheduling fields
/// (`nodeSelector`, `tolerations`, `resources`, `storage`) mean nothing on one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolState {
    pub mode: nimbus_operator::crd::v1alpha1::PoolMode,
    /// Shared pools: databases a replica set takes before a new one is made.
    pub databases_per_replica_set: u32,
    /// Members of each replica set (dedicated instances use their own `spec.replicas`).
    pub replicas_per_set: i32,
}

/// The pool every instance names unless it says otherwise.
pub const DEFAULT_POOL: &str = "default";

fn default_pool() -> String {
    DEFAULT_POOL.to_owned()
}

impl PoolState {
    /// The implicit `default` pool: shared, as `ResourcePoolSpec`'s defaults.
    pub fn implicit_default() -> PoolState {
        let spec = nimbus_operator::crd::v1alpha1::ResourcePoolSpec {
            mode: nimbus_operator::crd::v1alpha1::PoolMode::Shared,
            replicas_per_set: 3,
            databases_per_replica_set: 200,
            ..Default::default()
        };
        PoolState::of(&spec)
    }

    pub fn of(spec: &nimbus_operator::crd::v1alpha1::ResourcePoolSpec) -> PoolState {
        PoolState {
            mode: spec.mode,
            databases_per_replica_set: spec.databases_per_replica_set,
            replicas_per_set: spec.replicas_per_set,
        }
    }
}

impl InstanceState {
    /// A user's role; least privilege when the state does not say.
    pub fn role(&self, user: &str) -> nimbus_api::etcd::UserRole {
        match self.roles.get(user) {
            Some(r) => *r,
            None if self.tokens.get(user) == Some(&self.token) => nimbus_api::etcd::UserRole::ReadWrite,
            None => nimbus_api::etcd::UserRole::Read,
        }
    }
}

impl State {
    /// A pool by name: an applied one, or the implicit `default`.
    pub fn pool(&self, name: &str) -> Option<PoolState> {
        match self.pools.get(name) {
            Some(p) => Some(p.clone()),
            None if name == DEFAULT_POOL => Some(PoolState::implicit_default()),
            None => None,
        }
    }

    /// The address a zone's datanodes listen on and are reached at.
    pub fn host(&self, zone: &str) -> String {
        self.network.as_ref().and_then(|n| n.hosts.get(zone).cloned()).unwrap_or_else(|| "127.0.0.1".to_owned())
    }

    pub fn load(dir: &Path) -> std::io::Result<Option<State>> {
        let mut st: State = match std::fs::read(dir.join(STATE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Saved at once: an incarnation must stay the same from one load to the next.
        let mut given = false;
        for inst in st.instances.values_mut().filter(|i| i.incarnation.is_empty()) {
            inst.incarnation = new_incarnation();
            given = true;
        }
        if given {
            st.save(dir)?;
        }
        Ok(Some(st))
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        write_atomically(&dir.join(STATE_FILE), &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)
    }
}

/// `playground.json` (`API.md` section 3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Playground {
    pub gateway: String,
    pub control_plane: String,
    pub etcd: String,
    pub instances: BTreeMap<String, PlaygroundInstance>,
    pub datanodes: Vec<PlaygroundDatanode>,
    /// Each zone's state (`nimbus playground zone`): up, down, partitioned or isolated.
    #[serde(default)]
    pub zones: BTreeMap<String, ZoneState>,
    /// The cluster secret every internal request carries (datanode ports, the control
    /// plane's API): for tools and tests that talk to the parts behind the gateway.
    #[serde(default)]
    pub cluster_secret_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaygroundInstance {
    pub database: String,
    /// The pool of the replica set serving the database now.
    #[serde(default = "default_pool")]
    pub pool: String,
    pub token: String,
    pub read_only_token: String,
    pub replica_set: String,
    pub phase: String,
    /// The latest migration (null before the first): kept after it ends until the next.
    #[serde(default)]
    pub migration: Option<PlaygroundMigration>,
    /// The last full backup and the recoverable window (null when backups are off).
    #[serde(default)]
    pub backup: Option<crate::backup::PlaygroundBackup>,
}

/// A migration as `playground.json` shows it (`API.md` section 3): the migration driver's
/// own status view, the same object Kubernetes shows as `status.migration`.
pub type PlaygroundMigration = nimbus_operator::controlplane::migration::MigrationStatus;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaygroundDatanode {
    pub id: u64,
    pub zone: String,
    pub replica_set: String,
    pub pid: Option<u32>,
    pub admin: String,
    pub data: String,
    #[serde(default)]
    pub raft: String,
    pub data_dir: PathBuf,
}

/// A new instance's incarnation: 16 random hex digits (64 bits: two instances of one name
/// never share one).
pub fn new_incarnation() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Write to a temporary file and rename over: readers never see half a file.
/// Files are readable by their owner only: `playground.json` holds the tokens.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    // A file left from before keeps its mode: make it the owner's only.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// A free port for one of the playground's servers (see [`nimbus_net::ports::free_port`]);
/// it is remembered in the state and bound later by the process it is for.
pub fn free_port() -> std::io::Result<u16> {
    nimbus_net::ports::free_port()
}
