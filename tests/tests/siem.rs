//! The SIEM export against a real rsyslog (Debian's, with a mutual-TLS listener): every audit
//! record arrives as an RFC 5424 message whose JSON is a valid OCSF event of the class its
//! cause maps to; while rsyslog is down the plugin keeps answering, counts what it could not
//! queue, and after rsyslog is back and the period is replayed from the audit log every record
//! has arrived, duplicates only ever under the same event uid; the request's password is in no
//! message, audit file or log.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use integration_tests::{
    plugin::{admin_addr, client, metrics_text, plugin_bin, serve_binary},
    rsyslog::Rsyslog,
};
use rdp_preflight::config::FileConfig;
use rdp_preflight_proto::v1 as pb;
use serde_json::Value as Json;

const CANARY: &str = "Canary-Siem-Pa55w0rd-7f3e";

/// One parsed RFC 5424 message.
#[derive(Debug)]
struct Syslog {
    pri: u16,
    hostname: String,
    app: String,
    msgid: String,
    /// SD-ID → params.
    sd: BTreeMap<String, BTreeMap<String, String>>,
    msg: String,
}

/// Parses `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD [MSG]` strictly.
fn parse_5424(line: &str) -> Result<Syslog, String> {
    let rest = line.strip_prefix('<').ok_or("no PRI")?;
    let (pri, rest) = rest.split_once('>').ok_or("PRI not closed")?;
    let pri: u16 = pri.parse().map_err(|_| "PRI not a number")?;
    if pri > 191 {
        return Err(format!("PRI {pri} out of range"));
    }
    let mut it = rest.splitn(7, ' ');
    let mut next = |what: &str| it.next().ok_or(format!("no {what}"));
    if next("VERSION")? != "1" {
        return Err("VERSION is not 1".into());
    }
    let ts = next("TIMESTAMP")?;
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("TIMESTAMP {ts}: {e}"))?;
    let hostname = next("HOSTNAME")?.to_owned();
    let app = next("APP-NAME")?.to_owned();
    let procid = next("PROCID")?;
    let msgid = next("MSGID")?.to_owned();
    for (name, v, max) in [
        ("HOSTNAME", hostname.as_str(), 255),
        ("APP-NAME", app.as_str(), 48),
        ("PROCID", procid, 128),
        ("MSGID", msgid.as_str(), 32),
    ] {
        if v.is_empty() || v.len() > max || !v.bytes().all(|b| (33..=126).contains(&b)) {
            return Err(format!("{name} {v:?}"));
        }
    }
    let mut rest = next("STRUCTURED-DATA")?;
    let mut sd = BTreeMap::new();
    if let Some(r) = rest.strip_prefix("- ") {
        rest = r;
    } else {
        while let Some(r) = rest.strip_prefix('[') {
            let (id, mut r) = r.split_once(' ').ok_or("SD-ID")?;
            let mut params = BTreeMap::new();
            loop {
                if let Some(after) = r.strip_prefix(']') {
                    r = after;
                    break;
                }
                let (name, after) = r.split_once("=\"").ok_or("SD-PARAM")?;
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => {
                            let (_, c) = chars.next().ok_or("escape at end")?;
                            value.push(c);
                        }
                        Some((i, '"')) => break i,
                        Some((_, ']')) => return Err("unescaped ] in a PARAM-VALUE".into()),
                        Some((_, c)) => value.push(c),
                        None => return Err("PARAM-VALUE not closed".into()),
                    }
                };
                params.insert(name.trim_start().to_owned(), value);
                r = &after[end + 1..];
            }
            sd.insert(id.to_owned(), params);
            rest = r;
        }
        rest = rest.strip_prefix(' ').ok_or("no SP before MSG")?;
    }
    Ok(Syslog {
        pri,
        hostname,
        app,
        msgid,
        sd,
        msg: rest.to_owned(),
    })
}

