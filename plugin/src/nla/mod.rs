//! The NLA stage: CredSSP over the TLS stream the TLS stage handed on.
//!
//! Without a credential it sends an NTLM NEGOTIATE and reads the CHALLENGE: the server's CredSSP
//! version (701 below 5), its computer and domain names (704 when they do not name the expected
//! computer), its OS build and its clock (705 beyond the tolerance). With a credential it then
//! completes the NTLMv2 logon (AUTHENTICATE + pubKeyAuth bound to the server's TLS key),
//! verifies the server's pubKeyAuth answer, and stops: TSCredentials, which would carry the
//! password itself, is never sent. The connection is closed at the end either way.
//!
//! The protocol code is sans-IO ([`ntlm`], [`tsrequest`], [`credssp`]); [`run`] owns the stream
//! and the time. Every write and read runs under the check's [`Budget`] and one limit for the
//! whole stage.
//!
//! Choices a gateway relies on:
//! - **No logon towards the wrong computer.** When `expected_computer` is set and the
//!   CHALLENGE names another computer (704), the AUTHENTICATE is not sent: an NTLMv2 response
//!   handed to an impostor can be relayed or cracked offline. A CHALLENGE that names no
//!   computer at all cannot prove the identity either: also 704 (fail closed).
//! - **Failures of the exchange itself are 702** (the catalog's "an NTLM or SPNEGO failure"),
//!   told apart by evidence: `server_closed_after`, `timeout_after` (each `negotiate` or
//!   `authenticate`), `decode_error`, `ntlm_error`. A stall is a deny: a real client stalls at
//!   the same place. Before the AUTHENTICATE no password material has left the plugin and the
//!   message says so, so that the vault owner is not sent to rotate a password that was never
//!   tried; `logon_attempted` is false then.
//! - **The lockout guard.** `logon_attempted` is true once the AUTHENTICATE went out;
//!   `logon_failed` is true whenever it went out and the logon was not proven (a refusal, a close,
//!   a timeout, a pubKeyAuth that does not verify): an unknown outcome counts as a failure, the
//!   safe side for an account with a lockout threshold.
//! - **Facts** `logon`: `not_attempted`, `accepted`, `refused` (errorCode, close, or an answer
//!   that does not verify) or `no_answer` (timeout after the AUTHENTICATE).
//! - An NTSTATUS that has a 6xx meaning is reported with that cause at stage `nla`; the raw
//!   status is kept in `facts.ntstatus` and in the evidence.
//! - An empty password is never tried (detail says so, no finding: the credential stage owns
//!   `CRED_MISSING`).
//! - The clock offset compares the server's MsvAvTimestamp with our clock at the middle of the
//!   NEGOTIATE/CHALLENGE round trip.

pub mod credssp;
pub mod kerberos;
pub mod ntlm;
pub mod tsrequest;

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

use self::credssp::{Client, Entropy, Identity, Refusal};
use crate::{
    cause::{Cause, Severity, Stage},
    deadline::{deadline_finding, Budget, Expired},
    report::{Finding, NlaFacts, StageStatus},
    secret::Credential,
};

/// What the stage needs from the check.
#[derive(Debug)]
pub struct NlaInput<'a> {
    /// The subjectPublicKey BIT STRING contents of the server's end-entity certificate: what
    /// CredSSP binds pubKeyAuth to.
    pub server_public_key: &'a [u8],
    /// The account to log on with; `None`: NEGOTIATE/CHALLENGE only.
    pub credential: Option<&'a Credential>,
    /// The computer the target must be (NetBIOS or DNS name); empty: no comparison.
    pub expected_computer: &'a str,
    /// Largest accepted difference between the target's clock and ours.
    pub clock_tolerance: Duration,
    /// Our clock, milliseconds since the Unix epoch, when the stage starts.
    pub now_unix_ms: i64,
}

/// What the stage found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NlaOutcome {
    /// `Ok`, or `Failed` when a finding denies by default.
    pub status: StageStatus,
    /// Findings.
    pub findings: Vec<Finding>,
    /// Facts for the report.
    pub facts: NlaFacts,
    /// One line for the stage record.
    pub detail: String,
    /// The AUTHENTICATE went out (an attempt against the account's lockout budget).
    pub logon_attempted: bool,
    /// The attempt did not prove the password (record it in the lockout guard).
    pub logon_failed: bool,
    /// Our own side failed (an "impossible" state of the CredSSP client): not a target cause.
    pub internal: Option<String>,
}

