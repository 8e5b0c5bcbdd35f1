//! One check: the target probe and the credential check run concurrently under one budget;
//! findings get their effective severity; the verdict and the primary cause follow.

use std::{sync::Arc, time::Duration};

use crate::{
    cause::{Cause, Severity, Stage},
    config::Config,
    credential::{CredentialChecker, CredentialOutcome},
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
}

impl Checker {
    /// Builds the prober (pin store) and the directory client from the config.
    pub fn new(cfg: Arc<Config>) -> Result<Checker, String> {
        let prober = Prober::new(cfg.clone())?;
        let credential = cfg.directory.clone().map(CredentialChecker::new);
        Ok(Checker {
            cfg,
            prober,
            credential,
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
        let (probe, cred) = tokio::join!(
            self.prober.probe(&preq, &budget),
            self.credential(input.credential.as_ref(), &budget)
        );
        self.finish(input, probe, cred, budget, started_at)
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
        // The TLS stream is not used further yet: closing it ends the connection cleanly.
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
                let why = if input.credential.is_none() {
                    "no credential in the request"
                } else {
                    "no directory configured"
                };
                let rec = StageRecord {
                    stage: Stage::Credential,
                    status: StageStatus::Skipped,
                    start: Duration::ZERO,
                    duration: Duration::ZERO,
                    detail: why.into(),
                };
                (rec, CredentialFacts::default())
            }
        };
        stages.push(cred_stage);
        stages.push(StageRecord {
            stage: Stage::Nla,
            status: StageStatus::Skipped,
            start: budget.elapsed(),
            duration: Duration::ZERO,
            detail: "NLA stage not enabled in this build".into(),
        });
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
            nla: NlaFacts::default(),
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
