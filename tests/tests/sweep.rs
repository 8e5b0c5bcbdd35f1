//! `rdp-preflight sweep`: one pass over an inventory of the simulated fleet, never with a
//! credential.

use std::process::Command;

use gateway_sim::{demo::Harness, driver::DirectoryHandle, scenario::Scenario};
use integration_tests::plugin::plugin_bin;

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
