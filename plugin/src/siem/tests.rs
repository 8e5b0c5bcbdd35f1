use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::*;
use crate::audit::record::{Account, AuditFinding, CauseRef, Evidence, Requester, Target};

fn record(check_id: &str, cause: crate::cause::Cause, verdict: &str) -> AuditRecord {
    AuditRecord {
        time: "2026-03-04T05:06:07.890Z".into(),
        seq: 3,
        check_id: check_id.into(),
        request_id: "req-1".into(),
        requester: Requester {
            user: "gw-operator".into(),
            source_address: "192.0.2.7".into(),
        },
        target: Target {
            host: "rdp1.example.test".into(),
            port: 3389,
            resolved: vec!["198.51.100.4".into()],
            connected: Some("198.51.100.4:3389".into()),
        },
        account: Some(Account {
            username: "alice".into(),
            domain: "EXAMPLE".into(),
        }),
        verdict: verdict.into(),
        primary_cause: CauseRef {
            name: cause.name().into(),
            number: cause.number(),
        },
        findings: vec![AuditFinding {
            cause: cause.name().into(),
            number: cause.number(),
            severity: "deny".into(),
            stage: "credential".into(),
            message: "the directory refused the password".into(),
            evidence: Evidence(vec![("ldap_result".into(), "49".into())]),
        }],
        stages: vec![],
        facts: crate::audit::record::Facts {
            credential_checked_by: "ldap".into(),
            ..Default::default()
        },
        duration_ms: 12.5,
        plugin_version: "0.1.0".into(),
        prev: String::new(),
    }
}

