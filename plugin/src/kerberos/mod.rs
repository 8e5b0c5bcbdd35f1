//! Credential check by Kerberos AS exchange, where NTLM (and so an LDAP simple bind's NTLM-free
//! twin, the NTLM logon on the target) is restricted.
//!
//! 1. AS-REQ without pre-authentication: no password leaves the plugin and no attempt is spent.
//!    The answer names the salt (PA-ETYPE-INFO2, with the stored account name's case), or
//!    already says that the account does not exist (6) or, on Windows and Samba 4.19+, that it
//!    is disabled, expired or locked (18 with an NTSTATUS).
//! 2. Under a reservation of the lockout guard (the same budget as the LDAP bind and the NLA
//!    logon, keyed on `user@realm`): AS-REQ with PA-ENC-TIMESTAMP under the AES key made from
//!    the password and that salt. An AS-REP proves the password; 24 refuses it; 37 (clock skew)
//!    to this request means the KDC decrypted the timestamp, so the password was right: it is
//!    asked once more with the KDC's time and DIRECTORY_CLOCK_SKEW is reported beside the proof.
//!    No answer counts as a failed attempt, as for a bind.
//!
//! 3. With `spn_check`, the TGT of that AS-REP asks for `TERMSRV/<the host the gateway dials>`
//!    (TGS-REQ): KDC_ERR_S_PRINCIPAL_UNKNOWN (7) is TARGET_SPN_MISSING.
//!
//! KDCs are tried in order over TCP; the next only when one cannot be reached, never after an
//! answer. Without `kdcs`, they are the realm's SRV records ([`dns`]). Every read and write runs under the check's budget and `kerberos.timeout_ms`.

pub mod dns;
pub mod messages;

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    cause::Cause,
    credential::CredentialOutcome,
    deadline::Budget,
    guard::{identity::Domains, Admission, Guard, Outcome, Scope},
    report::{CredentialFacts, Finding, StageStatus},
    secret::Credential,
};
use messages::{AsAnswer, AsReqInput, KdcError};

/// What the TERMSRV check found.
enum Spn {
    /// The KDC issued the service ticket: Kerberos to this name works.
    Ticket(Arc<messages::ServiceTicket>),
    /// KDC_ERR_S_PRINCIPAL_UNKNOWN: TARGET_SPN_MISSING.
    Missing(Finding),
    /// Not known (no answer, another error): said in the stage's detail.
    Unknown(String),
}

/// `[kerberos]`, as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KerberosFile {
    /// The realm (`EXAMPLE.TEST`); set, the credential is proven by an AS exchange.
    pub realm: Option<String>,
    /// KDCs as `host:port` (port 88 by default), tried in order; empty: the SRV records of
    /// `_kerberos._tcp.<realm>`.
    pub kdcs: Vec<String>,
    /// DNS servers (`ip:port`) asked for those SRV records; empty: the `nameserver` lines of
    /// `/etc/resolv.conf`.
    pub dns_servers: Vec<String>,
    /// Limit for each exchange with a KDC (default 3000 ms).
    pub timeout_ms: u64,
    /// Prove the credential by AS exchange (default true).
    pub credential_check: bool,
    /// Ask the KDC for `TERMSRV/<host the gateway dials>` once the AS exchange gave a ticket:
    /// TARGET_SPN_MISSING when Kerberos to that name is impossible (default true).
    pub spn_check: bool,
    /// CRED_PASSWORD_EXPIRING when the AS-REP says the password expires within this many days
    /// (default 14).
    pub expiring_days: u32,
}

impl Default for KerberosFile {
    fn default() -> Self {
        KerberosFile {
            realm: None,
            kdcs: Vec::new(),
            dns_servers: Vec::new(),
            timeout_ms: 3000,
            credential_check: true,
            spn_check: true,
            expiring_days: 14,
        }
    }
}

