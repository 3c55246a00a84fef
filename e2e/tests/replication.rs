//! Multi-process tests of a replica set: three real datanode processes on 127.0.0.1,
//! killed with SIGKILL, restarted, grown and shrunk.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nimbus_e2e::{Cluster, DataClient, Datanode, poll};
use serde_json::{Value, json};

/// For tests that talk to one leader across several steps: an election timeout long enough
/// that a starved process on two busy cores does not trigger a spurious election.
const STABLE_ELECTION_MS: &str = "1000";

/// Sends one write until some member acknowledges it, following `NotLeader` hints and
/// moving on from members that do not answer. The idempotency key makes the retries safe.
async fn write_until_acked(
    client: &DataClient,
    members: &[String],
    path: &str,
    body: &Value,
    key: &str,
    deadline: Duration,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut target = 0usize;
    let mut url_override: Option<String> = None;
    loop {
        let base = url_override.take().unwrap_or_else(|| members[target % members.len()].clone());
        let (st, resp) =
            client.call(reqwest::Method::POST, &format!("{base}{path}"), Some(body), &[("idempotency-key", key)]).await;
        match st {
            200 | 201 => return Ok(resp),
            421 => {
                if let Some(addr) = resp["error"]["leader"]["dataAddr"].as_str() {
                    url_override = Some(addr.to_owned());
                } else {
                    target += 1;
                }
            }
            0 | 503 => target += 1,
            other => anyhow::bail!("write {key} refused with {other}: {resp}"),
        }
        if started.elapsed() > deadline {
            anyhow::bail!("write {key} not acknowledged within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_under_write_load_loses_no_acknowledged_write_and_applies_none_twice() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start(3, &[]).await?;
    let members: Vec<String> = cluster.nodes.iter().map(|d| d.data.clone()).collect();
    let client = cluster.client.clone();
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let path = "/v1/databases/app/collections/events";
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, members, acked, stop) = (client.clone(), members.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w{w}-{k}");
                // An insert and an increment per step: a double apply would show as a
                // counter above the number of acknowledged increments.
                write_until_acked(
                    &client,
                    &members,
                    &format!("{path}/documents"),
                    &json!({"documents": [{"_id": id, "w": w}]}),
                    &format!("ins-{id}"),
                    Duration::from_secs(30),
                )
                .await?;
                write_until_acked(
                    &client,
                    &members,
                    "/v1/databases/app/collections/counters/update",
                    &json!({"filter": {"_id": "c"}, "update": {"$inc": {"n": 1}}, "upsert": true}),
                    &format!("inc-{id}"),
                    Duration::from_secs(30),
                )
                .await?;
                ids.push(id);
                acked.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
            anyhow::Ok(ids)
        }));
    }
    poll("100 acknowledged writes", Duration::from_secs(30), || async {
        (acked.load(Ordering::Relaxed) >= 100).then_some(())
    })
    .await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let killed_at = acked.load(Ordering::Relaxed);
    cluster.nodes[leader].kill().await;
    poll("writes to resume on a new leader", Duration::from_secs(20), || async {
        (acked.load(Ordering::Relaxed) >= killed_at + 100).then_some(())
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    let mut all_ids = BTreeSet::new();
    for w in writers {
        all_ids.extend(w.await??);
    }

    cluster.nodes[leader].restart().await?;
    cluster.wait_leader(Duration::from_secs(20)).await?;
    // A marker written after every acknowledged write: a member that has it has applied
    // everything before it (log order).
    let members: Vec<String> = cluster.nodes.iter().map(|d| d.data.clone()).collect();
    let marker = json!({"documents": [{"_id": "marker"}]});
    write_until_acked(
        &client,
        &members,
        "/v1/databases/app/collections/markers/documents",
        &marker,
        "marker",
        Duration::from_secs(30),
    )
    .await?;
    for i in 0..3 {
        poll(&format!("member {i} to apply the marker"), Duration::from_secs(30), || async {
            (cluster.local_docs(i, "app", "markers").await.ok()?.len() == 1).then_some(())
        })
        .await?;
    }
    for i in 0..3 {
        let docs = cluster.local_docs(i, "app", "events").await?;
        let ids: BTreeSet<String> = docs.iter().filter_map(|d| d["_id"].as_str().map(str::to_owned)).collect();
        assert_eq!(docs.len(), ids.len(), "member {i} holds a document twice");
        assert_eq!(ids, all_ids, "member {i} lost or invented acknowledged writes");
        let counter = cluster.local_docs(i, "app", "counters").await?;
        assert_eq!(
            counter,
            vec![json!({"_id": "c", "n": all_ids.len()})],
            "member {i} applied an increment twice or lost one"
        );
    }
    Ok(())
}

/// Where documents are inserted into `app.items` on member `i`.
fn items(cluster: &Cluster, i: usize) -> String {
    format!("{}/documents", cluster.coll_url(i, "app", "items"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_behind_log_compaction_catches_up_through_a_snapshot() -> anyhow::Result<()> {
    let mut cluster =
        Cluster::start(3, &["--snapshot-every", "50", "--keep-logs", "0", "--election-timeout-ms", STABLE_ELECTION_MS])
            .await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let lagging = (leader + 1) % 3;
    cluster.nodes[lagging].kill().await;
    // One entry per document: enough entries for several snapshots and purges.
    for i in 0..300 {
        let doc = json!({"documents": [{"_id": i, "v": "x".repeat(100)}]});
        let (_, st, body) = cluster.leader_post(|i| items(&cluster, i), &doc, Some(&format!("item-{i}"))).await?;
        assert_eq!(st, 201, "{body}");
    }
    let leader_status =
        poll("the leader to purge its log past the lagging member", Duration::from_secs(20), || async {
            let s = cluster.status(leader).await?;
            (s.purged_index.unwrap_or(0) > 100).then_some(s)
        })
        .await?;
    cluster.nodes[lagging].restart().await?;
    cluster.wait_applied(lagging, leader_status.applied_index, Duration::from_secs(30)).await?;
    poll("all 300 documents on the restarted member", Duration::from_secs(10), || async {
        (cluster.local_docs(lagging, "app", "items").await.ok()?.len() == 300).then_some(())
    })
    .await?;
    let s = cluster.status(lagging).await.expect("lagging member answers");
    assert!(s.snapshot_index.is_some(), "the member caught up without a snapshot: {s:?}");
    // It keeps up with new writes after the snapshot too.
    let (_, st, body) =
        cluster.leader_post(|i| items(&cluster, i), &json!({"documents": [{"_id": "after"}]}), Some("after")).await?;
    assert_eq!(st, 201, "{body}");
    // The leader's status can trail its acknowledgements by a moment, so wait for the
    // document itself rather than for an applied index read from it.
    poll("the new document on the caught-up member", Duration::from_secs(10), || async {
        (cluster.local_docs(lagging, "app", "items").await.ok()?.len() == 301).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_learner_is_added_promoted_and_an_old_member_removed() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &["--election-timeout-ms", STABLE_ELECTION_MS]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let (_, st, body) = cluster
        .leader_post(|i| items(&cluster, i), &json!({"documents": [{"_id": 1}, {"_id": 2}]}), Some("items-1-2"))
        .await?;
    assert_eq!(st, 201, "{body}");

    let dir = cluster.tmp.path().join("n4");
    let newcomer = Datanode::start(4, "a", "rs0", &dir, &cluster.extra_args).await?;
    let admin = cluster.nodes[leader].admin.clone();
    let (st, body) = cluster
        .client
        .post(&format!("{admin}/v1/admin/learners"), &json!({"member": newcomer.member(), "blocking": true}))
        .await;
    assert_eq!(st, 200, "{body}");
    cluster.nodes.push(newcomer);
    let (st, body) = cluster.client.post(&format!("{admin}/v1/admin/voters"), &json!({"voters": [1, 2, 3, 4]})).await;
    assert_eq!(st, 200, "{body}");
    // Two changes at once are refused: one membership change at a time.
    let (st, _) = cluster.client.post(&format!("{admin}/v1/admin/voters"), &json!({"voters": [4]})).await;
    assert_eq!(st, 400);

    // Remove a follower that shares zone a with the newcomer.
    let old = (0..3).find(|i| *i != leader).expect("a follower");
    let old_id = cluster.nodes[old].id;
    let (st, body) = cluster.client.post(&format!("{admin}/v1/admin/members/remove"), &json!({"id": old_id})).await;
    assert_eq!(st, 200, "{body}");
    let s = poll("the membership without the old member", Duration::from_secs(10), || async {
        let s = cluster.status(leader).await?;
        (!s.members.iter().any(|m| m.id == old_id)).then_some(s)
    })
    .await?;
    let voters: BTreeSet<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(voters.len(), 3);
    assert!(voters.contains(&4));
    cluster.nodes[old].kill().await;

    // The new member has the data and the set still commits writes.
    let (_, st, body) =
        cluster.leader_post(|i| items(&cluster, i), &json!({"documents": [{"_id": 3}]}), Some("item-3")).await?;
    assert_eq!(st, 201, "{body}");
    poll("every document on the new member", Duration::from_secs(10), || async {
        (cluster.local_docs(3, "app", "items").await.ok()?.len() == 3).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_moves_to_the_named_member() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &["--election-timeout-ms", STABLE_ELECTION_MS]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let target = (leader + 2) % 3;
    let to = cluster.nodes[target].id;
    let (st, body) = cluster
        .client
        .post(&format!("{}/v1/admin/transfer-leader", cluster.nodes[leader].admin), &json!({"to": to}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(cluster.wait_leader(Duration::from_secs(10)).await?, target);
    // A follower refuses writes and names the new leader.
    let (st, body) = cluster
        .client
        .post(&format!("{}/documents", cluster.coll_url(leader, "app", "x")), &json!({"documents": [{"a": 1}]}))
        .await;
    assert_eq!(st, 421, "{body}");
    assert_eq!(body["error"]["leader"]["id"], json!(to));
    Ok(())
}

/// openraft batches entries by count, not size: a member coming back behind a backlog of
/// near-limit documents would be sent them in one body larger than its Raft port accepts,
/// refused, and sent the same body again forever. Appends are bounded in bytes, so it
/// catches up, and writes keep being acknowledged meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_near_limit_documents_replicates_in_bounded_appends() -> anyhow::Result<()> {
    const MAX_BODY: usize = 200_000;
    let max_body = MAX_BODY.to_string();
    let mut cluster =
        Cluster::start(3, &["--max-body-bytes", &max_body, "--election-timeout-ms", STABLE_ELECTION_MS]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let lagging = (leader + 1) % 3;
    cluster.nodes[lagging].kill().await;
    let base = cluster.coll_url(leader, "app", "big");
    // Just under the body limit each: 8 writers, 4 documents each, about 6 MB of backlog
    // against the Raft port's 800 kB.
    let big = "x".repeat(MAX_BODY - 200);
    let write_all = |round: usize| {
        let (client, base, big) = (cluster.client.clone(), base.clone(), big.clone());
        async move {
            let writers = (0..8).map(|w| {
                let (client, base, big) = (client.clone(), base.clone(), big.clone());
                tokio::spawn(async move {
                    for i in 0..4 {
                        let doc = json!({"documents": [{"_id": format!("{round}-{w}-{i}"), "v": big}]});
                        let (st, body) = client.post(&format!("{base}/documents"), &doc).await;
                        assert_eq!(st, 201, "{body}");
                    }
                })
            });
            for w in writers.collect::<Vec<_>>() {
                w.await.expect("writer");
            }
        }
    };
    write_all(0).await;
    cluster.nodes[lagging].restart().await?;
    // More near-limit writes while the member catches up: all acknowledged.
    write_all(1).await;
    let applied = cluster.status(leader).await.expect("leader answers").applied_index;
    cluster.wait_applied(lagging, applied, Duration::from_secs(60)).await?;
    poll("all 64 documents on the member that was behind", Duration::from_secs(20), || async {
        let n = cluster.local_docs(lagging, "app", "big").await.ok()?.len();
        (n == 64).then_some(())
    })
    .await?;
    Ok(())
}

/// The wall-clock time of every oplog entry, read from member `i`.
async fn oplog_times(cluster: &Cluster, i: usize) -> Vec<u64> {
    let (st, body) = cluster.client.get(&format!("{}/v1/admin/oplog?from=0&limit=10000", cluster.nodes[i].admin)).await;
    assert_eq!(st, 200, "{body}");
    body["entries"].as_array().expect("entries").iter().map(|e| e["tsMs"].as_u64().expect("tsMs")).collect()
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A leader whose clock is ten days ahead, then one ten days behind: the oplog's times stay
/// the real time (the median of the members' clocks) and never go backwards, so neither
/// retention nor the idempotency window follows one member's wrong clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_with_a_wrong_clock_stamps_the_replica_sets_time() -> anyhow::Result<()> {
    const TEN_DAYS_MS: i64 = 10 * 86_400_000;
    let started = wall_ms();
    let mut cluster = Cluster::start(3, &["--election-timeout-ms", STABLE_ELECTION_MS]).await?;
    let mut leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    for (round, skew) in [TEN_DAYS_MS, -TEN_DAYS_MS].into_iter().enumerate() {
        // Restart a follower with the wrong clock and hand it the leadership.
        let skewed = (leader + 1) % 3;
        cluster.nodes[skewed].kill().await;
        cluster.nodes[skewed].extra_args.extend(["--clock-skew-ms".to_owned(), skew.to_string()]);
        cluster.nodes[skewed].restart().await?;
        // A write it must store (openraft hands leadership only to a member that has
        // flushed the leader's log since it started).
        let (st, body) = cluster
            .client
            .post(&format!("{}/documents", cluster.coll_url(leader, "app", "clock")), &json!({"documents": [{}]}))
            .await;
        assert_eq!(st, 201, "{body}");
        let applied = cluster.status(leader).await.expect("leader answers").applied_index;
        cluster.wait_applied(skewed, applied, Duration::from_secs(30)).await?;
        let to = cluster.nodes[skewed].id;
        let (st, body) = cluster
            .client
            .post(&format!("{}/v1/admin/transfer-leader", cluster.nodes[leader].admin), &json!({"to": to}))
            .await;
        assert_eq!(st, 200, "{body}");
        leader = cluster.wait_leader(Duration::from_secs(10)).await?;
        assert_eq!(leader, skewed);
        // Through the new leader (a retry follows a `NotLeader` answered while the members'
        // views of the transfer settle), which must still lead afterwards.
        let members = [cluster.nodes[leader].data.clone()];
        for i in 0..20 {
            let body = json!({"documents": [{"_id": format!("{round}-{i}")}]});
            let key = format!("clock-{round}-{i}");
            write_until_acked(
                &cluster.client,
                &members,
                "/v1/databases/app/collections/clock/documents",
                &body,
                &key,
                Duration::from_secs(10),
            )
            .await?;
        }
        assert_eq!(cluster.wait_leader(Duration::from_secs(10)).await?, skewed, "leadership moved during the writes");
        let times = oplog_times(&cluster, leader).await;
        assert!(times.len() >= 21 * (round + 1), "{} oplog entries", times.len());
        let now = wall_ms();
        for t in &times {
            assert!(
                *t + 5_000 >= started && *t <= now + 5_000,
                "oplog time {t} outside [{started}, {now}] (skew {skew})"
            );
        }
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "oplog times went backwards: {times:?}");
    }
    Ok(())
}

/// A leader whose process is gone is replaced without waiting for the election timeout:
/// the followers find its Raft port refusing connections and hand the leadership over.
/// With a 5 s timeout, a new leader within 4 s can only come from that detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_is_replaced_before_the_election_timeout() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &["--election-timeout-ms", "5000"]).await?;
    for round in 0..2 {
        let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
        let term = cluster.status(leader).await.expect("leader answers").term;
        let killed_at = Instant::now();
        cluster.nodes[leader].kill().await;
        let new_leader = cluster.wait_leader(Duration::from_secs(4)).await?;
        assert_ne!(new_leader, leader);
        let new_term = cluster.status(new_leader).await.expect("new leader answers").term;
        eprintln!("round {round}: new leader after {:?}, term {term} -> {new_term}", killed_at.elapsed());
        // Pre-votes first: one election, two when the first successor's log was behind.
        assert!(new_term - term <= 2, "term {term} -> {new_term}: elections beyond the one the kill needs");
        // It serves writes.
        let (st, body) = cluster
            .client
            .post(&format!("{}/documents", cluster.coll_url(new_leader, "app", "x")), &json!({"documents": [{}]}))
            .await;
        assert_eq!(st, 201, "{body}");
        cluster.nodes[leader].restart().await?;
    }
    Ok(())
}
