//! Scenario files (TOML): the target fleet, the directory's accounts and settings, and the
//! rows (sessions) the driver plays. See the crate's README.md for the format.
//!
//! Parsing is two-step: every `[[target]]`, `[[account]]` and `[[row]]` table is decoded on its
//! own (unknown keys rejected) and then validated, so an error names the table, its index and
//! its `name`, e.g. `target[3] "tls-stall": unknown behavior "stal"`.

use std::{fmt, net::IpAddr, path::Path, str::FromStr, time::Duration};

use rdp_preflight_proto::v1::{Cause, SecurityProtocol, Verdict};
use serde::{Deserialize, Serialize};

/// A scenario file could not be read or is malformed.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown top-level key.
    #[error("{0}")]
    Syntax(String),
    /// A table has an unknown, missing or invalid key, or refers to something missing.
    #[error("{location}: {message}")]
    Invalid {
        /// e.g. `target[3] "tls-stall"`.
        location: String,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// How a simulated target behaves. Names are the `behavior` values of the scenario file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behavior {
    /// Confirm selecting SSL (or `selected_protocol`), then a real TLS server.
    Healthy,
    /// Confirm selecting HYBRID, then a real TLS server (no CredSSP after it).
    HealthyNla,
    /// RDP_NEG_FAILURE with `failure_code`, then close.
    NegFailure,
    /// RDP_NEG_RSP selecting Standard RDP Security (or `selected_protocol`) whatever was asked.
    Downgrade,
    /// Connection Confirm without negotiation data, then wait.
    Legacy,
    /// Close right after accepting.
    CloseOnAccept,
    /// Accept, read the request, answer nothing.
    Silent,
    /// Answer an HTTP error page.
    Garbage,
    /// A line-based service (a web server, SMTP …): reads until the end of a line, answers an
    /// HTTP 400 page and closes; without a line it waits.
    LineService,
    /// Answer an X.224 Disconnect Request instead of a confirm.
    DisconnectRequest,
    /// Confirm SSL, read the ClientHello, close without an alert.
    TlsCloseAfterHello,
    /// Confirm SSL, read the ClientHello, answer an X.224 Disconnect Request.
    TlsDisconnectRequest,
    /// Confirm SSL, answer a TLS 1.0 ServerHello (TLS_RSA_WITH_AES_128_CBC_SHA), close.
    Tls10Only,
    /// Confirm SSL; a ClientHello offering TLS 1.2 or later gets a fatal protocol_version alert,
    /// a legacy one (client_version TLS 1.1 or lower) a TLS 1.0 ServerHello.
    Tls10Alert,
    /// Confirm SSL; a ClientHello offering TLS 1.2 or later gets a TCP reset without any alert
    /// (as Schannel limited to TLS 1.0 does), a legacy one a TLS 1.0 ServerHello.
    Tls10Reset,
    /// Confirm SSL, then a hand-written TLS 1.2 server flight with an RSA-1024 certificate
    /// (issued by the fixture rsa1024 CA) whose key signs the ServerKeyExchange.
    WeakRsa,
    /// Confirm SSL, answer a fatal handshake_failure alert.
    TlsNoSharedCipher,
    /// Confirm SSL, answer a fatal internal_error alert.
    TlsAlert,
    /// Confirm SSL, answer plain text.
    TlsNotTls,
    /// Confirm SSL, send the first 120 bytes of a real server flight, then nothing.
    TlsStall,
    /// Like `healthy`, with `delay_ms` before the confirm and before TLS.
    Slow,
    /// Odd connections healthy, even connections closed on accept.
    Flapping,
    /// Connections in runs of `run_length` (default 2): a run healthy, the next closed on
    /// accept, and so on; a path that stays down across the probe's retry, so successive checks
    /// go OK, OK, X224_CLOSED, OK, OK, X224_CLOSED … (a flapping target for the sweep).
    FlappingPath,
    /// Nothing listens on the port.
    Refused,
    /// Confirm HYBRID, TLS, then a CredSSP server (TSRequest version 6) that logs `[[account]]`s
    /// of state "good" on with NTLMv2.
    NlaHealthy,
    /// Like `nla_healthy` with TSRequest version 4 (no CVE-2018-0886 fix).
    NlaOld,
    /// Like `nla_healthy`, but answers every AUTHENTICATE with errorCode `ntstatus`.
    NlaError,
    /// Like `nla_healthy`, but closes right after the AUTHENTICATE without an errorCode.
    NlaClose,
    /// Like `nla_healthy`, its challenge naming another computer (default INTRUDER01).
    NlaOtherComputer,
    /// Like `nla_healthy`, its MsvAvTimestamp `skew_secs` off the real clock.
    NlaSkewed,
}

impl Behavior {
    /// Every behaviour, in documentation order.
    pub const ALL: [Behavior; 30] = [
        Behavior::Healthy,
        Behavior::HealthyNla,
        Behavior::NegFailure,
        Behavior::Downgrade,
        Behavior::Legacy,
        Behavior::CloseOnAccept,
        Behavior::Silent,
        Behavior::Garbage,
        Behavior::LineService,
        Behavior::DisconnectRequest,
        Behavior::TlsCloseAfterHello,
        Behavior::TlsDisconnectRequest,
        Behavior::Tls10Only,
        Behavior::Tls10Alert,
        Behavior::Tls10Reset,
        Behavior::WeakRsa,
        Behavior::TlsNoSharedCipher,
        Behavior::TlsAlert,
        Behavior::TlsNotTls,
        Behavior::TlsStall,
        Behavior::Slow,
        Behavior::Flapping,
        Behavior::FlappingPath,
        Behavior::Refused,
        Behavior::NlaHealthy,
        Behavior::NlaOld,
        Behavior::NlaError,
        Behavior::NlaClose,
        Behavior::NlaOtherComputer,
        Behavior::NlaSkewed,
    ];

