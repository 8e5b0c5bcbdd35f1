//! The shared store on a real PostgreSQL (initdb in a temporary directory, a free loopback
//! port): the lockout guard's budget is global across replicas, the store behaves like the
//! in-process one, and a store that goes away fails closed and comes back by itself.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use integration_tests::{
    budget,
    plugin::{client, serve_binary, Served},
    postgres::Postgres,
    slapd::{self, Slapd},
};
use rdp_preflight::{
    cause::Cause,
    config::FileConfig,
    guard::{Admission, Guard, Limits, Outcome, Scope},
    report::Finding,
    secret::Password,
    store::{guard::PgGuardStore, Store, StoreFile},
};
use rdp_preflight_proto::v1 as pb;

const KEY: &str = "0123456789abcdef0123456789abcdef-test-hmac-key";

fn key_file(dir: &Path) -> PathBuf {
    let p = dir.join("guard.key");
    std::fs::write(&p, format!("{KEY}\n")).expect("key");
    p
}

fn store_file(pg: &Postgres, dir: &Path) -> StoreFile {
    StoreFile {
        url: Some(pg.url()),
        tls: "disable".into(),
        hmac_key_file: Some(key_file(dir)),
        ..Default::default()
    }
}

async fn pg_guard(pg: &Postgres, dir: &Path, limits: Limits) -> Guard {
    let cfg = store_file(pg, dir).validate().expect("valid").expect("store");
    let store = Store::open(cfg).await.expect("store opens");
    Guard::new(
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY.as_bytes()),
        Arc::new(PgGuardStore::new(store, limits)),
    )
}

fn pw(s: &str) -> Password {
    Password::new(s.into())
}

fn bad() -> Finding {
    Finding::new(Cause::CredInvalid, "refused")
}

/// The behaviours every guard store must have (run on memory and on PostgreSQL).
async fn compliance(g: Arc<Guard>, label: &str) {
    let a = g.account(&format!("{label}-alice@example.test"));
    // A refused password is remembered; a second distinct one takes the last slot; then refused.
    let Admission::Go(mut t) = g.admit(a, &pw("one"), Scope::DIRECTORY, &budget()).await else {
        panic!("{label}: first attempt")
    };
    t.sending();
    t.finish(Outcome::Refused(bad())).await;
    assert!(
        matches!(g.admit(a, &pw("one"), Scope::DIRECTORY, &budget()).await, Admission::Remembered(f) if f.cause == Cause::CredInvalid),
        "{label}: remembered"
    );
    let Admission::Go(mut t) = g.admit(a, &pw("two"), Scope::DIRECTORY, &budget()).await else {
        panic!("{label}: second distinct password")
    };
    t.sending();
    drop(t); // cancelled after sending: counts
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        matches!(g.admit(a, &pw("three"), Scope::DIRECTORY, &budget()).await, Admission::Refused(f) if f.cause == Cause::CredLockoutGuard),
        "{label}: budget spent"
    );
    let st = g.state(a).await.expect("state");
    assert_eq!((st.failures, st.in_flight), (2, 0), "{label}");

    // Sixteen concurrent checks, half with one password, half with others: at most the budget
    // of attempts goes out, and the ones that shared an attempt report its answer.
    let b = g.account(&format!("{label}-bob@example.test"));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let g = g.clone();
        let p = if i % 2 == 0 {
            "same".to_string()
        } else {
            format!("other-{i}")
        };
        tasks.push(tokio::spawn(async move {
            match g.admit(b, &pw(&p), Scope::DIRECTORY, &budget()).await {
                Admission::Go(mut t) => {
                    t.sending();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    t.finish(Outcome::Refused(bad())).await;
                    1u32
                }
                _ => 0,
            }
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.expect("task");
    }
    assert!(sent >= 1 && sent <= g.limits().budget, "{label}: {sent} attempts sent");

    // A proof clears the failures before it and is reused within the TTL, not for other scopes.
    let c = g.account(&format!("{label}-carol@example.test"));
    let Admission::Go(t) = g.admit(c, &pw("right"), Scope::DIRECTORY, &budget()).await else {
        panic!("{label}: carol")
    };
    t.finish(Outcome::Proven {
        findings: vec![],
        usable: true,
    })
    .await;
    assert!(
        matches!(
            g.admit(c, &pw("right"), Scope::DIRECTORY, &budget()).await,
            Admission::Proven { usable: true, .. }
        ),
        "{label}: success cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_guard_store_behaves_like_the_memory_one() {
    let pg = Postgres::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let limits = Limits::new(Duration::from_secs(900), 1, Duration::from_secs(60));
    compliance(Arc::new(Guard::memory(limits, 1000)), "memory").await;
    let g = Arc::new(pg_guard(&pg, tmp.path(), limits).await);
    compliance(g.clone(), "postgres").await;
    // Two guards on one database (two replicas) share the budget: a third guard sees bob's
    // failures and carol's proof.
    let other = pg_guard(&pg, tmp.path(), limits).await;
    let b = other.account("postgres-bob@example.test");
    assert!(matches!(
        other.admit(b, &pw("new"), Scope::DIRECTORY, &budget()).await,
        Admission::Refused(_)
    ));
    // Nothing in the table is a name or a password.
    let dump = pg.psql("SELECT account, password, findings FROM guard_attempt");
    assert!(
        !dump.contains("bob") && !dump.contains("right") && !dump.contains("other-"),
        "{dump}"
    );
    // Migrations were applied once, whoever opened the store.
    assert_eq!(pg.psql("SELECT count(*) FROM schema_migrations").trim(), "5");
}

fn replica_config(dir: &Path, name: &str, f: &FileConfig) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, toml::to_string(f).expect("toml")).expect("write config");
    p
}

