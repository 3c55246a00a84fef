//! DatabaseRestore scenarios against the in-memory API server (the chart's RBAC enforced)
//! and a fake runner: phases, status, Events, one restore of an instance at a time, a
//! restore into a new instance, and a run cut off by an operator restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

use super::fixtures::{FakeApi, INSTANCES, NS};
use super::restore::{
    self, ANNOTATION_RESTORED_BY, RecordCommit, RestoreContext, RestoreDestination, RestoreFailure, RestoreJob,
    RestoreReport, RestoreRunner,
};
use crate::controlplane::backup::RestoreTarget;
use crate::crd::v1alpha1::RestoreCommit;

const RESTORES: &str = "/apis/nimbus.io/v1alpha1/namespaces/apps/databaserestores";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/apps/events";

/// Records each job; runs held at the gate until released (when gated); answers with the
/// queued outcomes, then success.
#[derive(Default)]
struct FakeRunner {
    jobs: Mutex<Vec<RestoreJob>>,
    outcomes: Mutex<VecDeque<Result<RestoreReport, RestoreFailure>>>,
    gate: Option<tokio::sync::Semaphore>,
    running: Mutex<(usize, usize)>,
}

impl FakeRunner {
    fn gated() -> FakeRunner {
        FakeRunner { gate: Some(tokio::sync::Semaphore::new(0)), ..FakeRunner::default() }
    }
    fn release(&self) {
        self.gate.as_ref().unwrap().add_permits(1);
    }
    fn jobs(&self) -> Vec<RestoreJob> {
        self.jobs.lock().unwrap().clone()
    }
    /// The most runs at once so far.
    fn most_at_once(&self) -> usize {
        self.running.lock().unwrap().1
    }
}

fn report() -> RestoreReport {
    RestoreReport { restored_to_ms: 1_767_225_600_000, documents: 1_200, bytes: 345_678 }
}

#[async_trait]
impl RestoreRunner for FakeRunner {
    async fn run(&self, job: RestoreJob, _record: Arc<dyn RecordCommit>) -> Result<RestoreReport, RestoreFailure> {
        self.jobs.lock().unwrap().push(job);
        {
            let mut r = self.running.lock().unwrap();
            r.0 += 1;
            r.1 = r.1.max(r.0);
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        self.running.lock().unwrap().0 -= 1;
        self.outcomes.lock().unwrap().pop_front().unwrap_or_else(|| Ok(report()))
    }

    async fn resume(&self, _namespace: &str, commit: &RestoreCommit) -> Result<RestoreReport, RestoreFailure> {
        panic!("nothing recorded a switch here, yet {commit:?} was resumed")
    }
}

/// What the instance reconciler shows once an instance holds its database on a replica set.
fn placement() -> Value {
    json!({"replicaSet": "default-rs0", "pool": "default"})
}

struct Scene {
    api: FakeApi,
    runner: Arc<FakeRunner>,
    ctx: Arc<RestoreContext>,
}

impl Scene {
    fn new(runner: FakeRunner) -> Scene {
        let api = FakeApi::default();
        api.put(
            INSTANCES,
            json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
                "metadata": {"name": "shop", "namespace": NS, "uid": "uid-shop", "generation": 1},
                "spec": {"database": "shopdb", "tier": "standard", "pool": "default", "zones": ["a", "b", "c"],
                         "limits": {"qps": 50}},
                "status": {"phase": "Ready", "database": "shopdb", "placement": placement()}}),
        );
        let runner = Arc::new(runner);
        let ctx = Scene::context(&api, Some(runner.clone()));
        Scene { api, runner, ctx }
    }

    fn context(api: &FakeApi, runner: Option<Arc<FakeRunner>>) -> Arc<RestoreContext> {
        let client = api.client();
        let reporter = Reporter { controller: "nimbus-operator".into(), instance: Some("test".into()) };
        Arc::new(RestoreContext {
            client: client.clone(),
            recorder: Recorder::new(client, reporter),
            runner: runner.map(|r| r as Arc<dyn RestoreRunner>),
            jobs: Default::default(),
            poll: Duration::from_millis(10),
        })
    }

    /// The same API, reconciled by a new operator (nothing of the old one's runs known).
    fn restarted(&self) -> Scene {
        Scene {
            api: self.api.clone(),
            runner: self.runner.clone(),
            ctx: Scene::context(&self.api, Some(self.runner.clone())),
        }
    }

    fn add(&self, name: &str, spec: Value) {
        self.api.put(
            RESTORES,
            json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseRestore",
                "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
                "spec": spec}),
        );
    }

    /// What the instance reconciler does with a new instance: places it under its claim.
    fn place(&self, instance: &str) {
        let mut made = self.api.get(INSTANCES, instance).expect("the instance exists");
        made["status"] = json!({"phase": "Provisioning", "database": instance, "placement": placement()});
        self.api.put(INSTANCES, made);
    }

    async fn reconcile(&self, name: &str) {
        let dbr = serde_json::from_value(self.api.get(RESTORES, name).unwrap()).unwrap();
        restore::reconcile(Arc::new(dbr), self.ctx.clone()).await.unwrap();
    }

    fn status(&self, name: &str) -> Value {
        self.api.get(RESTORES, name).unwrap()["status"].clone()
    }

    /// Reconciles (as the controller's requeues would) until the phase is `phase`.
    async fn until(&self, name: &str, phase: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            self.reconcile(name).await;
            let status = self.status(name);
            if status["phase"] == phase {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} never reached {phase}: {status:#}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `(type, reason, note)` of the Events about restore `name`.
    fn events(&self, name: &str) -> Vec<(String, String, String)> {
        self.api
            .list(EVENTS)
            .into_iter()
            .filter(|e| e["regarding"]["name"] == name)
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                (s("type"), s("reason"), s("note"))
            })
            .collect()
    }
}