#[test]
fn ocsf_authentication_event_of_a_credential_deny() {
    let e = ocsf::event(&record("01CHECKA", crate::cause::Cause::CredInvalid, "deny"));
    assert_eq!(e["class_uid"], 3002);
    assert_eq!(e["category_uid"], 3);
    assert_eq!(e["activity_id"], 1);
    assert_eq!(e["type_uid"], 300201);
    assert_eq!(e["status_id"], 2);
    assert_eq!(e["status_detail"], "CRED_INVALID");
    assert_eq!(e["severity_id"], 3);
    assert_eq!(e["time"], 1_772_600_767_890_i64);
    assert_eq!(e["user"]["name"], "alice");
    assert_eq!(e["user"]["domain"], "EXAMPLE");
    assert_eq!(e["dst_endpoint"]["hostname"], "rdp1.example.test");
    assert_eq!(e["dst_endpoint"]["ip"], "198.51.100.4");
    assert_eq!(e["dst_endpoint"]["port"], 3389);
    assert_eq!(e["src_endpoint"]["ip"], "192.0.2.7");
    assert_eq!(e["metadata"]["uid"], "01CHECKA");
    assert_eq!(e["metadata"]["version"], ocsf::OCSF_VERSION);
    assert_eq!(e["metadata"]["product"]["name"], "rdp-preflight");
    assert_eq!(e["enrichments"][0]["data"]["owner"], "vault");
    assert_eq!(e["unmapped"]["rdp_preflight"]["cause"]["number"], 601);
    assert!(e["unmapped"]["rdp_preflight"]["cause"]["remediation"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    assert_eq!(e["message"], "the directory refused the password");
}

#[test]
fn an_nla_logon_failure_is_an_ntlm_remote_interactive_logon() {
    // The directory proved the password (LDAP), then the target refused the NTLM logon.
    let e = ocsf::event(&record("01CHECKN", crate::cause::Cause::NlaLogonFailed, "deny"));
    assert_eq!(e["class_uid"], 3002);
    assert_eq!(e["status_detail"], "NLA_LOGON_FAILED");
    assert_eq!(
        (e["auth_protocol_id"].clone(), e["logon_type_id"].clone()),
        (1.into(), 10.into())
    );
    assert_eq!(e["user"]["name"], "alice");
}

#[test]
fn a_kerberos_nla_logon_failure_is_a_kerberos_remote_interactive_logon() {
    let mut r = record("01CHECKK", crate::cause::Cause::NlaLogonFailed, "deny");
    r.facts.nla_auth = "kerberos".into();
    let e = ocsf::event(&r);
    assert_eq!(
        (e["auth_protocol"].clone(), e["logon_type_id"].clone()),
        ("Kerberos".into(), 10.into())
    );
}

#[test]
fn ocsf_network_and_rdp_events() {
    let e = ocsf::event(&record("01CHECKB", crate::cause::Cause::TcpRefused, "deny"));
    assert_eq!(
        (e["class_uid"].clone(), e["activity_id"].clone()),
        (4001.into(), 5.into())
    );
    assert!(
        e.get("user").is_none(),
        "the account is the authentication's subject only"
    );
    let e = ocsf::event(&record(
        "01CHECKC",
        crate::cause::Cause::CertUntrusted,
        "allow_with_warnings",
    ));
    assert_eq!(e["class_uid"], 4005);
    assert_eq!(e["type_uid"], 400505);
    assert_eq!(e["status_id"], 1);
    assert_eq!(e["severity_id"], 2);
}

fn valid(f: SiemFile) -> Result<Option<SiemConfig>, String> {
    f.validate()
}

#[test]
fn config_errors_name_the_key() {
    assert!(valid(SiemFile::default()).expect("default").is_none());
    let with = |url: &str| SiemFile {
        syslog: Some(url.into()),
        ..SiemFile::default()
    };
    for (url, key) in [
        ("syslog.example:514", "siem.syslog"),
        ("http://x:1", "siem.syslog"),
        ("tcp://x", "siem.syslog"),
        ("udp://x:0", "siem.syslog"),
        ("unix://relative", "siem.syslog"),
        ("tls://x:6514", "siem.ca_file"),
    ] {
        let e = valid(with(url)).expect_err(url);
        assert!(e.starts_with(key), "{url}: {e}");
    }
    let c = valid(with("tcp://[::1]:514")).expect("valid").expect("on");
    assert!(matches!(c.destination, Destination::Tcp { ref host, port: 514 } if host == "::1"));
    assert!(matches!(
        valid(with("unix:///run/relay.sock"))
            .expect("ok")
            .expect("on")
            .destination,
        Destination::Unix(_)
    ));
    let e = valid(SiemFile {
        format: "cef".into(),
        ..with("udp://x:514")
    })
    .expect_err("format");
    assert!(e.starts_with("siem.format"), "{e}");
    let e = valid(SiemFile {
        ca_file: Some("/nonexistent".into()),
        ..with("udp://x:514")
    })
    .expect_err("ca without tls");
    assert!(e.starts_with("siem.ca_file"), "{e}");
    let e = valid(SiemFile {
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..with("tls://x:6514")
    })
    .expect_err("missing ca");
    assert!(e.starts_with("siem.ca_file: /nonexistent/ca.pem"), "{e}");
    let e = valid(SiemFile {
        queue: 0,
        ..with("udp://x:514")
    })
    .expect_err("queue");
    assert!(e.starts_with("siem.queue"), "{e}");
    let e = valid(SiemFile {
        file: Some("-".into()),
        ..with("udp://x:514")
    })
    .expect_err("both");
    assert!(e.starts_with("siem.file"), "{e}");
    assert!(matches!(
        valid(SiemFile {
            file: Some("-".into()),
            ..SiemFile::default()
        })
        .expect("ok")
        .expect("on")
        .destination,
        Destination::Stdout
    ));
    assert!(toml::from_str::<SiemFile>("syslog = \"udp://x:1\"\nbogus = 1\n").is_err());
}

/// Reads octet-counted frames from a stream.
async fn read_frames(s: &mut tokio::net::TcpStream, n: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let mut chunk = [0u8; 4096];
        let k = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("frames in time")
            .expect("read");
        assert!(k > 0, "closed after {} frames", out.len());
        buf.extend_from_slice(&chunk[..k]);
        while let Some(sp) = buf.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..sp]).expect("len").parse().expect("len");
            if buf.len() < sp + 1 + len {
                break;
            }
            out.push(String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).expect("utf8"));
            buf.drain(..sp + 1 + len);
        }
    }
    out
}

