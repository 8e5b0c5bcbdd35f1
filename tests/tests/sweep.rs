//! `rdp-preflight sweep`: one pass over an inventory of the simulated fleet, never with a
//! credential; the check history in the shared store.

use std::{collections::BTreeMap, process::Command, sync::Arc, time::Duration};

use gateway_sim::{demo::Harness, driver::DirectoryHandle, scenario::Scenario};
use integration_tests::{
    plugin::{client, metrics_text, plugin_bin, serve_binary},
    postgres::Postgres,
};
use rdp_preflight::{
    check::Checker,
    config::FileConfig,
    history::{now_ms, trend, Entry, History, HistoryFile, MemoryHistory, Source},
    store::{history::PgHistory, lease::PgLease, Store, StoreFile},
    sweep::{Lease, LocalLease, Scheduler},
};
use rdp_preflight_proto::v1 as pb;

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
        duration_ms: 5,
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

    // The sweep lease: of replicas claiming a slot together, exactly one wins it; a slot
    // already swept (or an older one) is nobody's.
    let sf = store_file(&pg, tmp.path()).validate().expect("valid").expect("store");
    let mut leases = Vec::new();
    for i in 0..4 {
        let store = Store::open(sf.clone()).await.expect("store opens");
        leases.push(Arc::new(PgLease::new(store, format!("r{i}"))));
    }
    for slot in [100, 101, 103] {
        let claims: Vec<_> = leases
            .iter()
            .map(|l| {
                let l = l.clone();
                tokio::spawn(async move { l.claim(slot).await })
            })
            .collect();
        let mut won = 0;
        for c in claims {
            won += usize::from(c.await.expect("task").expect("answered"));
        }
        assert_eq!(won, 1, "slot {slot}");
    }
    assert_eq!(leases[0].claim(102).await, Ok(false), "an older slot");
}

/// The most checks in flight at once among `entries` (start and duration of each).
fn max_overlap<'a>(entries: impl Iterator<Item = &'a Entry>) -> usize {
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for e in entries {
        edges.push((e.at_ms, 1));
        edges.push((e.at_ms + i64::try_from(e.duration_ms).expect("ms"), -1));
    }
    // An end and a start at the same millisecond: the end first.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    usize::try_from(max).expect("count")
}

