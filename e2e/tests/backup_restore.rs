//! Point-in-time restore against real datanodes (issue 15): random write histories on a
//! replica set of three processes, a full backup taken while the database changes (the
//! export, page by page, into a `LocalFileSystem` store), the database's oplog archived
//! into segments, then restored to a random time into a fresh database on the same replica
//! set through the import protocol and compared with a model of the history at that time:
//! the whole database, and one collection under a new name. A damaged page and a time
//! outside the window are refused with nothing served. The background verification
//! restores a full to its end in scratch space, matches its checksum and leaves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use async_trait::async_trait;
use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::migration::{ExportPage, ImportAnswer, ImportRequest, ImportStep, OplogPosition};
use nimbus_e2e::{Cluster, poll};
use nimbus_operator::controlplane::admin::AdminClient;
use nimbus_operator::controlplane::backup::restore::{RestoreCause, RestoreInto, RestoreWorld, restore};
use nimbus_operator::controlplane::backup::verify::verify_full;
use nimbus_operator::controlplane::backup::{
    BackupLocation, BackupStore, FORMAT_VERSION, FullId, FullManifest, Incarnation, Lineage, NewSegment, RestoreError,
    RestoreTarget, plan_restore,
};
use nimbus_operator::controlplane::migration::{ChecksumMarker, Failure, ReplicaSetAccess};
use object_store::local::LocalFileSystem;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use reqwest::Method;
use serde_json::{Value, json};

const COLLS: [&str; 3] = ["c0", "c1", "c2"];
/// The route epoch a restored database is finished at (and read with).
const EPOCH: u64 = 1;
/// Small export pages: a full of a few pages, each from its own snapshot, with writes
/// between them.
const PAGE_BYTES: u64 = 48;
/// Changes per archived segment: several segments per history.
const SEGMENT_CHANGES: usize = 5;

/// The replica set's import and checksum, through its leader (as `LiveWorld` does).
struct ClusterWorld<'a>(&'a Cluster);

impl ClusterWorld<'_> {
    async fn post<R: serde::de::DeserializeOwned>(&self, path: &str, body: Value) -> Result<R, Failure> {
        let c = self.0;
        let (_, st, resp) = c
            .leader_post(|i| format!("{}{path}", c.nodes[i].admin), &body, None)
            .await
            .map_err(|e| Failure::Transient(e.to_string()))?;
        if st != 200 {
            return Err(Failure::Refused(format!("{path}: {st} {resp}")));
        }
        serde_json::from_value(resp).map_err(|e| Failure::Refused(e.to_string()))
    }
}

#[async_trait]
impl RestoreWorld for ClusterWorld<'_> {
    async fn import(&self, _rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        self.post("/v1/admin/import", serde_json::to_value(req).unwrap()).await
    }

    async fn checksum(&self, _rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        self.post("/v1/admin/checksum", json!({ "db": db })).await
    }
}

fn access() -> ReplicaSetAccess {
    ReplicaSetAccess { namespace: String::new(), name: "rs0".into(), leader_admin: String::new(), members: vec![] }
}

fn store_in(dir: &std::path::Path, db: &str) -> BackupStore {
    let fs = LocalFileSystem::new_with_prefix(dir).unwrap();
    BackupStore::new(
        Arc::new(fs),
        BackupLocation::new("backups", "e2e", db, &Incarnation::new("e2e").unwrap()).unwrap(),
    )
}

/// One client write of a history.
#[derive(Debug, Clone)]
struct Write {
    coll: usize,
    id: u64,
    /// A delete (an insert when the document is not there, so every write changes
    /// something and leaves exactly one oplog change); else an insert or an update.
    delete: bool,
}

type Docs = BTreeMap<(String, String), Value>;

/// The client's side of a history: the database after each write.
struct Model {
    state: Docs,
    /// `after[k]`: the database after the first `k` writes.
    after: Vec<Docs>,
    /// Each write as it was made: (collection, `_id`, put or delete).
    made: Vec<(String, u64, bool)>,
}

impl Model {
    fn new() -> Model {
        Model { state: Docs::new(), after: vec![Docs::new()], made: Vec::new() }
    }
}

