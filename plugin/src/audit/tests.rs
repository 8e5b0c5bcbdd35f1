//! Unit tests of the writer, the chain and the review commands.

use std::{path::Path, sync::Arc, time::Duration};

use super::{
    chain::{self, BreakKind, VerifyOptions},
    cli::{self, AuditCommand, Source},
    *,
};
use crate::{
    cause::{Cause, Severity, Stage},
    check::CheckInput,
    report::{CertFacts, CredentialFacts, Finding, NlaFacts, Report, StageRecord, StageStatus, TargetFacts},
    secret::{Credential, Password},
};

const CANARY: &str = "canary-Pa55w0rd!audit";

fn input(i: u64, host: &str, user: Option<&str>) -> CheckInput {
    CheckInput {
        request_id: format!("req-{i}"),
        host: host.into(),
        port: 3389,
        expected_name: host.into(),
        requested: 3,
        minimum: None,
        expected_computer: String::new(),
        credential: user.map(|u| Credential {
            username: u.into(),
            domain: "EXAMPLE".into(),
            password: Password::new(CANARY.into()),
        }),
        requester_user: "alice".into(),
        requester_source: "10.1.2.3".into(),
        budget: Duration::from_secs(10),
    }
}

fn report(i: u64, cause: Cause, host: &str) -> Report {
    let mut target = TargetFacts {
        host: host.into(),
        port: 3389,
        resolved: vec!["192.0.2.10:3389".parse().expect("addr")],
        requested_protocols: 3,
        ..TargetFacts::default()
    };
    if cause.number() >= 500 {
        target.connected = Some("192.0.2.10:3389".parse().expect("addr"));
        target.selected_protocol = Some(2);
        target.tls_version = "TLSv1.3".into();
        target.cipher_suite = "TLS13_AES_256_GCM_SHA384".into();
        target.certificate = Some(CertFacts {
            subject: "CN=target\u{1b}[31m".into(),
            not_before: 1_600_000_000,
            not_after: 1_650_000_000,
            sha256_fingerprint: "ab".repeat(32),
            self_signed: true,
            verifier_verdict: "UnknownIssuer".into(),
            ..CertFacts::default()
        });
    }
    let credential = if cause.number() >= 600 {
        CredentialFacts {
            checked_by: "ldap".into(),
            bind_identity: "bob@example.test".into(),
            directory_server: "ldaps://dc1.example.test:636".into(),
            ldap_result_code: Some(49),
            ad_data_code: "52e".into(),
            diagnostic_message: "80090308: LdapErr: DSID-0C09042A, data 52e".into(),
            from_memory: false,
        }
    } else {
        CredentialFacts::default()
    };
    Report {
        check_id: format!("01CHECK{i:019}"),
        request_id: format!("req-{i}"),
        verdict: crate::report::Verdict::Deny,
        primary_cause: cause,
        findings: vec![(
            Finding::new(cause, format!("finding for check {i}")).with("os_error", 111),
            Severity::Deny,
        )],
        stages: vec![StageRecord {
            stage: Stage::Tcp,
            status: StageStatus::Failed,
            start: Duration::from_micros(1500),
            duration: Duration::from_micros(250),
            detail: "refused".into(),
        }],
        target,
        credential,
        nla: NlaFacts::default(),
        started_at: (1_700_000_000 + i as i64, 123_456_789),
        duration: Duration::from_millis(3),
    }
}

fn rec(i: u64) -> AuditRecord {
    AuditRecord::new(
        &input(i, "rdp1.example.test", Some("bob")),
        &report(i, Cause::TcpRefused, "rdp1.example.test"),
    )
}

fn cfg(dir: &Path) -> AuditConfig {
    let mut c = AuditConfig::new(dir);
    c.fsync = false;
    c
}

async fn write_n(log: &AuditLog, from: u64, n: u64) -> Vec<Receipt> {
    let mut out = Vec::new();
    for i in from..from + n {
        out.push(log.append(rec(i)).await.expect("append"));
    }
    out
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    chain::list_files(dir)
        .expect("list")
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).expect("write");
}

fn verify(dir: &Path) -> Outcome {
    chain::verify_dir(dir, VerifyOptions::default()).expect("verify")
}