fn in_place() -> Value {
    json!({"source": "shop", "toTime": "latest", "target": {"mode": "InPlace"}})
}

#[tokio::test]
async fn a_restore_runs_through_the_runner_and_its_status_says_what_was_restored() {
    let s = Scene::new(FakeRunner::default());
    s.add(
        "undo",
        json!({"source": "shop", "toTime": "2026-01-01T00:00:00Z", "collections": ["orders"],
        "target": {"mode": "InPlace"}}),
    );
    s.reconcile("undo").await;
    assert_eq!(s.status("undo")["phase"], "Restoring");
    let status = s.until("undo", "Succeeded").await;
    assert_eq!(status["restoredTo"], "2026-01-01T00:00:00.000Z");
    assert_eq!((status["documents"].as_u64(), status["bytes"].as_u64()), (Some(1_200), Some(345_678)));
    assert_eq!(status["attempts"], 1);
    assert!(status["startedAt"].is_string() && status["finishedAt"].is_string(), "{status:#}");
    assert_eq!(status["message"], "restored 1200 documents (345678 bytes) to 2026-01-01T00:00:00.000Z");
    let succeeded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Succeeded").unwrap();
    assert_eq!(succeeded["status"], "True");
    let jobs = s.runner.jobs();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!((job.source_instance.as_str(), job.source_database.as_str()), ("shop", "shopdb"));
    assert_eq!(job.source_uid, "uid-shop");
    assert_eq!(job.to, RestoreTarget::Time(1_767_225_600_000));
    assert_eq!(job.collections, Some(vec!["orders".to_string()]));
    assert_eq!((job.destination.clone(), job.attempt), (RestoreDestination::InPlace, 1));
    let reasons: Vec<String> = s.events("undo").into_iter().map(|(_, r, _)| r).collect();
    assert_eq!(reasons, ["RestoreStarted", "RestoreSucceeded"]);
    // Done is done: another pass runs nothing.
    s.reconcile("undo").await;
    assert_eq!(s.runner.jobs().len(), 1);
}

#[tokio::test]
async fn a_failed_restore_is_failed_with_the_runners_message_and_a_warning_event() {
    let s = Scene::new(FakeRunner::default());
    let refusal = "time 2025-01-01T00:00:00Z is outside the recoverable window";
    s.runner.outcomes.lock().unwrap().push_back(Err(RestoreFailure { message: refusal.into(), retryable: false }));
    s.add("undo", in_place());
    let status = s.until("undo", "Failed").await;
    assert_eq!(status["message"], format!("restore failed: {refusal}"));
    let events = s.events("undo");
    assert!(
        events.contains(&("Warning".into(), "RestoreFailed".into(), format!("restore failed: {refusal}"))),
        "{events:?}"
    );
    assert_eq!(s.runner.jobs().len(), 1, "a refusal is not retried");
}