/// Runs the scheduled sweep of `cfg` in-process for `slots` slots after the first boundary;
/// the history it wrote.
async fn scheduled(cfg: FileConfig, slots: u64) -> Vec<Entry> {
    let cfg = Arc::new(cfg.validate().expect("valid config"));
    let sc = cfg.sweep.clone().expect("sweep configured");
    let interval_ms = u64::try_from(sc.interval.as_millis()).expect("ms");
    let history = Arc::new(MemoryHistory::new(cfg.history));
    let (checker, _) = Checker::open(cfg).await.expect("checker");
    let scheduler = Arc::new(Scheduler::new(
        Arc::new(checker),
        sc,
        history.clone(),
        Arc::new(LocalLease),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(scheduler.run(async {
        let _ = stopped.await;
    }));
    // Until the first boundary, then `slots` slots, then the last checks' time to finish.
    let now = u64::try_from(now_ms()).expect("ms");
    let to_first = interval_ms - now % interval_ms;
    tokio::time::sleep(Duration::from_millis(to_first + slots * interval_ms + 1500)).await;
    let _ = stop.send(());
    run.await.expect("scheduler");
    history.since(0).await.expect("history")
}

/// `[sweep]` in `serve`: every target once per slot, its checks spread over the slot (never
/// together), the expected state for each target, and no credential anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_sweep_spreads_its_checks_and_sends_no_credential() {
    let harness = Harness::start(&Scenario::parse(SCENARIO).expect("scenario"))
        .await
        .expect("fleet");
    let fleet = &harness.env.fleet;
    let addr = |n: &str| fleet.addr(n).expect("target");
    let mut inventory = String::from("host,port,expected_name,expected_computer,labels\n");
    // Twelve rows: the four targets three times, under three spellings of the port's host.
    for round in 0..3 {
        for (name, computer) in [("ok", ""), ("expired", ""), ("refused", ""), ("nla", "RDP-SWEEP01")] {
            let host = ["127.0.0.1", "localhost", "127.0.0.1"][round];
            let port = addr(name).port();
            // The third round under another expected name: a distinct inventory row.
            let expected = if round == 2 { "localhost" } else { name };
            inventory.push_str(&format!("{host},{port},{expected},{computer},site=lab\n"));
        }
    }
    let dir = tempfile::tempdir().expect("tmp");
    let inv = dir.path().join("inventory.csv");
    std::fs::write(&inv, &inventory).expect("write");
    let mut cfg = harness.plugin_config.clone();
    cfg.sweep.inventory = Some(inv);
    cfg.sweep.interval_secs = 3;
    cfg.sweep.concurrency = 8;
    cfg.sweep.per_host_concurrency = 4;
    let entries = scheduled(cfg, 2).await;

    let interval = 3000;
    let mut by_slot: BTreeMap<i64, Vec<&Entry>> = BTreeMap::new();
    for e in &entries {
        by_slot.entry(e.at_ms / interval).or_default().push(e);
    }
    let full: Vec<&Vec<&Entry>> = by_slot.values().filter(|v| v.len() == 12).collect();
    assert!(
        full.len() >= 2,
        "two full slots of 12 checks: {:?}",
        by_slot.values().map(Vec::len).collect::<Vec<_>>()
    );
    for slot in full {
        let mut starts: Vec<i64> = slot.iter().map(|e| e.at_ms % interval).collect();
        starts.sort_unstable();
        // Spread over the slot: from its first quarter to its last, never three within 100 ms.
        assert!(starts[0] < 750 && starts[11] >= 2250, "{starts:?}");
        assert!(starts.windows(3).all(|w| w[2] - w[0] >= 100), "{starts:?}");
    }
    let states = trend::states(&entries, now_ms(), 3_600_000, 4);
    let state = |name: &str, host: &str| {
        let key = format!("{host}:{}", addr(name).port());
        states
            .iter()
            .find(|s| s.target == key)
            .map(|s| (s.verdict.as_str(), s.primary_cause.as_str()))
            .unwrap_or_else(|| panic!("{key} missing"))
    };
    assert_eq!(state("ok", "127.0.0.1"), ("allow", "OK"));
    assert_eq!(state("ok", "localhost"), ("allow", "OK"));
    assert_eq!(state("expired", "127.0.0.1"), ("deny", "CERT_EXPIRED"));
    assert_eq!(state("refused", "localhost"), ("deny", "TCP_REFUSED"));
    assert_eq!(state("nla", "127.0.0.1"), ("allow", "OK"));
    assert!(entries.iter().all(|e| e.source == Source::Sweep && e.account.is_none()));
    // No credential went anywhere: no AUTHENTICATE at the NLA target, no bind at the directory.
    assert_eq!(fleet.authenticates("nla"), Some(0));
    if let Some(DirectoryHandle::Local(d)) = &harness.env.directory {
        assert_eq!(d.bind_count(), 0);
    }
}

/// The global and per-host limits hold while slow targets would otherwise pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_sweep_respects_its_concurrency_limits() {
    let mut scenario = String::new();
    for i in 0..5 {
        scenario.push_str(&format!(
            "[[target]]\nname = \"slow{i}\"\nbehavior = \"slow\"\ndelay_ms = 500\n\n"
        ));
    }
    let harness = Harness::start(&Scenario::parse(&scenario).expect("scenario"))
        .await
        .expect("fleet");
    let fleet = &harness.env.fleet;
    let mut inventory = String::from("host,port,expected_name,expected_computer,labels\n");
    // Ten rows on two hosts; checks of about a second every 200 ms: five would overlap.
    for i in 0..5 {
        let port = fleet.addr(&format!("slow{i}")).expect("target").port();
        inventory.push_str(&format!("127.0.0.1,{port},,,\nlocalhost,{port},,,\n"));
    }
    let dir = tempfile::tempdir().expect("tmp");
    let inv = dir.path().join("inventory.csv");
    std::fs::write(&inv, &inventory).expect("write");
    let mut cfg = harness.plugin_config.clone();
    cfg.sweep.inventory = Some(inv);
    cfg.sweep.interval_secs = 2;
    cfg.sweep.concurrency = 3;
    cfg.sweep.per_host_concurrency = 2;
    let entries = scheduled(cfg, 2).await;
    assert!(
        entries.len() >= 10,
        "{} checks: {:?}",
        entries.len(),
        entries.iter().map(|e| e.duration_ms).collect::<Vec<_>>()
    );
    assert!(
        entries.iter().all(|e| e.primary_cause == "OK" || e.verdict != "deny"),
        "slow, not failed"
    );
    let all = max_overlap(entries.iter());
    let on = |h: &str| max_overlap(entries.iter().filter(|e| e.target.starts_with(h)));
    assert!(
        (2..=3).contains(&all),
        "at most 3 at once over all hosts (and the limit reached): {all}"
    );
    assert!(on("127.0.0.1:") <= 2 && on("localhost:") <= 2, "at most 2 per host");
}

