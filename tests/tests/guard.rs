//! The lockout guard as an invariant, tested where it breaks: bursts of concurrent checks with
//! the same and with different stale passwords, the same account spelled four ways, a bind
//! whose answer comes after the timeout, a failed NLA logon behind a success cache, a severity
//! override, and a target that has not proven who it is. Against real slapd (ppolicy lockout),
//! the simulated AD and the simulated CredSSP targets (which count the binds and AUTHENTICATE
//! messages they receive), and FreeRDP's shadow server.

use std::{sync::Arc, time::Duration};

use gateway_sim::{
    demo::Harness,
    directory::{start_directory, Directory, DirectoryOptions},
    driver::DirectoryHandle,
    scenario::{Account, Scenario},
};
use integration_tests::{
    budget, cred,
    shadow::{self, Shadow},
    slapd::{self, Slapd},
};
use rdp_preflight::{
    cause::{Cause, Stage},
    check::{CheckInput, Checker},
    config::FileConfig,
    credential::{CredentialChecker, CredentialOutcome, DirectoryFile},
    guard::{identity::Domains, Guard, Limits},
    report::{Report, Verdict},
    secret::Credential,
};

fn cause(o: &CredentialOutcome) -> Cause {
    o.findings.first().map_or(Cause::Ok, |f| f.cause)
}

fn shared_guard(max_distinct: u32) -> Arc<Guard> {
    Arc::new(Guard::memory(
        Limits::new(Duration::from_secs(900), max_distinct, Duration::ZERO),
        1000,
    ))
}

/// Runs `n` checks at once; returns their outcomes.
async fn burst(checks: Vec<(Arc<CredentialChecker>, Credential)>) -> Vec<CredentialOutcome> {
    let mut tasks = Vec::new();
    for (c, cr) in checks {
        tasks.push(tokio::spawn(async move { c.check(&cr, &budget()).await }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("check task"));
    }
    out
}

// ------------------------------------------------------------------------------ directory

/// slapd locks `guarded` at pwdMaxFailure = 3. Sixteen checks at once, the DN spelled three
/// ways through a DN template and found by a search (two checkers sharing one guard), eight
/// with one stale password and eight with eight others: the directory sees at most the budget
/// (2) of failed binds and the account is not locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slapd_bursts_in_every_spelling_never_lock() {
    let s = Slapd::start(true);
    let tmp = tempfile::tempdir().expect("tmp");
    let pw_file = tmp.path().join("svc.pw");
    std::fs::write(&pw_file, format!("{}\n", slapd::SERVICE_PW)).expect("write");
    let base = DirectoryFile {
        servers: vec![s.ldaps_url()],
        ca_file: Some(s.ca_file()),
        bind_as: slapd::DN_TEMPLATE.into(),
        ..Default::default()
    };
    let search = DirectoryFile {
        bind_as: "search".into(),
        service_dn: Some(slapd::SERVICE_DN.into()),
        service_password_file: Some(pw_file),
        search_base: Some(format!("ou=people,{}", slapd::SUFFIX)),
        ..base.clone()
    };
    let guard = shared_guard(1);
    let checker = |f: &DirectoryFile| {
        Arc::new(CredentialChecker::new(
            f.validate().expect("valid").expect("servers"),
            guard.clone(),
            Domains::default(),
        ))
    };
    let (by_template, by_search) = (checker(&base), checker(&search));
    let spellings = ["guarded", "GUARDED", " Guarded ", "gUaRdEd"];
    let mut checks = Vec::new();
    for i in 0..16 {
        let c = if i % 2 == 0 { &by_template } else { &by_search };
        let pw = if i < 8 {
            "Stale-Same".to_string()
        } else {
            format!("Stale-{i}")
        };
        checks.push((c.clone(), cred(spellings[i % 4], "", &pw)));
    }
    let outcomes = burst(checks).await;
    for o in &outcomes {
        assert!(!o.bind_succeeded, "{o:?}");
        assert!(
            matches!(cause(o), Cause::CredInvalid | Cause::CredLockoutGuard),
            "{o:?}"
        );
    }
    let failures = s.pwd_failure_count("guarded");
    assert!(failures <= 2, "slapd saw {failures} failed binds, budget 2");
    assert!(failures < slapd::MAX_FAILURE);
    // Not locked: the right password still binds.
    assert!(s.ldapwhoami(&slapd::user_dn("guarded"), slapd::password("guarded")));
}

