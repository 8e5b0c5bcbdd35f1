//! The stage end to end against a scripted in-memory CredSSP server.

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::{
    credssp::test_server::{accept, challenge},
    tsrequest::{self, TsRequest},
    *,
};
use crate::secret::Password;

const KEY: &[u8] = b"server-subject-public-key-bytes";
const NOW_MS: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z
const NOW_FT: u64 = 133_485_408_000_000_000;
const CANARY: &str = "canary-Nla-Pa55!";

/// What the scripted server does after the AUTHENTICATE.
#[derive(Clone, Copy)]
enum After {
    Verify,
    ErrorCode(u32),
    Close,
    Stall,
    WrongKey,
}

struct Script {
    version: u32,
    nb: &'static str,
    dns: &'static str,
    timestamp: Option<u64>,
    stall_on_negotiate: bool,
    after: After,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            version: 6,
            nb: "HOST1",
            dns: "",
            timestamp: Some(NOW_FT),
            stall_on_negotiate: false,
            after: After::Verify,
        }
    }
}

async fn read_ts(s: &mut DuplexStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some(n)) = tsrequest::frame_len(&buf) {
            if buf.len() >= n {
                return Some(buf);
            }
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Serves one exchange; returns how many TSRequests the client sent.
async fn serve(mut s: DuplexStream, script: Script) -> usize {
    let Some(_negotiate) = read_ts(&mut s).await else {
        return 0;
    };
    if script.stall_on_negotiate {
        // Say nothing until the client gives up and closes.
        let _ = s.read_to_end(&mut Vec::new()).await;
        return 1;
    }
    let ch = challenge(script.nb, script.dns, script.timestamp);
    let hello = tsrequest::encode(&TsRequest {
        version: script.version,
        nego_tokens: vec![ch.clone()],
        ..TsRequest::default()
    });
    if s.write_all(&hello).await.is_err() {
        return 1;
    }
    let Some(auth) = read_ts(&mut s).await else { return 1 };
    let reply = match script.after {
        After::Close => return 2,
        After::Stall => {
            let _ = s.read_to_end(&mut Vec::new()).await;
            return 2;
        }
        After::ErrorCode(status) => tsrequest::encode(&TsRequest {
            version: script.version,
            error_code: Some(status),
            ..TsRequest::default()
        }),
        After::Verify | After::WrongKey => {
            let Some((_, nonce, mut sealer)) = accept(&auth, &ch, "alice", "EXAMPLE", CANARY) else {
                return 2;
            };
            let key: &[u8] = if matches!(script.after, After::WrongKey) {
                b"mitm"
            } else {
                KEY
            };
            let plain = if script.version >= 5 {
                let mut c = ring::digest::Context::new(&ring::digest::SHA256);
                c.update(b"CredSSP Server-To-Client Binding Hash\0");
                c.update(&nonce.unwrap_or_default());
                c.update(key);
                c.finish().as_ref().to_vec()
            } else {
                let mut k = key.to_vec();
                k[0] = k[0].wrapping_add(1);
                k
            };
            tsrequest::encode(&TsRequest {
                version: script.version,
                pub_key_auth: Some(sealer.seal(&plain)),
                ..TsRequest::default()
            })
        }
    };
    let _ = s.write_all(&reply).await;
    // Anything more would be TSCredentials.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "the client sent more after the pubKeyAuth exchange");
    2
}

fn cred(password: &str) -> Credential {
    Credential {
        username: "EXAMPLE\\alice".into(),
        domain: String::new(),
        password: Password::new(password.into()),
    }
}

async fn check(
    script: Script,
    credential: Option<&Credential>,
    expected: &str,
    limit: Duration,
) -> (NlaOutcome, usize) {
    let (mut client, server) = duplex(64 * 1024);
    let task = tokio::spawn(serve(server, script));
    let input = NlaInput {
        server_public_key: KEY,
        credential,
        expected_computer: expected,
        clock_tolerance: Duration::from_secs(300),
        now_unix_ms: NOW_MS,
    };
    let budget = Budget::new(Duration::from_secs(20));
    let out = run(&mut client, &input, &budget, limit).await;
    drop(client);
    let sent = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .map_or(0, |r| r.unwrap_or(0));
    (out, sent)
}

fn causes(o: &NlaOutcome) -> Vec<Cause> {
    o.findings.iter().map(|f| f.cause).collect()
}

fn evidence<'a>(f: &'a Finding, key: &str) -> Option<&'a str> {
    f.evidence.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

const LIMIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn without_a_credential_reads_names_version_and_clock_then_stops() {
    let (o, sent) = check(Script::default(), None, "", LIMIT).await;
    assert_eq!(sent, 1, "only the NEGOTIATE");
    assert_eq!(o.status, StageStatus::Ok, "{o:?}");
    assert!(o.findings.is_empty(), "{o:?}");
    assert_eq!(o.facts.credssp_version, 6);
    assert_eq!(o.facts.netbios_computer, "HOST1");
    assert_eq!(o.facts.netbios_domain, "WORKGROUP");
    assert_eq!(o.facts.os_version, "10.0.17763");
    assert_eq!(o.facts.logon, "not_attempted");
    assert!(o.facts.clock_offset_millis.is_some_and(|x| x.abs() < 1000));
    assert!(!o.logon_attempted && !o.logon_failed);
}

#[tokio::test]
async fn old_version_skewed_clock_and_wrong_computer_are_reported() {
    let script = Script {
        version: 4,
        timestamp: Some(NOW_FT + 10 * 60 * 10_000_000),
        ..Script::default()
    };
    let (o, _) = check(script, None, "other-host", LIMIT).await;
    assert_eq!(
        causes(&o),
        vec![
            Cause::NlaCredsspOutdated,
            Cause::ClockSkew,
            Cause::TargetIdentityMismatch
        ]
    );
    assert_eq!(o.status, StageStatus::Failed);
    assert!(o
        .facts
        .clock_offset_millis
        .is_some_and(|x| (599_000..=601_000).contains(&x)));
    let skew = &o.findings[1];
    assert_eq!(evidence(skew, "target_time"), Some("2024-01-01T00:10:00Z"));
    // Only warnings: the stage is Ok.
    let (o, _) = check(
        Script {
            version: 3,
            ..Script::default()
        },
        None,
        "host1",
        LIMIT,
    )
    .await;
    assert_eq!(causes(&o), vec![Cause::NlaCredsspOutdated]);
    assert_eq!(o.status, StageStatus::Ok);
}

#[test]
fn identity_comparison() {
    assert!(identity_matches("host1", "HOST1", ""));
    assert!(identity_matches("HOST1.example.test", "HOST1", ""));
    assert!(identity_matches("rds01.example.test", "RDS01", "rds01.example.test"));
    assert!(identity_matches("RDS01", "", "rds01.example.test"));
    assert!(identity_matches("rds01.example.test.", "RDS01", "RDS01.EXAMPLE.TEST"));
    assert!(!identity_matches("rds01.other.test", "RDS01", "rds01.example.test"));
    assert!(!identity_matches("rds02", "RDS01", "rds01.example.test"));
    assert!(!identity_matches("host1", "", ""));
    assert!(identity_matches(
        "averyveryverylongname.example.test",
        "AVERYVERYVERYLO",
        ""
    ));
    assert!(identity_matches("", "X", ""));
}

#[tokio::test]
async fn good_password_is_accepted_and_tscredentials_never_sent() {
    let c = cred(CANARY);
    let (o, sent) = check(Script::default(), Some(&c), "HOST1", LIMIT).await;
    assert_eq!(sent, 2);
    assert_eq!(o.facts.logon, "accepted", "{o:?}");
    assert_eq!(o.status, StageStatus::Ok);
    assert!(o.logon_attempted && !o.logon_failed);
    assert!(o.detail.contains("EXAMPLE\\alice"), "{}", o.detail);
    // Version 2-4 servers: the sealed key itself, answered with key + 1.
    let (o, _) = check(
        Script {
            version: 3,
            ..Script::default()
        },
        Some(&c),
        "",
        LIMIT,
    )
    .await;
    assert_eq!(o.facts.logon, "accepted", "{o:?}");
    assert_eq!(causes(&o), vec![Cause::NlaCredsspOutdated]);
    // No server timestamp: no MIC, our clock in the NTLMv2 blob, still accepted.
    let (o, _) = check(
        Script {
            timestamp: None,
            ..Script::default()
        },
        Some(&c),
        "",
        LIMIT,
    )
    .await;
    assert_eq!(o.facts.logon, "accepted", "{o:?}");
    assert_eq!(o.facts.clock_offset_millis, None);
}

