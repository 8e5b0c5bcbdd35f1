//! Configuration in two layers: [`FileConfig`], a serde mirror of the TOML file (unknown keys
//! refused), and [`Config`], validated and typed, with errors that name the key.
//!
//! Sources, later ones winning: embedded defaults, the TOML file, then environment variables
//! `RDP_PREFLIGHT_<SECTION>__<KEY>` (e.g. `RDP_PREFLIGHT_CHECK__DEFAULT_BUDGET_MS=8000`).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rustls_pki_types::{pem::PemObject, CertificateDer, TrustAnchor};
use serde::{Deserialize, Serialize};

use crate::{
    cause::{Cause, Severity},
    policy::{Network, TargetPolicy},
    probe::x224::protocol,
};

/// Environment variable prefix.
pub const ENV_PREFIX: &str = "RDP_PREFLIGHT";

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

fn err(key: &str, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("{key}: {msg}"))
}

/// The TOML file, as written.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `[server]`
    pub server: ServerFile,
    /// `[check]`
    pub check: CheckFile,
    /// `[probe]`
    pub probe: ProbeFile,
    /// `[cert]`
    pub cert: CertFile,
    /// `[network]`
    pub network: NetworkFile,
    /// `[policy]`
    pub policy: PolicyFile,
    /// `[severity]`: cause name → `warn` | `deny`.
    pub severity: BTreeMap<String, Severity>,
    /// `[log]`
    pub log: LogFile,
    /// `[directory]`: credential pre-validation by LDAP bind.
    pub directory: crate::credential::DirectoryFile,
    /// `[nla]`: the CredSSP / NTLM stage.
    pub nla: NlaFile,
    /// `[audit]`: the durable, hash-chained record of rejected sessions.
    pub audit: crate::audit::AuditFile,
    /// `[admin]`: the metrics listener.
    pub admin: crate::metrics::AdminFile,
    /// `[store]`: the shared store (PostgreSQL) that makes N replicas one plugin.
    pub store: crate::store::StoreFile,
    /// `[kerberos]`: the credential proven by an AS exchange with the KDC.
    pub kerberos: crate::kerberos::KerberosFile,
    /// `[history]`: every check's outcome, its retention, and the trend settings.
    pub history: crate::history::HistoryFile,
    /// `[sweep]`: the scheduled sweep of an inventory.
    pub sweep: crate::sweep::SweepFile,
    /// `[siem]`: every audit record exported to the SIEM (syslog, OCSF).
    pub siem: crate::siem::SiemFile,
    /// `[otel]`: one OpenTelemetry trace per check, and logs, over OTLP.
    pub otel: crate::otel::OtelFile,
}

/// `[nla]`: the NLA stage, run after a clean TLS stage when the server selected HYBRID or
/// HYBRID_EX.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NlaFile {
    /// Read the NTLM challenge (computer and domain names, clock, CredSSP version) (default true).
    pub enabled: bool,
    /// `auto`: complete the NTLM logon when the request carries a credential (after a
    /// successful bind when a directory is configured) and the target has proven who it is
    /// (its certificate verified against the trust anchors, a pin recorded earlier matched,
    /// or `expected_computer` matched the challenge); `always`: log on to any target, even an
    /// unauthenticated one (the behaviour before 0.2); `off`: never log on (default `auto`).
    pub logon: String,
    /// How the logon authenticates: `ntlm`; `kerberos` (a ticket for `TERMSRV/<host>` from the
    /// `[kerberos]` check, no password attempt; never NTLM); `negotiate` (Kerberos when a ticket
    /// was obtained, else NTLM, the fallback recorded with its reason). Empty (default):
    /// `negotiate` when `[kerberos]` is configured, else `ntlm`.
    pub auth: String,
    /// CLOCK_SKEW above this offset between the target's clock and ours (default 300 s).
    pub clock_tolerance_secs: u64,
    /// Stage limit (default 5000 ms).
    pub timeout_ms: u64,
    /// With no directory configured, the lockout guard for NLA logons: how long a failure is
    /// remembered (default 900 s) …
    pub guard_window_secs: u64,
    /// … and how many further different passwords may be tried within it (default 1).
    pub guard_max_distinct_failures: u32,
}