fn sim_account(name: &str, pw: &str) -> Account {
    Account {
        name: name.into(),
        password: pw.into(),
        state: "good".into(),
        domain: None,
    }
}

fn sim_file(dir: &Directory, bind_as: &str, tmp: &std::path::Path) -> DirectoryFile {
    let ca = tmp.join("directory-ca.pem");
    std::fs::write(&ca, dir.ca_pem()).expect("write");
    DirectoryFile {
        servers: vec![dir.ldaps_url()],
        ca_file: Some(ca),
        bind_as: bind_as.into(),
        domains: [("EXAMPLE".to_string(), "example.test".to_string())].into(),
        ..Default::default()
    }
}

/// The simulated AD locks at 3. `erin` + `EXAMPLE`, `erin@example.test`, `EXAMPLE\erin` and
/// `ERIN` + `example.test` are one account: a burst of the same and of different stale
/// passwords over all four reaches the directory at most twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_ad_bursts_in_every_spelling_never_lock() {
    let dir = start_directory(
        &[sim_account("erin", "Right-Pass-1")],
        DirectoryOptions {
            lockout_threshold: 3,
            ..Default::default()
        },
    )
    .await
    .expect("directory");
    let tmp = tempfile::tempdir().expect("tmp");
    let f = sim_file(&dir, "upn", tmp.path());
    let c = Arc::new(CredentialChecker::standalone(
        f.validate().expect("valid").expect("servers"),
        f.domains().expect("domains"),
    ));
    let spellings = [
        ("erin", "EXAMPLE"),
        ("erin@example.test", ""),
        ("EXAMPLE\\erin", ""),
        ("ERIN", "example.test"),
    ];
    for round in 0..2 {
        let mut checks = Vec::new();
        for i in 0..16 {
            let (u, d) = spellings[i % 4];
            let pw = if i % 2 == 0 {
                format!("Stale-Same-{round}")
            } else {
                format!("Stale-{round}-{i}")
            };
            checks.push((c.clone(), cred(u, d, &pw)));
        }
        for o in burst(checks).await {
            assert!(!o.bind_succeeded, "{o:?}");
            assert!(
                matches!(cause(&o), Cause::CredInvalid | Cause::CredLockoutGuard),
                "{o:?}"
            );
        }
    }
    assert!(dir.bind_count() <= 2, "the directory saw {} binds", dir.bind_count());
    let bad = dir.bad_pwd_count("erin").expect("erin");
    assert!(bad <= 2, "badPwdCount {bad}, budget 2, threshold 3");
    // Not locked: a checker that has not seen the failures proves the right password.
    let fresh = CredentialChecker::standalone(f.validate().expect("valid").expect("servers"), Domains::default());
    let o = fresh.check(&cred("erin", "EXAMPLE", "Right-Pass-1"), &budget()).await;
    assert!(o.bind_succeeded, "{o:?}");
}

