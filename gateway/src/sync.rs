//! Keeping the tables in step with etcd: register with a lease, load every key under
//! `/nimbus/`, then apply the watch stream. When the lease cannot be renewed the gateway
//! stops serving (`is_serving` turns false by itself once the lease's validity passes) and
//! starts over: new lease, full reload, new watch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::collections::HashSet;

use etcd_client::{ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions};
use nimbus_api::etcd::{self as keys, GatewayRegistration, Limits, Route, UserRecord};

use crate::ack;
use crate::state::{Gateway, Tables, now_ms};

/// Runs for the life of the gateway.
pub async fn run(gw: Arc<Gateway>, public_addr: String) {
    loop {
        if let Err(e) = session(&gw, &public_addr).await {
            tracing::warn!(error = %e, "etcd session ended; not serving until resynced");
        }
        gw.synced.store(false, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn session(gw: &Arc<Gateway>, public_addr: &str) -> anyhow::Result<()> {
    let ttl = gw.config.lease_ttl_secs.max(1);
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(ttl as u64))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
    let mut client = gw.config.etcd.connect(options).await?;
    let granted_at = now_ms();
    let lease = client.lease_grant(ttl, None).await?.id();
    gw.lease_valid_until_ms.store(granted_at + ttl as u64 * 1000, Ordering::Release);
    let reg = GatewayRegistration { id: gw.config.id.clone(), addr: public_addr.to_owned(), started_ms: now_ms() };
    client
        .put(keys::gateway_key(&gw.config.id), serde_json::to_vec(&reg)?, Some(PutOptions::new().with_lease(lease)))
        .await?;

    let resp = client.get(keys::PREFIX, Some(GetOptions::new().with_prefix())).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut tables = Tables::default();
    for kv in resp.kvs() {
        apply_put(&mut tables, kv);
    }
    gw.rebuild(&tables, None);
    let mut events =
        client.watch(keys::PREFIX, Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1))).await?;
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
    gw.synced.store(true, Ordering::Release);
    // Requests waiting for a route this gateway can trust look again now.
    gw.routes_version.send_modify(|v| *v += 1);
    tracing::info!(revision, "in sync with etcd");
    // Acknowledgements wait for requests in flight: never in this loop, which renews the
    // lease. The task ends with the session (and its acknowledgements with the lease).
    let _acks = ack::Task::spawn(ack::run(gw.clone(), client.clone(), lease));

    let mut tick = tokio::time::interval(Duration::from_millis((ttl as u64 * 1000 / 3).max(100)));
    let mut sent_ms = now_ms();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sent_ms = now_ms();
                tokio::time::timeout(Duration::from_secs(1), keeper.keep_alive()).await.map_err(|_| anyhow::anyhow!("lease keep-alive stalled"))??;
            }
            ack = acks.message() => match ack? {
                Some(r) if r.ttl() > 0 => {
                    // Valid for the TTL counted from when the renewal was sent.
                    gw.lease_valid_until_ms.store(sent_ms + r.ttl() as u64 * 1000, Ordering::Release);
                }
                Some(_) => anyhow::bail!("the gateway's lease expired"),
                None => anyhow::bail!("lease keep-alive stream closed"),
            },
            msg = events.message() => {
                let Some(resp) = msg? else { anyhow::bail!("watch stream closed") };
                if resp.canceled() {
                    anyhow::bail!("watch canceled: {}", resp.cancel_reason());
                }
                let mut routes_changed = false;
                let mut changed = HashSet::new();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    routes_changed |= kv.key().starts_with(keys::ROUTES.as_bytes());
                    let db = match ev.event_type() {
                        EventType::Put => apply_put(&mut tables, kv),
                        EventType::Delete => apply_delete(&mut tables, kv),
                    };
                    changed.extend(db);
                }
                gw.rebuild(&tables, Some(&changed));
                if routes_changed {
                    gw.routes_version.send_modify(|v| *v += 1);
                }
            }
        }
    }
}

fn key_str(kv: &KeyValue) -> Option<&str> {
    kv.key_str().ok()
}

/// Applies a put to the tables; returns the database it concerns.
fn apply_put(t: &mut Tables, kv: &KeyValue) -> Option<String> {
    let key = key_str(kv)?;
    let value = kv.value();
    if let Some(db) = key.strip_prefix(keys::ROUTES) {
        match serde_json::from_slice::<Route>(value) {
            Ok(r) => {
                t.routes.insert(db.to_owned(), r);
            }
            Err(e) => tracing::error!(key, error = %e, "ignoring a malformed route"),
        }
        Some(db.to_owned())
    } else if let Some(rest) = key.strip_prefix(keys::USERS) {
        let (db, user) = rest.split_once('/')?;
        match serde_json::from_slice::<UserRecord>(value) {
            Ok(u) => {
                t.users.entry(db.to_owned()).or_default().insert(user.to_owned(), u);
            }
            Err(e) => tracing::error!(key, error = %e, "ignoring a malformed user"),
        }
        Some(db.to_owned())
    } else if let Some(db) = key.strip_prefix(keys::LIMITS) {
        match serde_json::from_slice::<Limits>(value) {
            Ok(l) => {
                t.limits.insert(db.to_owned(), l);
            }
            Err(e) => tracing::error!(key, error = %e, "ignoring malformed limits"),
        }
        Some(db.to_owned())
    } else {
        None
    }
}

/// Applies a delete to the tables; returns the database it concerns.
fn apply_delete(t: &mut Tables, kv: &KeyValue) -> Option<String> {
    let key = key_str(kv)?;
    if let Some(db) = key.strip_prefix(keys::ROUTES) {
        t.routes.remove(db);
        Some(db.to_owned())
    } else if let Some(rest) = key.strip_prefix(keys::USERS) {
        let (db, user) = rest.split_once('/')?;
        if let Some(users) = t.users.get_mut(db) {
            users.remove(user);
            if users.is_empty() {
                t.users.remove(db);
            }
        }
        Some(db.to_owned())
    } else if let Some(db) = key.strip_prefix(keys::LIMITS) {
        t.limits.remove(db);
        Some(db.to_owned())
    } else {
        None
    }
}
