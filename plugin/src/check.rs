//! One check: the target probe and the credential check run concurrently under one budget;
//! findings get their effective severity; the verdict and the primary cause follow.

use std::{sync::Arc, time::Duration};

use crate::{
    cause::{Cause, Severity, Stage},
    config::{Config, NlaAuth, NlaLogon},
    credential::{CredentialChecker, CredentialOutcome},
    deadline::Budget,
    guard::{Admission, Guard, Limits, Outcome},
    nla::{NlaOutcome, Session},
    probe::{self, pins::PinStatus, ProbeOutcome, ProbeRequest, Prober},
    report::{self, CredentialFacts, Finding, NlaFacts, Report, StageRecord, StageStatus},
    secret::Credential,
};

/// Accounts the in-process lockout guard holds at most.
pub const GUARD_CAPACITY: usize = 100_000;

pub use crate::report::CheckInput;

/// Our own side failed during a check: no verdict can be given.
#[derive(Debug)]
pub struct InternalError {
    /// What failed.
    pub message: String,
    /// The report as far as it got (for logs; not a verdict).
    pub report: Report,
}

/// Runs checks; one per process.
pub struct Checker {
    cfg: Arc<Config>,
    prober: Prober,
    credential: Option<Arc<CredentialChecker>>,
    /// The AS exchange, when `[kerberos]` is configured (it then proves the credential).
    kerberos: Option<crate::kerberos::KerberosChecker>,
    /// The one lockout guard: LDAP binds and NLA logons spend one budget per account.
    guard: Arc<Guard>,
}

/// What the NLA stage produced.
struct NlaResult {
    record: StageRecord,
    findings: Vec<Finding>,
    facts: NlaFacts,
    internal: Option<String>,
}

impl Checker {
    /// Builds the prober (pin store) and the directory client from the config, with the
    /// in-process lockout guard (the store, when configured, is opened by [`Checker::open`]).
    pub fn new(cfg: Arc<Config>) -> Result<Checker, String> {
        let guard = Arc::new(Guard::memory(guard_limits(&cfg), GUARD_CAPACITY));
        Checker::with_guard(cfg, guard)
    }

