//! DatabaseInstance reconciler scenarios against the fake API (one per behaviour).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::json;

use super::fixtures::*;
use super::instance::{FINALIZER, error_policy};
use super::objects::Settings;

fn pod_zones(w: &World) -> Vec<(String, String)> {
    w.api
        .list(PODS)
        .iter()
        .map(|p| {
            let name = p["metadata"]["name"].as_str().unwrap().to_string();
            let zone = p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0]
                .as_str()
                .unwrap()
                .to_string();
            (name, zone)
        })
        .collect()
}

async fn ready_instance() -> World {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 10).await;
    w
}

#[tokio::test]
async fn a_new_instance_gets_the_finalizer_before_anything_else() {
    let w = World::new();
    w.add_instance("shop", json!({}), false);
    let action = w.reconcile("shop").await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(w.api.get(INSTANCES, "shop").unwrap()["metadata"]["finalizers"], json!([FINALIZER]));
    let writes: Vec<String> =
        w.api.calls().into_iter().filter(|c| c.method != "GET").map(|c| format!("{} {}", c.method, c.path)).collect();
    assert_eq!(writes, vec![format!("PATCH {INSTANCES}/shop")], "nothing else before the finalizer is in place");
}

#[tokio::test]
async fn a_new_instance_gets_three_members_in_three_zones_then_bootstraps_and_is_ready() {
    let w = ready_instance().await;
    assert_eq!(
        pod_zones(&w),
        vec![
            ("default-rs0-m1".to_string(), "zone-a".to_string()),
            ("default-rs0-m2".into(), "zone-b".into()),
            ("default-rs0-m3".into(), "zone-c".into())
        ]
    );
    assert_eq!(w.api.list(PVCS).len(), 3);
    let svc = w.api.get(SERVICES, "default-rs0").unwrap();
    assert_eq!(svc["metadata"]["annotations"]["nimbus.io/zones"], "zone-a,zone-b,zone-c");
    assert!(w.api.get(SERVICES, "nimbus-gateway").is_some());
    assert!(w.api.get("/apis/apps/v1/namespaces/apps/deployments", "nimbus-gateway").is_some());
    assert!(w.api.get("/apis/policy/v1/namespaces/apps/poddisruptionbudgets", "default-rs0").is_some());
    assert_eq!(w.raft_log(), vec!["init [1, 2, 3]"]);
    // The namespace's own cluster secret, its NetworkPolicies, and datanode calls made with
    // that namespace's secret.
    let internal = w.api.get(SECRETS, "nimbus-internal").unwrap();
    assert!(internal["stringData"]["cluster-secret"].is_string());
    let policies = "/apis/networking.k8s.io/v1/namespaces/apps/networkpolicies";
    assert!(w.api.get(policies, "nimbus-datanodes").is_some() && w.api.get(policies, "nimbus-gateways").is_some());
    assert_eq!(w.datanodes.0.lock().unwrap().namespaces.iter().collect::<Vec<_>>(), vec!["apps"]);

    // Route, users and limits in etcd; tokens in the credentials Secret, hashes in etcd.
    let etcd = w.store.0.lock().unwrap().clone();
    assert_eq!(etcd["/nimbus/routes/shop"]["replicaSet"], "default-rs0");
    assert_eq!(etcd["/nimbus/routes/shop"]["members"].as_array().unwrap().len(), 3);
    assert_eq!(etcd["/nimbus/users/shop/app"]["role"], "readWrite");
    assert_eq!(etcd["/nimbus/users/shop/reader"]["role"], "read");
    assert_eq!(etcd["/nimbus/limits/shop"]["qps"], 2000);
    let secret = w.api.get(SECRETS, "shop-credentials").unwrap();
    let token = &secret_value(&secret, "token");
    assert!(token.starts_with("nmb_shop.app."));
    assert!(!etcd["/nimbus/users/shop/app"].to_string().contains(token.rsplit('.').next().unwrap()));
    assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], "shop");

    let status = &w.api.get(INSTANCES, "shop").unwrap()["status"];
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["placement"]["leader"], "default-rs0-m1");
    assert_eq!(status["zonesSummary"], "zone-a,zone-b,zone-c");
    assert_eq!(status["endpoint"], "http://nimbus-gateway.apps.svc:8080");
    let cond = |t: &str| status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap().clone();
    assert_eq!(cond("Ready")["status"], "True");
    assert_eq!(cond("Degraded")["status"], "False");
    assert_eq!(cond("Progressing")["status"], "False");
    let events: Vec<String> = w
        .api
        .list("/apis/events.k8s.io/v1/namespaces/apps/events")
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(events.contains(&"Bootstrapped".to_string()) && events.contains(&"Ready".to_string()), "{events:?}");
}

