//! The audit log end to end: real checks recorded through the library API, a writer killed with
//! SIGKILL under load (every acknowledged record survives, the chain verifies, a hand edit is
//! caught), and — once the service is wired — the same against `rdp-preflight serve`.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rdp_preflight::{
    audit::{
        chain,
        cli::{self, AuditCommand, Source},
        AuditConfig, AuditLog, AuditRecord, VerifyOptions,
    },
    cause::Cause,
    check::{CheckInput, Checker},
    config::FileConfig,
    report::Verdict,
    secret::{Credential, Password},
};

const CANARY: &str = "canary-Au9it-Pa55w0rd";
/// Set to the audit directory when this test binary runs as the child writer.
const CHILD_ENV: &str = "AUDIT_KILL9_CHILD_DIR";

/// A loopback port nothing listens on: every check there is DENY TCP_REFUSED.
fn refused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn checker() -> Checker {
    let mut file = FileConfig::default();
    file.policy.allow_loopback = true;
    file.cert.pin_store = "memory".into();
    Checker::new(Arc::new(file.validate().expect("valid config"))).expect("checker")
}

fn input(checker: &Checker, id: String, port: u16) -> CheckInput {
    CheckInput {
        request_id: id,
        host: "127.0.0.1".into(),
        port,
        expected_name: "127.0.0.1".into(),
        requested: checker.config().default_protocols,
        minimum: None,
        expected_computer: String::new(),
        credential: Some(Credential {
            username: "svc-rdp".into(),
            domain: "EXAMPLE".into(),
            password: Password::new(CANARY.into()),
        }),
        requester_user: "gw-operator".into(),
        requester_source: "192.0.2.7".into(),
        budget: Duration::from_secs(5),
    }
}

fn verify(dir: &Path) -> chain::Outcome {
    chain::verify_dir(dir, VerifyOptions::default()).expect("verify")
}

fn verify_cli(dir: &Path) -> (bool, String) {
    let mut out = Vec::new();
    let ok = cli::execute(
        AuditCommand::Verify {
            source: Source {
                dir: Some(dir.to_owned()),
                config: None,
            },
            allow_pruned: false,
            anchors: vec![],
        },
        &mut out,
    )
    .expect("verify runs");
    (ok, String::from_utf8(out).expect("utf8"))
}

fn all_files_text(dir: &Path) -> String {
    chain::list_files(dir)
        .expect("list")
        .iter()
        .map(|(_, p)| std::fs::read_to_string(p).expect("read"))
        .collect()
}

/// Edits the record in the middle of the first file; returns the file name and the line.
fn hand_edit(dir: &Path) -> (String, usize) {
    let (_, first) = chain::list_files(dir)
        .expect("list")
        .into_iter()
        .next()
        .expect("a file");
    let text = std::fs::read_to_string(&first).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert!(lines.len() >= 3, "need a record with a successor");
    let i = lines.len() / 2 - 1;
    let edited = lines[i].replace("\"verdict\":\"deny\"", "\"verdict\":\"allow\"");
    assert_ne!(edited, lines[i]);
    lines[i] = edited;
    std::fs::write(&first, lines.join("\n") + "\n").expect("write");
    let name = first.file_name().expect("name").to_string_lossy().into_owned();
    (name, i + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_checks_are_recorded_durably_and_verify() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("audit");
    let mut cfg = AuditConfig::new(&dir);
    cfg.max_file_bytes = 8192;
    let log = AuditLog::open(cfg).await.expect("open");
    let checker = Arc::new(checker());
    let port = refused_port();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (log, checker) = (log.clone(), checker.clone());
        tasks.push(tokio::spawn(async move {
            let inp = input(&checker, format!("req-{i}"), port);
            let report = checker.check(inp.clone()).await;
            assert_eq!(report.verdict, Verdict::Deny);
            assert_eq!(report.primary_cause, Cause::TcpRefused);
            assert!(log.wants(report.verdict));
            let receipt = log.append(AuditRecord::new(&inp, &report)).await.expect("append");
            (report.check_id, receipt.seq)
        }));
    }
    let mut acked = HashMap::new();
    for t in tasks {
        let (id, seq) = t.await.expect("join");
        acked.insert(id, seq);
    }
    log.close().await;

    let out = verify(&dir);
    assert!(out.ok(), "{:?}", out.breaks);
    assert_eq!(out.records, 40);
    assert!(out.files > 1, "rotation expected");
    let entries = chain::read_dir(&dir, |_| true).expect("read");
    for e in &entries {
        let r = &e.record;
        assert_eq!(acked.get(&r.check_id), Some(&r.seq));
        assert_eq!(r.verdict, "deny");
        assert_eq!(
            (r.primary_cause.name.as_str(), r.primary_cause.number),
            ("TCP_REFUSED", 201)
        );
        assert_eq!(r.target.host, "127.0.0.1");
        assert_eq!(r.target.port, port);
        assert_eq!(r.target.resolved, ["127.0.0.1"]);
        assert_eq!(r.account.as_ref().map(|a| a.username.as_str()), Some("svc-rdp"));
        assert_eq!(r.requester.source_address, "192.0.2.7");
        assert!(r.stages.iter().any(|s| s.stage == "tcp" && s.status == "failed"));
        assert!(!r.findings.is_empty());
    }
    assert!(
        !all_files_text(&dir).contains("canary"),
        "the password reached the audit log"
    );
}

