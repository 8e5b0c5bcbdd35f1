//! Credential pre-validation against real peers: OpenLDAP slapd with the ppolicy overlay, and
//! gateway-sim's simulated Active Directory for AD's `data` sub-codes.
//!
//! slapd must be installed (`scripts/install-test-deps.sh`); without it these tests fail.

use std::{
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use gateway_sim::directory::{start_directory, Account, Directory, DirectoryOptions};
use integration_tests::{
    budget, cred,
    slapd::{self, Slapd},
};
use rdp_preflight::{
    cause::Cause,
    credential::{CredentialChecker, CredentialOutcome, DirectoryFile},
    report::StageStatus,
};

fn file_for(s: &Slapd) -> DirectoryFile {
    DirectoryFile {
        servers: vec![s.ldaps_url()],
        ca_file: Some(s.ca_file()),
        bind_as: slapd::DN_TEMPLATE.into(),
        ..Default::default()
    }
}

fn checker(f: DirectoryFile) -> CredentialChecker {
    let domains = f.domains().expect("valid domains");
    CredentialChecker::standalone(
        f.validate().expect("valid config").expect("servers configured"),
        domains,
    )
}

fn evidence<'a>(o: &'a CredentialOutcome, key: &str) -> Option<&'a str> {
    o.findings
        .first()
        .and_then(|f| f.evidence.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()))
}

fn cause(o: &CredentialOutcome) -> Cause {
    o.findings.first().map_or(Cause::Ok, |f| f.cause)
}

async fn check(c: &CredentialChecker, user: &str, pw: &str) -> CredentialOutcome {
    c.check(&cred(user, "", pw), &budget()).await
}

#[tokio::test]
async fn slapd_good_wrong_unknown_over_ldaps() {
    let s = Slapd::start(true);
    let c = checker(file_for(&s));
    let o = check(&c, "good", slapd::password("good")).await;
    assert_eq!(
        (o.status, o.bind_succeeded, cause(&o)),
        (StageStatus::Ok, true, Cause::Ok),
        "{o:?}"
    );
    assert_eq!(o.facts.ldap_result_code, Some(0));
    assert_eq!(o.facts.bind_identity, slapd::user_dn("good"));
    assert_eq!(o.facts.directory_server, s.ldaps_url());

    let o = check(&c, "good2", "Wrong-Pass-9").await;
    assert_eq!(
        (o.status, cause(&o)),
        (StageStatus::Failed, Cause::CredInvalid),
        "{o:?}"
    );
    assert_eq!(evidence(&o, "ldap_result_code"), Some("49"));
    assert_eq!(evidence(&o, "bind_identity"), Some(slapd::user_dn("good2").as_str()));
    assert_eq!(evidence(&o, "directory_server"), Some(s.ldaps_url().as_str()));

    // OpenLDAP answers 49 for an unknown DN too: CRED_INVALID, never a guess at "not found".
    let o = check(&c, "nobody", "Whatever-1").await;
    assert_eq!(cause(&o), Cause::CredInvalid, "{o:?}");
    // The pooled connection was reused by rebinding.
    assert_eq!(c.pooled(), 1);
}