fn secret_value(secret: &serde_json::Value, key: &str) -> String {
    use base64::Engine as _;
    let b64 = secret["data"][key].as_str().unwrap_or_else(|| panic!("no {key} in {secret}"));
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
}

#[tokio::test]
async fn tokens_survive_reconciles_unchanged() {
    let w = ready_instance().await;
    let before = w.api.get(SECRETS, "shop-credentials").unwrap()["data"].clone();
    w.reconcile("shop").await.unwrap();
    assert_eq!(w.api.get(SECRETS, "shop-credentials").unwrap()["data"], before);
}

#[tokio::test]
async fn a_member_whose_volume_is_lost_is_replaced_in_its_zone_one_membership_step_at_a_time() {
    let w = ready_instance().await;
    // Member 2 (a follower, zone-b) loses its Pod and its volume.
    w.api.remove(PODS, "default-rs0-m2");
    w.api.remove(PVCS, "default-rs0-m2-data");
    w.reconcile_until_phase("shop", "Ready", 10).await;
    assert_eq!(w.raft_log(), vec!["init [1, 2, 3]", "add_learner 4", "change_voters [1, 2, 3, 4]", "remove_member 2"]);
    let zones = pod_zones(&w);
    assert!(zones.contains(&("default-rs0-m4".to_string(), "zone-b".to_string())), "{zones:?}");
    assert_eq!(zones.len(), 3);
    let route = w.store.0.lock().unwrap()["/nimbus/routes/shop"].clone();
    let ids: Vec<u64> = route["members"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 3, 4]);
}

#[tokio::test]
async fn a_member_pod_lost_with_its_volume_is_recreated_on_the_volume() {
    let w = ready_instance().await;
    w.api.remove(PODS, "default-rs0-m3");
    w.reconcile("shop").await.unwrap();
    assert!(w.api.get(PODS, "default-rs0-m3").is_some(), "the Pod is back under its name");
    w.reconcile_until_phase("shop", "Ready", 5).await;
    assert_eq!(w.raft_log(), vec!["init [1, 2, 3]"], "no membership change for a restart");
}

#[tokio::test]
async fn a_member_pod_still_terminating_is_waited_for_without_a_conflict_then_recreated_once_gone() {
    let w = ready_instance().await;
    // Member 3's node is drained: its Pod is deleted, and stays Terminating while the
    // kubelet stops the datanode (which hands its leadership over first).
    w.api.delete(PODS, "default-rs0-m3");
    let calls_before = w.api.calls().len();
    for _ in 0..3 {
        // Passes before the kubelet is done (`World::reconcile` would run it).
        w.reconcile_replica_set("default-rs0").await.expect("no error (no 409) while the Pod terminates");
        super::instance::reconcile(std::sync::Arc::new(w.instance("shop")), w.ctx.clone()).await.unwrap();
        let pod = w.api.get(PODS, "default-rs0-m3").unwrap();
        assert_eq!(pod["metadata"]["deletionTimestamp"], DELETION_TIME, "the old Pod is left to terminate");
    }
    let pod_writes: Vec<String> = w.api.calls()[calls_before..]
        .iter()
        .filter(|c| c.method != "GET" && c.path.contains("/pods"))
        .map(|c| format!("{} {}", c.method, c.path))
        .collect();
    assert_eq!(pod_writes, Vec::<String>::new(), "no Pod created (409) or deleted again while it terminates");
    let status = &w.api.get(INSTANCES, "shop").unwrap()["status"];
    let progressing = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Progressing").unwrap();
    assert!(
        progressing["message"].as_str().unwrap().contains("waiting for Pod default-rs0-m3 to terminate"),
        "{progressing}"
    );

    // The kubelet is done: the Pod is created again, under its name, on its volume.
    w.api.kubelet(NS);
    assert!(w.api.get(PODS, "default-rs0-m3").is_none());
    w.reconcile("shop").await.unwrap();
    let pod = w.api.get(PODS, "default-rs0-m3").expect("the Pod is back under its name");
    assert!(pod["metadata"]["deletionTimestamp"].is_null());
    w.reconcile_until_phase("shop", "Ready", 5).await;
    assert_eq!(w.raft_log(), vec!["init [1, 2, 3]"], "no membership change for a restart");
}

#[tokio::test]
async fn a_failed_member_pod_is_deleted_then_created_again_once_gone() {
    let w = ready_instance().await;
    let mut pod = w.api.get(PODS, "default-rs0-m2").unwrap();
    pod["status"] = json!({"phase": "Failed", "podIP": "10.1.0.2"});
    w.api.put(PODS, pod);
    // Deleted (and gone once the kubelet has run), not created again under a name still taken.
    w.reconcile("shop").await.unwrap();
    assert!(w.api.get(PODS, "default-rs0-m2").is_none());
    w.reconcile("shop").await.unwrap();
    assert_eq!(w.api.get(PODS, "default-rs0-m2").unwrap()["status"]["phase"], "Running");
    w.reconcile_until_phase("shop", "Ready", 5).await;
    assert_eq!(w.raft_log(), vec!["init [1, 2, 3]"]);
}