    /// The scenario-file name.
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Healthy => "healthy",
            Behavior::HealthyNla => "healthy_nla",
            Behavior::NegFailure => "neg_failure",
            Behavior::Downgrade => "downgrade",
            Behavior::Legacy => "legacy",
            Behavior::CloseOnAccept => "close_on_accept",
            Behavior::Silent => "silent",
            Behavior::Garbage => "garbage",
            Behavior::LineService => "line_service",
            Behavior::DisconnectRequest => "disconnect_request",
            Behavior::TlsCloseAfterHello => "tls_close_after_hello",
            Behavior::TlsDisconnectRequest => "tls_disconnect_request",
            Behavior::Tls10Only => "tls10_only",
            Behavior::Tls10Alert => "tls10_alert",
            Behavior::Tls10Reset => "tls10_reset",
            Behavior::WeakRsa => "weak_rsa",
            Behavior::TlsNoSharedCipher => "tls_no_shared_cipher",
            Behavior::TlsAlert => "tls_alert",
            Behavior::TlsNotTls => "tls_not_tls",
            Behavior::TlsStall => "tls_stall",
            Behavior::Slow => "slow",
            Behavior::Flapping => "flapping",
            Behavior::FlappingPath => "flapping_path",
            Behavior::Refused => "refused",
            Behavior::NlaHealthy => "nla_healthy",
            Behavior::NlaOld => "nla_old",
            Behavior::NlaError => "nla_error",
            Behavior::NlaClose => "nla_close",
            Behavior::NlaOtherComputer => "nla_other_computer",
            Behavior::NlaSkewed => "nla_skewed",
        }
    }

    /// Runs a CredSSP server after the TLS handshake.
    pub fn is_nla(self) -> bool {
        matches!(
            self,
            Behavior::NlaHealthy
                | Behavior::NlaOld
                | Behavior::NlaError
                | Behavior::NlaClose
                | Behavior::NlaOtherComputer
                | Behavior::NlaSkewed
        )
    }

    /// Judges the AUTHENTICATE against the accounts (rather than refusing every logon).
    fn judges_logons(self) -> bool {
        matches!(
            self,
            Behavior::NlaHealthy | Behavior::NlaOld | Behavior::NlaOtherComputer | Behavior::NlaSkewed
        )
    }

    /// Completes a real TLS handshake with a certificate (so `cert` is meaningful).
    pub fn serves_certificate(self) -> bool {
        matches!(
            self,
            Behavior::Healthy
                | Behavior::HealthyNla
                | Behavior::Slow
                | Behavior::Flapping
                | Behavior::FlappingPath
                | Behavior::TlsStall
        ) || self.is_nla()
    }

    /// Sends an RDP_NEG_RSP whose selected protocol the scenario may set.
    fn takes_selected_protocol(self) -> bool {
        matches!(
            self,
            Behavior::Healthy
                | Behavior::Downgrade
                | Behavior::Slow
                | Behavior::Flapping
                | Behavior::FlappingPath
                | Behavior::TlsCloseAfterHello
                | Behavior::TlsDisconnectRequest
                | Behavior::Tls10Only
                | Behavior::Tls10Alert
                | Behavior::Tls10Reset
                | Behavior::WeakRsa
                | Behavior::TlsNoSharedCipher
                | Behavior::TlsAlert
                | Behavior::TlsNotTls
                | Behavior::TlsStall
        )
    }

    fn default_selected_protocol(self) -> u32 {
        match self {
            Behavior::HealthyNla => 2,
            Behavior::Downgrade => 0,
            b if b.is_nla() => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Behavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Behavior {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Behavior::ALL.into_iter().find(|b| b.as_str() == s).ok_or_else(|| {
            format!(
                "unknown behavior {s:?} (expected one of: {})",
                names(Behavior::ALL.map(Behavior::as_str))
            )
        })
    }
}

/// The certificate a TLS-serving target presents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertVariant {
    /// Issued by the sim CA: SAN = name, localhost, IP; now-1d..now+365d; EKU serverAuth.
    #[default]
    Valid,
    /// notAfter = now - 1 day.
    Expired,
    /// notBefore = now + 2 days.
    NotYetValid,
    /// notAfter = now + 3 days.
    ExpiringSoon,
    /// SAN and CN `other.example.test` only.
    WrongName,
    /// Self-signed with basic constraints CA:TRUE, like Windows' own RDP certificates.
    SelfSignedCa,
    /// RSA-2048 signed with sha1WithRSAEncryption by a fixture CA (see fixtures/README.md).
    Sha1,
    /// EKU clientAuth only.
    WrongEku,
    /// A fresh key and certificate for every connection.
    Rotating,
}

impl CertVariant {
    /// Every variant, in documentation order.
    pub const ALL: [CertVariant; 9] = [
        CertVariant::Valid,
        CertVariant::Expired,
        CertVariant::NotYetValid,
        CertVariant::ExpiringSoon,
        CertVariant::WrongName,
        CertVariant::SelfSignedCa,
        CertVariant::Sha1,
        CertVariant::WrongEku,
        CertVariant::Rotating,
    ];

    /// The scenario-file name.
    pub fn as_str(self) -> &'static str {
        match self {
            CertVariant::Valid => "valid",
            CertVariant::Expired => "expired",
            CertVariant::NotYetValid => "not_yet_valid",
            CertVariant::ExpiringSoon => "expiring_soon",
            CertVariant::WrongName => "wrong_name",
            CertVariant::SelfSignedCa => "self_signed_ca",
            CertVariant::Sha1 => "sha1",
            CertVariant::WrongEku => "wrong_eku",
            CertVariant::Rotating => "rotating",
        }
    }
}