impl NlaOutcome {
    fn new() -> Self {
        NlaOutcome {
            status: StageStatus::Ok,
            findings: Vec::new(),
            facts: NlaFacts {
                logon: "not_attempted".into(),
                ..NlaFacts::default()
            },
            detail: String::new(),
            logon_attempted: false,
            logon_failed: false,
            internal: None,
        }
    }

    fn finish(mut self, detail: String) -> Self {
        let deny = self
            .findings
            .iter()
            .any(|f| f.cause.info().is_some_and(|i| i.severity == Severity::Deny));
        self.status = if deny { StageStatus::Failed } else { StageStatus::Ok };
        self.detail = detail;
        self
    }
}

/// Which message the server was answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Negotiate,
    Authenticate,
    /// Kerberos: the AP-REQ.
    ApReq,
    /// Kerberos: pubKeyAuth after the AP-REP.
    PubKeyAuth,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Negotiate => "negotiate",
            Phase::Authenticate => "authenticate",
            Phase::ApReq => "ap_req",
            Phase::PubKeyAuth => "pub_key_auth",
        }
    }
}

/// How one round trip went wrong.
#[derive(Debug)]
enum IoFail {
    Expired(Expired),
    Closed {
        got: Vec<u8>,
        how: String,
    },
    Malformed {
        error: tsrequest::DecodeError,
        got: Vec<u8>,
    },
}

