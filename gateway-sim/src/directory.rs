//! The simulated directory: an LDAP server (LDAPS, and plain `ldap://` with StartTLS) that
//! answers simple binds exactly as Active Directory does.
//!
//! - success: resultCode 0;
//! - failure: resultCode 49 with `80090308: LdapErr: DSID-0C09044E, comment:
//!   AcceptSecurityContext error, data <hex>, v4563`;
//! - 530 / 531 / 532 / 773 / 568 are revealed only when the password is right (a wrong password
//!   gives 52e); 533 (disabled), 701 (account expired) and 775 (locked) regardless;
//! - unknown user → 525; a wrong password counts toward `lockout_threshold`, and at the
//!   threshold the account locks (then 775 even for the right password);
//! - bind names: UPN `user@domain`, down-level `DOMAIN\user`, DN `CN=user,...`;
//! - `require_tls` refuses simple binds on a plain connection with resultCode 8, as AD does;
//! - searches (after a successful bind): the root DSE (`defaultNamingContext`), the domain
//!   object (`lockoutThreshold`) and user entries (`sAMAccountName`, `userPrincipalName`,
//!   `badPwdCount`, …) with AND / OR / NOT / equality / presence filters.
//!
//! The server side uses `ldap3_proto`'s codec; TLS is rustls with a certificate from a CA the
//! directory generates at start ([`Directory::ca_pem`]).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use futures::{SinkExt, StreamExt};
use ldap3_proto::{
    proto::{
        LdapBindCred, LdapExtendedResponse, LdapFilter, LdapMsg, LdapOp, LdapPartialAttribute, LdapResult,
        LdapResultCode, LdapSearchRequest, LdapSearchResultEntry, LdapSearchScope,
    },
    LdapCodec,
};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;

pub use crate::scenario::{Account, DirectorySettings};

/// OID of the StartTLS extended operation.
pub const OID_STARTTLS: &str = "1.3.6.1.4.1.1466.20037";

/// AD's answer to a simple bind on a plain connection when signing/TLS is required.
pub const MSG_REQUIRE_TLS: &str = "00002028: LdapErr: DSID-0C090259, comment: The server requires binds to turn on integrity checking if SSL\\TLS are not already active on the connection, data 0, v4563";

/// AD's answer to an operation on an unauthenticated connection.
const MSG_NEED_BIND: &str = "000004DC: LdapErr: DSID-0C090A5C, comment: In order to perform this operation a successful bind must be completed on the connection., data 0, v4563";

/// AD's diagnostic message for a failed bind with sub-code `data`.
pub fn ad_bind_message(data: &str) -> String {
    format!("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data {data}, v4563")
}

/// Why the directory could not start.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// Listening failed.
    #[error("directory listener: {0}")]
    Io(#[from] std::io::Error),
    /// Certificate generation failed.
    #[error("directory certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// TLS configuration failed.
    #[error("directory TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// An account has an unknown state.
    #[error("account {account:?}: unknown state {state:?}")]
    BadState {
        /// Account name.
        account: String,
        /// The state given.
        state: String,
    },
}

/// How the directory runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryOptions {
    /// Address both listeners bind to (port chosen by the OS). Default 127.0.0.1.
    pub address: IpAddr,
    /// Also listen on plain `ldap://` (StartTLS, or plain binds). Default true.
    pub plain: bool,
    /// Refuse simple binds on a connection without TLS (resultCode 8). Default false.
    pub require_tls: bool,
    /// Failed binds before an account locks; 0 = never. Default 5.
    pub lockout_threshold: u32,
    /// NetBIOS domain name (down-level names). Default `EXAMPLE`.
    pub netbios_domain: String,
    /// DNS domain (UPN suffix). Default `example.test`.
    pub dns_domain: String,
    /// Answer every bind only after this long (the bind is judged and counted at once, as a
    /// slow domain controller does). Default: zero.
    pub bind_delay: std::time::Duration,
    /// Fine-grained password policies: (account, the PSO's `msDS-LockoutThreshold`). The
    /// account's entry names the PSO in `msDS-ResultantPSO` and locks at its threshold; `None`:
    /// the PSO entry cannot be read (a service account without rights on the Password Settings
    /// Container). Default: none.
    pub pso: Vec<(String, Option<u32>)>,
}