#[test]
fn validate_names_the_key_and_applies_defaults() {
    assert!(AuditFile::default().validate().expect("valid").is_none());
    let ok = AuditFile {
        dir: Some("/tmp/a".into()),
        ..AuditFile::default()
    }
    .validate()
    .expect("valid")
    .expect("configured");
    assert_eq!(ok.max_file_bytes, 64 * 1024 * 1024);
    assert_eq!(ok.max_file_age, Duration::from_secs(86_400));
    assert!(ok.fsync && !ok.all_checks);
    assert_eq!(ok.group_commit_max, 256);
    let bad = |f: AuditFile| f.validate().expect_err("invalid");
    let base = || AuditFile {
        dir: Some("/tmp/a".into()),
        ..AuditFile::default()
    };
    assert!(bad(AuditFile {
        max_file_bytes: 100,
        ..base()
    })
    .starts_with("audit.max_file_bytes:"));
    assert!(bad(AuditFile {
        group_commit_max: 0,
        ..base()
    })
    .starts_with("audit.group_commit_max:"));
    assert!(bad(AuditFile {
        max_file_age_secs: 1,
        ..base()
    })
    .starts_with("audit.max_file_age_secs:"));
    assert!(bad(AuditFile {
        dir: Some("".into()),
        ..base()
    })
    .starts_with("audit.dir:"));
    let parsed: AuditFile = toml::from_str("dir = \"/x\"\nall_checks = true\n").expect("toml");
    assert!(parsed.all_checks && parsed.fsync);
    assert!(toml::from_str::<AuditFile>("bogus = 1\n").is_err());
}

#[tokio::test]
async fn wants_deny_only_unless_all_checks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = AuditLog::open(cfg(tmp.path())).await.expect("open");
    assert!(log.wants(Verdict::Deny));
    assert!(!log.wants(Verdict::Allow));
    assert!(!log.wants(Verdict::AllowWithWarnings));
    log.close().await;
    let mut c = cfg(tmp.path());
    c.all_checks = true;
    let log = AuditLog::open(c).await.expect("open");
    assert!(log.wants(Verdict::Allow));
    log.close().await;
}

#[tokio::test]
async fn genesis_record_and_file_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = AuditLog::open(cfg(tmp.path())).await.expect("open");
    let r = write_n(&log, 1, 2).await;
    log.close().await;
    assert_eq!(r[0].seq, 1);
    assert_eq!(r[1].seq, 2);
    let f = files(tmp.path());
    assert_eq!(f.len(), 1);
    assert!(f[0].ends_with("audit-00000000000000000001.jsonl"));
    let l = lines(&f[0]);
    let first: AuditRecord = serde_json::from_str(&l[0]).expect("json");
    let second: AuditRecord = serde_json::from_str(&l[1]).expect("json");
    assert_eq!(first.prev, GENESIS_PREV);
    assert_eq!(second.prev, chain::line_hash(l[0].as_bytes()));
    assert_eq!(second.prev, r[0].hash);
    assert_eq!(first.time, "2023-11-14T22:13:21.123Z");
    assert_eq!(first.primary_cause.name, "TCP_REFUSED");
    assert_eq!(first.primary_cause.number, 201);
    assert_eq!(first.findings[0].evidence.get("os_error"), Some("111"));
    assert_eq!(first.stages[0].start_ms, 1.5);
    assert_eq!(first.requester.source_address, "10.1.2.3");
    assert_eq!(first.account.as_ref().map(|a| a.username.as_str()), Some("bob"));
    assert!(verify(tmp.path()).ok());
}

#[tokio::test]
async fn chain_continues_across_rotation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = cfg(tmp.path());
    c.max_file_bytes = 4096;
    let log = AuditLog::open(c).await.expect("open");
    write_n(&log, 1, 40).await;
    log.close().await;
    let f = files(tmp.path());
    assert!(f.len() >= 5, "expected rotation, got {} files", f.len());
    let mut expected_prev = GENESIS_PREV.to_owned();
    let mut seq = 1;
    for path in &f {
        let size = std::fs::metadata(path).expect("stat").len();
        assert!(size <= 4096, "{} has {size} bytes", path.display());
        let l = lines(path);
        let first: AuditRecord = serde_json::from_str(&l[0]).expect("json");
        // The name announces the first record's seq; the chain crosses the file boundary.
        assert_eq!(
            chain::parse_file_name(&path.file_name().expect("name").to_string_lossy()),
            Some(first.seq)
        );
        for line in &l {
            let r: AuditRecord = serde_json::from_str(line).expect("json");
            assert_eq!(r.seq, seq);
            assert_eq!(r.prev, expected_prev);
            expected_prev = chain::line_hash(line.as_bytes());
            seq += 1;
        }
    }
    assert_eq!(seq, 41);
    let out = verify(tmp.path());
    assert!(out.ok(), "{:?}", out.breaks);
    assert_eq!(out.records, 40);
    assert_eq!(out.head.as_ref().map(|h| h.0), Some(40));
}

