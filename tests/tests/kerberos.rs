//! The credential proven by a Kerberos AS exchange against a real KDC: a Samba AD DC
//! provisioned by the harness (`server services = ldap, kdc`, on 127.0.0.1:88, as root).

use std::{sync::Arc, time::Duration};

use integration_tests::{budget, cred, samba::Samba};
use rdp_preflight::{
    cause::Cause,
    credential::CredentialOutcome,
    guard::{identity::Domains, Guard, Limits},
    kerberos::{KerberosChecker, KerberosFile},
};

/// A memory lockout guard: 900 s window, one more distinct failure.
fn guard() -> Arc<Guard> {
    Arc::new(Guard::memory(
        Limits::new(Duration::from_secs(900), 1, Duration::ZERO),
        1000,
    ))
}

/// A checker for `file` (timeout 3 s unless set) with `guard`, the NetBIOS domain mapped to
/// the realm.
fn checker_for(file: KerberosFile, guard: Arc<Guard>, domain: (&str, &str)) -> KerberosChecker {
    let cfg = KerberosFile {
        timeout_ms: 3000,
        ..file
    }
    .validate()
    .expect("valid")
    .expect("realm");
    KerberosChecker::new(cfg, guard, Domains::new([domain]).expect("domains"))
}

fn checker(kdcs: Vec<String>) -> KerberosChecker {
    checker_for(
        KerberosFile {
            realm: Some("example.test".into()),
            kdcs,
            ..Default::default()
        },
        guard(),
        ("EXAMPLE", "example.test"),
    )
}

/// `rdp-preflight check --json` with the Kerberos flags as user `good` against a refused port,
/// the binary started through `wrapper` (e.g. faketime) when given: the report and stdout.
fn cli_check(port: u16, password: &str, wrapper: &[&str]) -> (serde_json::Value, String) {
    let bin = integration_tests::plugin::plugin_bin();
    let mut cmd = match wrapper.split_first() {
        Some((w, args)) => {
            let mut c = std::process::Command::new(w);
            c.args(args).arg(&bin);
            c
        }
        None => std::process::Command::new(&bin),
    };
    let out = cmd
        .args([
            "check",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--allow-loopback",
        ])
        .args(["--user", "good", "--domain", "EXAMPLE", "--password-env", "KRB_TEST_PW"])
        .args(["--realm", "EXAMPLE.TEST", "--kdc", "127.0.0.1:88", "--json"])
        .env("KRB_TEST_PW", password)
        .output()
        .expect("run check (faketime from Debian's package faketime)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (v, stdout)
}

fn causes_of(v: &serde_json::Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["cause"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn cause(o: &CredentialOutcome) -> Cause {
    o.findings.first().map_or(Cause::Ok, |f| f.cause)
}

fn o_has(o: &CredentialOutcome, c: Cause) -> bool {
    o.findings.iter().any(|f| f.cause == c)
}

fn evidence<'a>(o: &'a CredentialOutcome, key: &str) -> Option<&'a str> {
    o.findings
        .first()
        .and_then(|f| f.evidence.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()))
}