/// Makes write `w` on `db` (through the leader, as a client would) and records it.
async fn write(c: &Cluster, db: &str, model: &mut Model, w: &Write, n: usize) -> anyhow::Result<()> {
    let coll = COLLS[w.coll];
    let key = (coll.to_string(), w.id.to_string());
    let present = model.state.contains_key(&key);
    // Each write's own value: an update always changes its document (a no-op update
    // leaves no change in the oplog).
    let value = n as i64;
    let (path, body, put) = match (w.delete, present) {
        (true, true) => ("delete", json!({"filter": {"_id": w.id}}), false),
        (_, true) => ("update", json!({"filter": {"_id": w.id}, "update": {"$set": {"v": value}}}), true),
        (_, false) => ("documents", json!({"documents": [{"_id": w.id, "v": value}]}), true),
    };
    let idem = format!("{db}-{n}");
    let (_, st, resp) = c.leader_post(|i| format!("{}/{path}", c.coll_url(i, db, coll)), &body, Some(&idem)).await?;
    ensure!((200..300).contains(&st), "write {n} ({path} {body}) on {db}: {st} {resp}");
    if put {
        model.state.insert(key, json!({"_id": w.id, "v": value}));
    } else {
        model.state.remove(&key);
    }
    model.after.push(model.state.clone());
    model.made.push((coll.to_string(), w.id, put));
    Ok(())
}

/// Takes a full of `db` page by page (the export, as the backup agent reads it), making
/// `between` (the next writes of the history) one after each page but the last: the pages
/// come from different snapshots of a changing database. With `checksum`, the manifest
/// has the database's checksum marker taken right after the last page (no write between:
/// the state at the full's end), as the backup agent records it.
async fn take_full(
    c: &Cluster,
    store: &BackupStore,
    db: &str,
    model: &mut Model,
    between: &mut dyn Iterator<Item = (usize, Write)>,
    checksum: bool,
) -> anyhow::Result<FullManifest> {
    let id = FullId::new(nimbus_operator::controlplane::migration::now_ms(), 1);
    let (mut pages, mut after): (Vec<ExportPage>, Option<String>) = (Vec::new(), None);
    let mut entries = Vec::new();
    loop {
        let mut req = json!({"db": db, "part": "documents", "maxBytes": PAGE_BYTES});
        if let Some(a) = &after {
            req["after"] = json!(a);
        }
        let (_, st, page) = c.leader_post(|i| format!("{}/v1/admin/export", c.nodes[i].admin), &req, None).await?;
        ensure!(st == 200, "export of {db}: {st} {page}");
        let page: ExportPage = serde_json::from_value(page)?;
        entries.push(store.put_page(&id, pages.len() as u32, &page).await?);
        after = page.next.clone();
        pages.push(page);
        if after.is_none() {
            break;
        }
        if let Some((n, w)) = between.next() {
            write(c, db, model, &w, n).await?;
        }
    }
    let checksum = match checksum {
        true => {
            let req = json!({ "db": db });
            let (_, st, marker) =
                c.leader_post(|i| format!("{}/v1/admin/checksum", c.nodes[i].admin), &req, None).await?;
            ensure!(st == 200, "checksum of {db}: {st} {marker}");
            Some(marker["checksum"].as_str().context("a marker without a checksum")?.to_string())
        }
        false => None,
    };
    let (first, last) = (&pages[0], &pages[pages.len() - 1]);
    let manifest = FullManifest {
        format: FORMAT_VERSION,
        id,
        db: db.to_string(),
        lineage: Lineage::new("rs0.e0")?,
        start: OplogPosition::end_of(first.index),
        end: OplogPosition::end_of(last.index),
        start_ms: first.clock_ms,
        end_ms: last.clock_ms,
        docs: entries.iter().map(|e| e.docs).sum(),
        bytes: entries.iter().map(|e| e.bytes).sum(),
        pages: entries,
        checksum,
    };
    store.put_manifest(&manifest).await?;
    Ok(manifest)
}