/// The validated `[kerberos]`.
#[derive(Clone, Debug)]
pub struct KerberosConfig {
    /// Upper case.
    pub realm: String,
    /// (host, port); empty: found through DNS SRV.
    pub kdcs: Vec<(String, u16)>,
    /// DNS servers for the SRV lookup (when `kdcs` is empty).
    pub dns_servers: Vec<String>,
    /// Per exchange.
    pub timeout: Duration,
    /// Prove the credential by AS exchange.
    pub credential_check: bool,
    /// Ask for `TERMSRV/<host>` once the AS exchange gave a ticket.
    pub spn_check: bool,
    /// The password-expiry warning window.
    pub expiring_window: Duration,
}

impl KerberosFile {
    /// `None` when no realm is set; errors name the key.
    pub fn validate(&self) -> Result<Option<KerberosConfig>, String> {
        let Some(realm) = self.realm.as_deref().map(str::trim).filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        if !realm.is_ascii() || realm.contains(['/', '@', ' ']) {
            return Err(format!("kerberos.realm: {realm:?} is not a realm name"));
        }
        let mut kdcs = Vec::new();
        for (i, k) in self.kdcs.iter().enumerate() {
            let k = k.trim();
            let bad_port = || format!("kerberos.kdcs[{i}]: {k:?}: bad port");
            let (host, port) = if let Some(rest) = k.strip_prefix('[') {
                // [v6] or [v6]:port
                let (h, tail) = rest
                    .split_once(']')
                    .ok_or_else(|| format!("kerberos.kdcs[{i}]: {k:?}"))?;
                let port = match tail.strip_prefix(':') {
                    Some(p) => p.parse::<u16>().map_err(|_| bad_port())?,
                    None => 88,
                };
                (h.to_owned(), port)
            } else if k.matches(':').count() == 1 {
                let (h, p) = k.split_once(':').unwrap_or((k, "88"));
                (h.to_owned(), p.parse::<u16>().map_err(|_| bad_port())?)
            } else {
                (k.to_owned(), 88)
            };
            if host.is_empty() {
                return Err(format!("kerberos.kdcs[{i}]: empty host"));
            }
            kdcs.push((host, port));
        }
        if self.timeout_ms == 0 {
            return Err("kerberos.timeout_ms: must be > 0".into());
        }
        let mut dns_servers = Vec::new();
        for (i, s) in self.dns_servers.iter().enumerate() {
            let s = s.trim();
            let ok = s.parse::<std::net::SocketAddr>().is_ok();
            if !ok {
                return Err(format!("kerberos.dns_servers[{i}]: {s:?} is not ip:port"));
            }
            dns_servers.push(s.to_owned());
        }
        if kdcs.is_empty() && dns_servers.is_empty() {
            dns_servers = dns::nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
            if dns_servers.is_empty() {
                return Err(
                    "kerberos.kdcs: empty and /etc/resolv.conf names no DNS server for the SRV lookup: \
                     list the KDCs, or set kerberos.dns_servers"
                        .into(),
                );
            }
        }
        Ok(Some(KerberosConfig {
            realm: realm.to_ascii_uppercase(),
            kdcs,
            dns_servers,
            timeout: Duration::from_millis(self.timeout_ms),
            credential_check: self.credential_check,
            spn_check: self.spn_check,
            expiring_window: Duration::from_secs(u64::from(self.expiring_days) * 86_400),
        }))
    }
}

/// How one exchange with a KDC failed before an answer.
enum IoFail {
    Connect(String),
    Timeout,
    Lost(String),
}

/// One per process.
pub struct KerberosChecker {
    cfg: KerberosConfig,
    guard: Arc<Guard>,
    domains: Domains,
    /// KDCs found through DNS, and until when they may be used.
    discovered: std::sync::Mutex<Option<Discovered>>,
    /// The directory, for `read_lockout_state` before the pre-authenticated request.
    ldap: Option<Arc<crate::credential::CredentialChecker>>,
}

/// KDCs from DNS and the instant they expire.
type Discovered = (std::time::Instant, Vec<(String, u16)>);

impl std::fmt::Debug for KerberosChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KerberosChecker")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn now() -> (i64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_micros())
}