impl Default for DirectoryOptions {
    fn default() -> Self {
        DirectoryOptions {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            plain: true,
            require_tls: false,
            lockout_threshold: 5,
            netbios_domain: "EXAMPLE".into(),
            dns_domain: "example.test".into(),
            bind_delay: std::time::Duration::ZERO,
            pso: Vec::new(),
        }
    }
}

impl From<&DirectorySettings> for DirectoryOptions {
    fn from(s: &DirectorySettings) -> Self {
        DirectoryOptions {
            plain: s.plain || s.require_tls,
            require_tls: s.require_tls,
            lockout_threshold: s.lockout_threshold,
            ..DirectoryOptions::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Good,
    Disabled,
    Locked,
    PasswordExpired,
    MustChange,
    AccountExpired,
    LogonHours,
    Workstation,
    TokenTooLarge,
}

impl State {
    fn parse(s: &str) -> Option<State> {
        Some(match s {
            "good" => State::Good,
            "disabled" => State::Disabled,
            "locked" => State::Locked,
            "password_expired" => State::PasswordExpired,
            "must_change" => State::MustChange,
            "account_expired" => State::AccountExpired,
            "logon_hours" => State::LogonHours,
            "workstation" => State::Workstation,
            "token_too_large" => State::TokenTooLarge,
            _ => return None,
        })
    }
}

struct Acct {
    name: String,
    password: String,
    domain: Option<String>,
    state: State,
    bad_pwd_count: u32,
    locked_out: bool,
}

struct Shared {
    opts: DirectoryOptions,
    base_dn: String,
    accounts: Mutex<HashMap<String, Acct>>,
    binds: AtomicU64,
    tls: TlsAcceptor,
}

/// A running simulated directory; stops when dropped.
pub struct Directory {
    ldaps: SocketAddr,
    ldap: Option<SocketAddr>,
    ca_pem: String,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("ldaps", &self.ldaps)
            .field("ldap", &self.ldap)
            .finish_non_exhaustive()
    }
}

impl Directory {
    /// `ldaps://127.0.0.1:PORT`.
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://{}", self.ldaps)
    }

    /// `ldap://127.0.0.1:PORT` (StartTLS or plain); `None` when not listening on plain LDAP.
    pub fn ldap_url(&self) -> Option<String> {
        self.ldap.map(|a| format!("ldap://{a}"))
    }

    /// PEM of the CA that issued the directory's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Bind requests answered so far (any result).
    pub fn bind_count(&self) -> u64 {
        self.shared.binds.load(Ordering::Relaxed)
    }

    /// The account's current bad-password count.
    pub fn bad_pwd_count(&self, name: &str) -> Option<u32> {
        lock(&self.shared.accounts)
            .get(&name.to_lowercase())
            .map(|a| a.bad_pwd_count)
    }

    /// Base DN of the domain (`DC=example,DC=test`).
    pub fn base_dn(&self) -> &str {
        &self.shared.base_dn
    }

    /// DN of an account (`CN=name,CN=Users,DC=example,DC=test`).
    pub fn user_dn(&self, name: &str) -> String {
        format!("CN={name},CN=Users,{}", self.shared.base_dn)
    }

