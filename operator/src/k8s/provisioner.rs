//! The Kubernetes provisioner of the replica-set driver (`controlplane::driver`): a member
//! is a Pod and a PVC, created directly (not by a StatefulSet) so the driver chooses which
//! member to start, restart or remove.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::ListParams;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use nimbus_api::admin::MemberInfo;
use nimbus_api::etcd::ReplicaSetRecord;
use serde_json::json;
use tracing::warn;

use super::Error;
use super::api::Objects;
use super::failure::{self, ANNOTATION_SELECTED_NODE, ANNOTATION_UNHEALTHY_POD, ANNOTATION_UNHEALTHY_SINCE, Verdict};
use super::instance::Context;
use super::objects::{self, ReplicaSetShape};
use crate::controlplane::driver::{Events, Provisioner, Severity};
use crate::controlplane::members::{MemberView, RaftView};

/// The members of one replica set as Pods and PVCs in its namespace.
pub struct PodProvisioner<'a> {
    ctx: &'a Context,
    rs: &'a ReplicaSetShape,
    /// The replica set's zones, for its bootstrap record.
    zones: Vec<String>,
    /// The replica set was initialised: only then is a member ever declared lost (before,
    /// its members are not Ready by design, and there is nothing to replace).
    bootstrapped: bool,
    /// The member Pods last observed, by member id.
    pods: BTreeMap<u64, Pod>,
    /// The member PVCs last observed (not terminating).
    volumes: Vec<PersistentVolumeClaim>,
    /// The cluster's nodes last observed (the operator's watch cache), by name.
    nodes: BTreeMap<String, Node>,
    /// The members declared lost at the last observation, and why.
    lost: BTreeMap<u64, String>,
}

impl<'a> PodProvisioner<'a> {
    pub fn new(ctx: &'a Context, rs: &'a ReplicaSetShape, zones: Vec<String>, bootstrapped: bool) -> Self {
        PodProvisioner {
            ctx,
            rs,
            zones,
            bootstrapped,
            pods: BTreeMap::new(),
            volumes: Vec::new(),
            nodes: BTreeMap::new(),
            lost: BTreeMap::new(),
        }
    }

    /// The members declared lost at the last observation, each with why, in words.
    pub fn lost(&self) -> &BTreeMap<u64, String> {
        &self.lost
    }

    /// Labels each member Pod with its role (`nimbus.io/role`: `leader` or `follower`)
    /// where it differs, so a selector finds the leader (`-l nimbus.io/role=leader`).
    pub async fn label_roles(&self, leader: u64) -> Result<(), Error> {
        let pods = self.pods();
        for (id, pod) in &self.pods {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let role = if *id == leader { objects::ROLE_LEADER } else { objects::ROLE_FOLLOWER };
            if pod.labels().get(objects::LABEL_ROLE).map(String::as_str) != Some(role) {
                pods.merge(&pod.name_any(), &json!({"metadata": {"labels": {objects::LABEL_ROLE: role}}})).await?;
            }
        }
        Ok(())
    }

    /// Keeps the time each member with a volume was first seen unhealthy on its PVC, with
    /// its Pod then, and marks the members unhealthy for longer than the failure period as
    /// lost (`k8s::failure`: time counts only while the replica set has a leader, and from
    /// the member's latest Pod). A lost member whose Pod is gone and whose volume's node is
    /// Ready again is marked as returned: it may start again on its data.
    async fn track_failures(&mut self, views: &mut [MemberView], view: &RaftView) -> Result<(), Error> {
        let (failover, now) = (&self.ctx.failover, self.ctx.failover.clock.now());
        let leaderless = matches!(view, RaftView::NoLeader);
        self.lost.clear();
        for pvc in &self.volumes {
            let Some(id) = pvc.labels().get(objects::LABEL_MEMBER).and_then(|i| i.parse::<u64>().ok()) else {
                continue;
            };
            let pod = self.pods.get(&id);
            let uid = pod.and_then(|p| p.metadata.uid.as_deref());
            let unhealthy = failure::unhealthy(pod, &self.nodes).filter(|_| self.bootstrapped);
            let annotations = pvc.annotations();
            let record = failure::Record {
                since: annotations.get(ANNOTATION_UNHEALTHY_SINCE).map(String::as_str),
                pod: annotations.get(ANNOTATION_UNHEALTHY_POD).map(String::as_str),
            };
            let set = |since: Option<String>, pod: Option<&str>| json!({"metadata": {"annotations": {ANNOTATION_UNHEALTHY_SINCE: since, ANNOTATION_UNHEALTHY_POD: pod}}});
            match failover.judge(unhealthy.is_some(), leaderless, record, uid, now) {
                Verdict::Keep => {}
                Verdict::Clear => {
                    self.pvcs().merge(&pvc.name_any(), &set(None, None)).await?;
                }
                Verdict::Start => {
                    self.pvcs().merge(&pvc.name_any(), &set(Some(now.to_string()), Some(uid.unwrap_or("")))).await?;
                }
                Verdict::Lost(since) => {
                    let Some(v) = views.iter_mut().find(|v| v.id == id) else { continue };
                    v.failed = true;
                    let selected = annotations.get(ANNOTATION_SELECTED_NODE).map(String::as_str);
                    v.returned = pod.is_none() && failure::volume_node_ready(selected, &self.nodes, &v.zone);
                    let why = unhealthy.unwrap_or_default();
                    self.lost.insert(id, format!("{why} since {since}"));
                }
            }
        }
        Ok(())
    }

