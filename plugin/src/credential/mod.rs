//! Credential pre-validation: an LDAP simple bind of the target account against the directory,
//! lockout-safe, with the password-policy control and AD's `data` sub-code mapped to the 6xx
//! and 65x causes.
//!
//! Flow of one check: empty password → CRED_MISSING (no traffic); a reservation from the
//! lockout guard (see [`crate::guard`]: a refused password is answered from memory, a proof
//! within the success-cache TTL too, a spent budget is CRED_LOCKOUT_GUARD) keyed on the
//! canonical bind identity, or, with `bind_as = search`, on the DN the search found; a pooled
//! or fresh connection (servers in order, failover on connect/TLS failure only); optionally the
//! service account's search and lockout-state read; the bind with the ppolicy request control,
//! sent at most once (a bind whose request reached the connection is never resent: only a bind
//! that could not be handed to a dead pooled connection is made again on a fresh one); the
//! answer mapped to a cause with its raw evidence, and to the guard's outcome (no answer counts
//! as a failed attempt).

pub mod ad;
mod config;
pub mod escape;
pub mod ppolicy;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ldap3::{asn1::StructureTag, controls::RawControl, Ldap, LdapConnAsync, LdapConnSettings, Scope, StdStream};

pub use config::{BindAs, DirectoryConfig, DirectoryFile, ServerUrl, ServiceAccount};

use crate::{
    cause::Cause,
    deadline::{Budget, Expired},
    guard::{identity, AccountKey, Admission, Guard, Outcome, Scope as GuardScope, Ticket},
    report::{CredentialFacts, Finding, StageStatus},
    secret::Credential,
};
use ppolicy::{PpolicyError, PpolicyResponse, PpolicyWarning, OID_PASSWORD_POLICY};

/// What the credential stage found.
#[derive(Clone, Debug)]
pub struct CredentialOutcome {
    /// `Ok` (bind succeeded, maybe with a warning finding) or `Failed`.
    pub status: StageStatus,
    /// Findings (at most one).
    pub findings: Vec<Finding>,
    /// Facts for the report.
    pub facts: CredentialFacts,
    /// True only if the password is proven right and usable.
    pub bind_succeeded: bool,
    /// One-line summary for the stage record.
    pub detail: String,
    /// The lockout guard's key for the account, once known: the NLA stage spends attempts
    /// from the same budget.
    pub account: Option<AccountKey>,
    /// Our own side failed (an encoder or crypto library error): the check answers an internal
    /// error, never a credential cause.
    pub internal: Option<String>,
    /// The ticket for `TERMSRV/<host>` when the Kerberos check obtained one: the NLA stage logs
    /// on with it (no password attempt) instead of NTLM.
    pub service_ticket: Option<Arc<crate::kerberos::messages::ServiceTicket>>,
}

struct PooledConn {
    ldap: Ldap,
    server: usize,
}

/// One per process: connection pool; the lockout guard is shared with the NLA stage.
pub struct CredentialChecker {
    cfg: DirectoryConfig,
    pool: Mutex<Vec<PooledConn>>,
    guard: Arc<Guard>,
    domains: identity::Domains,
}

impl std::fmt::Debug for CredentialChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialChecker")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Why no connection could be had from one server.
enum ConnectError {
    /// TCP connect refused / timed out / name not resolved.
    Tcp(String),
    /// TLS or StartTLS handshake / certificate failure.
    Tls(String),
}

/// How an LDAP operation went wrong before an answer.
enum OpError {
    /// No answer before the limit.
    Timeout(Expired),
    /// The request could not be handed to the connection: nothing was written.
    NotSent(String),
    /// The connection failed after the request was handed over.
    Io(String),
}

/// The account's entry as read by the service account.
#[derive(Default)]
struct EntryInfo {
    dn: String,
    attrs: HashMap<String, Vec<Vec<u8>>>,
}

