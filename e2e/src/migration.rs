//! Hot migration as a user drives it (`API.md` section 3): manifests with two pools,
//! `nimbus playground apply` of an instance whose `spec.pool` changed, the migration
//! watched in `playground.json`; and what the tests and `bench/hot-migration` check around
//! it: a database's contents before and after, a reader that reads its own writes,
//! registers for the linearizability checker, and the faults themselves (a gateway killed
//! and started again, etcd stopped). The writers that retry through a fault are
//! `workload::Writers` with [`crate::workload::Delivery::Retried`] for [`RETRY_FOR`].

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::linearizability::{Event, Op};
use crate::playground::{Playground, command_line, signal};
use crate::workload::{COLLECTION, COUNTER_ID};
use crate::{DataClient, poll};

/// The pool every instance starts in.
pub const SOURCE_POOL: &str = "default";
/// The pool the tenant moves to.
pub const TARGET_POOL: &str = "paid";
/// An instance kept in the target pool, so that its replica set runs before the migration
/// (the migration then measures the move, not the provisioning of three datanodes).
pub const ANCHOR: &str = "anchor";

/// Migration phases after which the database is served by the target.
pub const SWITCHED: &[&str] = &["CleaningUp", "Completed"];
/// Migration phases of a migration still running.
pub const RUNNING: &[&str] = &["Copying", "CatchingUp", "Holding", "Switching"];

/// The two pools, both shared: `default` (where instances start) and `paid`.
pub fn pools_yaml() -> String {
    format!(
        "apiVersion: nimbus.io/v1alpha1
kind: ResourcePool
metadata:
  name: {SOURCE_POOL}
spec:
  mode: shared
  replicasPerSet: 3
---
apiVersion: nimbus.io/v1alpha1
kind: ResourcePool
metadata:
  name: {TARGET_POOL}
spec:
  mode: shared
  replicasPerSet: 3
"
    )
}

/// Instance `name` (database of the same name) in `pool`, with limits far above what a
/// test or the benchmark sends: they measure the migration, not the rate limiter.
pub fn instance_yaml(name: &str, pool: &str) -> String {
    format!(
        "apiVersion: nimbus.io/v1alpha1
kind: DatabaseInstance
metadata:
  name: {name}
spec:
  tier: standard
  pool: {pool}
  replicas: 3
  limits:
    qps: 200000
    burst: 400000
    maxConnections: 5000
    maxInFlight: 4096
  users:
    - name: app
      role: readWrite
    - name: reader
      role: read
"
    )
}

/// Writes the YAML documents `docs` as one multi-document manifest `dir/file`.
pub fn write_manifest(dir: &Path, file: &str, docs: &[String]) -> anyhow::Result<PathBuf> {
    let path = dir.join(file);
    std::fs::write(&path, docs.join("---\n")).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(path)
}

/// A playground with both pools, `instances` in the source pool and [`ANCHOR`] in the
/// target pool, started with `env` (`FAILPOINTS`). Returns it and the manifest that moves
/// `tenant` to the target pool (apply it to start the migration) and the one that moves
/// it back.
pub struct TwoPools {
    pub pg: Playground,
    pub to_target: PathBuf,
    pub to_source: PathBuf,
    /// Holds the manifests; removed when dropped.
    _manifests: tempfile::TempDir,
}

impl TwoPools {
    pub fn up(tenant: &str, others: &[&str], env: &[(&str, &str)]) -> anyhow::Result<TwoPools> {
        let manifests = tempfile::Builder::new().prefix("nimbus-manifests-").tempdir()?;
        let files = manifests.path().to_path_buf();
        let mut docs = vec![pools_yaml(), instance_yaml(tenant, SOURCE_POOL)];
        docs.extend(others.iter().map(|o| instance_yaml(o, SOURCE_POOL)));
        docs.push(instance_yaml(ANCHOR, TARGET_POOL));
        let up = write_manifest(&files, "up.yaml", &docs)?;
        let to_target = write_manifest(&files, "to-target.yaml", &[instance_yaml(tenant, TARGET_POOL)])?;
        let to_source = write_manifest(&files, "to-source.yaml", &[instance_yaml(tenant, SOURCE_POOL)])?;
        let up = up.to_str().context("a temporary path that is not UTF-8")?.to_owned();
        // The source's copy is dropped 2 s after the switch, so a test can move the
        // database back soon after (a new migration waits for the last one's clean-up).
        let pg = Playground::up_with_env(&["--instances", &up, "--migration-cleanup-grace", "2s"], env)?;
        Ok(TwoPools { pg, to_target, to_source, _manifests: manifests })
    }
}