/// Writes `msg` and reads one TSRequest, all before `stage_deadline` and the check deadline.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
    budget: &Budget,
    stage_deadline: Instant,
) -> Result<Vec<u8>, IoFail> {
    let limit = stage_deadline.saturating_duration_since(Instant::now());
    let io = async {
        let closed = |got: Vec<u8>, e: std::io::Error| IoFail::Closed {
            got,
            how: format!("{:?}", e.kind()),
        };
        stream.write_all(msg).await.map_err(|e| closed(Vec::new(), e))?;
        stream.flush().await.map_err(|e| closed(Vec::new(), e))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            match tsrequest::frame_len(&buf) {
                Ok(Some(n)) if buf.len() >= n => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(_) => {}
                Err(error) => return Err(IoFail::Malformed { error, got: buf }),
            }
            match stream.read(&mut chunk).await {
                Ok(0) => {
                    return Err(IoFail::Closed {
                        got: buf,
                        how: "FIN".into(),
                    })
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(closed(buf, e)),
            }
        }
    };
    match budget.run(limit, io).await {
        Ok(r) => r,
        Err(which) => Err(IoFail::Expired(which)),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .take(16)
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The readable name of an NTSTATUS (or SSPI status) a CredSSP server may answer.
pub fn ntstatus_name(status: u32) -> &'static str {
    match status {
        0xC000_006D => "STATUS_LOGON_FAILURE",
        0xC000_006A => "STATUS_WRONG_PASSWORD",
        0xC000_0064 => "STATUS_NO_SUCH_USER",
        0xC000_0234 => "STATUS_ACCOUNT_LOCKED_OUT",
        0xC000_0072 => "STATUS_ACCOUNT_DISABLED",
        0xC000_0071 => "STATUS_PASSWORD_EXPIRED",
        0xC000_0224 => "STATUS_PASSWORD_MUST_CHANGE",
        0xC000_0193 => "STATUS_ACCOUNT_EXPIRED",
        0xC000_006F => "STATUS_INVALID_LOGON_HOURS",
        0xC000_0070 => "STATUS_INVALID_WORKSTATION",
        0xC000_006E => "STATUS_ACCOUNT_RESTRICTION",
        0xC000_0418 => "STATUS_NTLM_BLOCKED",
        0xC000_015B => "STATUS_LOGON_TYPE_NOT_GRANTED",
        0xC000_0022 => "STATUS_ACCESS_DENIED",
        0xC000_00BB => "STATUS_NOT_SUPPORTED",
        0xC000_0413 => "STATUS_AUTHENTICATION_FIREWALL_FAILED",
        0xC000_0133 => "STATUS_TIME_DIFFERENCE_AT_DC",
        0xC000_005E => "STATUS_NO_LOGON_SERVERS",
        0xC000_018D => "STATUS_TRUSTED_RELATIONSHIP_FAILURE",
        0x8009_030C => "SEC_E_LOGON_DENIED",
        0x8009_0302 => "SEC_E_UNSUPPORTED_FUNCTION",
        0x8009_0308 => "SEC_E_INVALID_TOKEN",
        0x8009_0311 => "SEC_E_NO_AUTHENTICATING_AUTHORITY",
        0x8009_0322 => "SEC_E_WRONG_PRINCIPAL",
        _ => "",
    }
}

/// True for the errorCodes of a target that refuses NTLM itself (catalog 707): NTLM blocked by
/// policy, the NTLM package unavailable, or a Protected Users account (which may not use NTLM).
/// Such a refusal comes before any password check: the lockout guard does not count it.
pub fn refuses_ntlm(status: u32) -> bool {
    matches!(status, 0xC000_0418 | 0x8009_0302 | 0xC000_006E)
}

/// The finding for an NTSTATUS from a TSRequest errorCode (catalog stage 7xx, NTSTATUS table).
pub fn ntstatus_finding(status: u32) -> Finding {
    let (cause, what) = match status {
        0xC000_0234 => (Cause::CredAccountLocked, "the account is locked out"),
        0xC000_0072 => (Cause::CredAccountDisabled, "the account is disabled"),
        0xC000_0071 => (Cause::CredPasswordExpired, "the password has expired"),
        0xC000_0224 => (
            Cause::CredPasswordMustChange,
            "the password must be changed at next logon",
        ),
        0xC000_0193 => (Cause::CredAccountExpired, "the account has expired"),
        0xC000_006F => (Cause::CredLogonHours, "the account may not log on at this time"),
        0xC000_0070 => (
            Cause::CredWorkstationRestricted,
            "the account may not log on from this workstation",
        ),
        0xC000_015B => (
            Cause::NlaAccessDenied,
            "the account is not granted logon through Remote Desktop Services on this target",
        ),
        s if refuses_ntlm(s) => (
            Cause::NlaNtlmRefused,
            "the target refuses NTLM itself, which says nothing about the password; only Kerberos logons work there",
        ),
        0xC000_006D | 0xC000_006A | 0xC000_0064 => (Cause::NlaLogonFailed, "the user name or password is wrong"),
        _ => (Cause::NlaLogonFailed, "the logon was refused"),
    };
    let name = ntstatus_name(status);
    let label = if name.is_empty() {
        format!("0x{status:08X}")
    } else {
        format!("0x{status:08X} {name}")
    };
    let mut f = Finding::new(cause, format!("the target refused the NLA logon: {what} ({label})"))
        .at(Stage::Nla)
        .with("ntstatus", format!("0x{status:08X}"));
    if !name.is_empty() {
        f = f.with("ntstatus_name", name);
    }
    f
}

/// True when `expected` names the computer the CHALLENGE describes: equal (ignoring case) to
/// the NetBIOS name, the DNS name or the DNS name's first label. When the target gives no DNS
/// name, the first label of an expected FQDN is compared with the NetBIOS name (15 characters
/// at most, as NetBIOS truncates).
pub fn identity_matches(expected: &str, netbios: &str, dns: &str) -> bool {
    let e = expected.trim().trim_end_matches('.');
    if e.is_empty() {
        return true;
    }
    let eq = |a: &str, b: &str| !b.is_empty() && a.eq_ignore_ascii_case(b);
    let dns = dns.trim_end_matches('.');
    let dns_first = dns.split('.').next().unwrap_or("");
    if eq(e, netbios) || eq(e, dns) || eq(e, dns_first) {
        return true;
    }
    if dns.is_empty() && e.contains('.') {
        let first = e.split('.').next().unwrap_or("");
        let cut: String = first.chars().take(15).collect();
        return eq(&cut, netbios);
    }
    false
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Fills the facts from the server's hello and judges version, identity and clock.
fn judge_hello(hello: &credssp::ServerHello, input: &NlaInput<'_>, our_ms: i64, out: &mut NlaOutcome) {
    let t = &hello.challenge.target_info;
    let facts = &mut out.facts;
    facts.credssp_version = hello.credssp_version;
    facts.netbios_computer = t.nb_computer.clone();
    facts.netbios_domain = t.nb_domain.clone();
    facts.dns_computer = t.dns_computer.clone();
    facts.dns_domain = t.dns_domain.clone();
    facts.os_version = hello.challenge.version.map(|v| v.to_string()).unwrap_or_default();
    if hello.credssp_version < 5 {
        out.findings.push(
            Finding::new(
                Cause::NlaCredsspOutdated,
                format!(
                    "the target speaks CredSSP version {}: it lacks the CVE-2018-0886 fix \
                     (clients with the fix fail with the \"encryption oracle remediation\" error)",
                    hello.credssp_version
                ),
            )
            .with("credssp_version", hello.credssp_version),
        );
    }
    if let Some(ts) = t.timestamp {
        let theirs = ntlm::filetime_to_unix_ms(ts);
        let offset = theirs - our_ms;
        out.facts.clock_offset_millis = Some(offset);
        let tolerance = i64::try_from(input.clock_tolerance.as_millis()).unwrap_or(i64::MAX);
        if offset.unsigned_abs() > tolerance.unsigned_abs() {
            let dir = if offset > 0 { "ahead of" } else { "behind" };
            out.findings.push(
                Finding::new(
                    Cause::ClockSkew,
                    format!(
                        "the target's clock is {} s {dir} ours (tolerance {} s): Kerberos logons to it will fail",
                        offset.unsigned_abs() / 1000,
                        input.clock_tolerance.as_secs()
                    ),
                )
                .with("clock_offset_ms", offset)
                .with("tolerance_ms", tolerance)
                .with("target_time", rfc3339(theirs))
                .with("our_time", rfc3339(our_ms)),
            );
        }
    }
    if !input.expected_computer.trim().is_empty()
        && !identity_matches(input.expected_computer, &t.nb_computer, &t.dns_computer)
    {
        let named = match (t.nb_computer.is_empty(), t.dns_computer.is_empty()) {
            (true, true) => "names no computer".to_owned(),
            (false, true) => format!("names {}", t.nb_computer),
            (true, false) => format!("names {}", t.dns_computer),
            (false, false) => format!("names {} ({})", t.nb_computer, t.dns_computer),
        };
        out.findings.push(
            Finding::new(
                Cause::TargetIdentityMismatch,
                format!(
                    "expected computer {:?}, but the target's NTLM challenge {named}",
                    input.expected_computer.trim()
                ),
            )
            .with("expected_computer", input.expected_computer.trim())
            .with("netbios_computer", &t.nb_computer)
            .with("dns_computer", &t.dns_computer)
            .with("netbios_domain", &t.nb_domain),
        );
    }
}

/// The finding for a round trip that failed.
fn io_finding(fail: &IoFail, phase: Phase, budget: &Budget, waited: Duration) -> Finding {
    let after = phase.as_str();
    let sent = match phase {
        Phase::Negotiate => "no password material was sent",
        Phase::Authenticate => "the logon was attempted",
        Phase::ApReq | Phase::PubKeyAuth => "a Kerberos logon: no password attempt was spent",
    };
    match fail {
        IoFail::Expired(Expired::Check) => deadline_finding(Stage::Nla, budget).with("waiting_after", after),
        IoFail::Expired(Expired::Stage) => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the target's CredSSP did not answer the {} message within {} ms ({sent})",
                after.to_uppercase(),
                waited.as_millis()
            ),
        )
        .with("timeout_after", after)
        .with("waited_ms", waited.as_millis()),
        IoFail::Closed { got, how } => {
            let msg = match phase {
                Phase::Negotiate => "the target closed the connection after the NTLM NEGOTIATE: NLA cannot complete \
                                     (no password material was sent)"
                    .to_owned(),
                Phase::Authenticate => "the target closed the connection after the AUTHENTICATE message with no \
                                        errorCode: the logon was refused (wrong password or unknown account)"
                    .to_owned(),
                Phase::ApReq | Phase::PubKeyAuth => format!(
                    "the target closed the connection after the Kerberos {}: the Kerberos logon was refused \
                     (no password attempt was spent)",
                    if phase == Phase::ApReq { "AP-REQ" } else { "pubKeyAuth" }
                ),
            };
            let mut f = Finding::new(Cause::NlaLogonFailed, msg)
                .with("server_closed_after", after)
                .with("how", how);
            if !got.is_empty() {
                f = f.with("bytes_received", got.len()).with("first_bytes", hex(got));
            }
            f
        }
        IoFail::Malformed { error, got } => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the target answered the {} message with something that is not a TSRequest ({sent})",
                after.to_uppercase()
            ),
        )
        .with("phase", after)
        .with("decode_error", error)
        .with("first_bytes", hex(got)),
    }
}