/// Run by `kill_9_of_a_writer_loses_no_acknowledged_record` as a child process: records real
/// DENY checks from 8 tasks forever, printing `acked <seq> <check_id>` after each
/// acknowledgement.
#[test]
#[ignore = "helper: the kill -9 test runs it as a child process"]
fn kill9_child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut cfg = AuditConfig::new(dir);
        cfg.max_file_bytes = 16 * 1024;
        cfg.group_commit_max = 32;
        let log = AuditLog::open(cfg).await.expect("open");
        let checker = Arc::new(checker());
        let port = refused_port();
        let mut tasks = Vec::new();
        for w in 0..8 {
            let (log, checker) = (log.clone(), checker.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let inp = input(&checker, format!("child-{w}-{i}"), port);
                    let report = checker.check(inp.clone()).await;
                    let r = log.append(AuditRecord::new(&inp, &report)).await.expect("append");
                    println!("acked {} {}", r.seq, report.check_id);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn kill_9_of_a_writer_loses_no_acknowledged_record() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("audit");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "kill9_child_writer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child writer");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut acked: HashMap<String, u64> = HashMap::new();
    let parse = |line: &str, acked: &mut HashMap<String, u64>| {
        if let Some((seq, id)) = line.strip_prefix("acked ").and_then(|r| r.split_once(' ')) {
            acked.insert(id.to_owned(), seq.parse().expect("seq"));
        }
    };
    while acked.len() < 600 {
        let line = lines.next().expect("the child writer stopped early").expect("read");
        parse(&line, &mut acked);
    }
    // SIGKILL, mid-load: no destructor, no flush, no last fsync.
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    // Acknowledgements printed before the kill are still in the pipe.
    for line in lines.map_while(Result::ok) {
        parse(&line, &mut acked);
    }

    let out = verify(&dir);
    assert!(out.ok(), "chain broken after kill -9: {:?}", out.breaks);
    let entries = chain::read_dir(&dir, |_| true).expect("read");
    let on_disk: HashMap<&str, u64> = entries
        .iter()
        .map(|e| (e.record.check_id.as_str(), e.record.seq))
        .collect();
    for (id, seq) in &acked {
        assert_eq!(
            on_disk.get(id.as_str()),
            Some(seq),
            "acknowledged record {id} (seq {seq}) lost"
        );
    }
    assert!(out.files > 1, "rotation expected under load");

    // Reopening cuts an incomplete last line, if the kill left one, and continues the chain.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let before = out.records;
    rt.block_on(async {
        let log = AuditLog::open(AuditConfig::new(&dir)).await.expect("reopen");
        let checker = checker();
        let inp = input(&checker, "after-restart".into(), refused_port());
        let report = checker.check(inp.clone()).await;
        let r = log.append(AuditRecord::new(&inp, &report)).await.expect("append");
        assert_eq!(r.seq, before + 1);
        log.close().await;
    });
    let out = verify(&dir);
    assert!(out.ok() && out.notes.is_empty(), "{out:?}");
    let (ok, text) = verify_cli(&dir);
    assert!(ok, "{text}");
    assert!(text.contains("chain intact"), "{text}");

    // A hand-edited record makes verify fail, naming it.
    let (file, line) = hand_edit(&dir);
    let (ok, text) = verify_cli(&dir);
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("{file}:{line} (seq ")), "{text}");
    assert!(text.contains("was edited"), "{text}");
    assert!(!all_files_text(&dir).contains("canary"));
}