fn refused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn request(id: String, port: u16, user: &str, password: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        request_id: id,
        target: Some(pb::Target {
            host: "127.0.0.1".into(),
            port: u32::from(port),
            ..Default::default()
        }),
        credential: Some(pb::Credential {
            username: user.into(),
            domain: String::new(),
            password: password.into(),
        }),
        requester: Some(pb::Requester {
            user: "tester".into(),
            source_address: "127.0.0.1".into(),
        }),
    }
}

fn credential_cause(r: &pb::CheckReport) -> Option<pb::Cause> {
    r.findings
        .iter()
        .find(|f| f.stage() == pb::Stage::Credential)
        .map(|f| f.cause())
}

/// Three `serve` replicas on one PostgreSQL, started at once (migrations race), and slapd
/// locking `guarded` at pwdMaxFailure = 3: concurrent stale-password checks spread over the
/// replicas never lock it, and slapd sees at most the budget of failed binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_lockout_budget() {
    let pg = Postgres::start();
    let s = Slapd::start(true);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut f = FileConfig::default();
    f.policy.allow_loopback = true;
    f.cert.pin_store = "memory".into();
    f.log.level = "warn".into();
    f.directory.servers = vec![s.ldaps_url()];
    f.directory.ca_file = Some(s.ca_file());
    f.directory.bind_as = slapd::DN_TEMPLATE.into();
    f.store = store_file(&pg, tmp.path());
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| replica_config(tmp.path(), &format!("r{i}"), &f))
        .collect();
    let replicas: Vec<Served> = std::thread::scope(|sc| {
        let hs: Vec<_> = paths.iter().map(|p| sc.spawn(|| serve_binary(p, &[]))).collect();
        hs.into_iter().map(|h| h.join().expect("replica starts")).collect()
    });
    assert_eq!(pg.psql("SELECT count(*) FROM schema_migrations").trim(), "5");
    let port = refused_port();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let endpoint = replicas[i % 3].endpoint();
        let pw = if i % 2 == 0 {
            "Stale-Same".to_string()
        } else {
            format!("Stale-{i}")
        };
        let user = ["guarded", "GUARDED", "Guarded"][i % 3];
        tasks.push(tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            c.check(request(format!("r-{i}"), port, user, &pw))
                .await
                .expect("answered")
                .into_inner()
        }));
    }
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.verdict(), pb::Verdict::Deny);
        let cause = credential_cause(&r);
        assert!(
            matches!(cause, Some(pb::Cause::CredInvalid | pb::Cause::CredLockoutGuard)),
            "{cause:?}"
        );
    }
    let failures = s.pwd_failure_count("guarded");
    assert!(
        failures <= 2,
        "slapd saw {failures} failed binds over 3 replicas; budget 2"
    );
    assert!(s.ldapwhoami(&slapd::user_dn("guarded"), slapd::password("guarded")));
    drop(replicas);
}