/// Records a refusal: an out-of-order call is our own error (internal), anything else the
/// target's answer.
fn refused(out: &mut NlaOutcome, r: &Refusal, phase: Phase) {
    if matches!(r, Refusal::OutOfOrder) {
        out.internal = Some(format!("CredSSP client state error after the {}", phase.as_str()));
    } else {
        out.findings.push(refusal_finding(r, phase));
    }
}

/// The finding for a refusal read from a well-framed answer.
fn refusal_finding(r: &Refusal, phase: Phase) -> Finding {
    let after = phase.as_str();
    match r {
        Refusal::ErrorCode { status, version } => {
            let f = ntstatus_finding(*status).with("credssp_version", version);
            if phase == Phase::Negotiate {
                f.with("phase", after)
            } else {
                f
            }
        }
        Refusal::PubKeyAuthMismatch(why) => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the target's pubKeyAuth answer {why}: the TLS connection may be intercepted; \
                 the logon is not trusted"
            ),
        )
        .with("phase", after)
        .with("possible_interception", true),
        other => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the CredSSP exchange failed after the {} message: {other}",
                after.to_uppercase()
            ),
        )
        .with("phase", after)
        .with(
            match other {
                Refusal::Ntlm(_) => "ntlm_error",
                Refusal::NotTsRequest(_) => "decode_error",
                _ => "error",
            },
            other,
        ),
    }
}