impl EntryInfo {
    fn first(&self, name: &str) -> Option<String> {
        self.attrs
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
    fn count(&self, name: &str) -> usize {
        self.attrs.get(&name.to_ascii_lowercase()).map_or(0, Vec::len)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ppolicy_request() -> RawControl {
    RawControl {
        ctype: OID_PASSWORD_POLICY.to_string(),
        crit: false,
        val: None,
    }
}

/// Decodes a search result entry without panicking on malformed data.
fn parse_entry(tag: StructureTag) -> Option<EntryInfo> {
    let mut parts = tag.match_id(4)?.expect_constructed()?.into_iter();
    let dn = String::from_utf8(parts.next()?.expect_primitive()?).ok()?;
    let mut attrs = HashMap::new();
    for a in parts.next()?.expect_constructed()? {
        let mut pa = a.expect_constructed()?.into_iter();
        let name = String::from_utf8(pa.next()?.expect_primitive()?).ok()?;
        let vals = pa
            .next()?
            .expect_constructed()?
            .into_iter()
            .filter_map(|v| v.expect_primitive())
            .collect();
        attrs.insert(name.to_ascii_lowercase(), vals);
    }
    Some(EntryInfo { dn, attrs })
}

fn fill(template: &str, user: &str, domain: &str, escape: fn(&str) -> String) -> String {
    template
        .replace("{user}", &escape(user))
        .replace("{domain}", &escape(domain))
}

/// The identity a direct bind uses (not `search`).
pub fn bind_identity(bind_as: &BindAs, user: &str, domain: &str) -> Option<String> {
    Some(match bind_as {
        BindAs::Upn if user.contains('@') || domain.is_empty() => user.to_string(),
        BindAs::Upn => format!("{user}@{domain}"),
        BindAs::Downlevel if user.contains('\\') || domain.is_empty() => user.to_string(),
        BindAs::Downlevel => format!("{domain}\\{user}"),
        BindAs::Dn(t) => fill(t, user, domain, escape::dn_value),
        BindAs::Search => return None,
    })
}

/// Context of one check for building findings.
struct Ctx {
    facts: CredentialFacts,
    account: Option<AccountKey>,
    /// Only the service account's reads (the lockout state before another protocol's
    /// attempt): no reservation, no bind.
    read_only: bool,
}

impl Ctx {
    fn evidence(&self, mut f: Finding) -> Finding {
        if let Some(rc) = self.facts.ldap_result_code {
            f = f.with("ldap_result_code", rc);
        }
        if !self.facts.ad_data_code.is_empty() {
            f = f.with("ad_data", &self.facts.ad_data_code);
        }
        if !self.facts.directory_server.is_empty() {
            f = f.with("directory_server", &self.facts.directory_server);
        }
        if !self.facts.bind_identity.is_empty() {
            f = f.with("bind_identity", &self.facts.bind_identity);
        }
        f
    }

    fn failed(self, f: Finding) -> CredentialOutcome {
        let f = self.evidence(f);
        self.failed_raw(f)
    }

    fn failed_raw(self, f: Finding) -> CredentialOutcome {
        let detail = format!("{}: {}", f.cause.name(), f.message);
        CredentialOutcome {
            status: StageStatus::Failed,
            findings: vec![f],
            facts: self.facts,
            bind_succeeded: false,
            detail,
            account: self.account,
            internal: None,
            service_ticket: None,
        }
    }

    /// The outcome of a read-only pass that found nothing against the attempt.
    fn read_ok(self) -> CredentialOutcome {
        CredentialOutcome {
            status: StageStatus::Ok,
            findings: Vec::new(),
            facts: self.facts,
            bind_succeeded: false,
            detail: "lockout state read".into(),
            account: self.account,
            internal: None,
            service_ticket: None,
        }
    }

    /// The outcome when the guard answered without a bind.
    fn answered_by_guard(mut self, a: Admission) -> CredentialOutcome {
        self.facts.from_memory = true;
        match a {
            Admission::Go(_) => self.failed(Finding::new(
                Cause::DirectoryError,
                "internal error: the lockout guard's reservation was not used",
            )),
            Admission::Remembered(f) => {
                tracing::debug!(
                    cause = f.cause.name(),
                    "credential answered from the lockout guard's memory"
                );
                self.failed_raw(f)
            }
            Admission::Refused(f) => {
                tracing::info!(identity = %self.facts.bind_identity, "lockout guard refused a bind");
                self.failed(f)
            }
            Admission::Proven { findings, usable } => {
                let detail = if usable {
                    "password proven right recently (from memory)".to_string()
                } else {
                    findings
                        .first()
                        .map_or_else(String::new, |f| format!("{}: {}", f.cause.name(), f.message))
                };
                CredentialOutcome {
                    status: if usable { StageStatus::Ok } else { StageStatus::Failed },
                    findings,
                    facts: self.facts,
                    bind_succeeded: usable,
                    detail,
                    account: self.account,
                    internal: None,
                    service_ticket: None,
                }
            }
        }
    }
}

fn unreachable_directory() -> Finding {
    Finding::new(
        Cause::DirectoryUnreachable,
        "the directory closed the connection before the lockout state could be read",
    )
}

fn new_ctx() -> Ctx {
    Ctx {
        facts: CredentialFacts {
            checked_by: "ldap".into(),
            ..Default::default()
        },
        account: None,
        read_only: false,
    }
}

impl CredentialChecker {
    /// A checker for the validated config, spending attempts through `guard`.
    pub fn new(cfg: DirectoryConfig, guard: Arc<Guard>, domains: identity::Domains) -> Self {
        CredentialChecker {
            cfg,
            pool: Mutex::new(Vec::new()),
            guard,
            domains,
        }
    }

    /// A checker with a lockout guard of its own, in memory, from the config's guard
    /// settings (benchmarks and tests; a service shares one guard with the NLA stage).
    pub fn standalone(cfg: DirectoryConfig, domains: identity::Domains) -> Self {
        let limits =
            crate::guard::Limits::new(cfg.guard_window, cfg.guard_max_distinct_failures, cfg.success_cache_ttl);
        let guard = Arc::new(Guard::memory(limits, crate::check::GUARD_CAPACITY));
        CredentialChecker::new(cfg, guard, domains)
    }

    /// The lockout guard this checker spends attempts through.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The canonical account a direct bind (not `search`) authenticates.
    fn canonical(&self, user: &str, domain: &str, bind_identity: &str) -> String {
        match &self.cfg.bind_as {
            BindAs::Dn(_) => identity::dn(bind_identity),
            // A contradiction is refused before the check (InvalidArgument); here the identity
            // as sent still keys the account.
            _ => self
                .domains
                .account(user, domain, "")
                .unwrap_or_else(|_| bind_identity.to_lowercase()),
        }
    }

    /// The config in use.
    pub fn config(&self) -> &DirectoryConfig {
        &self.cfg
    }

    /// Idle pooled connections right now (for metrics and tests).
    pub fn pooled(&self) -> usize {
        lock(&self.pool).len()
    }

    /// Proves the credential with a bind; never sends an empty password, never makes a bind
    /// the lockout guard refuses.
    pub async fn check(&self, cred: &Credential, budget: &Budget) -> CredentialOutcome {
        let mut ctx = new_ctx();
        let (user, domain) = (cred.username.trim(), cred.domain.trim());
        if let Some(id) = bind_identity(&self.cfg.bind_as, user, domain).filter(|_| !user.is_empty()) {
            ctx.facts.bind_identity = id;
        }
        if user.is_empty() || cred.password.is_empty() {
            let what = if user.is_empty() {
                "no username"
            } else {
                "empty password"
            };
            return ctx.failed(Finding::new(
                Cause::CredMissing,
                format!("{what}: not binding (an empty-password bind is an anonymous bind)"),
            ));
        }
        // A direct bind knows its account now: reserve before connecting. `search` reserves
        // once the search has found the DN.
        let mut ticket = None;
        if self.cfg.bind_as != BindAs::Search {
            let account = self
                .guard
                .account(&self.canonical(user, domain, &ctx.facts.bind_identity));
            ctx.account = Some(account);
            match self
                .guard
                .admit(account, &cred.password, GuardScope::DIRECTORY, budget)
                .await
            {
                Admission::Go(t) => ticket = Some(t),
                other => return ctx.answered_by_guard(other),
            }
        }
        // A pooled connection first; if it turns out dead before the bind was handed to it,
        // once more on a fresh one.
        let mut pooled = self.take_pooled();
        loop {
            let was_pooled = pooled.is_some();
            let conn = match pooled.take() {
                Some(c) => c,
                None => match self.connect_any(budget, &mut ctx).await {
                    Ok(c) => c,
                    Err(outcome) => return *outcome,
                },
            };
            match self
                .check_on(conn, cred, user, domain, budget, &mut ctx, &mut ticket)
                .await
            {
                Step::Done(outcome) => return *outcome,
                Step::Retry if was_pooled => {
                    tracing::debug!("pooled directory connection was dead; reconnecting");
                    let account = ctx.account;
                    ctx = new_ctx();
                    ctx.account = account;
                    if let Some(id) = bind_identity(&self.cfg.bind_as, user, domain) {
                        ctx.facts.bind_identity = id;
                    }
                    continue;
                }
                Step::Retry => {
                    let f = Finding::new(
                        Cause::DirectoryUnreachable,
                        "the directory closed the connection before answering",
                    );
                    return ctx.failed(f);
                }
            }
        }
    }

    /// With `read_lockout_state`, before another protocol (the Kerberos AS exchange) spends an
    /// attempt of the account: reads its failure count and threshold with the service account,
    /// exactly as before a bind, counting the attempts in flight under `account` (the caller
    /// holds a reservation there). `Err`: the finding that refuses the attempt
    /// (`CRED_LOCKOUT_GUARD`, no such account, or the read failing: never fail open). Without
    /// `read_lockout_state`: `Ok` at once. Never binds as the account.
    pub async fn read_lockout_before(
        &self,
        cred: &Credential,
        account: AccountKey,
        budget: &Budget,
    ) -> Result<(), Finding> {
        if !self.cfg.read_lockout_state {
            return Ok(());
        }
        let (user, domain) = (cred.username.trim(), cred.domain.trim());
        let mut pooled = self.take_pooled();
        for _ in 0..2 {
            let mut ctx = new_ctx();
            ctx.account = Some(account);
            ctx.read_only = true;
            if let Some(id) = bind_identity(&self.cfg.bind_as, user, domain) {
                ctx.facts.bind_identity = id;
            }
            let conn = match pooled.take() {
                Some(c) => c,
                None => match self.connect_any(budget, &mut ctx).await {
                    Ok(c) => c,
                    Err(o) => return Err(o.findings.into_iter().next().unwrap_or_else(unreachable_directory)),
                },
            };
            let mut no_ticket = None;
            match self
                .check_on(conn, cred, user, domain, budget, &mut ctx, &mut no_ticket)
                .await
            {
                Step::Done(o) if o.status == StageStatus::Failed => {
                    return Err(o.findings.into_iter().next().unwrap_or_else(unreachable_directory))
                }
                Step::Done(_) => return Ok(()),
                Step::Retry => continue,
            }
        }
        Err(unreachable_directory())
    }

    fn take_pooled(&self) -> Option<PooledConn> {
        let mut pool = lock(&self.pool);
        while let Some(mut c) = pool.pop() {
            if !c.ldap.is_closed() {
                return Some(c);
            }
        }
        None
    }

    fn put_back(&self, c: PooledConn) {
        let mut pool = lock(&self.pool);
        if pool.len() < self.cfg.pool_size {
            pool.push(c);
        }
    }

    async fn connect_any(&self, budget: &Budget, ctx: &mut Ctx) -> Result<PooledConn, Box<CredentialOutcome>> {
        let mut errors = Vec::new();
        let mut any_tls = false;
        for (i, s) in self.cfg.servers.iter().enumerate() {
            let url = s.url();
            match self.connect(i, budget).await {
                Ok(ldap) => {
                    return Ok(PooledConn { ldap, server: i });
                }
                Err(ConnectError::Tcp(e)) => {
                    tracing::warn!(server = %url, error = %e, "directory unreachable");
                    errors.push(format!("{url}: {e}"));
                }
                Err(ConnectError::Tls(e)) => {
                    tracing::warn!(server = %url, error = %e, "directory TLS failed");
                    any_tls = true;
                    errors.push(format!("{url}: TLS: {e}"));
                }
            }
            if budget.is_spent() {
                break;
            }
        }
        ctx.facts.directory_server = self
            .cfg
            .servers
            .iter()
            .map(ServerUrl::url)
            .collect::<Vec<_>>()
            .join(" ");
        let attempts = errors.join("; ");
        let f = if any_tls {
            Finding::new(
                Cause::DirectoryTlsFailed,
                format!("no TLS connection to the directory: {attempts}"),
            )
        } else {
            Finding::new(
                Cause::DirectoryUnreachable,
                format!("no directory server reachable: {attempts}"),
            )
        };
        let account = ctx.account;
        let mut outcome = std::mem::replace(ctx, new_ctx()).failed(f.with("attempts", &attempts));
        outcome.account = account;
        Err(Box::new(outcome))
    }

    async fn connect(&self, idx: usize, budget: &Budget) -> Result<Ldap, ConnectError> {
        let s = &self.cfg.servers[idx];
        let limit = self.cfg.connect_timeout;
        let tcp = match budget
            .run(limit, tokio::net::TcpStream::connect((s.host.as_str(), s.port)))
            .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(ConnectError::Tcp(e.to_string())),
            Err(which) => return Err(ConnectError::Tcp(format!("connect timed out ({which:?} limit)"))),
        };
        // ldap3 has no TCP_NODELAY setting: connect here, set it, and hand the socket over.
        // Without it Nagle + delayed ACK add ~40 ms to a TLS handshake on small writes.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let std_stream = tcp.into_std().map_err(|e| ConnectError::Tcp(e.to_string()))?;
        let use_tls = s.tls || self.cfg.starttls;
        let mut settings = LdapConnSettings::new().set_std_stream(StdStream::Tcp(std_stream));
        if use_tls {
            if let Some(tls) = &self.cfg.tls {
                settings = settings.set_config(tls.clone());
            }
            if !s.tls {
                settings = settings.set_starttls(true);
            }
        }
        let url = s.url();
        let (conn, ldap) = match budget.run(limit, LdapConnAsync::with_settings(settings, &url)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) if use_tls => return Err(ConnectError::Tls(e.to_string())),
            Ok(Err(e)) => return Err(ConnectError::Tcp(e.to_string())),
            Err(which) if use_tls => return Err(ConnectError::Tls(format!("handshake timed out ({which:?} limit)"))),
            Err(which) => return Err(ConnectError::Tcp(format!("timed out ({which:?} limit)"))),
        };
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "directory connection ended");
            }
        });
        Ok(ldap)
    }

    async fn op<T, F>(&self, budget: &Budget, fut: F) -> Result<T, OpError>
    where
        F: std::future::Future<Output = ldap3::result::Result<T>>,
    {
        match budget.run(self.cfg.bind_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e @ ldap3::LdapError::OpSend { .. })) => Err(OpError::NotSent(e.to_string())),
            Ok(Err(e)) => Err(OpError::Io(e.to_string())),
            Err(which) => Err(OpError::Timeout(which)),
        }
    }

    async fn search(
        &self,
        ldap: &mut Ldap,
        budget: &Budget,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<(Vec<EntryInfo>, u32, String), OpError> {
        let r = self
            .op(budget, ldap.search(base, scope, filter, attrs.to_vec()))
            .await?;
        let entries = r.0.into_iter().filter_map(|e| parse_entry(e.0)).collect();
        Ok((entries, r.1.rc, r.1.text))
    }

    /// Runs the check on one connection. `Retry` = the connection was dead before the bind
    /// (or the service account's operations) could be handed to it.
    #[allow(clippy::too_many_arguments)]
    async fn check_on(
        &self,
        mut conn: PooledConn,
        cred: &Credential,
        user: &str,
        domain: &str,
        budget: &Budget,
        ctx: &mut Ctx,
        ticket: &mut Option<Ticket>,
    ) -> Step {
        let server = self.cfg.servers[conn.server].url();
        ctx.facts.directory_server = server.clone();
        let take = |ctx: &mut Ctx| std::mem::replace(ctx, new_ctx());
        let op_failed = |ctx: &mut Ctx, e: OpError, what: &str, answered_before: bool| -> Step {
            match e {
                OpError::Timeout(which) => Step::done(
                    take(ctx).failed(
                        Finding::new(
                            Cause::DirectoryTimeout,
                            format!("the directory did not answer the {what} in time"),
                        )
                        .with("limit", format!("{which:?}").to_lowercase()),
                    ),
                ),
                OpError::NotSent(_) | OpError::Io(_) if !answered_before => Step::Retry,
                OpError::NotSent(err) | OpError::Io(err) => Step::done(take(ctx).failed(Finding::new(
                    Cause::DirectoryUnreachable,
                    format!("connection lost during the {what}: {err}"),
                ))),
            }
        };

        // Identity and lockout state via the service account, when configured.
        let needs_service = self.cfg.bind_as == BindAs::Search || self.cfg.read_lockout_state;
        let mut entry: Option<EntryInfo> = None;
        let direct = bind_identity(&self.cfg.bind_as, user, domain);
        if let Some(id) = &direct {
            ctx.facts.bind_identity = id.clone();
        }
        if needs_service {
            let Some(svc) = &self.cfg.service else {
                return Step::done(
                    take(ctx).failed(Finding::new(Cause::DirectoryError, "no service account configured")),
                );
            };
            let r = match self
                .op(budget, conn.ldap.simple_bind(&svc.dn, svc.password.expose()))
                .await
            {
                Ok(r) => r,
                Err(e) => return op_failed(ctx, e, "service account bind", false),
            };
            tracing::debug!(server = %server, identity = %svc.dn, rc = r.rc, "service bind answered");
            if r.rc != 0 {
                let f = Finding::new(
                    Cause::DirectoryError,
                    format!("the service account's bind failed (resultCode {}): {}", r.rc, r.text),
                )
                .with("service_dn", &svc.dn)
                .with("service_bind_result_code", r.rc)
                .with("diagnostic_message", &r.text);
                self.put_back(conn);
                return Step::done(take(ctx).failed(f));
            }
            let attrs = [
                "badPwdCount",
                "pwdFailureTime",
                "pwdPolicySubentry",
                "pwdAccountLockedTime",
                "lockoutTime",
                "msDS-ResultantPSO",
            ];
            let base = self.cfg.search_base.clone().unwrap_or_default();
            let (scope, base, filter) = match (&self.cfg.bind_as, &direct) {
                (BindAs::Dn(_), Some(dn)) => (Scope::Base, dn.clone(), "(objectClass=*)".to_string()),
                _ => (
                    Scope::Subtree,
                    base,
                    fill(&self.cfg.search_filter, user, domain, escape::filter_value),
                ),
            };
            let (mut entries, rc, text) = match self.search(&mut conn.ldap, budget, &base, scope, &filter, &attrs).await
            {
                Ok(r) => r,
                Err(e) => return op_failed(ctx, e, "search for the account", true),
            };
            // noSuchObject (32) on a base read of a DN template: the account does not exist.
            if rc != 0 && !(rc == 32 && scope == Scope::Base) {
                self.put_back(conn);
                let f = Finding::new(
                    Cause::DirectoryError,
                    format!("search for the account failed (resultCode {rc}): {text}"),
                )
                .with("search_result_code", rc)
                .with("search_filter", &filter);
                return Step::done(take(ctx).failed(f));
            }
            match entries.len() {
                1 => entry = entries.pop(),
                0 if self.cfg.bind_as == BindAs::Search || scope == Scope::Base => {
                    self.put_back(conn);
                    let f = Finding::new(
                        Cause::CredAccountNotFound,
                        "the service account's search found no such account",
                    )
                    .with("search_base", &base)
                    .with("search_filter", &filter)
                    .with("search_entries", 0);
                    return Step::done(take(ctx).failed(f));
                }
                0 => {}
                n => {
                    self.put_back(conn);
                    let f = Finding::new(
                        Cause::DirectoryError,
                        format!("the search matched {n} entries, expected one"),
                    )
                    .with("search_filter", &filter)
                    .with("search_entries", n);
                    return Step::done(take(ctx).failed(f));
                }
            }
            if self.cfg.bind_as == BindAs::Search {
                let dn = entry.as_ref().map(|e| e.dn.clone()).unwrap_or_default();
                ctx.facts.bind_identity = dn.clone();
                // The DN the directory authenticates is the account, whatever the spelling.
                if ticket.is_none() && !ctx.read_only {
                    let account = self.guard.account(&identity::dn(&dn));
                    ctx.account = Some(account);
                    match self
                        .guard
                        .admit(account, &cred.password, GuardScope::DIRECTORY, budget)
                        .await
                    {
                        Admission::Go(t) => *ticket = Some(t),
                        other => {
                            self.put_back(conn);
                            return Step::done(take(ctx).answered_by_guard(other));
                        }
                    }
                }
            }
            if self.cfg.read_lockout_state {
                if let Some(e) = &entry {
                    // Other checks' attempts in flight for this account count as failures.
                    let others = match ctx.account {
                        Some(a) => match self.guard.state(a).await {
                            Ok(s) => Some(u64::from(s.in_flight.saturating_sub(1))),
                            Err(_) => None,
                        },
                        None => Some(0),
                    };
                    let read = match others {
                        Some(n) => self.lockout_state(&mut conn.ldap, budget, e, n).await,
                        None => Ok(Some(unreadable("the lockout guard cannot count attempts in flight"))),
                    };
                    match read {
                        Ok(Some(f)) => {
                            self.put_back(conn);
                            // Nothing was sent: the reservation is released.
                            return Step::done(take(ctx).failed(f));
                        }
                        Ok(None) => {}
                        Err(e) => return op_failed(ctx, e, "lockout state read", true),
                    }
                }
            }
        }
        if ctx.read_only {
            // No bind from here: the state was read and allows the other protocol's attempt,
            // or no entry was found to read it from (refused: never fail open).
            self.put_back(conn);
            let ctx = take(ctx);
            return Step::done(match entry {
                Some(_) => ctx.read_ok(),
                None => ctx.failed(unreadable("the account's entry was not found")),
            });
        }

        // The bind itself, with the password-policy request control, under the reservation.
        let Some(t) = ticket.as_mut() else {
            return Step::done(take(ctx).failed(Finding::new(
                Cause::DirectoryError,
                "internal error: no lockout-guard reservation for the bind; not binding",
            )));
        };
        let identity = ctx.facts.bind_identity.clone();
        t.sending();
        let bind = conn
            .ldap
            .with_controls(ppolicy_request())
            .simple_bind(&identity, cred.password.expose());
        let r = match self.op(budget, bind).await {
            Ok(r) => r,
            Err(OpError::NotSent(e)) => {
                // Never handed to the connection: the same reservation may try a fresh one.
                tracing::debug!(error = %e, "bind not sent");
                t.not_sent();
                return Step::Retry;
            }
            Err(e) => {
                // Sent, no answer: it counts, and is never resent.
                let step = op_failed(ctx, e, "bind", true);
                if let (Step::Done(o), Some(t)) = (&step, ticket.take()) {
                    let f = o.findings.first().cloned().unwrap_or_else(|| {
                        Finding::new(Cause::DirectoryTimeout, "the directory did not answer the bind")
                    });
                    t.finish(Outcome::Unknown(f.with("attempt_counted", true))).await;
                }
                return step;
            }
        };
        self.put_back(conn);
        let pp = r
            .ctrls
            .iter()
            .find(|c| c.1.ctype == OID_PASSWORD_POLICY)
            .and_then(|c| c.1.val.as_deref())
            .map(|v| {
                ppolicy::decode(v).inspect_err(|e| {
                    tracing::debug!(error = %e, "undecodable password-policy response control");
                })
            });
        let pp = pp.and_then(Result::ok).unwrap_or_default();
        tracing::debug!(server = %server, identity = %identity, rc = r.rc, "bind answered");
        ctx.facts.ldap_result_code = Some(r.rc);
        ctx.facts.diagnostic_message = r.text.clone();
        let data = if r.rc == 49 { ad::parse_data_code(&r.text) } else { None };
        ctx.facts.ad_data_code = data.clone().unwrap_or_default();
        let (outcome, guard_outcome) = judge(take(ctx), r.rc, &r.text, data.as_deref(), pp);
        if let Some(t) = ticket.take() {
            t.finish(guard_outcome).await;
        }
        Step::done(outcome)
    }

    /// Reads the failure count and the threshold (the account's own policy first: an AD PSO
    /// through `msDS-ResultantPSO`, an OpenLDAP `pwdPolicySubentry`); a finding when one more
    /// bad bind, counting `others` in flight, could lock, or when the threshold cannot be read.
    async fn lockout_state(
        &self,
        ldap: &mut Ldap,
        budget: &Budget,
        e: &EntryInfo,
        others: u64,
    ) -> Result<Option<Finding>, OpError> {
        // Active Directory: badPwdCount on the entry; the threshold of the resultant PSO, else
        // lockoutThreshold on the domain object.
        if let Some(count) = e.first("badPwdCount").and_then(|v| v.trim().parse::<u64>().ok()) {
            let read_threshold = |entries: &[EntryInfo], attr: &str| {
                entries
                    .first()
                    .and_then(|d| d.first(attr))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            let (threshold, source) = if let Some(pso) = e.first("msDS-ResultantPSO") {
                let (p, _, _) = self
                    .search(
                        ldap,
                        budget,
                        &pso,
                        Scope::Base,
                        "(objectClass=*)",
                        &["msDS-LockoutThreshold"],
                    )
                    .await?;
                (
                    read_threshold(&p, "msDS-LockoutThreshold"),
                    "badPwdCount/msDS-LockoutThreshold (PSO)",
                )
            } else {
                let (root, _, _) = self
                    .search(
                        ldap,
                        budget,
                        "",
                        Scope::Base,
                        "(objectClass=*)",
                        &["defaultNamingContext"],
                    )
                    .await?;
                match root.first().and_then(|r| r.first("defaultNamingContext")) {
                    Some(nc) => {
                        let (d, _, _) = self
                            .search(ldap, budget, &nc, Scope::Base, "(objectClass=*)", &["lockoutThreshold"])
                            .await?;
                        (read_threshold(&d, "lockoutThreshold"), "badPwdCount/lockoutThreshold")
                    }
                    None => (None, "badPwdCount/lockoutThreshold"),
                }
            };
            let Some(threshold) = threshold else {
                return Ok(Some(
                    unreadable("no lockout threshold readable").with("lockout_state_source", source),
                ));
            };
            return Ok(refuse_near_threshold(count, others, threshold, source));
        }
        // OpenLDAP ppolicy: pwdFailureTime values, pwdMaxFailure on the policy entry.
        let failures = e.count("pwdFailureTime") as u64;
        let policy = e
            .first("pwdPolicySubentry")
            .or_else(|| self.cfg.default_policy_dn.clone());
        if let Some(policy) = policy {
            let (p, _, _) = self
                .search(
                    ldap,
                    budget,
                    &policy,
                    Scope::Base,
                    "(objectClass=*)",
                    &["pwdMaxFailure", "pwdLockout"],
                )
                .await?;
            let Some(p) = p.first() else {
                return Ok(Some(
                    unreadable("the password policy entry cannot be read").with("policy_dn", &policy),
                ));
            };
            let lockout = p.first("pwdLockout").is_some_and(|v| v.eq_ignore_ascii_case("TRUE"));
            if lockout {
                let Some(max) = p.first("pwdMaxFailure").and_then(|v| v.trim().parse().ok()) else {
                    return Ok(Some(unreadable("pwdMaxFailure is missing").with("policy_dn", &policy)));
                };
                return Ok(refuse_near_threshold(
                    failures,
                    others,
                    max,
                    "pwdFailureTime/pwdMaxFailure",
                ));
            }
        }
        Ok(None)
    }
}

fn refuse_near_threshold(count: u64, in_flight: u64, threshold: u64, source: &str) -> Option<Finding> {
    (threshold > 0 && count + in_flight + 1 >= threshold).then(|| {
        Finding::new(
            Cause::CredLockoutGuard,
            format!(
                "password not tried: the account already has {count} failed logons ({in_flight} more in \
                 flight) and locks at {threshold}; one more bad password could lock it"
            ),
        )
        .with("bad_password_count", count)
        .with("in_flight", in_flight)
        .with("lockout_threshold", threshold)
        .with("lockout_state_source", source)
    })
}

/// Maps a bind answer to the outcome and to what the lockout guard records.
fn judge(ctx: Ctx, rc: u32, text: &str, data: Option<&str>, pp: PpolicyResponse) -> (CredentialOutcome, Outcome) {
    let with_pp = |mut f: Finding| {
        if let Some(e) = pp.error {
            f = f.with("ppolicy_error", e);
        }
        if let Some(w) = pp.warning {
            f = f.with("ppolicy_warning", w);
        }
        f
    };
    let proven_unusable = |ctx: Ctx, f: Finding| {
        let f = ctx.evidence(f);
        let o = ctx.failed_raw(f.clone());
        (
            o,
            Outcome::Proven {
                findings: vec![f],
                usable: false,
            },
        )
    };
    if rc == 0 {
        if pp.error == Some(PpolicyError::ChangeAfterReset) {
            let f = with_pp(Finding::new(
                Cause::CredPasswordMustChange,
                "the password is right but must be changed before use (the directory reset it)",
            ));
            return proven_unusable(ctx, f);
        }
        if pp.error == Some(PpolicyError::PasswordExpired) {
            let f = with_pp(Finding::new(Cause::CredPasswordExpired, "the password has expired"));
            return proven_unusable(ctx, f);
        }
        let mut findings = Vec::new();
        let detail = match pp.warning {
            Some(w) => {
                let msg = match w {
                    PpolicyWarning::TimeBeforeExpiration(s) => {
                        format!("bind succeeded; the password expires in {}", human_secs(s))
                    }
                    PpolicyWarning::GraceAuthNsRemaining(n) => {
                        format!("bind succeeded on a grace login: the password has expired, {n} grace logins left")
                    }
                };
                let f = ctx.evidence(with_pp(Finding::new(Cause::CredPasswordExpiring, msg.clone())));
                findings.push(f);
                msg
            }
            None => format!("bind succeeded as {}", ctx.facts.bind_identity),
        };
        let guard = Outcome::Proven {
            findings: findings.clone(),
            usable: true,
        };
        let outcome = CredentialOutcome {
            status: StageStatus::Ok,
            findings,
            facts: ctx.facts,
            bind_succeeded: true,
            detail,
            account: ctx.account,
            internal: None,
            service_ticket: None,
        };
        return (outcome, guard);
    }
    let (cause, msg, proven_right) = match rc {
        49 => match (data, pp.error) {
            (Some(code), _) if ad::cause_for_data_code(code).is_some() => {
                let cause = ad::cause_for_data_code(code).unwrap_or(Cause::CredInvalid);
                (cause, ad_message(cause), ad::proves_password_right(code))
            }
            (_, Some(PpolicyError::AccountLocked)) => (
                Cause::CredAccountLocked,
                "the account is locked (password policy)".to_string(),
                false,
            ),
            (_, Some(PpolicyError::PasswordExpired)) => (
                Cause::CredPasswordExpired,
                "the password has expired (password policy)".to_string(),
                true,
            ),
            (_, Some(PpolicyError::ChangeAfterReset)) => (
                Cause::CredPasswordMustChange,
                "the password must be changed (password policy)".to_string(),
                true,
            ),
            _ => (
                Cause::CredInvalid,
                "the directory rejected the password (invalid credentials): the stored password is stale or wrong"
                    .to_string(),
                false,
            ),
        },
        8 | 13 => (
            Cause::DirectoryConfidentialityRequired,
            format!(
                "the directory refuses simple binds without TLS (resultCode {rc}): use ldaps:// or StartTLS: {text}"
            ),
            false,
        ),
        _ => (
            Cause::DirectoryError,
            format!("the directory answered resultCode {rc}: {text}"),
            false,
        ),
    };
    let mut f = with_pp(Finding::new(cause, msg));
    if cause == Cause::DirectoryError || cause == Cause::DirectoryConfidentialityRequired {
        f = f.with("diagnostic_message", text);
    }
    if proven_right {
        return proven_unusable(ctx, f);
    }
    let f = ctx.evidence(f);
    let is_credential_failure = cause.number() / 50 == 12; // 600..=649
                                                           // A judgement of the credential is remembered for the password; any other answer still
                                                           // counts as a failed attempt (the directory may have counted it) but is not remembered.
    let guard = if is_credential_failure {
        Outcome::Refused(f.clone())
    } else {
        Outcome::Unknown(f.clone())
    };
    (ctx.failed_raw(f), guard)
}

/// The finding when the lockout state cannot be read: fail closed.
fn unreadable(why: &str) -> Finding {
    Finding::new(
        Cause::CredLockoutGuard,
        format!(
            "password not tried: the account's lockout state cannot be read ({why}); one more bad password \
             could lock it"
        ),
    )
    .with("lockout_state", "unreadable")
}

fn ad_message(cause: Cause) -> String {
    match cause {
        Cause::CredAccountNotFound => "no such account in the directory (AD data 525)",
        Cause::CredInvalid => {
            "the directory rejected the password (AD data 52e): the stored password is stale or wrong"
        }
        Cause::CredLogonHours => "the password is right but the account may not log on at this time (AD data 530)",
        Cause::CredWorkstationRestricted => {
            "the password is right but the account may not log on from here (AD data 531)"
        }
        Cause::CredPasswordExpired => "the password is right but has expired (AD data 532)",
        Cause::CredAccountDisabled => "the account is disabled (AD data 533)",
        Cause::CredTokenTooLarge => "the account is in too many groups: its token is too large (AD data 568)",
        Cause::CredAccountExpired => "the account has expired (AD data 701)",
        Cause::CredPasswordMustChange => "the password is right but must be changed at next logon (AD data 773)",
        Cause::CredAccountLocked => "the account is locked out (AD data 775)",
        _ => "the directory rejected the bind",
    }
    .to_string()
}

fn human_secs(s: i64) -> String {
    if s >= 86_400 {
        format!("{} days ({s}s)", s / 86_400)
    } else if s >= 3600 {
        format!("{} hours ({s}s)", s / 3600)
    } else {
        format!("{s}s")
    }
}

enum Step {
    Done(Box<CredentialOutcome>),
    Retry,
}

impl Step {
    fn done(o: CredentialOutcome) -> Step {
        Step::Done(Box::new(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Password;
    use std::time::Duration;

    #[test]
    fn identities() {
        assert_eq!(
            bind_identity(&BindAs::Upn, "alice", "example.test").as_deref(),
            Some("alice@example.test")
        );
        assert_eq!(
            bind_identity(&BindAs::Upn, "alice@x.test", "example.test").as_deref(),
            Some("alice@x.test")
        );
        assert_eq!(
            bind_identity(&BindAs::Downlevel, "alice", "EXAMPLE").as_deref(),
            Some("EXAMPLE\\alice")
        );
        let t = BindAs::Dn("uid={user},ou=people,dc=example,dc=test".into());
        assert_eq!(
            bind_identity(&t, "a,b=c", "").as_deref(),
            Some("uid=a\\,b\\=c,ou=people,dc=example,dc=test")
        );
        assert_eq!(bind_identity(&BindAs::Search, "a", ""), None);
        assert_eq!(
            fill("(uid={user})", "*)(x=*", "", escape::filter_value),
            "(uid=\\2a\\29\\28x=\\2a)"
        );
    }

    #[test]
    fn threshold() {
        assert!(refuse_near_threshold(2, 0, 3, "x").is_some());
        assert!(refuse_near_threshold(1, 0, 3, "x").is_none());
        // Attempts in flight count as failures.
        assert!(refuse_near_threshold(1, 1, 3, "x").is_some());
        assert!(refuse_near_threshold(9, 0, 0, "x").is_none());
    }

    #[tokio::test]
    async fn empty_password_is_missing_without_traffic() {
        // A server that would fail the test if contacted: port 1 on loopback, never dialled.
        let cfg = DirectoryFile {
            servers: vec!["ldap://127.0.0.1:1".into()],
            starttls: false,
            allow_plaintext: true,
            ..Default::default()
        }
        .validate()
        .expect("valid")
        .expect("some");
        let guard = Arc::new(Guard::memory(
            crate::guard::Limits::new(Duration::from_secs(900), 1, Duration::ZERO),
            100,
        ));
        let c = CredentialChecker::new(cfg, guard, identity::Domains::default());
        let cred = Credential {
            username: "alice".into(),
            domain: "".into(),
            password: Password::new(String::new()),
        };
        let o = c.check(&cred, &Budget::new(Duration::from_secs(1))).await;
        assert_eq!(o.findings[0].cause, Cause::CredMissing);
        assert!(o.facts.directory_server.is_empty() && o.facts.ldap_result_code.is_none());
        assert!(!o.bind_succeeded);
    }
}