impl Default for NlaFile {
    fn default() -> Self {
        NlaFile {
            enabled: true,
            logon: "auto".into(),
            auth: String::new(),
            clock_tolerance_secs: 300,
            timeout_ms: 5000,
            guard_window_secs: 900,
            guard_max_distinct_failures: 1,
        }
    }
}

/// `[server]`: the gRPC listener and admission control.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    /// Listen address (default `127.0.0.1:50051`).
    pub listen: String,
    /// Checks running at once (default 64).
    pub max_concurrent_checks: usize,
    /// Checks waiting for a slot before new ones get RESOURCE_EXHAUSTED (default 256).
    pub max_queued_checks: usize,
    /// Serve on this Unix domain socket instead of TCP (default none).
    pub unix_socket: Option<PathBuf>,
    /// PEM certificate chain for gRPC over TLS (default none: plaintext).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA for client certificates: mutual TLS (default none).
    pub client_ca: Option<PathBuf>,
    /// File holding a bearer token every call must present as `authorization: Bearer <token>`
    /// (default none).
    pub bearer_token_file: Option<PathBuf>,
    /// Allow plaintext gRPC on a non-loopback TCP address (default false: refused at start).
    pub allow_plaintext: bool,
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            listen: "127.0.0.1:50051".into(),
            max_concurrent_checks: 64,
            max_queued_checks: 256,
            unix_socket: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            bearer_token_file: None,
            allow_plaintext: false,
        }
    }
}

/// `[check]`: the time budget.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckFile {
    /// Budget when the caller sets no gRPC deadline (default 10000 ms).
    pub default_budget_ms: u64,
    /// Cap on any budget, whatever the caller's deadline (default 30000 ms).
    pub max_budget_ms: u64,
    /// Kept back from a gRPC deadline so the answer still arrives in time (default 100 ms).
    pub deadline_margin_ms: u64,
}

impl Default for CheckFile {
    fn default() -> Self {
        CheckFile {
            default_budget_ms: 10_000,
            max_budget_ms: 30_000,
            deadline_margin_ms: 100,
        }
    }
}

/// `[probe]`: per-stage limits and what the X.224 request offers.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeFile {
    /// Default 3389.
    pub default_port: u16,
    /// Default 2000 ms.
    pub resolve_timeout_ms: u64,
    /// Default 3000 ms.
    pub tcp_timeout_ms: u64,
    /// Default 3000 ms.
    pub x224_timeout_ms: u64,
    /// Default 5000 ms.
    pub tls_timeout_ms: u64,
    /// `Cookie: mstshash=` line in the connection request, as mstsc sends one: the
    /// credential's user name when the request carries one, else this value (default
    /// `"rdp-preflight"`); `""` sends no cookie.
    pub cookie: Option<String>,
    /// Protocols requested when the request names none (default `["ssl", "hybrid"]`).
    pub default_protocols: Vec<String>,
    /// Weakest protocol a server may select (default: the weakest requested).
    pub minimum_protocol: Option<String>,
}

impl Default for ProbeFile {
    fn default() -> Self {
        ProbeFile {
            default_port: 3389,
            resolve_timeout_ms: 2000,
            tcp_timeout_ms: 3000,
            x224_timeout_ms: 3000,
            tls_timeout_ms: 5000,
            cookie: None,
            default_protocols: vec!["ssl".into(), "hybrid".into()],
            minimum_protocol: None,
        }
    }
}

/// `[cert]`: certificate judgement.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertFile {
    /// PEM files with trust anchors for target certificates (default none: every certificate
    /// is CERT_UNTRUSTED, a warning by default).
    pub trust_anchors: Vec<PathBuf>,
    /// CERT_EXPIRING_SOON window (default 14 days).
    pub expiring_days: u32,
    /// Trust-on-first-use pin store: `"auto"` (a file in `$STATE_DIRECTORY`, else
    /// `$XDG_STATE_HOME/rdp-preflight`, else `~/.local/state/rdp-preflight`), `"memory"`,
    /// `"off"`, or a file path (default `"auto"`).
    pub pin_store: String,
    /// Fixed pins: `"address:port" = "<sha256 hex>"` (the address the connection reaches), or
    /// `"name:port"` (matched when a request dials that name); they win over the store.
    pub pins: BTreeMap<String, String>,
}