/// Instance `name`'s `migration` object in `playground.json` (`Null` before any).
pub fn migration_of(v: &Value, name: &str) -> Value {
    v["instances"][name]["migration"].clone()
}

/// Polls `playground.json` (every 10 ms: the phases the tests act on can be short) until
/// `ok` holds for instance `name`'s entry, and returns the whole file then.
pub async fn wait_instance(
    pg: &Playground,
    name: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(v) = pg.json()
            && ok(&v["instances"][name])
        {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {name}: {what}; it is {}",
                pg.json().map(|v| v["instances"][name].to_string()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether instance entry `i` shows a migration in one of `phases`.
pub fn in_phase(i: &Value, phases: &[&str]) -> bool {
    i["migration"]["phase"].as_str().is_some_and(|p| phases.contains(&p))
}

/// Whether instance entry `i` shows its database served from `pool`, Ready, with no
/// migration running (what `apply --wait` waits for).
pub fn settled_in(i: &Value, pool: &str) -> bool {
    i["pool"] == pool && i["phase"] == "Ready" && !in_phase(i, RUNNING) && !in_phase(i, &["Aborted"])
}

/// The leader of replica set `rs`, as `(datanode in playground.json, its status)`.
pub async fn leader_of(pg: &Playground, http: &reqwest::Client, rs: &str) -> Option<(Value, Value)> {
    let mut best: Option<(Value, Value)> = None;
    for d in pg.datanodes().ok()?.into_iter().filter(|d| d["replicaSet"] == rs) {
        let Some(admin) = d["admin"].as_str() else { continue };
        let Ok(r) = http.get(format!("{admin}/v1/status")).timeout(Duration::from_secs(1)).send().await else {
            continue;
        };
        let Ok(s) = r.json::<Value>().await else { continue };
        if s["role"] == "leader" && best.as_ref().is_none_or(|(_, b)| b["term"].as_u64() < s["term"].as_u64()) {
            best = Some((d, s));
        }
    }
    best
}

/// Where a database is reached through the gateway, and as whom.
#[derive(Clone)]
pub struct Tenant {
    pub client: DataClient,
    pub gateway: String,
    pub db: String,
    pub token: String,
}

impl Tenant {
    pub fn of(pg: &Playground, client: &DataClient, name: &str) -> anyhow::Result<Tenant> {
        let v = pg.json()?;
        let i = &v["instances"][name];
        Ok(Tenant {
            client: client.clone(),
            gateway: v["gateway"].as_str().context("no gateway")?.to_owned(),
            db: i["database"].as_str().with_context(|| format!("no instance {name}"))?.to_owned(),
            token: i["token"].as_str().context("no token")?.to_owned(),
        })
    }

    pub fn url(&self, rest: &str) -> String {
        format!("{}/v1/databases/{}/{rest}", self.gateway, self.db)
    }

    /// A request through the gateway with the tenant's token (and `key`, if given, as its
    /// `Idempotency-Key`).
    pub async fn call(&self, method: Method, rest: &str, body: Option<&Value>, key: Option<&str>) -> (u16, Value) {
        let auth = format!("Bearer {}", self.token);
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(k) = key {
            headers.push(("idempotency-key", k));
        }
        self.client.call(method, &self.url(rest), body, &headers).await
    }
}

/// The collection [`preload`] fills.
pub const PRELOAD: &str = "preload";

/// Fills [`PRELOAD`] with about `bytes` of documents of `doc_bytes` each (`_id` `p{n}`,
/// `n`, `k = n % 97`, a padding string), in batches sent `concurrency` at a time, and
/// indexes it (`k`, and `n` unique). Returns the number of documents.
pub async fn preload(t: &Tenant, bytes: u64, doc_bytes: usize, concurrency: usize) -> anyhow::Result<u64> {
    let docs = (bytes / doc_bytes.max(1) as u64).max(1);
    // Batches of about 1 MiB: well under the body limit, few enough round trips.
    let per_batch = (1_048_576 / doc_bytes.max(1)).clamp(1, 1_000) as u64;
    let pad = "x".repeat(doc_bytes.saturating_sub(60));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (t, next, pad) = (t.clone(), next.clone(), pad.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(per_batch, Ordering::Relaxed);
                if first >= docs {
                    return Ok::<(), anyhow::Error>(());
                }
                let batch: Vec<Value> = (first..(first + per_batch).min(docs))
                    .map(|n| json!({"_id": format!("p{n:09}"), "n": n, "k": n % 97, "pad": pad}))
                    .collect();
                let key = format!("preload-{first}");
                let body = json!({ "documents": batch });
                let rest = format!("collections/{PRELOAD}/documents");
                // A connection lost under the request (0) or a 503 is retried with the same
                // idempotency key, as a client does: applied once whatever happened.
                let mut tries = 0;
                loop {
                    let (st, answer) = t.call(Method::POST, &rest, Some(&body), Some(&key)).await;
                    tries += 1;
                    match st {
                        201 => break,
                        0 | 503 if tries < 5 => tokio::time::sleep(Duration::from_millis(100 * tries)).await,
                        _ => bail!("preloading documents from p{first:09} failed: {st} {answer}"),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("a preloading task panicked")??;
    }
    // An index over a large preload takes its first build step past a request's deadline
    // (503, outcome unknown): retried with the same key, as the documents are.
    for (i, index) in [json!({"keys": {"k": 1}}), json!({"keys": {"n": 1}, "unique": true})].iter().enumerate() {
        let key = format!("preload-index-{i}");
        let mut tries = 0;
        loop {
            let (st, answer) =
                t.call(Method::POST, &format!("collections/{PRELOAD}/indexes"), Some(index), Some(&key)).await;
            tries += 1;
            match st {
                200 | 201 => break,
                0 | 503 if tries < 20 => tokio::time::sleep(Duration::from_millis(500)).await,
                _ => bail!("creating index {index} failed: {st} {answer}"),
            }
        }
    }
    Ok(docs)
}

/// What a database holds, in a form two points in time can be compared by: per collection
/// the documents (count and an order-independent checksum of their JSON) and the index
/// specifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub collections: BTreeMap<String, CollectionContents>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionContents {
    pub documents: u64,
    pub checksum: u64,
    /// `GET .../indexes`, sorted by name.
    pub indexes: Vec<Value>,
}

impl Contents {
    /// Reads `collections` of the database through the gateway, every document of them.
    pub async fn read(t: &Tenant, collections: &[&str]) -> anyhow::Result<Contents> {
        let mut out = BTreeMap::new();
        for coll in collections {
            let (documents, checksum) = checksum(t, coll).await?;
            let (st, body) = t.call(Method::GET, &format!("collections/{coll}/indexes"), None, None).await;
            if st != 200 {
                bail!("listing the indexes of {coll} failed: {st} {body}");
            }
            let mut indexes = body["indexes"].as_array().context("no indexes in the answer")?.clone();
            indexes.sort_by_key(|i| i["name"].to_string());
            out.insert(coll.to_string(), CollectionContents { documents, checksum, indexes });
        }
        Ok(Contents { collections: out })
    }
}

/// Count and order-independent checksum (a wrapping sum of each document's hash) of
/// collection `coll`, read in pages by `_id`; checked against the collection's `count`.
async fn checksum(t: &Tenant, coll: &str) -> anyhow::Result<(u64, u64)> {
    let (mut n, mut sum) = (0u64, 0u64);
    let mut last: Option<Value> = None;
    loop {
        let filter = match &last {
            Some(id) => json!({"_id": {"$gt": id}}),
            None => json!({}),
        };
        let body = json!({"filter": filter, "sort": {"_id": 1}, "limit": nimbus_api::limits::MAX_FIND_LIMIT});
        let (st, answer) = t.call(Method::POST, &format!("collections/{coll}/find"), Some(&body), None).await;
        if st != 200 {
            bail!("reading {coll} failed: {st} {answer}");
        }
        let page = answer["documents"].as_array().context("no documents in the answer")?;
        let Some(tail) = page.last() else { break };
        last = Some(tail["_id"].clone());
        for d in page {
            // serde_json's maps are sorted by key: the same document, the same text.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            d.to_string().hash(&mut h);
            sum = sum.wrapping_add(h.finish());
            n += 1;
        }
    }
    let (st, count) =
        t.call(Method::POST, &format!("collections/{coll}/count"), Some(&json!({"filter": {}})), None).await;
    if st != 200 || count["count"] != n {
        bail!("{coll}: {n} documents read, but count answers {st} {count}");
    }
    Ok((n, sum))
}

/// How long a retrying writer keeps retrying one write
/// ([`crate::workload::Delivery::Retried`]).
pub const RETRY_FOR: Duration = Duration::from_secs(60);

fn unique_run() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos())
}

/// What the [`Reader`] saw.
#[derive(Debug, Default)]
pub struct ReaderReport {
    /// Reads that found what they had to.
    pub reads: u64,
    /// Every read that did not: a write acknowledged and then not found, a counter going
    /// back, or any failed request.
    pub errors: Vec<String>,
}

/// The collection the [`Reader`] writes its own documents into.
pub const READER_COLLECTION: &str = "reader";

/// A reader that checks "a read after an acknowledgement finds the write": it inserts a
/// document, reads it back once acknowledged, and reads the writers' counter, which must
/// never go back. Requests are sent once: any failure is an error.
pub struct Reader {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<ReaderReport>,
}

impl Reader {
    pub fn start(t: &Tenant) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let run = unique_run();
        let (t, stop2, reads2) = (t.clone(), stop.clone(), reads.clone());
        let task = tokio::spawn(async move {
            let mut report = ReaderReport::default();
            let mut counter = 0u64;
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("r{n}");
                let body = json!({"documents": [{"_id": id, "n": n}]});
                let key = format!("{run}-reader-{n}");
                let rest = format!("collections/{READER_COLLECTION}/documents");
                let (st, answer) = t.call(Method::POST, &rest, Some(&body), Some(&key)).await;
                if st != 201 {
                    report.errors.push(format!("reader's write {id}: {st} {answer}"));
                    continue;
                }
                let (st, doc) = t.call(Method::GET, &format!("{rest}/{id}"), None, None).await;
                if st != 200 || doc["n"] != n {
                    report.errors.push(format!("acknowledged {id} then read {st} {doc}"));
                    continue;
                }
                let (st, c) =
                    t.call(Method::GET, &format!("collections/{COLLECTION}/documents/{COUNTER_ID}"), None, None).await;
                match c["n"].as_u64() {
                    Some(now) if st == 200 && now >= counter => counter = now,
                    _ => {
                        report.errors.push(format!("counter read {st} {c} after {counter}"));
                        continue;
                    }
                }
                report.reads += 1;
                reads2.fetch_add(1, Ordering::Relaxed);
            }
            report
        });
        Reader { stop, reads, task }
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub async fn stop(self) -> anyhow::Result<ReaderReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.context("the reader panicked")
    }
}

