//! What a gateway knows: per database, its users, route and limiter, built from the
//! control plane's records in etcd; the leader it last saw for each replica set; and the
//! budgets and counters every request passes through.
//!
//! A request looks its database up once (one read lock, one hash lookup) and then works on
//! that database's [`DbState`]: no per-request clones of routes or user tables, no global
//! mutex on the path of a request.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use http::uri::{Authority, Scheme};
use nimbus_api::etcd::{Limits, Route, RouteState, Tier, UserRecord};
use nimbus_net::ClusterSecret;
use tokio::sync::Semaphore;

use crate::budget::Budget;
use crate::config::Config;
use crate::hold::Traffic;
use crate::limits::TenantLimiter;
use crate::upstream::UpstreamClient;
use crate::usage::Usage;

/// The control plane's records, as of the last etcd revision applied (kept by `sync`).
#[derive(Debug, Default, Clone)]
pub struct Tables {
    pub routes: HashMap<String, Route>,
    pub users: HashMap<String, HashMap<String, UserRecord>>,
    pub limits: HashMap<String, Limits>,
}

impl Tables {
    /// Whether some record names database `db`.
    pub fn knows(&self, db: &str) -> bool {
        self.routes.contains_key(db) || self.users.contains_key(db) || self.limits.contains_key(db)
    }

    /// Every database named by some record.
    pub fn databases(&self) -> HashSet<String> {
        self.routes.keys().chain(self.users.keys()).chain(self.limits.keys()).cloned().collect()
    }
}

/// One member of a replica set, as requests reach it.
#[derive(Debug)]
pub struct Member {
    pub id: u64,
    /// Base URL of its data API, as in the route.
    pub addr: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Bounds the requests in flight to this datanode (shared by every route to it).
    pub slots: Arc<Semaphore>,
}

/// The leader last seen for one replica set: a member id, shared by every route to it.
#[derive(Debug, Default)]
pub struct LeaderCell(AtomicU64);

impl LeaderCell {
    pub fn get(&self) -> Option<u64> {
        self.0.load(Ordering::Relaxed).checked_sub(1)
    }
    pub fn set(&self, id: u64) {
        self.0.store(id.saturating_add(1), Ordering::Relaxed);
    }
    /// Forgets `id` as the leader, unless another request has already found a different
    /// one (a late failure must not erase a fresh discovery).
    pub fn forget(&self, id: u64) {
        let _ = self.0.compare_exchange(id.saturating_add(1), 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Where a database's requests go.
#[derive(Debug)]
pub struct RouteEntry {
    pub replica_set: String,
    pub epoch: u64,
    /// `epoch` as the header every request to a datanode carries (made once).
    pub epoch_header: http::HeaderValue,
    pub state: RouteState,
    pub hold_deadline_ms: Option<u64>,
    pub members: Vec<Member>,
    pub leader: Arc<LeaderCell>,
}

impl RouteEntry {
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn member_at(&self, addr: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.addr == addr)
    }
}

/// A user as requests are checked against it: the stored SHA-256 of its token's secret,
/// decoded once when the table is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUser {
    pub role: nimbus_api::etcd::UserRole,
    pub secret_sha256: [u8; 32],
}

impl StoredUser {
    /// `None` for a record whose hash is not 64 hex digits (it could match no token).
    pub fn from_record(r: &UserRecord) -> Option<StoredUser> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&r.secret_sha256, &mut digest).ok()?;
        Some(StoredUser { role: r.role, secret_sha256: digest })
    }
}

/// Everything a request of one database needs.
#[derive(Debug)]
pub struct DbState {
    pub name: String,
    pub users: HashMap<String, StoredUser>,
    pub route: Option<Arc<RouteEntry>>,
    pub limiter: Arc<TenantLimiter>,
    /// Its requests in flight and held here (kept across rebuilds, whatever changed).
    pub traffic: Arc<Traffic>,
}