#[tokio::test]
async fn a_changed_datanode_image_rolls_followers_first_and_the_leader_last() {
    let w = ready_instance().await;
    let w = w.with_settings(Settings { datanode_image: "nimbus-datanode:new".into(), ..Settings::default() });
    let mut deleted = Vec::new();
    for _ in 0..20 {
        let before: Vec<String> =
            w.api.list(PODS).iter().map(|p| p["metadata"]["name"].as_str().unwrap().into()).collect();
        w.reconcile("shop").await.unwrap();
        let after: Vec<String> =
            w.api.list(PODS).iter().map(|p| p["metadata"]["name"].as_str().unwrap().into()).collect();
        deleted.extend(before.iter().filter(|n| !after.contains(n)).cloned());
        let all_new = w.api.list(PODS).iter().all(|p| p["spec"]["containers"][0]["image"] == "nimbus-datanode:new");
        if all_new && w.api.list(PODS).len() == 3 && w.api.get(INSTANCES, "shop").unwrap()["status"]["phase"] == "Ready"
        {
            break;
        }
    }
    assert_eq!(deleted, vec!["default-rs0-m2", "default-rs0-m3", "default-rs0-m1"]);
    assert!(w.raft_log().contains(&"transfer_leader 2".to_string()), "{:?}", w.raft_log());
    let log = w.raft_log();
    assert_eq!(log.last().unwrap(), "transfer_leader 2");
}

#[tokio::test]
async fn deleting_an_instance_drops_its_data_route_and_users_then_releases_the_finalizer() {
    let w = ready_instance().await;
    w.api.delete(INSTANCES, "shop");
    assert_eq!(w.api.get(INSTANCES, "shop").unwrap()["metadata"]["deletionTimestamp"], DELETION_TIME, "Terminating");
    let epoch = w.store.0.lock().unwrap()[&nimbus_api::etcd::route_key("shop")]["epoch"].as_u64().unwrap();
    w.reconcile("shop").await.unwrap();
    // Fenced above the route's epoch first (a restore's `Publish` carrying the old one is
    // refused from then on), then the database and its restore and verification copies.
    let via = format!("via http://10.1.0.1:{}", super::objects::ADMIN_PORT);
    let expected: Vec<String> = [
        format!("fence shop at {} {via}", epoch + 1),
        format!("drop_database shop {via}"),
        format!("drop_database shop~restore {via}"),
        format!("drop_database shop~verify {via}"),
    ]
    .into();
    let log: Vec<String> =
        w.raft_log().into_iter().filter(|l| l.starts_with("fence") || l.starts_with("drop_database")).collect();
    assert_eq!(log, expected);
    assert!(w.store.0.lock().unwrap().keys().all(|k| !k.contains("/shop")), "etcd keys of shop remain");
    assert!(w.api.get(INSTANCES, "shop").is_none(), "gone once its finalizer is released");
    // The shared replica set stays for the other databases.
    assert_eq!(w.api.list(PODS).len(), 3);
}

#[tokio::test]
async fn a_conflict_is_requeued_soon_and_other_api_errors_with_backoff() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    // Placed: the replica set's Service exists; its reconciler makes the first member.
    w.reconcile("shop").await.unwrap();
    w.api.fail_next("PATCH", "persistentvolumeclaims", 409);
    let err = w.reconcile("shop").await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    let dbi = std::sync::Arc::new(w.instance("shop"));
    assert_eq!(error_policy(dbi.clone(), &err, w.ctx.clone()), Action::requeue(Duration::from_secs(1)));
    // Other errors: 10 s, then twice as long while they last, each with up to a fifth of jitter.
    let after = |a: Action| {
        format!("{a:?}").split("Some(").nth(1).and_then(|d| d.strip_suffix("s) }")?.parse::<f64>().ok()).unwrap()
    };
    for expected in [10.0, 20.0] {
        w.api.fail_next("GET", "services/default-rs0", 500);
        let err = w.reconcile("shop").await.unwrap_err();
        assert!(!err.is_conflict());
        let secs = after(error_policy(dbi.clone(), &err, w.ctx.clone()));
        assert!((expected..=expected * 1.2).contains(&secs), "{secs} s after an error, expected {expected} s");
    }
    // And the next reconcile proceeds.
    w.reconcile_until_phase("shop", "Ready", 10).await;
}

