//! The check report as the plugin's code sees it (no protobuf types here: `service.rs`
//! converts). Stages add findings with evidence; the verdict is derived at the end.

use std::{net::SocketAddr, time::Duration};

use crate::{
    cause::{Cause, Severity, Stage},
    secret::Credential,
};

/// A validated check request (the service and the CLI build it).
#[derive(Clone, Debug)]
pub struct CheckInput {
    /// The gateway's session id.
    pub request_id: String,
    /// Host name or IP literal.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Name the certificate must carry (defaults to `host`).
    pub expected_name: String,
    /// requestedProtocols.
    pub requested: u32,
    /// Weakest acceptable selected protocol.
    pub minimum: Option<u32>,
    /// NetBIOS or DNS computer name the NLA challenge must name (may be empty).
    pub expected_computer: String,
    /// The target account's credential.
    pub credential: Option<Credential>,
    /// Gateway user who asked.
    pub requester_user: String,
    /// Their source address.
    pub requester_source: String,
    /// Time budget for the whole check.
    pub budget: Duration,
}

/// One thing found wrong (or worth a warning), with the raw evidence beside the cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The catalog cause.
    pub cause: Cause,
    /// Stage where it was found (NLA may report a 6xx cause at stage `nla`).
    pub stage: Stage,
    /// One readable sentence about this target.
    pub message: String,
    /// Raw evidence: alert numbers, failure codes, result codes, fingerprints …
    pub evidence: Vec<(String, String)>,
}

impl Finding {
    /// A finding at the cause's own stage.
    pub fn new(cause: Cause, message: impl Into<String>) -> Self {
        let stage = cause.info().map_or(Stage::Check, |i| i.stage);
        Finding {
            cause,
            stage,
            message: message.into(),
            evidence: Vec::new(),
        }
    }

    /// Overrides the stage (e.g. a 6xx cause found by the NLA stage).
    pub fn at(mut self, stage: Stage) -> Self {
        self.stage = stage;
        self
    }

    /// Adds one piece of evidence.
    pub fn with(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.evidence.push((key.into(), value.to_string()));
        self
    }
}

/// Outcome of one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageStatus {
    /// Completed without a deny finding.
    Ok,
    /// Completed with a deny finding (or could not complete).
    Failed,
    /// Deliberately not run (not applicable, or nothing to check).
    Skipped,
    /// Not reached.
    NotRun,
}

/// Timing and status of one stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRecord {
    /// The stage.
    pub stage: Stage,
    /// Its outcome.
    pub status: StageStatus,
    /// Offset from the start of the check.
    pub start: Duration,
    /// How long it took.
    pub duration: Duration,
    /// Why skipped / not run, or a one-line summary.
    pub detail: String,
}

/// When a stage started, for its record.
#[derive(Clone, Copy, Debug)]
pub struct StageTimer {
    stage: Stage,
    offset: Duration,
    started: std::time::Instant,
}

impl StageTimer {
    /// Starts `stage` now, `offset` after the start of the check.
    pub fn start(stage: Stage, offset: Duration) -> Self {
        StageTimer {
            stage,
            offset,
            started: std::time::Instant::now(),
        }
    }

    /// The record of the stage, ending now.
    pub fn record(&self, status: StageStatus, detail: impl Into<String>) -> StageRecord {
        StageRecord {
            stage: self.stage,
            status,
            start: self.offset,
            duration: self.started.elapsed(),
            detail: detail.into(),
        }
    }
}

/// The records of a run of stages in a fixed order. A stage that was never recorded comes out
/// as not run, with the reason the run stopped: no exit path can leave a stage out.
#[derive(Clone, Debug)]
pub struct StageLog {
    order: &'static [Stage],
    records: Vec<StageRecord>,
    stopped: Option<String>,
}

impl StageLog {
    /// An empty log for `order`.
    pub fn new(order: &'static [Stage]) -> Self {
        StageLog {
            order,
            records: Vec::new(),
            stopped: None,
        }
    }

    /// Records a stage (a later record of the same stage replaces the earlier one).
    pub fn set(&mut self, record: StageRecord) {
        match self.records.iter_mut().find(|r| r.stage == record.stage) {
            Some(r) => *r = record,
            None => self.records.push(record),
        }
    }