    fn pods(&self) -> Objects<Pod> {
        Objects::namespaced(self.ctx.client.clone(), &self.rs.namespace)
    }

    fn pvcs(&self) -> Objects<PersistentVolumeClaim> {
        Objects::namespaced(self.ctx.client.clone(), &self.rs.namespace)
    }
}

#[async_trait]
impl Provisioner for PodProvisioner<'_> {
    type Error = Error;

    fn replica_set(&self) -> &str {
        &self.rs.name
    }

    async fn members(&mut self) -> Result<Vec<MemberView>, Error> {
        let selector = ListParams::default().labels(&format!("{}={}", objects::LABEL_REPLICA_SET, self.rs.name));
        let member_of = |labels: &BTreeMap<String, String>| -> Option<(u64, String)> {
            let id = labels.get(objects::LABEL_MEMBER)?.parse().ok()?;
            Some((id, labels.get(objects::LABEL_ZONE).cloned().unwrap_or_default()))
        };
        let want_hash = objects::member_spec_hash(&self.ctx.settings, self.rs);
        let mut views: BTreeMap<u64, MemberView> = BTreeMap::new();
        let pvcs = self.pvcs();
        let mut live = Vec::new();
        for pvc in pvcs.list(&selector).await? {
            if pvc.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if !pvc.owner_references().is_empty() {
                // Made by an older operator, owned by the pool or instance: a volume must not
                // be garbage-collected with either (see `objects::member_pvc`).
                pvcs.merge(&pvc.name_any(), &json!({"metadata": {"ownerReferences": null}})).await?;
            }
            if let Some((id, zone)) = member_of(pvc.labels()) {
                let view = MemberView {
                    id,
                    zone,
                    running: false,
                    has_data: true,
                    ready: false,
                    outdated: false,
                    failed: false,
                    returned: false,
                };
                views.insert(id, view);
            }
            live.push(pvc);
        }
        self.volumes = live;
        self.pods.clear();
        for pod in self.pods().list(&selector).await? {
            let Some((id, zone)) = member_of(pod.labels()) else { continue };
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            let running = pod.metadata.deletion_timestamp.is_none() && phase != "Failed" && phase != "Succeeded";
            let v = views.entry(id).or_insert(MemberView {
                id,
                zone,
                running: false,
                has_data: false,
                ready: false,
                outdated: false,
                failed: false,
                returned: false,
            });
            v.running = running;
            v.ready = running && pod_ready(&pod);
            v.outdated = pod.annotations().get(objects::ANNOTATION_SPEC_HASH) != Some(&want_hash);
            self.pods.insert(id, pod);
        }
        self.nodes = self.ctx.nodes.state().iter().map(|n| (n.name_any(), Node::clone(n))).collect();
        Ok(views.into_values().collect())
    }

    async fn judge(&mut self, members: &mut [MemberView], view: &RaftView) -> Result<(), Error> {
        self.track_failures(members, view).await
    }

    fn admin_addr(&self, id: u64) -> Option<String> {
        self.pods.get(&id).and_then(pod_admin)
    }

    fn member_info(&self, id: u64, zone: &str) -> Option<MemberInfo> {
        let host = objects::member_host(self.rs, id);
        Some(MemberInfo {
            id,
            admin_addr: format!("http://{host}:{}", objects::ADMIN_PORT),
            data_addr: format!("http://{host}:{}", objects::DATA_PORT),
            raft_addr: format!("http://{host}:{}", objects::RAFT_PORT),
            zone: zone.to_string(),
            voter: true,
        })
    }

    fn data_addr(&self, id: u64, _zone: &str) -> Option<String> {
        Some(format!("http://{}:{}", objects::member_host(self.rs, id), objects::DATA_PORT))
    }

    async fn create(&mut self, id: u64, zone: &str) -> Result<(), Error> {
        let pvc = objects::member_pvc(self.rs, id, zone);
        self.pvcs().apply(&objects::member_pvc_name(&self.rs.name, id), &pvc).await?;
        let pod = objects::member_pod(&self.ctx.settings, self.rs, id, zone);
        self.pods().apply(&objects::member_pod_name(&self.rs.name, id), &pod).await?;
        Ok(())
    }

    async fn start(&mut self, id: u64, zone: &str) -> Result<(), Error> {
        // The Pod is gone (or failed) but its volume is there: recreate it on the volume.
        let pods = self.pods();
        if self.pods.contains_key(&id) {
            // A failed Pod: delete it, and create the new one once it is gone (a later pass,
            // see `start_blocked`); creating it now would get 409, the name still taken.
            pods.delete(&objects::member_pod_name(&self.rs.name, id)).await?;
            return Ok(());
        }
        pods.create(&objects::member_pod(&self.ctx.settings, self.rs, id, zone)).await?;
        Ok(())
    }

    /// A member's new Pod takes its old one's name, which the API server keeps until the
    /// old Pod is gone: while it is Terminating (a drain, an eviction, a lost node) `Start`
    /// waits, instead of a create answered 409 at every pass.
    /// No node of the zone is Ready and schedulable: a member created there would stay
    /// Pending (and a replacement would wait on it rather than on a usable node).
    fn zone_down(&self, zone: &str) -> bool {
        !failure::zone_schedulable(self.nodes.values(), zone)
    }

    fn start_blocked(&self, id: u64) -> Option<String> {
        let pod = self.pods.get(&id)?;
        pod.metadata
            .deletion_timestamp
            .is_some()
            .then(|| format!("waiting for Pod {} to terminate", objects::member_pod_name(&self.rs.name, id)))
    }

    /// A removed member's Pod terminating on a Ready node within its grace period: its
    /// volume waits for it (the next pass force-deletes it if it overruns).
    fn delete_blocked(&self, id: u64) -> Option<String> {
        let pod = self.pods.get(&id)?;
        let now = self.ctx.failover.clock.now();
        (pod.metadata.deletion_timestamp.is_some() && !failure::force_delete(pod, &self.nodes, now))
            .then(|| format!("waiting for Pod {} to terminate", objects::member_pod_name(&self.rs.name, id)))
    }

    async fn restart(&mut self, id: u64) -> Result<(), Error> {
        self.pods().delete(&objects::member_pod_name(&self.rs.name, id)).await
    }

    async fn delete(&mut self, id: u64) -> Result<(), Error> {
        // The member is out of Raft already. Its Pod first, decided from the Pod itself: at
        // once if its node is lost (no kubelet will confirm) or it overran its grace
        // period, else gracefully. Its volume only once the Pod is gone (this pass, after a
        // forced delete; else a later one): a volume deleted under a Pod stays Terminating,
        // and the member would look like one whose data is gone while its Pod lingers.
        let pod = objects::member_pod_name(&self.rs.name, id);
        if let Some(p) = self.pods.get(&id) {
            if !failure::force_delete(p, &self.nodes, self.ctx.failover.clock.now()) {
                if p.metadata.deletion_timestamp.is_none() {
                    already_gone(self.pods().delete(&pod).await)?;
                }
                return Ok(());
            }
            already_gone(self.pods().delete_now(&pod).await)?;
        }
        let has_volume = self.volumes.iter().any(|v| v.labels().get(objects::LABEL_MEMBER) == Some(&id.to_string()));
        if has_volume {
            already_gone(self.pvcs().delete(&objects::member_pvc_name(&self.rs.name, id)).await)?;
        }
        Ok(())
    }

    async fn bootstrapped(&mut self, _voters: &[u64]) -> Result<(), Error> {
        let bootstrapped_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
        let record = ReplicaSetRecord { pool: self.rs.pool.clone(), zones: self.zones.clone(), bootstrapped_ms };
        self.ctx.store.record_replica_set(&self.rs.namespace, &self.rs.name, &record).await?;
        Ok(())
    }
}

/// A delete answered 404 did what it was asked: the object is gone.
pub(super) fn already_gone(r: Result<(), Error>) -> Result<(), Error> {
    match r {
        Err(Error::Call(c)) if c.status().is_some_and(|s| s.code == 404) => Ok(()),
        other => other,
    }
}

pub(super) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A member Pod's admin API, at its IP.
pub(super) fn pod_admin(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_ref()?;
    Some(format!("http://{ip}:{}", objects::ADMIN_PORT))
}

/// The driver's events as Kubernetes Events on one object.
pub struct ObjectEvents<'a> {
    pub recorder: &'a Recorder,
    pub object: k8s_openapi::api::core::v1::ObjectReference,
}

#[async_trait]
impl Events for ObjectEvents<'_> {
    async fn record(&self, severity: Severity, reason: &str, action: &str, note: &str) {
        let type_ = match severity {
            Severity::Normal => EventType::Normal,
            Severity::Warning => EventType::Warning,
        };
        let ev =
            KubeEvent { type_, reason: reason.into(), note: Some(note.into()), action: action.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&ev, &self.object).await {
            warn!(error = %e, reason, "failed to publish an event");
        }
    }
}