pub struct Gateway {
    pub config: Config,
    dbs: RwLock<HashMap<String, Arc<DbState>>>,
    /// The tables are a faithful copy of etcd (initial load done, watch running).
    pub synced: AtomicBool,
    /// The gateway's lease is known valid until this instant (ms since the Unix epoch).
    pub lease_valid_until_ms: AtomicU64,
    /// Bumped on every route change; held requests wait on it.
    pub routes_version: tokio::sync::watch::Sender<u64>,
    leaders: Mutex<HashMap<String, Arc<LeaderCell>>>,
    upstream_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    pub upstream: UpstreamClient,
    pub usage: Usage,
    pub default_tier: Tier,
    /// Bytes of request bodies held, all databases together: three quarters of
    /// `--memory-budget-bytes`.
    pub memory: Budget,
    /// Bytes of datanode answers held: the other quarter, so that a flood of bodies never
    /// starves the answers of requests already sent (a write's answer above all).
    pub answers: Budget,
    /// Each database's share of `answers`: a quarter of it, and at least room for the
    /// largest answer (a largest document).
    pub tenant_answers_bytes: usize,
    pub secret: ClusterSecret,
    /// When a datanode's refusal of this gateway's secret was last logged (ms).
    refusal_logged_ms: AtomicU64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Gateway {
    pub fn new(config: Config, secret: ClusterSecret) -> anyhow::Result<Gateway> {
        let default_tier = match config.default_tier.as_str() {
            "free" => Tier::Free,
            "standard" => Tier::Standard,
            "dedicated" => Tier::Dedicated,
            other => anyhow::bail!("unknown tier {other:?}: use free, standard or dedicated"),
        };
        Ok(Gateway {
            upstream: UpstreamClient::new(config.upstream_max_in_flight, secret.clone()),
            usage: Usage::new(config.metrics_tenant_series),
            memory: Budget::new(config.memory_budget_bytes - config.memory_budget_bytes / 4),
            answers: Budget::new(config.memory_budget_bytes / 4),
            tenant_answers_bytes: (config.memory_budget_bytes / 16).max(config.max_body_bytes),
            config,
            dbs: RwLock::new(HashMap::new()),
            synced: AtomicBool::new(false),
            lease_valid_until_ms: AtomicU64::new(0),
            routes_version: tokio::sync::watch::channel(0).0,
            leaders: Mutex::new(HashMap::new()),
            upstream_slots: Mutex::new(HashMap::new()),
            default_tier,
            secret,
            refusal_logged_ms: AtomicU64::new(0),
        })
    }

    /// Whether to log a datanode's refusal of this gateway's secret now (at most every 10 s).
    pub fn should_log_refusal(&self) -> bool {
        let now = now_ms();
        let last = self.refusal_logged_ms.load(Ordering::Relaxed);
        now >= last + 10_000
            && self.refusal_logged_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// Serving is allowed only with tables in sync and a lease known to be alive: a gateway
    /// cut off from etcd cannot trust its routes (another may have moved a database).
    pub fn is_serving(&self) -> bool {
        self.synced.load(Ordering::Acquire) && now_ms() < self.lease_valid_until_ms.load(Ordering::Acquire)
    }

    /// The state of database `db`, if the control plane knows it.
    pub fn db(&self, db: &str) -> Option<Arc<DbState>> {
        self.dbs.read().unwrap_or_else(|p| p.into_inner()).get(db).cloned()
    }

    /// Databases whose route is `Holding`.
    pub fn holding(&self) -> Vec<Arc<DbState>> {
        let dbs = self.dbs.read().unwrap_or_else(|p| p.into_inner());
        dbs.values().filter(|d| d.route.as_ref().is_some_and(|r| r.state == RouteState::Holding)).cloned().collect()
    }

    /// Rebuilds the state of the databases in `changed` (every database when `None`) from
    /// `tables`; a database's limiter survives unless its limits changed.
    pub fn rebuild(&self, tables: &Tables, changed: Option<&HashSet<String>>) {
        match changed {
            None => {
                let all: HashMap<String, Arc<DbState>> =
                    tables.databases().into_iter().map(|db| (db.clone(), Arc::new(self.build(&db, tables)))).collect();
                *self.dbs.write().unwrap_or_else(|p| p.into_inner()) = all;
            }
            Some(changed) => {
                let built: Vec<(&String, Option<Arc<DbState>>)> =
                    changed.iter().map(|db| (db, tables.knows(db).then(|| Arc::new(self.build(db, tables))))).collect();
                let mut dbs = self.dbs.write().unwrap_or_else(|p| p.into_inner());
                for (db, state) in built {
                    match state {
                        Some(s) => dbs.insert(db.clone(), s),
                        None => dbs.remove(db),
                    };
                }
            }
        }
    }

    fn build(&self, db: &str, tables: &Tables) -> DbState {
        let limits = tables.limits.get(db).cloned().unwrap_or_else(|| Limits::for_tier(self.default_tier));
        let old = self.db(db);
        let limiter = match &old {
            Some(old) if old.limiter.limits == limits => old.limiter.clone(),
            _ => {
                Arc::new(TenantLimiter::new(limits, self.config.tenant_memory_budget_bytes, self.tenant_answers_bytes))
            }
        };
        let traffic = old.map(|o| o.traffic.clone()).unwrap_or_default();
        DbState {
            name: db.to_owned(),
            users: tables
                .users
                .get(db)
                .map(|us| us.iter().filter_map(|(n, r)| Some((n.clone(), StoredUser::from_record(r)?))).collect())
                .unwrap_or_default(),
            route: tables.routes.get(db).map(|r| Arc::new(self.route_entry(r))),
            limiter,
            traffic,
        }
    }

    fn route_entry(&self, r: &Route) -> RouteEntry {
        let leader =
            self.leaders.lock().unwrap_or_else(|p| p.into_inner()).entry(r.replica_set.clone()).or_default().clone();
        let members = r
            .members
            .iter()
            .filter_map(|m| {
                let uri: http::Uri = match m.data_addr.parse() {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::error!(addr = %m.data_addr, error = %e, "ignoring a route member with a malformed address");
                        return None;
                    }
                };
                let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
                    tracing::error!(addr = %m.data_addr, "ignoring a route member without scheme and host");
                    return None;
                };
                Some(Member { id: m.id, addr: m.data_addr.clone(), scheme, authority, slots: self.upstream_slots(&m.data_addr) })
            })
            .collect();
        RouteEntry {
            replica_set: r.replica_set.clone(),
            epoch: r.epoch,
            epoch_header: http::HeaderValue::from(r.epoch),
            state: r.state,
            hold_deadline_ms: r.hold_deadline_ms,
            members,
            leader,
        }
    }

    /// The slots bounding concurrent requests to one datanode.
    fn upstream_slots(&self, addr: &str) -> Arc<Semaphore> {
        let mut slots = self.upstream_slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(addr.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.upstream_max_in_flight)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_failure_does_not_forget_a_newer_leader() {
        let cell = LeaderCell::default();
        assert_eq!(cell.get(), None);
        cell.set(0);
        assert_eq!(cell.get(), Some(0));
        cell.set(2);
        cell.forget(0);
        assert_eq!(cell.get(), Some(2));
        cell.forget(2);
        assert_eq!(cell.get(), None);
    }
}