#[tokio::test]
async fn an_instance_that_cannot_be_placed_reports_why() {
    let w = World::new();
    w.add_instance("shop", json!({"zones": ["zone-a", "zone-b", "zone-x"]}), true);
    w.reconcile("shop").await.unwrap();
    let status = &w.api.get(INSTANCES, "shop").unwrap()["status"];
    assert_eq!(status["phase"], "Failed");
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["reason"], "PlacementFailed");
    assert!(ready["message"].as_str().unwrap().contains("zone-x"));
    assert!(w.api.list(PODS).is_empty());
}

#[tokio::test]
async fn a_dedicated_instance_gets_its_own_replica_set_owned_by_it() {
    let w = World::new();
    w.add_instance("orders", json!({"tier": "dedicated", "replicas": 5}), true);
    w.reconcile_until_phase("orders", "Ready", 12).await;
    let pods = w.api.list(PODS);
    assert_eq!(pods.len(), 5);
    for p in &pods {
        assert!(p["metadata"]["name"].as_str().unwrap().starts_with("default-orders-m"));
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "DatabaseInstance");
    }
    let zones: Vec<String> = pod_zones(&w).into_iter().map(|(_, z)| z).collect();
    assert_eq!(zones, vec!["zone-a", "zone-b", "zone-c", "zone-a", "zone-b"]);
}

fn ready_condition(w: &World, name: &str) -> serde_json::Value {
    let status = w.api.get(INSTANCES, name).unwrap()["status"].clone();
    status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone()
}

#[tokio::test]
async fn member_volumes_have_no_owner_so_deleting_the_pool_keeps_them() {
    let w = ready_instance().await;
    let pvcs = w.api.list(PVCS);
    assert_eq!(pvcs.len(), 3);
    for pvc in &pvcs {
        let owners = pvc["metadata"]["ownerReferences"].as_array().map_or(0, Vec::len);
        assert_eq!(owners, 0, "a volume owned by something deletable: {pvc}");
    }
    // A volume made by an older operator, still owned by the pool, loses its owner.
    let mut old = pvcs[0].clone();
    old["metadata"]["ownerReferences"] = json!([{"apiVersion": "nimbus.io/v1alpha1", "kind": "ResourcePool",
        "name": "default", "uid": "uid-pool", "controller": true}]);
    w.api.put(PVCS, old.clone());
    w.reconcile("shop").await.unwrap();
    let name = old["metadata"]["name"].as_str().unwrap();
    let owners = w.api.get(PVCS, name).unwrap()["metadata"]["ownerReferences"].as_array().map_or(0, Vec::len);
    assert_eq!(owners, 0);
}

#[tokio::test]
async fn a_bootstrapped_replica_set_whose_volumes_were_lost_is_reported_never_bootstrapped_again() {
    let w = ready_instance().await;
    assert!(w.store.0.lock().unwrap().contains_key("/nimbus/replicasets/apps/default-rs0"), "bootstrap recorded");
    // The pool was deleted and its objects collected, volumes included (as before the
    // fix): the Service with its annotation is gone, and the members start empty.
    // The Service made again without its annotation (the etcd record is what counts).
    let mut svc = w.api.get(SERVICES, "default-rs0").unwrap();
    svc["metadata"]["annotations"].as_object_mut().unwrap().remove("nimbus.io/bootstrapped");
    w.api.put(SERVICES, svc);
    for id in 1..=3 {
        w.api.remove(PODS, &format!("default-rs0-m{id}"));
        w.api.remove(PVCS, &format!("default-rs0-m{id}-data"));
    }
    {
        let mut m = w.datanodes.0.lock().unwrap();
        m.initialized = false;
        m.members.clear();
        m.voters.clear();
    }
    for _ in 0..8 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(w.raft_log(), vec!["init [1, 2, 3]"], "initialised again empty");
    let ready = ready_condition(&w, "shop");
    assert_eq!(ready["reason"], "VolumesLost", "{ready}");
    assert!(ready["message"].as_str().unwrap().contains("will not initialise it again"), "{ready}");
}

#[tokio::test]
async fn a_database_name_is_one_tenants_across_namespaces_and_instances() {
    let w = ready_instance().await;
    // Another instance asks for the same database name.
    w.add_instance("shop2", json!({"database": "shop"}), true);
    w.reconcile("shop2").await.unwrap();
    let ready = ready_condition(&w, "shop2");
    assert_eq!(ready["reason"], "DatabaseNameTaken");
    assert!(ready["message"].as_str().unwrap().contains("apps/shop"), "{ready}");
    assert_eq!(w.api.get(INSTANCES, "shop2").unwrap()["status"]["phase"], "Failed");
    // Deleting the refused instance leaves the owner's route, users and data alone.
    let before = w.store.0.lock().unwrap().clone();
    w.api.delete(INSTANCES, "shop2");
    w.reconcile("shop2").await.unwrap();
    assert_eq!(*w.store.0.lock().unwrap(), before);
    assert!(!w.raft_log().iter().any(|l| l.starts_with("drop_database")), "{:?}", w.raft_log());
    assert!(w.api.get(INSTANCES, "shop2").is_none(), "its finalizer is released");
    // The owner's deletion releases the name.
    w.api.delete(INSTANCES, "shop");
    w.reconcile("shop").await.unwrap();
    assert!(!w.store.0.lock().unwrap().contains_key("/nimbus/tenants/shop"));
}