fn nonce() -> u32 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u32::from_le_bytes(b) & 0x7FFF_FFFF
}

/// The cause of a KRB-ERROR to the pre-authenticated request, and whether it proves the
/// password right (catalog: "Kerberos ... maps its answers to the same causes").
fn cause_of(e: &KdcError) -> (Cause, &'static str, bool) {
    match (e.code, e.ntstatus) {
        (24, _) => (
            Cause::CredInvalid,
            "the KDC refused the password (KDC_ERR_PREAUTH_FAILED)",
            false,
        ),
        (6, _) => (
            Cause::CredAccountNotFound,
            "the KDC knows no such account (KDC_ERR_C_PRINCIPAL_UNKNOWN)",
            false,
        ),
        (18, Some(0xC000_0072)) => (Cause::CredAccountDisabled, "the account is disabled", false),
        (18, Some(0xC000_0193)) => (Cause::CredAccountExpired, "the account has expired", false),
        (18, Some(0xC000_006F)) => (Cause::CredLogonHours, "the account may not log on at this time", true),
        (18, _) => (
            Cause::CredAccountLocked,
            "the account is locked (KDC_ERR_CLIENT_REVOKED)",
            false,
        ),
        (23, Some(0xC000_0224)) => (
            Cause::CredPasswordMustChange,
            "the password is right but must be changed",
            true,
        ),
        (23, _) => (
            Cause::CredPasswordExpired,
            "the password is right but has expired",
            true,
        ),
        (12, Some(0xC000_0070)) => (
            Cause::CredWorkstationRestricted,
            "the account may not log on from this workstation",
            true,
        ),
        _ => (Cause::DirectoryError, "the KDC answered an unexpected error", false),
    }
}

impl KerberosChecker {
    /// A checker spending attempts through `guard`.
    pub fn new(cfg: KerberosConfig, guard: Arc<Guard>, domains: Domains) -> Self {
        KerberosChecker {
            cfg,
            guard,
            domains,
            discovered: std::sync::Mutex::new(None),
            ldap: None,
        }
    }

    /// Reads the account's lockout state through `ldap` (when its `read_lockout_state` is set)
    /// before each pre-authenticated request, as before a bind.
    pub fn with_directory(mut self, ldap: Option<Arc<crate::credential::CredentialChecker>>) -> Self {
        self.ldap = ldap;
        self
    }

    /// The KDCs to try: the configured ones, else those of the realm's SRV records (kept for
    /// their TTL, at least a minute and at most an hour).
    async fn kdcs(&self, budget: &Budget) -> Result<Vec<(String, u16)>, String> {
        if !self.cfg.kdcs.is_empty() {
            return Ok(self.cfg.kdcs.clone());
        }
        let now = std::time::Instant::now();
        if let Ok(g) = self.discovered.lock() {
            if let Some((_, kdcs)) = g.as_ref().filter(|(until, _)| *until > now) {
                return Ok(kdcs.clone());
            }
        }
        let found = budget
            .run(
                self.cfg.timeout,
                dns::lookup(&self.cfg.realm, &self.cfg.dns_servers, self.cfg.timeout),
            )
            .await
            .map_err(|_| "the DNS lookup of the KDCs ran out of time".to_owned())??;
        let (kdcs, ttl) = found;
        if kdcs.is_empty() {
            return Err(format!(
                "_kerberos._tcp.{} has no SRV records",
                self.cfg.realm.to_ascii_lowercase()
            ));
        }
        let keep = Duration::from_secs(u64::from(ttl).clamp(60, 3600));
        if let Ok(mut g) = self.discovered.lock() {
            *g = Some((now + keep, kdcs.clone()));
        }
        Ok(kdcs)
    }

    /// The config.
    pub fn config(&self) -> &KerberosConfig {
        &self.cfg
    }