#[tokio::test]
async fn slapd_password_policy_states() {
    let s = Slapd::start(true);
    let c = checker(file_for(&s));
    let o = check(&c, "locked", slapd::password("locked")).await;
    assert_eq!(cause(&o), Cause::CredAccountLocked, "{o:?}");
    assert_eq!(evidence(&o, "ppolicy_error"), Some("accountLocked(1)"));
    assert_eq!(evidence(&o, "ldap_result_code"), Some("49"));

    let o = check(&c, "expired", slapd::password("expired")).await;
    assert_eq!(cause(&o), Cause::CredPasswordExpired, "{o:?}");
    assert_eq!(evidence(&o, "ppolicy_error"), Some("passwordExpired(0)"));

    // must-change: the bind succeeds, the verdict is still deny.
    let o = check(&c, "mustchange", slapd::password("mustchange")).await;
    assert_eq!(
        (cause(&o), o.status, o.bind_succeeded),
        (Cause::CredPasswordMustChange, StageStatus::Failed, false)
    );
    assert_eq!(evidence(&o, "ldap_result_code"), Some("0"));
    assert_eq!(evidence(&o, "ppolicy_error"), Some("changeAfterReset(2)"));

    let o = check(&c, "grace", slapd::password("grace")).await;
    assert_eq!(
        (cause(&o), o.status, o.bind_succeeded),
        (Cause::CredPasswordExpiring, StageStatus::Ok, true),
        "{o:?}"
    );
    assert!(
        evidence(&o, "ppolicy_warning").is_some_and(|w| w.starts_with("graceAuthNsRemaining=")),
        "{o:?}"
    );

    let o = check(&c, "expiring", slapd::password("expiring")).await;
    assert_eq!(
        (cause(&o), o.status, o.bind_succeeded),
        (Cause::CredPasswordExpiring, StageStatus::Ok, true),
        "{o:?}"
    );
    assert!(
        evidence(&o, "ppolicy_warning").is_some_and(|w| w.starts_with("timeBeforeExpiration=")),
        "{o:?}"
    );
}

#[tokio::test]
async fn slapd_starttls_and_confidentiality_required() {
    let s = Slapd::start(true);
    let mut f = file_for(&s);
    f.servers = vec![s.ldap_url()];
    let o = check(&checker(f.clone()), "good", slapd::password("good")).await;
    assert!(o.bind_succeeded, "StartTLS: {o:?}");

    f.starttls = false;
    f.allow_plaintext = true;
    let o = check(&checker(f), "good", slapd::password("good")).await;
    assert_eq!(cause(&o), Cause::DirectoryConfidentialityRequired, "{o:?}");
    assert_eq!(evidence(&o, "ldap_result_code"), Some("13"));
}

#[tokio::test]
async fn slapd_stopped_is_unreachable_and_failover_works() {
    let mut s = Slapd::start(false);
    let c = checker(file_for(&s));
    assert!(check(&c, "good", slapd::password("good")).await.bind_succeeded);
    s.stop();
    let o = check(&c, "good", slapd::password("good")).await;
    assert_eq!(cause(&o), Cause::DirectoryUnreachable, "{o:?}");

    // A dead first server, a live second one: failover on connect failure.
    let s2 = Slapd::start(false);
    let mut f = file_for(&s2);
    f.servers = vec![format!("ldaps://127.0.0.1:{}", slapd::free_port()), s2.ldaps_url()];
    let o = check(&checker(f), "good", slapd::password("good")).await;
    assert!(o.bind_succeeded, "{o:?}");
    assert_eq!(o.facts.directory_server, s2.ldaps_url());
}

#[tokio::test]
async fn slapd_untrusted_certificate_is_tls_failure() {
    let s = Slapd::start(false);
    let other_ca = s.dir().join("other-ca.pem");
    let (ca, _, _) = slapd::test_ca_and_cert();
    std::fs::write(&other_ca, ca).expect("write");
    let mut f = file_for(&s);
    f.ca_file = Some(other_ca);
    let o = check(&checker(f), "good", slapd::password("good")).await;
    assert_eq!(cause(&o), Cause::DirectoryTlsFailed, "{o:?}");
    assert!(evidence(&o, "attempts").is_some_and(|a| a.contains("TLS")), "{o:?}");
}

