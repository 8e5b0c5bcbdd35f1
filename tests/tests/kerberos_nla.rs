//! NLA by Kerberos: the plugin's AS and TGS exchanges against a real Samba AD DC, then SPNEGO
//! with the service ticket inside CredSSP against gateway-sim targets whose keytab was exported
//! from that DC (`samba-tool domain exportkeytab`). The plugin dials `localhost`, whose
//! `TERMSRV/localhost` principal belongs to the computer `rdp01`.

use std::process::Command;

use gateway_sim::{demo::Harness, scenario::Scenario};
use integration_tests::{plugin::plugin_bin, samba::Samba};

const PW: &str = "Good-Pass-1!";

/// `rdp-preflight check --json` as `good` towards `localhost:port` (the certificate checked
/// against `name`), with the Kerberos flags and `extra`.
fn check(harness: &Harness, name: &str, password: &str, extra: &[&str]) -> serde_json::Value {
    check_host(harness, "localhost", name, password, extra)
}

/// The same, dialling `host`.
fn check_host(harness: &Harness, host: &str, name: &str, password: &str, extra: &[&str]) -> serde_json::Value {
    let addr = harness.env.fleet.addr(name).unwrap_or_else(|| panic!("target {name}"));
    let out = Command::new(plugin_bin())
        .args(["check", "--host", host, "--port", &addr.port().to_string()])
        .args([
            "--expected-name",
            name,
            "--allow-loopback",
            "--pin-store",
            "memory",
            "--trust-anchor",
        ])
        .arg(harness.files.path().join("fleet-ca.pem"))
        .args(["--user", "good", "--domain", "EXAMPLE", "--password-env", "KRB_NLA_PW"])
        .args(["--realm", "EXAMPLE.TEST", "--kdc", "127.0.0.1:88", "--json"])
        .args(extra)
        .env("KRB_NLA_PW", password)
        .output()
        .expect("run rdp-preflight check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

fn causes(v: &serde_json::Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["cause"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn finding<'a>(v: &'a serde_json::Value, cause: &str) -> Option<&'a serde_json::Value> {
    v["findings"].as_array()?.iter().find(|f| f["cause"] == cause)
}

fn evidence(f: &serde_json::Value, key: &str) -> Option<String> {
    f["evidence"]
        .as_array()?
        .iter()
        .find(|e| e["key"] == key)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nla_by_kerberos_with_a_keytab_from_samba() {
    let s = Samba::start();
    s.user("good", PW);
    // Computer accounts with a password (keys) and enabled, as a joined server's.
    for computer in ["rdp01", "other01"] {
        s.tool(&["computer", "create", computer]);
        let account = format!("{computer}$");
        s.tool(&["user", "setpassword", &account, "--newpassword=Machine-Pass-1!x"]);
        s.tool(&["user", "enable", &account]);
        // AES only (a hardened domain; Samba encrypts tickets for accounts without this in
        // RC4, which the sim's keytab code does not read).
        s.add_attribute("computer", computer, "msDS-SupportedEncryptionTypes", "24");
    }
    s.tool(&["spn", "add", "TERMSRV/localhost", "rdp01$"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let keytab = |account: &str| {
        let p = dir.path().join(format!("{account}.keytab"));
        let out = s.tool(&[
            "domain",
            "exportkeytab",
            p.to_str().expect("utf-8"),
            &format!("--principal={account}$"),
        ]);
        assert!(p.exists(), "exportkeytab wrote no keytab: {out}");
        p
    };
    let (rdp01, other01) = (keytab("rdp01"), keytab("other01"));
    let scenario = Scenario::parse(&format!(
        r#"
[[target]]
name = "krb-ok"
behavior = "nla_healthy"
keytab = "{rdp01}"
[[target]]
name = "krb-wrong-service"
behavior = "nla_healthy"
keytab = "{other01}"
[[target]]
name = "krb-none"
behavior = "nla_healthy"
[[target]]
name = "ntlm-blocked"
behavior = "nla_error"
ntstatus = 0xC0000418
keytab = "{rdp01}"
"#,
        rdp01 = rdp01.display(),
        other01 = other01.display()
    ))
    .expect("scenario");
    let harness = Harness::start(&scenario).await.expect("fleet");
    let fleet = &harness.env.fleet;
    let run = |name: &str, pw: &str, extra: &[&str]| tokio::task::block_in_place(|| check(&harness, name, pw, extra));

    // Success: the AS exchange proves the password, the TGS gives TERMSRV/localhost, the
    // target proves it holds that key (mutual authentication) and accepts the logon. No NTLM
    // message was sent, so no AUTHENTICATE reached it.
    let v = run("krb-ok", PW, &[]);
    assert_eq!(v["verdict"], "VERDICT_ALLOW", "{v:#}\n{}", s.log());
    assert_eq!(v["nla"]["auth"], "kerberos", "{v:#}");
    assert_eq!(v["nla"]["logon"], "accepted", "{v:#}");
    assert_eq!(v["nla"]["servicePrincipal"], "TERMSRV/localhost@EXAMPLE.TEST", "{v:#}");
    assert_eq!(v["credential"]["checkedBy"], "kerberos", "{v:#}");
    assert_eq!(fleet.authenticates("krb-ok"), Some(0));

    // Where NTLM is blocked (707 for NTLM), Kerberos logs on.
    let v = run("ntlm-blocked", PW, &[]);
    assert_eq!(v["nla"]["logon"], "accepted", "{v:#}");
    assert!(!causes(&v).iter().any(|c| c.contains("NTLM_REFUSED")), "{v:#}");
    // With NTLM forced, the same target refuses NTLM itself: 707, not a bad password.
    let v = run("ntlm-blocked", PW, &["--nla-auth", "ntlm", "--nla-logon", "always"]);
    assert!(causes(&v).contains(&"CAUSE_NLA_NTLM_REFUSED".to_owned()), "{v:#}");

    // A target holding another computer's keys cannot read the ticket: a refused Kerberos
    // logon with the KRB-ERROR as evidence, and still no NTLM.
    let v = run("krb-wrong-service", PW, &[]);
    assert_eq!(v["verdict"], "VERDICT_DENY", "{v:#}");
    let f = finding(&v, "CAUSE_NLA_LOGON_FAILED").unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(evidence(f, "krb_error").as_deref(), Some("41"), "{f:#}");
    assert_eq!(evidence(f, "ntstatus").as_deref(), Some("0x80090322"), "{f:#}");
    assert_eq!(v["nla"]["auth"], "kerberos");
    assert_eq!(fleet.authenticates("krb-wrong-service"), Some(0));

    // A target without Kerberos asks for NTLM: with Kerberos asked for, NTLM is never tried.
    let v = run("krb-none", PW, &["--nla-auth", "kerberos"]);
    let f = finding(&v, "CAUSE_NLA_LOGON_FAILED").unwrap_or_else(|| panic!("{v:#}"));
    assert!(
        f["message"].as_str().is_some_and(|m| m.contains("NTLM was not tried")),
        "{f:#}"
    );
    assert_eq!(fleet.authenticates("krb-none"), Some(0));

    // A wrong password never reaches the target: the KDC refuses it (CRED_INVALID).
    let v = run("krb-ok", "Wrong-Pass-1!", &[]);
    assert_eq!(v["primaryCause"], "CAUSE_CRED_INVALID", "{v:#}");
    assert_eq!(v["nla"]["logon"], "not_attempted", "{v:#}");

    // Dialled by IP address there is no TERMSRV principal: with negotiate (the default) the
    // logon falls back to NTLM and says why; with kerberos it is not made at all.
    let by_ip = |extra: &[&str]| tokio::task::block_in_place(|| check_host(&harness, "127.0.0.1", "krb-ok", PW, extra));
    let v = by_ip(&[]);
    assert!(causes(&v).contains(&"CAUSE_TARGET_SPN_MISSING".to_owned()), "{v:#}");
    assert_eq!(v["nla"]["auth"], "ntlm", "{v:#}");
    assert!(
        v["nla"]["authFallback"]
            .as_str()
            .is_some_and(|r| r.contains("TERMSRV/127.0.0.1")),
        "{v:#}"
    );
    let before = fleet.authenticates("krb-ok");
    let v = by_ip(&["--nla-auth", "kerberos"]);
    assert_eq!(v["nla"]["logon"], "not_attempted", "{v:#}");
    assert!(
        v["nla"]["authFallback"]
            .as_str()
            .is_some_and(|r| r.starts_with("none:")),
        "{v:#}"
    );
    assert_eq!(
        fleet.authenticates("krb-ok"),
        before,
        "no AUTHENTICATE with nla.auth = kerberos"
    );
}