impl Default for CertFile {
    fn default() -> Self {
        CertFile {
            trust_anchors: Vec::new(),
            expiring_days: 14,
            pin_store: "auto".into(),
            pins: BTreeMap::new(),
        }
    }
}

/// `[network]`: network quality thresholds.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkFile {
    /// NET_HIGH_LATENCY above this round trip (default 250 ms).
    pub high_latency_ms: u64,
    /// A connect slower than this while the X.224 round trip stayed fast suggests a SYN
    /// retransmission: NET_UNSTABLE (default 900 ms).
    pub retransmission_ms: u64,
    /// Retry once, quickly, after a failure that flapping paths produce (default true).
    pub retry_transient: bool,
}

impl Default for NetworkFile {
    fn default() -> Self {
        NetworkFile {
            high_latency_ms: 250,
            retransmission_ms: 900,
            retry_transient: true,
        }
    }
}

/// `[policy]`: which targets may be probed at all.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFile {
    /// Allow loopback targets (test fleets, local tunnels). Default false.
    pub allow_loopback: bool,
    /// CIDR networks targets must be in (default: any, except the always-denied set).
    pub allow_networks: Vec<String>,
    /// DNS suffixes host names must end with (default: any). When set, IP literals are refused
    /// unless they fall in `allow_networks`.
    pub allow_dns_suffixes: Vec<String>,
    /// Ports targets may use (default: any).
    pub allow_ports: Vec<u16>,
}

/// `[log]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    /// `text` or `json` (default `text`).
    pub format: String,
    /// A `tracing` filter (default `info`); `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Where pins live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinStoreConfig {
    /// No TOFU pinning.
    Off,
    /// In memory, lost at restart.
    Memory,
    /// A JSON file.
    File(PathBuf),
}