async fn health(endpoint: &str) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "preflight.v1.Preflight".into(),
    })
    .await
    .ok()
    .map(|r| r.into_inner().status)
}

async fn wait_health(endpoint: &str, want: tonic_health::pb::health_check_response::ServingStatus) {
    for _ in 0..100 {
        if health(endpoint).await == Some(want as i32) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("health never became {want:?}");
}

/// PostgreSQL stopped under load: no check binds without a reservation (the simulated AD sees
/// no bind), the credential stage says why it did not, and health goes NOT_SERVING; started
/// again: SERVING by itself and checks bind again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_fails_closed_and_health_follows() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let pg = Postgres::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let (dir, ca) = integration_tests::one_account_directory("olga", "Right-Pass-1", tmp.path()).await;
    let mut f = FileConfig::default();
    f.policy.allow_loopback = true;
    f.cert.pin_store = "memory".into();
    f.log.level = "warn".into();
    f.directory.servers = vec![dir.ldaps_url()];
    f.directory.ca_file = Some(ca);
    f.store = store_file(&pg, tmp.path());
    f.store.statement_timeout_ms = 500;
    let served = serve_binary(&replica_config(tmp.path(), "one", &f), &[]);
    let endpoint = served.endpoint();
    // A second replica records its DENYs in the store.
    let mut fa = f.clone();
    fa.audit.backend = "store".into();
    let audit_config = replica_config(tmp.path(), "audited", &fa);
    let audited = serve_binary(&audit_config, &[]);
    let mut ca = client(&audited.endpoint()).await;
    let port = refused_port();
    wait_health(&endpoint, ServingStatus::Serving).await;
    let mut c = client(&endpoint).await;
    let r = c
        .check(request("before".into(), port, "olga@example.test", "Right-Pass-1"))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(credential_cause(&r), None, "the password is right: {:?}", r.findings);
    let binds = dir.bind_count();

    pg.stop();
    // Checks keep coming while the store is down.
    for i in 0..6 {
        let r = c
            .check(request(
                format!("down-{i}"),
                port,
                "olga@example.test",
                &format!("Stale-{i}"),
            ))
            .await
            .expect("answered")
            .into_inner();
        assert_eq!(r.verdict(), pb::Verdict::Deny);
        assert_eq!(
            credential_cause(&r),
            Some(pb::Cause::CredLockoutGuard),
            "{:?}",
            r.findings
        );
        let f = r
            .findings
            .iter()
            .find(|f| f.stage() == pb::Stage::Credential)
            .expect("finding");
        assert!(f.message.contains("cannot count"), "{}", f.message);
    }
    assert_eq!(dir.bind_count(), binds, "no bind without a reservation");
    wait_health(&endpoint, ServingStatus::NotServing).await;
    // A DENY that cannot be recorded is never answered as if it were: the gateway gets an error.
    for i in 0..3 {
        let mut req = request(format!("unrecorded-{i}"), port, "", "");
        req.credential = None;
        let st = ca
            .check(req)
            .await
            .expect_err("a DENY the store cannot record is an error");
        assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    }

    pg.restart();
    pg.wait_ready();
    wait_health(&endpoint, ServingStatus::Serving).await;
    let r = c
        .check(request("after".into(), port, "olga@example.test", "Stale-after"))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(credential_cause(&r), Some(pb::Cause::CredInvalid), "{:?}", r.findings);
    assert_eq!(dir.bind_count(), binds + 1);
    // The audited replica records again, and none of the refused answers is in the store.
    let mut req = request("recorded-after".into(), port, "", "");
    req.credential = None;
    let r = ca.check(req).await.expect("recorded").into_inner();
    assert_eq!(r.verdict(), pb::Verdict::Deny);
    let (ok, listed) = audit_cli(&audit_config, &["list", "--json"]);
    assert!(ok && listed.contains("\"recorded-after\""), "{listed}");
    assert!(!listed.contains("unrecorded-"), "{listed}");
    assert!(audit_cli(&audit_config, &["verify"]).0);
}

