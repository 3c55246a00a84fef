//! The control plane's key layout in etcd, defined once: the gateway reads and watches it,
//! the operator and the playground write it. Values are JSON.
//!
//! | key | value |
//! | --- | --- |
//! | `/nimbus/routes/{db}` | [`Route`]: the replica set holding the database, its epoch and state |
//! | `/nimbus/users/{db}/{user}` | [`UserRecord`]: role and the SHA-256 of the user's token secret |
//! | `/nimbus/limits/{db}` | [`Limits`]: the database's limits (absent: the defaults of its tier) |
//! | `/nimbus/gateways/{id}` | [`GatewayRegistration`], bound to the gateway's lease |
//! | `/nimbus/holds/{db}/{gateway}` | [`HoldAck`]: gateway `{gateway}` holds `db` and has none of its requests in flight (cutover), bound to the gateway's lease |
//! | `/nimbus/tenants/{db}` | [`TenantClaim`]: the one instance the database name belongs to |
//! | `/nimbus/replicasets/{namespace}/{name}` | [`ReplicaSetRecord`]: a replica set was bootstrapped |
//! | `/nimbus/migrations/{db}` | the database's hot migration, running or last finished (the operator's `MigrationRecord`) |

use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "/nimbus/";
pub const ROUTES: &str = "/nimbus/routes/";
pub const USERS: &str = "/nimbus/users/";
pub const LIMITS: &str = "/nimbus/limits/";
pub const GATEWAYS: &str = "/nimbus/gateways/";
pub const HOLDS: &str = "/nimbus/holds/";
pub const TENANTS: &str = "/nimbus/tenants/";
pub const REPLICA_SETS: &str = "/nimbus/replicasets/";
pub const MIGRATIONS: &str = "/nimbus/migrations/";

pub fn route_key(db: &str) -> String {
    format!("{ROUTES}{db}")
}

pub fn user_key(db: &str, user: &str) -> String {
    format!("{USERS}{db}/{user}")
}

pub fn limits_key(db: &str) -> String {
    format!("{LIMITS}{db}")
}

pub fn gateway_key(id: &str) -> String {
    format!("{GATEWAYS}{id}")
}

pub fn hold_key(db: &str, gateway: &str) -> String {
    format!("{HOLDS}{db}/{gateway}")
}

pub fn tenant_key(db: &str) -> String {
    format!("{TENANTS}{db}")
}

pub fn migration_key(db: &str) -> String {
    format!("{MIGRATIONS}{db}")
}

pub fn replica_set_key(namespace: &str, replica_set: &str) -> String {
    format!("{REPLICA_SETS}{namespace}/{replica_set}")
}

/// Database names are one namespace for the whole cluster (the data API addresses
/// `/v1/databases/{db}`), while instances are namespaced: the first instance to claim a
/// name owns it, and its route, users and limits, until it is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantClaim {
    pub namespace: String,
    pub instance: String,
    /// The instance object's `metadata.uid`: a new instance of the same name is another
    /// tenant, and does not inherit the claim.
    pub uid: String,
}

/// The durable record that a replica set was bootstrapped. It outlives the replica set's
/// Kubernetes objects, so a replica set whose volumes were lost is reported, never
/// initialised again empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSetRecord {
    pub pool: String,
    pub zones: Vec<String>,
    /// When the operator first saw it led (Unix milliseconds).
    pub bootstrapped_ms: u64,
}

/// Whether a database's requests flow, or are held for a migration cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteState {
    Serving,
    /// Gateways stop forwarding the database's requests and hold new ones until the state
    /// changes or `hold_deadline_ms` passes.
    Holding,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMember {
    pub id: u64,
    /// Base URL of the member's data API.
    pub data_addr: String,
    pub zone: String,
}

/// Where a database lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub replica_set: String,
    pub members: Vec<RouteMember>,
    /// Increases by one each time the database moves; stale senders are refused.
    pub epoch: u64,
    pub state: RouteState,
    /// With `Holding`: when the hold ends by itself (ms since the Unix epoch), by the
    /// control plane's clock. It also names the hold (with `epoch`: see [`HoldAck`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_deadline_ms: Option<u64>,
    /// With `Holding`: how long the hold lasts (ms). A gateway holds for this long from
    /// when it first saw the hold, by its own clock: comparing `hold_deadline_ms` with its
    /// own clock would hold too long on a gateway whose clock is behind the control
    /// plane's, and not at all on one ahead by more than the hold's length. Absent from
    /// routes written before it existed (a gateway then goes by the deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_timeout_ms: Option<u64>,
}

/// A gateway's acknowledgement of one hold (`/nimbus/holds/{db}/{gateway}`): it forwards
/// none of the database's requests any more and none is in flight to a datanode. Written
/// with the gateway's lease, so a gateway that dies takes its acknowledgements with it.
///
/// A hold is the route as written with `Holding`: the acknowledgement names its `epoch` and
/// `hold_deadline_ms`, and counts for a hold only when both equal the route's. An
/// acknowledgement of an earlier hold of the same epoch (an aborted attempt that was never
/// fenced) has another deadline, and never passes for the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldAck {
    /// The route's epoch when it was held.
    pub epoch: u64,
    /// The held route's `hold_deadline_ms` (`None` when it had none).
    #[serde(default)]
    pub hold_deadline_ms: Option<u64>,
    /// When the gateway found the database idle and wrote this (ms since the Unix epoch).
    pub acked_ms: u64,
}