impl fmt::Display for CertVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CertVariant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CertVariant::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            format!(
                "unknown cert {s:?} (expected one of: {})",
                names(CertVariant::ALL.map(CertVariant::as_str))
            )
        })
    }
}

/// One simulated target, validated, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// Unique name; also the certificate's DNS name.
    pub name: String,
    /// What it does.
    pub behavior: Behavior,
    /// Loopback address to listen on (default 127.0.0.1).
    pub address: IpAddr,
    /// Port; 0 = ephemeral.
    pub port: u16,
    /// Certificate variant (meaningful for TLS-serving behaviours only).
    pub cert: CertVariant,
    /// selectedProtocol put in RDP_NEG_RSP (wire value).
    pub selected_protocol: u32,
    /// failureCode for `neg_failure`.
    pub failure_code: u32,
    /// Delay for `slow`.
    pub delay: Duration,
    /// Connections per run for `flapping_path`.
    pub run_length: u64,
    /// CredSSP settings (meaningful for the `nla_*` behaviours only).
    pub nla: NlaSpec,
}

/// CredSSP / NTLM settings of the `nla_*` behaviours. The domain is always `SIMDOM`
/// (`simdom.test`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NlaSpec {
    /// NetBIOS computer name the challenge names; the DNS computer name is its lower case
    /// followed by `.simdom.test`.
    pub computer: String,
    /// TSRequest version the server sends (6; `nla_old`: 4).
    pub credssp_version: u32,
    /// NTSTATUS `nla_error` answers the AUTHENTICATE with.
    pub ntstatus: u32,
    /// Offset of MsvAvTimestamp from the real clock, seconds (`nla_skewed`).
    pub skew_secs: i64,
    /// Close after a refused AUTHENTICATE instead of answering errorCode (FreeRDP's shadow
    /// server does).
    pub close_after_authenticate: bool,
    /// Accounts logons are checked against: the scenario's `[[account]]` tables.
    pub accounts: Vec<Account>,
    /// Keys for Kerberos logons (SPNEGO with an AP-REQ); `None`: Kerberos offers are answered
    /// with a request for NTLM.
    pub keytab: Option<std::sync::Arc<crate::kerberos::Keytab>>,
    /// The host name whose `TERMSRV/` principal the simulated KDC issues tickets for, keyed to
    /// this target (`kerberos_spn`; it also sets `keytab`).
    pub kerberos_spn: Option<String>,
}

/// NTSTATUS STATUS_LOGON_FAILURE.
pub const STATUS_LOGON_FAILURE: u32 = 0xC000_006D;
/// Computer name of `nla_other_computer` unless the scenario gives one.
pub const INTRUDER_COMPUTER: &str = "INTRUDER01";
/// MsvAvTimestamp offset of `nla_skewed` unless the scenario gives one.
pub const DEFAULT_SKEW_SECS: i64 = 900;
/// Longest NetBIOS computer name.
const MAX_COMPUTER_NAME: usize = 15;

impl NlaSpec {
    /// Defaults for a target called `name` with `behavior`.
    pub fn new(name: &str, behavior: Behavior) -> NlaSpec {
        let computer = if behavior == Behavior::NlaOtherComputer {
            INTRUDER_COMPUTER.to_owned()
        } else {
            // The first DNS label, upper case, cut to a NetBIOS name's 15 characters.
            let label = name.split('.').next().unwrap_or(name);
            label.to_ascii_uppercase().chars().take(MAX_COMPUTER_NAME).collect()
        };
        NlaSpec {
            computer,
            credssp_version: if behavior == Behavior::NlaOld { 4 } else { 6 },
            ntstatus: STATUS_LOGON_FAILURE,
            skew_secs: if behavior == Behavior::NlaSkewed {
                DEFAULT_SKEW_SECS
            } else {
                0
            },
            close_after_authenticate: false,
            accounts: Vec::new(),
            keytab: None,
            kerberos_spn: None,
        }
    }
}

impl TargetSpec {
    /// A target with defaults for everything but name and behaviour.
    pub fn new(name: impl Into<String>, behavior: Behavior) -> Self {
        let name = name.into();
        TargetSpec {
            nla: NlaSpec::new(&name, behavior),
            name,
            behavior,
            address: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            cert: CertVariant::Valid,
            selected_protocol: behavior.default_selected_protocol(),
            failure_code: 0,
            delay: DEFAULT_SLOW_DELAY,
            run_length: 2,
        }
    }
}

/// Delay of a `slow` target when the scenario gives no `delay_ms`.
pub const DEFAULT_SLOW_DELAY: Duration = Duration::from_millis(300);

/// Account states the simulated directory knows.
pub const ACCOUNT_STATES: &[&str] = &[
    "good",
    "disabled",
    "locked",
    "password_expired",
    "must_change",
    "account_expired",
    "logon_hours",
    "workstation",
    "token_too_large",
];

/// A directory account (`[[account]]`), read by the simulated directory.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// sAMAccountName.
    pub name: String,
    /// The account's real password.
    pub password: String,
    /// One of [`ACCOUNT_STATES`].
    pub state: String,
    /// Domain for UPN / down-level identities.
    #[serde(default)]
    pub domain: Option<String>,
}

/// `[directory]` settings, read by the simulated directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorySettings {
    /// Listen on plain ldap:// (besides LDAPS).
    #[serde(default)]
    pub plain: bool,
    /// Refuse simple binds without TLS (AD: resultCode 8).
    #[serde(default)]
    pub require_tls: bool,
    /// Failed binds before an account locks; 0 = never.
    #[serde(default)]
    pub lockout_threshold: u32,
}