/// A directory that answers every bind after the bind timeout: each attempt is counted (the
/// directory did count it), never resent, and the checks that waited on one share its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_bind_answer_is_counted_never_resent() {
    let dir = start_directory(
        &[sim_account("lena", "Right-Pass-1")],
        DirectoryOptions {
            lockout_threshold: 5,
            bind_delay: Duration::from_millis(700),
            ..Default::default()
        },
    )
    .await
    .expect("directory");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut f = sim_file(&dir, "upn", tmp.path());
    f.bind_timeout_ms = 150;
    let c = Arc::new(CredentialChecker::standalone(
        f.validate().expect("valid").expect("servers"),
        f.domains().expect("domains"),
    ));
    // Five at once with one stale password: one bind, five DIRECTORY_TIMEOUT answers.
    let checks = (0..5)
        .map(|_| (c.clone(), cred("lena", "EXAMPLE", "Stale-1")))
        .collect();
    for o in burst(checks).await {
        assert_eq!(cause(&o), Cause::DirectoryTimeout, "{o:?}");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(dir.bind_count(), 1, "one bind for five checks, never resent");
    // The outcome was unknown: the same password may spend the budget's second slot …
    let o = c.check(&cred("lena", "EXAMPLE", "Stale-1"), &budget()).await;
    assert_eq!(cause(&o), Cause::DirectoryTimeout, "{o:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(dir.bind_count(), 2);
    // … and then nothing more is sent, whatever the password.
    for pw in ["Stale-1", "Stale-2", "Right-Pass-1"] {
        let o = c.check(&cred("lena@example.test", "", pw), &budget()).await;
        assert_eq!(cause(&o), Cause::CredLockoutGuard, "{pw}: {o:?}");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(dir.bind_count(), 2, "the guard sent nothing past the budget");
    assert_eq!(dir.bad_pwd_count("lena"), Some(2));
}

// ------------------------------------------------------------------------------ NLA

const NLA_SCENARIO: &str = r#"
[[target]]
name = "nla-ok"
behavior = "nla_healthy"
computer = "RDP-GUARD01"

[[target]]
name = "nla-refuse"
behavior = "nla_error"

[[target]]
name = "nla-ntlm-blocked"
behavior = "nla_error"
ntstatus = 0xC0000418

[[account]]
name = "nina"
password = "Nla-Pass-1"
state = "good"
"#;

struct Nla {
    harness: Harness,
}

impl Nla {
    async fn start() -> Nla {
        let scenario = Scenario::parse(NLA_SCENARIO).expect("scenario");
        Nla {
            harness: Harness::start(&scenario).await.expect("fleet"),
        }
    }

    /// Trusts the fleet's CA; no directory.
    fn config(&self) -> FileConfig {
        let mut cfg = self.harness.nla_only_config();
        cfg.directory.domains = [("SIMDOM".to_string(), "simdom.test".to_string())].into();
        cfg
    }

    fn authenticates(&self, target: &str) -> u64 {
        self.harness.env.fleet.authenticates(target).expect("target")
    }

    fn input(&self, target: &str, c: Option<Credential>) -> CheckInput {
        let addr = self.harness.env.fleet.addr(target).expect("target");
        input(&addr.ip().to_string(), addr.port(), target, "", c)
    }
}

fn input(host: &str, port: u16, expected_name: &str, expected_computer: &str, c: Option<Credential>) -> CheckInput {
    CheckInput {
        request_id: "guard-test".into(),
        host: host.into(),
        port,
        expected_name: expected_name.into(),
        requested: 3,
        minimum: None,
        expected_computer: expected_computer.into(),
        credential: c,
        requester_user: "tester".into(),
        requester_source: "127.0.0.1".into(),
        budget: Duration::from_secs(10),
    }
}

fn checker(cfg: &FileConfig) -> Arc<Checker> {
    Arc::new(Checker::new(Arc::new(cfg.validate().expect("valid config"))).expect("checker"))
}

fn causes(r: &Report) -> Vec<Cause> {
    r.findings.iter().map(|(f, _)| f.cause).collect()
}

async fn run_all(c: &Arc<Checker>, inputs: Vec<CheckInput>) -> Vec<Report> {
    let tasks: Vec<_> = inputs
        .into_iter()
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.check(i).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("check task"));
    }
    out
}

/// No directory: the target alone judges the credential. Repeated and concurrent stale
/// passwords, spelled four ways, are never ALLOWed and the target receives at most the budget
/// of AUTHENTICATE messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_directory_stale_passwords_are_never_allowed() {
    let nla = Nla::start().await;
    let c = checker(&nla.config());
    let spell = ["nina", "NINA", "SIMDOM\\nina", "nina@simdom.test"];
    let mut seq = Vec::new();
    for (i, pw) in ["Stale-1", "Stale-1", "Stale-2", "Stale-3", "Stale-1"]
        .iter()
        .enumerate()
    {
        let r = c
            .check(nla.input("nla-ok", Some(cred(spell[i % 4], if i == 1 { "." } else { "" }, pw))))
            .await;
        assert_eq!(r.verdict, Verdict::Deny, "{pw}: {:?}", causes(&r));
        seq.push(r.primary_cause);
    }
    assert_eq!(
        seq,
        vec![
            Cause::NlaLogonFailed,
            Cause::NlaLogonFailed, // from memory, stage nla
            Cause::NlaLogonFailed,
            Cause::CredLockoutGuard,
            Cause::NlaLogonFailed,
        ]
    );
    assert_eq!(nla.authenticates("nla-ok"), 2);
    // A burst of new stale passwords: all denied, nothing more sent.
    let inputs = (0..8)
        .map(|i| nla.input("nla-ok", Some(cred(spell[i % 4], "", &format!("Burst-{i}")))))
        .collect();
    for r in run_all(&c, inputs).await {
        assert_eq!(r.verdict, Verdict::Deny, "{:?}", causes(&r));
        assert_eq!(r.primary_cause, Cause::CredLockoutGuard);
        let f = r.findings.iter().find(|(f, _)| f.cause == Cause::CredLockoutGuard);
        assert_eq!(f.map(|(f, _)| f.stage), Some(Stage::Nla));
    }
    assert_eq!(nla.authenticates("nla-ok"), 2);

    // A fresh plugin, eight concurrent checks with one stale password and eight with others:
    // still at most the budget.
    let nla = Nla::start().await;
    let c = checker(&nla.config());
    let inputs = (0..16)
        .map(|i| {
            let pw = if i < 8 {
                "Same".to_string()
            } else {
                format!("Other-{i}")
            };
            nla.input("nla-ok", Some(cred(spell[i % 4], "", &pw)))
        })
        .collect();
    for r in run_all(&c, inputs).await {
        assert_eq!(r.verdict, Verdict::Deny, "{:?}", causes(&r));
    }
    assert!(
        nla.authenticates("nla-ok") <= 2,
        "{} AUTHENTICATEs",
        nla.authenticates("nla-ok")
    );
}