/// Config errors name the key; `disable` is refused towards a non-loopback address.
#[test]
fn store_config_errors_name_the_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = StoreFile {
        url: Some("postgres://preflight@db.example.test:5432/preflight".into()),
        hmac_key_file: Some(key_file(tmp.path())),
        ..Default::default()
    };
    let err = |f: StoreFile| f.validate().expect_err("invalid");
    assert!(err(base.clone()).starts_with("store.ca_file"));
    assert!(err(StoreFile {
        tls: "disable".into(),
        ..base.clone()
    })
    .starts_with("store.tls"));
    assert!(err(StoreFile {
        url: Some("postgres://u:secret@127.0.0.1/db".into()),
        tls: "disable".into(),
        ..base.clone()
    })
    .starts_with("store.url"));
    assert!(err(StoreFile {
        tls: "disable".into(),
        url: Some("postgres://u@127.0.0.1/db".into()),
        hmac_key_file: None,
        ..base.clone()
    })
    .starts_with("store.hmac_key_file"));
    let short = tmp.path().join("short.key");
    std::fs::write(&short, "too-short").expect("write");
    assert!(err(StoreFile {
        tls: "disable".into(),
        url: Some("postgres://u@127.0.0.1/db".into()),
        hmac_key_file: Some(short),
        ..base
    })
    .starts_with("store.hmac_key_file"));
    assert!(StoreFile::default().validate().expect("unset is fine").is_none());
}

fn audit_cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(integration_tests::plugin::plugin_bin())
        .arg("audit")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run audit");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `[audit] backend = "store"`: two replicas write DENYs to one chain in PostgreSQL; one is
