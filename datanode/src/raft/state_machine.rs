//! The replicated state machine: applies committed entries to the storage [`Engine`],
//! builds snapshots as checkpoints and installs snapshots received from the leader.
//!
//! The engine lives in `DIR/sm/<generation>/`; `DIR/sm/CURRENT` names the live generation.
//!
//! # Installing a snapshot
//!
//! [`StateMachine::install_snapshot`] is given a verified checkpoint (a received transfer,
//! already fsynced: see [`super::transfer`]; or, when openraft restores a member at startup,
//! one of this member's own snapshots). It goes through these steps ([`InstallStep`]):
//!
//! 1. **Staged.** The checkpoint is materialized as the next generation `sm/<g+1>`:
//!    table files hard-linked, the files RocksDB may rewrite copied; every copied file, the
//!    directory and `sm/` fsynced. The source is left as it was.
//! 2. **Opened.** RocksDB opens `sm/<g+1>` and its applied log id must be the one the
//!    metadata names; what RocksDB wrote while opening is synced with the directory.
//! 3. **Published.** The checkpoint becomes this member's newest snapshot (hard links into
//!    `DIR/snapshots`, metadata, directory and rename synced).
//! 4. **Switched.** `CURRENT` is replaced by a synced temporary file renamed over it, and
//!    `sm/` fsynced: this rename is the switch. Then readers move to the new engine and
//!    the old generation is deleted once its last reader lets go.
//!
//! A crash before the switch's rename is durable leaves `CURRENT` naming the old
//! generation, which is untouched (nothing of the install ever writes into it); startup
//! removes every other generation (a half-staged `sm/<g+1>` included) and the staging
//! area of transfers. A crash after it finds the new generation whole, since every byte of
//! it was durable before the rename. So a member restarts with the old state or the new
//! one, never a mix. If it crashed after step 3, its newest snapshot is ahead of the
//! state it restarts with; openraft then installs that snapshot at startup
//! (`restore_from_snapshot`), through these same steps, leaving its own snapshot in
//! place. Publishing before the switch closes the other window: a member that switched,
//! then crashed before publishing, would restart with its state machine ahead of its
//! newest snapshot and without the log entries in between (they are why it needed a
//! snapshot); openraft's startup purges the log up to the state machine, past the newest
//! snapshot, and stops on that invalid state.
//!
//! Raft purges its log behind an installed snapshot only after this returns (openraft's
//! `PurgeLog` waits for the snapshot to be persisted), so the entries the old state needs
//! are still there if the crash leaves it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use futures::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use rocksdb::WriteBatch;

use super::snapshot::{SnapshotData, SnapshotDir, materialize, sync_dir};
use super::transfer::Incoming;
use super::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig};
use crate::store::engine::{CheckpointReader, EngineOptions};
use crate::store::keys::{META_APPLIED, META_MEMBERSHIP};
use crate::store::{Engine, WriteAnswer};

type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Shared between the Raft state-machine worker and the readers (data API).
pub struct SmShared {
    root: PathBuf,
    engine: RwLock<Arc<Engine>>,
    options: EngineOptions,
    snapshots: SnapshotDir,
    incoming: Incoming,
    /// Tests: every snapshot build fails once its checkpoint is made, as on a disk that
    /// fills up while the metadata is written.
    failing_builds: std::sync::atomic::AtomicBool,
}

impl SmShared {
    /// The live engine. Readers hold the `Arc` for the duration of one request.
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn snapshots(&self) -> &SnapshotDir {
        &self.snapshots
    }

    /// Where received snapshot files are staged before they are installed.
    pub fn incoming(&self) -> &Incoming {
        &self.incoming
    }

    /// Tests: makes every snapshot build fail (or work again), after its checkpoint is made
    /// and before it is published: the failure leaves a checkpoint on disk to be removed.
    #[doc(hidden)]
    pub fn fail_builds_for_tests(&self, fail: bool) {
        self.failing_builds.store(fail, std::sync::atomic::Ordering::Relaxed);
    }