#[tokio::test]
async fn deleting_a_dedicated_instance_deletes_its_volumes_and_a_shared_ones_keeps_them() {
    let w = World::new();
    w.add_instance("orders", json!({"tier": "dedicated"}), true);
    w.reconcile_until_phase("orders", "Ready", 12).await;
    assert_eq!(w.api.list(PVCS).len(), 3);
    w.api.delete(INSTANCES, "orders");
    w.reconcile("orders").await.unwrap();
    // Deleted while its Pods used them: Terminating until garbage collection takes the Pods.
    assert!(w.api.list(PVCS).iter().all(|v| !v["metadata"]["deletionTimestamp"].is_null()));
    w.collect_garbage();
    assert!(w.api.list(PVCS).is_empty(), "{:?}", w.api.list(PVCS));
    assert!(!w.store.0.lock().unwrap().keys().any(|k| k.starts_with("/nimbus/replicasets/")));

    let w = ready_instance().await;
    w.api.delete(INSTANCES, "shop");
    w.reconcile("shop").await.unwrap();
    assert_eq!(w.api.list(PVCS).len(), 3, "a shared replica set's volumes stay");
}

#[tokio::test]
async fn a_tier_changed_past_the_crds_rules_never_re_owns_a_shared_replica_set() {
    let w = ready_instance().await;
    // As an API server with an older CRD (no immutability rule) would let through.
    let mut obj = w.api.get(INSTANCES, "shop").unwrap();
    obj["spec"]["tier"] = json!("dedicated");
    obj["spec"]["resources"] = json!({"requests": {"cpu": "4"}});
    w.api.put(INSTANCES, obj);
    let pods_before = w.api.list(PODS);
    for _ in 0..5 {
        w.reconcile("shop").await.unwrap();
    }
    let svc = w.api.get(SERVICES, "default-rs0").unwrap();
    let owned_by_instance = svc["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|os| os.iter().any(|o| o["kind"] == "DatabaseInstance"));
    assert!(!owned_by_instance, "{svc}");
    let uids = |ps: &[serde_json::Value]| ps.iter().map(|p| p["metadata"]["uid"].clone()).collect::<Vec<_>>();
    assert_eq!(uids(&w.api.list(PODS)), uids(&pods_before), "members were restarted");
}

#[tokio::test]
async fn a_user_removed_from_the_spec_is_revoked_at_once() {
    let w = World::new();
    w.add_instance("shop", json!({"users": [{"name": "app"}, {"name": "batch"}]}), true);
    w.reconcile_until_phase("shop", "Ready", 10).await;
    assert!(w.store.0.lock().unwrap().contains_key("/nimbus/users/shop/batch"));
    let mut obj = w.api.get(INSTANCES, "shop").unwrap();
    obj["spec"]["users"] = json!([{"name": "app"}]);
    w.api.put(INSTANCES, obj);
    w.reconcile("shop").await.unwrap();
    let keys: Vec<String> = w.store.0.lock().unwrap().keys().filter(|k| k.contains("/users/")).cloned().collect();
    assert_eq!(keys, vec!["/nimbus/users/shop/app"]);
    let secret = w.api.get("/api/v1/namespaces/apps/secrets", "shop-credentials").unwrap();
    assert!(secret["data"].get("token-batch").is_none() && secret.get("stringData").is_none(), "{secret}");
}

#[tokio::test]
async fn a_call_the_rbac_refuses_is_reported_as_a_condition_and_an_event() {
    // A chart that grants services no `create`: the first server-side apply of a Service
    // creates it, so it is refused, and the instance says so.
    let w = World::new();
    w.api.set_rbac(Some(Rbac::chart().without("", "services", "create")));
    w.add_instance("shop", json!({}), true);
    let err = w.reconcile("shop").await.unwrap_err();
    let expected = "failed to apply Service apps/default-rs0: the Kubernetes API answered 403 Forbidden (services \
                    \"default-rs0\" is forbidden); the operator's RBAC must grant patch and create on services";
    assert_eq!(err.api_failure().as_deref(), Some(expected));
    let status = &w.api.get(INSTANCES, "shop").unwrap()["status"];
    let cond = |t: &str| status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap().clone();
    assert_eq!(cond("Ready")["status"], "False");
    assert_eq!(cond("Ready")["reason"], "KubernetesApiError");
    assert_eq!(cond("Ready")["message"], expected);
    assert_eq!(cond("Degraded")["reason"], "KubernetesApiError");
    let events = w.api.list("/apis/events.k8s.io/v1/namespaces/apps/events");
    let warning = events.iter().find(|e| e["reason"] == "KubernetesApiError").expect("a Warning event");
    assert_eq!(warning["type"], "Warning");
    assert_eq!(warning["note"], expected);
    assert_eq!(warning["regarding"]["name"], "shop");

    // Granted again, the next reconcile proceeds and the conditions say so.
    w.api.set_rbac(Some(Rbac::chart()));
    w.reconcile_until_phase("shop", "Ready", 10).await;
    let status = &w.api.get(INSTANCES, "shop").unwrap()["status"];
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["reason"], "Serving");
}