/// Archives `db`'s whole oplog (read from the leader) into segments of a few changes each;
/// returns the changes.
async fn archive(c: &Cluster, store: &BackupStore, db: &str) -> anyhow::Result<Vec<OplogEntry>> {
    let admin = AdminClient::new(&c.secret);
    let (mut all, mut pos) = (Vec::new(), OplogPosition::default());
    loop {
        let leader = c.wait_leader(Duration::from_secs(20)).await?;
        let page = admin.db_oplog(&c.nodes[leader].admin, db, pos, 1000).await?;
        let done = page.entries.is_empty() && page.next.index >= page.applied_index;
        all.extend(page.entries);
        pos = page.next.max(pos);
        if done {
            break;
        }
    }
    for segment in segments(&all, pos)? {
        store.put_segment(&segment).await?;
    }
    Ok(all)
}

/// Cuts a database's whole oplog (`all`, read through `end`: nothing is written to the
/// database after it) into segments of about [`SEGMENT_CHANGES`] changes each, as the
/// archiver stores them: a segment's covered time (`maxTs`) promises that every change at
/// or before it is in that segment or an earlier one, so a cut never falls inside a
/// millisecond (an insert creating its collection is two changes at one time, and two
/// writes may share one). The changes of the millisecond a cut would split wait for the
/// next segment, as the archiver holds back its newest millisecond's; a segment all of one
/// millisecond takes the rest of it instead.
fn segments(all: &[OplogEntry], end: OplogPosition) -> anyhow::Result<Vec<NewSegment>> {
    let (mut out, mut after, mut rest) = (Vec::new(), OplogPosition::default(), all);
    while !rest.is_empty() {
        let mut n = rest.len().min(SEGMENT_CHANGES);
        if let Some(next) = rest.get(n) {
            // Times never go backwards in the oplog: the split millisecond's changes are a
            // suffix of this cut and a prefix of the rest.
            n = match rest[..n].partition_point(|e| e.ts_ms < next.ts_ms) {
                0 => n + rest[n..].partition_point(|e| e.ts_ms <= next.ts_ms),
                held => held,
            };
        }
        let (chunk, later) = rest.split_at(n);
        let last = chunk.last().context("an empty chunk")?;
        let through = if later.is_empty() { end } else { OplogPosition { index: last.index, seq: last.seq } };
        out.push(NewSegment {
            lineage: Lineage::new("rs0.e0")?,
            after,
            through,
            covered_through_ms: last.ts_ms,
            entries: chunk.to_vec(),
        });
        (after, rest) = (through, later);
    }
    Ok(out)
}

/// A data API request to the leader at route epoch `epoch`, tried until a leader answers.
async fn data(
    c: &Cluster,
    method: Method,
    path: &str,
    body: Option<&Value>,
    epoch: u64,
) -> anyhow::Result<(u16, Value)> {
    let epoch = epoch.to_string();
    poll(&format!("a leader to answer {path}"), Duration::from_secs(20), || async {
        let leader = c.wait_leader(Duration::from_secs(5)).await.ok()?;
        let url = format!("{}{path}", c.nodes[leader].data);
        let (st, b) = c.client.call(method.clone(), &url, body, &[("x-nimbus-route-epoch", &epoch)]).await;
        let not_served = st == 0 || st == 503 || (st == 421 && b["error"]["code"] == "NotLeader");
        (!not_served).then_some((st, b))
    })
    .await
}

/// Every collection of `db` and every document in it, as served at route epoch `epoch`.
async fn contents(c: &Cluster, db: &str, epoch: u64) -> anyhow::Result<(BTreeSet<String>, Docs)> {
    let (st, b) = data(c, Method::GET, &format!("/v1/databases/{db}/collections"), None, epoch).await?;
    ensure!(st == 200, "collections of {db}: {st} {b}");
    let names: BTreeSet<String> = b["collections"]
        .as_array()
        .context("no collections")?
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    let mut docs = Docs::new();
    for coll in &names {
        let path = format!("/v1/databases/{db}/collections/{coll}/find");
        let (st, b) = data(c, Method::POST, &path, Some(&json!({"limit": 10000})), epoch).await?;
        ensure!(st == 200, "find in {db}.{coll}: {st} {b}");
        for d in b["documents"].as_array().context("no documents")? {
            docs.insert((coll.clone(), d["_id"].to_string()), d.clone());
        }
    }
    Ok((names, docs))
}