#[tokio::test]
async fn wrong_password_close_is_702_with_evidence() {
    let c = cred("wrong-password");
    let script = Script {
        after: After::Close,
        ..Script::default()
    };
    let (o, _) = check(script, Some(&c), "", LIMIT).await;
    assert_eq!(causes(&o), vec![Cause::NlaLogonFailed]);
    assert_eq!(evidence(&o.findings[0], "server_closed_after"), Some("authenticate"));
    assert_eq!(o.facts.logon, "refused");
    assert!(o.logon_attempted && o.logon_failed);
    assert_eq!(o.status, StageStatus::Failed);
    // The verifying server also refuses a wrong password (it cannot verify the NTProofStr).
    let (o, _) = check(Script::default(), Some(&c), "", LIMIT).await;
    assert_eq!(causes(&o), vec![Cause::NlaLogonFailed]);
}

#[tokio::test]
async fn error_codes_map_to_causes() {
    let c = cred(CANARY);
    for (status, cause) in [
        (0xC000_0234, Cause::CredAccountLocked),
        (0xC000_006D, Cause::NlaLogonFailed),
        (0xC000_015B, Cause::NlaAccessDenied),
    ] {
        let script = Script {
            after: After::ErrorCode(status),
            ..Script::default()
        };
        let (o, _) = check(script, Some(&c), "", LIMIT).await;
        assert_eq!(causes(&o), vec![cause]);
        assert_eq!(o.findings[0].stage, Stage::Nla);
        assert_eq!(o.facts.ntstatus, Some(status));
        assert_eq!(o.facts.logon, "refused");
        assert!(o.logon_failed);
    }
}

#[test]
fn ntstatus_table() {
    let table = [
        (0xC000_0234, Cause::CredAccountLocked),
        (0xC000_0072, Cause::CredAccountDisabled),
        (0xC000_0071, Cause::CredPasswordExpired),
        (0xC000_0224, Cause::CredPasswordMustChange),
        (0xC000_0193, Cause::CredAccountExpired),
        (0xC000_006F, Cause::CredLogonHours),
        (0xC000_0070, Cause::CredWorkstationRestricted),
        (0xC000_015B, Cause::NlaAccessDenied),
        (0xC000_006D, Cause::NlaLogonFailed),
        (0xC000_006A, Cause::NlaLogonFailed),
        (0xC000_006E, Cause::NlaNtlmRefused),
        (0xC000_0418, Cause::NlaNtlmRefused),
        (0x8009_0302, Cause::NlaNtlmRefused),
        (0x8009_030C, Cause::NlaLogonFailed),
        (0x1234_5678, Cause::NlaLogonFailed),
    ];
    for (status, cause) in table {
        let f = ntstatus_finding(status);
        assert_eq!(f.cause, cause, "0x{status:08X}");
        assert_eq!(f.stage, Stage::Nla);
        assert_eq!(evidence(&f, "ntstatus"), Some(format!("0x{status:08X}").as_str()));
    }
    assert_eq!(
        evidence(&ntstatus_finding(0xC000_006D), "ntstatus_name"),
        Some("STATUS_LOGON_FAILURE")
    );
}

#[tokio::test]
async fn mismatched_computer_gets_no_authenticate() {
    let c = cred(CANARY);
    let (o, sent) = check(Script::default(), Some(&c), "dc01.example.test", LIMIT).await;
    assert_eq!(sent, 1, "the AUTHENTICATE must not go to the wrong computer");
    assert_eq!(causes(&o), vec![Cause::TargetIdentityMismatch]);
    assert!(!o.logon_attempted);
    assert_eq!(o.facts.logon, "not_attempted");
}

#[tokio::test]
async fn a_pubkeyauth_for_another_key_is_a_702_with_interception_evidence() {
    let c = cred(CANARY);
    let script = Script {
        after: After::WrongKey,
        ..Script::default()
    };
    let (o, _) = check(script, Some(&c), "", LIMIT).await;
    assert_eq!(causes(&o), vec![Cause::NlaLogonFailed]);
    assert_eq!(evidence(&o.findings[0], "possible_interception"), Some("true"));
    assert!(o.logon_failed);
}