/// The verdict a row expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVerdict {
    /// VERDICT_ALLOW.
    Allow,
    /// VERDICT_ALLOW_WITH_WARNINGS.
    AllowWithWarnings,
    /// VERDICT_DENY.
    Deny,
}

impl ExpectedVerdict {
    /// The scenario-file name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpectedVerdict::Allow => "allow",
            ExpectedVerdict::AllowWithWarnings => "allow_with_warnings",
            ExpectedVerdict::Deny => "deny",
        }
    }

    /// The protobuf verdict.
    pub fn to_proto(self) -> Verdict {
        match self {
            ExpectedVerdict::Allow => Verdict::Allow,
            ExpectedVerdict::AllowWithWarnings => Verdict::AllowWithWarnings,
            ExpectedVerdict::Deny => Verdict::Deny,
        }
    }
}

impl FromStr for ExpectedVerdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(ExpectedVerdict::Allow),
            "allow_with_warnings" => Ok(ExpectedVerdict::AllowWithWarnings),
            "deny" => Ok(ExpectedVerdict::Deny),
            _ => Err(format!(
                "unknown expect_verdict {s:?} (expected one of: allow, allow_with_warnings, deny)"
            )),
        }
    }
}

/// One session the driver plays (`[[row]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Unique name; used in request ids.
    pub name: String,
    /// A `[[target]]` name.
    pub target: String,
    /// An `[[account]]` name, if the row carries a credential.
    pub account: Option<String>,
    /// Password sent instead of the account's (wrong-password rows).
    pub password: Option<String>,
    /// User name sent instead of the account's (unknown-account rows).
    pub user: Option<String>,
    /// Target.expected_name; `None` = the target's name.
    pub expected_name: Option<String>,
    /// Requested protocols; empty = the plugin's default.
    pub protocols: Vec<SecurityProtocol>,
    /// Expected primary cause.
    pub expect_cause: Cause,
    /// Expected verdict.
    pub expect_verdict: ExpectedVerdict,
    /// Times to play the row; the last answer is judged.
    pub repeat: u32,
    /// Target.expected_computer; `None` = no comparison.
    pub expected_computer: Option<String>,
    /// The credential is for the target's NLA logon alone: the row is played without a
    /// directory too.
    pub nla_only: bool,
    /// Played against the plugin configured with `[kerberos]` and the simulated KDC.
    pub kerberos: bool,
    /// Target.host sent instead of the target's address (e.g. a name whose `TERMSRV/`
    /// principal the KDC knows); the port stays the target's.
    pub host: Option<String>,
}

/// A whole scenario file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scenario {
    /// `[[target]]` tables.
    pub targets: Vec<TargetSpec>,
    /// `[[account]]` tables.
    pub accounts: Vec<Account>,
    /// The `[directory]` table, if present.
    pub directory: Option<DirectorySettings>,
    /// `[[row]]` tables.
    pub rows: Vec<Row>,
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: impl AsRef<Path>) -> Result<Scenario, ScenarioError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Scenario::parse(&text)
    }

    /// Parses and validates scenario text.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ScenarioError::Syntax(e.to_string()))?;

        let mut targets = Vec::new();
        for (i, value) in raw.target.into_iter().enumerate() {
            let location = location("target", i, &value);
            let spec = decode::<RawTarget>(value, &location)
                .and_then(|t| t.validate().map_err(|message| invalid(&location, message)))?;
            if targets.iter().any(|t: &TargetSpec| t.name == spec.name) {
                return Err(invalid(&location, format!("duplicate target name {:?}", spec.name)));
            }
            targets.push(spec);
        }

        let mut accounts: Vec<Account> = Vec::new();
        for (i, value) in raw.account.into_iter().enumerate() {
            let location = location("account", i, &value);
            let account = decode::<Account>(value, &location)?;
            if !ACCOUNT_STATES.contains(&account.state.as_str()) {
                return Err(invalid(
                    &location,
                    format!(
                        "key \"state\": unknown account state {:?} (expected one of: {})",
                        account.state,
                        names(ACCOUNT_STATES.iter().copied())
                    ),
                ));
            }
            if accounts.iter().any(|a| a.name == account.name) {
                return Err(invalid(&location, format!("duplicate account name {:?}", account.name)));
            }
            accounts.push(account);
        }

        for target in targets.iter_mut().filter(|t| t.behavior.is_nla()) {
            target.nla.accounts = accounts.clone();
        }

        let directory = match raw.directory {
            Some(value) => Some(decode::<DirectorySettings>(value, "directory")?),
            None => None,
        };

        let mut rows: Vec<Row> = Vec::new();
        for (i, value) in raw.row.into_iter().enumerate() {
            let location = location("row", i, &value);
            let row = decode::<RawRow>(value, &location)
                .and_then(|r| r.validate().map_err(|message| invalid(&location, message)))?;
            if !targets.iter().any(|t| t.name == row.target) {
                return Err(invalid(
                    &location,
                    format!("key \"target\": no [[target]] named {:?}", row.target),
                ));
            }
            if let Some(account) = &row.account {
                if !accounts.iter().any(|a| &a.name == account) {
                    return Err(invalid(
                        &location,
                        format!("key \"account\": no [[account]] named {account:?}"),
                    ));
                }
            }
            if rows.iter().any(|r| r.name == row.name) {
                return Err(invalid(&location, format!("duplicate row name {:?}", row.name)));
            }
            rows.push(row);
        }

        Ok(Scenario {
            targets,
            accounts,
            directory,
            rows,
        })
    }

    /// The target called `name`.
    pub fn target(&self, name: &str) -> Option<&TargetSpec> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The account called `name`.
    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.name == name)
    }
}