#[tokio::test]
async fn rotation_by_age() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = cfg(tmp.path());
    c.max_file_age = Duration::from_millis(50);
    let log = AuditLog::open(c).await.expect("open");
    write_n(&log, 1, 2).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    write_n(&log, 3, 1).await;
    log.close().await;
    let f = files(tmp.path());
    assert_eq!(f.len(), 2);
    assert!(f[1].ends_with(chain::file_name(3)));
    assert!(verify(tmp.path()).ok());
}

#[tokio::test]
async fn resume_after_reopen() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = AuditLog::open(cfg(tmp.path())).await.expect("open");
    let a = write_n(&log, 1, 5).await;
    log.close().await;
    let log = AuditLog::open(cfg(tmp.path())).await.expect("reopen");
    assert_eq!(log.stats().durable_seq(), 5);
    let b = write_n(&log, 6, 5).await;
    log.close().await;
    assert_eq!(b[0].seq, 6);
    let l = lines(&files(tmp.path())[0]);
    let sixth: AuditRecord = serde_json::from_str(&l[5]).expect("json");
    assert_eq!(sixth.prev, a[4].hash);
    let out = verify(tmp.path());
    assert!(out.ok(), "{:?}", out.breaks);
    assert_eq!(out.records, 10);

    // Reopening after a rotation continues in the newest file.
    let mut c = cfg(tmp.path());
    c.max_file_bytes = 4096;
    let log = AuditLog::open(c.clone()).await.expect("reopen");
    write_n(&log, 11, 10).await;
    log.close().await;
    let log = AuditLog::open(c).await.expect("reopen");
    let r = write_n(&log, 21, 1).await;
    log.close().await;
    assert_eq!(r[0].seq, 21);
    let out = verify(tmp.path());
    assert!(out.ok(), "{:?}", out.breaks);
    assert_eq!(out.records, 21);
}

#[tokio::test]
async fn torn_last_line_is_cut_on_open() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = AuditLog::open(cfg(tmp.path())).await.expect("open");
    let a = write_n(&log, 1, 3).await;
    log.close().await;
    let path = files(tmp.path())[0].clone();
    let good = std::fs::read(&path).expect("read");
    // A crash mid-write: part of a line, no newline.
    let mut torn = good.clone();
    torn.extend_from_slice(b"{\"time\":\"2023-11-14T22:13:24.000Z\",\"seq\":4,\"check");
    std::fs::write(&path, &torn).expect("write");
    let out = verify(tmp.path());
    assert!(
        out.ok(),
        "a torn tail of the newest file is not a break: {:?}",
        out.breaks
    );
    assert_eq!(out.notes.len(), 1, "{:?}", out.notes);
    assert!(out.notes[0].contains(":4: incomplete last line"), "{:?}", out.notes);

    let log = AuditLog::open(cfg(tmp.path())).await.expect("reopen");
    assert_eq!(std::fs::read(&path).expect("read"), good, "the torn tail is cut");
    let b = write_n(&log, 4, 1).await;
    log.close().await;
    assert_eq!(b[0].seq, 4);
    let l = lines(&path);
    let fourth: AuditRecord = serde_json::from_str(&l[3]).expect("json");
    assert_eq!(fourth.prev, a[2].hash);
    let out = verify(tmp.path());
    assert!(out.ok() && out.notes.is_empty(), "{out:?}");
}

#[tokio::test]
async fn a_damaged_complete_last_line_refuses_to_open() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = AuditLog::open(cfg(tmp.path())).await.expect("open");
    write_n(&log, 1, 2).await;
    log.close().await;
    let path = files(tmp.path())[0].clone();
    let mut l = lines(&path);
    l[1] = "not json".into();
    write_lines(&path, &l);
    let e = AuditLog::open(cfg(tmp.path())).await.expect_err("damaged");
    assert!(matches!(e, AuditError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("audit-00000000000000000001.jsonl"), "{e}");
}