/// TLS material for the gRPC listener, as PEM bytes.
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain.
    pub cert_pem: Vec<u8>,
    /// Private key.
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
    /// Client CA for mutual TLS.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Unix domain socket to serve on instead of TCP.
    pub unix_socket: Option<PathBuf>,
    /// TLS for the gRPC listener.
    pub server_tls: Option<ServerTls>,
    /// Bearer token every call must present.
    pub bearer_token: Option<crate::secret::Password>,
    /// Checks running at once.
    pub max_concurrent_checks: usize,
    /// Checks waiting before RESOURCE_EXHAUSTED.
    pub max_queued_checks: usize,
    /// Budget without a caller deadline.
    pub default_budget: Duration,
    /// Cap on any budget.
    pub max_budget: Duration,
    /// Kept back from a gRPC deadline.
    pub deadline_margin: Duration,
    /// Default target port.
    pub default_port: u16,
    /// Per-stage limits.
    pub resolve_timeout: Duration,
    /// TCP connect limit.
    pub tcp_timeout: Duration,
    /// X.224 exchange limit.
    pub x224_timeout: Duration,
    /// TLS handshake limit.
    pub tls_timeout: Duration,
    /// mstshash cookie sent when the request has no usable user name (`None`: no cookie).
    pub cookie: Option<String>,
    /// requestedProtocols when the request names none.
    pub default_protocols: u32,
    /// Weakest acceptable selected protocol.
    pub minimum_protocol: Option<u32>,
    /// Trust anchors for target certificates.
    pub trust_anchors: Vec<TrustAnchor<'static>>,
    /// CERT_EXPIRING_SOON window.
    pub expiring_window: Duration,
    /// TOFU pin store.
    pub pin_store: PinStoreConfig,
    /// Fixed pins by connected `address:port`, or `name:port` (lower-case name).
    pub pins: HashMap<String, String>,
    /// NET_HIGH_LATENCY threshold.
    pub high_latency: Duration,
    /// NET_UNSTABLE retransmission threshold.
    pub retransmission: Duration,
    /// Retry once after a transient-looking failure.
    pub retry_transient: bool,
    /// Target policy.
    pub policy: TargetPolicy,
    /// Per-cause severity overrides.
    pub severity: HashMap<Cause, Severity>,
    /// Log format: `text` or `json`.
    pub log_json: bool,
    /// Log filter.
    pub log_level: String,
    /// NLA stage on.
    pub nla_enabled: bool,
    /// When the NLA stage logs on.
    pub nla_logon: NlaLogon,
    /// `nla.auth`, resolved.
    pub nla_auth: NlaAuth,
    /// The domains' NetBIOS and DNS names (`directory.domains`).
    pub domains: crate::guard::identity::Domains,
    /// CLOCK_SKEW threshold.
    pub nla_clock_tolerance: Duration,
    /// NLA stage limit.
    pub nla_timeout: Duration,
    /// Lockout guard window for NLA logons without a directory.
    pub nla_guard_window: Duration,
    /// Further distinct passwords within the window.
    pub nla_guard_max_distinct_failures: u32,
    /// Audit log (`None`: no audit log).
    pub audit: Option<crate::audit::AuditConfig>,
    /// Admin listener for `/metrics` and `/healthz` (`None`: off).
    pub admin_listen: Option<SocketAddr>,
    /// Directory for credential pre-validation (`None`: no LDAP bind).
    pub directory: Option<crate::credential::DirectoryConfig>,
    /// The shared store (`None`: single instance, memory and files).
    pub store: Option<crate::store::StoreConfig>,
    /// Kerberos (`None`: no realm configured).
    pub kerberos: Option<crate::kerberos::KerberosConfig>,
    /// The check history's retention and trend settings.
    pub history: crate::history::HistoryConfig,
    /// The scheduled sweep (`None`: no inventory).
    pub sweep: Option<crate::sweep::SweepConfig>,
    /// SIEM export of the audit records (`None`: off).
    pub siem: Option<crate::siem::SiemConfig>,
    /// OpenTelemetry export (`None`: off).
    pub otel: Option<crate::otel::OtelConfig>,
    /// The file mirror this was built from (for `config check`).
    pub file: FileConfig,
}

impl Config {
    /// Embedded defaults, as `serve` runs without `--config`.
    pub fn embedded() -> Config {
        // The embedded defaults are valid by construction; a test proves it.
        match FileConfig::default().validate() {
            Ok(c) => c,
            Err(e) => unreachable!("embedded defaults invalid: {e}"),
        }
    }

    /// Loads defaults, then `path` (if any), then `RDP_PREFLIGHT_*` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        FileConfig::load(path)?.validate()
    }

    /// Effective severity of a cause.
    pub fn severity(&self, cause: Cause) -> Severity {
        self.severity
            .get(&cause)
            .copied()
            .or_else(|| cause.info().map(|i| i.severity))
            .unwrap_or(Severity::Warn)
    }
}