/// Good, wrong, unknown, disabled, must change; a burst of stale passwords never locks an
/// account whose PSO locks at 3; the KRB-ERROR code and the KDC are evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_exchange_against_samba() {
    let s = Samba::start();
    s.user("good", "Good-Pass-1!");
    s.user("disabled", "Disabled-Pass-1!");
    s.tool(&["user", "disable", "disabled"]);
    s.user("pat", "Pat-Pass-1!");
    s.lockout_pso("lowlock", 3, "pat");
    s.user("lou", "Lou-Pass-1!");
    s.tool(&["domain", "passwordsettings", "pso", "apply", "lowlock", "lou"]);
    s.tool(&[
        "user",
        "create",
        "mustchange",
        "Must-Pass-1!",
        "--must-change-at-next-login",
    ]);
    s.tool(&["computer", "create", "rdp01"]);
    // A joined computer has a password (keys) and is enabled; without keys the KDC answers the
    // TGS-REQ with KDC_ERR_ETYPE_NOSUPP (14).
    s.tool(&["user", "setpassword", "rdp01$", "--newpassword=Machine-Pass-1!x"]);
    s.tool(&["user", "enable", "rdp01$"]);
    s.tool(&["spn", "add", "TERMSRV/rdp01.example.test", "rdp01$"]);
    s.user("expired", "Expired-Pass-1!");
    s.tool(&["user", "setexpiry", "expired", "--days=0"]);
    // logonHours: 21 bytes, one bit per hour of the week; all zero: never.
    s.user("nightshift", "Night-Pass-1!");
    s.add_attribute("user", "nightshift", "logonHours:", "AAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let c = Arc::new(checker(vec![s.kdc()]));

    let o = c.check(&cred("good", "EXAMPLE", "Good-Pass-1!"), None, &budget()).await;
    assert!(o.bind_succeeded, "{o:?}\n{}", s.log());
    assert_eq!(o.facts.checked_by, "kerberos");
    // Any spelling, the salt comes from the KDC.
    let o = c
        .check(&cred("GOOD@example.test", "", "Good-Pass-1!"), None, &budget())
        .await;
    assert!(o.bind_succeeded, "{o:?}");

    let o = c
        .check(&cred("good", "EXAMPLE", "Wrong-Pass-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::CredInvalid, "{o:?}");
    assert_eq!(evidence(&o, "krb_error"), Some("24"));
    assert_eq!(evidence(&o, "kdc"), Some("127.0.0.1:88"));

    let o = c
        .check(&cred("nobody", "EXAMPLE", "Whatever-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::CredAccountNotFound, "{o:?}");

    // Samba 4.17 tells a disabled account only after the right password.
    let o = c
        .check(&cred("disabled", "EXAMPLE", "Disabled-Pass-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::CredAccountDisabled, "{o:?}");
    assert_eq!(evidence(&o, "krb_error"), Some("18"));

    // TERMSRV/<the host the gateway dials>: registered for rdp01's DNS name, not for its IP
    // address or an alias.
    let spn = |o: &CredentialOutcome| o.findings.iter().find(|f| f.cause == Cause::TargetSpnMissing).cloned();
    let o = c
        .check(
            &cred("good", "EXAMPLE", "Good-Pass-1!"),
            Some("rdp01.example.test"),
            &budget(),
        )
        .await;
    assert!(o.bind_succeeded && spn(&o).is_none(), "{o:?}\n{}", s.log());
    // The KDC issued the service ticket (the NLA stage logs on with it).
    let t = o
        .service_ticket
        .as_ref()
        .unwrap_or_else(|| panic!("no service ticket: {o:?}"));
    assert_eq!(t.principal, "TERMSRV/rdp01.example.test@EXAMPLE.TEST");
    for (host, ip) in [("192.0.2.10", true), ("alias.example.test", false)] {
        let o = c
            .check(&cred("good", "EXAMPLE", "Good-Pass-1!"), Some(host), &budget())
            .await;
        assert!(o.bind_succeeded, "{o:?}");
        let f = spn(&o).unwrap_or_else(|| panic!("{host}: no TARGET_SPN_MISSING: {o:?}"));
        assert!(
            f.evidence
                .contains(&("principal".into(), format!("TERMSRV/{host}@EXAMPLE.TEST"))),
            "{f:?}"
        );
        assert!(f.evidence.contains(&("ip_literal".into(), ip.to_string())), "{f:?}");
    }

    // The AS-REP says when the password expires (Samba's default maxPwdAge is 42 days): inside
    // a 60-day window it is CRED_PASSWORD_EXPIRING, a warning beside the proof; outside the
    // default 14 days, nothing.
    assert!(!o_has(
        &c.check(&cred("good", "EXAMPLE", "Good-Pass-1!"), None, &budget()).await,
        Cause::CredPasswordExpiring
    ));
    let wide = KerberosChecker::new(
        KerberosFile {
            realm: Some("EXAMPLE.TEST".into()),
            kdcs: vec![s.kdc()],
            expiring_days: 60,
            ..Default::default()
        }
        .validate()
        .expect("valid")
        .expect("realm"),
        Arc::new(Guard::memory(
            Limits::new(Duration::from_secs(900), 1, Duration::ZERO),
            10,
        )),
        Domains::default(),
    );
    let o = wide
        .check(&cred("good", "EXAMPLE", "Good-Pass-1!"), None, &budget())
        .await;
    assert!(o.bind_succeeded && o_has(&o, Cause::CredPasswordExpiring), "{o:?}");

    // Must change at next logon: told only with the right password (23 + 0xC0000224).
    let o = c
        .check(&cred("mustchange", "EXAMPLE", "Must-Pass-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::CredPasswordMustChange, "{o:?}");
    assert_eq!(evidence(&o, "krb_error"), Some("23"));
    // Account expired (18 + 0xC0000193).
    let o = c
        .check(&cred("expired", "EXAMPLE", "Expired-Pass-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::CredAccountExpired, "{o:?}");

    // Outside the logon hours (18 + 0xC000006F).
    let o = c
        .check(&cred("nightshift", "EXAMPLE", "Night-Pass-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::CredLogonHours, "{o:?}\n{}", s.log());
    assert_eq!(evidence(&o, "ntstatus"), Some("0xC000006F"));

    // Locked by someone else's three bad passwords: then right and wrong passwords both get 18.
    for i in 0..3 {
        let o = checker(vec![s.kdc()])
            .check(&cred("lou", "EXAMPLE", &format!("Someone-Else-{i}!")), None, &budget())
            .await;
        assert_eq!(cause(&o), Cause::CredInvalid, "{o:?}");
    }
    let o = c.check(&cred("lou", "EXAMPLE", "Lou-Pass-1!"), None, &budget()).await;
    assert_eq!(cause(&o), Cause::CredAccountLocked, "{o:?}");
    assert_eq!(evidence(&o, "krb_error"), Some("18"));

    // A burst of stale passwords for pat (PSO threshold 3): the KDC sees at most the budget.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        let pw = if i % 2 == 0 {
            "Stale-Same-1!".to_string()
        } else {
            format!("Stale-{i}-1!")
        };
        tasks.push(tokio::spawn(async move {
            c.check(&cred("pat", "EXAMPLE", &pw), None, &budget()).await
        }));
    }
    for t in tasks {
        let o = t.await.expect("task");
        assert!(!o.bind_succeeded);
        assert!(
            matches!(cause(&o), Cause::CredInvalid | Cause::CredLockoutGuard),
            "{o:?}"
        );
    }
    // The CLI, with the Kerberos flags: the credential stage is the AS exchange.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (v, stdout) = cli_check(port, "Wrong-Pass-2!", &[]);
    assert_eq!(v["credential"]["checkedBy"], "kerberos", "{v}");
    let causes = causes_of(&v);
    assert!(causes.contains(&"CAUSE_CRED_INVALID".to_owned()), "{causes:?}");
    assert!(!stdout.contains("Wrong-Pass-2"));

    // The plugin's clock 10 minutes ahead (faketime): the KDC answers the pre-authenticated
    // request with 37, which proves the password; one retry with the KDC's time, and
    // DIRECTORY_CLOCK_SKEW beside the proof.
    let (v, _) = cli_check(port, "Good-Pass-1!", &["faketime", "-f", "+600s"]);
    let causes = causes_of(&v);
    assert!(causes.contains(&"CAUSE_DIRECTORY_CLOCK_SKEW".to_owned()), "{causes:?}");
    assert!(!causes.iter().any(|c| c.starts_with("CAUSE_CRED_")), "{causes:?}");

    let (bad, locked) = s.bad_pwd("pat");
    assert!(bad <= 2 && !locked, "badPwdCount {bad}, locked {locked}");
    // Not locked: a checker that has not seen the failures proves the right password.
    let o = checker(vec![s.kdc()])
        .check(&cred("pat", "EXAMPLE", "Pat-Pass-1!"), None, &budget())
        .await;
    assert!(o.bind_succeeded, "{o:?}");
}

/// No KDC listening: DIRECTORY_UNREACHABLE, the next KDC tried first.
#[tokio::test]
async fn kdcs_that_refuse_are_unreachable() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    let o = checker(vec![format!("127.0.0.1:{port}"), format!("127.0.0.1:{port}")])
        .check(&cred("good", "EXAMPLE", "Good-Pass-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::DirectoryUnreachable, "{o:?}");
    assert!(evidence(&o, "attempts").is_some_and(|a| a.matches("127.0.0.1").count() == 2));
    // A user name Kerberos strings cannot carry is our encoder's limit: an internal error, not
    // a credential cause, and nothing is sent.
    let o = checker(vec![format!("127.0.0.1:{port}")])
        .check(&cred("andr\u{e9}", "EXAMPLE", "Good-Pass-1!"), None, &budget())
        .await;
    assert!(o.internal.is_some() && o.findings.is_empty(), "{o:?}");
}

/// The simulated KDC answers as Windows does: disabled, locked and expired accounts are told
/// before any password is spent (18 with KERB-EXT-ERROR), a wrong password is 24, a password
/// that must change is 23 with 0xC0000224 after the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_kdc_tells_account_states_like_windows() {
    use gateway_sim::{kdc::start_kdc, scenario::Account};
    let account = |name: &str, state: &str| Account {
        name: name.into(),
        password: format!("{name}-Pass-1!"),
        state: state.into(),
        domain: None,
    };
    let accounts = [
        account("good", "good"),
        account("dave", "disabled"),
        account("lou", "locked"),
        account("mia", "must_change"),
    ];
    let kdc = start_kdc(&accounts, &["rdp01.simdom.test".into()]).await.expect("kdc");
    let c = checker_for(
        KerberosFile {
            realm: Some("SIMDOM.TEST".into()),
            kdcs: vec![kdc.addr().to_string()],
            ..Default::default()
        },
        guard(),
        ("SIMDOM", "simdom.test"),
    );
    let o = c
        .check(
            &cred("good", "SIMDOM", "good-Pass-1!"),
            Some("rdp01.simdom.test"),
            &budget(),
        )
        .await;
    assert!(o.bind_succeeded, "{o:?}");
    assert!(o.service_ticket.is_some(), "{o:?}");
    assert_eq!(kdc.password_attempts(), 1);
    let o = c
        .check(&cred("good", "SIMDOM", "good-Pass-1!"), Some("10.0.0.5"), &budget())
        .await;
    assert!(o_has(&o, Cause::TargetSpnMissing), "{o:?}");
    let o = c.check(&cred("good", "SIMDOM", "Wrong-1!"), None, &budget()).await;
    assert_eq!(cause(&o), Cause::CredInvalid, "{o:?}");
    assert_eq!(evidence(&o, "krb_error"), Some("24"));
    let spent = kdc.password_attempts();
    for (user, want, status) in [
        ("dave", Cause::CredAccountDisabled, "0xC0000072"),
        ("lou", Cause::CredAccountLocked, "0xC0000234"),
    ] {
        let o = c
            .check(&cred(user, "SIMDOM", &format!("{user}-Pass-1!")), None, &budget())
            .await;
        assert_eq!(cause(&o), want, "{o:?}");
        assert_eq!(evidence(&o, "ntstatus"), Some(status), "{o:?}");
    }
    assert_eq!(kdc.password_attempts(), spent, "told before any password was sent");
    let o = c.check(&cred("mia", "SIMDOM", "mia-Pass-1!"), None, &budget()).await;
    assert_eq!(cause(&o), Cause::CredPasswordMustChange, "{o:?}");
    assert_eq!(evidence(&o, "ntstatus"), Some("0xC0000224"));
}

/// With `kerberos.kdcs` empty, the KDCs are the SRV records of `_kerberos._tcp.<realm>`, asked
/// of Samba's own DNS server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kdcs_found_through_dns_srv() {
    let s = tokio::task::block_in_place(Samba::start_with_dns);
    s.user("good", "Good-Pass-1!");
    let checker = |dns: &str| {
        checker_for(
            KerberosFile {
                realm: Some("example.test".into()),
                dns_servers: vec![dns.into()],
                ..Default::default()
            },
            guard(),
            ("EXAMPLE", "example.test"),
        )
    };
    let c = checker("127.0.0.1:53");
    let o = c.check(&cred("good", "EXAMPLE", "Good-Pass-1!"), None, &budget()).await;
    assert!(o.bind_succeeded, "{o:?}\n{}", s.log());
    assert_eq!(o.facts.directory_server, "127.0.0.1:88", "{o:?}");
    // Asked again: from the kept answer (the same KDC).
    let o = c
        .check(&cred("good", "EXAMPLE", "Wrong-Pass-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::CredInvalid, "{o:?}");
    // A DNS server that does not answer: DIRECTORY_UNREACHABLE naming DNS, no password sent.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let o = checker(&silent.local_addr().expect("addr").to_string())
        .check(&cred("good", "EXAMPLE", "Good-Pass-1!"), None, &budget())
        .await;
    assert_eq!(cause(&o), Cause::DirectoryUnreachable, "{o:?}");
    assert!(o.findings[0].message.contains("DNS"), "{o:?}");
    assert!(
        o.account.is_some() && o.facts.directory_server.is_empty(),
        "no KDC was asked: {o:?}"
    );
}

/// With a directory configured with `read_lockout_state`, the Kerberos check reads the account's
/// badPwdCount and its PSO's threshold through LDAPS before the pre-authenticated request,
/// exactly as before a bind: someone else's failures bring `pat` (PSO threshold 3) to the brink,
/// and the next check refuses rather than lock it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kerberos_reads_the_lockout_state_first() {
    use rdp_preflight::credential::{CredentialChecker, DirectoryFile};
    let s = tokio::task::block_in_place(Samba::start);
    s.user("pat", "Pat-Pass-1!");
    s.lockout_pso("lowlock", 3, "pat");
    // Two failures from elsewhere (a checker of its own, no directory).
    for i in 0..2 {
        let o = checker(vec![s.kdc()])
            .check(&cred("pat", "EXAMPLE", &format!("Elsewhere-{i}!")), None, &budget())
            .await;
        assert_eq!(cause(&o), Cause::CredInvalid, "{o:?}");
    }
    assert_eq!(s.bad_pwd("pat"), (2, false));
    let tmp = tempfile::tempdir().expect("tmp");
    let pw = tmp.path().join("svc.pw");
    std::fs::write(&pw, format!("{}\n", integration_tests::samba::ADMIN_PW)).expect("write");
    let shared = guard();
    let ldap = Arc::new(CredentialChecker::new(
        DirectoryFile {
            servers: vec![s.ldaps_url()],
            ca_file: Some(s.ca_file()),
            bind_as: "upn".into(),
            service_dn: Some("CN=Administrator,CN=Users,DC=example,DC=test".into()),
            service_password_file: Some(pw),
            search_base: Some("DC=example,DC=test".into()),
            read_lockout_state: true,
            ..Default::default()
        }
        .validate()
        .expect("valid")
        .expect("servers"),
        shared.clone(),
        Domains::new([("EXAMPLE", "example.test")]).expect("domains"),
    ));
    let c = checker_for(
        KerberosFile {
            realm: Some("EXAMPLE.TEST".into()),
            kdcs: vec![s.kdc()],
            ..Default::default()
        },
        shared,
        ("EXAMPLE", "example.test"),
    )
    .with_directory(Some(ldap));
    // One more failure would lock: refused before any password is sent, right or wrong.
    for pw in ["Stale-9!", "Pat-Pass-1!"] {
        let o = c.check(&cred("pat", "EXAMPLE", pw), None, &budget()).await;
        assert_eq!(cause(&o), Cause::CredLockoutGuard, "{o:?}\n{}", s.log());
        assert!(evidence(&o, "lockout_threshold") == Some("3"), "{o:?}");
    }
    assert_eq!(s.bad_pwd("pat"), (2, false), "nothing more was spent");
    // A user far from the threshold passes the read and is proven by the AS exchange.
    s.user("good", "Good-Pass-1!");
    let o = c.check(&cred("good", "EXAMPLE", "Good-Pass-1!"), None, &budget()).await;
    assert!(o.bind_succeeded, "{o:?}");
}