    /// NetBIOS and DNS domain names.
    pub fn domains(&self) -> (&str, &str) {
        (&self.shared.opts.netbios_domain, &self.shared.opts.dns_domain)
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn make_tls(address: IpAddr) -> Result<(TlsAcceptor, String), DirectoryError> {
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "gateway-sim directory CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(3650);
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "dc1.example.test");
    leaf.distinguished_name = dn;
    leaf.subject_alt_names = vec![
        SanType::DnsName("dc1.example.test".try_into()?),
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(address),
    ];
    leaf.not_before = now - time::Duration::days(1);
    leaf.not_after = now + time::Duration::days(365);
    let cert = leaf.signed_by(&key, &issuer)?;
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok((TlsAcceptor::from(Arc::new(cfg)), ca_pem))
}

/// Starts the directory with these accounts.
pub async fn start_directory(accounts: &[Account], opts: DirectoryOptions) -> Result<Directory, DirectoryError> {
    let mut map = HashMap::new();
    for a in accounts {
        let state = State::parse(&a.state).ok_or_else(|| DirectoryError::BadState {
            account: a.name.clone(),
            state: a.state.clone(),
        })?;
        map.insert(
            a.name.to_lowercase(),
            Acct {
                name: a.name.clone(),
                password: a.password.clone(),
                domain: a.domain.clone(),
                state,
                bad_pwd_count: 0,
                locked_out: false,
            },
        );
    }
    let (tls, ca_pem) = make_tls(opts.address)?;
    let base_dn = opts
        .dns_domain
        .split('.')
        .map(|p| format!("DC={p}"))
        .collect::<Vec<_>>()
        .join(",");
    let ldaps_l = TcpListener::bind((opts.address, 0)).await?;
    let ldap_l = if opts.plain {
        Some(TcpListener::bind((opts.address, 0)).await?)
    } else {
        None
    };
    let ldaps = ldaps_l.local_addr()?;
    let ldap = ldap_l.as_ref().map(TcpListener::local_addr).transpose()?;
    let shared = Arc::new(Shared {
        opts,
        base_dn,
        accounts: Mutex::new(map),
        binds: AtomicU64::new(0),
        tls,
    });
    let (shutdown, rx) = watch::channel(false);
    tokio::spawn(accept_loop(ldaps_l, true, shared.clone(), rx.clone()));
    if let Some(l) = ldap_l {
        tokio::spawn(accept_loop(l, false, shared.clone(), rx));
    }
    tracing::info!(ldaps = %ldaps, ldap = ?ldap, "simulated directory listening");
    Ok(Directory {
        ldaps,
        ldap,
        ca_pem,
        shared,
        shutdown,
    })
}

async fn accept_loop(l: TcpListener, tls: bool, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (sock, _) = tokio::select! {
            _ = shutdown.changed() => return,
            r = l.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "directory accept failed");
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        let mut rx = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = rx.changed() => {}
                _ = connection(sock, tls, shared) => {}
            }
        });
    }
}

async fn connection(sock: TcpStream, tls: bool, shared: Arc<Shared>) {
    if tls {
        match shared.tls.accept(sock).await {
            Ok(s) => {
                let _ = serve(Framed::new(s, LdapCodec::default()), true, &shared).await;
            }
            Err(e) => tracing::debug!(error = %e, "directory TLS handshake failed"),
        }
        return;
    }
    let framed = Framed::new(sock, LdapCodec::default());
    if let Some(framed) = serve(framed, false, &shared).await {
        // StartTLS: the response went out in clear; the handshake follows on the same socket.
        let parts = framed.into_parts();
        match shared.tls.accept(parts.io).await {
            Ok(s) => {
                let _ = serve(Framed::new(s, LdapCodec::default()), true, &shared).await;
            }
            Err(e) => tracing::debug!(error = %e, "directory StartTLS handshake failed"),
        }
    }
}

fn result(code: LdapResultCode, message: impl Into<String>) -> LdapResult {
    LdapResult {
        code,
        matcheddn: String::new(),
        message: message.into(),
        referral: Vec::new(),
    }
}