#[tokio::test]
async fn open_on_a_file_fails_with_an_io_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("plain");
    std::fs::write(&file, b"x").expect("write");
    let e = AuditLog::open(cfg(&file)).await.expect_err("not a directory");
    assert!(matches!(e, AuditError::Io { .. }), "{e}");
}

#[tokio::test]
async fn records_after_close_fail() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = AuditLog::open(cfg(tmp.path())).await.expect("open");
    let other = log.clone();
    log.close().await;
    assert_eq!(other.record(rec(1)).await, Err(AuditError::Closed));
}

/// A copy of a 10-record log in one file, to be damaged.
async fn ten_records() -> (tempfile::TempDir, std::path::PathBuf, Vec<String>) {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = AuditLog::open(cfg(tmp.path())).await.expect("open");
    write_n(&log, 1, 10).await;
    log.close().await;
    let path = files(tmp.path())[0].clone();
    let l = lines(&path);
    assert!(verify(tmp.path()).ok());
    (tmp, path, l)
}

const F1: &str = "audit-00000000000000000001.jsonl";

#[tokio::test]
async fn verify_detects_an_edit_and_names_the_edited_record() {
    let (tmp, path, mut l) = ten_records().await;
    l[3] = l[3].replace("finding for check 4", "finding for check 4 (edited)");
    write_lines(&path, &l);
    let out = verify(tmp.path());
    assert_eq!(out.breaks.len(), 1, "{:?}", out.breaks);
    let b = &out.breaks[0];
    assert_eq!((b.at.file.as_str(), b.at.line, b.at.seq), (F1, 5, Some(5)));
    match &b.kind {
        BreakKind::PrevMismatch { previous: Some(p) } => assert_eq!((p.line, p.seq), (4, Some(4))),
        k => panic!("{k:?}"),
    }
    let msg = b.to_string();
    assert!(msg.contains(&format!("{F1}:4 (seq 4) was edited")), "{msg}");
}

#[tokio::test]
async fn verify_detects_a_deletion() {
    let (tmp, path, mut l) = ten_records().await;
    l.remove(3);
    write_lines(&path, &l);
    let out = verify(tmp.path());
    assert_eq!(out.breaks.len(), 1, "{:?}", out.breaks);
    let b = &out.breaks[0];
    assert_eq!((b.at.line, b.at.seq), (4, Some(5)));
    assert_eq!(b.kind, BreakKind::Gap { expected: 4 });
    assert!(b.to_string().contains("record 4 is missing"), "{b}");
}

#[tokio::test]
async fn verify_detects_an_insertion() {
    let (tmp, path, mut l) = ten_records().await;
    // A copy of record 2 slipped in after record 6.
    let copy = l[1].clone();
    l.insert(6, copy);
    write_lines(&path, &l);
    let out = verify(tmp.path());
    assert!(!out.ok());
    let b = &out.breaks[0];
    assert_eq!((b.at.line, b.at.seq), (7, Some(2)));
    assert_eq!(b.kind, BreakKind::Backwards { expected: 7 });
    // A forged record with the right seq and prev is caught by the next record's prev.
    let (tmp, path, mut l) = ten_records().await;
    let mut forged: AuditRecord = serde_json::from_str(&l[5]).expect("json");
    forged.check_id = "FORGED".into();
    let forged = serde_json::to_string(&forged).expect("json");
    l.insert(6, forged);
    write_lines(&path, &l);
    let out = verify(tmp.path());
    assert!(
        out.breaks.iter().any(|b| b.at.line == 7 && b.at.seq == Some(6)),
        "{:?}",
        out.breaks
    );
}

#[tokio::test]
async fn verify_detects_a_reorder() {
    let (tmp, path, mut l) = ten_records().await;
    l.swap(2, 3);
    write_lines(&path, &l);
    let out = verify(tmp.path());
    let at: Vec<_> = out.breaks.iter().map(|b| (b.at.line, b.at.seq)).collect();
    assert_eq!(at[..2], [(3, Some(4)), (4, Some(3))], "{:?}", out.breaks);
    assert!(matches!(out.breaks[1].kind, BreakKind::Backwards { .. }));
}