#[tokio::test]
async fn a_passing_failure_is_retried_and_then_given_up() {
    let s = Scene::new(FakeRunner::default());
    let passing = || Err(RestoreFailure { message: "the object store timed out".into(), retryable: true });
    s.runner.outcomes.lock().unwrap().extend([passing(), Ok(report())]);
    s.add("undo", in_place());
    let status = s.until("undo", "Succeeded").await;
    assert_eq!(status["attempts"], 2);
    assert_eq!(s.runner.jobs().iter().map(|j| j.attempt).collect::<Vec<_>>(), [1, 2]);

    let s = Scene::new(FakeRunner::default());
    s.runner.outcomes.lock().unwrap().extend((0..restore::MAX_ATTEMPTS).map(|_| passing()));
    s.add("undo", in_place());
    let status = s.until("undo", "Failed").await;
    assert_eq!(status["attempts"], restore::MAX_ATTEMPTS);
    assert_eq!(status["message"], "restore failed: the object store timed out");
}

#[tokio::test]
async fn two_restores_of_one_instance_run_one_after_the_other() {
    let s = Scene::new(FakeRunner::gated());
    s.add("first", in_place());
    s.add("second", json!({"source": "shop", "toTime": "latest", "target": {"mode": "Beside", "suffix": "_old"}}));
    s.reconcile("first").await;
    assert_eq!(s.status("first")["phase"], "Restoring");
    for _ in 0..3 {
        s.reconcile("second").await;
    }
    let second = s.status("second");
    assert_eq!(second["phase"], "Pending");
    assert_eq!(
        second["message"],
        "waiting for restore first of instance shop to finish: one restore of an instance at a time"
    );
    assert_eq!(s.runner.jobs().len(), 1);
    s.runner.release();
    s.until("first", "Succeeded").await;
    s.reconcile("second").await;
    assert_eq!(s.status("second")["phase"], "Restoring");
    s.runner.release();
    s.until("second", "Succeeded").await;
    assert_eq!(s.runner.most_at_once(), 1);
    let beside = &s.runner.jobs()[1];
    assert_eq!(beside.beside_name("orders").as_deref(), Some("orders_old"));
}

#[tokio::test]
async fn a_restore_into_a_new_instance_creates_it_from_the_sources_spec_first() {
    let s = Scene::new(FakeRunner::default());
    s.add(
        "copy",
        json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance", "instance": "shop-copy"}}),
    );
    // Made, then waited for: nothing runs until the instance reconciler has placed it (until
    // then its database's route may be nobody's, or another instance's).
    s.reconcile("copy").await;
    s.reconcile("copy").await;
    let made = s.api.get(INSTANCES, "shop-copy").expect("the new instance is made");
    assert_eq!(s.status("copy")["phase"], "Pending");
    assert!(s.status("copy")["message"].as_str().unwrap().contains("waiting until new instance shop-copy is placed"));
    assert!(s.runner.jobs().is_empty(), "a restore ran into an instance not placed yet");
    s.place("shop-copy");
    s.until("copy", "Succeeded").await;
    assert_eq!(made["metadata"]["annotations"][ANNOTATION_RESTORED_BY], "copy/uid-copy");
    assert_eq!(made["spec"]["limits"]["qps"], 50);
    assert!(made["spec"]["database"].is_null(), "its database is its own name: {:#}", made["spec"]);
    assert!(made["spec"]["zones"].is_null(), "placed anew: {:#}", made["spec"]);
    let job = &s.runner.jobs()[0];
    assert_eq!(
        job.destination,
        RestoreDestination::NewInstance { instance: "shop-copy".into(), database: "shop-copy".into() }
    );
    assert!(s.events("copy").iter().any(|(_, r, _)| r == "InstanceCreated"));

    // A name taken by an instance of someone else's is refused, and nothing runs.
    s.add(
        "clash",
        json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance", "instance": "shop-copy"}}),
    );
    let status = s.until("clash", "Failed").await;
    assert!(status["message"].as_str().unwrap().contains("instance shop-copy already exists"), "{status:#}");
    assert_eq!(s.runner.jobs().len(), 1);
}

