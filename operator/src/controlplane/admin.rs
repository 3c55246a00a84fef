//! The datanode admin API as the control plane drives it, and the Raft view it derives.

use std::collections::BTreeSet;
use std::time::Duration;

use nimbus_api::admin::{
    AddLearnerRequest, ChangeVotersRequest, InitRequest, MemberInfo, RemoveMemberRequest, Role, Status,
    TransferLeaderRequest,
};
use serde::Serialize;
use thiserror::Error;

use super::members::{Membership, RaftView};

/// Each admin call gets this long; a blocking add-learner (catch-up) gets longer.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("failed to reach datanode {addr}: {source}")]
    Unreachable { addr: String, source: reqwest::Error },
    #[error("datanode {addr} refused {what}: {status} {body}")]
    Refused { addr: String, what: &'static str, status: u16, body: String },
}

/// A member that does not say how it is within this long counts as unreachable (a
/// partitioned member must not stall the control loop's look at the others).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// An HTTP client of datanode admin ports (`http://host:port`).
#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    secret: nimbus_net::ClusterSecret,
}

impl AdminClient {
    /// A client sending `secret` with every call.
    pub fn new(secret: &nimbus_net::ClusterSecret) -> AdminClient {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(ADMIN_TIMEOUT)
            .build()
            .unwrap_or_default();
        AdminClient { http, secret: secret.clone() }
    }

    /// The client of one namespace's datanodes: the same connections, that namespace's
    /// secret. (The operator's secret was checked at start: a scoped one always derives.)
    pub fn scoped(&self, namespace: &str) -> Result<AdminClient, nimbus_net::cluster::SecretError> {
        Ok(AdminClient { http: self.http.clone(), secret: self.secret.scoped(namespace)? })
    }

    fn get(&self, url: String) -> reqwest::RequestBuilder {
        self.http.get(url).header(reqwest::header::AUTHORIZATION, self.secret.authorization().clone())
    }

    pub async fn status(&self, admin: &str) -> Result<Status, AdminError> {
        let unreachable = |source| AdminError::Unreachable { addr: admin.to_string(), source };
        let resp = self.get(format!("{admin}/v1/status")).timeout(STATUS_TIMEOUT).send().await.map_err(unreachable)?;
        let resp = resp.error_for_status().map_err(unreachable)?;
        resp.json().await.map_err(unreachable)
    }

    pub async fn ready(&self, admin: &str) -> bool {
        let resp = self.get(format!("{admin}/readyz")).timeout(STATUS_TIMEOUT).send().await;
        matches!(resp, Ok(r) if r.status().is_success())
    }

    pub async fn init(&self, admin: &str, members: Vec<MemberInfo>) -> Result<(), AdminError> {
        self.post(admin, "/v1/admin/init", "init", &InitRequest { members }, ADMIN_TIMEOUT).await
    }

    /// Adds a learner and answers once it has caught up with the leader's log.
    pub async fn add_learner(&self, leader: &str, member: MemberInfo) -> Result<(), AdminError> {
        let req = AddLearnerRequest { member, blocking: true };
        self.post(leader, "/v1/admin/learners", "add learner", &req, CATCH_UP_TIMEOUT).await
    }

    pub async fn change_voters(&self, leader: &str, voters: &BTreeSet<u64>) -> Result<(), AdminError> {
        let req = ChangeVotersRequest { voters: voters.iter().copied().collect() };
        self.post(leader, "/v1/admin/voters", "change voters", &req, ADMIN_TIMEOUT).await
    }

    pub async fn remove_member(&self, leader: &str, id: u64) -> Result<(), AdminError> {
        self.post(leader, "/v1/admin/members/remove", "remove member", &RemoveMemberRequest { id }, ADMIN_TIMEOUT).await
    }

    pub async fn transfer_leader(&self, leader: &str, to: u64) -> Result<(), AdminError> {
        self.post(leader, "/v1/admin/transfer-leader", "transfer leader", &TransferLeaderRequest { to }, ADMIN_TIMEOUT)
            .await
    }

    /// `POST /v1/admin/drop-database` on the leader: drops `db`'s data whatever its route
    /// epoch (the instance is being deleted). Through the admin API, not the data API: a
    /// data request carries a route epoch, and one the control plane made up would be
    /// recorded by the replica set as the database's epoch, refusing a later instance of
    /// the same name as stale.
    pub async fn drop_database(&self, leader: &str, db: &str) -> Result<(), AdminError> {
        let req = nimbus_api::migration::DropDatabaseRequest { db: db.to_owned(), max_epoch: None };
        self.call::<_, serde_json::Value>(leader, "/v1/admin/drop-database", "drop database", &req).await.map(|_| ())
    }

    /// `POST /v1/admin/route-epoch` on the leader: `db`'s route epoch raised to `epoch`.
    pub async fn fence(&self, leader: &str, db: &str, epoch: u64) -> Result<(), AdminError> {
        let req = nimbus_api::admin::SetRouteEpochRequest { db: db.to_owned(), epoch };
        self.call::<_, serde_json::Value>(leader, "/v1/admin/route-epoch", "fence database", &req).await.map(|_| ())
    }

