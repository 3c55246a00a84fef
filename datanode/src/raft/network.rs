//! The Raft transport: members call each other's admin port over HTTP/JSON with a pooled
//! client. Snapshots travel as their checkpoint files, in chunks of at most
//! [`SNAPSHOT_CHUNK_BYTES`], then one `install` call listing every file with its size and
//! the SHA-256 of the bytes the sender read (the receiver checks them before it installs;
//! see [`super::transfer`]). Any refusal is a network error to openraft, which sends the
//! snapshot again as a new transfer.
//!
//! The install call waits for the receiver's Raft to install the snapshot. It is given
//! [`INSTALL_TIMEOUT`] and one more second for every [`INSTALL_BYTES_PER_SEC`] bytes of the
//! snapshot (the receiver checked and synced each chunk as it came, but the install still
//! copies and links the files and RocksDB opens them). A call that times out all the same
//! leaves the install running on the receiver; the snapshot is sent again, and the
//! receiver keeps the new transfer waiting until the first install is done.
//!
//! Every answer also says whether the answering member is stopping ([`DRAINING_HEADER`]):
//! the leader keeps that in [`DrainingPeers`], so a leader handing its leadership over on
//! its own stop never picks a successor that is about to exit (`crate::shutdown`).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RaftNetworkFactory, RaftNetworkV2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;

use super::snapshot::{SnapshotData, data_files};
use super::transfer::{FileDigest, FileHasher, TransferId};
use super::types::{NodeInfo, TypeConfig, Vote};
use crate::clock::{CLOCK_HEADER, ReplicaClock};

type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Largest piece of a snapshot file sent in one request.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// The least time an install call is given.
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The slowest install an install call waits for, in bytes of snapshot per second, on top
/// of [`INSTALL_TIMEOUT`].
pub const INSTALL_BYTES_PER_SEC: u64 = 8 * 1024 * 1024;

/// How long an install call of a snapshot of `bytes` bytes waits, at least `base`.
pub fn install_timeout(base: Duration, bytes: u64) -> Duration {
    base.saturating_add(Duration::from_secs(bytes / INSTALL_BYTES_PER_SEC))
}

/// Body of `POST /raft/snapshot/{transfer}/install`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct InstallSnapshot {
    pub vote: Vote,
    pub meta: super::types::SnapshotMeta,
    /// Every file with its size and checksum, so the receiver can check it got them whole
    /// and unchanged.
    pub files: Vec<FileDigest>,
}

/// Set on every Raft answer of a member that is stopping (`crate::shutdown`).
pub const DRAINING_HEADER: &str = "x-nimbus-draining";

/// The peers whose last Raft answer said they are stopping. Heard on every heartbeat, so
/// it is at most one heartbeat interval old; a restarted member's first answer clears it.
#[derive(Debug, Default)]
pub struct DrainingPeers(Mutex<BTreeSet<u64>>);

impl DrainingPeers {
    /// Records what peer `id`'s last answer said.
    pub fn observe(&self, id: u64, draining: bool) {
        // A poisoned lock only means another thread panicked mid-insert: the set is whole.
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if draining {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }

    /// Whether peer `id` last said it is stopping.
    pub fn contains(&self, id: u64) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).contains(&id)
    }
}

/// What a test may do to a snapshot chunk between the sender reading it and the wire:
/// `(file, offset, bytes)`. Corrupting a byte here is corruption in transit.
#[doc(hidden)]
pub type ChunkHook = Arc<dyn Fn(&str, u64, &mut [u8]) + Send + Sync>;

/// Makes a client per peer; all share one connection pool.
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    append_timeout: Duration,
    max_append_bytes: usize,
    clock: Arc<ReplicaClock>,
    chunk_hook: Option<ChunkHook>,
    install_timeout: Duration,
    draining: Arc<DrainingPeers>,
}

impl Network {
    /// `append_timeout` bounds one AppendEntries call (see [`Peer::append_timeout`]);
    /// `max_append_bytes` bounds its body (see [`Peer::max_append_bytes`]); every answer's
    /// clock goes to `clock`; every call carries the cluster secret.
    pub fn new(
        append_timeout: Duration,
        max_append_bytes: usize,
        clock: Arc<ReplicaClock>,
        secret: &nimbus_net::ClusterSecret,
    ) -> Network {
        let client = reqwest::Client::builder()
            .default_headers(secret.default_headers())
            .pool_max_idle_per_host(16)
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Network {
            client,
            append_timeout,
            max_append_bytes,
            clock,
            chunk_hook: None,
            install_timeout: INSTALL_TIMEOUT,
            draining: Arc::default(),
        }
    }

    /// Records in `peers` which peers say they are stopping ([`DRAINING_HEADER`]).
    pub fn with_draining_peers(mut self, peers: Arc<DrainingPeers>) -> Network {
        self.draining = peers;
        self
    }