/// With a success cache, a password the directory proved right and the target then refused is
/// not tried on the target again: the failed logon forgets the proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_nla_logon_behind_the_success_cache_is_not_retried() {
    let nla = Nla::start().await;
    let mut cfg = nla.harness.plugin_config.clone();
    cfg.directory.success_cache_ttl_secs = 300;
    cfg.directory.bind_as = "upn".into();
    let c = checker(&cfg);
    let Some(DirectoryHandle::Local(dir)) = nla.harness.env.directory.as_ref() else {
        panic!("the scenario's directory runs in process")
    };
    let good = || Some(cred("nina", "EXAMPLE", "Nla-Pass-1"));
    // The directory proves the password; the target refuses the logon.
    let r = c.check(nla.input("nla-refuse", good())).await;
    assert_eq!(r.primary_cause, Cause::NlaLogonFailed, "{:?}", causes(&r));
    assert_eq!(nla.authenticates("nla-refuse"), 1);
    let binds = dir.bind_count();
    // Next check: no bind (remembered), no logon.
    let r = c.check(nla.input("nla-refuse", good())).await;
    assert_eq!(r.verdict, Verdict::Deny);
    assert_eq!(r.primary_cause, Cause::NlaLogonFailed, "{:?}", causes(&r));
    assert!(r.credential.from_memory);
    assert_eq!(nla.authenticates("nla-refuse"), 1, "no second logon");
    assert_eq!(dir.bind_count(), binds, "no bind either");
}

/// `NLA_LOGON_FAILED = "warn"` changes the verdict, not the guard's accounting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_severity_override_does_not_stop_the_counting() {
    let nla = Nla::start().await;
    let mut cfg = nla.config();
    cfg.severity
        .insert("NLA_LOGON_FAILED".into(), rdp_preflight::cause::Severity::Warn);
    let c = checker(&cfg);
    let r = c
        .check(nla.input("nla-refuse", Some(cred("nina", "", "Stale-1"))))
        .await;
    assert_eq!(r.verdict, Verdict::AllowWithWarnings, "{:?}", causes(&r));
    assert_eq!(nla.authenticates("nla-refuse"), 1);
    let r = c
        .check(nla.input("nla-refuse", Some(cred("nina", "", "Stale-1"))))
        .await;
    assert_eq!(r.primary_cause, Cause::NlaLogonFailed);
    assert_eq!(nla.authenticates("nla-refuse"), 1, "remembered");
    let _ = c
        .check(nla.input("nla-refuse", Some(cred("nina", "", "Stale-2"))))
        .await;
    assert_eq!(nla.authenticates("nla-refuse"), 2);
    let r = c
        .check(nla.input("nla-refuse", Some(cred("nina", "", "Stale-3"))))
        .await;
    assert_eq!(r.verdict, Verdict::Deny);
    assert_eq!(r.primary_cause, Cause::CredLockoutGuard);
    assert_eq!(nla.authenticates("nla-refuse"), 2, "budget spent");
}

