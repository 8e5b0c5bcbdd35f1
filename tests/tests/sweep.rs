//! `rdp-preflight sweep`: one pass over an inventory of the simulated fleet, never with a
//! credential; the check history in the shared store.

use std::process::Command;

use gateway_sim::{demo::Harness, driver::DirectoryHandle, scenario::Scenario};
use integration_tests::{plugin::plugin_bin, postgres::Postgres};
use rdp_preflight::{
    history::{now_ms, trend, Entry, History, HistoryFile, Source},
    store::{history::PgHistory, Store, StoreFile},
};

const SCENARIO: &str = r#"
[[target]]
name = "ok"
behavior = "healthy"

[[target]]
name = "expired"
behavior = "healthy"
cert = "expired"

[[target]]
name = "refused"
behavior = "refused"

[[target]]
name = "nla"
behavior = "nla_healthy"
computer = "RDP-SWEEP01"

[[account]]
name = "nina"
password = "Nla-Pass-1"
state = "good"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_reports_every_target_and_sends_no_credential() {
    let harness = Harness::start(&Scenario::parse(SCENARIO).expect("scenario"))
        .await
        .expect("fleet");
    let config = harness.write_plugin_config().expect("config");
    let fleet = &harness.env.fleet;
    let addr = |n: &str| fleet.addr(n).expect("target");
    let mut inventory = String::from("host,port,expected_name,expected_computer,labels\n");
    for (name, computer) in [("ok", ""), ("expired", ""), ("refused", ""), ("nla", "RDP-SWEEP01")] {
        let a = addr(name);
        inventory.push_str(&format!(
            "{},{},{name},{computer},site=lab;name={name}\n",
            a.ip(),
            a.port()
        ));
    }
    let dir = tempfile::tempdir().expect("tmp");
    let inv = dir.path().join("inventory.csv");
    std::fs::write(&inv, &inventory).expect("write");
    let bin = plugin_bin();
    let out = tokio::task::block_in_place(|| {
        Command::new(&bin)
            .args(["sweep", "--json", "--inventory"])
            .arg(&inv)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run sweep")
    });
    assert_eq!(out.status.code(), Some(3), "a denied target: exit 3");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 4);
    let by_port = |name: &str| {
        lines
            .iter()
            .find(|v| v["port"] == u64::from(addr(name).port()))
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(by_port("ok")["verdict"], "VERDICT_ALLOW");
    assert_eq!(by_port("expired")["primary_cause"], "CAUSE_CERT_EXPIRED");
    assert_eq!(by_port("refused")["primary_cause"], "CAUSE_TCP_REFUSED");
    assert_eq!(by_port("nla")["verdict"], "VERDICT_ALLOW");
    // No credential went anywhere: no AUTHENTICATE at the NLA target, no bind at the directory.
    assert_eq!(fleet.authenticates("nla"), Some(0));
    if let Some(DirectoryHandle::Local(d)) = &harness.env.directory {
        assert_eq!(d.bind_count(), 0);
    }
    // The table, and a bad inventory line named.
    let out = tokio::task::block_in_place(|| {
        Command::new(&bin)
            .args(["sweep", "--inventory"])
            .arg(&inv)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run sweep")
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CERT_EXPIRED") && text.contains("4 target(s), 2 denied"),
        "{text}"
    );
    std::fs::write(&inv, format!("{inventory}bad host,3389,,,\n")).expect("write");
    let out = tokio::task::block_in_place(|| {
        Command::new(&bin)
            .args(["sweep", "--inventory"])
            .arg(&inv)
            .output()
            .expect("run sweep")
    });
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 6"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A store for the history tests: PostgreSQL without TLS on loopback, with a guard key.
fn store_file(pg: &Postgres, dir: &std::path::Path) -> StoreFile {
    let key = dir.join("guard.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-sweep-test-key\n").expect("key");
    StoreFile {
        url: Some(pg.url()),
        tls: "disable".into(),
        hmac_key_file: Some(key),
        ..Default::default()
    }
}

fn entry(at_ms: i64, target: &str, cause: &str) -> Entry {
    Entry {
        at_ms,
        target: target.into(),
        source: Source::Gateway,
        check_id: format!("{at_ms:020}"),
        verdict: if cause == "OK" { "allow" } else { "deny" }.into(),
        primary_cause: cause.into(),
        causes: vec![cause.into()],
        stages: vec![("tcp".into(), 250)],
        cert_fingerprint: "ab".repeat(32),
        cert_not_after: Some(at_ms / 1000 + 86_400),
        account: Some("EXAMPLE\\nina".into()),
    }
}

/// The history in PostgreSQL: pages newest first, a time range oldest first, and entries
/// older than the retention deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_in_the_store_pages_and_forgets_what_is_past_retention() {
    let pg = Postgres::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(store_file(&pg, tmp.path()).validate().expect("valid").expect("store"))
        .await
        .expect("store opens");
    let cfg = HistoryFile {
        retention_secs: 86_400,
        flap_window_secs: 3600,
        ..Default::default()
    }
    .validate()
    .expect("valid");
    let now = now_ms();
    // Written by another replica two days ago: past retention.
    pg.psql(&format!(
        "INSERT INTO check_history VALUES ('00000000000000000001', 'old:3389', now() - interval '2 days', '{}')",
        serde_json::to_string(&entry(now - 2 * 86_400_000, "old:3389", "OK")).expect("json")
    ));
    let h = PgHistory::new(store, cfg);
    for i in 0..5 {
        let cause = if i % 2 == 0 { "OK" } else { "TCP_TIMEOUT" };
        h.record(entry(now - 10_000 + i, "a:3389", cause))
            .await
            .expect("recorded");
    }
    h.record(entry(now - 5000, "b:3389", "CERT_EXPIRED"))
        .await
        .expect("recorded");
    assert_eq!(
        pg.psql("SELECT count(*) FROM check_history").trim(),
        "6",
        "the old entry is gone"
    );
    let page = h.target("a:3389", None, 2).await.expect("page");
    assert_eq!(
        page.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
        [now - 9996, now - 9997]
    );
    assert_eq!(
        page[0],
        entry(now - 9996, "a:3389", "OK"),
        "an entry comes back as written"
    );
    let next = h
        .target("a:3389", page.last().map(|e| e.check_id.as_str()), 10)
        .await
        .expect("page");
    assert_eq!(next.len(), 3);
    let all = h.since(now - 60_000).await.expect("range");
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "oldest first");
    let states = trend::states(&all, now, 3_600_000, 3);
    assert_eq!(states.len(), 2);
    assert_eq!((states[0].changes, states[0].flapping), (4, true));
    // No password column, no password anywhere: the account as the audit record names it.
    assert!(!pg.psql("SELECT entry::text FROM check_history").contains("password"));
}
