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

    /// Samples the terms again. Of the elections since the last sample, up to `provoked`
    /// were caused on purpose (a kill of the leader causes one, or none when the member is
    /// back and resumes leading in its own term before the others' election timeout); the
    /// rest are unprovoked. Returns how many of those this span had.
    pub async fn sample(&mut self, admins: &[String], provoked: u64) -> anyhow::Result<u64> {
        let term = max_term(&self.http, admins).await?;
        let unprovoked = unprovoked(self.term, term, provoked);
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

/// The elections between a sample of the highest term, `before`, and the next, `after`,
/// less the `provoked` ones. A lower `after` (the member with the highest term is down)
/// counts none.
fn unprovoked(before: u64, after: u64, provoked: u64) -> u64 {
    after.saturating_sub(before).saturating_sub(provoked)
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

#[cfg(test)]
mod tests {
    use super::unprovoked;

    #[test]
    fn a_steady_term_is_no_election() {
        assert_eq!(unprovoked(7, 7, 0), 0);
    }

    #[test]
    fn every_term_rise_with_nothing_killed_is_unprovoked() {
        assert_eq!(unprovoked(7, 9, 0), 2);
    }

    #[test]
    fn a_kill_excuses_one_election_and_no_more() {
        assert_eq!(unprovoked(7, 8, 1), 0);
        assert_eq!(unprovoked(7, 10, 1), 2);
    }

    #[test]
    fn a_kill_that_needed_no_election_counts_none() {
        assert_eq!(unprovoked(7, 7, 1), 0);
    }

    #[test]
    fn a_lower_term_from_the_members_left_counts_none() {
        assert_eq!(unprovoked(7, 6, 0), 0);
    }
}