    /// A POST whose JSON answer matters (the migration calls of `nimbus_api::migration`).
    pub async fn call<T: Serialize, R: serde::de::DeserializeOwned>(
        &self,
        admin: &str,
        path: &str,
        what: &'static str,
        body: &T,
    ) -> Result<R, AdminError> {
        let resp = self
            .http
            .post(format!("{admin}{path}"))
            .header(reqwest::header::AUTHORIZATION, self.secret.authorization().clone())
            .json(body)
            .send()
            .await
            .map_err(|source| AdminError::Unreachable { addr: admin.to_string(), source })?;
        Self::answer(admin, what, resp).await
    }

    /// `GET /v1/admin/checksum?db=`: what the member recorded at the database's last
    /// checksum marker; `None` when it recorded none (404).
    pub async fn recorded_checksum<R: serde::de::DeserializeOwned>(
        &self,
        admin: &str,
        db: &str,
    ) -> Result<Option<R>, AdminError> {
        let resp = self.get_query(admin, "/v1/admin/checksum", &[("db", db.to_owned())], "read checksum").await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Self::answer(admin, "read checksum", resp).await.map(Some)
    }

    /// `GET /v1/admin/oplog?db=&afterIndex=&afterSeq=&limit=`: a database's oplog page.
    pub async fn db_oplog(
        &self,
        admin: &str,
        db: &str,
        after: nimbus_api::migration::OplogPosition,
        limit: u32,
    ) -> Result<nimbus_api::migration::DbOplogPage, AdminError> {
        let query = [
            ("db", db.to_owned()),
            ("afterIndex", after.index.to_string()),
            ("afterSeq", after.seq.to_string()),
            ("limit", limit.to_string()),
        ];
        let resp = self.get_query(admin, "/v1/admin/oplog", &query, "read oplog").await?;
        Self::answer(admin, "read oplog", resp).await
    }

    /// A GET of `path` with `query`, authenticated; the answer as it came.
    async fn get_query(
        &self,
        admin: &str,
        path: &str,
        query: &[(&str, String)],
        what: &'static str,
    ) -> Result<reqwest::Response, AdminError> {
        let url = reqwest::Url::parse_with_params(&format!("{admin}{path}"), query)
            .map_err(|e| AdminError::Refused { addr: admin.to_string(), what, status: 0, body: e.to_string() })?;
        self.get(url.into()).send().await.map_err(|source| AdminError::Unreachable { addr: admin.to_string(), source })
    }

    async fn answer<R: serde::de::DeserializeOwned>(
        admin: &str,
        what: &'static str,
        resp: reqwest::Response,
    ) -> Result<R, AdminError> {
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            return Err(AdminError::Refused { addr: admin.to_string(), what, status, body });
        }
        resp.json().await.map_err(|source| AdminError::Unreachable { addr: admin.to_string(), source })
    }

    async fn post<T: Serialize>(
        &self,
        admin: &str,
        path: &str,
        what: &'static str,
        body: &T,
        timeout: Duration,
    ) -> Result<(), AdminError> {
        let resp = self
            .http
            .post(format!("{admin}{path}"))
            .header(reqwest::header::AUTHORIZATION, self.secret.authorization().clone())
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|source| AdminError::Unreachable { addr: admin.to_string(), source })?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        Err(AdminError::Refused { addr: admin.to_string(), what, status, body })
    }
}

/// The Raft view of a replica set from the statuses of the members that answered: the
/// leader's membership when one leads; `Uninitialized` only for a replica set never
/// bootstrapped (`bootstrapped` is the provisioner's durable record of that) whose members
/// all say they never joined one. A bootstrapped replica set with no leader is never
/// initialised again: that would serve an empty database in place of a lost one.
pub fn raft_view(statuses: &[Status], bootstrapped: bool) -> RaftView {
    let leader = statuses.iter().filter(|s| s.role == Role::Leader && s.leader_id == Some(s.id)).max_by_key(|s| s.term);
    match leader {
        Some(l) => RaftView::Led(Membership {
            leader: l.id,
            voters: l.members.iter().filter(|m| m.voter).map(|m| m.id).collect(),
            learners: l.members.iter().filter(|m| !m.voter).map(|m| m.id).collect(),
            lag: l
                .members
                .iter()
                .map(|m| {
                    // Not replicated to (yet): unknown, so never "caught up".
                    let lag = if m.id == l.id { 0 } else { l.replication_lag.get(&m.id).copied().unwrap_or(u64::MAX) };
                    (m.id, lag)
                })
                .collect(),
        }),
        None if !bootstrapped && statuses.iter().all(|s| s.members.is_empty()) => RaftView::Uninitialized,
        None => RaftView::NoLeader,
    }
}