#[tokio::test]
async fn verify_detects_a_deleted_file_and_a_cut_head() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = cfg(tmp.path());
    c.max_file_bytes = 4096;
    let log = AuditLog::open(c).await.expect("open");
    write_n(&log, 1, 30).await;
    log.close().await;
    let f = files(tmp.path());
    assert!(f.len() >= 3);
    let head = verify(tmp.path()).head.expect("head");
    // A middle file removed: a gap at the first line of the next file.
    let removed = std::fs::read(&f[1]).expect("read");
    std::fs::remove_file(&f[1]).expect("rm");
    let out = verify(tmp.path());
    let b = &out.breaks[0];
    assert_eq!(b.at.file, f[2].file_name().expect("name").to_string_lossy());
    assert_eq!(b.at.line, 1);
    assert!(matches!(b.kind, BreakKind::Gap { .. }));
    std::fs::write(&f[1], removed).expect("restore");
    // The first file removed: not a genesis start, unless pruning is accepted.
    std::fs::remove_file(&f[0]).expect("rm");
    assert!(matches!(verify(tmp.path()).breaks[0].kind, BreakKind::NotGenesis));
    let pruned = chain::verify_dir(
        tmp.path(),
        VerifyOptions {
            allow_pruned: true,
            anchors: vec![head.clone()],
        },
    )
    .expect("verify");
    assert!(pruned.ok(), "{:?}", pruned.breaks);
    // The last record removed: only an anchor shows it.
    let last = f.last().expect("file");
    let mut l = lines(last);
    l.pop();
    write_lines(last, &l);
    let cut = chain::verify_dir(
        tmp.path(),
        VerifyOptions {
            allow_pruned: true,
            anchors: vec![head],
        },
    )
    .expect("verify");
    assert!(
        matches!(
            cut.breaks[..],
            [Break {
                kind: BreakKind::AnchorMismatch { found: None, .. },
                ..
            }]
        ),
        "{:?}",
        cut.breaks
    );
}

