//! Acknowledging migration holds in etcd, apart from the session loop that renews the
//! gateway's lease: an acknowledgement waits for the database's requests in flight to end,
//! which may take as long as an attempt at a datanode (seconds), and the lease must be
//! renewed meanwhile, or every tenant of this gateway would be fenced for one tenant's
//! cutover.
//!
//! One task per held database: it waits until none of the database's requests is in flight
//! (`hold::Traffic`), then writes `/nimbus/holds/{db}/{gateway}` = [`HoldAck`] with the
//! gateway's lease, retrying until it is written or the hold ends. When the hold ends
//! (the route changes), the acknowledgement it wrote is withdrawn, only if it is still the
//! one written (a newer hold's acknowledgement is never deleted).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use nimbus_api::etcd::{self as keys, HoldAck, RouteState};
use tokio::task::JoinHandle;

use crate::state::{Gateway, RouteEntry, now_ms};

/// A task that ends when its handle is dropped (a session's tasks end with it).
pub struct Task<T>(Option<JoinHandle<T>>);

impl<T: Send + 'static> Task<T> {
    pub fn spawn(f: impl Future<Output = T> + Send + 'static) -> Task<T> {
        Task(Some(tokio::spawn(f)))
    }

    /// Its result, if it has finished (and `None` if it has not, or panicked).
    async fn result(mut self) -> Option<T> {
        let handle = self.0.take()?;
        if handle.is_finished() { handle.await.ok() } else { None }
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// One hold: the route as written with `Holding`, named by its epoch and deadline; and
/// when this gateway stops holding it, by its own clock (`RouteEntry::hold_until_ms`: the
/// same for every entry of the same hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    epoch: u64,
    deadline_ms: Option<u64>,
    until_ms: Option<u64>,
}

impl Hold {
    fn of(route: &RouteEntry) -> Option<Hold> {
        (route.state == RouteState::Holding).then_some(Hold {
            epoch: route.epoch,
            deadline_ms: route.hold_deadline_ms,
            until_ms: route.hold_until_ms,
        })
    }
}

/// A held database's hold and the task acknowledging it (its result: the value written).
type Acking = (Hold, Task<Option<Vec<u8>>>);

/// Acknowledges every hold of the session holding `lease`, for as long as it runs (the
/// session drops it when it ends: its acknowledgements go with the lease).
pub async fn run(gw: Arc<Gateway>, client: Client, lease: i64) {
    let mut changes = gw.routes_version.subscribe();
    let mut acks: HashMap<String, Acking> = HashMap::new();
    loop {
        let holding: HashMap<String, Hold> =
            gw.holding().into_iter().filter_map(|db| Some((db.name.clone(), Hold::of(db.route.as_ref()?)?))).collect();
        let ended: Vec<String> =
            acks.keys().filter(|db| holding.get(*db) != acks.get(*db).map(|a| &a.0)).cloned().collect();
        for db in ended {
            if let Some((_, task)) = acks.remove(&db)
                && let Some(Some(written)) = task.result().await
            {
                tokio::spawn(withdraw(client.clone(), keys::hold_key(&db, &gw.config.id), written));
            }
        }
        for (db, hold) in holding {
            if let std::collections::hash_map::Entry::Vacant(slot) = acks.entry(db) {
                let task = Task::spawn(acknowledge(gw.clone(), client.clone(), lease, slot.key().clone(), hold));
                slot.insert((hold, task));
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until none of `db`'s requests is in flight, then writes the acknowledgement of
/// `hold`; returns the value written (`None` when the hold ended first, by this gateway's
/// clock: the control plane aborts at its deadline, and an acknowledgement would only
/// mislead).
async fn acknowledge(gw: Arc<Gateway>, mut client: Client, lease: i64, db: String, hold: Hold) -> Option<Vec<u8>> {
    let traffic = gw.db(&db)?.traffic.clone();
    let expires = async {
        match hold.until_ms {
            Some(d) => tokio::time::sleep(Duration::from_millis(d.saturating_sub(now_ms()))).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = traffic.wait_idle() => {}
        _ = expires => {
            tracing::warn!(db, epoch = hold.epoch, "the hold ended with requests still in flight; not acknowledged");
            return None;
        }
    }
    let ack = HoldAck { epoch: hold.epoch, hold_deadline_ms: hold.deadline_ms, acked_ms: now_ms() };
    let value = match serde_json::to_vec(&ack) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(db, error = %e, "failed to encode a hold acknowledgement");
            return None;
        }
    };
    let key = keys::hold_key(&db, &gw.config.id);
    let mut backoff = Duration::from_millis(50);
    loop {
        match client.put(key.as_str(), value.clone(), Some(PutOptions::new().with_lease(lease))).await {
            Ok(_) => {
                tracing::info!(db, epoch = hold.epoch, "acknowledged the hold: no request in flight");
                return Some(value);
            }
            Err(e) => {
                tracing::warn!(db, error = %e, "failed to acknowledge a hold; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Deletes this gateway's acknowledgement of an ended hold, if it is still `written`.
async fn withdraw(mut client: Client, key: String, written: Vec<u8>) {
    let txn = Txn::new()
        .when([Compare::value(key.as_str(), CompareOp::Equal, written)])
        .and_then([TxnOp::delete(key.as_str(), None)]);
    if let Err(e) = client.txn(txn).await {
        // The lease takes it when this gateway goes; it names a hold that is over.
        tracing::debug!(key, error = %e, "failed to withdraw a hold acknowledgement");
    }
}