#[tokio::test]
async fn a_refused_finalizer_is_reported_too() {
    let w = World::new();
    w.api.set_rbac(Some(Rbac::chart().without("nimbus.io", "databaseinstances", "patch")));
    w.add_instance("shop", json!({}), false);
    w.reconcile("shop").await.unwrap_err();
    let status = &w.api.get(INSTANCES, "shop").unwrap()["status"];
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["reason"], "KubernetesApiError");
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.starts_with("failed to add the finalizer nimbus.io/cleanup: the Kubernetes API answered 403"),
        "{message}"
    );
    assert!(message.ends_with("must grant patch on databaseinstances.nimbus.io"), "{message}");
}

/// Calls the scenarios here cannot make, with who makes them: the controllers' watches
/// (`run.rs`), leader election (kube-lease-manager), etcd-setup's record (`main.rs`), and
/// the Recorder's patch of a repeated Event's count.
const NOT_EXERCISED: &[(&str, &str, &str)] = &[
    ("", "configmaps", "create"),
    ("", "configmaps", "patch"),
    ("", "nodes", "watch"),
    ("", "pods", "watch"),
    ("", "services", "watch"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "patch"),
    ("nimbus.io", "databaseinstances", "watch"),
    ("nimbus.io", "databaserestores", "watch"),
    ("nimbus.io", "resourcepools", "list"),
    ("nimbus.io", "resourcepools", "watch"),
];

#[tokio::test]
async fn the_chart_grants_what_a_whole_lifecycle_uses_and_nothing_more() {
    let w = World::new();
    // A real pool: shared replica sets' objects are owned by it.
    let pools = "/apis/nimbus.io/v1alpha1/namespaces/apps/resourcepools";
    w.api.put(
        pools,
        json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "ResourcePool",
        "metadata": {"name": "default", "namespace": NS, "uid": "uid-pool", "generation": 1}, "spec": {}}),
    );
    // Create, with a user whose token comes from a Secret of theirs.
    w.api.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "shop-app", "namespace": NS}, "data": {"token": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}}),
    );
    w.add_instance(
        "shop",
        json!({"users": [{"name": "app", "role": "readWrite",
        "secretRef": {"name": "shop-app", "key": "token"}}]}),
        false,
    );
    w.reconcile_until_phase("shop", "Ready", 12).await;
    // A dedicated instance (owned by the instance), a lost volume, a rolling restart.
    w.add_instance("orders", json!({"tier": "dedicated"}), true);
    w.reconcile_until_phase("orders", "Ready", 12).await;
    // Member 2's volume is lost under its running Pod: replaced, then deprovisioned.
    w.api.remove(PVCS, "default-rs0-m2-data");
    w.reconcile_until_phase("shop", "Ready", 10).await;
    assert!(w.api.get(PODS, "default-rs0-m2").is_none(), "{:?}", w.raft_log());
    let w = w.with_settings(Settings { datanode_image: "nimbus-datanode:new".into(), ..Settings::default() });
    for _ in 0..20 {
        w.reconcile("shop").await.unwrap();
    }
    // The pool reports; the instances are deleted.
    let pool = serde_json::from_value(w.api.get(pools, "default").unwrap()).unwrap();
    crate::k8s::pool::reconcile(std::sync::Arc::new(pool), w.ctx.clone()).await.unwrap();
    for name in ["shop", "orders"] {
        w.api.delete(INSTANCES, name);
        w.reconcile(name).await.unwrap();
    }

    // And a move out of a dedicated pool, whose emptied replica set the operator removes.
    let moved = super::retire_tests::moved_out_of_a_dedicated_pool().await;
    let mut used: std::collections::BTreeSet<_> = w.api.used().union(&moved.api.used()).cloned().collect();
    // Restores: their status, Events, a restore into a new instance.
    used.extend(super::restore_tests::restore_lifecycle_used().await);
    let granted = Rbac::chart().grants();
    let unused: Vec<_> = granted.difference(&used).collect();
    let expected: Vec<(String, String, String)> =
        NOT_EXERCISED.iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect();
    assert_eq!(unused, expected.iter().collect::<Vec<_>>(), "granted but never used");
}