#[tokio::test]
async fn verify_with_an_anchor_detects_an_edited_last_record() {
    let (tmp, path, mut l) = ten_records().await;
    let head = verify(tmp.path()).head.expect("head");
    l[9] = l[9].replace("\"verdict\":\"deny\"", "\"verdict\":\"allow\"");
    write_lines(&path, &l);
    assert!(
        verify(tmp.path()).ok(),
        "without an anchor, the last line has no successor"
    );
    let out = chain::verify_dir(
        tmp.path(),
        VerifyOptions {
            allow_pruned: false,
            anchors: vec![head],
        },
    )
    .expect("verify");
    assert_eq!(out.breaks.len(), 1);
    assert_eq!(out.breaks[0].at.seq, Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_get_distinct_seqs_and_a_valid_chain() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = cfg(tmp.path());
    c.fsync = true;
    c.max_file_bytes = 64 * 1024;
    let log = AuditLog::open(c).await.expect("open");
    let mut tasks = Vec::new();
    for i in 1..=300u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(
            async move { (i, log.append(rec(i)).await.expect("append")) },
        ));
    }
    let mut seqs = Vec::new();
    let mut by_check = std::collections::HashMap::new();
    for t in tasks {
        let (i, r) = t.await.expect("join");
        assert!(log.stats().durable_seq() >= r.seq, "acknowledged before it was synced");
        seqs.push(r.seq);
        by_check.insert(format!("01CHECK{i:019}"), r.seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    let stats = (log.stats().records(), log.stats().fsyncs());
    log.close().await;
    assert_eq!(stats.0, 300);
    assert!(stats.1 >= 1 && stats.1 <= 300 + 10, "{stats:?}");
    let out = verify(tmp.path());
    assert!(out.ok(), "{:?}", out.breaks);
    assert_eq!(out.records, 300);
    // Each check is in the log under the seq its caller was told.
    let entries = chain::read_dir(tmp.path(), |_| true).expect("read");
    assert_eq!(entries.len(), 300);
    for e in entries {
        assert_eq!(by_check.get(&e.record.check_id), Some(&e.record.seq));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_acknowledges_only_after_fsync() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (at_sync_tx, mut at_sync) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let mut c = cfg(tmp.path());
    c.fsync = true;
    c.group_commit_max = 64;
    let file = tmp.path().join(chain::file_name(1));
    let hook_file = file.clone();
    c.before_sync = Some(Arc::new(move || {
        // Lines are written before the sync: count them as the writer sees them.
        let written = std::fs::read_to_string(&hook_file).map_or(0, |s| s.lines().count() as u64);
        let _ = at_sync_tx.send(written);
        let _ = go_rx.lock().map(|rx| rx.recv());
    }));
    let log = AuditLog::open(c).await.expect("open");

    // Batch 1: one record, held just before its fsync.
    let l1 = log.clone();
    let first = tokio::spawn(async move { l1.append(rec(1)).await });
    assert_eq!(at_sync.recv().await, Some(1), "written before the sync");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!first.is_finished(), "acknowledged before its fsync");
    assert_eq!(log.stats().durable_seq(), 0);

    // 20 more arrive while the writer is busy: they queue up.
    let mut rest = Vec::new();
    for i in 2..=21 {
        let l = log.clone();
        rest.push(tokio::spawn(async move { l.append(rec(i)).await }));
    }
    let max = log.inner.tx.max_capacity();
    for _ in 0..500 {
        if max - log.inner.tx.capacity() == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(max - log.inner.tx.capacity(), 20, "20 records queued");

    go_tx.send(()).expect("release batch 1");
    assert_eq!(first.await.expect("join").expect("append").seq, 1);
    // Batch 2: all 20 written at once, then held before their single fsync.
    assert_eq!(at_sync.recv().await, Some(21));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rest.iter().all(|t| !t.is_finished()), "acknowledged before the fsync");
    assert_eq!(log.stats().durable_seq(), 1);
    go_tx.send(()).expect("release batch 2");
    for t in rest {
        assert!(t.await.expect("join").expect("append").seq <= 21);
    }
    assert_eq!(log.stats().fsyncs(), 2, "one fsync per batch");
    assert_eq!(log.stats().batches(), 2);
    assert_eq!(log.stats().durable_seq(), 21);
    // Close syncs once more on the way out, without the hook.
    drop(go_tx);
    log.close().await;
    assert!(verify(tmp.path()).ok());
}

#[tokio::test]
async fn the_record_never_contains_the_password() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = cfg(tmp.path());
    c.all_checks = true;
    let log = AuditLog::open(c).await.expect("open");
    for (i, cause) in [
        Cause::TcpRefused,
        Cause::CertExpired,
        Cause::CredInvalid,
        Cause::DirectoryError,
    ]
    .into_iter()
    .enumerate()
    {
        let inp = input(i as u64, "rdp1.example.test", Some("bob"));
        let r = AuditRecord::new(&inp, &report(i as u64, cause, "rdp1.example.test"));
        let json = serde_json::to_string(&r).expect("json");
        assert!(!json.contains("canary"), "{json}");
        assert!(!format!("{r:?}").contains("canary"));
        assert!(json.contains("\"username\":\"bob\""));
        log.record(r).await.expect("record");
    }
    log.close().await;
    for f in files(tmp.path()) {
        let s = std::fs::read_to_string(&f).expect("read");
        assert!(!s.contains("canary"), "{s}");
        assert!(!s.to_ascii_lowercase().contains("password\":"), "{s}");
    }
    let mut out = Vec::new();
    cli::execute(
        AuditCommand::List {
            source: Source {
                dir: Some(tmp.path().into()),
                config: None,
            },
            since: None,
            cause: None,
            target: None,
            account: None,
            verdict: None,
            json: true,
        },
        &mut out,
    )
    .expect("list");
    assert!(!String::from_utf8_lossy(&out).contains("canary"));
}

#[tokio::test]
async fn record_carries_certificate_and_directory_facts() {
    let r = AuditRecord::new(
        &input(1, "rdp1.example.test", Some("bob")),
        &report(1, Cause::CredInvalid, "rdp1.example.test"),
    );
    let f = &r.facts;
    assert_eq!(f.ldap_result_code, Some(49));
    assert_eq!(f.ad_data_code, "52e");
    assert_eq!(f.directory_server, "ldaps://dc1.example.test:636");
    let cert = f.certificate.as_ref().expect("cert");
    assert_eq!(cert.not_after, "2022-04-15T05:20:00.000Z");
    assert_eq!(cert.sha256_fingerprint.len(), 64);
    assert_eq!(f.selected_protocol_name.as_deref(), Some("HYBRID"));
    assert_eq!(r.target.connected.as_deref(), Some("192.0.2.10:3389"));
    let no_cred = AuditRecord::new(&input(2, "h", None), &report(2, Cause::TcpRefused, "h"));
    assert!(no_cred.account.is_none());
    let json = serde_json::to_string(&no_cred).expect("json");
    assert!(json.contains("\"account\":null"), "{json}");
    assert!(!json.contains("certificate"), "absent facts are left out: {json}");
    let back: AuditRecord = serde_json::from_str(&json).expect("round trip");
    assert_eq!(back, no_cred);
}

