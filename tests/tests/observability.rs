//! `deploy/observability/` stays consistent with the plugin:
//!
//! - `promtool check rules` (Debian's `prometheus` package) accepts the alert rules, their unit
//!   tests pass (`promtool test rules`: the deny-ratio jump, the directory and the store alerts
//!   fire on the series they are written for and stay quiet before), and every rule links a
//!   runbook section that exists in `docs/operations.md`;
//! - every metric the Grafana dashboard and the rules query is one the real plugin exports on
//!   `/metrics` (the families of its `# TYPE` lines, histogram and summary suffixes included),
//!   read from `rdp-preflight serve` with the shared store (a real PostgreSQL), the audit log and
//!   the SIEM export configured, so that every family the plugin can export is there.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{
    plugin::{admin_addr, client, metrics_text, serve_binary},
    postgres::Postgres,
};
use rdp_preflight::config::FileConfig;
use rdp_preflight_proto::v1 as pb;
use serde_json::Value as Json;
use yaml_rust2::{Yaml, YamlLoader};

const RULES: &str = "deploy/observability/alerts.rules.yml";
const DASHBOARD: &str = "deploy/observability/grafana-dashboard.json";
const RULE_TESTS: &str = "deploy/observability/alerts.test.yml";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `rdp_preflight_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("rdp_preflight_") {
                out.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The alert rules: (alert name, expression, runbook_url).
fn rules() -> Vec<(String, String, String)> {
    let docs = YamlLoader::load_from_str(&read(RULES)).unwrap_or_else(|e| panic!("{RULES}: {e}"));
    let mut out = Vec::new();
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert").to_owned();
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: expr"))
                .to_owned();
            let runbook = match &rule["annotations"]["runbook_url"] {
                Yaml::String(s) => s.clone(),
                other => panic!("{name}: runbook_url annotation: {other:?}"),
            };
            out.push((name, expr, runbook));
        }
    }
    out
}

/// Every PromQL expression of the dashboard: panel targets and template queries.
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &Json, out: &mut Vec<String>) {
        match v {
            Json::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", Json::String(s)) => out.push(s.clone()),
                        ("query", Json::String(s)) if s.contains('(') => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Json::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let d: Json = serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let mut out = Vec::new();
    walk(&d, &mut out);
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn promtool_accepts_the_rules_and_every_rule_has_a_runbook() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo().join(RULES))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (Debian package prometheus: run `sudo scripts/install-test-deps.sh`)")
        });
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo().join(RULE_TESTS))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = read("docs/operations.md");
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(slug)
        .collect();
    let rules = rules();
    assert!(rules.len() >= 6, "{} rules", rules.len());
    for (name, _, runbook) in &rules {
        let anchor = runbook
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {runbook:?} should point into docs/operations.md"));
        assert!(
            anchors.contains(anchor),
            "{name}: no section #{anchor} in docs/operations.md"
        );
    }
}

/// The names a scrape may be queried by: each family, and for histograms and summaries the
/// sample names that carry the suffixes.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                families.insert(name.to_owned(), kind.to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    for (name, kind) in families {
        match kind.as_str() {
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            "summary" => {
                out.insert(name.clone());
                for s in ["_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            _ => {
                out.insert(name);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queried_metric_is_exported_by_the_plugin() {
    let pg = tokio::task::block_in_place(Postgres::start);
    let tmp = tempfile::tempdir().expect("tmp");
    let key = tmp.path().join("guard.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-observability\n").expect("key");
    let mut f = FileConfig::default();
    f.policy.allow_loopback = true;
    f.admin.listen = Some("127.0.0.1:0".into());
    f.audit.dir = Some(tmp.path().join("audit"));
    f.audit.fsync = false;
    f.store.url = Some(pg.url());
    f.store.tls = "disable".into();
    f.store.hmac_key_file = Some(key);
    f.cert.pin_store = "memory".into();
    f.siem.file = Some(tmp.path().join("events.jsonl"));
    // A scheduled sweep of one TLS target labelled site=par: the fleet gauges.
    let harness = gateway_sim::demo::Harness::start(
        &gateway_sim::scenario::Scenario::parse("[[target]]\nname = \"healthy-tls\"\nbehavior = \"healthy\"\n")
            .expect("scenario"),
    )
    .await
    .expect("fleet");
    let tls_port = harness.env.fleet.addr("healthy-tls").expect("target").port();
    let inv = tmp.path().join("inventory.csv");
    std::fs::write(
        &inv,
        format!("host,port,expected_name,expected_computer,labels\n127.0.0.1,{tls_port},healthy-tls,,site=par\n"),
    )
    .expect("inventory");
    f.sweep.inventory = Some(inv);
    f.sweep.interval_secs = 1;
    f.sweep.metric_label = Some("site".into());
    f.cert.trust_anchors = harness.plugin_config.cert.trust_anchors.clone();
    let path = tmp.path().join("plugin.toml");
    std::fs::write(&path, toml::to_string(&f).expect("toml")).expect("config");
    let served = tokio::task::block_in_place(|| serve_binary(&path, &[]));

    // One check (a refused port: a DENY, recorded), so that every family has samples.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut c = client(&served.endpoint()).await;
    let r = c
        .check(pb::CheckRequest {
            request_id: "observability-1".into(),
            target: Some(pb::Target {
                host: "127.0.0.1".into(),
                port: u32::from(port),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(r.verdict(), pb::Verdict::Deny);

    let log = served.stderr.lock().map(|l| l.clone()).unwrap_or_default();
    let admin = admin_addr(&log).unwrap_or_else(|| panic!("admin address in the logs: {log}"));
    // The fleet gauges come after the first sweep.
    let mut text = metrics_text(&admin).await;
    for _ in 0..60 {
        if text.contains("rdp_preflight_fleet_cert_min_days_left{") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        text = metrics_text(&admin).await;
    }
    let exported = exported_names(&text);
    for family in [
        "rdp_preflight_store_up",
        "rdp_preflight_siem_queue_depth",
        "rdp_preflight_fleet_targets_by_state",
        "rdp_preflight_fleet_cert_min_days_left",
    ] {
        assert!(exported.contains(family), "{family}: {exported:?}");
    }

    let mut queried: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, expr, _) in rules() {
        for m in metric_names(&expr) {
            queried.entry(m).or_default().push(format!("{RULES}: {name}"));
        }
    }
    for expr in dashboard_exprs() {
        for m in metric_names(&expr) {
            queried.entry(m).or_default().push(DASHBOARD.to_owned());
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let unknown: Vec<_> = queried
        .iter()
        .filter(|(m, _)| !exported.contains(*m))
        .map(|(m, by)| format!("{m} (queried by {})", by.join(", ")))
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics the plugin does not export:\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
    // The dashboard covers what the issue asks for.
    let dash: BTreeSet<String> = dashboard_exprs().iter().flat_map(|e| metric_names(e)).collect();
    for m in [
        "rdp_preflight_checks_total",
        "rdp_preflight_stage_duration_seconds_bucket",
        "rdp_preflight_directory_errors_total",
        "rdp_preflight_guard_reservations_refused_total",
        "rdp_preflight_audit_write_seconds_bucket",
        "rdp_preflight_fleet_targets",
        "rdp_preflight_fleet_targets_by_state",
        "rdp_preflight_fleet_flapping_targets",
        "rdp_preflight_fleet_cert_min_days_left",
    ] {
        assert!(dash.contains(m), "the dashboard has no panel on {m}");
    }
}

#[test]
fn metric_names_are_found_in_expressions() {
    let e = "sum by (le) (rate(rdp_preflight_stage_duration_seconds_bucket{stage=\"tls\"}[5m])) / rdp_preflight_x:y";
    let got: Vec<_> = metric_names(e).into_iter().collect();
    assert_eq!(
        got,
        ["rdp_preflight_stage_duration_seconds_bucket", "rdp_preflight_x:y"]
    );
    assert!(metric_names("label_values(rdp_preflight_build_info, instance)").contains("rdp_preflight_build_info"));
}
