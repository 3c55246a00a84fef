//! The control plane's writes to etcd: a database's route, users and limits.
//!
//! Key layout and record shapes are defined once in `nimbus_api::etcd`; the gateways
//! watch these keys.

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use nimbus_api::etcd::{self, Limits, ReplicaSetRecord, Route, RouteMember, RouteState, TenantClaim, UserRecord};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CoordError {
    #[error("failed to talk to etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("failed to configure the etcd connection: {0}")]
    Config(String),
    #[error("failed to decode {key} from etcd: {source}")]
    Decode { key: String, source: serde_json::Error },
}

pub struct Coordinator {
    client: Client,
}

impl Coordinator {
    /// Connects with the control plane's etcd identity (TLS client certificate or user).
    pub async fn connect(etcd: &nimbus_net::EtcdArgs) -> Result<Coordinator, CoordError> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(3))
            .with_timeout(std::time::Duration::from_secs(5));
        let opts = etcd.options(opts).map_err(|e| CoordError::Config(e.to_string()))?;
        Ok(Coordinator { client: Client::connect(&etcd.endpoints, Some(opts)).await? })
    }

    pub async fn route(&self, db: &str) -> Result<Option<Route>, CoordError> {
        Ok(self.route_at(db).await?.0)
    }

    /// The route of `db` and etcd's revision when it was read.
    async fn route_at(&self, db: &str) -> Result<(Option<Route>, u64), CoordError> {
        let key = etcd::route_key(db);
        let resp = self.client.kv_client().get(key.as_str(), None).await?;
        let revision = resp.header().map_or(0, |h| h.revision().max(0) as u64);
        match resp.kvs().first() {
            None => Ok((None, revision)),
            Some(kv) => serde_json::from_slice(kv.value())
                .map(|r| (Some(r), revision))
                .map_err(|source| CoordError::Decode { key, source }),
        }
    }

    /// Points `db` at `replica_set` with these members. An existing route on the same
    /// replica set keeps its epoch and state (a member change is not a move), so the write
    /// is idempotent and never undoes a migration's hold. A new route, or one moved to
    /// another replica set, gets an epoch above any the database ever had: etcd's revision
    /// (it only grows, and a route's epoch was at most the revision when it was written),
    /// so a database dropped and created again never starts over below an epoch a replica
    /// set still remembers. The reconcilers never call it (placement creates a route once,
    /// `create_route`; a replica set updates its members, `update_route_members`): it is
    /// the move a migration's switch makes, and how the tests set a route.
    pub async fn put_route(&self, db: &str, replica_set: &str, members: Vec<RouteMember>) -> Result<bool, CoordError> {
        let (current, revision) = self.route_at(db).await?;
        let fresh_epoch = revision + 1;
        let route = match &current {
            Some(r) if r.replica_set == replica_set => Route { members, ..r.clone() },
            Some(r) => {
                Route { replica_set: replica_set.into(), members, epoch: fresh_epoch.max(r.epoch + 1), ..r.clone() }
            }
            None => Route {
                replica_set: replica_set.into(),
                members,
                epoch: fresh_epoch,
                state: RouteState::Serving,
                hold_deadline_ms: None,
                hold_timeout_ms: None,
            },
        };
        if current.as_ref() == Some(&route) {
            return Ok(false);
        }
        self.put_json(&etcd::route_key(db), &route).await?;
        Ok(true)
    }

    /// The claim on `db` if `claim`'s instance holds it: a guard for a write made on that
    /// instance's behalf (its claim unchanged since read), else `None`.
    async fn held_claim(&self, db: &str, claim: &TenantClaim) -> Result<Option<Compare>, CoordError> {
        let key = etcd::tenant_key(db);
        let resp = self.client.kv_client().get(key.as_str(), None).await?;
        let Some(kv) = resp.kvs().first() else { return Ok(None) };
        let held: TenantClaim =
            serde_json::from_slice(kv.value()).map_err(|source| CoordError::Decode { key: key.clone(), source })?;
        let ours = held.uid == claim.uid && held.namespace == claim.namespace;
        Ok(ours.then(|| Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())))
    }

    /// Creates `db`'s route on `replica_set` unless it has one (placement's decision,
    /// written once), for the instance holding `db`'s claim only, in one transaction with
    /// that claim; `true` when created.
    pub async fn create_route(
        &self,
        db: &str,
        claim: &TenantClaim,
        replica_set: &str,
        members: Vec<RouteMember>,
    ) -> Result<bool, CoordError> {
        let (current, revision) = self.route_at(db).await?;
        if current.is_some() {
            return Ok(false);
        }
        let Some(claimed) = self.held_claim(db, claim).await? else { return Ok(false) };
        let route = Route {
            replica_set: replica_set.into(),
            members,
            epoch: revision + 1,
            state: RouteState::Serving,
            hold_deadline_ms: None,
            hold_timeout_ms: None,
        };
        let key = etcd::route_key(db);
        let value = serde_json::to_vec(&route).map_err(|source| CoordError::Decode { key: key.clone(), source })?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0), claimed])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let created = self.client.kv_client().txn(txn).await?.succeeded();
        if created {
            metrics::counter!("nimbus_operator_etcd_writes_total").increment(1);
        }
        Ok(created)
    }

    /// Sets the members of `db`'s route, keeping its replica set, epoch and state: what the
    /// replica set's own controller may change. Only while the route is still on
    /// `replica_set` (a migration's switch is never undone) and only for the instance
    /// holding `db`'s claim (a replica set of the same name in another namespace never
    /// rewrites it): a compare-and-swap on both. `true` when written.
    pub async fn update_route_members(
        &self,
        db: &str,
        claim: &TenantClaim,
        replica_set: &str,
        members: Vec<RouteMember>,
    ) -> Result<bool, CoordError> {
        let Some(claimed) = self.held_claim(db, claim).await? else { return Ok(false) };
        let key = etcd::route_key(db);
        let resp = self.client.kv_client().get(key.as_str(), None).await?;
        let Some(kv) = resp.kvs().first() else { return Ok(false) };
        let route: Route =
            serde_json::from_slice(kv.value()).map_err(|source| CoordError::Decode { key: key.clone(), source })?;
        if route.replica_set != replica_set || route.members == members {
            return Ok(false);
        }
        let route = Route { members, ..route };
        let value = serde_json::to_vec(&route).map_err(|source| CoordError::Decode { key: key.clone(), source })?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()), claimed])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let written = self.client.kv_client().txn(txn).await?.succeeded();
        if written {
            metrics::counter!("nimbus_operator_etcd_writes_total").increment(1);
        }
        Ok(written)
    }

    /// The route of `db` with its `mod_revision` (the guard of [`Coordinator::swap_route`]).
    pub async fn route_revision(&self, db: &str) -> Result<Option<(Route, u64)>, CoordError> {
        let key = etcd::route_key(db);
        self.get_json_revision(&key).await
    }

    /// A migration's route change (hold, switch, roll back): writes `route` only if `db`'s
    /// route is unchanged since it was read at `mod_revision`, so no decision is made on a
    /// route someone else moved (a reconciler's member update in between makes it read
    /// again). With `clear_holds`, the gateways' hold acknowledgements of `db` go in the same
    /// transaction: an acknowledgement of an earlier hold never counts for the next one.
    /// `false` when the route changed (nothing written).
    pub async fn swap_route(
        &self,
        db: &str,
        mod_revision: u64,
        route: &Route,
        clear_holds: bool,
    ) -> Result<bool, CoordError> {
        let key = etcd::route_key(db);
        let value = serde_json::to_vec(route).map_err(|source| CoordError::Decode { key: key.clone(), source })?;
        let mut ops = vec![TxnOp::put(key.as_str(), value, None)];
        if clear_holds {
            let holds = format!("{}{db}/", etcd::HOLDS);
            ops.push(TxnOp::delete(holds, Some(DeleteOptions::new().with_prefix())));
        }
        let guard = Compare::mod_revision(key.as_str(), CompareOp::Equal, mod_revision as i64);
        let written = self.client.kv_client().txn(Txn::new().when([guard]).and_then(ops)).await?.succeeded();
        if written {
            metrics::counter!("nimbus_operator_etcd_writes_total").increment(1);
        }
        Ok(written)
    }

    /// The gateways registered now (their ids) and the hold acknowledgements of `db` (by
    /// gateway id, each with its value as written), read at one revision.
    pub async fn hold_view(&self, db: &str) -> Result<(Vec<String>, Vec<(String, Vec<u8>)>), CoordError> {
        let mut kv = self.client.kv_client();
        let gateways =
            kv.get(etcd::GATEWAYS, Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await?;
        let revision = gateways.header().map_or(0, |h| h.revision());
        let holds_prefix = format!("{}{db}/", etcd::HOLDS);
        let holds = kv
            .get(holds_prefix.as_str(), Some(etcd_client::GetOptions::new().with_prefix().with_revision(revision)))
            .await?;
        let ids = gateways
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).trim_start_matches(etcd::GATEWAYS).to_owned())
            .collect();
        let acks = holds
            .kvs()
            .iter()
            .map(|kv| {
                let id = String::from_utf8_lossy(kv.key()).trim_start_matches(holds_prefix.as_str()).to_owned();
                (id, kv.value().to_vec())
            })
            .collect();
        Ok((ids, acks))
    }

    /// `key`'s JSON value and its `mod_revision`.
    pub async fn get_json_revision<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>, CoordError> {
        match self.client.kv_client().get(key, None).await?.kvs().first() {
            None => Ok(None),
            Some(kv) => serde_json::from_slice(kv.value())
                .map(|v| Some((v, kv.mod_revision().max(0) as u64)))
                .map_err(|source| CoordError::Decode { key: key.into(), source }),
        }
    }

    /// Every JSON value under `prefix` with its `mod_revision`.
    pub async fn list_json_revision<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(T, u64)>, CoordError> {
        let resp = self.client.kv_client().get(prefix, Some(etcd_client::GetOptions::new().with_prefix())).await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map(|v| (v, kv.mod_revision().max(0) as u64)).map_err(|source| {
                    CoordError::Decode { key: String::from_utf8_lossy(kv.key()).into_owned(), source }
                })
            })
            .collect()
    }

    /// Writes `value` at `key` if its `mod_revision` is still `expected` (`None`: only if the
    /// key does not exist). The new `mod_revision`, or `None` when the key changed.
    pub async fn put_json_if<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
        expected: Option<u64>,
    ) -> Result<Option<u64>, CoordError> {
        let bytes = serde_json::to_vec(value).map_err(|source| CoordError::Decode { key: key.into(), source })?;
        let guard = match expected {
            None => Compare::create_revision(key, CompareOp::Equal, 0),
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev as i64),
        };
        let resp =
            self.client.kv_client().txn(Txn::new().when([guard]).and_then([TxnOp::put(key, bytes, None)])).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        metrics::counter!("nimbus_operator_etcd_writes_total").increment(1);
        // The transaction's revision is the put's mod_revision.
        Ok(Some(resp.header().map_or(0, |h| h.revision().max(0) as u64)))
    }

    pub async fn put_user(&self, db: &str, user: &str, record: &UserRecord) -> Result<(), CoordError> {
        self.put_json(&etcd::user_key(db, user), record).await
    }

    pub async fn put_limits(&self, db: &str, limits: &Limits) -> Result<(), CoordError> {
        self.put_json(&etcd::limits_key(db), limits).await
    }

    /// Removes every key of the database (route, users, limits, holds, and its claim) if
    /// `claim`'s instance holds the claim, or can take it now, in one transaction guarded
    /// by that claim: an instance refused for a name another owns never deletes the owner's
    /// records, even if the claim changes hands meanwhile. `false` when the name is
    /// another's (nothing deleted).
    pub async fn delete_database(&self, db: &str, claim: &TenantClaim, placed: bool) -> Result<bool, CoordError> {
        if self.claim_database(db, claim, placed).await?.is_err() {
            tracing::info!(database = db, "not deleting a database another instance claims");
            return Ok(false);
        }
        let claim_key = etcd::tenant_key(db);
        let held = self.client.kv_client().get(claim_key.as_str(), None).await?;
        let Some(kv) = held.kvs().first() else { return Ok(false) };
        let ours: TenantClaim = serde_json::from_slice(kv.value())
            .map_err(|source| CoordError::Decode { key: claim_key.clone(), source })?;
        if ours.uid != claim.uid {
            return Ok(false);
        }
        let prefix = |p: &str| format!("{p}{db}/");
        let deletes = vec![
            TxnOp::delete(etcd::route_key(db), None),
            TxnOp::delete(etcd::limits_key(db), None),
            TxnOp::delete(prefix(etcd::USERS), Some(DeleteOptions::new().with_prefix())),
            TxnOp::delete(prefix(etcd::HOLDS), Some(DeleteOptions::new().with_prefix())),
            TxnOp::delete(claim_key.as_str(), None),
        ];
        // The claim read above, ours, unchanged since.
        let guard = Compare::mod_revision(claim_key.as_str(), CompareOp::Equal, kv.mod_revision());
        let done = self.client.kv_client().txn(Txn::new().when([guard]).and_then(deletes)).await?.succeeded();
        Ok(done)
    }

    /// Deletes one key (nothing when it is absent): a record whose owner is gone for good,
    /// such as a swept incarnation's backup record (`backup::agent`, `BackupAgent::sweep`).
    /// Not part of [`Coordinator::delete_database`]: a deleted instance's backups stay
    /// restorable for their orphan retention, and a restore plans with its record.
    pub async fn delete_key(&self, key: &str) -> Result<(), CoordError> {
        self.client.kv_client().delete(key, None).await?;
        Ok(())
    }

    /// Deletes the users of `db` not in `keep` (their tokens stop working at once); returns
    /// the names removed.
    pub async fn retain_users(&self, db: &str, keep: &[String]) -> Result<Vec<String>, CoordError> {
        let prefix = format!("{}{db}/", etcd::USERS);
        let opts = etcd_client::GetOptions::new().with_prefix().with_keys_only();
        let resp = self.client.kv_client().get(prefix.as_str(), Some(opts)).await?;
        let mut removed = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let name = key.trim_start_matches(prefix.as_str()).to_string();
            if !keep.contains(&name) {
                self.client.kv_client().delete(key.as_str(), None).await?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Claims `db` for `claim`'s instance unless another instance holds it: `Ok(())` when
    /// the claim is (now) this instance's, `Err(owner)` otherwise. An instance not yet
    /// placed cannot claim a name that already has a route but no claim (its tenant's
    /// instance predates claims and claims it at its next reconcile): `Err` with an empty
    /// owner then.
    pub async fn claim_database(
        &self,
        db: &str,
        claim: &TenantClaim,
        placed: bool,
    ) -> Result<Result<(), TenantClaim>, CoordError> {
        let key = etcd::tenant_key(db);
        let value = serde_json::to_vec(claim).map_err(|source| CoordError::Decode { key: key.clone(), source })?;
        let route = etcd::route_key(db);
        let mut when = vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)];
        if !placed {
            when.push(Compare::create_revision(route.as_str(), CompareOp::Equal, 0));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.client.kv_client().txn(txn).await?;
        if resp.succeeded() {
            return Ok(Ok(()));
        }
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let owner: TenantClaim = match current {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|source| CoordError::Decode { key, source })?,
            // Unclaimed, with a route: an instance from before claims owns the name.
            None => {
                return Ok(Err(TenantClaim { namespace: String::new(), instance: String::new(), uid: String::new() }));
            }
        };
        Ok(if owner.uid == claim.uid { Ok(()) } else { Err(owner) })
    }

    pub async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetRecord>, CoordError> {
        self.get_json(&etcd::replica_set_key(namespace, name)).await
    }

    /// The incarnation of a replica set's Raft log: the etcd revision that created its
    /// record (`None`: no record). The record is written once, when the replica set is
    /// bootstrapped, and deleted only when the replica set is forgotten, so a replica set
    /// made again under the same name (a new, empty Raft log) gets another revision; the
    /// create revision, not the last write's, so a later update of the record keeps it. The
    /// backup agent names an oplog lineage by it (`backup::agent::lineage_of`).
    pub async fn replica_set_incarnation(&self, namespace: &str, name: &str) -> Result<Option<u64>, CoordError> {
        let resp = self.client.kv_client().get(etcd::replica_set_key(namespace, name), None).await?;
        Ok(resp.kvs().first().map(|kv| kv.create_revision().max(0) as u64))
    }

    /// Records that a replica set was bootstrapped; the first record stays.
    pub async fn record_replica_set(
        &self,
        namespace: &str,
        name: &str,
        record: &ReplicaSetRecord,
    ) -> Result<(), CoordError> {
        let key = etcd::replica_set_key(namespace, name);
        let value = serde_json::to_vec(record).map_err(|source| CoordError::Decode { key: key.clone(), source })?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        self.client.kv_client().txn(txn).await?;
        Ok(())
    }

    /// The databases of `namespace` whose route names `replica_set`: where the control plane
    /// serves each database, written when it is placed and moved by a migration's switch.
    /// Replica-set names are a namespace's, so the database's claim says whose it is; a route
    /// with no claim (written before claims existed) counts.
    pub async fn databases_on(&self, namespace: &str, replica_set: &str) -> Result<Vec<String>, CoordError> {
        let opts = etcd_client::GetOptions::new().with_prefix();
        let resp = self.client.kv_client().get(etcd::ROUTES, Some(opts)).await?;
        let mut on = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let route: Route =
                serde_json::from_slice(kv.value()).map_err(|source| CoordError::Decode { key: key.clone(), source })?;
            let Some(db) = key.strip_prefix(etcd::ROUTES).filter(|_| route.replica_set == replica_set) else {
                continue;
            };
            let claim: Option<TenantClaim> = self.get_json(&etcd::tenant_key(db)).await?;
            if claim.is_none_or(|c| c.namespace == namespace) {
                on.push(db.to_owned());
            }
        }
        Ok(on)
    }

    /// Forgets a replica set whose members and volumes were deleted on purpose.
    pub async fn forget_replica_set(&self, namespace: &str, name: &str) -> Result<(), CoordError> {
        self.client.kv_client().delete(etcd::replica_set_key(namespace, name), None).await?;
        Ok(())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CoordError> {
        match self.client.kv_client().get(key, None).await?.kvs().first() {
            None => Ok(None),
            Some(kv) => serde_json::from_slice(kv.value())
                .map(Some)
                .map_err(|source| CoordError::Decode { key: key.into(), source }),
        }
    }

    /// Writes `value` unless the key holds it already: every reconcile of every tenant
    /// republishes its records, and each etcd write is a revision kept until compaction.
    async fn put_json<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), CoordError> {
        let bytes = serde_json::to_vec(value).map_err(|source| CoordError::Decode { key: key.into(), source })?;
        let current = self.client.kv_client().get(key, None).await?;
        if current.kvs().first().is_some_and(|kv| kv.value() == bytes.as_slice()) {
            return Ok(());
        }
        metrics::counter!("nimbus_operator_etcd_writes_total").increment(1);
        self.client.kv_client().put(key, bytes, None).await?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "coord_tests.rs"]
pub(crate) mod tests;
