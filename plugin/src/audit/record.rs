//! One audit record: what the security team needs to judge a check without the plugin's logs.
//!
//! Built from the [`CheckInput`] and the [`Report`]; the writer fills in `seq` and `prev`.
//! The credential's password is never read: only the username and domain are copied.

use std::{fmt, time::Duration};

use serde::{
    de::{MapAccess, Visitor},
    ser::SerializeMap,
    Deserialize, Deserializer, Serialize, Serializer,
};

use crate::{
    cause::Severity,
    check::CheckInput,
    probe::x224::{failure, protocol},
    report::{Report, StageStatus},
};

/// `prev` of the first record of a new log.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One JSON line of the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Start of the check, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Position in the log: increasing by one per record, across files.
    pub seq: u64,
    /// The plugin's id of the check.
    pub check_id: String,
    /// The gateway's id of the session.
    pub request_id: String,
    /// Who asked.
    pub requester: Requester,
    /// The target as requested and as reached.
    pub target: Target,
    /// The target account (never the password); `null` when the request carried none.
    pub account: Option<Account>,
    /// `deny`, `allow_with_warnings` or `allow`.
    pub verdict: String,
    /// The cause that decided the verdict.
    pub primary_cause: CauseRef,
    /// Every finding, in stage order.
    pub findings: Vec<AuditFinding>,
    /// Every stage with its timing.
    pub stages: Vec<AuditStage>,
    /// Protocol, TLS, certificate and directory facts.
    pub facts: Facts,
    /// Duration of the whole check, milliseconds.
    pub duration_ms: f64,
    /// Version of the plugin that wrote the record.
    pub plugin_version: String,
    /// Lower-case hex SHA-256 of the previous record's line (without its newline);
    /// [`GENESIS_PREV`] for the first record of a log.
    pub prev: String,
}

/// `requester`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    /// Gateway user.
    pub user: String,
    /// Their source address, as the gateway reported it.
    pub source_address: String,
}

/// `target`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Host as requested.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Every address the name resolved to.
    #[serde(default)]
    pub resolved: Vec<String>,
    /// The address the TCP connection reached (`ip:port`), `null` if none.
    #[serde(default)]
    pub connected: Option<String>,
}

/// `account`: the target account, without its password.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Username as the vault stores it.
    pub username: String,
    /// Domain (may be empty).
    pub domain: String,
}

/// A cause by name and number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CauseRef {
    /// Public name (`TCP_REFUSED`).
    pub name: String,
    /// Public number (201).
    pub number: u16,
}

/// One finding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFinding {
    /// Public cause name.
    pub cause: String,
    /// Public cause number.
    pub number: u16,
    /// Effective severity: `deny` or `warn`.
    pub severity: String,
    /// Stage where it was found.
    pub stage: String,
    /// One sentence about this target.
    pub message: String,
    /// Raw evidence, in the order the stage recorded it.
    #[serde(default)]
    pub evidence: Evidence,
}

/// Evidence as a JSON object whose keys keep their recorded order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence(pub Vec<(String, String)>);

impl Evidence {
    /// The first value recorded under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl Serialize for Evidence {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Evidence {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Evidence;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Evidence, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = map.next_entry::<String, String>()? {
                    v.push((k, val));
                }
                Ok(Evidence(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// One stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditStage {
    /// Stage name.
    pub stage: String,
    /// `ok`, `failed`, `skipped` or `not_run`.
    pub status: String,
    /// Offset from the start of the check, milliseconds.
    pub start_ms: f64,
    /// Duration, milliseconds.
    pub duration_ms: f64,
    /// Why skipped or not run, or a one-line summary.
    #[serde(default)]
    pub detail: String,
}

/// The certificate, as far as the security team needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSummary {
    /// Lower-case hex SHA-256 of the DER end-entity certificate.
    pub sha256_fingerprint: String,
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// notBefore, RFC 3339.
    pub not_before: String,
    /// notAfter, RFC 3339.
    pub not_after: String,
    /// Issuer equals subject and the self-signature verifies.
    pub self_signed: bool,
    /// The path verifier's verdict.
    pub verifier_verdict: String,
}

/// Facts about the target and the directory; fields the check did not reach are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Facts {
    /// requestedProtocols as sent, raw.
    pub requested_protocols: u32,
    /// selectedProtocol, raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selected_protocol: Option<u32>,
    /// Its name (`HYBRID`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selected_protocol_name: Option<String>,
    /// RDP_NEG_FAILURE failureCode, raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negotiation_failure_code: Option<u32>,
    /// Its name (`SSL_CERT_NOT_ON_SERVER`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negotiation_failure_name: Option<String>,
    /// TLS version negotiated (or offered by a legacy server).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tls_version: String,
    /// Cipher suite negotiated.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cipher_suite: String,
    /// The server certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertSummary>,
    /// `ldap`, `nla` or absent.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub credential_checked_by: String,
    /// The bind identity (never the password).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub bind_identity: String,
    /// Directory server that answered.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub directory_server: String,
    /// LDAP resultCode, raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ldap_result_code: Option<u32>,
    /// AD `data` sub-code.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ad_data_code: String,
    /// Diagnostic message from the directory.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub directory_message: String,
    /// Answered from memory (lockout guard or success cache).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub credential_from_memory: bool,
    /// NTSTATUS from the NLA stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nla_ntstatus: Option<u32>,
    /// Computer name the NLA challenge carried.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub nla_computer: String,
    /// How the NLA logon authenticated ("ntlm", "kerberos"); empty when none was attempted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nla_auth: String,
}