/// A target whose certificate does not verify and whose pin is seen for the first time gets no
/// AUTHENTICATE under `nla.logon = "auto"`; once the pin recorded then matches, it does.
/// `"always"` restores the old behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_first_seen_target_gets_no_authenticate() {
    let nla = Nla::start().await;
    let mut cfg = nla.config();
    cfg.cert.trust_anchors.clear();
    let c = checker(&cfg);
    let good = || Some(cred("nina", "", "Nla-Pass-1"));
    let r = c.check(nla.input("nla-ok", good())).await;
    assert_eq!(nla.authenticates("nla-ok"), 0);
    assert_eq!(r.nla.logon, "not_attempted");
    let detail = &r
        .stages
        .iter()
        .find(|s| s.stage == Stage::Nla)
        .expect("nla stage")
        .detail;
    assert!(detail.contains("has not proven who it is"), "{detail}");
    // Second sight: the pin recorded on first use matches.
    let r = c.check(nla.input("nla-ok", good())).await;
    assert_eq!(nla.authenticates("nla-ok"), 1);
    assert_eq!(r.nla.logon, "accepted", "{:?}", causes(&r));
    // expected_computer that matches the challenge is proof enough, even on first sight.
    let c2 = checker(&cfg);
    let addr = nla.harness.env.fleet.addr("nla-ok").expect("addr");
    let r = c2
        .check(input(
            &addr.ip().to_string(),
            addr.port(),
            "nla-ok",
            "RDP-GUARD01",
            good(),
        ))
        .await;
    assert_eq!(r.nla.logon, "accepted", "{:?}", causes(&r));
    assert_eq!(nla.authenticates("nla-ok"), 2);
    // "always": the old behaviour.
    cfg.nla.logon = "always".into();
    let r = checker(&cfg).check(nla.input("nla-ok", good())).await;
    assert_eq!(r.nla.logon, "accepted");
    assert_eq!(nla.authenticates("nla-ok"), 3);
}

/// A request whose domain contradicts its UPN is refused before any check.
#[test]
fn a_domain_contradicting_the_upn_is_invalid_argument() {
    let mut cfg = FileConfig::default();
    cfg.directory.domains = [("EXAMPLE".to_string(), "example.test".to_string())].into();
    let cfg = cfg.validate().expect("valid");
    let req = |user: &str, domain: &str| rdp_preflight_proto::v1::CheckRequest {
        request_id: "r1".into(),
        target: Some(rdp_preflight_proto::v1::Target {
            host: "rdp1.example.test".into(),
            ..Default::default()
        }),
        credential: Some(rdp_preflight_proto::v1::Credential {
            username: user.into(),
            domain: domain.into(),
            password: "canary-Secret-1".into(),
        }),
        requester: None,
    };
    for (u, d) in [("alice@example.test", "OTHER.TEST"), ("OTHER\\alice", "EXAMPLE")] {
        let st = rdp_preflight::service::validate(req(u, d), &cfg, None).expect_err("contradiction");
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        assert!(st.message().contains("credential.domain"), "{}", st.message());
        assert!(!st.message().contains("canary"));
    }
    for (u, d) in [
        ("alice@example.test", "EXAMPLE"),
        ("EXAMPLE\\alice", ""),
        ("alice", "EXAMPLE"),
    ] {
        assert!(
            rdp_preflight::service::validate(req(u, d), &cfg, None).is_ok(),
            "{u} {d}"
        );
    }
}

/// FreeRDP's shadow server judges the credential (no directory): repeated and concurrent stale
/// passwords are never ALLOWed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_server_stale_passwords_are_never_allowed() {
    let sh = Shadow::start();
    let mut cfg = FileConfig::default();
    cfg.policy.allow_loopback = true;
    cfg.cert.pin_store = "memory".into();
    cfg.log.level = "warn".into();
    // The shadow server's certificate is self-signed: prove the target by its computer name.
    let computer = {
        let c = checker(&cfg);
        let r = c.check(input("127.0.0.1", sh.port, "127.0.0.1", "", None)).await;
        assert!(!r.nla.netbios_computer.is_empty(), "{:?}", causes(&r));
        r.nla.netbios_computer
    };
    let c = checker(&cfg);
    let user = shadow::USERS[0].0;
    let mk = |pw: &str| input("127.0.0.1", sh.port, "127.0.0.1", &computer, Some(cred(user, "", pw)));
    for pw in ["Stale-1", "Stale-1", "Stale-2", "Stale-3"] {
        let r = c.check(mk(pw)).await;
        assert_eq!(r.verdict, Verdict::Deny, "{pw}: {:?}", causes(&r));
    }
    let inputs = (0..6).map(|i| mk(&format!("Burst-{}", i % 3))).collect();
    for r in run_all(&c, inputs).await {
        assert_eq!(r.verdict, Verdict::Deny, "{:?}", causes(&r));
        assert_eq!(r.primary_cause, Cause::CredLockoutGuard);
    }
    // The right password, on a plugin that has not seen the failures, is accepted: the shadow
    // server itself has no lockout, so this proves the checks above were refusals, not a
    // broken server.
    let r = checker(&cfg).check(mk(shadow::password(user))).await;
    assert_eq!(r.nla.logon, "accepted", "{:?}", causes(&r));
}