/// The acceptance test against the real service: needs `[audit]` wired into the
/// config, `Check` to record every DENY before answering, and `rdp-preflight audit verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn kill_9_of_the_service_under_load_loses_no_deny() {
    use integration_tests::plugin::{client, plugin_bin, serve_binary};
    use rdp_preflight_proto::v1 as pb;

    let tmp = tempfile::tempdir().expect("tmp");
    let audit_dir = tmp.path().join("audit");
    let config = tmp.path().join("plugin.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\nallow_loopback = true\n\n[cert]\npin_store = \"memory\"\n\n[audit]\ndir = \"{}\"\nmax_file_bytes = 65536\n",
            audit_dir.display()
        ),
    )
    .expect("write config");
    let mut served = serve_binary(&config, &[]);
    let endpoint = served.endpoint();
    let port = refused_port();
    let denied: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..16 {
        let (endpoint, denied, stop) = (endpoint.clone(), denied.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let req = pb::CheckRequest {
                    request_id: format!("kill9-{w}-{i}"),
                    target: Some(pb::Target {
                        host: "127.0.0.1".into(),
                        port: u32::from(port),
                        ..Default::default()
                    }),
                    credential: Some(pb::Credential {
                        username: "svc-rdp".into(),
                        domain: "EXAMPLE".into(),
                        password: CANARY.into(),
                    }),
                    requester: Some(pb::Requester {
                        user: "gw-operator".into(),
                        source_address: "192.0.2.7".into(),
                    }),
                };
                match c.check(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert_eq!(r.verdict, pb::Verdict::Deny as i32);
                        assert_eq!(r.primary_cause, 201, "TCP_REFUSED");
                        if let Ok(mut d) = denied.lock() {
                            d.push(r.check_id);
                        }
                    }
                    // The plugin is gone (killed): stop driving.
                    Err(_) => break,
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while denied.lock().map(|d| d.len()).unwrap_or(0) < 500 {
        assert!(tokio::time::Instant::now() < deadline, "too few answers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL mid-load.
    served.child.kill().expect("SIGKILL");
    served.child.wait().expect("wait");
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.await;
    }
    let denied = denied.lock().map(|d| d.clone()).unwrap_or_default();

    // Every DENY the driver received is in the audit log.
    let entries = chain::read_dir(&audit_dir, |_| true).expect("read the audit log");
    let ids: HashSet<&str> = entries.iter().map(|e| e.record.check_id.as_str()).collect();
    let missing: Vec<&String> = denied.iter().filter(|id| !ids.contains(id.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} of {} DENY answers not in the audit log: {missing:?}",
        missing.len(),
        denied.len()
    );
    assert!(!all_files_text(&audit_dir).contains("canary"));

    // `rdp-preflight audit verify` passes …
    let verify_bin = |dir: &Path| {
        let out = Command::new(plugin_bin())
            .args(["audit", "verify", "--dir"])
            .arg(dir)
            .output()
            .expect("run audit verify");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, text) = verify_bin(&audit_dir);
    assert!(ok, "{text}");
    assert!(text.contains("chain intact"), "{text}");
    // … and fails on a hand-edited record, naming it.
    let (file, line) = hand_edit(&audit_dir);
    let (ok, text) = verify_bin(&audit_dir);
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("{file}:{line} (seq ")), "{text}");
}