#[tokio::test]
async fn the_status_speaks_in_sentences_and_says_what_is_not_active_yet() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    let mut messages = Vec::new();
    for _ in 0..10 {
        w.reconcile("shop").await.unwrap();
        let status = w.api.get(INSTANCES, "shop").unwrap()["status"].clone();
        for c in status["conditions"].as_array().into_iter().flatten() {
            messages.push(c["message"].as_str().unwrap().to_string());
        }
        if status["phase"] == "Ready" {
            break;
        }
    }
    // Rust debug text looks like `Create { id: 1, zone: "zone-a" }`.
    for m in &messages {
        assert!(!m.contains('{') && !m.contains('"'), "not a sentence: {m}");
    }
    assert!(messages.iter().any(|m| m.contains("creating member 1 in zone zone-a")), "{messages:?}");
    let status = w.api.get(INSTANCES, "shop").unwrap()["status"].clone();
    assert_eq!(status["readyMembers"], "3/3");
    // Backups and automatic indexing are on by default in the spec, and not done yet.
    assert_eq!(status["notYetActive"], json!(["backup", "indexing"]));
    // Turned off, the list empties (the status is a merge patch: `[]` must be written).
    let mut obj = w.api.get(INSTANCES, "shop").unwrap();
    obj["spec"]["backup"] = json!({"enabled": false});
    obj["spec"]["indexing"] = json!({"automatic": false});
    w.api.put(INSTANCES, obj);
    w.reconcile("shop").await.unwrap();
    assert_eq!(w.api.get(INSTANCES, "shop").unwrap()["status"]["notYetActive"], json!([]));
}

#[tokio::test]
async fn the_namespaces_gateway_is_owned_by_its_instances_and_goes_with_the_last() {
    let w = ready_instance().await;
    w.add_instance("cart", json!({}), true);
    w.reconcile_until_phase("cart", "Ready", 10).await;
    let owners = |w: &World, path: &str| -> Vec<String> {
        let obj = w.api.get(path, "nimbus-gateway").unwrap();
        let refs = obj["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
        assert!(refs.iter().all(|o| o["controller"] != true), "{refs:?}");
        refs.iter().map(|o| o["name"].as_str().unwrap().to_string()).collect()
    };
    for path in ["/apis/apps/v1/namespaces/apps/deployments", SERVICES] {
        assert_eq!(owners(&w, path), vec!["cart", "shop"], "{path}");
    }
    // One deleted: the other still owns them. Kubernetes collects them only once every
    // owner is gone (a deleted owner's reference dangles meanwhile).
    w.api.delete(INSTANCES, "cart");
    w.reconcile("cart").await.unwrap();
    w.reconcile("shop").await.unwrap();
    for path in ["/apis/apps/v1/namespaces/apps/deployments", SERVICES] {
        assert!(owners(&w, path).contains(&"shop".to_string()), "{path}");
        assert!(w.api.get(path, "nimbus-gateway").is_some(), "{path}");
    }
}

#[tokio::test]
async fn an_instance_whose_replica_set_has_no_leader_is_deleted_only_when_told_to_abandon_its_data() {
    let w = ready_instance().await;
    w.datanodes.0.lock().unwrap().initialized = false; // no member reports a leader
    w.datanodes.0.lock().unwrap().members.clear();
    w.api.delete(INSTANCES, "shop");
    let err = w.reconcile("shop").await.unwrap_err().to_string();
    assert!(err.contains("nimbus.io/abandon-data=true"), "{err}");
    // Told where a person looks: phase, condition and Event name the way out.
    let status = w.api.get(INSTANCES, "shop").unwrap()["status"].clone();
    assert_eq!(status["phase"], "Deleting");
    let ready = ready_condition(&w, "shop");
    assert_eq!(ready["reason"], "DeletionBlocked");
    assert!(ready["message"].as_str().unwrap().contains("nimbus.io/abandon-data=true"), "{ready}");
    let events = w.api.list("/apis/events.k8s.io/v1/namespaces/apps/events");
    assert!(events.iter().any(|e| e["reason"] == "DeletionBlocked"), "{events:?}");
    assert!(w.api.get(INSTANCES, "shop").is_some(), "kept while its data cannot be dropped");
    let mut obj = w.api.get(INSTANCES, "shop").unwrap();
    obj["metadata"]["annotations"] = json!({"nimbus.io/abandon-data": "true"});
    w.api.put(INSTANCES, obj);
    w.reconcile("shop").await.unwrap();
    assert!(w.api.get(INSTANCES, "shop").is_none(), "deleted once told");
    assert!(!w.raft_log().iter().any(|l| l.starts_with("drop_database")), "{:?}", w.raft_log());
    assert!(w.store.0.lock().unwrap().keys().all(|k| !k.contains("/shop")));
}

#[tokio::test]
async fn a_user_removed_while_the_replica_set_has_no_leader_is_revoked_all_the_same() {
    let w = World::new();
    w.add_instance("shop", json!({"users": [{"name": "app"}, {"name": "batch"}]}), true);
    w.reconcile_until_phase("shop", "Ready", 10).await;
    w.datanodes.0.lock().unwrap().initialized = false; // no member reports a leader
    let mut obj = w.api.get(INSTANCES, "shop").unwrap();
    obj["spec"]["users"] = json!([{"name": "app"}]);
    w.api.put(INSTANCES, obj);
    let _ = w.reconcile("shop").await;
    assert!(!w.store.0.lock().unwrap().contains_key("/nimbus/users/shop/batch"), "still valid without a leader");
}

#[tokio::test]
async fn a_deleted_pool_is_reported_and_its_members_never_started_again_without_an_owner() {
    let w = World::new();
    let pools = "/apis/nimbus.io/v1alpha1/namespaces/apps/resourcepools";
    w.api.put(
        pools,
        json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "ResourcePool",
            "metadata": {"name": "default", "namespace": NS, "uid": "uid-pool"}, "spec": {}}),
    );
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 10).await;
    // The pool is deleted; garbage collection takes its Pods (the fake does not collect).
    w.api.remove(pools, "default");
    for id in 1..=3 {
        w.api.remove(PODS, &format!("default-rs0-m{id}"));
    }
    for _ in 0..3 {
        let _ = w.reconcile("shop").await;
    }
    assert!(w.api.list(PODS).is_empty(), "members started again with no owner");
    assert_eq!(w.api.list(PVCS).len(), 3, "volumes kept");
    let ready = ready_condition(&w, "shop");
    assert_eq!(ready["reason"], "PoolNotFound");
    assert!(ready["message"].as_str().unwrap().contains("apply the pool again"), "{ready}");
}