    /// As [`Checker::new`]; with `[store]`, opens the store (connects, migrates) and puts the
    /// lockout guard on it. Returns the store for health and metrics.
    pub async fn open(cfg: Arc<Config>) -> Result<(Checker, Option<Arc<crate::store::Store>>), String> {
        let Some(sc) = cfg.store.clone() else {
            return Ok((Checker::new(cfg)?, None));
        };
        let store = crate::store::Store::open(sc).await?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, store.hmac_key());
        let pg = crate::store::guard::PgGuardStore::new(store.clone(), guard_limits(&cfg));
        let guard = Arc::new(Guard::new(key, Arc::new(pg)));
        tracing::info!(store = %store.display(), "lockout guard on the shared store");
        let checker = Checker::build(cfg, guard, Some(store.clone()))?;
        Ok((checker, Some(store)))
    }

    /// A checker whose LDAP binds and NLA logons spend attempts through `guard`.
    pub fn with_guard(cfg: Arc<Config>, guard: Arc<Guard>) -> Result<Checker, String> {
        Checker::build(cfg, guard, None)
    }

    fn build(cfg: Arc<Config>, guard: Arc<Guard>, store: Option<Arc<crate::store::Store>>) -> Result<Checker, String> {
        let prober = Prober::with_store(cfg.clone(), store)?;
        let credential = cfg
            .directory
            .clone()
            .map(|d| Arc::new(CredentialChecker::new(d, guard.clone(), cfg.domains.clone())));
        let kerberos = cfg.kerberos.clone().filter(|k| k.credential_check).map(|k| {
            crate::kerberos::KerberosChecker::new(k, guard.clone(), cfg.domains.clone())
                .with_directory(credential.clone())
        });
        Ok(Checker {
            cfg,
            prober,
            credential,
            kerberos,
            guard,
        })
    }

    /// The lockout guard.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The configuration in force.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Runs one check. A target that fails is a DENY report; an internal error (our own side
    /// failed, the target is not to blame) comes out as the report so far (see [`Checker::run`]).
    pub async fn check(&self, input: CheckInput) -> Report {
        match self.run(input).await {
            Ok(r) => r,
            Err(e) => e.report,
        }
    }

    /// Runs one check: the report, or an internal error when our own side failed (an encoding
    /// or TLS library error, an "impossible" state). An internal error is never turned into a
    /// target cause: the gateway gets it as what it is.
    pub async fn run(&self, input: CheckInput) -> Result<Report, InternalError> {
        let started_at = wall_clock();
        let budget = Budget::new(input.budget);
        let preq = ProbeRequest {
            host: input.host.clone(),
            port: input.port,
            expected_name: input.expected_name.clone(),
            requested: input.requested,
            minimum: input.minimum,
            cookie: crate::probe::negotiate::cookie(
                input.credential.as_ref().map(|c| c.username.as_str()),
                self.cfg.cookie.as_deref(),
            ),
        };
        let (mut probe, cred) = tokio::join!(
            self.prober.probe(&preq, &budget),
            self.credential(input.credential.as_ref(), Some(&input.host), &budget)
        );
        let mut cred = cred;
        let mut nla = self.nla(&input, &mut probe, cred.as_ref().map(|c| &c.0), &budget).await;
        let internal = probe
            .internal
            .take()
            .or_else(|| nla.internal.take())
            .or_else(|| cred.as_mut().and_then(|c| c.0.internal.take()));
        let report = self.finish(input, probe, cred, nla, budget, started_at);
        match internal {
            None => Ok(report),
            Some(message) => Err(InternalError { message, report }),
        }
    }

    /// The NLA stage, on the TLS stage's stream, when the server selected HYBRID / HYBRID_EX.
    async fn nla(
        &self,
        input: &CheckInput,
        probe: &mut ProbeOutcome,
        bind: Option<&CredentialOutcome>,
        budget: &Budget,
    ) -> NlaResult {
        use crate::probe::x224::protocol;
        let skipped = |status: StageStatus, detail: String| NlaResult {
            record: StageRecord {
                stage: Stage::Nla,
                status,
                start: budget.elapsed(),
                duration: Duration::ZERO,
                detail,
            },
            findings: Vec::new(),
            facts: NlaFacts::default(),
            internal: None,
        };
        let selected = probe.facts.selected_protocol;
        if !self.cfg.nla_enabled {
            return skipped(StageStatus::Skipped, "nla.enabled = false".into());
        }
        if !matches!(selected, Some(protocol::HYBRID | protocol::HYBRID_EX)) {
            let why = match selected {
                Some(p) => format!("{} selected: no CredSSP", protocol::name(p)),
                None => "no protocol negotiated".into(),
            };
            return skipped(StageStatus::Skipped, why);
        }
        let (Some(mut stream), Some(cert)) = (probe.tls.take(), probe.server_cert.as_ref()) else {
            let why = if probe.internal.is_some() {
                "internal error"
            } else if probe.facts.certificate.is_none() || probe.facts.tls_version.is_empty() {
                "the TLS stage did not complete"
            } else {
                "an earlier stage denied the session"
            };
            return skipped(StageStatus::NotRun, why.into());
        };
        let public_key = match x509_parser::parse_x509_certificate(cert) {
            Ok((_, c)) => c.public_key().subject_public_key.data.to_vec(),
            Err(_) => return skipped(StageStatus::NotRun, "server certificate unparsable".into()),
        };
        let wanted = input
            .credential
            .as_ref()
            .filter(|_| self.cfg.nla_logon != NlaLogon::Off);
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let nla_input = crate::nla::NlaInput {
            server_public_key: &public_key,
            credential: wanted,
            expected_computer: &input.expected_computer,
            clock_tolerance: self.cfg.nla_clock_tolerance,
            now_unix_ms,
        };
        let start = budget.elapsed();
        // Kerberos when asked for and the credential stage obtained the service ticket: no
        // NTLM message at all, no password attempt.
        let ticket = bind
            .filter(|b| b.bind_succeeded && self.cfg.nla_auth != NlaAuth::Ntlm)
            .and_then(|b| b.service_ticket.clone())
            .filter(|_| wanted.is_some_and(|c| !c.password.is_empty()));
        let out = match ticket {
            Some(t) => crate::nla::kerberos_logon(&mut stream, &nla_input, t, budget, self.cfg.nla_timeout).await,
            None => match crate::nla::hello(&mut stream, &nla_input, budget, self.cfg.nla_timeout).await {
                Ok(session) => {
                    self.logon(session, &mut stream, &nla_input, input, probe, bind, budget)
                        .await
                }
                Err(out) => out,
            },
        };
        let mut facts = out.facts;
        if facts.logon.is_empty() {
            facts.logon = "not_attempted".into();
        }
        NlaResult {
            record: StageRecord {
                stage: Stage::Nla,
                status: out.status,
                start,
                duration: budget.elapsed().saturating_sub(start),
                detail: out.detail,
            },
            findings: out.findings,
            facts,
            internal: out.internal,
        }
    }

    /// After the CHALLENGE: whether the target may judge the credential, under the lockout
    /// guard's reservation. Never a logon towards a target that has not proven who it is
    /// (`nla.logon = "auto"`), never past the guard, never after a failed directory bind.
    #[allow(clippy::too_many_arguments)]
    async fn logon(
        &self,
        mut session: Session,
        stream: &mut crate::probe::TlsStream,
        nla_input: &crate::nla::NlaInput<'_>,
        input: &CheckInput,
        probe: &ProbeOutcome,
        bind: Option<&CredentialOutcome>,
        budget: &Budget,
    ) -> NlaOutcome {
        let Some(c) = nla_input.credential else {
            let why = match (&input.credential, self.cfg.nla_logon) {
                (Some(_), NlaLogon::Off) => "nla.logon = off: logon not attempted",
                _ => "no credential: logon not attempted",
            };
            return session.without_logon(stream, budget, why).await;
        };
        if c.password.is_empty() {
            return session
                .without_logon(stream, budget, "no password: logon not attempted")
                .await;
        }
        if session
            .so_far()
            .findings
            .iter()
            .any(|f| f.cause == Cause::TargetIdentityMismatch)
        {
            return session
                .without_logon(
                    stream,
                    budget,
                    "logon not attempted: the target is not the expected computer",
                )
                .await;
        }
        if bind.is_some_and(|b| !b.bind_succeeded) {
            return session
                .without_logon(stream, budget, "directory bind did not succeed: logon not attempted")
                .await;
        }
        // Kerberos was preferred but there is no ticket: never NTLM with `kerberos`, NTLM with
        // the reason recorded with `negotiate`.
        let fallback = match self.cfg.nla_auth {
            NlaAuth::Ntlm => None,
            NlaAuth::Kerberos => {
                let why = self.no_ticket_reason(bind);
                let mut out = session
                    .without_logon(
                        stream,
                        budget,
                        &format!("nla.auth = kerberos and {why}: logon not attempted (never NTLM)"),
                    )
                    .await;
                out.facts.auth_fallback = format!("none: {why}");
                return out;
            }
            NlaAuth::Negotiate => Some(self.no_ticket_reason(bind)),
        };
        let proven_by = match self.cfg.nla_logon {
            NlaLogon::Always => "nla.logon = always",
            _ => match target_authenticated(probe, input, session.so_far()) {
                Ok(how) => how,
                Err(why) => {
                    return session
                        .without_logon(stream, budget, &format!("logon not attempted: {why}"))
                        .await
                }
            },
        };
        // The account: the directory's key when it checked the credential, else the (user,
        // domain) pair with the target's own domain for `.` and an empty one.
        let account = match bind.and_then(|b| b.account) {
            Some(a) => a,
            None => {
                let f = &session.so_far().facts;
                let own = if f.dns_domain.is_empty() {
                    &f.netbios_domain
                } else {
                    &f.dns_domain
                };
                let canonical = self
                    .cfg
                    .domains
                    .account(&c.username, &c.domain, own)
                    .unwrap_or_else(|_| format!("{}@{}", c.username, c.domain).to_lowercase());
                self.guard.account(&canonical)
            }
        };
        let target = probe
            .facts
            .connected
            .map_or_else(|| format!("{}:{}", input.host, input.port), |a| a.to_string());
        let scope = self.guard.target_scope(&target);
        match self.guard.admit(account, &c.password, scope, budget).await {
            Admission::Go(mut ticket) => {
                ticket.sending();
                let mut out = session.logon(stream, nla_input, budget).await;
                let outcome = guard_outcome(&out);
                ticket.finish(outcome).await;
                out.detail = format!("{} (target authenticated: {proven_by})", out.detail);
                if let Some(why) = fallback {
                    out.detail = format!("{}; NTLM instead of Kerberos: {why}", out.detail);
                    out.facts.auth_fallback = why;
                }
                out
            }
            Admission::Remembered(f) => {
                session.push(f.at(Stage::Nla));
                session
                    .without_logon(
                        stream,
                        budget,
                        "lockout guard: this password already failed for the account; logon not attempted",
                    )
                    .await
            }
            Admission::Refused(f) => {
                session.push(f.at(Stage::Nla));
                session
                    .without_logon(stream, budget, "lockout guard: logon not attempted")
                    .await
            }
            Admission::Proven { findings, usable } => {
                for f in findings {
                    session.push(f);
                }
                let mut out = session
                    .without_logon(
                        stream,
                        budget,
                        "logon proven by a concurrent check's attempt with the same password on this target",
                    )
                    .await;
                out.facts.logon = if usable { "accepted" } else { "refused" }.into();
                out
            }
        }
    }

    /// Why the NLA logon has no Kerberos ticket to use.
    fn no_ticket_reason(&self, bind: Option<&CredentialOutcome>) -> String {
        let Some(k) = self.cfg.kerberos.as_ref() else {
            return "Kerberos is not configured".into();
        };
        if !k.credential_check {
            return "kerberos.credential_check = false: no ticket".into();
        }
        if !k.spn_check {
            return "kerberos.spn_check = false: no service ticket asked for".into();
        }
        match bind {
            Some(b) => match b.findings.iter().find(|f| f.cause == Cause::TargetSpnMissing) {
                Some(f) => {
                    let p = f
                        .evidence
                        .iter()
                        .find(|(k, _)| k == "principal")
                        .map_or("TERMSRV/<host>", |(_, v)| v.as_str());
                    format!("the KDC has no {p} (TARGET_SPN_MISSING)")
                }
                None if b.bind_succeeded => "the KDC issued no service ticket (see the credential stage)".into(),
                None => "the AS exchange did not succeed".into(),
            },
            None => "no credential check ran".into(),
        }
    }

    async fn credential(
        &self,
        cred: Option<&Credential>,
        host: Option<&str>,
        budget: &Budget,
    ) -> Option<(CredentialOutcome, Duration, Duration)> {
        let cred = cred?;
        let start = budget.elapsed();
        // Kerberos, when configured, proves the password; else the LDAP bind.
        let outcome = match (&self.kerberos, &self.credential) {
            (Some(k), _) => k.check(cred, host, budget).await,
            (None, Some(c)) => c.check(cred, budget).await,
            (None, None) => return None,
        };
        Some((outcome, start, budget.elapsed().saturating_sub(start)))
    }

    fn finish(
        &self,
        input: CheckInput,
        probe: ProbeOutcome,
        cred: Option<(CredentialOutcome, Duration, Duration)>,
        nla: NlaResult,
        budget: Budget,
        started_at: (i64, u32),
    ) -> Report {
        let ProbeOutcome {
            findings: mut all,
            mut stages,
            facts,
            tls,
            server_cert: _,
            pin: _,
            internal: _,
        } = probe;
        // Whatever the NLA stage did not take is closed here.
        drop(tls);
        let (cred_stage, cred_facts) = match cred {
            Some((c, start, duration)) => {
                all.extend(c.findings);
                let rec = StageRecord {
                    stage: Stage::Credential,
                    status: c.status,
                    start,
                    duration,
                    detail: c.detail,
                };
                (rec, c.facts)
            }
            None => {
                // Without a directory an empty password is still a credential that cannot work.
                let missing = input.credential.as_ref().filter(|c| c.password.is_empty());
                if let Some(c) = missing {
                    all.push(
                        Finding::new(
                            Cause::CredMissing,
                            "the request carries no password for the target account",
                        )
                        .with("account", &c.username),
                    );
                }
                let why = match (&input.credential, missing) {
                    (None, _) => "no credential in the request",
                    (Some(_), Some(_)) => "empty password: nothing to check",
                    (Some(_), None) => "no directory configured",
                };
                let rec = StageRecord {
                    stage: Stage::Credential,
                    status: if missing.is_some() {
                        StageStatus::Failed
                    } else {
                        StageStatus::Skipped
                    },
                    start: Duration::ZERO,
                    duration: Duration::ZERO,
                    detail: why.into(),
                };
                (rec, CredentialFacts::default())
            }
        };
        stages.push(cred_stage);
        stages.push(nla.record);
        all.extend(nla.findings);
        let mut cred_facts = cred_facts;
        if cred_facts.checked_by.is_empty() && matches!(nla.facts.logon.as_str(), "accepted" | "refused") {
            cred_facts.checked_by = "nla".into();
        }
        stages.sort_by_key(|s| s.stage);
        // A deadline reported by both branches is one finding.
        let mut seen_deadline = false;
        all.retain(|f| f.cause != Cause::CheckDeadlineExceeded || !std::mem::replace(&mut seen_deadline, true));
        let mut findings: Vec<(Finding, Severity)> = all
            .into_iter()
            .map(|f| {
                let s = self.cfg.severity(f.cause);
                (f, s)
            })
            .collect();
        let (verdict, primary_cause) = report::judge(&mut findings);
        Report {
            check_id: ulid::Ulid::new().to_string(),
            request_id: input.request_id,
            verdict,
            primary_cause,
            findings,
            stages,
            target: facts,
            credential: cred_facts,
            nla: nla.facts,
            started_at,
            duration: budget.elapsed(),
        }
    }
}