#[tokio::test]
async fn slapd_lockout_guard_never_locks_the_account() {
    let s = Slapd::start(true);
    let c = checker(file_for(&s));
    let mut binds = 0;
    for (pw, want) in [
        ("Wrong-A", Cause::CredInvalid),
        ("Wrong-A", Cause::CredInvalid), // remembered: no bind
        ("Wrong-A", Cause::CredInvalid),
        ("Wrong-B", Cause::CredInvalid), // one further distinct password allowed
        ("Wrong-C", Cause::CredLockoutGuard),
        ("Wrong-D", Cause::CredLockoutGuard),
        ("Wrong-B", Cause::CredInvalid), // remembered
    ] {
        let o = check(&c, "guarded", pw).await;
        assert_eq!(cause(&o), want, "{pw}: {o:?}");
        if !o.facts.from_memory {
            binds += 1;
        }
    }
    assert_eq!(binds, 2);
    let failures = s.pwd_failure_count("guarded");
    assert!(
        failures < slapd::MAX_FAILURE,
        "pwdFailureTime count {failures} reached pwdMaxFailure"
    );
    assert_eq!(failures, 2);
    // Within the window the guard cannot tell a right password from a third wrong one: it
    // refuses that too, without binding.
    let o = check(&c, "guarded", slapd::password("guarded")).await;
    assert_eq!(cause(&o), Cause::CredLockoutGuard, "{o:?}");
    assert_eq!(s.pwd_failure_count("guarded"), 2);
    // Not locked: the right password binds (another process, e.g. a new gateway node) …
    assert!(s.ldapwhoami(&slapd::user_dn("guarded"), slapd::password("guarded")));
    assert_eq!(s.pwd_failure_count("guarded"), 0);
    // … and so does a checker whose guard has not seen the failures.
    let o = check(&checker(file_for(&s)), "guarded", slapd::password("guarded")).await;
    assert!(o.bind_succeeded, "{o:?}");
}

fn service_file(s: &Slapd, dir: &std::path::Path) -> DirectoryFile {
    let pw_file = dir.join("svc.pw");
    let mut fh = std::fs::File::create(&pw_file).expect("create");
    writeln!(fh, "{}", slapd::SERVICE_PW).expect("write");
    DirectoryFile {
        service_dn: Some(slapd::SERVICE_DN.into()),
        service_password_file: Some(pw_file),
        search_base: Some(format!("ou=people,{}", slapd::SUFFIX)),
        bind_as: "search".into(),
        ..file_for(s)
    }
}

#[tokio::test]
async fn slapd_search_then_bind_and_lockout_state() {
    let s = Slapd::start(true);
    let tmp = tempfile::tempdir().expect("tmp");
    let c = checker(service_file(&s, tmp.path()));
    let o = check(&c, "good", slapd::password("good")).await;
    assert!(o.bind_succeeded, "{o:?}");
    assert_eq!(o.facts.bind_identity, slapd::user_dn("good"));
    // Search-then-bind can say "no such account" (the search, not a guess).
    let o = check(&c, "nobody", "Whatever-1").await;
    assert_eq!(cause(&o), Cause::CredAccountNotFound, "{o:?}");
    // Filter injection is escaped: no match rather than a wildcard match.
    let o = check(&c, "*", "Whatever-1").await;
    assert_eq!(cause(&o), Cause::CredAccountNotFound, "{o:?}");

    // Two failures made by someone else; pwdMaxFailure is 3: the next bad bind would lock.
    let dn = slapd::user_dn("near");
    assert!(!s.ldapwhoami(&dn, "Wrong-X1"));
    assert!(!s.ldapwhoami(&dn, "Wrong-X2"));
    assert_eq!(s.pwd_failure_count("near"), 2);
    let mut f = service_file(&s, tmp.path());
    f.read_lockout_state = true;
    f.bind_as = slapd::DN_TEMPLATE.into();
    f.default_policy_dn = Some(format!("cn=default,ou=policies,{}", slapd::SUFFIX));
    let c = checker(f);
    let o = check(&c, "near", "Wrong-X3").await;
    assert_eq!(cause(&o), Cause::CredLockoutGuard, "{o:?}");
    assert_eq!(evidence(&o, "bad_password_count"), Some("2"));
    assert_eq!(evidence(&o, "lockout_threshold"), Some("3"));
    assert_eq!(s.pwd_failure_count("near"), 2, "the guard must not have bound");
    // An account with no failures is checked normally.
    assert!(check(&c, "good", slapd::password("good")).await.bind_succeeded);
}

