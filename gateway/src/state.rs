//! What a gateway knows: the route table, users and limits mirrored from etcd, the leader
//! it last saw for each replica set, and the per-database limiters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nimbus_api::etcd::{Limits, Route, Tier, UserRecord};
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::limits::TenantLimiter;
use crate::usage::Usage;

/// The control plane's tables, as of the last etcd revision applied.
#[derive(Debug, Default, Clone)]
pub struct Tables {
    pub routes: HashMap<String, Route>,
    pub users: HashMap<(String, String), UserRecord>,
    pub limits: HashMap<String, Limits>,
}

pub struct Gateway {
    pub config: Config,
    pub tables: RwLock<Tables>,
    /// The tables are a faithful copy of etcd (initial load done, watch running).
    pub synced: AtomicBool,
    /// The gateway's lease is known valid until this instant (ms since the Unix epoch).
    pub lease_valid_until_ms: AtomicU64,
    /// Bumped on every route change; held requests wait on it.
    pub routes_version: tokio::sync::watch::Sender<u64>,
    /// Replica set → data address of the leader last seen.
    pub leaders: Mutex<HashMap<String, String>>,
    tenants: Mutex<HashMap<String, Arc<TenantLimiter>>>,
    upstream_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    pub upstream: reqwest::Client,
    pub usage: Usage,
    pub default_tier: Tier,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Gateway {
    pub fn new(config: Config) -> anyhow::Result<Gateway> {
        let default_tier = match config.default_tier.as_str() {
            "free" => Tier::Free,
            "standard" => Tier::Standard,
            "dedicated" => Tier::Dedicated,
            other => anyhow::bail!("unknown tier {other:?}: use free, standard or dedicated"),
        };
        let upstream = reqwest::Client::builder()
            .pool_max_idle_per_host(config.upstream_max_in_flight)
            .pool_idle_timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .build()?;
        Ok(Gateway {
            config,
            tables: RwLock::new(Tables::default()),
            synced: AtomicBool::new(false),
            lease_valid_until_ms: AtomicU64::new(0),
            routes_version: tokio::sync::watch::channel(0).0,
            leaders: Mutex::new(HashMap::new()),
            tenants: Mutex::new(HashMap::new()),
            upstream_slots: Mutex::new(HashMap::new()),
            upstream,
            usage: Usage::default(),
            default_tier,
        })
    }

    /// Serving is allowed only with tables in sync and a lease known to be alive: a gateway
    /// cut off from etcd cannot trust its routes (another may have moved a database).
    pub fn is_serving(&self) -> bool {
        self.synced.load(Ordering::Acquire) && now_ms() < self.lease_valid_until_ms.load(Ordering::Acquire)
    }

    pub fn tables(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn user(&self, db: &str, user: &str) -> Option<UserRecord> {
        self.tables().users.get(&(db.to_owned(), user.to_owned())).cloned()
    }

    pub fn route(&self, db: &str) -> Option<Route> {
        self.tables().routes.get(db).cloned()
    }

    /// The limiter of `db`, rebuilt when its configured limits changed.
    pub fn limiter(&self, db: &str) -> Arc<TenantLimiter> {
        let limits = self.tables().limits.get(db).cloned().unwrap_or_else(|| Limits::for_tier(self.default_tier));
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        match tenants.get(db) {
            Some(l) if l.limits == limits => l.clone(),
            _ => {
                let l = Arc::new(TenantLimiter::new(limits));
                tenants.insert(db.to_owned(), l.clone());
                l
            }
        }
    }

    /// The slots bounding concurrent requests to one datanode.
    pub fn upstream_slots(&self, addr: &str) -> Arc<Semaphore> {
        let mut slots = self.upstream_slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(addr.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.upstream_max_in_flight)))
            .clone()
    }

    pub fn cached_leader(&self, replica_set: &str) -> Option<String> {
        self.leaders.lock().unwrap_or_else(|p| p.into_inner()).get(replica_set).cloned()
    }

    pub fn set_leader(&self, replica_set: &str, addr: String) {
        self.leaders.lock().unwrap_or_else(|p| p.into_inner()).insert(replica_set.to_owned(), addr);
    }

    /// Forgets `addr` as the leader of `replica_set`, unless another request has already
    /// found a different one (a late failure must not erase a fresh discovery).
    pub fn forget_leader(&self, replica_set: &str, addr: &str) {
        let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
        if leaders.get(replica_set).is_some_and(|l| l == addr) {
            leaders.remove(replica_set);
        }
    }
}