const FLEET: &str = r#"
[[target]]
name = "ok"
behavior = "healthy"

[[target]]
name = "soon"
behavior = "healthy"
cert = "expiring_soon"

[[target]]
name = "expired"
behavior = "healthy"
cert = "expired"

[[target]]
name = "flap"
behavior = "flapping_path"
run_length = 2

[[target]]
name = "refused"
behavior = "refused"
"#;

/// `serve` sweeping the sim fleet every second: FleetStatus shows every target's state, the
/// flapping target as a fleet finding with its cause sequence, the certificate forecast
/// soonest first; filters by label and cause; TargetHistory pages newest first; the `fleet`
/// commands print them; the gauges follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_shows_states_flapping_and_the_certificate_forecast() {
    let harness = Harness::start(&Scenario::parse(FLEET).expect("scenario"))
        .await
        .expect("fleet");
    let fleet = &harness.env.fleet;
    let port = |n: &str| fleet.addr(n).expect("target").port();
    let mut inventory = String::from("host,port,expected_name,expected_computer,labels\n");
    for (name, site) in [
        ("ok", "par"),
        ("soon", "par"),
        ("expired", "lyo"),
        ("flap", "lyo"),
        ("refused", "par"),
    ] {
        inventory.push_str(&format!("127.0.0.1,{},{name},,site={site};team=win\n", port(name)));
    }
    let dir = tempfile::tempdir().expect("tmp");
    let inv = dir.path().join("inventory.csv");
    std::fs::write(&inv, &inventory).expect("write");
    let mut cfg = harness.plugin_config.clone();
    cfg.sweep.inventory = Some(inv);
    cfg.sweep.interval_secs = 1;
    cfg.sweep.metric_label = Some("site".into());
    cfg.history.flap_changes = 2;
    cfg.admin.listen = Some("127.0.0.1:0".into());
    // The admin listener's address is logged at info.
    cfg.log.level = "info".into();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write");
    let served = serve_binary(&path, &[]);
    let mut client = client(&served.endpoint()).await;
    let key = |n: &str| format!("127.0.0.1:{}", port(n));

    // Wait for the flapping target: OK, OK, X224_CLOSED … changes more than twice.
    let mut status = pb::FleetStatusResponse::default();
    for _ in 0..40 {
        status = client
            .fleet_status(pb::FleetStatusRequest::default())
            .await
            .expect("answered")
            .into_inner();
        if !status.findings.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let find = |name: &str| {
        status
            .targets
            .iter()
            .find(|t| t.target == key(name))
            .unwrap_or_else(|| panic!("{name} missing from {status:?}"))
    };
    assert_eq!(status.targets.len(), 5);
    assert_eq!(find("ok").primary_cause(), pb::Cause::Ok);
    assert_eq!(find("soon").primary_cause(), pb::Cause::CertExpiringSoon);
    assert_eq!(find("expired").primary_cause(), pb::Cause::CertExpired);
    assert_eq!(find("refused").primary_cause(), pb::Cause::TcpRefused);
    assert_eq!(find("refused").verdict(), pb::Verdict::Deny);
    assert!(find("ok").in_inventory && find("ok").labels.get("team").is_some_and(|t| t == "win"));
    assert!(find("flap").flapping && find("flap").changes > 2, "{:?}", find("flap"));
    assert!(!find("ok").flapping && find("ok").changes == 0);
    assert_eq!(status.findings.len(), 1, "{:?}", status.findings);
    let f = &status.findings[0];
    assert_eq!((f.kind.as_str(), f.target.clone()), ("flapping", key("flap")));
    let seq = f
        .evidence
        .iter()
        .find(|e| e.key == "cause_sequence")
        .map(|e| e.value.clone())
        .expect("cause sequence");
    assert!(seq.contains("OK,X224_CLOSED,OK"), "{seq}");
    // The forecast: soonest first, the year-long certificates not in it.
    let forecast: Vec<(String, i64)> = status
        .forecast
        .iter()
        .map(|c| (c.target.clone(), c.days_left))
        .collect();
    assert_eq!(forecast, [(key("expired"), -1), (key("soon"), 2)]);
    assert!(find("ok").cert_days_left.is_some_and(|d| d > 300));
    assert!(status
        .trend
        .iter()
        .any(|b| b.cause() == pb::Cause::CertExpired && b.targets == 1));

    // Filters.
    let select = |labels: &[(&str, &str)], cause: pb::Cause| pb::FleetStatusRequest {
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        cause: cause.into(),
    };
    let names = |r: pb::FleetStatusResponse| r.targets.into_iter().map(|t| t.target).collect::<Vec<_>>();
    let par = client
        .fleet_status(select(&[("site", "par")], pb::Cause::Unspecified))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(names(par).len(), 3);
    let expired = client
        .fleet_status(select(&[], pb::Cause::CertExpired))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(names(expired), [key("expired")]);

    // One target's history, newest first, in pages.
    let page = |token: String| pb::TargetHistoryRequest {
        target: key("flap"),
        page_size: 2,
        page_token: token,
    };
    let p1 = client
        .target_history(page(String::new()))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert!(p1.entries[0].check_id > p1.entries[1].check_id);
    assert!(p1.entries.iter().all(|e| e.source == "sweep" && e.account.is_empty()));
    let p2 = client
        .target_history(page(p1.next_page_token.clone()))
        .await
        .expect("answered")
        .into_inner();
    assert!(!p2.entries.is_empty() && p2.entries[0].check_id < p1.entries[1].check_id);
    let bad = client
        .target_history(pb::TargetHistoryRequest {
            target: "bad host:99999".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("target"), "{}", bad.message());

    // The commands.
    let cli = |args: &[&str]| {
        let out = Command::new(plugin_bin())
            .arg("fleet")
            .args(args)
            .args(["--server", &served.endpoint()])
            .output()
            .expect("run fleet");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = tokio::task::block_in_place(|| cli(&["status"]));
    assert!(
        text.contains("FLAPS/24H") && text.contains(" FLAP") && text.contains("5 target(s)"),
        "{text}"
    );
    assert!(
        text.contains("flapping: ") && text.contains("certificates expiring soonest"),
        "{text}"
    );
    let text = tokio::task::block_in_place(|| cli(&["history", &key("expired"), "--limit", "3"]));
    assert!(text.contains("CERT_EXPIRED") && text.contains("3 check(s)"), "{text}");

    // The gauges.
    let admin = served.admin_addr().expect("admin address");
    // Refreshed every interval (here a second): wait for the flapping target to reach them.
    let mut text = String::new();
    for _ in 0..20 {
        text = metrics_text(&admin).await;
        if text.contains("rdp_preflight_fleet_flapping_targets 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(text.contains("rdp_preflight_fleet_flapping_targets 1"), "{text}");
    assert!(text.contains("rdp_preflight_fleet_targets{primary_cause=\"CERT_EXPIRED\"} 1"));
    assert!(
        text.contains("rdp_preflight_fleet_cert_min_days_left{site=\"lyo\"} -1"),
        "{text}"
    );
    assert!(text.contains("rdp_preflight_fleet_cert_min_days_left{site=\"par\"} 2"));
    assert!(text.contains("rdp_preflight_fleet_targets_by_state{state=\"deny\"}"));
}

/// Two `serve` replicas on one PostgreSQL, both with the same `[sweep]`: each slot is swept
/// once for the cluster (the lease), and the history, the sweep's and a gateway's checks
/// alike, is the same from either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sweep_once_per_interval_and_share_the_history() {
    let pg = Postgres::start();
    let harness = Harness::start(&Scenario::parse(FLEET).expect("scenario"))
        .await
        .expect("fleet");
    let fleet = &harness.env.fleet;
    let port = |n: &str| fleet.addr(n).expect("target").port();
    let dir = tempfile::tempdir().expect("tmp");
    let inv = dir.path().join("inventory.csv");
    let mut inventory = String::from("host,port,expected_name,expected_computer,labels\n");
    for name in ["ok", "expired", "refused"] {
        inventory.push_str(&format!("127.0.0.1,{},{name},,site=par\n", port(name)));
    }
    std::fs::write(&inv, &inventory).expect("write");
    let mut cfg = harness.plugin_config.clone();
    cfg.store = store_file(&pg, dir.path());
    cfg.sweep.inventory = Some(inv);
    cfg.sweep.interval_secs = 1;
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write");
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| serve_binary(&path, &[]));
        let b = sc.spawn(|| serve_binary(&path, &[]));
        (a.join().expect("replica a"), b.join().expect("replica b"))
    });
    // A gateway's check on replica a.
    let mut ca = client(&a.endpoint()).await;
    let mut cb = client(&b.endpoint()).await;
    let report = ca
        .check(pb::CheckRequest {
            request_id: "gw-1".into(),
            target: Some(pb::Target {
                host: "127.0.0.1".into(),
                port: u32::from(port("ok")),
                expected_name: "ok".into(),
                ..Default::default()
            }),
            credential: Some(pb::Credential {
                username: "gw-user".into(),
                domain: "EXAMPLE".into(),
                password: "Canary-Sweep-Pw-4711".into(),
            }),
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    assert_ne!(report.verdict(), pb::Verdict::Unspecified);
    tokio::time::sleep(Duration::from_millis(5500)).await;

    let history = |c: &mut pb::preflight_client::PreflightClient<tonic::transport::Channel>, name: &str| {
        let req = pb::TargetHistoryRequest {
            target: format!("127.0.0.1:{}", port(name)),
            page_size: 1000,
            page_token: String::new(),
        };
        let mut c = c.clone();
        async move { c.target_history(req).await.expect("answered").into_inner().entries }
    };
    for name in ["ok", "expired", "refused"] {
        let from_a = history(&mut ca, name).await;
        let from_b = history(&mut cb, name).await;
        assert_eq!(from_a, from_b, "{name}: the same history from both replicas");
        let sweeps: Vec<i64> = from_a
            .iter()
            .filter(|e| e.source == "sweep")
            .map(|e| e.started_at.as_ref().map_or(0, |t| t.seconds))
            .collect();
        // About five slots of a second: one check each, never two in one slot.
        let slots: std::collections::BTreeSet<i64> = sweeps.iter().copied().collect();
        assert_eq!(slots.len(), sweeps.len(), "{name}: a slot swept twice: {sweeps:?}");
        assert!(
            (3..=7).contains(&sweeps.len()),
            "{name}: {} sweeps in 5.5 s",
            sweeps.len()
        );
    }
    let ok = history(&mut cb, "ok").await;
    let gw = ok
        .iter()
        .find(|e| e.source == "gateway" && e.check_id == report.check_id)
        .expect("replica b sees replica a's gateway check");
    // The account as the audit record names it; the password nowhere.
    assert_eq!(gw.account, "EXAMPLE\\gw-user");
    assert!(!pg
        .psql("SELECT entry::text FROM check_history")
        .contains("Canary-Sweep-Pw"));
    assert!(!format!("{ok:?}").contains("Canary-Sweep-Pw"));
    let status_a = ca
        .fleet_status(pb::FleetStatusRequest::default())
        .await
        .expect("a")
        .into_inner();
    let status_b = cb
        .fleet_status(pb::FleetStatusRequest::default())
        .await
        .expect("b")
        .into_inner();
    let states = |s: &pb::FleetStatusResponse| {
        s.targets
            .iter()
            .map(|t| (t.target.clone(), t.primary_cause, t.in_inventory))
            .collect::<Vec<_>>()
    };
    assert_eq!(states(&status_a), states(&status_b));
    assert_eq!(status_a.targets.len(), 3);
    assert!(
        pg.psql("SELECT holder FROM sweep_lease").trim().len() >= 26,
        "a replica holds the lease"
    );
}

/// The sim's sweep scenario, swept in-process: the flapping path is the one flapping target
/// with its cause sequence, the forecast lists the expired then the expiring certificate, and
/// no credential reached a target or the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sim_sweep_scenario_finds_the_flapping_path_and_the_expiring_certificates() {
    let scenario = Scenario::parse(gateway_sim::demo::SWEEP_SCENARIO).expect("scenario");
    let d = gateway_sim::demo::run_sweep(&scenario, 1, 8, 3).await.expect("sweep");
    let key = |name: &str| {
        d.keys
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k.clone())
            .expect("target")
    };
    let flapping: Vec<&str> = d
        .status
        .targets
        .iter()
        .filter(|t| t.state.flapping)
        .map(|t| t.state.target.as_str())
        .collect();
    assert_eq!(flapping, [key("rdp-vpn")], "{}", gateway_sim::demo::format_sweep(&d));
    let vpn = d
        .status
        .targets
        .iter()
        .find(|t| t.state.target == key("rdp-vpn"))
        .expect("vpn");
    assert!(
        vpn.state.sequence.windows(2).all(|w| w[0] != w[1]),
        "{:?}",
        vpn.state.sequence
    );
    assert!(vpn.state.sequence.iter().any(|c| c == "X224_CLOSED"));
    assert_eq!(vpn.labels.get("behavior").map(String::as_str), Some("flapping_path"));
    let forecast: Vec<String> = d.status.forecast.iter().map(|f| f.target.clone()).collect();
    assert_eq!(forecast, [key("rdp-expired"), key("rdp-expiring")], "soonest first");
    let state = |name: &str| {
        let t = d
            .status
            .targets
            .iter()
            .find(|t| t.state.target == key(name))
            .expect("state");
        (t.state.primary_cause.clone(), t.state.changes)
    };
    assert_eq!(state("rdp-ok"), ("OK".into(), 0));
    assert_eq!(state("rdp-down"), ("TCP_REFUSED".into(), 0));
    assert_eq!(state("rdp-nla"), ("OK".into(), 0));
    assert_eq!((d.authenticates, d.binds), (0, 0), "a sweep sends no credential");
}