impl FileConfig {
    /// Reads and merges the sources without validating.
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError(format!("{}: file not found", p.display())));
            }
            b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        // Only `RDP_PREFLIGHT_<SECTION>__<KEY>` variables are config: others with the prefix
        // (say, a password variable named for --password-env) are left alone.
        let vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| {
                k.strip_prefix(ENV_PREFIX)
                    .and_then(|r| r.strip_prefix('_'))
                    .is_some_and(|r| r.contains("__"))
            })
            .collect();
        b = b.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .source(Some(vars))
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("probe.default_protocols")
                .with_list_parse_key("cert.trust_anchors")
                .with_list_parse_key("policy.allow_networks")
                .with_list_parse_key("policy.allow_dns_suffixes")
                .with_list_parse_key("policy.allow_ports")
                .with_list_parse_key("directory.servers")
                .with_list_parse_key("kerberos.kdcs")
                .with_list_parse_key("kerberos.dns_servers"),
        );
        let merged = b.build().map_err(|e| ConfigError(e.to_string()))?;
        merged
            .try_deserialize::<FileConfig>()
            .map_err(|e| ConfigError(e.to_string()))
    }

    /// Validates into a typed [`Config`]; errors name the key.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let listen: SocketAddr = self.server.listen.parse().map_err(|e| err("server.listen", e))?;
        let read = |key: &str, p: &Path| std::fs::read(p).map_err(|e| err(key, format!("{}: {e}", p.display())));
        let server_tls = match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(c), Some(k)) => Some(ServerTls {
                cert_pem: read("server.tls_cert", c)?,
                key_pem: zeroize::Zeroizing::new(read("server.tls_key", k)?),
                client_ca_pem: match &self.server.client_ca {
                    Some(ca) => Some(read("server.client_ca", ca)?),
                    None => None,
                },
            }),
            (None, None) if self.server.client_ca.is_some() => {
                return Err(err(
                    "server.client_ca",
                    "mutual TLS needs server.tls_cert and server.tls_key",
                ))
            }
            (None, None) => None,
            (Some(_), None) => return Err(err("server.tls_key", "required with server.tls_cert")),
            (None, Some(_)) => return Err(err("server.tls_cert", "required with server.tls_key")),
        };
        if self.server.unix_socket.is_none()
            && server_tls.is_none()
            && !listen.ip().is_loopback()
            && !self.server.allow_plaintext
        {
            return Err(err(
                "server.listen",
                format!("plaintext gRPC on non-loopback {listen}: configure server.tls_cert and server.tls_key, a server.unix_socket, or set server.allow_plaintext = true"),
            ));
        }
        let bearer_token = match &self.server.bearer_token_file {
            Some(p) => {
                let t = String::from_utf8(read("server.bearer_token_file", p)?)
                    .map_err(|_| err("server.bearer_token_file", "not UTF-8"))?;
                let t = t.trim().to_owned();
                if t.len() < 16 {
                    return Err(err("server.bearer_token_file", "token shorter than 16 characters"));
                }
                Some(crate::secret::Password::new(t))
            }
            None => None,
        };
        if self.server.max_concurrent_checks == 0 {
            return Err(err("server.max_concurrent_checks", "must be at least 1"));
        }
        let ms = |key: &str, v: u64| {
            if v == 0 || v > 600_000 {
                Err(err(key, "must be between 1 and 600000 ms"))
            } else {
                Ok(Duration::from_millis(v))
            }
        };
        let default_budget = ms("check.default_budget_ms", self.check.default_budget_ms)?;
        let max_budget = ms("check.max_budget_ms", self.check.max_budget_ms)?;
        if default_budget > max_budget {
            return Err(err("check.default_budget_ms", "exceeds check.max_budget_ms"));
        }
        let default_protocols = self
            .probe
            .default_protocols
            .iter()
            .enumerate()
            .try_fold(0u32, |acc, (i, p)| {
                parse_protocol(p).map(|v| acc | v).ok_or_else(|| {
                    err(
                        &format!("probe.default_protocols[{i}]"),
                        format!("unknown protocol {p:?}"),
                    )
                })
            })?;
        let minimum_protocol = match &self.probe.minimum_protocol {
            None => None,
            Some(p) => Some(
                parse_protocol(p).ok_or_else(|| err("probe.minimum_protocol", format!("unknown protocol {p:?}")))?,
            ),
        };
        let cookie = match self.probe.cookie.as_deref() {
            None => Some(crate::probe::negotiate::DEFAULT_COOKIE.to_owned()),
            Some("") => None,
            Some(c) => {
                crate::probe::x224::encode_connection_request(Some(c), 0).map_err(|e| err("probe.cookie", e))?;
                Some(c.to_owned())
            }
        };
        let mut trust_anchors = Vec::new();
        for (i, path) in self.cert.trust_anchors.iter().enumerate() {
            trust_anchors.extend(load_anchors(path).map_err(|e| err(&format!("cert.trust_anchors[{i}]"), e))?);
        }
        let pin_store = match self.cert.pin_store.as_str() {
            "off" => PinStoreConfig::Off,
            "memory" => PinStoreConfig::Memory,
            "auto" => auto_pin_path().map_or(PinStoreConfig::Memory, PinStoreConfig::File),
            "" => {
                return Err(err(
                    "cert.pin_store",
                    "empty: use \"auto\", \"memory\", \"off\" or a path",
                ))
            }
            p => PinStoreConfig::File(PathBuf::from(p)),
        };
        let mut pins = HashMap::new();
        for (target, fp) in &self.cert.pins {
            let key = format!("cert.pins.{target}");
            if !target.contains(':') {
                return Err(err(&key, "target must be host:port"));
            }
            let fp = fp.replace(':', "").to_ascii_lowercase();
            if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(&key, "must be a SHA-256 fingerprint (64 hex digits)"));
            }
            // Addresses as the pin store keys them, names lower case without a trailing dot.
            let normalised = match target.parse::<SocketAddr>() {
                Ok(a) => crate::probe::pins::target_key(a),
                Err(_) => match target.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
                    Some((h, Ok(port))) => crate::probe::pins::name_key(h, port),
                    _ => return Err(err(&key, "target must be host:port")),
                },
            };
            pins.insert(normalised, fp);
        }
        let mut networks = Vec::new();
        for (i, n) in self.policy.allow_networks.iter().enumerate() {
            networks.push(Network::parse(n).map_err(|e| err(&format!("policy.allow_networks[{i}]"), e))?);
        }
        for (i, s) in self.policy.allow_dns_suffixes.iter().enumerate() {
            if s.trim_start_matches('.').is_empty() {
                return Err(err(&format!("policy.allow_dns_suffixes[{i}]"), "empty suffix"));
            }
        }
        let mut severity = HashMap::new();
        for (name, sev) in &self.severity {
            let cause = Cause::from_name(name)
                .filter(|c| *c != Cause::Ok)
                .ok_or_else(|| err(&format!("severity.{name}"), "unknown cause"))?;
            severity.insert(cause, *sev);
        }
        let log_json = match self.log.format.as_str() {
            "text" => false,
            "json" => true,
            other => return Err(err("log.format", format!("{other:?}: use \"text\" or \"json\""))),
        };
        Ok(Config {
            listen,
            unix_socket: self.server.unix_socket.clone(),
            server_tls,
            bearer_token,
            max_concurrent_checks: self.server.max_concurrent_checks,
            max_queued_checks: self.server.max_queued_checks,
            default_budget,
            max_budget,
            deadline_margin: Duration::from_millis(self.check.deadline_margin_ms),
            default_port: if self.probe.default_port == 0 {
                return Err(err("probe.default_port", "must not be 0"));
            } else {
                self.probe.default_port
            },
            resolve_timeout: ms("probe.resolve_timeout_ms", self.probe.resolve_timeout_ms)?,
            tcp_timeout: ms("probe.tcp_timeout_ms", self.probe.tcp_timeout_ms)?,
            x224_timeout: ms("probe.x224_timeout_ms", self.probe.x224_timeout_ms)?,
            tls_timeout: ms("probe.tls_timeout_ms", self.probe.tls_timeout_ms)?,
            cookie,
            default_protocols,
            minimum_protocol,
            trust_anchors,
            expiring_window: Duration::from_secs(u64::from(self.cert.expiring_days) * 86_400),
            pin_store,
            pins,
            high_latency: ms("network.high_latency_ms", self.network.high_latency_ms)?,
            retransmission: ms("network.retransmission_ms", self.network.retransmission_ms)?,
            retry_transient: self.network.retry_transient,
            policy: TargetPolicy {
                allow_loopback: self.policy.allow_loopback,
                networks,
                dns_suffixes: self
                    .policy
                    .allow_dns_suffixes
                    .iter()
                    .map(|s| s.trim_start_matches('.').to_ascii_lowercase())
                    .collect(),
                ports: self.policy.allow_ports.clone(),
            },
            severity,
            log_json,
            log_level: self.log.level.clone(),
            nla_enabled: self.nla.enabled,
            nla_logon: match self.nla.logon.as_str() {
                "auto" => NlaLogon::Auto,
                "always" => NlaLogon::Always,
                "off" => NlaLogon::Off,
                other => {
                    return Err(err(
                        "nla.logon",
                        format!("{other:?}: use \"auto\", \"always\" or \"off\""),
                    ))
                }
            },
            nla_auth: match (self.nla.auth.as_str(), self.kerberos.realm.is_some()) {
                ("", true) | ("negotiate", true) => NlaAuth::Negotiate,
                ("", false) | ("ntlm", _) => NlaAuth::Ntlm,
                ("kerberos", true) => NlaAuth::Kerberos,
                ("kerberos" | "negotiate", false) => return Err(err("nla.auth", "Kerberos needs [kerberos] realm")),
                (other, _) => {
                    return Err(err(
                        "nla.auth",
                        format!("{other:?}: use \"ntlm\", \"kerberos\" or \"negotiate\""),
                    ))
                }
            },
            domains: self.directory.domains().map_err(ConfigError)?,
            nla_clock_tolerance: Duration::from_secs(self.nla.clock_tolerance_secs),
            nla_timeout: ms("nla.timeout_ms", self.nla.timeout_ms)?,
            nla_guard_window: Duration::from_secs(self.nla.guard_window_secs),
            nla_guard_max_distinct_failures: self.nla.guard_max_distinct_failures,
            audit: self.audit.validate().map_err(ConfigError)?,
            admin_listen: self.admin.validate().map_err(ConfigError)?,
            directory: self.directory.validate().map_err(ConfigError)?,
            kerberos: self.kerberos.validate().map_err(ConfigError)?,
            history: self.history.validate().map_err(ConfigError)?,
            sweep: self.sweep.validate().map_err(ConfigError)?,
            store: {
                let store = self.store.validate().map_err(ConfigError)?;
                if self.audit.backend == "store" && store.is_none() {
                    return Err(err("audit.backend", "\"store\" needs [store] url"));
                }
                store
            },
            siem: {
                let siem = self.siem.validate().map_err(ConfigError)?;
                let audit_on = self.audit.dir.is_some() || self.audit.backend == "store";
                if siem.is_some() && !audit_on {
                    let key = if self.siem.syslog.is_some() {
                        "siem.syslog"
                    } else {
                        "siem.file"
                    };
                    return Err(err(
                        key,
                        "the SIEM export sends what the audit log records: configure [audit] dir (or backend = \"store\")",
                    ));
                }
                siem
            },
            otel: self.otel.validate().map_err(ConfigError)?,
            file: self.clone(),
        })
    }
}