/// `read_lockout_state` reads the account's own policy: an AD PSO (through
/// `msDS-ResultantPSO`) with a lower threshold than the domain's wins, and a PSO that cannot be
/// read refuses the bind (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_lockout_state_uses_the_pso_and_fails_closed() {
    let dir = start_directory(
        &[
            sim_account("svc", "Service-Pass-1"),
            sim_account("pat", "Right-Pass-1"),
            sim_account("quin", "Right-Pass-2"),
        ],
        DirectoryOptions {
            lockout_threshold: 10,
            pso: vec![("pat".into(), Some(2)), ("quin".into(), None)],
            ..Default::default()
        },
    )
    .await
    .expect("directory");
    let tmp = tempfile::tempdir().expect("tmp");
    // Someone else's bad password: badPwdCount 1 for pat.
    let other = CredentialChecker::standalone(
        sim_file(&dir, "upn", tmp.path())
            .validate()
            .expect("valid")
            .expect("servers"),
        Domains::default(),
    );
    let o = other.check(&cred("pat", "EXAMPLE", "Someone-Else"), &budget()).await;
    assert_eq!(cause(&o), Cause::CredInvalid);
    assert_eq!(dir.bad_pwd_count("pat"), Some(1));

    let pw = tmp.path().join("svc.pw");
    std::fs::write(&pw, "Service-Pass-1\n").expect("write");
    let mut f = sim_file(&dir, "search", tmp.path());
    f.service_dn = Some(dir.user_dn("svc"));
    f.service_password_file = Some(pw);
    f.search_base = Some(dir.base_dn().to_string());
    f.read_lockout_state = true;
    let c = CredentialChecker::standalone(f.validate().expect("valid").expect("servers"), Domains::default());
    let binds = dir.bind_count();
    let o = c.check(&cred("pat", "", "Stale-1"), &budget()).await;
    assert_eq!(cause(&o), Cause::CredLockoutGuard, "{o:?}");
    let ev = |k: &str| {
        o.findings[0]
            .evidence
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(ev("lockout_threshold").as_deref(), Some("2"));
    assert!(ev("lockout_state_source").is_some_and(|s| s.contains("PSO")));
    assert_eq!(dir.bind_count(), binds + 1, "only the service account bound");
    assert_eq!(dir.bad_pwd_count("pat"), Some(1));

    // quin's PSO is unreadable: no bind, whatever the password.
    let o = c.check(&cred("quin", "", "Right-Pass-2"), &budget()).await;
    assert_eq!(cause(&o), Cause::CredLockoutGuard, "{o:?}");
    assert!(o.findings[0]
        .evidence
        .contains(&("lockout_state".into(), "unreadable".into())));
    assert_eq!(dir.bad_pwd_count("quin"), Some(0));
}

/// A target that refuses NTLM itself (STATUS_NTLM_BLOCKED) never checked the password: the
/// answer is NLA_NTLM_REFUSED (a warning), and the guard does not count it as a bad password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ntlm_refused_by_the_target_is_not_a_bad_password() {
    let nla = Nla::start().await;
    let c = checker(&nla.config());
    for (i, pw) in ["Stale-1", "Stale-2", "Stale-3", "Stale-4"].iter().enumerate() {
        let r = c.check(nla.input("nla-ntlm-blocked", Some(cred("nina", "", pw)))).await;
        assert_eq!(r.primary_cause, Cause::NlaNtlmRefused, "{:?}", causes(&r));
        assert_eq!(r.verdict, Verdict::AllowWithWarnings);
        assert_eq!(nla.authenticates("nla-ntlm-blocked"), i as u64 + 1);
    }
    // The budget is untouched: a refusal by the target's password check still gets its slots.
    let r = c
        .check(nla.input("nla-refuse", Some(cred("nina", "", "Stale-5"))))
        .await;
    assert_eq!(r.primary_cause, Cause::NlaLogonFailed, "{:?}", causes(&r));
}
