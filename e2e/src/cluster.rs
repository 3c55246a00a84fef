//! A replica set of datanode processes in a temporary directory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nimbus_api::admin::{Role, Status};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::client::DataClient;
use crate::poll;
use crate::process::Datanode;

pub const ZONES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// How long [`Cluster::leader_post`] keeps sending a request again that no leader served:
/// an election, on two busy cores, well within it.
pub const LEADER_POST_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Cluster {
    pub nodes: Vec<Datanode>,
    /// Talks to the members as a Nimbus component does (with the cluster secret).
    pub client: DataClient,
    pub replica_set: String,
    /// Every member's extra arguments, `--cluster-secret-file` first.
    pub extra_args: Vec<String>,
    pub secret: nimbus_net::ClusterSecret,
    pub secret_file: std::path::PathBuf,
    pub tmp: TempDir,
    /// The member that served the last [`Cluster::leader_post`], tried first by the next
    /// (as a client keeps the leader it found): `usize::MAX` before any.
    last_leader: AtomicUsize,
}

impl Cluster {
    /// Starts `n` members in zones a, b, c... and initialises the replica set.
    pub async fn start(n: usize, extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let tmp = tempfile::Builder::new().prefix("nimbus-e2e-").tempdir()?;
        let (secret, secret_file) = crate::secret::write_new(tmp.path())?;
        let mut extra: Vec<String> = vec!["--cluster-secret-file".into(), secret_file.display().to_string()];
        extra.extend(extra_args.iter().map(|s| s.to_string()));
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            nodes.push(
                Datanode::start(id, ZONES[i % ZONES.len()], "rs0", &tmp.path().join(format!("n{id}")), &extra).await?,
            );
        }
        let cluster = Cluster {
            nodes,
            client: DataClient::internal(&secret),
            replica_set: "rs0".into(),
            extra_args: extra,
            secret,
            secret_file,
            tmp,
            last_leader: AtomicUsize::new(usize::MAX),
        };
        let members: Vec<_> = cluster.nodes.iter().map(|d| d.member()).collect();
        let (st, body) = cluster
            .client
            .post(&format!("{}/v1/admin/init", cluster.nodes[0].admin), &json!({ "members": members }))
            .await;
        if st != 200 {
            bail!("init failed: {st} {body}");
        }
        cluster.wait_leader(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    pub async fn status(&self, i: usize) -> Option<Status> {
        if !self.nodes[i].is_running() {
            return None;
        }
        let (st, body) = self.client.get(&format!("{}/v1/status", self.nodes[i].admin)).await;
        if st != 200 {
            return None;
        }
        serde_json::from_value(body).ok()
    }

    /// The index of the member that is leader and that every running voter agrees on.
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        poll("a leader every running member agrees on", timeout, || async {
            let mut statuses = Vec::new();
            for i in 0..self.nodes.len() {
                if self.nodes[i].is_running() {
                    statuses.push((i, self.status(i).await?));
                }
            }
            let (leader, ls) = statuses.iter().find(|(_, s)| s.role == Role::Leader)?;
            let agreed = statuses
                .iter()
                .filter(|(_, s)| s.role != Role::Learner)
                .all(|(_, s)| s.leader_id == Some(ls.id) && s.term == ls.term);
            agreed.then_some(*leader)
        })
        .await
    }

    /// Sends a request only the leader serves, as a client does: to the member that served
    /// the last one (or, the first time, the member that is leader now) and, while the
    /// answer says it was not served there, again to whichever member is leader then, for
    /// up to [`LEADER_POST_TIMEOUT`]. Leadership can move at any time, even right after
    /// the replica set's first election when the machine is loaded; a test that reads the
    /// leader once and asserts on its answer fails then for nothing.
    ///
    /// Not served: `NotLeader` (nothing was proposed); with `idempotency_key` also `503`
    /// (the leader lost its majority, or the write did not commit in time: it may still
    /// commit) and no answer, since a resend of a keyed write that did commit is answered
    /// its first outcome. Without a key only `NotLeader` is sent again: anything else
    /// may have been applied, and is the caller's to judge. Any other answer (a success, or an error such as `StaleRoute`) is the
    /// caller's to assert, with the index of the member that gave it. `url` is the
    /// request's URL on member `i`.
    pub async fn leader_post(
        &self,
        url: impl Fn(usize) -> String,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<(usize, u16, Value)> {
        let deadline = Instant::now() + LEADER_POST_TIMEOUT;
        let headers: Vec<(&str, &str)> =
            idempotency_key.map(|k| (nimbus_api::data::IDEMPOTENCY_KEY_HEADER, k)).into_iter().collect();
        let mut known = Some(self.last_leader.load(Ordering::Relaxed))
            .filter(|i| self.nodes.get(*i).is_some_and(|n| n.is_running()));
        loop {
            let leader = match known.take() {
                Some(leader) => leader,
                None => self.wait_leader(deadline.saturating_duration_since(Instant::now())).await?,
            };
            let target = url(leader);
            let (st, resp) = self.client.call(reqwest::Method::POST, &target, Some(body), &headers).await;
            let not_leader = st == 421 && resp["error"]["code"] == "NotLeader";
            let not_served = not_leader || (idempotency_key.is_some() && (st == 0 || st == 503));
            if !not_served {
                self.last_leader.store(leader, Ordering::Relaxed);
                return Ok((leader, st, resp));
            }
            if Instant::now() >= deadline {
                bail!("no leader served POST {target} within {LEADER_POST_TIMEOUT:?}; the last answer: {st} {resp}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Data API base URL of collection `coll` in database `db` on member `i`.
    pub fn coll_url(&self, i: usize, db: &str, coll: &str) -> String {
        format!("{}/v1/databases/{db}/collections/{coll}", self.nodes[i].data)
    }

    /// Waits until member `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64, timeout: Duration) -> anyhow::Result<()> {
        poll(&format!("member {} to apply index {index}", self.nodes[i].id), timeout, || async {
            let s = self.status(i).await?;
            (s.applied_index >= index).then_some(())
        })
        .await
    }

    /// Reads every document of a collection from member `i` without a leadership check.
    pub async fn local_docs(&self, i: usize, db: &str, coll: &str) -> anyhow::Result<Vec<Value>> {
        let (st, body) = self
            .client
            .call(
                reqwest::Method::POST,
                &format!("{}/find", self.coll_url(i, db, coll)),
                Some(&json!({"limit": 10000})),
                &[("x-nimbus-read", "any")],
            )
            .await;
        if st != 200 {
            bail!("local read on member {} failed: {st} {body}", self.nodes[i].id);
        }
        body["documents"].as_array().cloned().context("no documents array")
    }
}