fn src(dir: &Path) -> Source {
    Source {
        dir: Some(dir.into()),
        config: None,
    }
}

fn run_cli(cmd: AuditCommand) -> (bool, String) {
    let mut out = Vec::new();
    let ok = cli::execute(cmd, &mut out).expect("execute");
    (ok, String::from_utf8(out).expect("utf8"))
}

async fn mixed_log(dir: &Path) {
    let log = AuditLog::open(cfg(dir)).await.expect("open");
    let cases = [
        (Cause::TcpRefused, "rdp1.example.test", Some("bob")),
        (Cause::TcpRefused, "rdp1.example.test", Some("carol")),
        (Cause::TcpRefused, "rdp2.example.test", Some("bob")),
        (Cause::CredInvalid, "rdp3.example.test", Some("bob")),
        (Cause::CertExpired, "rdp3.example.test", None),
    ];
    for (i, (cause, host, user)) in cases.into_iter().enumerate() {
        let i = i as u64 + 1;
        log.record(AuditRecord::new(&input(i, host, user), &report(i, cause, host)))
            .await
            .expect("record");
    }
    log.close().await;
}

#[tokio::test]
async fn list_filters_and_prints_a_table() {
    let tmp = tempfile::tempdir().expect("tmp");
    mixed_log(tmp.path()).await;
    let list = |cause: Option<&str>, target: Option<&str>, account: Option<&str>| {
        run_cli(AuditCommand::List {
            source: src(tmp.path()),
            since: None,
            cause: cause.map(str::to_owned),
            target: target.map(str::to_owned),
            account: account.map(str::to_owned),
            verdict: None,
            json: false,
        })
        .1
    };
    let all = list(None, None, None);
    assert!(all.starts_with("TIME"), "{all}");
    assert!(all.contains("5 record(s)"), "{all}");
    assert!(all.contains("201 TCP_REFUSED"));
    assert!(all.contains("EXAMPLE\\bob"));
    assert!(all.contains("alice@10.1.2.3"));
    assert!(list(Some("TCP_REFUSED"), None, None).contains("3 record(s)"));
    assert!(list(Some("601"), None, None).contains("1 record(s)"));
    assert!(list(None, Some("RDP3.example.test"), None).contains("2 record(s)"));
    assert!(list(None, Some("192.0.2.10"), None).contains("5 record(s)"));
    assert!(list(None, None, Some("example\\bob")).contains("3 record(s)"));
    assert!(list(Some("TCP_REFUSED"), None, Some("bob")).contains("2 record(s)"));
    // --since: the records are from 2023.
    let recent = run_cli(AuditCommand::List {
        source: src(tmp.path()),
        since: Some("24h".into()),
        cause: None,
        target: None,
        account: None,
        verdict: None,
        json: false,
    })
    .1;
    assert!(recent.contains("0 record(s)"), "{recent}");
    let json = run_cli(AuditCommand::List {
        source: src(tmp.path()),
        since: Some("2023-11-14T22:13:23Z".into()),
        cause: None,
        target: None,
        account: None,
        verdict: None,
        json: true,
    })
    .1;
    assert_eq!(json.lines().count(), 3, "{json}");
    for l in json.lines() {
        serde_json::from_str::<AuditRecord>(l).expect("stored line");
    }
}

#[tokio::test]
async fn summary_ranks_causes_owners_targets_and_accounts() {
    let tmp = tempfile::tempdir().expect("tmp");
    mixed_log(tmp.path()).await;
    let (_, s) = run_cli(AuditCommand::Summary {
        source: src(tmp.path()),
        since: None,
        top: 10,
    });
    assert!(s.starts_with("5 record(s)"), "{s}");
    let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} missing in\n{s}"));
    assert!(pos("       3  201 TCP_REFUSED  (owner server)") < pos("       1  601 CRED_INVALID"));
    assert!(s.contains("fix: Start or restart Remote Desktop Services"));
    assert!(s.contains("       4  server"), "{s}");
    assert!(s.contains("       1  vault"), "{s}");
    assert!(s.contains("       2  rdp1.example.test:3389  (TCP_REFUSED 2)"), "{s}");
    assert!(s.contains("       3  EXAMPLE\\bob  ("), "{s}");
}