    /// CRED_PASSWORD_EXPIRING when the password expires within the window.
    fn expiring(&self, expires: Option<i64>, kdc: &str) -> Option<Finding> {
        let expires = expires?;
        let left = expires - now().0;
        let window = i64::try_from(self.cfg.expiring_window.as_secs()).unwrap_or(i64::MAX);
        (left < window).then(|| {
            let when = time::OffsetDateTime::from_unix_timestamp(expires)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_default();
            Finding::new(
                Cause::CredPasswordExpiring,
                format!(
                    "the password is right but expires in {} days ({when}): rotate it through the vault now",
                    left.max(0) / 86_400
                ),
            )
            .with("password_expires", when)
            .with("seconds_left", left)
            .with("kdc", kdc)
        })
    }

    /// Asks for `TERMSRV/<host>` with the TGT of `as_rep`: the finding when the KDC has no such
    /// principal (7); nothing when it issues the ticket (or cannot be asked: logged).
    async fn spn(
        &self,
        tgt: &messages::Tgt,
        input: &AsReqInput<'_>,
        host: &str,
        kdc: &(String, u16),
        budget: &Budget,
    ) -> Spn {
        let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
        let principal = format!("TERMSRV/{host}@{}", self.cfg.realm);
        let (t, us) = now();
        let asked = messages::tgs_req(
            tgt,
            &AsReqInput {
                now: t,
                nonce: nonce(),
                ..input.clone()
            },
            &["TERMSRV", &host],
            us,
        );
        let msg = match asked {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "TERMSRV check not made");
                return Spn::Unknown(format!("TGS-REQ not built: {e}"));
            }
        };
        let (answer, bytes) = match self.exchange(kdc, &msg, budget).await {
            Ok(b) => (messages::read_tgs_answer(&b), b),
            Err(_) => {
                tracing::warn!(kdc = %kdc.0, "TERMSRV check: no answer from the KDC");
                return Spn::Unknown(format!("no answer from the KDC {} to the TGS-REQ", kdc.0));
            }
        };
        match answer {
            Ok(Some(e)) if e.code == 7 => {
                let ip = crate::policy::is_ip_literal(&host).is_some();
                let mut msg = format!(
                    "the KDC has no {principal}: Kerberos to this target is impossible under this name, clients fall back to NTLM"
                );
                if ip {
                    msg.push_str("; the gateway dials an IP address: dial the DNS name registered in AD instead");
                }
                Spn::Missing(
                    Finding::new(Cause::TargetSpnMissing, msg)
                        .at(crate::cause::Stage::Nla)
                        .with("principal", &principal)
                        .with("krb_error", 7)
                        .with("ip_literal", ip),
                )
            }
            Ok(Some(e)) => {
                tracing::info!(code = e.code, principal = %principal, "TERMSRV check: the KDC answered an error");
                Spn::Unknown(format!("the KDC answered the TGS-REQ with error {}", e.code))
            }
            Ok(None) => match messages::read_tgs_rep(&bytes, tgt) {
                Ok((ticket, key, etype)) => Spn::Ticket(Arc::new(messages::ServiceTicket {
                    ticket,
                    session_key: zeroize::Zeroizing::new(key),
                    etype,
                    realm: input.realm.to_owned(),
                    user: input.user.to_owned(),
                    principal,
                })),
                Err(e) => {
                    tracing::warn!(error = %e, "TERMSRV check: TGS-REP not readable");
                    Spn::Unknown(format!("TGS-REP not readable: {e}"))
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "TERMSRV check: unreadable answer");
                Spn::Unknown(format!("unreadable answer to the TGS-REQ: {e}"))
            }
        }
    }

    async fn exchange(&self, kdc: &(String, u16), msg: &[u8], budget: &Budget) -> Result<Vec<u8>, IoFail> {
        let limit = self.cfg.timeout;
        let io = async {
            let mut s = TcpStream::connect((kdc.0.as_str(), kdc.1))
                .await
                .map_err(|e| IoFail::Connect(e.to_string()))?;
            let _ = s.set_nodelay(true);
            s.write_all(&messages::frame(msg))
                .await
                .map_err(|e| IoFail::Lost(e.to_string()))?;
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.map_err(|e| IoFail::Lost(e.to_string()))?;
            let n = u32::from_be_bytes(len) as usize;
            if n > 64 * 1024 {
                return Err(IoFail::Lost(format!("answer of {n} bytes refused")));
            }
            let mut body = vec![0u8; n];
            s.read_exact(&mut body).await.map_err(|e| IoFail::Lost(e.to_string()))?;
            Ok(body)
        };
        match budget.run(limit, io).await {
            Ok(r) => r,
            Err(_) => Err(IoFail::Timeout),
        }
    }

    /// Proves the credential; never sends an empty password, never without a reservation.
    /// With `spn_host` (the host the gateway dials) and `spn_check`, the ticket is used to ask
    /// for `TERMSRV/<spn_host>`.
    pub async fn check(&self, cred: &Credential, spn_host: Option<&str>, budget: &Budget) -> CredentialOutcome {
        let realm = self.cfg.realm.clone();
        let mut facts = CredentialFacts {
            checked_by: "kerberos".into(),
            ..Default::default()
        };
        let (user, _) = self
            .domains
            .split(&cred.username, &cred.domain)
            .unwrap_or((cred.username.trim(), ""));
        let user = user.trim().to_owned();
        facts.bind_identity = format!("{user}@{realm}");
        let failed = |facts: CredentialFacts, f: Finding, account| {
            let detail = format!("{}: {}", f.cause.name(), f.message);
            CredentialOutcome {
                status: StageStatus::Failed,
                findings: vec![f],
                facts,
                bind_succeeded: false,
                detail,
                account,
                internal: None,
                service_ticket: None,
            }
        };
        // Our own encoder or crypto failed: an internal error, never a credential cause.
        let internal = |facts: CredentialFacts, e: messages::KrbMsgError, account| CredentialOutcome {
            status: StageStatus::NotRun,
            findings: Vec::new(),
            facts,
            bind_succeeded: false,
            detail: format!("internal error: {e}"),
            account,
            internal: Some(format!("Kerberos: {e}")),
            service_ticket: None,
        };
        if user.is_empty() || cred.password.is_empty() {
            return failed(
                facts,
                Finding::new(
                    Cause::CredMissing,
                    "no user name or an empty password: nothing to prove",
                ),
                None,
            );
        }
        let account = self.guard.account(
            &self
                .domains
                .account(&user, &realm, &realm)
                .unwrap_or_else(|_| format!("{user}@{}", realm.to_lowercase())),
        );
        let (t, _) = now();
        let input = AsReqInput {
            user: &user,
            realm: &realm,
            nonce: nonce(),
            now: t,
        };
        let first = match messages::as_req(&input, vec![]) {
            Ok(m) => m,
            Err(e) => return internal(facts, e, Some(account)),
        };
        // Step 1: the salt (no password sent), KDCs in order.
        let kdcs = match self.kdcs(budget).await {
            Ok(k) => k,
            Err(e) => {
                return failed(
                    facts,
                    Finding::new(Cause::DirectoryUnreachable, format!("no KDC found through DNS: {e}"))
                        .with("dns_servers", self.cfg.dns_servers.join(",")),
                    Some(account),
                )
            }
        };
        let mut errors = Vec::new();
        let mut answer = None;
        for kdc in &kdcs {
            match self.exchange(kdc, &first, budget).await {
                Ok(b) => {
                    answer = Some((kdc.clone(), b));
                    break;
                }
                Err(IoFail::Connect(e)) => errors.push(format!("{}:{}: {e}", kdc.0, kdc.1)),
                Err(IoFail::Timeout) => {
                    facts.directory_server = format!("{}:{}", kdc.0, kdc.1);
                    return failed(
                        facts,
                        Finding::new(Cause::DirectoryTimeout, "the KDC did not answer the AS-REQ in time"),
                        Some(account),
                    );
                }
                Err(IoFail::Lost(e)) => errors.push(format!("{}:{}: {e}", kdc.0, kdc.1)),
            }
        }
        let Some((kdc, bytes)) = answer else {
            let attempts = errors.join("; ");
            return failed(
                facts,
                Finding::new(Cause::DirectoryUnreachable, format!("no KDC reachable: {attempts}"))
                    .with("attempts", attempts),
                Some(account),
            );
        };
        facts.directory_server = format!("{}:{}", kdc.0, kdc.1);
        let evidence = |f: Finding, e: &KdcError, kdc: &str| {
            let mut f = f.with("krb_error", e.code).with("kdc", kdc);
            if let Some(s) = e.ntstatus {
                f = f.with("ntstatus", format!("0x{s:08X}"));
            }
            f
        };
        let salt = match messages::read_answer(&bytes) {
            Ok(AsAnswer::Error(e)) if e.code == 25 => {
                match e.etype_info.iter().find(|(et, _)| messages::suite(*et).is_some()) {
                    Some((et, salt)) => (*et, salt.clone()),
                    None => {
                        return failed(
                            facts.clone(),
                            evidence(
                                Finding::new(Cause::DirectoryError, "the KDC offers no AES key for this account"),
                                &e,
                                &facts.directory_server,
                            ),
                            Some(account),
                        )
                    }
                }
            }
            Ok(AsAnswer::Error(e)) => {
                // Told before any password: nothing spent.
                let (cause, msg, _) = cause_of(&e);
                let f = evidence(Finding::new(cause, msg), &e, &facts.directory_server);
                return failed(facts, f, Some(account));
            }
            Ok(AsAnswer::Rep) => {
                return failed(
                    facts,
                    Finding::new(
                        Cause::DirectoryError,
                        "the KDC issued a ticket without pre-authentication (DONT_REQ_PREAUTH): the password cannot be proven this way",
                    ),
                    Some(account),
                )
            }
            Err(e) => {
                return failed(
                    facts,
                    Finding::new(Cause::DirectoryError, format!("{e}")),
                    Some(account),
                )
            }
        };

        // Step 2: the password, under a reservation.
        let mut ticket = match self
            .guard
            .admit(account, &cred.password, Scope::DIRECTORY, budget)
            .await
        {
            Admission::Go(t) => t,
            Admission::Remembered(f) | Admission::Refused(f) => {
                facts.from_memory = true;
                return failed(facts, f, Some(account));
            }
            Admission::Proven { findings, usable } => {
                facts.from_memory = true;
                return CredentialOutcome {
                    status: if usable { StageStatus::Ok } else { StageStatus::Failed },
                    detail: "password proven right recently (from memory)".into(),
                    findings,
                    facts,
                    bind_succeeded: usable,
                    account: Some(account),
                    internal: None,
                    service_ticket: None,
                };
            }
        };
        // The directory's own count of failures, when it is to be read: under the reservation,
        // so that attempts in flight count.
        if let Some(ldap) = &self.ldap {
            if let Err(f) = ldap.read_lockout_before(cred, account, budget).await {
                ticket.finish(Outcome::NotSent).await;
                return failed(facts, f, Some(account));
            }
        }
        let key = match messages::as_key(salt.0, cred.password.expose().as_bytes(), &salt.1) {
            Ok(k) => zeroize::Zeroizing::new(k),
            Err(e) => {
                ticket.finish(Outcome::NotSent).await;
                return internal(facts, e, Some(account));
            }
        };
        let mut skew: Option<Finding> = None;
        let mut when = now();
        for round in 0..2 {
            let pa = match messages::pa_enc_timestamp(salt.0, &key, when.0, when.1) {
                Ok(p) => p,
                Err(e) => {
                    ticket.finish(Outcome::NotSent).await;
                    return internal(facts, e, Some(account));
                }
            };
            let msg = match messages::as_req(
                &AsReqInput {
                    now: when.0,
                    nonce: nonce(),
                    ..input.clone()
                },
                vec![pa],
            ) {
                Ok(m) => m,
                Err(e) => {
                    ticket.finish(Outcome::NotSent).await;
                    return internal(facts, e, Some(account));
                }
            };
            ticket.sending();
            let (answer, rep_bytes) = match self.exchange(&kdc, &msg, budget).await {
                Ok(b) => (messages::read_answer(&b), b),
                Err(fail) => {
                    let f = match fail {
                        IoFail::Timeout => Finding::new(
                            Cause::DirectoryTimeout,
                            "the KDC did not answer the pre-authenticated AS-REQ in time",
                        ),
                        IoFail::Connect(e) | IoFail::Lost(e) => {
                            Finding::new(Cause::DirectoryUnreachable, format!("connection to the KDC lost: {e}"))
                        }
                    }
                    .with("attempt_counted", true);
                    ticket.finish(Outcome::Unknown(f.clone())).await;
                    return failed(facts, f, Some(account));
                }
            };
            match answer {
                Ok(AsAnswer::Rep) => {
                    let mut findings: Vec<Finding> = skew.into_iter().collect();
                    let mut service_ticket = None;
                    let mut facts_note = None;
                    ticket
                        .finish(Outcome::Proven {
                            findings: findings.clone(),
                            usable: true,
                        })
                        .await;
                    match messages::read_as_rep(&rep_bytes, &key) {
                        Ok(tgt) => {
                            if let Some(f) = self.expiring(tgt.password_expires, &facts.directory_server) {
                                findings.push(f);
                            }
                            if let (Some(host), true) = (spn_host, self.cfg.spn_check) {
                                match self.spn(&tgt, &input, host, &kdc, budget).await {
                                    Spn::Ticket(t) => service_ticket = Some(t),
                                    Spn::Missing(f) => findings.push(f),
                                    Spn::Unknown(why) => facts_note = Some(why),
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "AS-REP not readable: no expiry or TERMSRV check"),
                    }
                    let mut detail = format!("AS exchange succeeded for {}", facts.bind_identity);
                    if let Some(t) = &service_ticket {
                        detail.push_str(&format!("; service ticket for {}", t.principal));
                    }
                    if let Some(why) = facts_note {
                        detail.push_str(&format!("; TERMSRV not checked: {why}"));
                    }
                    return CredentialOutcome {
                        status: StageStatus::Ok,
                        detail,
                        findings,
                        facts,
                        bind_succeeded: true,
                        account: Some(account),
                        internal: None,
                        service_ticket,
                    };
                }
                Ok(AsAnswer::Error(e)) if e.code == 37 && round == 0 => {
                    // The KDC decrypted our timestamp: the password is right. Once more with
                    // the KDC's time.
                    let theirs = e.stime.unwrap_or(when.0);
                    skew = Some(
                        evidence(
                            Finding::new(
                                Cause::DirectoryClockSkew,
                                format!(
                                    "this host's clock is {} s off the KDC's: Kerberos logons from here fail",
                                    (when.0 - theirs).abs()
                                ),
                            ),
                            &e,
                            &facts.directory_server,
                        )
                        .with("kdc_time", theirs)
                        .with("our_time", when.0),
                    );
                    when = (theirs, 0);
                }
                Ok(AsAnswer::Error(e)) => {
                    let (cause, msg, proven) = cause_of(&e);
                    let f = evidence(Finding::new(cause, msg), &e, &facts.directory_server);
                    let is_credential = cause.number() / 50 == 12;
                    let outcome = if proven {
                        Outcome::Proven {
                            findings: vec![f.clone()],
                            usable: false,
                        }
                    } else if is_credential {
                        Outcome::Refused(f.clone())
                    } else {
                        Outcome::Unknown(f.clone())
                    };
                    ticket.finish(outcome).await;
                    return failed(facts, f, Some(account));
                }
                Err(e) => {
                    let f = Finding::new(Cause::DirectoryError, format!("{e}"));
                    ticket.finish(Outcome::Unknown(f.clone())).await;
                    return failed(facts, f, Some(account));
                }
            }
        }
        // Two skews in a row: the KDC's own time did not help.
        let f = skew.unwrap_or_else(|| Finding::new(Cause::DirectoryClockSkew, "clock skew"));
        ticket.finish(Outcome::Unknown(f.clone())).await;
        failed(facts, f, Some(account))
    }
}