#[tokio::test]
async fn empty_password_sends_nothing() {
    let dir = sim(&[], DirectoryOptions::default()).await;
    let c = checker(sim_file(&dir, "upn"));
    let o = c.check(&cred("alice", "example.test", ""), &budget()).await;
    assert_eq!(cause(&o), Cause::CredMissing);
    assert_eq!(dir.bind_count(), 0);
}

// ---- the simulated Active Directory ----

fn account(name: &str, password: &str, state: &str) -> Account {
    Account {
        name: name.into(),
        password: password.into(),
        state: state.into(),
        domain: None,
    }
}

async fn sim(accounts: &[Account], opts: DirectoryOptions) -> Directory {
    start_directory(accounts, opts).await.expect("directory starts")
}

fn sim_file(dir: &Directory, bind_as: &str) -> DirectoryFile {
    let ca = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(ca.path(), dir.ca_pem()).expect("write");
    let (_, path) = ca.keep().expect("keep");
    DirectoryFile {
        servers: vec![dir.ldaps_url()],
        ca_file: Some(path),
        bind_as: bind_as.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn ad_sub_codes() {
    let pw = "Right-Pass-1";
    let states = [
        ("good", "good"),
        ("disabled", "disabled"),
        ("locked", "locked"),
        ("expiredpw", "password_expired"),
        ("mustchange", "must_change"),
        ("acctexpired", "account_expired"),
        ("hours", "logon_hours"),
        ("station", "workstation"),
        ("bigtoken", "token_too_large"),
    ];
    let accounts: Vec<Account> = states.iter().map(|(n, s)| account(n, pw, s)).collect();
    let dir = sim(&accounts, DirectoryOptions::default()).await;
    let cases = [
        ("good", pw, Cause::Ok, ""),
        ("nosuchuser", pw, Cause::CredAccountNotFound, "525"),
        ("good", "Wrong-1", Cause::CredInvalid, "52e"),
        ("hours", pw, Cause::CredLogonHours, "530"),
        ("station", pw, Cause::CredWorkstationRestricted, "531"),
        ("expiredpw", pw, Cause::CredPasswordExpired, "532"),
        ("disabled", pw, Cause::CredAccountDisabled, "533"),
        ("bigtoken", pw, Cause::CredTokenTooLarge, "568"),
        ("acctexpired", pw, Cause::CredAccountExpired, "701"),
        ("mustchange", pw, Cause::CredPasswordMustChange, "773"),
        ("locked", pw, Cause::CredAccountLocked, "775"),
        // The starred codes are revealed only for the right password.
        ("hours", "Wrong-2", Cause::CredInvalid, "52e"),
        ("mustchange", "Wrong-3", Cause::CredInvalid, "52e"),
    ];
    for bind_as in ["upn", "downlevel", "dn:CN={user},CN=Users,DC=example,DC=test"] {
        // A fresh checker per identity form, so that the guard's memory starts empty.
        let c = checker(sim_file(&dir, bind_as));
        let domain = if bind_as == "downlevel" {
            "EXAMPLE"
        } else {
            "example.test"
        };
        for (user, p, want, data) in cases {
            let o = c.check(&cred(user, domain, p), &budget()).await;
            assert_eq!(cause(&o), want, "{bind_as} {user}: {o:?}");
            if want != Cause::Ok {
                assert_eq!(evidence(&o, "ad_data"), Some(data), "{bind_as} {user}: {o:?}");
                assert_eq!(evidence(&o, "ldap_result_code"), Some("49"));
                assert_eq!(o.facts.ad_data_code, data);
            } else {
                assert!(o.bind_succeeded);
            }
        }
    }
}

#[tokio::test]
async fn ad_locks_at_threshold_and_guard_prevents_it() {
    let accounts = [
        account("bob", "Right-Pass-1", "good"),
        account("carl", "Right-Pass-1", "good"),
    ];
    let dir = sim(
        &accounts,
        DirectoryOptions {
            lockout_threshold: 3,
            ..Default::default()
        },
    )
    .await;
    // Without the guard's memory (window 0), three bad binds lock bob: then 775 even for the
    // right password.
    let mut f = sim_file(&dir, "upn");
    f.guard_window_secs = 0;
    let c = checker(f);
    for i in 0..3 {
        let o = c
            .check(&cred("bob", "example.test", &format!("Wrong-{i}")), &budget())
            .await;
        assert_eq!(cause(&o), Cause::CredInvalid);
    }
    let o = c.check(&cred("bob", "example.test", "Right-Pass-1"), &budget()).await;
    assert_eq!(
        (cause(&o), evidence(&o, "ad_data")),
        (Cause::CredAccountLocked, Some("775"))
    );

    // With the default guard, repeated checks never get carl there.
    let c = checker(sim_file(&dir, "upn"));
    for i in 0..10 {
        let _ = c
            .check(&cred("carl", "example.test", &format!("Wrong-{}", i % 4)), &budget())
            .await;
    }
    assert!(
        dir.bad_pwd_count("carl").is_some_and(|n| n < 3),
        "{:?}",
        dir.bad_pwd_count("carl")
    );
    let o = checker(sim_file(&dir, "upn"))
        .check(&cred("carl", "example.test", "Right-Pass-1"), &budget())
        .await;
    assert!(o.bind_succeeded, "{o:?}");
}

#[tokio::test]
async fn ad_requires_tls_and_starttls() {
    let accounts = [account("dave", "Right-Pass-1", "good")];
    let dir = sim(
        &accounts,
        DirectoryOptions {
            require_tls: true,
            ..Default::default()
        },
    )
    .await;
    let mut f = sim_file(&dir, "upn");
    f.servers = vec![dir.ldap_url().expect("plain listener")];
    let o = checker(f.clone())
        .check(&cred("dave", "example.test", "Right-Pass-1"), &budget())
        .await;
    assert!(o.bind_succeeded, "StartTLS: {o:?}");
    f.starttls = false;
    f.allow_plaintext = true;
    let o = checker(f)
        .check(&cred("dave", "example.test", "Right-Pass-1"), &budget())
        .await;
    assert_eq!(
        (cause(&o), evidence(&o, "ldap_result_code")),
        (Cause::DirectoryConfidentialityRequired, Some("8"))
    );
}

#[tokio::test]
async fn ad_read_lockout_state_with_service_account() {
    let accounts = [
        account("svc", "Service-Pass-1", "good"),
        account("erin", "Right-Pass-1", "good"),
    ];
    let dir = sim(
        &accounts,
        DirectoryOptions {
            lockout_threshold: 3,
            ..Default::default()
        },
    )
    .await;
    let tmp = tempfile::tempdir().expect("tmp");
    let pw = tmp.path().join("svc.pw");
    std::fs::write(&pw, "Service-Pass-1\n").expect("write");
    let mut f = sim_file(&dir, "search");
    f.service_dn = Some(dir.user_dn("svc"));
    f.service_password_file = Some(pw);
    f.search_base = Some(dir.base_dn().to_string());
    f.read_lockout_state = true;
    f.guard_window_secs = 0; // only the directory's own count protects erin here
    let c = checker(f);
    let o = c.check(&cred("erin", "", "Right-Pass-1"), &budget()).await;
    assert!(o.bind_succeeded, "{o:?}");
    assert_eq!(o.facts.bind_identity, dir.user_dn("erin"));
    for i in 0..2 {
        let o = c.check(&cred("erin", "", &format!("Wrong-{i}")), &budget()).await;
        assert_eq!(cause(&o), Cause::CredInvalid, "{o:?}");
    }
    let binds = dir.bind_count();
    let o = c.check(&cred("erin", "", "Wrong-9"), &budget()).await;
    assert_eq!(cause(&o), Cause::CredLockoutGuard, "{o:?}");
    assert_eq!(evidence(&o, "bad_password_count"), Some("2"));
    assert_eq!(dir.bind_count(), binds + 1, "only the service account bound");
    assert_eq!(dir.bad_pwd_count("erin"), Some(2));
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn canary_password_never_leaks() {
    const CANARY: &str = "Canary-7f3a9c-Secret";
    let cap = Capture::default();
    let writer = cap.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Global, not scoped: a scoped subscriber misses callsites whose interest other test
    // threads already cached. Other tests' logs land in the buffer too, which only widens
    // the check.
    tracing::subscriber::set_global_default(sub).expect("only this test installs a subscriber");

    let s = Slapd::start(true);
    let accounts = [account("frank", "Right-Pass-1", "good")];
    let dir = sim(&accounts, DirectoryOptions::default()).await;
    let mut dump = String::new();
    for f in [file_for(&s), sim_file(&dir, "upn")] {
        let c = checker(f);
        for user in ["good", "frank", "nobody"] {
            for _ in 0..2 {
                let o = c.check(&cred(user, "example.test", CANARY), &budget()).await;
                assert!(!o.findings.is_empty());
                dump.push_str(&format!("{o:?} {:?} {:?} {}\n", o.findings, o.facts, o.detail));
            }
        }
        dump.push_str(&format!("{c:?}"));
    }
    let logs = String::from_utf8_lossy(&cap.0.lock().expect("lock")).into_owned();
    assert!(logs.contains("bind answered"), "tracing captured nothing: {logs}");
    assert!(!dump.contains(CANARY), "canary in outcome: {dump}");
    assert!(!logs.contains(CANARY), "canary in logs: {logs}");
}

#[test]
fn config_errors_name_the_key() {
    let f = DirectoryFile {
        servers: vec!["ldaps://a:636".into(), "http://b".into()],
        ..Default::default()
    };
    let e = f.validate().expect_err("invalid");
    assert!(
        e.starts_with("directory.servers[1]: unsupported scheme \"http\""),
        "{e}"
    );
    let f = DirectoryFile {
        servers: vec!["ldaps://a".into()],
        ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
        ..Default::default()
    };
    assert!(f.validate().expect_err("invalid").starts_with("directory.ca_file"));
}

#[tokio::test]
async fn silent_directory_is_a_timeout() {
    // Accepts TCP, never answers: the bind gets no answer before bind_timeout_ms.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let addr = l.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            socks.push(s);
        }
    });
    let f = DirectoryFile {
        servers: vec![format!("ldap://{addr}")],
        starttls: false,
        allow_plaintext: true,
        bind_as: "upn".into(),
        bind_timeout_ms: 300,
        ..Default::default()
    };
    let o = checker(f)
        .check(&cred("alice", "example.test", "Pw-1"), &budget())
        .await;
    assert_eq!(cause(&o), Cause::DirectoryTimeout, "{o:?}");
    assert_eq!(evidence(&o, "bind_identity"), Some("alice@example.test"));
    hold.abort();
}

#[tokio::test]
async fn success_cache_answers_from_memory_within_ttl() {
    let accounts = [account("gina", "Right-Pass-1", "good")];
    let dir = sim(&accounts, DirectoryOptions::default()).await;
    let mut f = sim_file(&dir, "upn");
    f.success_cache_ttl_secs = 60;
    let c = checker(f);
    let o = c.check(&cred("gina", "example.test", "Right-Pass-1"), &budget()).await;
    assert!(o.bind_succeeded && !o.facts.from_memory, "{o:?}");
    let binds = dir.bind_count();
    let o = c.check(&cred("gina", "example.test", "Right-Pass-1"), &budget()).await;
    assert!(o.bind_succeeded && o.facts.from_memory, "{o:?}");
    assert_eq!(dir.bind_count(), binds, "answered without binding");
    // Another password is not covered by the cache.
    let o = c.check(&cred("gina", "example.test", "Wrong-1"), &budget()).await;
    assert_eq!(cause(&o), Cause::CredInvalid);
    assert_eq!(dir.bind_count(), binds + 1);
}