/// When the NLA stage completes a logon with the request's credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NlaLogon {
    /// Only towards a target that has proven who it is.
    Auto,
    /// Towards any target.
    Always,
    /// Never: the challenge only.
    Off,
}

/// How the NLA logon authenticates (`nla.auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NlaAuth {
    /// NTLMv2 (spends a password attempt, under the lockout guard).
    Ntlm,
    /// Kerberos with the service ticket only; no ticket, no logon.
    Kerberos,
    /// Kerberos when a ticket was obtained, else NTLM (recorded as a fallback).
    Negotiate,
}

/// Parses a protocol name (`rdp`, `ssl`/`tls`, `hybrid`/`nla`, `rdstls`, `hybrid_ex`, `rdsaad`).
pub fn parse_protocol(s: &str) -> Option<u32> {
    Some(match s.trim().to_ascii_lowercase().as_str() {
        "rdp" | "standard" => protocol::RDP,
        "ssl" | "tls" => protocol::SSL,
        "hybrid" | "nla" | "credssp" => protocol::HYBRID,
        "rdstls" => protocol::RDSTLS,
        "hybrid_ex" | "hybrid-ex" => protocol::HYBRID_EX,
        "rdsaad" => protocol::RDSAAD,
        _ => return None,
    })
}

/// Reads every certificate in a PEM file as a trust anchor.
pub fn load_anchors(path: &Path) -> Result<Vec<TrustAnchor<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(&pem) {
        let der = der.map_err(|e| format!("{}: {e}", path.display()))?;
        let anchor = webpki::anchor_from_trusted_cert(&der).map_err(|e| format!("{}: {e:?}", path.display()))?;
        out.push(anchor.to_owned());
    }
    if out.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(out)
}