    /// Builds a snapshot beside the applying, which never pauses for it: the checkpoint
    /// flushes the memtables while entries go on being applied and holds the state of that
    /// flush or a later one (see [`Engine::checkpoint`]); its metadata (applied log id,
    /// membership) is read from the checkpoint itself, so it names exactly the entries the
    /// snapshot holds. Blocking: run it off the runtime.
    fn build_snapshot(&self) -> io::Result<Snapshot> {
        let started = Instant::now();
        let engine = self.engine();
        let tmp = self.snapshots.temp_dir();
        let made = (|| {
            engine.checkpoint(&tmp).map_err(io_err)?;
            let (last_log_id, last_membership) = {
                let reader = CheckpointReader::open(&tmp).map_err(io_err)?;
                let applied: Option<LogId> = reader.get_meta(META_APPLIED).map_err(io_err)?;
                let membership: Option<StoredMembership> = reader.get_meta(META_MEMBERSHIP).map_err(io_err)?;
                (applied, membership.unwrap_or_default())
            };
            if self.failing_builds.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io_err("failed to publish the snapshot (a test says so)"));
            }
            let meta = SnapshotMeta { last_log_id, last_membership };
            let data = self.snapshots.publish(&tmp, &meta)?;
            Ok::<_, io::Error>((meta, data))
        })();
        // A failed build leaves no checkpoint behind: its hard links would keep compacted
        // table files on a disk that may be full already, build after build.
        let (meta, data) = made.inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        })?;
        let last_log_id = meta.last_log_id;
        metrics::counter!("nimbus_snapshots_built_total").increment(1);
        metrics::histogram!("nimbus_snapshot_build_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(
            index = last_log_id.map(|l| l.index()),
            build_ms = started.elapsed().as_millis() as u64,
            "snapshot built"
        );
        Ok(Snapshot { meta, snapshot: data })
    }
}

/// The steps of [`StateMachine::install_snapshot`], in order (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallStep {
    Staged,
    Opened,
    Published,
    Switched,
}

impl InstallStep {
    pub const ALL: [InstallStep; 4] =
        [InstallStep::Staged, InstallStep::Opened, InstallStep::Published, InstallStep::Switched];
}

/// Called after each step of an install (tests: a crash exactly there).
#[doc(hidden)]
pub type InstallHook = Arc<dyn Fn(InstallStep) + Send + Sync>;

pub struct StateMachine {
    shared: Arc<SmShared>,
    install_hook: Option<InstallHook>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn current_generation(sm_root: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(sm_root.join("CURRENT")) {
        Ok(s) => s.trim().parse().map_err(io_err),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn set_generation(sm_root: &Path, generation: u64) -> io::Result<()> {
    let tmp = sm_root.join("CURRENT.tmp");
    std::fs::write(&tmp, generation.to_string())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, sm_root.join("CURRENT"))?;
    std::fs::File::open(sm_root)?.sync_all()
}

impl StateMachine {
    /// Opens (or creates) the state machine under `root` (the datanode's data directory).
    pub fn open(root: &Path, options: EngineOptions) -> io::Result<StateMachine> {
        let sm_root = root.join("sm");
        std::fs::create_dir_all(&sm_root)?;
        let generation = current_generation(&sm_root)?;
        // Remove generations other than the live one, and a switch's temporary file: what a
        // crash during an install leaves.
        for e in std::fs::read_dir(&sm_root)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_dir() && name != generation.to_string() {
                std::fs::remove_dir_all(e.path())?;
            } else if name == "CURRENT.tmp" {
                std::fs::remove_file(e.path())?;
            }
        }
        let engine = Engine::open(&sm_root.join(generation.to_string()), options.clone()).map_err(io_err)?;
        Ok(StateMachine {
            shared: Arc::new(SmShared {
                root: root.to_owned(),
                engine: RwLock::new(Arc::new(engine)),
                options,
                snapshots: SnapshotDir::new(root.join("snapshots"))?,
                // Transfers in progress when the member stopped are abandoned.
                incoming: Incoming::open(root.join("incoming"))?,
                failing_builds: std::sync::atomic::AtomicBool::new(false),
            }),
            install_hook: None,
        })
    }

    /// Calls `hook` after each step of a snapshot install.
    #[doc(hidden)]
    pub fn with_install_hook(mut self, hook: InstallHook) -> StateMachine {
        self.install_hook = Some(hook);
        self
    }

    fn step(&self, step: InstallStep) {
        if let Some(hook) = &self.install_hook {
            hook(step);
        }
    }

    pub fn shared(&self) -> Arc<SmShared> {
        self.shared.clone()
    }

    fn applied(engine: &Engine) -> io::Result<(Option<LogId>, StoredMembership)> {
        let applied: Option<LogId> = engine.get_meta(META_APPLIED).map_err(io_err)?;
        let membership: Option<StoredMembership> = engine.get_meta(META_MEMBERSHIP).map_err(io_err)?;
        Ok((applied, membership.unwrap_or_default()))
    }
}

/// Builds a snapshot in a task of its own, which openraft spawns, beside the applying
/// (see [`SmShared::build_snapshot`]).
pub struct Builder {
    shared: Arc<SmShared>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    type SnapshotData = SnapshotData;