#[tokio::test]
async fn abandoning_a_dedicated_instances_data_keeps_its_volumes() {
    let w = World::new();
    w.add_instance("orders", json!({"tier": "dedicated"}), true);
    w.reconcile_until_phase("orders", "Ready", 12).await;
    w.datanodes.0.lock().unwrap().initialized = false;
    let mut obj = w.api.get(INSTANCES, "orders").unwrap();
    obj["metadata"]["annotations"] = json!({"nimbus.io/abandon-data": "true"});
    w.api.put(INSTANCES, obj);
    w.api.delete(INSTANCES, "orders");
    w.reconcile("orders").await.unwrap();
    assert!(w.api.get(INSTANCES, "orders").is_none());
    assert_eq!(w.api.list(PVCS).len(), 3, "abandoned data is kept, as the Event says");
}

const RESTORES: &str = "/apis/nimbus.io/v1alpha1/namespaces/apps/databaserestores";

fn restore(name: &str, spec: serde_json::Value, phase: &str) -> serde_json::Value {
    json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseRestore",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec, "status": {"phase": phase}})
}

#[tokio::test]
async fn a_restore_writing_into_an_instance_holds_its_deletion_until_it_ended() {
    let w = ready_instance().await;
    // One that only reads shop's backups (into a new instance), one waiting: neither holds it.
    let elsewhere =
        json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance", "instance": "shop2"}});
    w.api.put(RESTORES, restore("copy", elsewhere, "Restoring"));
    w.api.put(RESTORES, restore("later", json!({"source": "shop", "toTime": "latest"}), "Pending"));
    w.api.put(RESTORES, restore("now", json!({"source": "shop", "toTime": "latest"}), "Restoring"));
    w.api.delete(INSTANCES, "shop");
    let err = w.reconcile("shop").await.unwrap_err().to_string();
    assert!(err.contains("restore now writes into it"), "{err}");
    let ready = ready_condition(&w, "shop");
    assert_eq!(ready["reason"], "DeletionBlocked");
    assert!(ready["message"].as_str().unwrap().contains("restore now"), "{ready}");
    assert!(
        !w.raft_log().iter().any(|l| l.starts_with("drop_database") || l.starts_with("fence")),
        "{:?}",
        w.raft_log()
    );
    assert!(w.api.get(INSTANCES, "shop").is_some(), "kept while the restore runs");

    // Ended: the deletion goes on.
    w.api.put(RESTORES, restore("now", json!({"source": "shop", "toTime": "latest"}), "Succeeded"));
    w.reconcile("shop").await.unwrap();
    assert!(w.raft_log().iter().any(|l| l.starts_with("drop_database shop~restore")), "{:?}", w.raft_log());
    assert!(w.api.get(INSTANCES, "shop").is_none());
}