/// The guard's limits: with a directory, its settings; without one, the NLA stage's.
fn guard_limits(cfg: &Config) -> Limits {
    match &cfg.directory {
        Some(d) => Limits::new(d.guard_window, d.guard_max_distinct_failures, d.success_cache_ttl),
        None => Limits::new(
            cfg.nla_guard_window,
            cfg.nla_guard_max_distinct_failures,
            Duration::ZERO,
        ),
    }
}

/// How the target proved who it is, or why it did not.
fn target_authenticated(
    probe: &ProbeOutcome,
    input: &CheckInput,
    so_far: &NlaOutcome,
) -> Result<&'static str, &'static str> {
    let verified = probe
        .facts
        .certificate
        .as_ref()
        .is_some_and(|c| c.verifier_verdict == probe::cert::TRUSTED)
        && !probe.findings.iter().any(|f| f.cause == Cause::CertNameMismatch);
    if verified {
        return Ok("certificate verified");
    }
    if probe.pin == PinStatus::Matched {
        return Ok("certificate pin matched");
    }
    if !input.expected_computer.trim().is_empty()
        && !so_far.findings.iter().any(|f| f.cause == Cause::TargetIdentityMismatch)
    {
        return Ok("expected computer matched");
    }
    Err(
        "the target has not proven who it is (its certificate does not verify against the trust \
         anchors, no pin recorded earlier matched, and the request names no expected_computer); \
         set nla.logon = \"always\" to log on anyway",
    )
}