async fn close<S: AsyncWrite + Unpin>(stream: &mut S, budget: &Budget) {
    let _ = budget.run(Duration::from_millis(250), stream.shutdown()).await;
}

/// Fills `b` from the OS; without OS randomness, from the clock: a poor but non-constant
/// fallback, and the exchanges still never reveal the password.
fn fill_random(b: &mut [u8]) {
    use ring::rand::{SecureRandom, SystemRandom};
    if SystemRandom::new().fill(b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8 ^ (i as u8);
        }
    }
}

fn random_entropy() -> Entropy {
    Entropy::from_fn(fill_random)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Runs the stage on `stream` (the TLS stream after the X.224 exchange selected HYBRID or
/// HYBRID_EX): [`hello`], then [`Session::logon`] when the input carries a credential. Never
/// sends TSCredentials; shuts the stream down at the end.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &NlaInput<'_>,
    budget: &Budget,
    stage_limit: Duration,
) -> NlaOutcome {
    match hello(stream, input, budget, stage_limit).await {
        Ok(session) => session.logon(stream, input, budget).await,
        Err(out) => out,
    }
}

/// The stage after the CHALLENGE: the target's facts are known, nothing with the password has
/// been sent. Either [`Session::logon`] or [`Session::without_logon`] ends it.
pub struct Session {
    client: Client,
    out: NlaOutcome,
    summary: String,
    started: Instant,
    stage_deadline: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

/// NEGOTIATE → CHALLENGE, judged (version, identity, clock). `Err`: the stage is over (the
/// stream is closed and the outcome final).
pub async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &NlaInput<'_>,
    budget: &Budget,
    stage_limit: Duration,
) -> Result<Session, NlaOutcome> {
    let started = Instant::now();
    let stage_deadline = started + stage_limit;
    let mut out = NlaOutcome::new();
    let identity = input.credential.map(Identity::from_credential);
    let mut client = Client::new(identity, random_entropy());

    let negotiate = client.negotiate();
    let sent_at = started.elapsed();
    let answer = round_trip(stream, &negotiate, budget, stage_deadline).await;
    let received_at = started.elapsed();
    let bytes = match answer {
        Ok(b) => b,
        Err(fail) => {
            out.findings
                .push(io_finding(&fail, Phase::Negotiate, budget, received_at));
            close(stream, budget).await;
            return Err(out.finish("no CHALLENGE from the target".into()));
        }
    };
    let hello = match client.on_challenge(&bytes) {
        Ok(h) => h,
        Err(r) => {
            if let Refusal::ErrorCode { status, version } = r {
                out.facts.ntstatus = Some(status);
                out.facts.credssp_version = version;
            }
            refused(&mut out, &r, Phase::Negotiate);
            close(stream, budget).await;
            return Err(out.finish(format!("no CHALLENGE: {r}")));
        }
    };
    let our_ms = input.now_unix_ms + millis((sent_at + received_at) / 2);
    judge_hello(&hello, input, our_ms, &mut out);
    let who = if out.facts.netbios_computer.is_empty() {
        out.facts.dns_computer.clone()
    } else {
        out.facts.netbios_computer.clone()
    };
    let summary = format!("CredSSP v{}, computer {who:?}", out.facts.credssp_version);
    Ok(Session {
        client,
        out,
        summary,
        started,
        stage_deadline,
    })
}

impl Session {
    /// What the CHALLENGE told so far (facts and findings).
    pub fn so_far(&self) -> &NlaOutcome {
        &self.out
    }

    /// Ends the stage without a logon, saying why.
    pub async fn without_logon<S: AsyncWrite + Unpin>(self, stream: &mut S, budget: &Budget, why: &str) -> NlaOutcome {
        close(stream, budget).await;
        let summary = self.summary;
        self.out.finish(format!("{summary}; {why}"))
    }

    /// Adds a finding before the stage ends (e.g. the lockout guard's, at stage nla).
    pub fn push(&mut self, f: Finding) {
        self.out.findings.push(f);
    }

    /// AUTHENTICATE + pubKeyAuth → pubKeyAuth | errorCode | close, with the input's
    /// credential; without one (or towards the wrong computer, or with an empty password) the
    /// stage ends without a logon.
    pub async fn logon<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        stream: &mut S,
        input: &NlaInput<'_>,
        budget: &Budget,
    ) -> NlaOutcome {
        let Session {
            mut client,
            mut out,
            summary,
            started,
            stage_deadline,
        } = self;
        let Some(account) = input.credential.map(|c| Identity::from_credential(c).display()) else {
            close(stream, budget).await;
            return out.finish(format!("{summary}; no credential: logon not attempted"));
        };
        if out.findings.iter().any(|f| f.cause == Cause::TargetIdentityMismatch) {
            close(stream, budget).await;
            return out.finish(format!(
                "{summary}; logon not attempted: the target is not the expected computer"
            ));
        }
        if input.credential.is_some_and(|c| c.password.is_empty()) {
            close(stream, budget).await;
            return out.finish(format!("{summary}; empty password: logon not attempted"));
        }
        let now_ft = ntlm::unix_ms_to_filetime(input.now_unix_ms + millis(started.elapsed()));
        let authenticate = match client.authenticate(input.server_public_key, now_ft) {
            Ok(m) => m,
            Err(r) => {
                refused(&mut out, &r, Phase::Negotiate);
                close(stream, budget).await;
                return out.finish(format!("{summary}; logon not attempted: {r}"));
            }
        };
        out.logon_attempted = true;
        out.facts.auth = "ntlm".into();
        let answer = round_trip(stream, &authenticate, budget, stage_deadline).await;
        let waited = started.elapsed();
        let result = match answer {
            Ok(bytes) => client.on_answer(&bytes).map_err(|r| {
                if let Refusal::ErrorCode { status, .. } = r {
                    out.facts.ntstatus = Some(status);
                }
                if matches!(r, Refusal::OutOfOrder) {
                    // Still a sent attempt for the lockout guard, but not the target's doing.
                    out.internal = Some("CredSSP client state error after the authenticate".into());
                }
                refusal_finding(&r, Phase::Authenticate)
            }),
            Err(fail) => {
                if matches!(fail, IoFail::Expired(_)) {
                    out.facts.logon = "no_answer".into();
                }
                Err(io_finding(&fail, Phase::Authenticate, budget, waited))
            }
        };
        close(stream, budget).await;
        match result {
            Ok(()) => {
                out.facts.logon = "accepted".into();
                out.finish(format!("{summary}; logon accepted for {account}"))
            }
            Err(f) => {
                if out.facts.logon != "no_answer" {
                    out.facts.logon = "refused".into();
                }
                out.logon_failed = true;
                let detail = format!("{summary}; logon for {account} not accepted: {}", f.cause.name());
                out.findings.push(f.with("account", &account));
                out.finish(detail)
            }
        }
    }
}