/// Serves one connection; returns the framed stream when the client asked for StartTLS.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut framed: Framed<S, LdapCodec>,
    tls: bool,
    shared: &Shared,
) -> Option<Framed<S, LdapCodec>> {
    let mut bound: Option<String> = None;
    while let Some(msg) = framed.next().await {
        let Ok(msg) = msg else { return None };
        let id = msg.msgid;
        let replies: Vec<LdapOp> = match msg.op {
            LdapOp::BindRequest(req) => {
                let (res, who) = match req.cred {
                    LdapBindCred::Simple(pw) => shared.bind(&req.dn, &pw, tls),
                    _ => (
                        result(LdapResultCode::AuthMethodNotSupported, "simple binds only"),
                        None,
                    ),
                };
                bound = who;
                if !shared.opts.bind_delay.is_zero() {
                    tokio::time::sleep(shared.opts.bind_delay).await;
                }
                vec![LdapOp::BindResponse(ldap3_proto::proto::LdapBindResponse {
                    res,
                    saslcreds: None,
                })]
            }
            LdapOp::UnbindRequest => return None,
            LdapOp::AbandonRequest(_) => continue,
            LdapOp::SearchRequest(req) => shared.search(&req, bound.is_some()),
            LdapOp::ExtendedRequest(req) if req.name == OID_STARTTLS => {
                let (code, msg) = if tls {
                    (LdapResultCode::OperationsError, "TLS is already active")
                } else {
                    (LdapResultCode::Success, "")
                };
                let resp = LdapOp::ExtendedResponse(LdapExtendedResponse {
                    res: result(code.clone(), msg),
                    name: Some(OID_STARTTLS.to_string()),
                    value: None,
                });
                if framed.send(LdapMsg::new(id, resp)).await.is_err() {
                    return None;
                }
                if code == LdapResultCode::Success {
                    return Some(framed);
                }
                continue;
            }
            LdapOp::ExtendedRequest(req) => vec![LdapOp::ExtendedResponse(LdapExtendedResponse {
                res: result(
                    LdapResultCode::ProtocolError,
                    format!("unsupported extended operation {}", req.name),
                ),
                name: None,
                value: None,
            })],
            _ => vec![LdapOp::ExtendedResponse(LdapExtendedResponse {
                res: result(
                    LdapResultCode::UnwillingToPerform,
                    "operation not supported by the simulated directory",
                ),
                name: None,
                value: None,
            })],
        };
        for op in replies {
            if framed.send(LdapMsg::new(id, op)).await.is_err() {
                return None;
            }
        }
    }
    None
}