/// The collection of the registers.
pub const REGISTERS: &str = "registers";

/// Clients reading and writing registers (documents `{_id: key, v}`) through the gateway,
/// each recording its operations for `linearizability::check`: a write `$set`s a value no
/// one else writes (with an idempotency key); an answer 0 or 503 leaves it of unknown
/// outcome; a failed read says nothing. Any other answer is an error.
pub struct Registers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
    history: Arc<Mutex<BTreeMap<String, Vec<Event>>>>,
}

/// Each register's history, and the unexpected answers.
pub struct RegisterHistory {
    pub history: BTreeMap<String, Vec<Event>>,
    pub errors: Vec<String>,
    /// Writes whose outcome the client never learned.
    pub unknown: usize,
}

impl Registers {
    /// Creates the registers (value 0) and starts `per_key` clients on each.
    pub async fn start(t: &Tenant, keys: &[String], per_key: usize) -> anyhow::Result<Registers> {
        for key in keys {
            let body = json!({"documents": [{"_id": key, "v": 0}]});
            let (st, answer) =
                t.call(Method::POST, &format!("collections/{REGISTERS}/documents"), Some(&body), None).await;
            if st != 201 {
                bail!("creating register {key} failed: {st} {answer}");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let history = Arc::new(Mutex::new(keys.iter().map(|k| (k.clone(), Vec::new())).collect::<BTreeMap<_, _>>()));
        let epoch = Instant::now();
        let run = unique_run();
        let mut tasks = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            for c in 0..per_key {
                let (t, key, stop, ok, history, run) =
                    (t.clone(), key.clone(), stop.clone(), ok.clone(), history.clone(), run.clone());
                tasks.push(tokio::spawn(async move {
                    let mut errors = Vec::new();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let write = (n + c as u64).is_multiple_of(2);
                        let value = ((k * per_key + c) as u64) * 1_000_000 + n;
                        let call = epoch.elapsed().as_nanos() as u64;
                        let event = if write {
                            let body = json!({"filter": {"_id": key}, "update": {"$set": {"v": value}}});
                            let idem = format!("{run}-{key}-{c}-{n}");
                            let rest = format!("collections/{REGISTERS}/update");
                            let (st, answer) = t.call(Method::POST, &rest, Some(&body), Some(&idem)).await;
                            let ret = epoch.elapsed().as_nanos() as u64;
                            match st {
                                200 if answer["matched"] == 1 => {
                                    Some(Event { op: Op::Write(value), call, ret: Some(ret) })
                                }
                                0 | 503 => Some(Event { op: Op::Write(value), call, ret: None }),
                                _ => {
                                    errors.push(format!("write of {key}: {st} {answer}"));
                                    // It may have applied: keep it, of unknown outcome.
                                    Some(Event { op: Op::Write(value), call, ret: None })
                                }
                            }
                        } else {
                            let rest = format!("collections/{REGISTERS}/documents/{key}");
                            let (st, doc) = t.call(Method::GET, &rest, None, None).await;
                            let ret = epoch.elapsed().as_nanos() as u64;
                            match st {
                                200 => Some(Event { op: Op::Read(doc["v"].as_u64()), call, ret: Some(ret) }),
                                0 | 503 => None,
                                _ => {
                                    errors.push(format!("read of {key}: {st} {doc}"));
                                    None
                                }
                            }
                        };
                        if let Some(e) = event {
                            if e.ret.is_some() {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            if let Ok(mut h) = history.lock()
                                && let Some(events) = h.get_mut(&key)
                            {
                                events.push(e);
                            }
                        }
                    }
                    errors
                }));
            }
        }
        Ok(Registers { stop, ok, tasks, history })
    }

    /// Waits until `more` further operations have completed.
    pub async fn wait_for(&self, more: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.ok.load(Ordering::Relaxed) + more;
        poll(&format!("{more} more register operations"), timeout, || async {
            (self.ok.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await
    }

    pub async fn stop(self) -> anyhow::Result<RegisterHistory> {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.tasks {
            errors.extend(t.await.context("a register client panicked")?);
        }
        let history = self.history.lock().map_err(|_| anyhow::anyhow!("a register client panicked"))?.clone();
        let unknown = history.values().flatten().filter(|e| e.ret.is_none()).count();
        Ok(RegisterHistory { history, errors, unknown })
    }
}

/// A process stopped with SIGSTOP until dropped (or [`Stopped::resume`]d): etcd "unreachable"
/// without losing its data, and never left stopped by a failing test.
pub struct Stopped {
    pid: u32,
    resumed: bool,
}

impl Stopped {
    pub fn stop(pid: u32) -> anyhow::Result<Stopped> {
        signal(pid, "-STOP")?;
        Ok(Stopped { pid, resumed: false })
    }

    pub fn resume(mut self) -> anyhow::Result<()> {
        self.resumed = true;
        signal(self.pid, "-CONT")
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = signal(self.pid, "-CONT");
        }
    }
}

/// How long a killed gateway is given to be started again by the playground before
/// [`kill_gateway`] starts it itself.
pub const GATEWAY_RESTART: Duration = Duration::from_secs(5);

/// A gateway this harness started again (the playground did not): killed when dropped.
pub struct RestartedGateway {
    child: Option<std::process::Child>,
}

impl Drop for RestartedGateway {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `kill -9` of the playground's gateway; then waits for it to serve again at the same
/// address. If the playground does not start it again within [`GATEWAY_RESTART`], starts
/// it with the command line and environment it had (as a supervisor would), and returns
/// the new process, to be stopped when dropped.
pub async fn kill_gateway(pg: &Playground) -> anyhow::Result<RestartedGateway> {
    let pid = pg.gateway_pid()?;
    let args = command_line(pid);
    let env: Vec<(String, String)> = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|c| *c == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    crate::playground::kill9(pid)?;
    let healthz = format!("{}/healthz", pg.gateway()?);
    let http = reqwest::Client::new();
    let serving = || async {
        http.get(&healthz).timeout(Duration::from_millis(500)).send().await.ok().filter(|r| r.status().is_success())
    };
    // The old process answers no more once it is gone.
    poll("the killed gateway gone", Duration::from_secs(5), || async {
        (!crate::playground::alive(pid)).then_some(())
    })
    .await?;
    if poll("the playground to restart the gateway", GATEWAY_RESTART, || async { serving().await.map(|_| ()) })
        .await
        .is_ok()
    {
        return Ok(RestartedGateway { child: None });
    }
    let (program, rest) = args.split_first().context("the gateway's command line is empty")?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(pg.dir.path().join("logs/gateway.log"))?;
    let child = std::process::Command::new(program)
        .args(rest)
        .env_clear()
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("failed to start the gateway again")?;
    let restarted = RestartedGateway { child: Some(child) };
    poll("the restarted gateway to serve", Duration::from_secs(30), || async { serving().await.map(|_| ()) }).await?;
    Ok(restarted)
}