#[tokio::test]
async fn tcp_delivery_is_octet_counted_and_retried_until_the_server_is_up() {
    // Reserve a port, close it: the exporter starts with nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cfg = SiemFile {
        syslog: Some(format!("tcp://127.0.0.1:{port}")),
        timeout_ms: 1000,
        ..SiemFile::default()
    }
    .validate()
    .expect("valid")
    .expect("on");
    let x = Exporter::start(cfg);
    x.offer(record("01A", crate::cause::Cause::TcpRefused, "deny"));
    x.offer(record("01B", crate::cause::Cause::CredInvalid, "deny"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(SiemStats::get(&x.stats().errors) >= 1, "connection refused counted");
    assert_eq!(SiemStats::get(&x.stats().sent), 0);
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("listen");
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), l.accept())
        .await
        .expect("reconnects")
        .expect("accept");
    let frames = read_frames(&mut s, 2).await;
    assert!(
        frames[0].starts_with("<84>1 2026-03-04T05:06:07.890Z "),
        "{}",
        frames[0]
    );
    assert!(
        frames[0].contains("[rdp-preflight@32473 check_id=\"01A\""),
        "{}",
        frames[0]
    );
    let json = &frames[1][frames[1].find("] {").expect("body") + 2..];
    let e: serde_json::Value = serde_json::from_str(json).expect("OCSF JSON");
    assert_eq!(e["metadata"]["uid"], "01B");
    x.close().await;
    assert_eq!(SiemStats::get(&x.stats().sent), 2);
    assert_eq!(SiemStats::get(&x.stats().undelivered), 0);
    assert_eq!(SiemStats::get(&x.stats().depth), 0);
}

#[tokio::test]
async fn a_full_queue_counts_undelivered_and_never_waits() {
    let cfg = SiemFile {
        // TEST-NET-1: nothing answers, connects time out.
        syslog: Some("tcp://192.0.2.1:6514".into()),
        queue: 2,
        timeout_ms: 200,
        ..SiemFile::default()
    }
    .validate()
    .expect("valid")
    .expect("on");
    let x = Exporter::start(cfg);
    let t0 = std::time::Instant::now();
    for i in 0..10 {
        x.offer(record(&format!("01Q{i}"), crate::cause::Cause::TcpTimeout, "deny"));
    }
    assert!(t0.elapsed() < Duration::from_millis(100), "offer never waits");
    // One record taken by the task, two queued, the rest refused (the task may not have taken
    // its first yet: at least 7).
    assert!(SiemStats::get(&x.stats().undelivered) >= 7);
    x.close().await;
    assert_eq!(SiemStats::get(&x.stats().undelivered), 10, "the rest at shutdown");
    assert_eq!(SiemStats::get(&x.stats().sent), 0);
}

#[tokio::test]
async fn json_lines_to_a_file_in_both_formats() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("events.jsonl");
    for format in ["ocsf", "json"] {
        let cfg = SiemFile {
            file: Some(path.clone()),
            format: format.into(),
            ..SiemFile::default()
        }
        .validate()
        .expect("valid")
        .expect("on");
        let x = Exporter::start(cfg);
        x.offer(record("01F", crate::cause::Cause::CredInvalid, "deny"));
        x.close().await;
        assert_eq!(SiemStats::get(&x.stats().sent), 1);
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).expect("meta").permissions());
    assert_eq!(mode & 0o007, 0, "events name accounts: not world-readable");
    assert_eq!(mode & 0o600, 0o600);
    let text = std::fs::read_to_string(&path).expect("file");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    let ocsf: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
    assert_eq!(ocsf["class_uid"], 3002);
    let rec: AuditRecord = serde_json::from_str(lines[1]).expect("the audit record");
    assert_eq!(rec.check_id, "01F");
}

#[test]
fn ocsf_catalog_mapping_in_docs_is_generated() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/siem.md");
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    let (begin, end) = ("<!-- @@OCSF-MAPPING-BEGIN@@ -->\n", "<!-- @@OCSF-MAPPING-END@@ -->");
    let (Some(b), Some(e)) = (have.find(begin), have.find(end)) else {
        panic!("docs/siem.md: the mapping markers are missing");
    };
    let want = format!("{}{}{}", &have[..b + begin.len()], ocsf::docs_table(), &have[e..]);
    if have != want {
        if std::env::var_os("UPDATE_GENERATED").is_some() {
            std::fs::write(&path, want).expect("write docs/siem.md");
        } else {
            panic!("docs/siem.md is out of date with the catalog: run `UPDATE_GENERATED=1 cargo test -p rdp-preflight catalog`");
        }
    }
}