impl Shared {
    /// The account a bind name designates (lower-case key), if it names one of ours.
    fn resolve(&self, name: &str) -> Option<String> {
        let o = &self.opts;
        let domain_ok = |d: &str, acct_domain: Option<&String>| {
            d.eq_ignore_ascii_case(&o.dns_domain)
                || d.eq_ignore_ascii_case(&o.netbios_domain)
                || acct_domain.is_some_and(|a| a.eq_ignore_ascii_case(d))
        };
        let accounts = lock(&self.accounts);
        let (user, domain) = if let Some((u, d)) = name.rsplit_once('@') {
            (u.to_string(), Some(d.to_string()))
        } else if let Some((d, u)) = name.split_once('\\') {
            (u.to_string(), Some(d.to_string()))
        } else if name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("cn=")) {
            let rdn = first_rdn_value(&name[3..]);
            // The rest of the DN must be ours.
            let rest = name[3..].get(raw_rdn_len(&name[3..])..).unwrap_or("");
            let rest = rest.trim_start_matches(',').trim();
            if !rest.to_ascii_lowercase().ends_with(&self.base_dn.to_ascii_lowercase()) {
                return None;
            }
            (rdn, None)
        } else {
            return None;
        };
        let key = user.to_lowercase();
        let acct = accounts.get(&key)?;
        match domain {
            Some(d) if !domain_ok(&d, acct.domain.as_ref()) => None,
            _ => Some(key),
        }
    }

    /// The account's PSO, if any: its DN and threshold (`None`: unreadable).
    fn pso_of(&self, name: &str) -> Option<(String, Option<u32>)> {
        self.opts
            .pso
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(n, t)| {
                let dn = format!("CN=pso-{n},CN=Password Settings Container,CN=System,{}", self.base_dn);
                (dn, *t)
            })
    }

    /// The lockout threshold that applies to the account: its PSO's, else the domain's.
    fn threshold_of(&self, name: &str) -> u32 {
        match self.pso_of(name) {
            Some((_, Some(t))) => t,
            _ => self.opts.lockout_threshold,
        }
    }

    fn bind(&self, dn: &str, pw: &str, tls: bool) -> (LdapResult, Option<String>) {
        self.binds.fetch_add(1, Ordering::Relaxed);
        let fail = |data: &str| (result(LdapResultCode::InvalidCredentials, ad_bind_message(data)), None);
        if dn.is_empty() && pw.is_empty() {
            return (result(LdapResultCode::Success, ""), None); // anonymous
        }
        if !tls && self.opts.require_tls {
            return (result(LdapResultCode::StrongerAuthRequired, MSG_REQUIRE_TLS), None);
        }
        if pw.is_empty() {
            return (
                result(
                    LdapResultCode::UnwillingToPerform,
                    "00002028: LdapErr: DSID-0C090A55, comment: unauthenticated bind is not allowed, data 0, v4563",
                ),
                None,
            );
        }
        let Some(key) = self.resolve(dn) else {
            return fail("525");
        };
        let mut accounts = lock(&self.accounts);
        let Some(a) = accounts.get_mut(&key) else {
            return fail("525");
        };
        if a.locked_out || a.state == State::Locked {
            return fail("775");
        }
        match a.state {
            State::Disabled => return fail("533"),
            State::AccountExpired => return fail("701"),
            _ => {}
        }
        if a.password != pw {
            a.bad_pwd_count += 1;
            let threshold = self.threshold_of(&a.name);
            if threshold > 0 && a.bad_pwd_count >= threshold {
                a.locked_out = true;
                tracing::info!(account = %a.name, "simulated directory locked an account");
            }
            return fail("52e");
        }
        a.bad_pwd_count = 0;
        match a.state {
            State::PasswordExpired => fail("532"),
            State::MustChange => fail("773"),
            State::LogonHours => fail("530"),
            State::Workstation => fail("531"),
            State::TokenTooLarge => fail("568"),
            _ => (result(LdapResultCode::Success, ""), Some(key)),
        }
    }

    fn search(&self, req: &LdapSearchRequest, authenticated: bool) -> Vec<LdapOp> {
        let mut entries: Vec<(String, Attrs<'_>)> = Vec::new();
        let base = req.base.trim().to_ascii_lowercase();
        let domain_dn = self.base_dn.to_ascii_lowercase();
        if base.is_empty() && req.scope == LdapSearchScope::Base {
            entries.push((
                String::new(),
                vec![
                    ("objectClass", vec!["top".into()]),
                    ("defaultNamingContext", vec![self.base_dn.clone()]),
                    ("dnsHostName", vec!["dc1.example.test".into()]),
                    ("supportedLDAPVersion", vec!["3".into()]),
                    ("supportedExtension", vec![OID_STARTTLS.into()]),
                ],
            ));
        } else if !authenticated {
            return vec![LdapOp::SearchResultDone(result(
                LdapResultCode::OperationsError,
                MSG_NEED_BIND,
            ))];
        } else if !base.ends_with(&domain_dn) {
            return vec![LdapOp::SearchResultDone(result(
                LdapResultCode::NoSuchObject,
                "0000208D: NameErr: DSID-0310028D, problem 2001 (NO_OBJECT), data 0, best match of:\n\t''\n",
            ))];
        } else {
            if base == domain_dn && req.scope != LdapSearchScope::OneLevel && req.scope != LdapSearchScope::Children {
                let e = vec![
                    ("objectClass", vec!["top".into(), "domain".into(), "domainDNS".into()]),
                    ("distinguishedName", vec![self.base_dn.clone()]),
                    ("lockoutThreshold", vec![self.opts.lockout_threshold.to_string()]),
                ];
                entries.push((self.base_dn.clone(), e));
            }
            for (name, threshold) in &self.opts.pso {
                let (dn, _) = self.pso_of(name).unwrap_or_default();
                if let (Some(t), true) = (threshold, dn.to_ascii_lowercase() == base) {
                    let e = vec![
                        ("objectClass", vec!["top".into(), "msDS-PasswordSettings".into()]),
                        ("msDS-LockoutThreshold", vec![t.to_string()]),
                    ];
                    entries.push((dn, e));
                }
            }
            let accounts = lock(&self.accounts);
            for a in accounts.values() {
                let dn = format!("CN={},CN=Users,{}", a.name, self.base_dn);
                let ldn = dn.to_ascii_lowercase();
                let in_scope = match req.scope {
                    LdapSearchScope::Base => ldn == base,
                    _ => ldn.ends_with(&base) && ldn != base,
                };
                if !in_scope {
                    continue;
                }
                let domain = a.domain.clone().unwrap_or_else(|| self.opts.dns_domain.clone());
                let pso = self.pso_of(&a.name).map(|(dn, _)| vec![dn]).unwrap_or_default();
                entries.push((
                    dn.clone(),
                    vec![
                        ("msDS-ResultantPSO", pso),
                        ("objectClass", vec!["top".into(), "person".into(), "user".into()]),
                        ("cn", vec![a.name.clone()]),
                        ("sAMAccountName", vec![a.name.clone()]),
                        (
                            "userPrincipalName",
                            vec![format!("{}@{}", a.name, domain.to_lowercase())],
                        ),
                        ("distinguishedName", vec![dn]),
                        ("badPwdCount", vec![a.bad_pwd_count.to_string()]),
                        ("lockoutTime", vec![if a.locked_out { "1".into() } else { "0".into() }]),
                    ],
                ));
            }
            if req.scope == LdapSearchScope::Base && entries.is_empty() {
                return vec![LdapOp::SearchResultDone(result(
                    LdapResultCode::NoSuchObject,
                    "0000208D: NameErr: DSID-0310028D, problem 2001 (NO_OBJECT), data 0",
                ))];
            }
        }
        let all = req.attrs.is_empty() || req.attrs.iter().any(|a| a == "*");
        let mut out = Vec::new();
        for (dn, attrs) in entries {
            if !matches(&req.filter, &attrs) {
                continue;
            }
            let attributes = attrs
                .into_iter()
                .filter(|(n, v)| !v.is_empty() && (all || req.attrs.iter().any(|a| a.eq_ignore_ascii_case(n))))
                .map(|(n, v)| LdapPartialAttribute {
                    atype: n.to_string(),
                    vals: v.into_iter().map(String::into_bytes).collect(),
                })
                .collect();
            out.push(LdapOp::SearchResultEntry(LdapSearchResultEntry { dn, attributes }));
        }
        out.push(LdapOp::SearchResultDone(result(LdapResultCode::Success, "")));
        out
    }
}