fn random_krb_entropy() -> kerberos::KrbEntropy {
    kerberos::KrbEntropy::from_fn(fill_random)
}

/// The finding for a Kerberos logon the target did not accept.
fn kerberos_finding(r: &kerberos::KrbRefusal, phase: Phase, principal: &str) -> Finding {
    use kerberos::{krb_error_name, KrbRefusal};
    let after = phase.as_str();
    let krb = |f: Finding, code: u32| {
        let f = f.with("krb_error", code);
        match krb_error_name(code) {
            "" => f,
            name => f.with("krb_error_name", name),
        }
    };
    let by_code = |code: u32| match code {
        37 => Finding::new(
            Cause::ClockSkew,
            "the target refused the Kerberos logon because its clock and ours differ by more than 5 minutes \
             (KRB_AP_ERR_SKEW)",
        ),
        31 | 35 | 41 | 44 | 45 => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the target cannot read a ticket for {principal}: it is not the computer that principal belongs \
                 to (the name points elsewhere), or its keys are out of step with the directory \
                 (no password attempt was spent)"
            ),
        ),
        _ => Finding::new(
            Cause::NlaLogonFailed,
            format!("the target refused the Kerberos logon for {principal}"),
        ),
    };
    let f = match r {
        KrbRefusal::ErrorCode {
            status, krb: Some(k), ..
        } => krb(by_code(k.code), k.code).with("ntstatus", format!("0x{status:08X}")),
        KrbRefusal::ErrorCode { status, version, .. } => {
            let f = ntstatus_finding(*status).with("credssp_version", version);
            if f.cause == Cause::NlaNtlmRefused {
                // Not NTLM here: a refusal of the Kerberos logon.
                Finding {
                    cause: Cause::NlaLogonFailed,
                    ..f
                }
            } else {
                f
            }
        }
        KrbRefusal::KrbError(k) => krb(by_code(k.code), k.code),
        KrbRefusal::Rejected { mech } => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the target did not accept Kerberos for {principal}{}; NTLM was not tried (no silent fallback)",
                mech.map(|m| format!(" and asked for {m}")).unwrap_or_default()
            ),
        )
        .with("mech", mech.unwrap_or("")),
        KrbRefusal::MutualAuth(why) => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the target's Kerberos answer does not prove it holds the key of {principal} ({why}): \
                 the connection may be intercepted; the logon is not trusted"
            ),
        )
        .with("possible_interception", true),
        KrbRefusal::PubKeyAuthMismatch(why) => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the target's pubKeyAuth answer {why}: the TLS connection may be intercepted; \
                 the logon is not trusted"
            ),
        )
        .with("possible_interception", true),
        KrbRefusal::NotTsRequest(e) => Finding::new(
            Cause::NlaLogonFailed,
            "the target answered the Kerberos logon with something that is not a TSRequest",
        )
        .with("decode_error", e),
        other => Finding::new(
            Cause::NlaLogonFailed,
            format!(
                "the Kerberos exchange failed after the {}: {other}",
                after.to_uppercase()
            ),
        )
        .with("error", other),
    };
    f.at(Stage::Nla)
        .with("phase", after)
        .with("service_principal", principal)
}