fn names(items: impl IntoIterator<Item = &'static str>) -> String {
    items.into_iter().collect::<Vec<_>>().join(", ")
}

fn location(table: &str, index: usize, value: &toml::Value) -> String {
    match value.get("name").and_then(toml::Value::as_str) {
        Some(name) => format!("{table}[{index}] {name:?}"),
        None => format!("{table}[{index}]"),
    }
}

fn invalid(location: &str, message: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        location: location.to_owned(),
        message: message.into(),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(value: toml::Value, location: &str) -> Result<T, ScenarioError> {
    value
        .try_into::<T>()
        .map_err(|e| invalid(location, e.message().trim().to_owned()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    target: Vec<toml::Value>,
    #[serde(default)]
    account: Vec<toml::Value>,
    #[serde(default)]
    directory: Option<toml::Value>,
    #[serde(default)]
    row: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    behavior: String,
    address: Option<String>,
    port: Option<u16>,
    cert: Option<String>,
    selected_protocol: Option<u32>,
    failure_code: Option<u32>,
    delay_ms: Option<u64>,
    run_length: Option<u64>,
    computer: Option<String>,
    credssp_version: Option<u32>,
    ntstatus: Option<u32>,
    skew_secs: Option<i64>,
    close_after_authenticate: Option<bool>,
    keytab: Option<String>,
    kerberos_spn: Option<String>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

impl RawTarget {
    fn validate(self) -> Result<TargetSpec, String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "key \"name\": {:?} is not a DNS label (letters, digits, '-' and '.'; it becomes the certificate's name)",
                self.name
            ));
        }
        let behavior: Behavior = self.behavior.parse()?;
        let mut spec = TargetSpec::new(self.name, behavior);
        if let Some(address) = self.address {
            let ip: IpAddr = address
                .parse()
                .map_err(|_| format!("key \"address\": {address:?} is not an IP address"))?;
            if !ip.is_loopback() {
                return Err(format!("key \"address\": {ip} is not a loopback address"));
            }
            spec.address = ip;
        }
        spec.port = self.port.unwrap_or(0);
        if let Some(cert) = self.cert {
            spec.cert = cert.parse().map_err(|e| format!("key \"cert\": {e}"))?;
            if spec.cert != CertVariant::Valid && !behavior.serves_certificate() {
                return Err(format!("key \"cert\": behavior {behavior:?} presents no certificate"));
            }
        }
        if let Some(selected) = self.selected_protocol {
            if !behavior.takes_selected_protocol() {
                return Err(format!(
                    "key \"selected_protocol\": not meaningful for behavior \"{behavior}\""
                ));
            }
            spec.selected_protocol = selected;
        }
        match (behavior, self.failure_code) {
            (Behavior::NegFailure, Some(code)) => spec.failure_code = code,
            (Behavior::NegFailure, None) => {
                return Err("behavior \"neg_failure\" needs key \"failure_code\"".to_owned());
            }
            (_, Some(_)) => {
                return Err(format!(
                    "key \"failure_code\": not meaningful for behavior \"{behavior}\""
                ));
            }
            (_, None) => {}
        }
        if let Some(ms) = self.delay_ms {
            if behavior != Behavior::Slow {
                return Err(format!("key \"delay_ms\": not meaningful for behavior \"{behavior}\""));
            }
            if ms > 30_000 {
                return Err(format!("key \"delay_ms\": {ms} is above the 30000 ms limit"));
            }
            spec.delay = Duration::from_millis(ms);
        }
        if let Some(n) = self.run_length {
            if behavior != Behavior::FlappingPath {
                return Err(format!(
                    "key \"run_length\": not meaningful for behavior \"{behavior}\""
                ));
            }
            if !(1..=1000).contains(&n) {
                return Err(format!("key \"run_length\": {n} is outside 1..=1000"));
            }
            spec.run_length = n;
        }
        let not_meaningful = |key: &str| format!("key \"{key}\": not meaningful for behavior \"{behavior}\"");
        if let Some(computer) = self.computer {
            if !behavior.is_nla() {
                return Err(not_meaningful("computer"));
            }
            let valid = !computer.is_empty()
                && computer.len() <= MAX_COMPUTER_NAME
                && computer.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !valid {
                return Err(format!(
                    "key \"computer\": {computer:?} is not a NetBIOS name (1 to 15 letters, digits and '-')"
                ));
            }
            spec.nla.computer = computer;
        }
        if let Some(version) = self.credssp_version {
            if !behavior.is_nla() {
                return Err(not_meaningful("credssp_version"));
            }
            let range = if behavior == Behavior::NlaOld { 2..=4 } else { 2..=6 };
            if !range.contains(&version) {
                return Err(format!(
                    "key \"credssp_version\": {version} is outside {}..={} for behavior \"{behavior}\"",
                    range.start(),
                    range.end()
                ));
            }
            spec.nla.credssp_version = version;
        }
        if let Some(status) = self.ntstatus {
            if behavior != Behavior::NlaError {
                return Err(not_meaningful("ntstatus"));
            }
            spec.nla.ntstatus = status;
        }
        if let Some(skew) = self.skew_secs {
            if behavior != Behavior::NlaSkewed {
                return Err(not_meaningful("skew_secs"));
            }
            // A century either way keeps the FILETIME arithmetic far from overflow.
            if skew.unsigned_abs() > 100 * 366 * 86_400 {
                return Err(format!("key \"skew_secs\": {skew} is beyond a century"));
            }
            spec.nla.skew_secs = skew;
        }
        if let Some(close) = self.close_after_authenticate {
            if !behavior.judges_logons() {
                return Err(not_meaningful("close_after_authenticate"));
            }
            spec.nla.close_after_authenticate = close;
        }
        if let Some(path) = &self.keytab {
            // nla_error with an NTLM refusal and a keytab: a target where only Kerberos works.
            if !behavior.judges_logons() && behavior != Behavior::NlaError {
                return Err(not_meaningful("keytab"));
            }
            let k = crate::kerberos::Keytab::read(std::path::Path::new(path))
                .map_err(|e| format!("key \"keytab\": {e}"))?;
            spec.nla.keytab = Some(std::sync::Arc::new(k));
        }
        if let Some(spn) = &self.kerberos_spn {
            if !behavior.judges_logons() && behavior != Behavior::NlaError {
                return Err(not_meaningful("kerberos_spn"));
            }
            if self.keytab.is_some() {
                return Err("keys \"keytab\" and \"kerberos_spn\": give one".to_owned());
            }
            if !valid_name(spn) {
                return Err(format!("key \"kerberos_spn\": {spn:?} is not a host name"));
            }
            spec.nla.keytab = Some(std::sync::Arc::new(crate::kdc::service_keytab(spn)));
            spec.nla.kerberos_spn = Some(spn.to_ascii_lowercase());
        }
        Ok(spec)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    name: String,
    target: String,
    account: Option<String>,
    password: Option<String>,
    user: Option<String>,
    expected_name: Option<String>,
    #[serde(default)]
    protocols: Vec<String>,
    expect_cause: String,
    expect_verdict: String,
    repeat: Option<u32>,
    expected_computer: Option<String>,
    nla_only: Option<bool>,
    kerberos: Option<bool>,
    host: Option<String>,
}

/// Parses a protocol name of the scenario file.
fn parse_protocol(name: &str) -> Result<SecurityProtocol, String> {
    Ok(match name {
        "rdp" => SecurityProtocol::Rdp,
        "ssl" => SecurityProtocol::Ssl,
        "hybrid" => SecurityProtocol::Hybrid,
        "rdstls" => SecurityProtocol::Rdstls,
        "hybrid_ex" => SecurityProtocol::HybridEx,
        "rdsaad" => SecurityProtocol::Rdsaad,
        _ => {
            return Err(format!(
                "key \"protocols\": unknown protocol {name:?} (expected one of: rdp, ssl, hybrid, rdstls, hybrid_ex, rdsaad)"
            ))
        }
    })
}

/// Parses a catalog cause name (`CERT_EXPIRED`, `OK`; the `CAUSE_` prefix is optional).
pub fn parse_cause(name: &str) -> Option<Cause> {
    let bare = name.strip_prefix("CAUSE_").unwrap_or(name);
    if bare == "UNSPECIFIED" {
        return None;
    }
    Cause::from_str_name(&format!("CAUSE_{bare}"))
}

/// The catalog name of a cause, without the `CAUSE_` prefix.
pub fn cause_name(cause: Cause) -> &'static str {
    let name = cause.as_str_name();
    name.strip_prefix("CAUSE_").unwrap_or(name)
}