/// What OCSF 1.3.0 requires of the classes we send, encoded from the schema (the base event,
/// the Authentication and Network Activity classes and their constraints, the objects used).
fn validate_ocsf(e: &Json) -> Result<u64, String> {
    let int = |k: &str| e[k].as_u64().ok_or(format!("{k}: required integer"));
    let (class, activity) = (int("class_uid")?, int("activity_id")?);
    let category = int("category_uid")?;
    if int("type_uid")? != class * 100 + activity {
        return Err("type_uid != class_uid * 100 + activity_id".into());
    }
    if !matches!(int("severity_id")?, 0..=6 | 99) {
        return Err("severity_id".into());
    }
    e["time"]
        .as_i64()
        .filter(|t| *t > 1_500_000_000_000)
        .ok_or("time: epoch milliseconds")?;
    let meta = &e["metadata"];
    meta["version"]
        .as_str()
        .filter(|v| v.starts_with("1."))
        .ok_or("metadata.version: 1.x")?;
    meta["product"]["vendor_name"]
        .as_str()
        .ok_or("metadata.product.vendor_name: required")?;
    meta["product"]["name"].as_str().ok_or("metadata.product.name")?;
    if let Some(s) = e.get("status_id") {
        if !matches!(s.as_u64(), Some(0..=2 | 99)) {
            return Err("status_id".into());
        }
    }
    let endpoint_ok = |v: &Json| {
        v.is_object()
            && ["ip", "hostname", "name", "uid"].iter().any(|k| v[k].is_string())
            && v["port"].as_u64().is_some_and(|p| p <= 65535)
    };
    match class {
        3002 => {
            if category != 3 || !matches!(activity, 0..=5 | 99) {
                return Err("Authentication: category 3, activity 0-5 or 99".into());
            }
            let u = &e["user"];
            if !(u["name"].is_string() || u["uid"].is_string()) {
                return Err("Authentication: user (required) needs name or uid".into());
            }
            if !(endpoint_ok(&e["dst_endpoint"]) || e["service"].is_object()) {
                return Err("Authentication: at least one of service, dst_endpoint".into());
            }
        }
        4001 | 4005 => {
            let max = if class == 4001 { 7 } else { 8 };
            if category != 4 || !(activity <= max || activity == 99) {
                return Err(format!("class {class}: category 4, activity 0-{max} or 99"));
            }
            if !(endpoint_ok(&e["dst_endpoint"]) || e["src_endpoint"].is_object()) {
                return Err(format!("class {class}: at least one of dst_endpoint, src_endpoint"));
            }
        }
        other => return Err(format!("unexpected class {other}")),
    }
    if let Some(en) = e.get("enrichments") {
        for x in en.as_array().ok_or("enrichments: array")? {
            for k in ["name", "value"] {
                x[k].as_str().ok_or(format!("enrichment.{k}: required"))?;
            }
            if !x["data"].is_object() {
                return Err("enrichment.data: required".into());
            }
        }
    }
    Ok(class)
}