fn auto_pin_path() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = env("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated; the first is ours.
        let first = dir.to_string_lossy().split(':').next().map(PathBuf::from)?;
        return Some(first.join("pins.json"));
    }
    let base = env("XDG_STATE_HOME").or_else(|| env("HOME").map(|h| h.join(".local/state")))?;
    Some(base.join("rdp-preflight").join("pins.json"))
}

/// Serialises tests that read or set `RDP_PREFLIGHT_*` variables.
#[cfg(test)]
pub(crate) static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_valid() {
        let c = Config::embedded();
        assert_eq!(c.listen, "127.0.0.1:50051".parse::<SocketAddr>().expect("addr"));
        assert_eq!(c.default_protocols, protocol::SSL | protocol::HYBRID);
        assert_eq!(c.severity(Cause::CertUntrusted), Severity::Warn);
        assert!(!c.policy.allow_loopback);
    }

    #[test]
    fn file_overrides_and_errors_name_the_key() {
        let _env = ENV_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[severity]\nCERT_UNTRUSTED = \"deny\"\n[check]\ndefault_budget_ms = 4000\n",
        )
        .expect("write");
        let c = Config::load(Some(&p)).expect("valid");
        assert_eq!(c.severity(Cause::CertUntrusted), Severity::Deny);
        assert_eq!(c.default_budget, Duration::from_millis(4000));

        let bad = |body: &str| {
            std::fs::write(&p, body).expect("write");
            Config::load(Some(&p)).expect_err("invalid").to_string()
        };
        assert!(bad("[check]\nbogus = 1\n").contains("bogus"));
        assert!(bad("[server]\nlisten = \"nowhere\"\n").contains("server.listen"));
        assert!(bad("[severity]\nNOT_A_CAUSE = \"deny\"\n").contains("severity.NOT_A_CAUSE"));
        assert!(bad("[probe]\ndefault_protocols = [\"ssl\", \"quic\"]\n").contains("probe.default_protocols[1]"));
        assert!(bad("[check]\ndefault_budget_ms = \"soon\"\n").contains("default_budget_ms"));
        assert!(bad("[cert]\ntrust_anchors = [\"/nonexistent.pem\"]\n").contains("cert.trust_anchors[0]"));
        assert!(bad("[policy]\nallow_networks = [\"10.0.0.0/33\"]\n").contains("policy.allow_networks[0]"));
        assert!(bad("[server]\nlisten = \"0.0.0.0:50051\"\n").contains("plaintext gRPC on non-loopback"));
        assert!(bad("[server]\ntls_cert = \"/x.pem\"\n").contains("server.tls_key"));
        std::fs::write(&p, "[server]\nlisten = \"0.0.0.0:50051\"\nallow_plaintext = true\n").expect("write");
        assert!(Config::load(Some(&p)).is_ok());
        assert!(Config::load(Some(Path::new("/nonexistent/x.toml"))).is_err());
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    /// Environment overrides (one test owns these variables: tests run in parallel).
    #[test]
    fn environment_overrides_the_file_and_ignores_other_prefixed_vars() {
        let _env = ENV_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::env::set_var("RDP_PREFLIGHT_CHECK__DEFAULT_BUDGET_MS", "7000");
        std::env::set_var("RDP_PREFLIGHT_PROBE__DEFAULT_PROTOCOLS", "ssl");
        std::env::set_var("RDP_PREFLIGHT_VAULT_PASSWORD", "not-config");
        let c = Config::load(None).expect("valid");
        assert_eq!(c.default_budget, Duration::from_millis(7000));
        assert_eq!(c.default_protocols, protocol::SSL);
        std::env::set_var("RDP_PREFLIGHT_CHECK__BOGUS", "1");
        let e = Config::load(None).expect_err("unknown key").to_string();
        std::env::remove_var("RDP_PREFLIGHT_CHECK__BOGUS");
        std::env::remove_var("RDP_PREFLIGHT_CHECK__DEFAULT_BUDGET_MS");
        std::env::remove_var("RDP_PREFLIGHT_PROBE__DEFAULT_PROTOCOLS");
        std::env::remove_var("RDP_PREFLIGHT_VAULT_PASSWORD");
        assert!(e.contains("bogus"), "{e}");
    }
}