    /// Passes every snapshot chunk sent through `hook` (tests: corruption in transit).
    #[doc(hidden)]
    pub fn with_chunk_hook(mut self, hook: ChunkHook) -> Network {
        self.chunk_hook = Some(hook);
        self
    }

    /// Gives install calls `base` instead of [`INSTALL_TIMEOUT`] (tests: a sender that
    /// gives up early).
    #[doc(hidden)]
    pub fn with_install_timeout(mut self, base: Duration) -> Network {
        self.install_timeout = base;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> Peer {
        Peer {
            target,
            addr: node.raft_addr.trim_end_matches('/').to_owned(),
            client: self.client.clone(),
            append_timeout: self.append_timeout,
            max_append_bytes: self.max_append_bytes,
            clock: self.clock.clone(),
            chunk_hook: self.chunk_hook.clone(),
            install_timeout: self.install_timeout,
            draining: self.draining.clone(),
        }
    }
}

/// The client side of one peer.
pub struct Peer {
    target: u64,
    addr: String,
    client: reqwest::Client,
    /// The least time an AppendEntries call is given. openraft suggests the heartbeat
    /// interval (100 ms), but a batch of entries waits for the follower's fsync: on a busy
    /// machine that takes longer, and a call abandoned then is sent again, bigger, into the
    /// same queue; the follower falls behind, the leader loses its quorum lease and refuses
    /// writes. A follower not answering within the election timeout is a lost cause anyway.
    append_timeout: Duration,
    /// The most bytes of entries one AppendEntries call carries (at least one entry is
    /// always sent). openraft batches up to `max_payload_entries` entries whatever their
    /// size: a few large documents would make a body the follower refuses, and since the
    /// same batch is sent again, replication of every database on the replica set would
    /// stop. A call over the budget sends a prefix and reports it as a partial success;
    /// openraft sends the rest next.
    max_append_bytes: usize,
    clock: Arc<ReplicaClock>,
    chunk_hook: Option<ChunkHook>,
    /// The least time an install call is given (see [`install_timeout`]).
    install_timeout: Duration,
    draining: Arc<DrainingPeers>,
}

/// The first entries of `entries` whose JSON fits in `budget` bytes: at least one.
fn entries_within(entries: &[super::types::Entry], budget: usize) -> usize {
    if entries.len() <= 1 {
        return entries.len();
    }
    let mut size = 0usize;
    for (i, e) in entries.iter().enumerate() {
        size = size.saturating_add(entry_bytes(e));
        if i > 0 && size > budget {
            return i;
        }
    }
    entries.len()
}

/// About the size of an entry's JSON: an insert's or an import's documents are counted from their text
/// (the bulk of most entries, and no serialising on the replication path); anything else is
/// serialised into a counter, which allocates nothing (an entry that cannot be serialised
/// fails again, with its error, when the request is).
fn entry_bytes(e: &super::types::Entry) -> usize {
    const ENVELOPE: usize = 256;
    const DOC_ENVELOPE: usize = 32;
    if let openraft::EntryPayload::Normal(cmd) = &e.payload
        && let crate::store::WriteOp::Insert { docs, .. } = &cmd.op
    {
        return ENVELOPE + cmd.db.len() + docs.iter().map(|d| d.get().len() + 1).sum::<usize>();
    }
    // A restore's or a migration's pages of documents: each `{"coll":..,"doc":..}`.
    if let openraft::EntryPayload::Normal(cmd) = &e.payload
        && let crate::store::WriteOp::Import { step: nimbus_api::migration::ImportStep::Docs { docs }, .. } = &cmd.op
    {
        return ENVELOPE
            + cmd.db.len()
            + docs.iter().map(|d| DOC_ENVELOPE + d.coll.len() + d.doc.get().len()).sum::<usize>();
    }
    let mut count = ByteCount(0);
    let _ = serde_json::to_writer(&mut count, e);
    count.0 + 1
}

/// An `io::Write` that only counts.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Peer {
    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let url = format!("{}/raft/{path}", self.addr);
        let resp = self.client.post(&url).json(req).timeout(ttl).send().await.map_err(|e| {
            if e.is_connect() {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
        if let Some(ms) = resp.headers().get(CLOCK_HEADER).and_then(|v| v.to_str().ok()?.parse().ok()) {
            self.clock.observe(self.target, ms);
        }
        self.draining.observe(self.target, resp.headers().contains_key(DRAINING_HEADER));
        if !resp.status().is_success() {
            return Err(RPCError::Network(NetworkError::from_string(format!(
                "peer {} answered {} to {path}",
                self.target,
                resp.status()
            ))));
        }
        let result: Result<Resp, String> = resp.json().await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::Network(NetworkError::from_string(format!("peer {}: {e}", self.target))))
    }

    async fn send_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let net = |e: &dyn std::fmt::Display| StreamingError::Network(NetworkError::from_string(e.to_string()));
        let transfer = TransferId::random();
        let list = data_files(&snapshot.snapshot.dir).map_err(|e| net(&e))?;
        let mut digests = Vec::with_capacity(list.len());
        let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
        for (name, _) in &list {
            let mut f = tokio::fs::File::open(snapshot.snapshot.dir.join(name)).await.map_err(|e| net(&e))?;
            let mut hasher = FileHasher::new(name);
            let mut offset = 0u64;
            loop {
                // Fill the buffer: a short read is not the end of the file.
                let mut n = 0;
                while n < buf.len() {
                    let m = f.read(&mut buf[n..]).await.map_err(|e| net(&e))?;
                    if m == 0 {
                        break;
                    }
                    n += m;
                }
                // The checksum is of what was read, before the bytes leave this member.
                hasher.update(&buf[..n]);
                if let Some(hook) = &self.chunk_hook {
                    hook(name, offset, &mut buf[..n]);
                }
                let url = format!("{}/raft/snapshot/{transfer}/{name}?offset={offset}", self.addr);
                let resp = self
                    .client
                    .post(&url)
                    .body(buf[..n].to_vec())
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                    .map_err(|e| net(&e))?;
                if !resp.status().is_success() {
                    let status = resp.status();
                    let why = resp.text().await.unwrap_or_default();
                    return Err(net(&format!("peer {} refused snapshot chunk: {status}: {why}", self.target)));
                }
                offset += n as u64;
                if n < buf.len() {
                    break;
                }
            }
            digests.push(hasher.finish());
        }
        let bytes = digests.iter().map(|d| d.size).sum();
        let req = InstallSnapshot { vote, meta: snapshot.meta, files: digests };
        let url = format!("{}/raft/snapshot/{transfer}/install", self.addr);
        let ttl = install_timeout(self.install_timeout, bytes);
        let resp = self.client.post(&url).json(&req).timeout(ttl).send().await.map_err(|e| net(&e))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let why = resp.text().await.unwrap_or_default();
            return Err(net(&format!("peer {} refused the snapshot: {status}: {why}", self.target)));
        }
        let result: Result<SnapshotResponse<TypeConfig>, String> = resp.json().await.map_err(|e| net(&e))?;
        result.map_err(|e| net(&e))
    }
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.hard_ttl().max(self.append_timeout);
        let keep = entries_within(&rpc.entries, self.max_append_bytes);
        if keep == rpc.entries.len() {
            return self.post("append", &rpc, ttl).await;
        }
        rpc.entries.truncate(keep);
        let last = rpc.entries.last().map(|e| e.log_id);
        metrics::counter!("nimbus_raft_append_split_total").increment(1);
        Ok(match self.post("append", &rpc, ttl).await? {
            AppendEntriesResponse::Success => AppendEntriesResponse::PartialSuccess(last),
            other => other,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.post("vote", &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.post("pre-vote", &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = self.send_snapshot(vote, snapshot) => r,
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.post("transfer-leader", &req, option.hard_ttl()).await
    }
}

#[cfg(test)]
mod tests {
    use nimbus_api::migration::{ExportedDoc, ImportStep};
    use openraft::entry::RaftEntry;
    use serde_json::value::RawValue;

    use super::*;
    use crate::raft::types::{Entry, TypeConfig};
    use crate::store::{Command, WriteOp};

    fn entry(op: WriteOp) -> Entry {
        let cmd = Command {
            db: "shop".into(),
            op,
            idempotency_key: None,
            ts_ms: 1,
            route_epoch: Some(3),
            request_hash: None,
        };
        Entry::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, 7), cmd)
    }

    #[test]
    fn an_entrys_estimated_size_covers_its_json_closely() {
        let doc = |i: usize| RawValue::from_string(format!(r#"{{"_id":{i},"s":"{}"}}"#, "x".repeat(1000))).unwrap();
        let docs = (0..50).map(|i| ExportedDoc { coll: "orders".into(), doc: doc(i) }).collect();
        let import = WriteOp::Import { migration: "restore-1".into(), step: ImportStep::Docs { docs } };
        for e in [entry(import), entry(WriteOp::Insert { coll: "orders".into(), docs: (0..50).map(doc).collect() })] {
            let (estimate, actual) = (entry_bytes(&e), serde_json::to_vec(&e).unwrap().len());
            assert!(estimate >= actual && estimate < actual + actual / 20, "estimate {estimate}, actual {actual}");
        }
    }

    #[test]
    fn an_install_call_waits_longer_for_a_bigger_snapshot() {
        assert_eq!(install_timeout(INSTALL_TIMEOUT, 0), INSTALL_TIMEOUT);
        assert_eq!(install_timeout(INSTALL_TIMEOUT, 1024 * 1024), INSTALL_TIMEOUT);
        assert_eq!(install_timeout(INSTALL_TIMEOUT, 8 << 30), INSTALL_TIMEOUT + Duration::from_secs(1024));
    }
}