/// Each write's time, from the oplog: its changes are the writes, one each, in order.
fn times(model: &Model, db: &str, oplog: &[OplogEntry]) -> anyhow::Result<Vec<u64>> {
    let changes: Vec<&OplogEntry> =
        oplog.iter().filter(|e| matches!(e.op, OplogOp::Put { .. } | OplogOp::Delete { .. })).collect();
    ensure!(
        changes.len() == model.made.len(),
        "{} writes but {} changes in {db}'s oplog",
        model.made.len(),
        changes.len()
    );
    for (e, (coll, id, put)) in changes.iter().zip(&model.made) {
        let (eid, eput) = match &e.op {
            OplogOp::Put { id, .. } => (id, true),
            OplogOp::Delete { id } => (id, false),
            _ => unreachable!(),
        };
        ensure!(
            e.coll.as_deref() == Some(coll.as_str()) && eid == &json!(id) && eput == *put,
            "change {}:{} is not the write it should be ({coll} {id} put={put})",
            e.index,
            e.seq
        );
    }
    Ok(changes.iter().map(|e| e.ts_ms).collect())
}

#[derive(Debug, Clone)]
struct History {
    writes: Vec<Write>,
    /// Writes before the full.
    before: usize,
    /// Which time to restore to, among the full's end and the later writes'.
    pick: prop::sample::Index,
}

fn history() -> impl Strategy<Value = History> {
    let w =
        (0..COLLS.len(), 0u64..6, prop::bool::weighted(0.25)).prop_map(|(coll, id, delete)| Write { coll, id, delete });
    (prop::collection::vec(w, 12..36), 2usize..14, any::<prop::sample::Index>())
        .prop_map(|(writes, before, pick)| History { writes, before, pick })
}

/// One case: the history on a fresh database `s{n}`, restored whole into `r{n}` and one
/// collection into `p{n}` (renamed), both compared with the model at the time.
async fn case(c: &Cluster, dir: &std::path::Path, n: usize, h: History) -> anyhow::Result<()> {
    let db = format!("s{n}");
    // The first write's collection (made before the full: it exists at every time
    // restored to) is the one restored alone.
    let coll = COLLS[h.writes[0].coll];
    let store = store_in(dir, &db);
    let mut model = Model::new();
    let mut writes = h.writes.into_iter().enumerate();
    for (i, w) in writes.by_ref().take(h.before) {
        write(c, &db, &mut model, &w, i).await?;
    }
    // During the full: never the last three writes, which come after it (a later time).
    let rest: Vec<(usize, Write)> = writes.collect();
    let (during, after) = rest.split_at(rest.len().saturating_sub(3));
    let mut during = during.iter().cloned();
    let full = take_full(c, &store, &db, &mut model, &mut during, false).await?;
    for (i, w) in during.chain(after.iter().cloned()) {
        write(c, &db, &mut model, &w, i).await?;
    }
    let oplog = archive(c, &store, &db).await?;
    let times = times(&model, &db, &oplog)?;

    // A time from the full's end to the last write's.
    let mut candidates: Vec<u64> = times.iter().copied().filter(|t| *t >= full.end_ms).collect();
    candidates.push(full.end_ms);
    candidates.sort();
    let t = candidates[h.pick.index(candidates.len())];
    let expected = &model.after[times.iter().filter(|x| **x <= t).count()];

    let fulls = store.list_fulls().await?.complete;
    let plan = plan_restore(&fulls, &store.list_segments().await?, RestoreTarget::Time(t))?;
    let world = ClusterWorld(c);

    // The whole database.
    let whole = format!("r{n}");
    let outcome =
        restore(&world, &store, &plan, &RestoreInto::new(access(), &whole, &format!("restore-{whole}"), Some(EPOCH)))
            .await?;
    let (names, docs) = contents(c, &whole, EPOCH).await?;
    eprintln!(
        "case {n}: {} writes, full of {} pages ends at {}, t = {t} (last {}), {} docs, {} changes applied, {} segments",
        model.made.len(),
        full.pages.len(),
        full.end_ms,
        times.last().unwrap(),
        docs.len(),
        outcome.changes_applied,
        plan.segments.len()
    );
    ensure!(
        &docs == expected,
        "{whole} restored to {t} (full ends at {}):\n got {docs:?}\nwant {expected:?}",
        full.end_ms
    );
    ensure!(names.iter().all(|n| COLLS.contains(&n.as_str())), "{whole} has collections {names:?}");
    ensure!(outcome.documents == expected.len() as u64 && outcome.reached_ms <= t, "{outcome:?}");

    // One collection, renamed.
    let part = format!("p{n}");
    let mut into = RestoreInto::new(access(), &part, &format!("restore-{part}"), Some(EPOCH));
    into.collections = Some(BTreeSet::from([coll.to_string()]));
    into.renames = BTreeMap::from([(coll.to_string(), format!("{coll}_back"))]);
    let outcome = restore(&world, &store, &plan, &into).await?;
    let want: Docs = expected
        .iter()
        .filter(|((c, _), _)| c == coll)
        .map(|((_, id), d)| ((format!("{coll}_back"), id.clone()), d.clone()))
        .collect();
    let (names, docs) = contents(c, &part, EPOCH).await?;
    ensure!(docs == want, "{part} ({coll} restored to {t}):\n got {docs:?}\nwant {want:?}");
    ensure!(names == BTreeSet::from([format!("{coll}_back")]), "{part} has collections {names:?}");
    ensure!(outcome.collections == vec![format!("{coll}_back")], "{outcome:?}");
    Ok(())
}