/// An entry's attributes: (name, values).
type Attrs<'a> = Vec<(&'a str, Vec<String>)>;

fn matches(f: &LdapFilter, attrs: &[(&str, Vec<String>)]) -> bool {
    let values = |name: &str| attrs.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v);
    match f {
        LdapFilter::And(l) => l.iter().all(|f| matches(f, attrs)),
        LdapFilter::Or(l) => l.iter().any(|f| matches(f, attrs)),
        LdapFilter::Not(f) => !matches(f, attrs),
        LdapFilter::Present(n) => n.eq_ignore_ascii_case("objectClass") || values(n).is_some(),
        LdapFilter::Equality(n, v) => values(n).is_some_and(|vs| vs.iter().any(|x| x.eq_ignore_ascii_case(v))),
        _ => false,
    }
}

/// Length of the first RDN value in raw (escaped) form: up to the first unescaped comma.
fn raw_rdn_len(s: &str) -> usize {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b',' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// The first RDN's value, unescaped (RFC 4514: `\c` and `\hh`).
fn first_rdn_value(s: &str) -> String {
    let raw = &s.as_bytes()[..raw_rdn_len(s).min(s.len())];
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            let hex = raw
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => {
                    out.push(v);
                    i += 3;
                }
                None => {
                    out.push(raw[i + 1]);
                    i += 2;
                }
            }
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdn_values() {
        assert_eq!(first_rdn_value("alice,CN=Users,DC=example,DC=test"), "alice");
        assert_eq!(first_rdn_value("a\\,b,CN=Users"), "a,b");
        assert_eq!(first_rdn_value("a\\2cb"), "a,b");
        assert_eq!(raw_rdn_len("a\\,b,c"), 4);
    }

    #[test]
    fn message_format() {
        assert_eq!(
            ad_bind_message("52e"),
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 52e, v4563"
        );
    }
}