/// The stage with a Kerberos logon (`nla.auth` kerberos or negotiate, and the credential stage
/// obtained a ticket for `TERMSRV/<host>`): AP-REQ in SPNEGO, the AP-REP proving the target
/// holds that principal's key (mutual authentication), pubKeyAuth both ways. No NTLM message is
/// sent, so the NTLM challenge's facts (names, clock) stay empty; no password attempt is spent
/// (`logon_attempted` stays false for the lockout guard).
pub async fn kerberos_logon<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &NlaInput<'_>,
    ticket: std::sync::Arc<crate::kerberos::messages::ServiceTicket>,
    budget: &Budget,
    stage_limit: Duration,
) -> NlaOutcome {
    let started = Instant::now();
    let stage_deadline = started + stage_limit;
    let mut out = NlaOutcome::new();
    out.facts.auth = "kerberos".into();
    out.facts.service_principal = ticket.principal.clone();
    let principal = ticket.principal.clone();
    let account = format!("{}@{}", ticket.user, ticket.realm);
    let now_ms = input.now_unix_ms;
    let mut client = kerberos::KrbClient::new(
        ticket,
        now_ms.div_euclid(1000),
        u32::try_from(now_ms.rem_euclid(1000) * 1000).unwrap_or(0),
        random_krb_entropy(),
    );
    let fail = |mut out: NlaOutcome, f: Finding, detail: String| {
        out.facts.logon = if out.facts.logon == "no_answer" {
            "no_answer"
        } else {
            "refused"
        }
        .into();
        out.findings.push(f.with("account", &account));
        out.finish(detail)
    };
    let first = match client.start() {
        Ok(m) => m,
        Err(e) => {
            out.internal = Some(format!("Kerberos CredSSP client: {e}"));
            close(stream, budget).await;
            return out.finish(format!("internal error: {e}"));
        }
    };
    let mut phase = Phase::ApReq;
    let mut msg = first;
    for step in 0..2 {
        let answer = round_trip(stream, &msg, budget, stage_deadline).await;
        let bytes = match answer {
            Ok(b) => b,
            Err(e) => {
                if matches!(e, IoFail::Expired(_)) {
                    out.facts.logon = "no_answer".into();
                }
                let f = io_finding(&e, phase, budget, started.elapsed()).with("service_principal", &principal);
                close(stream, budget).await;
                return fail(
                    out,
                    f,
                    format!("Kerberos logon for {principal}: no answer to the {}", phase.as_str()),
                );
            }
        };
        let r = if step == 0 {
            client.on_ap_rep(&bytes, input.server_public_key).map(Some)
        } else {
            client.on_answer(&bytes).map(|()| None)
        };
        out.facts.credssp_version = client.server_version();
        match r {
            Ok(Some(next)) => {
                msg = next;
                phase = Phase::PubKeyAuth;
            }
            Ok(None) => break,
            Err(kerberos::KrbRefusal::Internal(e)) => {
                out.internal = Some(format!("Kerberos CredSSP client: {e}"));
                close(stream, budget).await;
                return out.finish(format!("internal error: {e}"));
            }
            Err(r) => {
                if let kerberos::KrbRefusal::ErrorCode { status, .. } = r {
                    out.facts.ntstatus = Some(status);
                }
                let f = kerberos_finding(&r, phase, &principal);
                close(stream, budget).await;
                let detail = format!(
                    "CredSSP v{}; Kerberos logon for {account} to {principal} not accepted: {}",
                    out.facts.credssp_version,
                    f.cause.name()
                );
                return fail(out, f, detail);
            }
        }
    }
    close(stream, budget).await;
    if out.facts.credssp_version < 5 && out.facts.credssp_version != 0 {
        out.findings.push(
            Finding::new(
                Cause::NlaCredsspOutdated,
                format!(
                    "the target speaks CredSSP version {}: it lacks the CVE-2018-0886 fix",
                    out.facts.credssp_version
                ),
            )
            .with("credssp_version", out.facts.credssp_version),
        );
    }
    out.facts.logon = "accepted".into();
    let detail = format!(
        "CredSSP v{}; Kerberos logon accepted for {account} to {principal} (mutual authentication)",
        out.facts.credssp_version
    );
    out.finish(detail)
}

/// True when an NTSTATUS answer to the AUTHENTICATE is only given once the password has been
/// checked and found right (the account may still not log on): the lockout guard records a
/// proof, not a failure.
pub fn proves_password_right(status: u32) -> bool {
    matches!(
        status,
        0xC000_015B // STATUS_LOGON_TYPE_NOT_GRANTED
            | 0xC000_0224 // STATUS_PASSWORD_MUST_CHANGE
            | 0xC000_0071 // STATUS_PASSWORD_EXPIRED
            | 0xC000_006F // STATUS_INVALID_LOGON_HOURS
            | 0xC000_0070 // STATUS_INVALID_WORKSTATION
    )
}

#[cfg(test)]
mod tests;