    /// Says why the run stopped; stages not recorded after this are not run for that reason.
    /// The first reason wins.
    pub fn stop(&mut self, why: impl Into<String>) {
        if self.stopped.is_none() {
            self.stopped = Some(why.into());
        }
    }

    /// The reason the run stopped, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Whether `stage` has a record.
    pub fn has(&self, stage: Stage) -> bool {
        self.records.iter().any(|r| r.stage == stage)
    }

    /// Every stage of the order, in order; `at` is the offset given to stages not run.
    pub fn finish(self, at: Duration) -> Vec<StageRecord> {
        let StageLog {
            order,
            mut records,
            stopped,
        } = self;
        let why = stopped.unwrap_or_else(|| "not reached".to_owned());
        order
            .iter()
            .map(|stage| match records.iter().position(|r| r.stage == *stage) {
                Some(i) => records.swap_remove(i),
                None => StageRecord {
                    stage: *stage,
                    status: StageStatus::NotRun,
                    start: at,
                    duration: Duration::ZERO,
                    detail: why.clone(),
                },
            })
            .collect()
    }
}

/// Facts about the target's certificate (always filled when the server sent one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertFacts {
    /// Subject DN (RFC 4514 style).
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// SAN DNS names.
    pub san_dns: Vec<String>,
    /// SAN IP addresses.
    pub san_ip: Vec<String>,
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// Lower-case hex SHA-256 of the DER end-entity certificate.
    pub sha256_fingerprint: String,
    /// Issuer equals subject and the signature verifies with its own key.
    pub self_signed: bool,
    /// "RSA", "EC P-256", "Ed25519" …
    pub key_type: String,
    /// Key size in bits.
    pub key_bits: u32,
    /// e.g. "sha256WithRSAEncryption".
    pub signature_algorithm: String,
    /// Certificates the server sent.
    pub chain_length: u32,
    /// The path verifier's verdict ("trusted" or the error).
    pub verifier_verdict: String,
    /// Extended key usages (names or OIDs).
    pub extended_key_usage: Vec<String>,
    /// Serial number, hex.
    pub serial: String,
    /// Basic constraints CA:TRUE.
    pub is_ca: bool,
}

/// Facts about the target, filled as far as the stages got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetFacts {
    /// As requested.
    pub host: String,
    /// As requested (default applied).
    pub port: u16,
    /// Every address the name resolved to.
    pub resolved: Vec<SocketAddr>,
    /// The address the TCP connection reached.
    pub connected: Option<SocketAddr>,
    /// requestedProtocols as sent.
    pub requested_protocols: u32,
    /// selectedProtocol as received.
    pub selected_protocol: Option<u32>,
    /// Flags byte of RDP_NEG_RSP / RDP_NEG_FAILURE.
    pub negotiation_flags: Option<u8>,
    /// RDP_NEG_FAILURE failureCode, raw.
    pub negotiation_failure_code: Option<u32>,
    /// "TLSv1.3", "TLSv1.2", or the legacy version a server offered.
    pub tls_version: String,
    /// Negotiated cipher suite name.
    pub cipher_suite: String,
    /// The server certificate.
    pub certificate: Option<CertFacts>,
}

/// How the credential was judged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialFacts {
    /// "ldap", "nla" or empty.
    pub checked_by: String,
    /// The bind identity (DN, UPN, down-level); never the password.
    pub bind_identity: String,
    /// The directory server that answered.
    pub directory_server: String,
    /// LDAP resultCode, raw.
    pub ldap_result_code: Option<u32>,
    /// AD `data <hex>` sub-code.
    pub ad_data_code: String,
    /// Diagnostic message from the directory.
    pub diagnostic_message: String,
    /// Answered from memory (lockout guard or success cache), without a bind.
    pub from_memory: bool,
}

/// Facts the NLA stage read from the target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NlaFacts {
    /// TSRequest version the server answered.
    pub credssp_version: u32,
    /// MsvAvNbComputerName.
    pub netbios_computer: String,
    /// MsvAvNbDomainName.
    pub netbios_domain: String,
    /// MsvAvDnsComputerName.
    pub dns_computer: String,
    /// MsvAvDnsDomainName.
    pub dns_domain: String,
    /// OS version from the NTLM Version field.
    pub os_version: String,
    /// Target clock minus ours, milliseconds.
    pub clock_offset_millis: Option<i64>,
    /// "not_attempted", "accepted", "refused".
    pub logon: String,
    /// NTSTATUS from a TSRequest errorCode.
    pub ntstatus: Option<u32>,
    /// How the logon authenticated: "ntlm", "kerberos", or empty when none was attempted.
    pub auth: String,
    /// The Kerberos service principal the logon used (`TERMSRV/host@REALM`).
    pub service_principal: String,
    /// Why a logon that Kerberos was preferred for used NTLM (`nla.auth = "negotiate"`), or
    /// why none was made (`"kerberos"`); empty otherwise.
    pub auth_fallback: String,
}