    /// A failed build (a full disk, say) answers the newest snapshot there is, which
    /// openraft keeps as it was: it tries again after `--snapshot-every` more entries. Only
    /// with no snapshot at all is the failure openraft's, which stops Raft on this member.
    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let shared = self.shared.clone();
        let failed = match tokio::task::spawn_blocking(move || shared.build_snapshot()).await {
            Ok(Ok(built)) => return Ok(built),
            Ok(Err(e)) => e,
            Err(e) => io_err(format!("the snapshot build stopped: {e}")),
        };
        metrics::counter!("nimbus_snapshot_build_failures_total").increment(1);
        match self.shared.snapshots.current() {
            Ok(Some((meta, snapshot))) => {
                tracing::error!(error = %failed, kept = ?meta.last_log_id, "failed to build a snapshot; the newest one stays");
                Ok(Snapshot { meta, snapshot })
            }
            _ => {
                tracing::error!(error = %failed, "failed to build a snapshot, and there is none");
                Err(failed)
            }
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Self::applied(&self.shared.engine())
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + openraft::OptionalSend,
    {
        let engine = self.shared.engine();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            let mut batch = WriteBatch::default();
            let mut delta = None;
            let answer = match &entry.payload {
                EntryPayload::Blank => Ok(WriteAnswer::None),
                EntryPayload::Normal(cmd) => {
                    let (result, d) = engine.apply_command(&mut batch, cmd, log_id.index()).map_err(io_err)?;
                    metrics::counter!("nimbus_applied_writes_total", "op" => cmd.op.kind(), "ok" => if result.is_ok() { "true" } else { "false" }).increment(1);
                    delta = Some(d);
                    result
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(log_id), m.clone());
                    engine.put_meta(&mut batch, META_MEMBERSHIP, &stored);
                    Ok(WriteAnswer::None)
                }
            };
            engine.put_meta(&mut batch, META_APPLIED, &Some(log_id));
            engine.commit(batch, delta).map_err(io_err)?;
            metrics::gauge!("nimbus_raft_applied_index").set(log_id.index() as f64);
            if let Some(r) = responder {
                r.send(answer);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<Self::SnapshotBuilder> {
        Some(self.get_snapshot_builder().await)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Builder { shared: self.shared.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        // The steps and why a crash between any two leaves the old state or the new one:
        // see the module docs.
        let sm_root = self.shared.root.join("sm");
        let next = current_generation(&sm_root)? + 1;
        let next_dir = sm_root.join(next.to_string());
        if next_dir.exists() {
            std::fs::remove_dir_all(&next_dir)?;
        }
        materialize(&snapshot.dir, &next_dir)?;
        sync_dir(&sm_root)?;
        self.step(InstallStep::Staged);

        let engine = match open_checked(&next_dir, &self.shared.options, meta) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&next_dir);
                return Err(e);
            }
        };
        sync_dir(&next_dir)?;
        self.step(InstallStep::Opened);

        self.shared.snapshots.adopt(&snapshot.dir, meta)?;
        self.step(InstallStep::Published);

        set_generation(&sm_root, next)?;
        self.step(InstallStep::Switched);

        let old = std::mem::replace(&mut *self.shared.engine.write().unwrap_or_else(|p| p.into_inner()), engine);
        retire(old);
        metrics::counter!("nimbus_snapshots_installed_total").increment(1);
        tracing::info!(index = ?meta.last_log_id.as_ref().map(|l| l.index()), generation = next, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.shared.snapshots.current()?.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}

/// Opens the engine of a staged generation and checks it holds the state `meta` names.
fn open_checked(dir: &Path, options: &EngineOptions, meta: &SnapshotMeta) -> io::Result<Engine> {
    let engine = Engine::open(dir, options.clone()).map_err(io_err)?;
    let (applied, _) = StateMachine::applied(&engine)?;
    if applied != meta.last_log_id {
        return Err(io_err(format!(
            "failed to install a snapshot: its data is at {applied:?} but its metadata says {:?}",
            meta.last_log_id
        )));
    }
    Ok(engine)
}

/// Closes a replaced engine once the last reader lets go, then deletes its files.
fn retire(old: Arc<Engine>) {
    std::thread::spawn(move || {
        let mut old = old;
        loop {
            match Arc::try_unwrap(old) {
                Ok(engine) => {
                    let path = engine.path().to_owned();
                    drop(engine);
                    if let Err(e) = std::fs::remove_dir_all(&path) {
                        tracing::warn!(error = %e, path = %path.display(), "failed to remove a replaced state machine");
                    }
                    return;
                }
                Err(still_shared) => {
                    old = still_shared;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    });
}
