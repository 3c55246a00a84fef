//! Backups through the playground: `nimbus playground backup` takes a full and prints its
//! id and time, `playground.json` shows the last full and the recoverable window, and the
//! oplog archive keeps the window's end within seconds of the last write (the RPO).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use nimbus_e2e::playground::Playground;
use serde_json::{Value, json};

/// How soon after it a write must be restorable here. The recovery point objective is 5 s
/// (issue 15: about 3 s by design, a 2 s segment plus a 0.5 s idle tick); it is measured
/// by a benchmark, not a test, so this bound only says the archive follows the writes, with
/// room for a CI machine's load.
const RPO: Duration = Duration::from_secs(15);

fn ms_of(v: &Value) -> Option<i64> {
    v.as_str()?.parse::<jiff::Timestamp>().ok().map(|t| t.as_millisecond())
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[test]
fn a_backup_on_request_then_the_archive_keeps_the_window_within_seconds_of_the_last_write() {
    let pg = Playground::up(&[]).unwrap();
    let gw = pg.gateway().unwrap();
    let token = pg.token("shop").unwrap();
    let db = pg.instance("shop").unwrap()["database"].as_str().unwrap().to_owned();
    let url = format!("{gw}/v1/databases/{db}/collections/c/documents");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let write = |n: u64| {
        let status = rt.block_on(async {
            let body = json!({"documents": [{"_id": n, "n": n}]});
            http.post(&url).bearer_auth(&token).json(&body).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
        });
        assert!((200..300).contains(&status), "write {n} answered {status}");
        now_ms()
    };
    for n in 0..20 {
        write(n);
    }

    // A full now: its line, and the full shown.
    let out = pg.try_nimbus(&["backup", "shop"]).unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success(), "backup failed: {line} {}", String::from_utf8_lossy(&out.stderr));
    let re = regex_lite(&line);
    assert!(re, "unexpected backup line {line:?}");
    let at = ms_of(&json!(line.rsplit(' ').next().unwrap())).expect("an RFC 3339 time");
    let v = pg
        .wait("the full and a recoverable window", Duration::from_secs(30), |v| {
            let b = &v["instances"]["shop"]["backup"];
            ms_of(&b["lastFull"]).is_some_and(|t| t >= at) && ms_of(&b["latestRestorable"]).is_some()
        })
        .unwrap();
    let b = &v["instances"]["shop"]["backup"];
    let (earliest, latest) = (ms_of(&b["earliestRestorable"]).unwrap(), ms_of(&b["latestRestorable"]).unwrap());
    assert!(earliest <= at && at <= latest, "the full's time {at} is inside the window {b}");

    // More writes: the window's end follows the last one within the RPO.
    let mut last = 0;
    for n in 100..130 {
        last = write(n);
        std::thread::sleep(Duration::from_millis(20));
    }
    let waited = Instant::now();
    pg.wait("the last write restorable", RPO + Duration::from_secs(5), |v| {
        ms_of(&v["instances"]["shop"]["backup"]["latestRestorable"]).is_some_and(|t| t >= last)
    })
    .unwrap();
    let lag = Duration::from_millis((now_ms() - last).max(0) as u64);
    assert!(
        lag <= RPO,
        "the last write became restorable {lag:?} after it (RPO {RPO:?}; waited {:?})",
        waited.elapsed()
    );

    // An unknown instance: refused, nothing taken.
    let out = pg.try_nimbus(&["backup", "nope"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no instance \"nope\""), "{out:?}");
    // The instance's backups are under its incarnation: one, its own.
    let incarnations: Vec<_> = std::fs::read_dir(pg.dir.path().join("backups/playground").join(&db))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(incarnations.len(), 1, "{incarnations:?}");
    // Every full compares the three members' checksums at its marker.
    let log = std::fs::read_to_string(pg.dir.path().join("logs/control-plane.log")).unwrap();
    assert!(log.contains("replica consistency check: 3 members agree"), "no replica check in the log");
    assert!(v["instances"]["shop"]["backup"].get("replicaMismatch").is_none(), "{v}");
    // The newest full is verified by a scratch restore (right after the first one).
    pg.wait("a verified backup", Duration::from_secs(60), |v| {
        ms_of(&v["instances"]["shop"]["backup"]["lastVerified"]).is_some()
    })
    .unwrap();
    let v = pg.json().unwrap();
    assert!(v["instances"]["shop"]["backup"].get("verifyError").is_none(), "{v}");
    let fulls = std::fs::read_dir(incarnations[0].join("full")).unwrap().count();
    assert!(fulls >= 1);
}

/// `^backup: \S+ at \d{4}-..-..T` without a regex crate.
fn regex_lite(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("backup: ") else { return false };
    let Some((id, time)) = rest.split_once(" at ") else { return false };
    let b = time.as_bytes();
    !id.is_empty()
        && !id.contains(char::is_whitespace)
        && b.len() > 11
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
}