#[tokio::test]
async fn a_new_instance_that_fails_its_placement_fails_the_restore_and_nothing_runs() {
    let s = Scene::new(FakeRunner::default());
    s.add(
        "copy",
        json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance", "instance": "taken"}}),
    );
    s.reconcile("copy").await;
    let mut made = s.api.get(INSTANCES, "taken").expect("the new instance is made");
    made["status"] = json!({"phase": "Failed", "conditions": [{"type": "Ready", "status": "False",
        "reason": "DatabaseNameTaken", "message": "database taken is another instance's",
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    s.api.put(INSTANCES, made);
    let status = s.until("copy", "Failed").await;
    assert!(status["message"].as_str().unwrap().contains("database taken is another instance's"), "{status:#}");
    assert!(s.runner.jobs().is_empty());
}

#[tokio::test]
async fn a_source_that_does_not_hold_its_database_is_refused() {
    let s = Scene::new(FakeRunner::default());
    let mut shop = s.api.get(INSTANCES, "shop").unwrap();
    shop["status"] = json!({"phase": "Failed"});
    s.api.put(INSTANCES, shop);
    s.add("r", json!({"source": "shop", "toTime": "latest", "target": {"mode": "InPlace"}}));
    let status = s.until("r", "Failed").await;
    assert!(status["message"].as_str().unwrap().contains("does not serve database shopdb"), "{status:#}");
    assert!(s.runner.jobs().is_empty());
}

#[tokio::test]
async fn a_restore_that_cannot_be_done_fails_at_once_with_a_sentence() {
    let s = Scene::new(FakeRunner::default());
    let cases = [
        (
            json!({"source": "gone", "toTime": "latest", "target": {"mode": "InPlace"}}),
            "source instance gone does not exist",
        ),
        (json!({"source": "shop", "toTime": "yesterday", "target": {"mode": "InPlace"}}), "neither an RFC 3339 time"),
        (json!({"source": "shop", "toTime": "2999-01-01T00:00:00Z", "target": {"mode": "InPlace"}}), "in the future"),
        (
            json!({"source": "shop", "toTime": "latest", "collections": ["orders"],
                "target": {"mode": "Beside", "renames": [{"from": "users", "to": "users_old"}]}}),
            "which spec.collections does not restore",
        ),
        (
            json!({"source": "shop", "toTime": "latest", "target": {"mode": "Beside", "renames": [{"from": "a", "to": "a"}]}}),
            "to itself",
        ),
        (
            json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance", "instance": "shop"}}),
            "is the source shop",
        ),
    ];
    for (i, (spec, expect)) in cases.into_iter().enumerate() {
        let name = format!("bad{i}");
        s.add(&name, spec.clone());
        let status = s.until(&name, "Failed").await;
        let message = status["message"].as_str().unwrap();
        assert!(message.contains(expect), "{spec}: {message}");
        assert!(s.events(&name).iter().any(|(t, r, _)| t == "Warning" && r == "RestoreFailed"));
    }
    assert!(s.runner.jobs().is_empty());
}

#[tokio::test]
async fn a_restore_cut_off_by_an_operator_restart_runs_again() {
    let s = Scene::new(FakeRunner::gated());
    s.add("undo", in_place());
    s.reconcile("undo").await;
    assert_eq!(s.status("undo")["phase"], "Restoring");
    // The operator restarts: its run is gone (here: still held at the gate, forgotten).
    let s = s.restarted();
    s.reconcile("undo").await;
    let status = s.status("undo");
    assert_eq!(status["attempts"], 2);
    assert!(status["message"].as_str().unwrap().contains("the operator restarted while it ran"), "{status:#}");
    s.runner.release();
    s.runner.release();
    s.until("undo", "Succeeded").await;
    assert_eq!(s.runner.jobs().iter().map(|j| j.attempt).collect::<Vec<_>>(), [1, 2]);
}

#[tokio::test]
async fn without_a_runner_a_restore_waits_in_pending_and_says_why() {
    let api = FakeApi::default();
    let s = Scene { ctx: Scene::context(&api, None), api, runner: Arc::new(FakeRunner::default()) };
    s.api.put(
        INSTANCES,
        json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
            "metadata": {"name": "shop", "namespace": NS, "uid": "uid-shop"}, "spec": {},
            "status": {"database": "shop", "placement": placement()}}),
    );
    s.add("undo", in_place());
    s.reconcile("undo").await;
    let status = s.status("undo");
    assert_eq!(status["phase"], "Pending");
    assert!(status["message"].as_str().unwrap().contains("no restore runner"), "{status:#}");
}

/// The (group, resource, verb) a restore's life uses: each kind of outcome, a new instance.
pub(super) async fn restore_lifecycle_used() -> BTreeSet<(String, String, String)> {
    let s = Scene::new(FakeRunner::default());
    s.runner.outcomes.lock().unwrap().push_back(Err(RestoreFailure { message: "damaged".into(), retryable: false }));
    s.add("failed", in_place());
    s.until("failed", "Failed").await;
    s.add(
        "copy",
        json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance", "instance": "shop-copy"}}),
    );
    s.reconcile("copy").await;
    s.place("shop-copy");
    s.until("copy", "Succeeded").await;
    s.api.used()
}
