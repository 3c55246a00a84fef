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
use crate::hold::{Traffic, hold_until};
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
    /// With `Holding`: the control plane's deadline, by its clock. It names the hold (the
    /// acknowledgement repeats it), and is not compared with this gateway's clock.
    pub hold_deadline_ms: Option<u64>,
    /// With `Holding`: when this gateway stops holding, by its own clock
    /// ([`crate::hold::hold_until`]); `None` while serving, or for a hold without an end.
    pub hold_until_ms: Option<u64>,
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
    /// `tables`; a database's limiter survives unless its limits changed, and a hold it
    /// already saw keeps its end.
    pub fn rebuild(&self, tables: &Tables, changed: Option<&HashSet<String>>) {
        self.rebuild_at(tables, changed, now_ms());
    }

    /// [`Gateway::rebuild`], with this gateway's clock reading `now_ms` (when a hold first
    /// seen now starts).
    pub fn rebuild_at(&self, tables: &Tables, changed: Option<&HashSet<String>>, now_ms: u64) {
        let holding = |d: &DbState| d.route.as_ref().is_some_and(|r| r.state == RouteState::Holding);
        match changed {
            None => {
                let all: HashMap<String, Arc<DbState>> = tables
                    .databases()
                    .into_iter()
                    .map(|db| (db.clone(), Arc::new(self.build(&db, tables, now_ms))))
                    .collect();
                let held = all.values().filter(|d| holding(d)).count();
                *self.dbs.write().unwrap_or_else(|p| p.into_inner()) = all;
                metrics::gauge!("nimbus_gateway_routes_holding").set(held as f64);
            }
            Some(changed) => {
                let built: Vec<(&String, Option<Arc<DbState>>)> = changed
                    .iter()
                    .map(|db| (db, tables.knows(db).then(|| Arc::new(self.build(db, tables, now_ms)))))
                    .collect();
                let mut dbs = self.dbs.write().unwrap_or_else(|p| p.into_inner());
                // Kept as the changes come (a full count would read every database).
                let mut delta = 0.0;
                for (db, state) in built {
                    let now_holding = state.as_deref().is_some_and(holding);
                    let old = match state {
                        Some(s) => dbs.insert(db.clone(), s),
                        None => dbs.remove(db),
                    };
                    let was_holding = old.as_deref().is_some_and(holding);
                    delta += f64::from(u8::from(now_holding)) - f64::from(u8::from(was_holding));
                }
                drop(dbs);
                if delta != 0.0 {
                    metrics::gauge!("nimbus_gateway_routes_holding").increment(delta);
                }
            }
        }
    }

    fn build(&self, db: &str, tables: &Tables, now_ms: u64) -> DbState {
        let limits = tables.limits.get(db).cloned().unwrap_or_else(|| Limits::for_tier(self.default_tier));
        let old = self.db(db);
        let limiter = match &old {
            Some(old) if old.limiter.limits == limits => old.limiter.clone(),
            _ => {
                Arc::new(TenantLimiter::new(limits, self.config.tenant_memory_budget_bytes, self.tenant_answers_bytes))
            }
        };
        let traffic = old.as_ref().map(|o| o.traffic.clone()).unwrap_or_default();
        DbState {
            name: db.to_owned(),
            users: tables
                .users
                .get(db)
                .map(|us| us.iter().filter_map(|(n, r)| Some((n.clone(), StoredUser::from_record(r)?))).collect())
                .unwrap_or_default(),
            route: tables.routes.get(db).map(|r| {
                let earlier = old.as_ref().and_then(|o| o.route.as_deref());
                Arc::new(self.route_entry(r, hold_until(r, earlier, now_ms)))
            }),
            limiter,
            traffic,
        }
    }

    fn route_entry(&self, r: &Route, hold_until_ms: Option<u64>) -> RouteEntry {
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
            hold_until_ms,
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
    use crate::hold::{Step, next_step};
    use clap::Parser as _;

    fn gateway() -> Gateway {
        let config = Config::try_parse_from([
            "nimbus-gateway",
            "--id",
            "gw-test",
            "--etcd",
            "http://127.0.0.1:1",
            "--cluster-secret-file",
            "/nonexistent",
        ])
        .unwrap();
        Gateway::new(config, ClusterSecret::parse(&"s".repeat(40)).unwrap()).unwrap()
    }

    /// `shop`'s route held by a control plane whose clock reads `control_plane_ms`: a
    /// deadline 5 s ahead of that, and the hold's length.
    fn held_at(control_plane_ms: u64, epoch: u64) -> Tables {
        let route = serde_json::json!({"replicaSet": "rs0", "members": [], "epoch": epoch, "state": "Holding",
            "holdDeadlineMs": control_plane_ms + HOLD_MS, "holdTimeoutMs": HOLD_MS});
        Tables {
            routes: HashMap::from([("shop".to_owned(), serde_json::from_value(route).unwrap())]),
            ..Default::default()
        }
    }

    const HOLD_MS: u64 = 5_000;
    /// How far the control plane's clock is from the gateway's in these tests.
    const SKEW_MS: u64 = 60_000;

    /// Where a request of `shop` goes at `now` (the gateway's clock).
    fn step_at(gw: &Gateway, now: u64) -> Step {
        next_step(true, gw.db("shop").unwrap().route.as_deref(), 0, now)
    }

    /// Builds the tables seen at once (the gateway's clock read between `before` and the return).
    fn seen(gw: &Gateway, tables: &Tables) -> (u64, u64) {
        let before = now_ms();
        gw.rebuild(tables, None);
        (before, now_ms())
    }

    #[test]
    fn a_gateway_whose_clock_is_ahead_of_the_control_planes_still_holds_for_the_holds_length() {
        let gw = gateway();
        let (seen_from, seen_to) = seen(&gw, &held_at(now_ms() - SKEW_MS, 4));
        // By its own clock the control plane's deadline passed a minute ago.
        let Step::Hold { until_ms: Some(until) } = step_at(&gw, seen_to) else {
            panic!("not held: {:?}", step_at(&gw, seen_to));
        };
        assert!((seen_from + HOLD_MS..=seen_to + HOLD_MS).contains(&until), "held until {until}, seen at {seen_to}");
        assert_eq!(step_at(&gw, until - 1), Step::Hold { until_ms: Some(until) });
        assert_eq!(step_at(&gw, until), Step::Send, "the hold's length passed");
    }

    #[test]
    fn a_gateway_whose_clock_is_behind_the_control_planes_holds_no_longer_than_the_holds_length() {
        let gw = gateway();
        let (seen_from, seen_to) = seen(&gw, &held_at(now_ms() + SKEW_MS, 4));
        // By its own clock the control plane's deadline is a minute and 5 s away.
        let Step::Hold { until_ms: Some(until) } = step_at(&gw, seen_to) else {
            panic!("not held: {:?}", step_at(&gw, seen_to));
        };
        assert!((seen_from + HOLD_MS..=seen_to + HOLD_MS).contains(&until), "held until {until}, seen at {seen_to}");
        assert_eq!(step_at(&gw, until), Step::Send, "held past the hold's length");
    }

    #[test]
    fn a_hold_is_timed_from_when_this_gateway_first_saw_it_across_rebuilds_and_a_new_hold_anew() {
        let gw = gateway();
        let first = held_at(1_000_000, 4);
        gw.rebuild_at(&first, None, 2_000_000);
        assert_eq!(step_at(&gw, 2_000_000), Step::Hold { until_ms: Some(2_000_000 + HOLD_MS) });
        // Rebuilt (a resync, or another record of the database changed) with the same
        // hold: the same end.
        gw.rebuild_at(&first, None, 2_003_000);
        gw.rebuild_at(&first, Some(&HashSet::from(["shop".to_owned()])), 2_003_000);
        assert_eq!(step_at(&gw, 2_003_000), Step::Hold { until_ms: Some(2_000_000 + HOLD_MS) });
        // Another hold (the same epoch held again after an abort: another deadline) starts anew.
        gw.rebuild_at(&held_at(1_010_000, 4), None, 2_003_000);
        assert_eq!(step_at(&gw, 2_003_000), Step::Hold { until_ms: Some(2_003_000 + HOLD_MS) });
    }

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
