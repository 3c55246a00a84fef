//! The playground as a user drives it: `nimbus playground up`, the contract smoke test, a
//! datanode killed (restarted in its zone), a member's data directory destroyed (replaced:
//! learner, promote, remove), `down` (every process gone) and `up` again (data found).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nimbus_e2e::playground::{Playground, alive, ready};
use serde_json::Value;

const HEAL: Duration = Duration::from_secs(60);

/// Runs `../shared/contract/smoke.py` (beside the repository, or where NIMBUS_CONTRACT says)
/// against the playground.
fn smoke(pg: &Playground) {
    let script = std::env::var("NIMBUS_CONTRACT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/contract/smoke.py"));
    assert!(
        script.is_file(),
        "{} not found: the shared contract sits beside the repository, or set NIMBUS_CONTRACT",
        script.display()
    );
    let out = Command::new("python3").arg(&script).arg(pg.dir.path().join("playground.json")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0 failed"),
        "contract smoke test failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The playground's secrets are its own: files only its user reads, and the control
/// plane's API (every token, the zones) answers only with the cluster secret.
fn secrets_stay_private(pg: &Playground, v: &Value) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pg.dir.path().join("playground.json")), 0o600);
    assert_eq!(mode(&pg.dir.path().join("secrets")), 0o700);
    let secret_file = PathBuf::from(v["clusterSecretFile"].as_str().unwrap());
    assert_eq!(mode(&secret_file), 0o600);
    let status = format!("{}/v1/status", v["controlPlane"].as_str().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (anyone, component) = rt.block_on(async {
        let anyone = nimbus_e2e::DataClient::new().get(&status).await.0;
        (anyone, pg.internal_client().unwrap().get(&status).await.0)
    });
    assert_eq!((anyone, component), (401, 200));
}

#[test]
fn the_playground_serves_the_contract_heals_members_and_keeps_its_data() {
    let pg = Playground::up(&[]).unwrap();
    let v = pg.json().unwrap();
    assert!(ready(&v));
    assert_eq!(v["datanodes"].as_array().unwrap().len(), 3);
    let zones: Vec<&str> = v["datanodes"].as_array().unwrap().iter().map(|d| d["zone"].as_str().unwrap()).collect();
    assert_eq!(zones, vec!["a", "b", "c"]);
    smoke(&pg);
    secrets_stay_private(&pg, &v);

    // A datanode killed is started again in its zone, with a new pid in playground.json.
    let victim = v["datanodes"][1].clone();
    let old_pid = victim["pid"].as_u64().unwrap() as u32;
    Command::new("kill").args(["-9", &old_pid.to_string()]).status().unwrap();
    let v = pg
        .wait("the killed datanode restarted", HEAL, |v| {
            ready(v)
                && v["datanodes"].as_array().unwrap().iter().any(|d| {
                    d["id"] == victim["id"]
                        && d["zone"] == victim["zone"]
                        && d["pid"].as_u64().is_some_and(|p| p as u32 != old_pid)
                })
        })
        .unwrap();

    // A member whose data directory is destroyed is replaced in its zone.
    let lost = v["datanodes"][2].clone();
    std::fs::remove_dir_all(lost["dataDir"].as_str().unwrap()).unwrap();
    let v = pg
        .wait("the lost member replaced", HEAL, |v| {
            let ds = v["datanodes"].as_array().unwrap();
            ready(v)
                && ds.len() == 3
                && !ds.iter().any(|d| d["id"] == lost["id"])
                && ds.iter().any(|d| d["zone"] == lost["zone"])
        })
        .unwrap();
    smoke(&pg);

    // A document written now survives down and up.
    let inst = v["instances"]["shop"].clone();
    let gw = v["gateway"].as_str().unwrap().to_string();
    let token = inst["token"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let url = format!("{gw}/v1/databases/shop/collections/kept/documents");
    let st = rt.block_on(async {
        http.post(&url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"documents": [{"_id": "k", "v": 7}]}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(st, 201);
    let pids = pg.pids().unwrap();
    pg.nimbus(&["down"]).unwrap();
    for p in pids {
        assert!(!alive(p), "datanode {p} still runs after down");
    }
    pg.nimbus(&["up"]).unwrap();
    let v = pg.json().unwrap();
    let gw = v["gateway"].as_str().unwrap();
    let body: Value = rt.block_on(async {
        http.get(format!("{gw}/v1/databases/shop/collections/kept/documents/k"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(body["v"], 7);
}