/// Final verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No findings.
    Allow,
    /// Only warnings.
    AllowWithWarnings,
    /// At least one deny finding.
    Deny,
}

impl Verdict {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::AllowWithWarnings => "allow_with_warnings",
            Verdict::Deny => "deny",
        }
    }
}

/// A finished check.
#[derive(Clone, Debug)]
pub struct Report {
    /// Unique, time-sortable.
    pub check_id: String,
    /// The gateway's id.
    pub request_id: String,
    /// Verdict.
    pub verdict: Verdict,
    /// First deny in stage order, else first warning, else `Ok`.
    pub primary_cause: Cause,
    /// Findings with their effective severity, in stage order.
    pub findings: Vec<(Finding, Severity)>,
    /// One record per stage, in order.
    pub stages: Vec<StageRecord>,
    /// Target facts.
    pub target: TargetFacts,
    /// Credential facts.
    pub credential: CredentialFacts,
    /// NLA facts.
    pub nla: NlaFacts,
    /// Wall-clock start, seconds and nanoseconds since the Unix epoch.
    pub started_at: (i64, u32),
    /// Total duration.
    pub duration: Duration,
}

/// Derives the verdict and primary cause from findings that already carry their effective
/// severity, sorted into stage order (stable within a stage).
pub fn judge(findings: &mut [(Finding, Severity)]) -> (Verdict, Cause) {
    findings.sort_by_key(|(f, _)| f.stage);
    if let Some((f, _)) = findings.iter().find(|(_, s)| *s == Severity::Deny) {
        return (Verdict::Deny, f.cause);
    }
    match findings.first() {
        Some((f, _)) => (Verdict::AllowWithWarnings, f.cause),
        None => (Verdict::Allow, Cause::Ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_cause_is_first_deny_in_stage_order_else_first_warning() {
        let mut f = vec![
            (Finding::new(Cause::NetHighLatency, "slow"), Severity::Warn),
            (Finding::new(Cause::CredInvalid, "bad"), Severity::Deny),
            (Finding::new(Cause::CertUntrusted, "self-signed"), Severity::Warn),
            (Finding::new(Cause::CertExpired, "expired"), Severity::Deny),
        ];
        assert_eq!(judge(&mut f), (Verdict::Deny, Cause::CertExpired));
        let mut w = vec![
            (Finding::new(Cause::NetHighLatency, "slow"), Severity::Warn),
            (Finding::new(Cause::CertUntrusted, "self-signed"), Severity::Warn),
        ];
        assert_eq!(judge(&mut w), (Verdict::AllowWithWarnings, Cause::CertUntrusted));
        assert_eq!(judge(&mut []), (Verdict::Allow, Cause::Ok));
    }

    #[test]
    fn stage_log_marks_every_stage_not_reached_as_not_run() {
        const ORDER: [Stage; 4] = [Stage::Policy, Stage::Resolve, Stage::Tcp, Stage::X224];
        let mut log = StageLog::new(&ORDER);
        let t = StageTimer::start(Stage::Resolve, Duration::from_millis(1));
        log.set(t.record(StageStatus::Failed, "NXDOMAIN"));
        log.set(StageTimer::start(Stage::Policy, Duration::ZERO).record(StageStatus::Ok, "allowed"));
        log.stop("name did not resolve");
        log.stop("a later reason does not win");
        let stages = log.finish(Duration::from_millis(5));
        let got: Vec<(Stage, StageStatus, &str)> =
            stages.iter().map(|r| (r.stage, r.status, r.detail.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (Stage::Policy, StageStatus::Ok, "allowed"),
                (Stage::Resolve, StageStatus::Failed, "NXDOMAIN"),
                (Stage::Tcp, StageStatus::NotRun, "name did not resolve"),
                (Stage::X224, StageStatus::NotRun, "name did not resolve"),
            ]
        );
    }
}
