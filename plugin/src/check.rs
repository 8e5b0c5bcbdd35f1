//! One check: the target probe and the credential check run concurrently under one budget;
//! findings get their effective severity; the verdict and the primary cause follow.

use std::{sync::Arc, time::Duration};

use crate::{
    cause::{Cause, Severity, Stage},
    config::Config,
    credential::{Admission, CredentialChecker, CredentialOutcome, LockoutGuard},
    deadline::Budget,
    probe::{self, ProbeOutcome, ProbeRequest, Prober},
    report::{self, CredentialFacts, Finding, NlaFacts, Report, StageRecord, StageStatus},
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

/// Runs checks; one per process.
pub struct Checker {
    cfg: Arc<Config>,
    prober: Prober,
    credential: Option<CredentialChecker>,
    /// Lockout guard for NLA logons when no directory is configured (with one, the directory
    /// client's guard covers both).
    nla_guard: LockoutGuard,
}

/// What the NLA stage produced.
struct NlaResult {
    record: StageRecord,
    findings: Vec<Finding>,
    facts: NlaFacts,
}

impl Checker {
    /// Builds the prober (pin store) and the directory client from the config.
    pub fn new(cfg: Arc<Config>) -> Result<Checker, String> {
        let prober = Prober::new(cfg.clone())?;
        let credential = cfg.directory.clone().map(CredentialChecker::new);
        let nla_guard = LockoutGuard::new(cfg.nla_guard_window, cfg.nla_guard_max_distinct_failures);
        Ok(Checker {
            cfg,
            prober,
            credential,
            nla_guard,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Runs one check. Never fails: a target that fails is a DENY report.
    pub async fn check(&self, input: CheckInput) -> Report {
        let started_at = wall_clock();
        let budget = Budget::new(input.budget);
        let preq = ProbeRequest {
            host: input.host.clone(),
            port: input.port,
            expected_name: input.expected_name.clone(),
            requested: input.requested,
            minimum: input.minimum,
        };
        let (mut probe, cred) = tokio::join!(
            self.prober.probe(&preq, &budget),
            self.credential(input.credential.as_ref(), &budget)
        );
        let nla = self.nla(&input, &mut probe, cred.as_ref().map(|c| &c.0), &budget).await;
        self.finish(input, probe, cred, nla, budget, started_at)
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
            return skipped(StageStatus::NotRun, "an earlier stage denied the session".into());
        };
        let public_key = match x509_parser::parse_x509_certificate(cert) {
            Ok((_, c)) => c.public_key().subject_public_key.data.to_vec(),
            Err(_) => return skipped(StageStatus::NotRun, "server certificate unparsable".into()),
        };
        // Which credential, if any, the target may judge: never a second bad attempt in one
        // check, never past the lockout guard.
        let mut note = None;
        let logon = match (&input.credential, bind) {
            _ if !self.cfg.nla_logon => None,
            (None, _) => None,
            (Some(c), None) if c.password.is_empty() => {
                note = Some("no password: logon not attempted");
                None
            }
            (Some(c), None) => match self.nla_guard.admit(&c.username, &c.domain, &c.password) {
                Admission::Proceed => Some(c),
                _ => {
                    note = Some("lockout guard: logon not attempted");
                    None
                }
            },
            (Some(c), Some(b)) if b.bind_succeeded => Some(c),
            (Some(_), Some(_)) => {
                note = Some("directory bind did not succeed: logon not attempted");
                None
            }
        };
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let nla_input = crate::nla::NlaInput {
            server_public_key: &public_key,
            credential: logon,
            expected_computer: &input.expected_computer,
            clock_tolerance: self.cfg.nla_clock_tolerance,
            now_unix_ms,
        };
        let start = budget.elapsed();
        let out = crate::nla::run(&mut stream, &nla_input, budget, self.cfg.nla_timeout).await;
        if let (Some(c), true) = (logon, out.logon_attempted) {
            let guard = self
                .credential
                .as_ref()
                .map_or(&self.nla_guard, CredentialChecker::guard);
            match out
                .findings
                .iter()
                .find(|f| self.cfg.severity(f.cause) == Severity::Deny)
            {
                Some(f) if out.logon_failed => guard.record_failure(&c.username, &c.domain, &c.password, f),
                _ if !out.logon_failed => guard.record_success(&c.username, &c.domain),
                _ => {}
            }
        }
        let mut detail = out.detail;
        if let Some(n) = note {
            detail = format!("{detail}; {n}");
        }
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
                detail,
            },
            findings: out.findings,
            facts,
        }
    }

    async fn credential(
        &self,
        cred: Option<&Credential>,
        budget: &Budget,
    ) -> Option<(CredentialOutcome, Duration, Duration)> {
        let (cred, checker) = (cred?, self.credential.as_ref()?);
        let start = budget.elapsed();
        let outcome = checker.check(cred, budget).await;
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

fn wall_clock() -> (i64, u32) {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_nanos()),
        Err(_) => (0, 0),
    }
}

/// Re-exported for the service and CLI.
pub use probe::x224::protocol;