/// Checks one received line; returns (event uid, OCSF event).
fn check_line(line: &str, port: u16) -> (String, Json) {
    let m = parse_5424(line).unwrap_or_else(|e| panic!("not RFC 5424 ({e}): {line}"));
    assert_eq!(m.app, "rdp-preflight");
    assert_eq!(m.pri / 8, 10, "facility authpriv");
    assert!(!m.hostname.is_empty());
    let sd =
        m.sd.get("rdp-preflight@32473")
            .unwrap_or_else(|| panic!("our SD-ID: {line}"));
    let e: Json = serde_json::from_str(&m.msg).unwrap_or_else(|err| panic!("MSG is not JSON ({err}): {line}"));
    let class = validate_ocsf(&e).unwrap_or_else(|err| panic!("not a valid OCSF event: {err}: {e}"));
    let uid = e["metadata"]["uid"].as_str().expect("uid").to_owned();
    assert_eq!(sd["check_id"], uid, "the SD carries the event uid");
    assert_eq!(e["dst_endpoint"]["port"], port);
    match e["status_detail"].as_str() {
        // The simulated directory answers CRED_ACCOUNT_NOT_FOUND or CRED_INVALID, depending on
        // how the bind names the account: both are credential causes.
        Some(c) if c.starts_with("CRED_") => {
            assert_eq!(class, 3002, "a credential cause is an Authentication event");
            assert_eq!(e["user"]["name"], "olga");
            assert_eq!(m.msgid, "DENY");
            assert_eq!(m.pri % 8, 4, "deny: warning");
            assert_eq!(e["status_id"], 2);
            assert_eq!(e["unmapped"]["rdp_preflight"]["cause"]["owner"], "vault");
        }
        Some("TCP_REFUSED") => {
            assert_eq!(
                (class, e["activity_id"].as_u64()),
                (4001, Some(5)),
                "Network Activity: Refuse"
            );
            assert_eq!(m.msgid, "ALLOW_WITH_WARNINGS");
        }
        other => panic!("unexpected cause {other:?}: {e}"),
    }
    (uid, e)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn request(i: usize, port: u16, with_credential: bool) -> pb::CheckRequest {
    pb::CheckRequest {
        request_id: format!("siem-{i}"),
        target: Some(pb::Target {
            host: "127.0.0.1".into(),
            port: u32::from(port),
            ..Default::default()
        }),
        credential: with_credential.then(|| pb::Credential {
            username: "olga".into(),
            domain: String::new(),
            password: CANARY.into(),
        }),
        requester: Some(pb::Requester {
            user: "operator".into(),
            source_address: "127.0.0.1".into(),
        }),
    }
}

fn audit_ids(dir: &Path) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for e in std::fs::read_dir(dir).expect("audit dir").flatten() {
        let text = std::fs::read_to_string(e.path()).expect("read");
        assert!(!text.contains(CANARY), "an audit file holds the password");
        for l in text.lines() {
            let r: Json = serde_json::from_str(l).expect("record");
            ids.insert(r["check_id"].as_str().expect("check_id").to_owned());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_reach_rsyslog_over_mutual_tls_and_an_outage_is_replayed() {
    let mut rs = tokio::task::block_in_place(Rsyslog::start_tls);
    let tmp = tempfile::tempdir().expect("tmp");
    let (dir, ca) = integration_tests::one_account_directory("olga", "Right-Pass-1", tmp.path()).await;
    let audit_dir = tmp.path().join("audit");
    let (cert, key) = rs.client_cert();
    let mut f = FileConfig::default();
    f.policy.allow_loopback = true;
    f.cert.pin_store = "memory".into();
    f.admin.listen = Some("127.0.0.1:0".into());
    f.directory.servers = vec![dir.ldaps_url()];
    f.directory.ca_file = Some(ca);
    // The refused port is a warning here, so that the credential's CRED_INVALID decides.
    f.severity
        .insert("TCP_REFUSED".into(), rdp_preflight::cause::Severity::Warn);
    f.audit.dir = Some(audit_dir.clone());
    f.audit.all_checks = true;
    f.audit.fsync = false;
    f.siem.syslog = Some(format!("tls://localhost:{}", rs.port));
    f.siem.ca_file = Some(rs.ca_file());
    f.siem.client_cert = Some(cert);
    f.siem.client_key = Some(key);
    f.siem.queue = 2;
    f.siem.timeout_ms = 2000;
    let config = tmp.path().join("plugin.toml");
    std::fs::write(&config, toml::to_string(&f).expect("toml")).expect("config");
    let served = tokio::task::block_in_place(|| serve_binary(&config, &[("RUST_LOG", "debug")]));
    let mut c = client(&served.endpoint()).await;
    let port = integration_tests::slapd::free_port();
    let since = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let since = since
        .format(&time::format_description::well_known::Rfc3339)
        .expect("time");

    // Up: one check without a credential, one with (the canary password).
    let mut n = 0;
    for with in [false, true] {
        let r = c.check(request(n, port, with)).await.expect("answered").into_inner();
        assert_eq!(
            r.verdict(),
            if with {
                pb::Verdict::Deny
            } else {
                pb::Verdict::AllowWithWarnings
            }
        );
        n += 1;
    }
    let lines = tokio::task::block_in_place(|| rs.wait_for(2, Duration::from_secs(20)));
    for l in &lines {
        check_line(l, port);
    }

    // Down: the plugin keeps answering at once; one event is retried, two wait in the queue,
    // the rest cannot be queued.
    tokio::task::block_in_place(|| rs.stop());
    let before = rs.received().len();
    for i in 0..5 {
        let t0 = std::time::Instant::now();
        let r = c
            .check(request(n, port, i % 2 == 1))
            .await
            .expect("answered during the outage");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the answer did not wait for the SIEM"
        );
        assert!(!r.into_inner().check_id.is_empty());
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = served.stderr.lock().map(|l| l.clone()).unwrap_or_default();
    let admin = admin_addr(&log).expect("admin address in the logs");
    let m = metrics_text(&admin).await;
    let undelivered = metric(&m, "rdp_preflight_siem_events_undelivered_total");
    assert!(undelivered >= 1.0, "queue of 2 during a 5-record outage: {m}");
    assert!(metric(&m, "rdp_preflight_siem_send_errors_total") >= 1.0);

    // Back: the retried and queued events arrive by themselves.
    tokio::task::block_in_place(|| rs.restart());
    let delivered_later = 5 - undelivered as usize;
    let lines = tokio::task::block_in_place(|| rs.wait_for(before + delivered_later, Duration::from_secs(30)));
    assert_eq!(lines.len(), before + delivered_later);

    // Replay the whole period from the audit log: every record arrives (some twice).
    let ids = audit_ids(&audit_dir);
    assert_eq!(ids.len(), n, "every check recorded");
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(plugin_bin())
            .args(["audit", "export", "--config"])
            .arg(&config)
            .args(["--since", &since])
            .output()
            .expect("audit export")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("exported {n} of {n} record(s)")), "{stdout}");
    let total = lines.len() + n;
    let lines = tokio::task::block_in_place(|| rs.wait_for(total, Duration::from_secs(20)));

    let mut by_uid: BTreeMap<String, Vec<Json>> = BTreeMap::new();
    for l in &lines {
        assert!(!l.contains(CANARY), "a SIEM message holds the password: {l}");
        let (uid, e) = check_line(l, port);
        by_uid.entry(uid).or_default().push(e);
    }
    let received: BTreeSet<String> = by_uid.keys().cloned().collect();
    assert_eq!(received, ids, "every audit record reached the SIEM, under its own uid");
    for (uid, events) in &by_uid {
        // A duplicate is the same event: same uid, same content.
        assert!(events.iter().all(|e| e == &events[0]), "{uid}: differing duplicates");
    }
    let with_dup = by_uid.values().filter(|v| v.len() > 1).count();
    assert_eq!(with_dup, lines.len() - ids.len());
    eprintln!(
        "siem outage: {n} records, {undelivered} not queued during the outage, {delivered_later} delivered after it by retry, {} messages after the replay, {with_dup} duplicates (same uid)",
        lines.len()
    );

    // The stdout form of the replay: one OCSF event per line, same uids.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(plugin_bin())
            .args(["audit", "export", "--dir"])
            .arg(&audit_dir)
            .args(["--since", &since, "--stdout"])
            .output()
            .expect("audit export --stdout")
    });
    assert!(out.status.success());
    let printed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let e: Json = serde_json::from_str(l).expect("event");
            validate_ocsf(&e).expect("OCSF");
            e["metadata"]["uid"].as_str().expect("uid").to_owned()
        })
        .collect();
    assert_eq!(printed, ids);

    let log = served.stderr.lock().map(|l| l.clone()).unwrap_or_default();
    assert!(log.contains("siem: delivery failed"), "the outage is logged");
    assert!(!log.contains(CANARY), "the plugin's logs hold the password");
    drop(served);
}