/// What an NLA logon means for the lockout guard (independent of severity overrides).
fn guard_outcome(out: &NlaOutcome) -> Outcome {
    if !out.logon_attempted {
        return Outcome::NotSent;
    }
    if !out.logon_failed {
        return Outcome::Proven {
            findings: Vec::new(),
            usable: true,
        };
    }
    let f =
        out.findings.last().cloned().unwrap_or_else(|| {
            Finding::new(Cause::NlaLogonFailed, "the target did not accept the logon").at(Stage::Nla)
        });
    match out.facts.ntstatus {
        Some(s) if crate::nla::refuses_ntlm(s) => Outcome::Released,
        Some(s) if crate::nla::proves_password_right(s) => Outcome::Proven {
            findings: vec![f],
            usable: false,
        },
        _ if out.facts.logon == "no_answer" => Outcome::Unknown(f),
        _ if f.evidence.iter().any(|(k, _)| k == "possible_interception") => Outcome::Unknown(f),
        _ => Outcome::Refused(f),
    }
}

/// Checks a request's credential before any check: `Err` names the field.
pub fn validate_credential(cfg: &Config, c: &Credential) -> Result<(), (&'static str, String)> {
    cfg.domains
        .split(&c.username, &c.domain)
        .map(|_| ())
        .map_err(|e| ("credential.domain", e.to_string()))
}

fn wall_clock() -> (i64, u32) {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_nanos()),
        Err(_) => (0, 0),
    }
}

/// Re-exported for the service and CLI.
pub use probe::x224::protocol;