impl RawRow {
    fn validate(self) -> Result<Row, String> {
        if self.name.is_empty() {
            return Err("key \"name\": empty".to_owned());
        }
        let protocols = self
            .protocols
            .iter()
            .map(|p| parse_protocol(p))
            .collect::<Result<Vec<_>, _>>()?;
        let expect_cause = parse_cause(&self.expect_cause).ok_or_else(|| {
            format!(
                "key \"expect_cause\": unknown cause {:?} (a catalog name such as CERT_EXPIRED or OK)",
                self.expect_cause
            )
        })?;
        let expect_verdict = self
            .expect_verdict
            .parse()
            .map_err(|e| format!("key \"expect_verdict\": {e}"))?;
        let repeat = self.repeat.unwrap_or(1);
        if !(1..=100).contains(&repeat) {
            return Err(format!("key \"repeat\": {repeat} is outside 1..=100"));
        }
        let nla_only = self.nla_only.unwrap_or(false);
        if nla_only && self.account.is_none() {
            return Err("key \"nla_only\": needs key \"account\" (the credential to send)".to_owned());
        }
        if self.expected_computer.as_deref() == Some("") {
            return Err("key \"expected_computer\": empty".to_owned());
        }
        if self.user.is_some() && self.account.is_none() {
            return Err("key \"user\": needs key \"account\" (whose password it sends)".to_owned());
        }
        Ok(Row {
            name: self.name,
            target: self.target,
            account: self.account,
            password: self.password,
            user: self.user,
            expected_name: self.expected_name,
            protocols,
            expect_cause,
            expect_verdict,
            repeat,
            expected_computer: self.expected_computer,
            nla_only,
            kerberos: self.kerberos.unwrap_or(false),
            host: self.host,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Scenario::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_behavior_names_row_and_value() {
        let text = r#"
[[target]]
name = "a"
behavior = "healthy"
[[target]]
name = "b"
behavior = "healthy"
[[target]]
name = "c"
behavior = "healthy"
[[target]]
name = "tls-stall"
behavior = "stal"
"#;
        let e = err(text);
        assert!(
            e.starts_with(r#"target[3] "tls-stall": unknown behavior "stal""#),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_row_and_key() {
        let e = err("[[target]]\nname = \"x\"\nbehavior = \"healthy\"\ncolour = 1\n");
        assert!(e.starts_with(r#"target[0] "x": "#) && e.contains("colour"), "{e}");
        let e = err(
            "[[row]]\nname = \"r\"\ntarget = \"x\"\nexpect_cause = \"OK\"\nexpect_verdict = \"allow\"\nrepet = 2\n",
        );
        assert!(e.starts_with(r#"row[0] "r": "#) && e.contains("repet"), "{e}");
        let e = err("[[target]]\nbehavior = \"healthy\"\n");
        assert!(e.starts_with("target[0]: ") && e.contains("name"), "{e}");
        let e = err("[[account]]\nname = \"alice\"\npassword = \"p\"\nstate = \"good\"\nshoe = 1\n");
        assert!(e.starts_with(r#"account[0] "alice": "#) && e.contains("shoe"), "{e}");
        let e = err("[directory]\nplane = true\n");
        assert!(e.starts_with("directory: ") && e.contains("plane"), "{e}");
        let e = err("[[targets]]\nname = \"x\"\n");
        assert!(e.contains("targets"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let base = "[[target]]\nname = \"t\"\nbehavior = \"healthy\"\n";
        let cases = [
            ("[[target]]\nname = \"n\"\nbehavior = \"neg_failure\"\n", "failure_code"),
            (
                "[[target]]\nname = \"h\"\nbehavior = \"healthy\"\nfailure_code = 3\n",
                "failure_code",
            ),
            (
                "[[target]]\nname = \"h\"\nbehavior = \"silent\"\ncert = \"expired\"\n",
                "cert",
            ),
            (
                "[[target]]\nname = \"h\"\nbehavior = \"healthy\"\ncert = \"expird\"\n",
                "expird",
            ),
            (
                "[[target]]\nname = \"h\"\nbehavior = \"healthy\"\ndelay_ms = 3\n",
                "delay_ms",
            ),
            (
                "[[target]]\nname = \"h\"\nbehavior = \"healthy\"\naddress = \"10.0.0.1\"\n",
                "address",
            ),
            ("[[target]]\nname = \"h x\"\nbehavior = \"healthy\"\n", "name"),
            (
                "[[target]]\nname = \"h\"\nbehavior = \"silent\"\nselected_protocol = 1\n",
                "selected_protocol",
            ),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(e.starts_with("target[0]") && e.contains(key), "{key}: {e}");
        }
        let rows = [
            (
                "target = \"nope\"\nexpect_cause = \"OK\"\nexpect_verdict = \"allow\"\n",
                "target",
            ),
            (
                "target = \"t\"\nexpect_cause = \"CERT_EXPIRD\"\nexpect_verdict = \"deny\"\n",
                "expect_cause",
            ),
            (
                "target = \"t\"\nexpect_cause = \"OK\"\nexpect_verdict = \"maybe\"\n",
                "expect_verdict",
            ),
            (
                "target = \"t\"\nexpect_cause = \"OK\"\nexpect_verdict = \"allow\"\nprotocols = [\"tls\"]\n",
                "protocols",
            ),
            (
                "target = \"t\"\nexpect_cause = \"OK\"\nexpect_verdict = \"allow\"\naccount = \"bob\"\n",
                "account",
            ),
            (
                "target = \"t\"\nexpect_cause = \"OK\"\nexpect_verdict = \"allow\"\nrepeat = 0\n",
                "repeat",
            ),
        ];
        for (body, key) in rows {
            let e = err(&format!("{base}[[row]]\nname = \"r1\"\n{body}"));
            assert!(e.starts_with(r#"row[0] "r1": "#) && e.contains(key), "{key}: {e}");
        }
        let e = err(&format!("{base}{base}"));
        assert!(e.starts_with(r#"target[1] "t": duplicate"#), "{e}");
        let e = err("[[account]]\nname = \"a\"\npassword = \"p\"\nstate = \"sleepy\"\n");
        assert!(e.starts_with(r#"account[0] "a": key "state""#), "{e}");
    }

    #[test]
    fn defaults_and_parameters() {
        let text = r#"
[[target]]
name = "h"
behavior = "healthy"
[[target]]
name = "nla"
behavior = "healthy_nla"
[[target]]
name = "down"
behavior = "downgrade"
[[target]]
name = "nf"
behavior = "neg_failure"
failure_code = 99
address = "127.0.0.3"
port = 40000
[[target]]
name = "slow"
behavior = "slow"
delay_ms = 50
cert = "expiring_soon"

[[account]]
name = "alice"
password = "Correct-Horse-1"
state = "good"
domain = "EXAMPLE"

[directory]
plain = true
lockout_threshold = 5

[[row]]
name = "r"
target = "h"
account = "alice"
protocols = ["ssl", "hybrid"]
expect_cause = "CAUSE_OK"
expect_verdict = "allow_with_warnings"
repeat = 3
"#;
        let s = Scenario::parse(text).unwrap();
        assert_eq!(s.target("h").unwrap().selected_protocol, 1);
        assert_eq!(s.target("h").unwrap().address, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(s.target("nla").unwrap().selected_protocol, 2);
        assert_eq!(s.target("down").unwrap().selected_protocol, 0);
        let nf = s.target("nf").unwrap();
        assert_eq!(
            (nf.failure_code, nf.port, nf.address),
            (99, 40000, IpAddr::from([127, 0, 0, 3]))
        );
        let slow = s.target("slow").unwrap();
        assert_eq!(
            (slow.delay, slow.cert),
            (Duration::from_millis(50), CertVariant::ExpiringSoon)
        );
        assert_eq!(s.account("alice").unwrap().domain.as_deref(), Some("EXAMPLE"));
        assert_eq!(
            s.directory,
            Some(DirectorySettings {
                plain: true,
                require_tls: false,
                lockout_threshold: 5
            })
        );
        let r = &s.rows[0];
        assert_eq!(r.protocols, vec![SecurityProtocol::Ssl, SecurityProtocol::Hybrid]);
        assert_eq!(
            (r.expect_cause, r.expect_verdict, r.repeat),
            (Cause::Ok, ExpectedVerdict::AllowWithWarnings, 3)
        );
    }

    #[test]
    fn default_scenario_covers_every_behavior_and_cert() {
        let text = include_str!("../scenarios/default.toml");
        let s = Scenario::parse(text).unwrap();
        for b in Behavior::ALL {
            assert!(
                s.rows.iter().any(|r| s.target(&r.target).unwrap().behavior == b),
                "no row plays behavior {b}"
            );
        }
        for c in CertVariant::ALL {
            assert!(
                s.rows.iter().any(|r| s.target(&r.target).unwrap().cert == c),
                "no row plays cert {c}"
            );
        }
        assert!(!s.accounts.is_empty());
    }

    #[test]
    fn nla_parameters_and_row_keys() {
        let text = r#"
[[target]]
name = "nla-healthy"
behavior = "nla_healthy"
computer = "RDP-SIM01"
close_after_authenticate = true
[[target]]
name = "nla-old"
behavior = "nla_old"
[[target]]
name = "nla-locked"
behavior = "nla_error"
ntstatus = 0xC0000234
[[target]]
name = "nla-skewed"
behavior = "nla_skewed"
skew_secs = -3600
[[target]]
name = "nla-impostor"
behavior = "nla_other_computer"
[[target]]
name = "plain"
behavior = "healthy"

[[account]]
name = "nina"
password = "Nla-Pass-1"
state = "good"

[[row]]
name = "r"
target = "nla-healthy"
account = "nina"
nla_only = true
expected_computer = "RDP-SIM01"
expect_cause = "OK"
expect_verdict = "allow"
"#;
        let s = Scenario::parse(text).unwrap();
        let h = s.target("nla-healthy").unwrap();
        assert_eq!(h.selected_protocol, 2);
        assert_eq!(
            (
                h.nla.computer.as_str(),
                h.nla.credssp_version,
                h.nla.close_after_authenticate
            ),
            ("RDP-SIM01", 6, true)
        );
        assert_eq!(h.nla.accounts, s.accounts);
        assert!(s.target("plain").unwrap().nla.accounts.is_empty());
        assert_eq!(s.target("nla-old").unwrap().nla.credssp_version, 4);
        assert_eq!(s.target("nla-old").unwrap().nla.computer, "NLA-OLD");
        assert_eq!(s.target("nla-locked").unwrap().nla.ntstatus, 0xC000_0234);
        assert_eq!(s.target("nla-skewed").unwrap().nla.skew_secs, -3600);
        assert_eq!(s.target("nla-impostor").unwrap().nla.computer, "INTRUDER01");
        let r = &s.rows[0];
        assert!(r.nla_only);
        assert_eq!(r.expected_computer.as_deref(), Some("RDP-SIM01"));

        let bad = [
            ("behavior = \"healthy\"\ncomputer = \"X\"\n", "computer"),
            (
                "behavior = \"nla_healthy\"\ncomputer = \"TOO-LONG-FOR-NETBIOS\"\n",
                "computer",
            ),
            ("behavior = \"nla_healthy\"\ncomputer = \"A.B\"\n", "computer"),
            ("behavior = \"nla_healthy\"\nntstatus = 5\n", "ntstatus"),
            ("behavior = \"nla_healthy\"\nskew_secs = 5\n", "skew_secs"),
            ("behavior = \"nla_skewed\"\nskew_secs = 9999999999\n", "skew_secs"),
            ("behavior = \"nla_old\"\ncredssp_version = 5\n", "credssp_version"),
            ("behavior = \"nla_healthy\"\ncredssp_version = 7\n", "credssp_version"),
            (
                "behavior = \"nla_error\"\nclose_after_authenticate = true\n",
                "close_after_authenticate",
            ),
            (
                "behavior = \"nla_healthy\"\nselected_protocol = 1\n",
                "selected_protocol",
            ),
        ];
        for (body, key) in bad {
            let e = err(&format!("[[target]]\nname = \"t\"\n{body}"));
            assert!(e.starts_with("target[0] \"t\"") && e.contains(key), "{key}: {e}");
        }
        let base = "[[target]]\nname = \"t\"\nbehavior = \"nla_healthy\"\n";
        let e = err(&format!(
            "{base}[[row]]\nname = \"r\"\ntarget = \"t\"\nnla_only = true\nexpect_cause = \"OK\"\nexpect_verdict = \"allow\"\n"
        ));
        assert!(e.starts_with("row[0] \"r\"") && e.contains("nla_only"), "{e}");
        let e = err(&format!(
            "{base}[[row]]\nname = \"r\"\ntarget = \"t\"\nexpected_computer = \"\"\nexpect_cause = \"OK\"\nexpect_verdict = \"allow\"\n"
        ));
        assert!(e.contains("expected_computer"), "{e}");
    }

    #[test]
    fn names_round_trip() {
        for b in Behavior::ALL {
            assert_eq!(b.as_str().parse::<Behavior>().unwrap(), b);
        }
        for c in CertVariant::ALL {
            assert_eq!(c.as_str().parse::<CertVariant>().unwrap(), c);
        }
        assert_eq!(parse_cause("CERT_EXPIRED"), Some(Cause::CertExpired));
        assert_eq!(parse_cause("UNSPECIFIED"), None);
        assert_eq!(cause_name(Cause::TlsHandshakeTimeout), "TLS_HANDSHAKE_TIMEOUT");
    }
}