fn ms(d: Duration) -> f64 {
    // Microsecond resolution is plenty and keeps the lines short.
    (d.as_micros() as f64) / 1000.0
}

fn status(s: StageStatus) -> &'static str {
    match s {
        StageStatus::Ok => "ok",
        StageStatus::Failed => "failed",
        StageStatus::Skipped => "skipped",
        StageStatus::NotRun => "not_run",
    }
}

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Deny => "deny",
        Severity::Warn => "warn",
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for seconds and nanoseconds since the Unix epoch.
pub fn rfc3339_millis(secs: i64, nanos: u32) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    let t = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(t)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned())
}

impl AuditRecord {
    /// Builds the record of one check; `seq` and `prev` are set by the writer.
    pub fn new(input: &CheckInput, report: &Report) -> AuditRecord {
        let t = &report.target;
        let c = &report.credential;
        let facts = Facts {
            requested_protocols: t.requested_protocols,
            selected_protocol: t.selected_protocol,
            selected_protocol_name: t.selected_protocol.map(protocol::name),
            negotiation_failure_code: t.negotiation_failure_code,
            negotiation_failure_name: t
                .negotiation_failure_code
                .map(|code| failure::name(code).map_or_else(|| format!("UNKNOWN_{code}"), str::to_owned)),
            tls_version: t.tls_version.clone(),
            cipher_suite: t.cipher_suite.clone(),
            certificate: t.certificate.as_ref().map(|cert| CertSummary {
                sha256_fingerprint: cert.sha256_fingerprint.clone(),
                subject: cert.subject.clone(),
                issuer: cert.issuer.clone(),
                not_before: rfc3339_millis(cert.not_before, 0),
                not_after: rfc3339_millis(cert.not_after, 0),
                self_signed: cert.self_signed,
                verifier_verdict: cert.verifier_verdict.clone(),
            }),
            credential_checked_by: c.checked_by.clone(),
            bind_identity: c.bind_identity.clone(),
            directory_server: c.directory_server.clone(),
            ldap_result_code: c.ldap_result_code,
            ad_data_code: c.ad_data_code.clone(),
            directory_message: c.diagnostic_message.clone(),
            credential_from_memory: c.from_memory,
            nla_ntstatus: report.nla.ntstatus,
            nla_computer: report.nla.netbios_computer.clone(),
            nla_auth: report.nla.auth.clone(),
        };
        AuditRecord {
            time: rfc3339_millis(report.started_at.0, report.started_at.1),
            seq: 0,
            check_id: report.check_id.clone(),
            request_id: report.request_id.clone(),
            requester: Requester {
                user: input.requester_user.clone(),
                source_address: input.requester_source.clone(),
            },
            target: Target {
                host: if t.host.is_empty() {
                    input.host.clone()
                } else {
                    t.host.clone()
                },
                port: if t.port == 0 { input.port } else { t.port },
                resolved: t.resolved.iter().map(|a| a.ip().to_string()).collect(),
                connected: t.connected.map(|a| a.to_string()),
            },
            // Only the username and the domain: `password` is never touched here.
            account: input.credential.as_ref().map(|c| Account {
                username: c.username.clone(),
                domain: c.domain.clone(),
            }),
            verdict: report.verdict.as_str().to_owned(),
            primary_cause: CauseRef {
                name: report.primary_cause.name().to_owned(),
                number: report.primary_cause.number(),
            },
            findings: report
                .findings
                .iter()
                .map(|(f, s)| AuditFinding {
                    cause: f.cause.name().to_owned(),
                    number: f.cause.number(),
                    severity: severity(*s).to_owned(),
                    stage: f.stage.as_str().to_owned(),
                    message: f.message.clone(),
                    evidence: Evidence(f.evidence.clone()),
                })
                .collect(),
            stages: report
                .stages
                .iter()
                .map(|s| AuditStage {
                    stage: s.stage.as_str().to_owned(),
                    status: status(s.status).to_owned(),
                    start_ms: ms(s.start),
                    duration_ms: ms(s.duration),
                    detail: s.detail.clone(),
                })
                .collect(),
            facts,
            duration_ms: ms(report.duration),
            plugin_version: env!("CARGO_PKG_VERSION").to_owned(),
            prev: String::new(),
        }
    }

    /// The record time as seconds since the Unix epoch (`None` if unparsable).
    pub fn unix_time(&self) -> Option<i64> {
        parse_rfc3339(&self.time)
    }

    /// `user@domain`-free display of the account: `DOMAIN\user`, `user`, or `-`.
    pub fn account_label(&self) -> String {
        match &self.account {
            None => "-".to_owned(),
            Some(a) if a.domain.is_empty() => a.username.clone(),
            Some(a) => format!("{}\\{}", a.domain, a.username),
        }
    }
}

/// Parses an RFC 3339 time into seconds since the Unix epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}
