//! Elections nobody caused: how far a replica set's Raft term rose, less the elections a
//! benchmark provoked on purpose (one per kill of the leader). A replica set that changes
//! leaders under load alone drops writes that a quiet one would have served, so every
//! benchmark prints `unprovoked_leader_changes` (goal 0).

use std::time::Duration;

use nimbus_api::admin::Status;
use nimbus_e2e::{Cluster, poll};

use crate::Report;

/// Counts the unprovoked elections of one replica set from its members' Raft terms, as
/// `GET /v1/status` reports them (it needs no credentials).
///
/// Every round of voting raises the term by one, whether it elects a leader or splits the
/// vote; the members run a pre-vote first, so a member that merely lost touch with the
/// leader does not raise it. The rise of the highest term among the members that answer is
/// therefore the number of elections between two samples. A member that is down (killed on
/// purpose) does not answer and is left out; its term was never above the others'.
pub struct LeaderChanges {
    http: reqwest::Client,
    /// The highest term seen so far.
    term: u64,
    unprovoked: u64,
}

impl LeaderChanges {
    /// Starts counting from the current terms of the members whose admin API is at `admins`.
    pub async fn start(admins: &[String]) -> anyhow::Result<LeaderChanges> {
        let http = reqwest::Client::builder().timeout(STATUS_TIMEOUT).build()?;
        let term = max_term(&http, admins).await?;
        Ok(LeaderChanges { http, term, unprovoked: 0 })
    }

    /// Samples the terms again. Of the elections since the last sample, `provoked` were
    /// caused on purpose (a kill of the leader causes one); the rest are unprovoked. Returns
    /// how many of those this span had.
    pub async fn sample(&mut self, admins: &[String], provoked: u64) -> anyhow::Result<u64> {
        let term = max_term(&self.http, admins).await?;
        let unprovoked = term.saturating_sub(self.term).saturating_sub(provoked);
        self.term = self.term.max(term);
        self.unprovoked += unprovoked;
        Ok(unprovoked)
    }

    /// The highest term seen so far.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Unprovoked elections over every span sampled so far.
    pub fn unprovoked(&self) -> u64 {
        self.unprovoked
    }

    /// Adds `unprovoked_leader_changes` (`API.md` section 4) to `report`.
    pub fn report(&self, report: &mut Report) {
        report.add("unprovoked_leader_changes", self.unprovoked as f64, "count");
    }
}

/// How long one member may take to answer `GET /v1/status`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// How long to wait for at least one member to answer.
const ANY_MEMBER_TIMEOUT: Duration = Duration::from_secs(10);

/// The highest Raft term among the members at `admins` that answer.
pub async fn max_term(http: &reqwest::Client, admins: &[String]) -> anyhow::Result<u64> {
    poll("a replica-set member to report its term", ANY_MEMBER_TIMEOUT, || async {
        let mut max = None;
        for admin in admins {
            let Ok(r) = http.get(format!("{admin}/v1/status")).send().await else { continue };
            if let Ok(s) = r.json::<Status>().await {
                max = max.max(Some(s.term));
            }
        }
        max
    })
    .await
}

/// The admin API addresses of a [`Cluster`]'s members (they keep them across restarts).
pub fn admin_urls(cluster: &Cluster) -> Vec<String> {
    cluster.nodes.iter().map(|n| n.admin.clone()).collect()
}