#[tokio::test]
async fn verify_command_prints_the_head_and_fails_on_a_break() {
    let (tmp, path, mut l) = ten_records().await;
    let (ok, out) = run_cli(AuditCommand::Verify {
        source: src(tmp.path()),
        allow_pruned: false,
        anchors: vec![],
    });
    assert!(ok, "{out}");
    assert!(out.contains("1 file(s), 10 record(s) (seq 1..=10)"), "{out}");
    let head = out
        .lines()
        .find_map(|l| l.strip_prefix("head "))
        .expect("head line")
        .to_owned();
    assert!(out.contains("chain intact"));
    l[4] = l[4].replace("req-5", "req-X");
    write_lines(&path, &l);
    let (ok, out) = run_cli(AuditCommand::Verify {
        source: src(tmp.path()),
        allow_pruned: false,
        anchors: vec![head],
    });
    assert!(!ok);
    assert!(
        out.contains(&format!("BROKEN: {F1}:6 (seq 6): prev does not match")),
        "{out}"
    );
    assert!(out.contains(&format!("{F1}:5 (seq 5) was edited")), "{out}");
    assert!(out.contains("CHAIN BROKEN"));
}

#[tokio::test]
async fn tail_and_follow_across_rotation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = cfg(tmp.path());
    c.max_file_bytes = 4096;
    let log = AuditLog::open(c).await.expect("open");
    write_n(&log, 1, 12).await;
    let mut f = cli::Follower::new(tmp.path());
    let last = f.last(5).expect("last");
    assert_eq!(
        last.iter().map(|e| e.record.seq).collect::<Vec<_>>(),
        [8, 9, 10, 11, 12]
    );
    assert!(f.poll().expect("poll").is_empty());
    write_n(&log, 13, 10).await;
    let n = files(tmp.path()).len();
    let new = f.poll().expect("poll");
    assert_eq!(
        new.iter().map(|e| e.record.seq).collect::<Vec<_>>(),
        (13..=22).collect::<Vec<_>>()
    );
    assert!(files(tmp.path()).len() >= n);
    // A partial line is not printed until it is complete.
    write_n(&log, 23, 1).await;
    log.close().await;
    let newest = files(tmp.path()).pop().expect("file");
    let full = std::fs::read(&newest).expect("read");
    std::fs::write(&newest, &full[..full.len() - 10]).expect("write");
    assert!(f.poll().expect("poll").is_empty());
    std::fs::write(&newest, &full).expect("write");
    assert_eq!(
        f.poll().expect("poll").iter().map(|e| e.record.seq).collect::<Vec<_>>(),
        [23]
    );
    let (_, out) = run_cli(AuditCommand::Tail {
        source: src(tmp.path()),
        n: 2,
        follow: false,
        json: false,
    });
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains("  23  DENY  201 TCP_REFUSED"), "{out}");
}

#[test]
fn file_tail_finds_the_last_line_across_chunks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("f");
    let mut body = Vec::new();
    for i in 0..100 {
        body.extend_from_slice(format!("{i:0>999}\n").as_bytes());
    }
    let long = vec![b'x'; 3 * TAIL_CHUNK as usize / 2];
    body.extend_from_slice(&long);
    body.push(b'\n');
    let complete = body.len() as u64;
    body.extend_from_slice(b"torn");
    std::fs::write(&path, &body).expect("write");
    let t = file_tail(&mut File::open(&path).expect("open")).expect("tail");
    assert_eq!(t.complete, complete);
    assert_eq!(t.last, Some(long));
    std::fs::write(&path, b"only\n").expect("write");
    let t = file_tail(&mut File::open(&path).expect("open")).expect("tail");
    assert_eq!((t.complete, t.last), (5, Some(b"only".to_vec())));
    std::fs::write(&path, b"no newline").expect("write");
    let t = file_tail(&mut File::open(&path).expect("open")).expect("tail");
    assert_eq!((t.complete, t.last), (0, None));
    std::fs::write(&path, b"").expect("write");
    let t = file_tail(&mut File::open(&path).expect("open")).expect("tail");
    assert_eq!((t.complete, t.last), (0, None));
}