#[tokio::test]
async fn stalls_are_timed_out_per_phase() {
    let c = cred(CANARY);
    let limit = Duration::from_millis(300);
    let (o, _) = check(
        Script {
            stall_on_negotiate: true,
            ..Script::default()
        },
        Some(&c),
        "",
        limit,
    )
    .await;
    assert_eq!(causes(&o), vec![Cause::NlaLogonFailed]);
    assert_eq!(evidence(&o.findings[0], "timeout_after"), Some("negotiate"));
    assert!(!o.logon_attempted && !o.logon_failed);
    let (o, _) = check(
        Script {
            after: After::Stall,
            ..Script::default()
        },
        Some(&c),
        "",
        limit,
    )
    .await;
    assert_eq!(evidence(&o.findings[0], "timeout_after"), Some("authenticate"));
    assert_eq!(o.facts.logon, "no_answer");
    assert!(o.logon_attempted && o.logon_failed);
}

#[tokio::test]
async fn the_check_deadline_is_902() {
    let (mut client, server) = duplex(4096);
    let task = tokio::spawn(serve(
        server,
        Script {
            stall_on_negotiate: true,
            ..Script::default()
        },
    ));
    let input = NlaInput {
        server_public_key: KEY,
        credential: None,
        expected_computer: "",
        clock_tolerance: Duration::from_secs(300),
        now_unix_ms: NOW_MS,
    };
    let budget = Budget::new(Duration::from_millis(200));
    let o = run(&mut client, &input, &budget, Duration::from_secs(10)).await;
    assert_eq!(causes(&o), vec![Cause::CheckDeadlineExceeded]);
    task.abort();
}

#[tokio::test]
async fn not_a_tsrequest_and_early_close() {
    let (mut client, mut server) = duplex(4096);
    let task = tokio::spawn(async move {
        let mut b = [0u8; 256];
        let _ = server.read(&mut b).await;
        let _ = server.write_all(b"\x03\x00\x00\x0b\x06\x80\x00\x00\x00\x00\x00").await;
    });
    let input = NlaInput {
        server_public_key: KEY,
        credential: None,
        expected_computer: "",
        clock_tolerance: Duration::from_secs(300),
        now_unix_ms: NOW_MS,
    };
    let budget = Budget::new(Duration::from_secs(5));
    let o = run(&mut client, &input, &budget, LIMIT).await;
    assert_eq!(causes(&o), vec![Cause::NlaLogonFailed]);
    assert!(evidence(&o.findings[0], "decode_error").is_some(), "{o:?}");
    let _ = task.await;

    let (mut client, mut server) = duplex(4096);
    let task = tokio::spawn(async move {
        let mut b = [0u8; 256];
        let _ = server.read(&mut b).await;
    });
    let o = run(&mut client, &input, &budget, LIMIT).await;
    assert_eq!(evidence(&o.findings[0], "server_closed_after"), Some("negotiate"));
    let _ = task.await;
}

#[tokio::test]
async fn the_password_appears_nowhere() {
    let c = cred(CANARY);
    for after in [
        After::Verify,
        After::Close,
        After::ErrorCode(0xC000_006D),
        After::WrongKey,
    ] {
        let (o, _) = check(
            Script {
                after,
                ..Script::default()
            },
            Some(&c),
            "",
            LIMIT,
        )
        .await;
        let all = format!("{o:?} {}", o.detail);
        assert!(!all.contains(CANARY), "{all}");
    }
    let input = NlaInput {
        server_public_key: KEY,
        credential: Some(&c),
        expected_computer: "",
        clock_tolerance: Duration::from_secs(300),
        now_unix_ms: NOW_MS,
    };
    assert!(!format!("{input:?}").contains(CANARY));
}

/// A CredSSP client state error is ours: an internal error, never a target finding.
#[test]
fn an_out_of_order_client_is_an_internal_error_not_a_target_cause() {
    let mut out = NlaOutcome::new();
    refused(&mut out, &credssp::Refusal::OutOfOrder, Phase::Negotiate);
    assert!(out.findings.is_empty(), "{:?}", out.findings);
    assert!(out.internal.is_some());
    let mut out = NlaOutcome::new();
    refused(&mut out, &credssp::Refusal::NoToken, Phase::Negotiate);
    assert_eq!(out.findings.len(), 1);
    assert!(out.internal.is_none());
}