#[test]
fn the_syslog_parser_refuses_what_rfc_5424_refuses() {
    let good = "<84>1 2026-01-02T03:04:05.678Z h rdp-preflight 1 DENY [a@1 x=\"q\\]\\\"\"] {}";
    let m = parse_5424(good).expect("good");
    assert_eq!(m.sd["a@1"]["x"], "q]\"");
    assert_eq!(m.msg, "{}");
    for bad in [
        "<84>2 2026-01-02T03:04:05Z h a 1 M - x",
        "<200>1 2026-01-02T03:04:05Z h a 1 M - x",
        "<84>1 yesterday h a 1 M - x",
        "<84>1 2026-01-02T03:04:05Z h a 1 M [a@1 x=\"]\"] x",
    ] {
        assert!(parse_5424(bad).is_err(), "{bad}");
    }
}

/// The datagram transports against the same rsyslog: UDP (RFC 5426) and a local relay's Unix
/// datagram socket, through the exporter the plugin runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_and_unix_datagrams_reach_rsyslog() {
    use rdp_preflight::siem::{Exporter, SiemFile, SiemStats};
    let rs = tokio::task::block_in_place(Rsyslog::start_tls);
    let record: rdp_preflight::audit::AuditRecord = serde_json::from_value(serde_json::json!({
        "time": "2026-03-04T05:06:07.890Z", "seq": 1, "check_id": "01DATAGRAM", "request_id": "dgram-1",
        "requester": {"user": "operator", "source_address": "127.0.0.1"},
        "target": {"host": "127.0.0.1", "port": 3389, "resolved": [], "connected": null},
        "account": null, "verdict": "deny", "primary_cause": {"name": "TCP_REFUSED", "number": 201},
        "findings": [], "stages": [], "facts": {}, "duration_ms": 1.0, "plugin_version": "0.1.0", "prev": ""
    }))
    .expect("record");
    let socket = rs.unix_socket();
    for (i, url) in [
        format!("udp://127.0.0.1:{}", rs.udp_port),
        format!("unix://{}", socket.display()),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = SiemFile {
            syslog: Some(url.clone()),
            ..SiemFile::default()
        }
        .validate()
        .expect("valid")
        .expect("on");
        let x = Exporter::start(cfg);
        let mut r = record.clone();
        r.check_id = format!("01DATAGRAM{i}");
        x.offer(r);
        x.close().await;
        assert_eq!(SiemStats::get(&x.stats().sent), 1, "{url}");
        let lines = tokio::task::block_in_place(|| rs.wait_for(i + 1, Duration::from_secs(10)));
        let m = parse_5424(&lines[i]).unwrap_or_else(|e| panic!("{url}: not RFC 5424 ({e}): {}", lines[i]));
        let e: Json = serde_json::from_str(&m.msg).expect("JSON");
        assert_eq!(validate_ocsf(&e), Ok(4001), "{url}");
        assert_eq!(e["metadata"]["uid"], format!("01DATAGRAM{i}"));
    }
}