impl HoldAck {
    /// Whether this acknowledges the hold that `route` is (same epoch, same deadline, and
    /// the route still `Holding`).
    pub fn acknowledges(&self, route: &Route) -> bool {
        route.state == RouteState::Holding
            && self.epoch == route.epoch
            && self.hold_deadline_ms == route.hold_deadline_ms
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UserRole {
    ReadWrite,
    Read,
}

/// A user of one database. The token is `nmb_{db}.{user}.{secret}`; only the SHA-256 of
/// the secret is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRecord {
    pub role: UserRole,
    /// Lower-case hex SHA-256 of the token's secret part.
    pub secret_sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Tier {
    Free,
    Standard,
    Dedicated,
}

/// Per-database limits the gateway enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub tier: Tier,
    /// Sustained requests per second.
    pub qps: u32,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
    /// Concurrent client connections.
    pub max_connections: u32,
    /// Requests in flight at once.
    pub max_in_flight: u32,
}

impl Limits {
    /// The defaults of a tier, used when a database has no `/nimbus/limits/{db}` key.
    pub fn for_tier(tier: Tier) -> Limits {
        match tier {
            Tier::Free => Limits { tier, qps: 100, burst: 200, max_connections: 50, max_in_flight: 20 },
            Tier::Standard => Limits { tier, qps: 2_000, burst: 4_000, max_connections: 500, max_in_flight: 256 },
            Tier::Dedicated => {
                Limits { tier, qps: 20_000, burst: 40_000, max_connections: 5_000, max_in_flight: 2_048 }
            }
        }
    }
}

/// A gateway's registration: present while its lease lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRegistration {
    pub id: String,
    pub addr: String,
    pub started_ms: u64,
}

/// Splits a token `nmb_{db}.{user}.{secret}` into its parts.
pub fn parse_token(token: &str) -> Option<(&str, &str, &str)> {
    let rest = token.strip_prefix("nmb_")?;
    let mut parts = rest.splitn(3, '.');
    let (db, user, secret) = (parts.next()?, parts.next()?, parts.next()?);
    if db.is_empty() || user.is_empty() || secret.len() < 22 {
        return None;
    }
    Some((db, user, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_into_database_user_and_secret() {
        assert_eq!(
            parse_token("nmb_shop.app.abcdefghijklmnopqrstuvwxyz"),
            Some(("shop", "app", "abcdefghijklmnopqrstuvwxyz"))
        );
        assert_eq!(parse_token("nmb_shop.app.short"), None);
        assert_eq!(parse_token("shop.app.abcdefghijklmnopqrstuvwxyz"), None);
        assert_eq!(parse_token("nmb_.app.abcdefghijklmnopqrstuvwxyz"), None);
    }

    #[test]
    fn a_hold_ack_counts_only_for_the_hold_it_names() {
        let held = Route {
            replica_set: "rs0".into(),
            members: vec![],
            epoch: 3,
            state: RouteState::Holding,
            hold_deadline_ms: Some(1_000),
            hold_timeout_ms: Some(5_000),
        };
        let ack = HoldAck { epoch: 3, hold_deadline_ms: Some(1_000), acked_ms: 900 };
        assert!(ack.acknowledges(&held));
        // The same epoch held again (a retry after an unfenced abort): another deadline.
        assert!(!ack.acknowledges(&Route { hold_deadline_ms: Some(9_000), ..held.clone() }));
        assert!(!ack.acknowledges(&Route { epoch: 4, ..held.clone() }));
        assert!(!ack.acknowledges(&Route { state: RouteState::Serving, ..held.clone() }));
        let v = serde_json::to_value(&ack).unwrap();
        assert_eq!(v, serde_json::json!({"epoch": 3, "holdDeadlineMs": 1000, "ackedMs": 900}));
    }

    #[test]
    fn routes_round_trip_in_camel_case() {
        let r = Route {
            replica_set: "rs0".into(),
            members: vec![RouteMember { id: 1, data_addr: "http://a".into(), zone: "a".into() }],
            epoch: 3,
            state: RouteState::Serving,
            hold_deadline_ms: None,
            hold_timeout_ms: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["replicaSet"], "rs0");
        assert_eq!(v["state"], "Serving");
        assert!(v.get("holdDeadlineMs").is_none() && v.get("holdTimeoutMs").is_none(), "{v}");
        assert_eq!(serde_json::from_value::<Route>(v).unwrap(), r);
        let held = Route { state: RouteState::Holding, hold_deadline_ms: Some(9), hold_timeout_ms: Some(5_000), ..r };
        let v = serde_json::to_value(&held).unwrap();
        assert_eq!((v["holdDeadlineMs"].as_u64(), v["holdTimeoutMs"].as_u64()), (Some(9), Some(5_000)));
        assert_eq!(serde_json::from_value::<Route>(v).unwrap(), held);
        // A route written before the hold's length was: none.
        let old = serde_json::json!({"replicaSet": "rs0", "members": [], "epoch": 3, "state": "Holding",
            "holdDeadlineMs": 9});
        assert_eq!(serde_json::from_value::<Route>(old).unwrap().hold_timeout_ms, None);
    }
}