#[test]
fn a_restore_to_a_random_time_equals_the_history_replayed_to_that_time() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let cluster = rt.block_on(Cluster::start(3, &[])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = std::env::var("NIMBUS_RESTORE_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(10);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let n = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&history(), |h| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(case(&cluster, dir.path(), i, h)).map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    // Every process stopped (inside the runtime) before the verdict.
    rt.block_on(async move { drop(cluster) });
    result.unwrap();
}

/// A small database with a full of several pages and its archive; the plan to its last
/// write.
async fn backed_up(c: &Cluster, dir: &std::path::Path) -> anyhow::Result<(BackupStore, FullManifest, u64)> {
    let store = store_in(dir, "shop");
    let mut model = Model::new();
    for i in 0..12u64 {
        let w = Write { coll: (i % 2) as usize, id: i, delete: false };
        write(c, "shop", &mut model, &w, i as usize).await?;
    }
    let full = take_full(c, &store, "shop", &mut model, &mut std::iter::empty(), false).await?;
    ensure!(full.pages.len() >= 2, "a full of {} page(s)", full.pages.len());
    write(c, "shop", &mut model, &Write { coll: 0, id: 99, delete: false }, 99).await?;
    let oplog = archive(c, &store, "shop").await?;
    let last = oplog.last().context("no oplog")?.ts_ms;
    Ok((store, full, last))
}

/// Flips a byte in the middle of the stored file at `path` (relative to `dir`).
fn flip(dir: &std::path::Path, path: &str) {
    let file = dir.join(path);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_page_or_a_time_outside_the_window_restores_nothing() -> anyhow::Result<()> {
    let c = Cluster::start(3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let (store, full, last) = backed_up(&c, dir.path()).await?;
    let fulls = store.list_fulls().await?.complete;
    let segments = store.list_segments().await?;
    let world = ClusterWorld(&c);

    // Outside the window, before the full's end and after the archive's: refused with the
    // window, and nothing is created.
    for t in [full.end_ms - 1, last + 60_000] {
        match plan_restore(&fulls, &segments, RestoreTarget::Time(t)) {
            Err(e @ RestoreError::OutsideWindow { .. }) => {
                assert!(e.to_string().contains("outside the recoverable window"), "{e}")
            }
            other => bail!("a restore to {t} (window {}..{last}) planned: {other:?}", full.end_ms),
        }
    }

    // A damaged page: the restore is refused naming the object, and the database it was
    // building is not there.
    let plan = plan_restore(&fulls, &segments, RestoreTarget::Latest)?;
    let page = store.location().page(&full.id, 1);
    flip(dir.path(), page.as_ref());
    let into = RestoreInto::new(access(), "shop-back", "restore-1", Some(EPOCH));
    let err = restore(&world, &store, &plan, &into).await.err().context("a damaged page was restored")?;
    assert!(matches!(err.cause, RestoreCause::Backup(_)), "{err}");
    assert!(err.to_string().contains(page.as_ref()) && err.to_string().contains("is damaged"), "{err}");
    assert!(err.import_dropped && !err.is_retryable(), "{err}");
    for epoch in [0, EPOCH] {
        let (names, docs) = contents(&c, "shop-back", epoch).await?;
        assert!(names.is_empty() && docs.is_empty(), "{names:?} {docs:?}");
    }

    // The same restore from an intact backup works, so the refusal was the damage's. Left
    // incoming (no `Finish`), the database is refused to clients until the caller finishes
    // it.
    flip(dir.path(), page.as_ref());
    let into = RestoreInto::new(access(), "shop-back", "restore-2", None);
    let outcome = restore(&world, &store, &plan, &into).await?;
    assert!(!outcome.finished);
    let (st, b) = data(&c, Method::GET, "/v1/databases/shop-back/collections", None, 0).await?;
    assert_eq!((st, b["error"]["code"].as_str()), (421, Some("StaleRoute")), "{b}");
    let finish = ImportRequest {
        db: "shop-back".into(),
        migration: "restore-2".into(),
        step: ImportStep::Finish { epoch: EPOCH },
    };
    world.import(&access(), &finish).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let (_, docs) = contents(&c, "shop-back", EPOCH).await?;
    assert_eq!(docs.len(), 13, "{docs:?}");
    assert_eq!(outcome.documents, 13);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_verifies_in_scratch_space_to_its_end_and_leaves_no_scratch_database() -> anyhow::Result<()> {
    let c = Cluster::start(3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let store = store_in(dir.path(), "shop");
    let mut model = Model::new();
    for i in 0..12u64 {
        write(&c, "shop", &mut model, &Write { coll: (i % 2) as usize, id: i, delete: false }, i as usize).await?;
    }
    // Writes between the pages (a delete, an update, a new collection): only the replay
    // from the first page's index makes the pages one state.
    let mut between = [
        Write { coll: 0, id: 0, delete: true },
        Write { coll: 1, id: 1, delete: false },
        Write { coll: 2, id: 50, delete: false },
        Write { coll: 0, id: 2, delete: false },
    ]
    .into_iter()
    .enumerate()
    .map(|(k, w)| (100 + k, w));
    let full = take_full(&c, &store, "shop", &mut model, &mut between, true).await?;
    ensure!(
        full.pages.len() >= 2 && model.made.len() > 12,
        "a full of {} page(s) and no write between",
        full.pages.len()
    );
    let at_end = model.state.len() as u64;
    // Changes after the full's end: archived, not replayed by the verification.
    for (k, w) in [Write { coll: 1, id: 3, delete: false }, Write { coll: 2, id: 51, delete: false }].iter().enumerate()
    {
        write(&c, "shop", &mut model, w, 200 + k).await?;
    }
    let oplog = archive(&c, &store, "shop").await?;
    ensure!(oplog.iter().any(|e| OplogPosition { index: e.index, seq: e.seq } > full.end), "no change after the end");
    let fulls = store.list_fulls().await?.complete;
    ensure!(fulls.len() == 1 && fulls[0] == full, "{fulls:?}");
    let segments = store.list_segments().await?;

    let world = ClusterWorld(&c);
    let v = verify_full(&world, &store, &full, &segments, access(), "verify-1").await?;
    assert!(v.matched(), "{v:?}");
    assert_eq!(Some(&v.checksum), full.checksum.as_ref());
    assert_eq!(v.documents, at_end, "the state at the full's end, not after it");
    assert!(v.scratch_dropped && v.changes_applied > 0, "{v:?}");

    // No member keeps anything of the scratch copy: its checksum marker went with it, and
    // an export of it is empty.
    for (i, node) in c.nodes.iter().enumerate() {
        let url = format!("{}/v1/admin/checksum?db=shop~verify", node.admin);
        poll(&format!("member {i} to drop shop~verify"), Duration::from_secs(20), || async {
            let (st, _) = c.client.get(&url).await;
            (st == 404).then_some(())
        })
        .await?;
    }
    let req = json!({"db": "shop~verify", "part": "documents", "maxBytes": 100_000});
    let (_, st, page) = c.leader_post(|i| format!("{}/v1/admin/export", c.nodes[i].admin), &req, None).await?;
    ensure!(st == 200, "export of shop~verify: {st} {page}");
    let page: ExportPage = serde_json::from_value(page)?;
    assert!(page.collections.is_empty() && page.docs.is_empty(), "{page:?}");
    // The database itself is untouched.
    let (_, docs) = contents(&c, "shop", 0).await?;
    assert_eq!(docs.len(), model.state.len());
    Ok(())
}

/// The archive's segments keep the promise of a segment's `maxTs` (every change with a time
/// at or before it is in that segment or an earlier one) where a cut every
/// [`SEGMENT_CHANGES`] changes would fall inside one millisecond: an insert that creates its
/// collection is two changes of one command, at one time. A restore to that time must get
/// both (the planner stops at the first segment covering the time).
#[tokio::test]
async fn the_archive_never_cuts_a_segment_inside_a_millisecond() -> anyhow::Result<()> {
    let change = |index: u64, seq: u32, ts_ms: u64, coll: &str, op: OplogOp| OplogEntry {
        index,
        seq,
        ts_ms,
        db: "s".into(),
        coll: Some(coll.into()),
        op,
    };
    let put = |id: u64, v: u64| OplogOp::Put { id: json!(id), doc: json!({"_id": id, "v": v}) };
    // Four changes, then an insert creating c0: its create is the fifth change, its put the
    // sixth, both at 120.
    let oplog = vec![
        change(1, 0, 100, "c2", OplogOp::CreateCollection),
        change(1, 1, 100, "c2", put(0, 0)),
        change(2, 0, 105, "c2", put(0, 1)),
        change(3, 0, 110, "c2", put(0, 2)),
        change(4, 0, 120, "c0", OplogOp::CreateCollection),
        change(4, 1, 120, "c0", put(0, 3)),
        change(5, 0, 130, "c0", put(0, 4)),
    ];
    let end = OplogPosition::end_of(5);
    let segments = segments(&oplog, end)?;
    for (i, s) in segments.iter().enumerate() {
        for later in segments[i + 1..].iter().flat_map(|s| &s.entries) {
            ensure!(
                later.ts_ms > s.covered_through_ms,
                "change {}:{} at {} is after segment {i}, which covers through {}",
                later.index,
                later.seq,
                later.ts_ms,
                s.covered_through_ms
            );
        }
    }
    ensure!(segments.iter().map(|s| s.entries.len()).sum::<usize>() == oplog.len(), "{segments:?}");

    // What a restore to 120 reads, from a full of the empty database taken before it all.
    let dir = tempfile::tempdir()?;
    let store = store_in(dir.path(), "s");
    let mut stored = Vec::new();
    for s in &segments {
        stored.push((store.put_segment(s).await?, &s.entries));
    }
    let full = FullManifest {
        format: FORMAT_VERSION,
        id: FullId::new(90, 1),
        db: "s".into(),
        lineage: Lineage::new("rs0.e0")?,
        start: OplogPosition::end_of(0),
        end: OplogPosition::end_of(0),
        start_ms: 90,
        end_ms: 90,
        docs: 0,
        bytes: 0,
        pages: vec![],
        checksum: None,
    };
    let plan = plan_restore(&[full], &store.list_segments().await?, RestoreTarget::Time(120))?;
    let replayed: Vec<(u64, u32)> = plan
        .segments
        .iter()
        .flat_map(|s| stored.iter().filter(move |(n, _)| n == s).flat_map(|(_, e)| e.iter()))
        .filter(|e| e.ts_ms <= 120)
        .map(|e| (e.index, e.seq))
        .collect();
    ensure!(replayed == [(1, 0), (1, 1), (2, 0), (3, 0), (4, 0), (4, 1)], "a restore to 120 replays {replayed:?}");
    Ok(())
}