/// With the audit log in the shared store (a real PostgreSQL), the records are exported as
/// they are committed, and `audit export` replays them from the store with the same uids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_backend_exports_and_replays() {
    let pg = tokio::task::block_in_place(integration_tests::postgres::Postgres::start);
    let tmp = tempfile::tempdir().expect("tmp");
    let key = tmp.path().join("guard.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-siem-store\n").expect("key");
    let events = tmp.path().join("events.jsonl");
    let mut f = FileConfig::default();
    f.policy.allow_loopback = true;
    f.cert.pin_store = "memory".into();
    f.store.url = Some(pg.url());
    f.store.tls = "disable".into();
    f.store.hmac_key_file = Some(key);
    f.audit.backend = "store".into();
    f.siem.file = Some(events.clone());
    let config = tmp.path().join("plugin.toml");
    std::fs::write(&config, toml::to_string(&f).expect("toml")).expect("config");
    let served = tokio::task::block_in_place(|| serve_binary(&config, &[]));
    let mut c = client(&served.endpoint()).await;
    let port = integration_tests::slapd::free_port();
    let mut ids = BTreeSet::new();
    for i in 0..3 {
        let r = c.check(request(i, port, false)).await.expect("answered").into_inner();
        assert_eq!(r.verdict(), pb::Verdict::Deny);
        ids.insert(r.check_id);
    }
    let live = || -> BTreeSet<String> {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let e: Json = serde_json::from_str(l).expect("event");
                validate_ocsf(&e).expect("OCSF");
                assert_eq!(
                    e["unmapped"]["rdp_preflight"]["seq"].as_u64().map(|s| s > 0),
                    Some(true)
                );
                e["metadata"]["uid"].as_str().expect("uid").to_owned()
            })
            .collect()
    };
    let t0 = std::time::Instant::now();
    while live() != ids {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "live export: {:?} vs {ids:?}",
            live()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(plugin_bin())
            .args(["audit", "export", "--config"])
            .arg(&config)
            .args(["--since", "1h", "--stdout"])
            .output()
            .expect("audit export")
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replayed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let e: Json = serde_json::from_str(l).expect("event");
            e["metadata"]["uid"].as_str().expect("uid").to_owned()
        })
        .collect();
    assert_eq!(replayed, ids, "replayed from the store under the same uids");
    drop(served);
}