/// killed with SIGKILL under load. Every DENY a client received is in the store and `audit
/// verify` passes; an UPDATE and DELETEs made with psql make it fail, naming the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_log_in_the_store_survives_sigkill_and_shows_edits() {
    let pg = Postgres::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut f = FileConfig::default();
    f.policy.allow_loopback = true;
    f.cert.pin_store = "memory".into();
    f.log.level = "warn".into();
    f.audit.backend = "store".into();
    f.store = store_file(&pg, tmp.path());
    let config = replica_config(tmp.path(), "audit", &f);
    let mut replicas = vec![serve_binary(&config, &[]), serve_binary(&config, &[])];
    let endpoints: Vec<String> = replicas.iter().map(Served::endpoint).collect();
    let port = refused_port();
    let denied = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (endpoint, denied, stop) = (endpoints[w % 2].clone(), denied.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let id = format!("audit-{w}-{i}");
                let mut req = request(id.clone(), port, "", "");
                req.credential = None;
                match c.check(req).await {
                    Ok(r) if r.get_ref().verdict() == pb::Verdict::Deny => {
                        denied.lock().expect("lock").push(id);
                    }
                    Ok(_) => panic!("a refused port is a DENY"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replicas[0].child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    drop(replicas);
    let denied = denied.lock().expect("lock").clone();
    assert!(denied.len() > 20, "only {} DENYs under load", denied.len());

    let (ok, text) = audit_cli(&config, &["verify"]);
    assert!(ok && text.contains("chain intact"), "{text}");
    let (ok, listed) = audit_cli(&config, &["list", "--json"]);
    assert!(ok, "{listed}");
    for id in &denied {
        assert!(
            listed.contains(&format!("\"{id}\"")),
            "DENY {id} answered but not in the store"
        );
    }
    let (ok, summary) = audit_cli(&config, &["summary"]);
    assert!(ok && summary.contains("TCP_REFUSED"), "{summary}");

    // An UPDATE of record 3 is named.
    pg.psql("UPDATE audit_record SET line = replace(line, 'TCP_REFUSED', 'TCP_TIMEOUT') WHERE seq = 3");
    let (ok, text) = audit_cli(&config, &["verify"]);
    assert!(!ok && text.contains("seq 3") && text.contains("edited"), "{text}");
    pg.psql("UPDATE audit_record SET line = replace(line, 'TCP_TIMEOUT', 'TCP_REFUSED') WHERE seq = 3");
    assert!(audit_cli(&config, &["verify"]).0, "restored");
    // A DELETE of the tail is named by the signed head.
    let last: i64 = pg
        .psql("SELECT max(seq) FROM audit_record")
        .trim()
        .parse()
        .expect("seq");
    pg.psql(&format!("DELETE FROM audit_record WHERE seq = {last}"));
    let (ok, text) = audit_cli(&config, &["verify"]);
    assert!(!ok && text.contains(&format!("{last}..={last} were deleted")), "{text}");
    // A DELETE in the middle is a gap.
    pg.psql("DELETE FROM audit_record WHERE seq = 5");
    let (ok, text) = audit_cli(&config, &["verify"]);
    assert!(!ok && text.contains("seq gap"), "{text}");
    // Moving the head back by hand breaks its signature.
    pg.psql("UPDATE audit_head SET seq = seq - 1");
    let (ok, text) = audit_cli(&config, &["verify"]);
    assert!(!ok && text.contains("signature"), "{text}");
}

/// `store.tls = "require"`: TLS through rustls, verified against `store.ca_file`; a database
/// whose certificate another CA issued is refused, never used in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_over_tls_is_verified() {
    let pg = Postgres::start_tls();
    let tmp = tempfile::tempdir().expect("tmp");
    let f = StoreFile {
        url: Some(pg.url()),
        tls: "require".into(),
        ca_file: pg.ca_file.clone(),
        hmac_key_file: Some(key_file(tmp.path())),
        ..Default::default()
    };
    let store = Store::open(f.validate().expect("valid").expect("store"))
        .await
        .expect("TLS store opens");
    assert!(store.probe().await);
    // Every connection of the pool is encrypted.
    let ssl = pg.psql("SELECT count(*) FILTER (WHERE NOT ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'postgres' AND application_name <> 'psql'");
    assert_eq!(ssl.trim(), "0", "a plain connection was made");
    // Another CA: refused.
    let other = tmp.path().join("other-ca.pem");
    std::fs::write(&other, slapd::test_ca_and_cert().0).expect("write");
    let bad = StoreFile {
        ca_file: Some(other),
        ..f
    };
    let e = Store::open(bad.validate().expect("valid").expect("store"))
        .await
        .expect_err("an unknown CA is refused");
    assert!(e.contains("store"), "{e}");
}

/// `cert.pin_store = "auto"` with the store: a pin recorded by one replica is enforced by
/// another after the certificate changes (a target that presents a new certificate on every
/// connection), whereas a replica with pins of its own would take the change as a first sight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pin_recorded_by_one_replica_is_enforced_by_the_others() {
    let pg = Postgres::start();
    let scenario = gateway_sim::scenario::Scenario::parse(
        "[[target]]\nname = \"rotating\"\nbehavior = \"healthy\"\ncert = \"rotating\"\n",
    )
    .expect("scenario");
    let harness = gateway_sim::demo::Harness::start(&scenario).await.expect("fleet");
    let addr = harness.env.fleet.addr("rotating").expect("target");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut f = harness.plugin_config.clone();
    f.cert.pin_store = "auto".into();
    f.store = store_file(&pg, tmp.path());
    let config = replica_config(tmp.path(), "pins", &f);
    let (a, b) = (serve_binary(&config, &[]), serve_binary(&config, &[]));
    let check = |endpoint: String, id: &'static str| async move {
        let mut c = client(&endpoint).await;
        let mut req = request(id.into(), addr.port(), "", "");
        req.credential = None;
        req.target = Some(pb::Target {
            host: addr.ip().to_string(),
            port: u32::from(addr.port()),
            expected_name: "rotating".into(),
            ..Default::default()
        });
        c.check(req).await.expect("answered").into_inner()
    };
    let first = check(a.endpoint(), "pin-first").await;
    assert!(
        !first.findings.iter().any(|f| f.cause() == pb::Cause::CertPinMismatch),
        "first sight: {:?}",
        first.findings
    );
    let second = check(b.endpoint(), "pin-other-replica").await;
    assert_eq!(second.verdict(), pb::Verdict::Deny, "{:?}", second.findings);
    assert_eq!(second.primary_cause(), pb::Cause::CertPinMismatch);
    let pinned = pg.psql("SELECT target, expected_name FROM pin");
    assert!(
        pinned.contains(&addr.to_string()) && pinned.contains("rotating"),
        "{pinned}"
    );
    // A store that cannot answer is a finding, not a first sight.
    pg.stop();
    let third = check(b.endpoint(), "pin-store-down").await;
    let f = third.findings.iter().find(|f| {
        f.evidence
            .iter()
            .any(|e| e.key == "pin_store" && e.value == "unreadable")
    });
    assert!(f.is_some(), "{:?}", third.findings);
}
