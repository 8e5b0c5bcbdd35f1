//! The NLA stage against a real CredSSP server: FreeRDP's shadow server (`/sec:nla`, accounts
//! from a SAM file). TCP + X.224 (HYBRID) + TLS are made here by hand, then
//! `rdp_preflight::nla::run` runs on the TLS stream as the check does.
//!
//! Needs `scripts/install-test-deps.sh` (freerdp2-shadow-x11, winpr-utils, xvfb).

use std::{sync::Arc, time::Duration};

use integration_tests::shadow::{password, Shadow};
use rdp_preflight::{
    cause::{Cause, Stage},
    deadline::Budget,
    nla::{self, NlaInput, NlaOutcome},
    probe::tls::client_config,
    report::StageStatus,
    secret::{Credential, Password},
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

/// X.224 Connection Request with RDP_NEG_REQ asking for HYBRID | SSL (0x3).
const CR: [u8; 19] = [
    0x03, 0x00, 0x00, 0x13, 0x0e, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x08, 0x00, 0x03, 0x00, 0x00, 0x00,
];

/// TCP + X.224 + TLS to the shadow server: the TLS stream and the end-entity certificate's
/// subjectPublicKey.
async fn connect(port: u16) -> (TlsStream<TcpStream>, Vec<u8>) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    tcp.write_all(&CR).await.expect("write CR");
    let mut cc = [0u8; 19];
    tokio::time::timeout(Duration::from_secs(3), tcp.read_exact(&mut cc))
        .await
        .expect("X.224 confirm in time")
        .expect("read CC");
    assert_eq!(cc[5], 0xd0, "Connection Confirm: {cc:02x?}");
    assert_eq!(cc[11], 0x02, "RDP_NEG_RSP: {cc:02x?}");
    let selected = u32::from_le_bytes([cc[15], cc[16], cc[17], cc[18]]);
    assert_eq!(selected, 2, "the server selects HYBRID");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (config, verifier) = client_config(&provider).expect("tls config");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio::time::timeout(Duration::from_secs(3), TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("TLS in time")
        .expect("TLS handshake");
    let chain = verifier.chain();
    let der = chain.first().expect("server certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("certificate parses");
    let key = cert.public_key().subject_public_key.data.to_vec();
    (tls, key)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn nla_check(shadow: &Shadow, credential: Option<&Credential>, expected: &str) -> NlaOutcome {
    let (mut tls, key) = connect(shadow.port).await;
    let input = NlaInput {
        server_public_key: &key,
        credential,
        expected_computer: expected,
        clock_tolerance: Duration::from_secs(300),
        now_unix_ms: now_ms(),
    };
    let budget = Budget::new(Duration::from_secs(10));
    nla::run(&mut tls, &input, &budget, Duration::from_secs(4)).await
}

fn cred(user: &str, pw: &str) -> Credential {
    Credential {
        username: user.into(),
        domain: String::new(),
        password: Password::new(pw.into()),
    }
}

fn causes(o: &NlaOutcome) -> Vec<Cause> {
    o.findings.iter().map(|f| f.cause).collect()
}

fn evidence<'a>(o: &'a NlaOutcome, key: &str) -> Option<&'a str> {
    o.findings
        .iter()
        .flat_map(|f| f.evidence.iter())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// This host's name as NetBIOS would carry it: first label, at most 15 characters.
fn host_netbios() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    h.trim().split('.').next().unwrap_or("").chars().take(15).collect()
}

#[tokio::test]
async fn good_password_is_accepted_without_sending_tscredentials() {
    let shadow = Shadow::start();
    let c = cred("alice", password("alice"));
    let o = nla_check(&shadow, Some(&c), "").await;
    assert_eq!(o.facts.logon, "accepted", "{o:#?}\n{}", shadow.log());
    assert_eq!(o.status, StageStatus::Ok, "{o:#?}");
    assert!(o.findings.is_empty(), "{o:#?}");
    assert!(o.logon_attempted && !o.logon_failed);
    // A down-level name with a domain works too: the SAM entries have no domain.
    let c = cred("WORKGROUP\\bob", password("bob"));
    let o = nla_check(&shadow, Some(&c), "").await;
    assert_eq!(o.facts.logon, "accepted", "{o:#?}\n{}", shadow.log());
}

#[tokio::test]
async fn wrong_password_is_702_server_closed_after_authenticate() {
    let shadow = Shadow::start();
    let c = cred("alice", "not-the-password");
    let o = nla_check(&shadow, Some(&c), "").await;
    assert_eq!(causes(&o), vec![Cause::NlaLogonFailed], "{o:#?}\n{}", shadow.log());
    assert_eq!(evidence(&o, "server_closed_after"), Some("authenticate"), "{o:#?}");
    assert_eq!(o.findings[0].stage, Stage::Nla);
    assert_eq!(o.facts.logon, "refused");
    assert_eq!(o.status, StageStatus::Failed);
    assert!(o.logon_attempted && o.logon_failed);
    let all = format!("{o:?}");
    assert!(!all.contains("not-the-password"), "{all}");
    // The server keeps serving: the right password still works afterwards.
    let c = cred("alice", password("alice"));
    assert_eq!(nla_check(&shadow, Some(&c), "").await.facts.logon, "accepted");
}

#[tokio::test]
async fn unknown_account_is_702() {
    let shadow = Shadow::start();
    let c = cred("mallory", "Whatever-1");
    let o = nla_check(&shadow, Some(&c), "").await;
    assert_eq!(causes(&o), vec![Cause::NlaLogonFailed], "{o:#?}\n{}", shadow.log());
    assert_eq!(evidence(&o, "server_closed_after"), Some("authenticate"), "{o:#?}");
    assert!(o.logon_failed);
}

#[tokio::test]
async fn without_a_credential_the_challenge_names_the_host() {
    let shadow = Shadow::start();
    let o = nla_check(&shadow, None, "").await;
    assert_eq!(o.status, StageStatus::Ok, "{o:#?}\n{}", shadow.log());
    assert!(o.findings.is_empty(), "{o:#?}");
    assert_eq!(o.facts.credssp_version, 6);
    let host = host_netbios();
    assert!(
        o.facts.netbios_computer.eq_ignore_ascii_case(&host),
        "NetBIOS name {:?}, host {host:?}",
        o.facts.netbios_computer
    );
    assert_eq!(o.facts.netbios_computer, o.facts.netbios_computer.to_uppercase());
    let offset = o.facts.clock_offset_millis.expect("the challenge carries a timestamp");
    assert!(offset.abs() < 5_000, "clock offset {offset} ms on one host");
    assert_eq!(o.facts.logon, "not_attempted");
    assert!(!o.logon_attempted);
}

#[tokio::test]
async fn expected_computer_matching_and_not_matching() {
    let shadow = Shadow::start();
    let host = host_netbios().to_lowercase();
    let o = nla_check(&shadow, None, &host).await;
    assert!(!causes(&o).contains(&Cause::TargetIdentityMismatch), "{o:#?}");
    // With a credential too: the logon goes ahead.
    let c = cred("alice", password("alice"));
    let o = nla_check(&shadow, Some(&c), &host).await;
    assert_eq!(o.facts.logon, "accepted", "{o:#?}");

    let o = nla_check(&shadow, None, "not-this-host").await;
    assert_eq!(causes(&o), vec![Cause::TargetIdentityMismatch], "{o:#?}");
    assert_eq!(o.status, StageStatus::Failed);
    // And no AUTHENTICATE towards a computer that is not the expected one.
    let o = nla_check(&shadow, Some(&c), "not-this-host").await;
    assert_eq!(causes(&o), vec![Cause::TargetIdentityMismatch], "{o:#?}");
    assert!(!o.logon_attempted);
}
