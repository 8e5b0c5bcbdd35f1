//! The gRPC service: the only module that sees protobuf types.
//!
//! Validation errors are `INVALID_ARGUMENT` with a `BadRequest` detail naming each field; a
//! failed target is an OK answer carrying a DENY report; overload is `RESOURCE_EXHAUSTED`.

use std::{sync::Arc, time::Duration};

use rdp_preflight_proto::v1 as pb;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    audit::{AuditLog, AuditRecord},
    cause::{self, Cause, Stage, CATALOG},
    check::{CheckInput, Checker},
    config::Config,
    fleet::{Filter, Fleet},
    history::{Entry, History, Source},
    metrics::Metrics,
    probe::x224::protocol,
    report::{Report, StageStatus, Verdict},
    secret::{Credential, Password},
};

/// Longest host name (RFC 1035) and other string limits.
const MAX_HOST: usize = 253;
const MAX_ID: usize = 128;
const MAX_NAME: usize = 256;
const MAX_PASSWORD: usize = 1024;

/// The `preflight.v1.Preflight` implementation.
pub struct PreflightService {
    checker: Arc<Checker>,
    admission: Arc<Semaphore>,
    running: Arc<Semaphore>,
    audit: Option<AuditLog>,
    metrics: Arc<Metrics>,
    fleet: Arc<Fleet>,
    /// History writes in flight: bounded, so that a slow store cannot pile up tasks.
    history_writes: Arc<Semaphore>,
}

/// History writes in flight at most; beyond, an outcome is dropped and counted.
pub const MAX_HISTORY_WRITES: usize = 1024;

impl PreflightService {
    /// A service running checks on `checker`, with the config's admission limits, recording to
    /// `audit` what its config asks for.
    pub fn new(checker: Arc<Checker>, audit: Option<AuditLog>, metrics: Arc<Metrics>, fleet: Arc<Fleet>) -> Self {
        let cfg = checker.config();
        PreflightService {
            admission: Arc::new(Semaphore::new(cfg.max_concurrent_checks + cfg.max_queued_checks)),
            running: Arc::new(Semaphore::new(cfg.max_concurrent_checks)),
            checker,
            audit,
            metrics,
            fleet,
            history_writes: Arc::new(Semaphore::new(MAX_HISTORY_WRITES)),
        }
    }
}

#[tonic::async_trait]
impl pb::preflight_server::Preflight for PreflightService {
    async fn check(&self, request: Request<pb::CheckRequest>) -> Result<Response<pb::CheckReport>, Status> {
        let cfg = self.checker.config().clone();
        let deadline = grpc_timeout(request.metadata());
        let input = validate(request.into_inner(), &cfg, deadline)
            .inspect_err(|_| self.metrics.rejected("invalid_argument"))?;
        let Ok(_queued) = self.admission.clone().try_acquire_owned() else {
            self.metrics.rejected("overloaded");
            return Err(Status::resource_exhausted("too many checks in flight; retry later"));
        };
        let tracked = self.metrics.track();
        let recorded = self.audit.as_ref().map(|_| input.clone());
        let (host, port) = (input.host.clone(), input.port);
        let account = input.credential.as_ref().map(crate::history::account_label);
        let _slot = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let span = tracing::info_span!("check", request_id = %input.request_id, host = %input.host, port = input.port);
        let report = match tracing::Instrument::instrument(self.checker.run(input), span.clone()).await {
            Ok(r) => r,
            Err(e) => {
                // Our own side failed: not a verdict about the target.
                self.metrics.rejected("internal");
                span.in_scope(
                    || tracing::error!(check_id = %e.report.check_id, error = %e.message, "check failed internally"),
                );
                return Err(Status::internal(format!("internal error: {}", e.message)));
            }
        };
        // A DENY is on disk before the answer leaves; if it cannot be, the gateway gets an
        // error, never an unrecorded verdict.
        if let (Some(audit), Some(input)) = (&self.audit, recorded) {
            if audit.wants(report.verdict) {
                let t0 = std::time::Instant::now();
                let written = audit.record(AuditRecord::new(&input, &report)).await;
                self.metrics.audit_write(t0.elapsed(), written.is_ok());
                if let Err(e) = written {
                    span.in_scope(
                        || tracing::error!(check_id = %report.check_id, error = %e, "audit record not written"),
                    );
                    return Err(Status::unavailable(
                        "the audit log cannot be written: no verdict is given",
                    ));
                }
            }
        }
        tracked.finish(&report);
        if cfg.otel.is_some() {
            crate::otel::record_check(&report);
        }
        match self.history_writes.clone().try_acquire_owned() {
            Ok(permit) => record_history(
                self.fleet.history(),
                Entry::new(&report, &host, port, account, Source::Gateway),
                Some(permit),
            ),
            Err(_) => {
                self.metrics.history_dropped();
                tracing::warn!(check_id = %report.check_id, "check history backed up: outcome not kept");
            }
        }
        span.in_scope(|| {
            tracing::info!(
                check_id = %report.check_id,
                verdict = report.verdict.as_str(),
                primary_cause = report.primary_cause.name(),
                duration_ms = report.duration.as_millis() as u64,
                "check finished"
            );
        });
        Ok(Response::new(to_proto(&report)))
    }

    async fn fleet_status(
        &self,
        request: Request<pb::FleetStatusRequest>,
    ) -> Result<Response<pb::FleetStatusResponse>, Status> {
        let req = request.into_inner();
        let mut v: Vec<(String, String)> = Vec::new();
        for (k, val) in &req.labels {
            if k.is_empty() || k.len() > MAX_NAME || val.len() > MAX_NAME || !printable(k) || !printable(val) {
                v.push((
                    format!("labels[{k:?}]"),
                    "keys and values of 1..256 printable characters".into(),
                ));
            }
        }
        let cause = match req.cause {
            0 => None,
            n => match u16::try_from(n).ok().and_then(Cause::from_number) {
                Some(c) => Some(c.name().to_owned()),
                None => {
                    v.push(("cause".into(), "unknown cause".into()));
                    None
                }
            },
        };
        if !v.is_empty() {
            return Err(invalid(&v));
        }
        let filter = Filter {
            labels: req.labels.into_iter().collect(),
            cause,
        };
        let status = self.fleet.status(&filter).await.map_err(|e| {
            tracing::warn!(error = %e, "fleet status: history not readable");
            Status::unavailable("the check history cannot be read")
        })?;
        Ok(Response::new(fleet_to_proto(&status, self.fleet.config())))
    }

    async fn target_history(
        &self,
        request: Request<pb::TargetHistoryRequest>,
    ) -> Result<Response<pb::TargetHistoryResponse>, Status> {
        let req = request.into_inner();
        let mut v: Vec<(String, String)> = Vec::new();
        let target = split_target(&req.target, self.fleet.default_port()).filter(|(h, _)| host_syntax_ok(h));
        if req.target.is_empty() {
            v.push(("target".into(), "required".into()));
        } else if target.is_none() {
            v.push(("target".into(), "not host:port, [v6]:port or a host name".into()));
        }
        if req.page_size > 1000 {
            v.push(("page_size".into(), "at most 1000".into()));
        }
        if req.page_token.len() > MAX_ID || !req.page_token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            v.push(("page_token".into(), "not a token from a previous answer".into()));
        }
        let Some((host, port)) = target.filter(|_| v.is_empty()) else {
            return Err(invalid(&v));
        };
        let size = if req.page_size == 0 { 50 } else { req.page_size as usize };
        let before = Some(req.page_token.as_str()).filter(|t| !t.is_empty());
        let key = crate::history::target_key(&host, port);
        let mut entries = self.fleet.history().target(&key, before, size + 1).await.map_err(|e| {
            tracing::warn!(error = %e, "target history: history not readable");
            Status::unavailable("the check history cannot be read")
        })?;
        let more = entries.len() > size;
        entries.truncate(size);
        Ok(Response::new(pb::TargetHistoryResponse {
            next_page_token: if more {
                entries.last().map(|e| e.check_id.clone()).unwrap_or_default()
            } else {
                String::new()
            },
            entries: entries.iter().map(entry_to_proto).collect(),
        }))
    }

    async fn list_causes(
        &self,
        _request: Request<pb::ListCausesRequest>,
    ) -> Result<Response<pb::ListCausesResponse>, Status> {
        let cfg = self.checker.config();
        let causes = CATALOG
            .iter()
            .map(|c| pb::CauseInfo {
                cause: c.number.into(),
                number: c.number.into(),
                name: c.name.to_owned(),
                stage: stage(c.stage).into(),
                default_severity: severity(c.severity).into(),
                severity: severity(cfg.severity(c.cause)).into(),
                detection: c.detection.to_owned(),
                client_error: Some(client_error(c)),
                owner: owner(c.owner).into(),
                remediation: c.remediation.to_owned(),
            })
            .collect();
        Ok(Response::new(pb::ListCausesResponse { causes }))
    }
}

/// `INVALID_ARGUMENT` naming each bad field.
fn invalid(v: &[(String, String)]) -> Status {
    let msg = format!(
        "invalid request: {}",
        v.iter()
            .map(|(f, w)| format!("{f}: {w}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut details = ErrorDetails::new();
    for (f, w) in v {
        details.add_bad_request_violation(f.clone(), w.clone());
    }
    Status::with_error_details(tonic::Code::InvalidArgument, msg, details)
}

fn proto_cause(name: &str) -> i32 {
    Cause::from_name(name).map_or(0, |c| i32::from(c.number()))
}

fn proto_verdict(v: &str) -> i32 {
    match v {
        "allow" => pb::Verdict::Allow,
        "allow_with_warnings" => pb::Verdict::AllowWithWarnings,
        "deny" => pb::Verdict::Deny,
        _ => pb::Verdict::Unspecified,
    }
    .into()
}

fn ts_ms(ms: i64) -> pbjson_types::Timestamp {
    ts(
        ms.div_euclid(1000),
        u32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    )
}

/// The fleet's state in its protobuf form.
pub fn fleet_to_proto(s: &crate::fleet::Status, cfg: &crate::history::HistoryConfig) -> pb::FleetStatusResponse {
    let window = cfg.flap_window.as_secs();
    pb::FleetStatusResponse {
        targets: s
            .targets
            .iter()
            .map(|t| {
                let st = &t.state;
                pb::TargetStatus {
                    target: st.target.clone(),
                    verdict: proto_verdict(&st.verdict),
                    primary_cause: proto_cause(&st.primary_cause),
                    causes: st.causes.iter().map(|c| proto_cause(c)).collect(),
                    // Never checked (an inventory row only): no times.
                    since: (st.last_ms != 0).then(|| ts_ms(st.since_ms)),
                    since_exact: st.since_exact,
                    last_checked: (st.last_ms != 0).then(|| ts_ms(st.last_ms)),
                    changes: st.changes,
                    flapping: st.flapping,
                    cert_days_left: st.cert_days_left(s.as_of_ms),
                    cert_not_after: st.cert_not_after.map(|t| ts(t, 0)),
                    labels: t.labels.clone().into_iter().collect(),
                    in_inventory: t.in_inventory,
                }
            })
            .collect(),
        findings: s
            .targets
            .iter()
            .filter(|t| t.state.flapping)
            .map(|t| pb::FleetFinding {
                kind: "flapping".into(),
                target: t.state.target.clone(),
                message: format!(
                    "{} changed state {} times within {} h (more than {}): {}",
                    t.state.target,
                    t.state.changes,
                    window / 3600,
                    cfg.flap_changes,
                    t.state.sequence.join(" → ")
                ),
                evidence: [
                    ("changes", t.state.changes.to_string()),
                    ("window_seconds", window.to_string()),
                    ("cause_sequence", t.state.sequence.join(",")),
                ]
                .into_iter()
                .map(|(k, v)| pb::Evidence {
                    key: k.into(),
                    value: v,
                })
                .collect(),
            })
            .collect(),
        trend: s
            .trend
            .iter()
            .map(|b| pb::CauseTrend {
                hour: Some(ts_ms(b.hour_ms)),
                cause: proto_cause(&b.cause),
                targets: b.targets,
            })
            .collect(),
        forecast: s
            .forecast
            .iter()
            .map(|f| pb::CertForecast {
                target: f.target.clone(),
                not_after: Some(ts(f.not_after, 0)),
                days_left: f.days_left,
                sha256_fingerprint: f.fingerprint.clone(),
            })
            .collect(),
        as_of: Some(ts_ms(s.as_of_ms)),
        window_seconds: window,
        flap_changes: cfg.flap_changes,
    }
}

fn entry_to_proto(e: &Entry) -> pb::HistoryEntry {
    pb::HistoryEntry {
        check_id: e.check_id.clone(),
        started_at: Some(ts_ms(e.at_ms)),
        duration_millis: e.duration_ms,
        source: match e.source {
            Source::Gateway => "gateway",
            Source::Sweep => "sweep",
        }
        .into(),
        verdict: proto_verdict(&e.verdict),
        primary_cause: proto_cause(&e.primary_cause),
        causes: e.causes.iter().map(|c| proto_cause(c)).collect(),
        stages: e
            .stages
            .iter()
            .filter_map(|(name, micros)| {
                let s = Stage::ALL.iter().find(|s| s.as_str() == name)?;
                Some(pb::StageTiming {
                    stage: stage(*s).into(),
                    duration_micros: *micros,
                })
            })
            .collect(),
        cert_sha256_fingerprint: e.cert_fingerprint.clone(),
        cert_not_after: e.cert_not_after.map(|t| ts(t, 0)),
        account: e.account.clone().unwrap_or_default(),
    }
}

/// Splits `host:port`, `[v6]:port` or a bare host (the default port); `None` if malformed.
fn split_target(t: &str, default_port: u16) -> Option<(String, u16)> {
    if let Ok(a) = t.parse::<std::net::SocketAddr>() {
        return Some((a.ip().to_string(), a.port()));
    }
    if crate::policy::is_ip_literal(t).is_some() {
        return Some((t.trim_matches(['[', ']']).to_owned(), default_port));
    }
    match t.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse::<u16>().ok().filter(|p| *p != 0)?)),
        None => Some((t.to_owned(), default_port)),
    }
}

/// Keeps a check's outcome in the history without delaying the answer; a history that cannot
/// be written is logged, never a reason to withhold a verdict.
/// `permit`, when given, is held until the write is done.
pub fn record_history(history: &Arc<dyn History>, entry: Entry, permit: Option<tokio::sync::OwnedSemaphorePermit>) {
    let h = history.clone();
    tokio::spawn(async move {
        if let Err(e) = h.record(entry).await {
            tracing::warn!(error = %e, "check history not written");
        }
        drop(permit);
    });
}

/// Parses the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The check budget: the caller's deadline less a margin, capped by the config.
pub fn budget(cfg: &Config, deadline: Option<Duration>) -> Duration {
    match deadline {
        Some(d) => d
            .saturating_sub(cfg.deadline_margin)
            .min(cfg.max_budget)
            .max(Duration::from_millis(1)),
        None => cfg.default_budget,
    }
}

fn host_syntax_ok(h: &str) -> bool {
    if crate::policy::is_ip_literal(h).is_some() {
        return true;
    }
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= MAX_HOST
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

fn from_proto_protocol(p: i32) -> Option<u32> {
    Some(match pb::SecurityProtocol::try_from(p).ok()? {
        pb::SecurityProtocol::Unspecified => return None,
        pb::SecurityProtocol::Rdp => protocol::RDP,
        pb::SecurityProtocol::Ssl => protocol::SSL,
        pb::SecurityProtocol::Hybrid => protocol::HYBRID,
        pb::SecurityProtocol::Rdstls => protocol::RDSTLS,
        pb::SecurityProtocol::HybridEx => protocol::HYBRID_EX,
        pb::SecurityProtocol::Rdsaad => protocol::RDSAAD,
    })
}

fn to_proto_protocol(p: u32) -> pb::SecurityProtocol {
    match p {
        protocol::RDP => pb::SecurityProtocol::Rdp,
        protocol::SSL => pb::SecurityProtocol::Ssl,
        protocol::HYBRID => pb::SecurityProtocol::Hybrid,
        protocol::RDSTLS => pb::SecurityProtocol::Rdstls,
        protocol::HYBRID_EX => pb::SecurityProtocol::HybridEx,
        protocol::RDSAAD => pb::SecurityProtocol::Rdsaad,
        _ => pb::SecurityProtocol::Unspecified,
    }
}

/// Validates a request into a [`CheckInput`]; every violation is reported, each naming its field.
pub fn validate(req: pb::CheckRequest, cfg: &Config, deadline: Option<Duration>) -> Result<CheckInput, Status> {
    let mut v: Vec<(String, String)> = Vec::new();
    let mut bad = |field: &str, why: &str| v.push((field.to_owned(), why.to_owned()));
    if req.request_id.is_empty() {
        bad("request_id", "required");
    } else if req.request_id.len() > MAX_ID || !printable(&req.request_id) {
        bad("request_id", "at most 128 printable characters");
    }
    let target = req.target.unwrap_or_default();
    if target.host.is_empty() {
        bad("target.host", "required");
    } else if !host_syntax_ok(&target.host) {
        bad("target.host", "not a valid host name or IP literal");
    }
    if target.port > u32::from(u16::MAX) {
        bad("target.port", "must be 0..=65535 (0 means 3389)");
    }
    if !target.expected_name.is_empty() && !host_syntax_ok(&target.expected_name) {
        bad("target.expected_name", "not a valid host name or IP literal");
    }
    if target.expected_computer.len() > MAX_NAME || !printable(&target.expected_computer) {
        bad("target.expected_computer", "at most 256 printable characters");
    }
    let mut requested = 0u32;
    for (i, p) in target.requested_protocols.iter().enumerate() {
        match from_proto_protocol(*p) {
            Some(x) => requested |= x,
            None => bad(
                &format!("target.requested_protocols[{i}]"),
                "unknown or unspecified protocol",
            ),
        }
    }
    if target.requested_protocols.is_empty() {
        requested = cfg.default_protocols;
    }
    let minimum = match target.minimum_protocol {
        0 => cfg.minimum_protocol,
        p => match from_proto_protocol(p) {
            Some(x) => Some(x),
            None => {
                bad("target.minimum_protocol", "unknown protocol");
                None
            }
        },
    };
    let credential = match req.credential {
        None => None,
        Some(c) => {
            if c.username.is_empty() {
                bad("credential.username", "required with a credential");
            } else if c.username.len() > MAX_NAME || !printable(&c.username) {
                bad("credential.username", "at most 256 printable characters");
            }
            if c.domain.len() > MAX_NAME || !printable(&c.domain) {
                bad("credential.domain", "at most 256 printable characters");
            }
            if c.password.len() > MAX_PASSWORD {
                // Never echo any of it.
                bad("credential.password", "longer than 1024 bytes");
            }
            let cred = Credential {
                username: c.username,
                domain: c.domain,
                password: Password::new(c.password),
            };
            // A domain that contradicts the UPN or down-level name: which account is meant?
            if let Err((field, why)) = crate::check::validate_credential(cfg, &cred) {
                bad(field, &why);
            }
            Some(cred)
        }
    };
    let requester = req.requester.unwrap_or_default();
    if requester.user.len() > MAX_NAME || !printable(&requester.user) {
        bad("requester.user", "at most 256 printable characters");
    }
    if requester.source_address.len() > 64 || !printable(&requester.source_address) {
        bad("requester.source_address", "at most 64 printable characters");
    }
    if !v.is_empty() {
        return Err(invalid(&v));
    }
    let port = if target.port == 0 {
        cfg.default_port
    } else {
        target.port as u16
    };
    let expected_name = if target.expected_name.is_empty() {
        target.host.clone()
    } else {
        target.expected_name
    };
    Ok(CheckInput {
        request_id: req.request_id,
        host: target.host,
        port,
        expected_name,
        requested,
        minimum,
        expected_computer: target.expected_computer,
        credential,
        requester_user: requester.user,
        requester_source: requester.source_address,
        budget: budget(cfg, deadline),
    })
}

fn stage(s: Stage) -> pb::Stage {
    match s {
        Stage::Policy => pb::Stage::Policy,
        Stage::Resolve => pb::Stage::Resolve,
        Stage::Tcp => pb::Stage::Tcp,
        Stage::X224 => pb::Stage::X224,
        Stage::Tls => pb::Stage::Tls,
        Stage::Cert => pb::Stage::Cert,
        Stage::Credential => pb::Stage::Credential,
        Stage::Nla => pb::Stage::Nla,
        Stage::Network => pb::Stage::Network,
        Stage::Check => pb::Stage::Check,
    }
}

fn severity(s: cause::Severity) -> pb::Severity {
    match s {
        cause::Severity::Warn => pb::Severity::Warn,
        cause::Severity::Deny => pb::Severity::Deny,
    }
}

fn owner(o: cause::Owner) -> pb::Owner {
    match o {
        cause::Owner::Net => pb::Owner::Net,
        cause::Owner::Server => pb::Owner::Server,
        cause::Owner::Dir => pb::Owner::Dir,
        cause::Owner::Vault => pb::Owner::Vault,
        cause::Owner::Gw => pb::Owner::Gw,
    }
}

fn client_error(c: &cause::CauseInfo) -> pb::ClientError {
    let e = c.client_error();
    pb::ClientError {
        disconnect_reason: e.disconnect_reason,
        extended_reason: e.extended_reason,
        code: e.code.to_owned(),
        text: e.text,
        freerdp: e.freerdp.to_owned(),
        inferred: e.inferred,
    }
}

fn ts(secs: i64, nanos: u32) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: secs,
        nanos: i32::try_from(nanos).unwrap_or(0),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Converts a report to its protobuf form (also used for `check --json`).
pub fn to_proto(r: &Report) -> pb::CheckReport {
    let t = &r.target;
    let verdict = match r.verdict {
        Verdict::Allow => pb::Verdict::Allow,
        Verdict::AllowWithWarnings => pb::Verdict::AllowWithWarnings,
        Verdict::Deny => pb::Verdict::Deny,
    };
    let requested: Vec<i32> = (0..32)
        .map(|b| 1u32 << b)
        .filter(|b| t.requested_protocols & b != 0)
        .map(|b| to_proto_protocol(b).into())
        .collect();
    pb::CheckReport {
        check_id: r.check_id.clone(),
        request_id: r.request_id.clone(),
        verdict: verdict.into(),
        primary_cause: i32::from(r.primary_cause.number()),
        findings: r
            .findings
            .iter()
            .map(|(f, s)| {
                let info = f.cause.info();
                pb::Finding {
                    cause: i32::from(f.cause.number()),
                    severity: severity(*s).into(),
                    stage: stage(f.stage).into(),
                    message: f.message.clone(),
                    remediation: info.map(|i| i.remediation.to_owned()).unwrap_or_default(),
                    owner: info.map_or(pb::Owner::Unspecified, |i| owner(i.owner)).into(),
                    evidence: f
                        .evidence
                        .iter()
                        .map(|(k, v)| pb::Evidence {
                            key: k.clone(),
                            value: v.clone(),
                        })
                        .collect(),
                }
            })
            .collect(),
        stages: r
            .stages
            .iter()
            .map(|s| pb::StageResult {
                stage: stage(s.stage).into(),
                status: match s.status {
                    StageStatus::Ok => pb::StageStatus::Ok,
                    StageStatus::Failed => pb::StageStatus::Failed,
                    StageStatus::Skipped => pb::StageStatus::Skipped,
                    StageStatus::NotRun => pb::StageStatus::NotRun,
                }
                .into(),
                start_offset_micros: micros(s.start),
                duration_micros: micros(s.duration),
                detail: s.detail.clone(),
            })
            .collect(),
        target: Some(pb::TargetFacts {
            host: t.host.clone(),
            port: u32::from(t.port),
            resolved_addresses: t.resolved.iter().map(|a| a.ip().to_string()).collect(),
            connected_address: t.connected.map(|a| a.to_string()).unwrap_or_default(),
            requested_protocols: requested,
            requested_protocols_raw: t.requested_protocols,
            selected_protocol: t
                .selected_protocol
                .map_or(pb::SecurityProtocol::Unspecified, to_proto_protocol)
                .into(),
            selected_protocol_raw: t.selected_protocol,
            negotiation_flags: t.negotiation_flags.map(u32::from),
            negotiation_failure_code: t.negotiation_failure_code,
            tls_version: t.tls_version.clone(),
            cipher_suite: t.cipher_suite.clone(),
            certificate: t.certificate.as_ref().map(|c| pb::Certificate {
                subject: c.subject.clone(),
                issuer: c.issuer.clone(),
                san_dns: c.san_dns.clone(),
                san_ip: c.san_ip.clone(),
                not_before: Some(ts(c.not_before, 0)),
                not_after: Some(ts(c.not_after, 0)),
                sha256_fingerprint: c.sha256_fingerprint.clone(),
                self_signed: c.self_signed,
                key_type: c.key_type.clone(),
                key_bits: c.key_bits,
                signature_algorithm: c.signature_algorithm.clone(),
                chain_length: c.chain_length,
                verifier_verdict: c.verifier_verdict.clone(),
                extended_key_usage: c.extended_key_usage.clone(),
                serial: c.serial.clone(),
                is_ca: c.is_ca,
            }),
        }),
        predicted_client_error: r.primary_cause.info().map(client_error),
        started_at: Some(ts(r.started_at.0, r.started_at.1)),
        duration_micros: micros(r.duration),
        credential: Some(pb::CredentialFacts {
            checked_by: r.credential.checked_by.clone(),
            bind_identity: r.credential.bind_identity.clone(),
            directory_server: r.credential.directory_server.clone(),
            ldap_result_code: r.credential.ldap_result_code,
            ad_data_code: r.credential.ad_data_code.clone(),
            diagnostic_message: r.credential.diagnostic_message.clone(),
            from_memory: r.credential.from_memory,
        }),
        nla: Some(pb::NlaFacts {
            credssp_version: r.nla.credssp_version,
            netbios_computer: r.nla.netbios_computer.clone(),
            netbios_domain: r.nla.netbios_domain.clone(),
            dns_computer: r.nla.dns_computer.clone(),
            dns_domain: r.nla.dns_domain.clone(),
            os_version: r.nla.os_version.clone(),
            clock_offset_millis: r.nla.clock_offset_millis,
            logon: r.nla.logon.clone(),
            ntstatus: r.nla.ntstatus,
            auth: r.nla.auth.clone(),
            service_principal: r.nla.service_principal.clone(),
            auth_fallback: r.nla.auth_fallback.clone(),
        }),
        plugin_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Builds the gRPC router: Preflight (behind the bearer token when configured), health
/// (`grpc.health.v1`, open: probes carry no token) and reflection (`grpc.reflection.v1` and
/// `v1alpha`), with TLS or mutual TLS when
/// configured.
pub async fn router(
    checker: Arc<Checker>,
    audit: Option<AuditLog>,
    metrics: Arc<Metrics>,
    fleet: Arc<Fleet>,
) -> Result<(tonic::transport::server::Router, tonic_health::server::HealthReporter), String> {
    let cfg = checker.config().clone();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::preflight_server::PreflightServer<PreflightService>>()
        .await;
    // Both reflection versions: many clients (grpcio-reflection, older grpcurl) speak only
    // v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(rdp_preflight_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| format!("reflection v1alpha: {e}"))?;
    let token = cfg.bearer_token.clone();
    let m = metrics.clone();
    let auth = move |req: Request<()>| match &token {
        None => Ok(req),
        Some(t) => {
            let got = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let got = got.strip_prefix("Bearer ").unwrap_or("");
            if constant_time_eq(got.as_bytes(), t.expose().as_bytes()) {
                Ok(req)
            } else {
                m.rejected("unauthenticated");
                Err(Status::unauthenticated("missing or wrong bearer token"))
            }
        }
    };
    let svc = pb::preflight_server::PreflightServer::new(PreflightService::new(checker, audit, metrics, fleet))
        .max_decoding_message_size(64 * 1024);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, auth);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &cfg.server_tls {
        let mut t = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &tls.cert_pem,
            tls.key_pem.as_slice(),
        ));
        if let Some(ca) = &tls.client_ca_pem {
            t = t.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(t).map_err(|e| format!("server TLS: {e}"))?;
    }
    let router = builder
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(svc);
    Ok((router, reporter))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Marks the service NOT_SERVING (at shutdown, before draining).
pub async fn set_not_serving(reporter: &tonic_health::server::HealthReporter) {
    set_health(reporter, false).await;
}

/// Marks the service (and the server as a whole, `""`) SERVING or NOT_SERVING: the shared
/// store going down and coming back.
pub async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter
        .set_service_status(
            <pb::preflight_server::PreflightServer<PreflightService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter.set_service_status("", status).await;
}

/// Re-exported so `check --json` can print the proto3 JSON form.
pub fn report_json(r: &Report) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(&to_proto(r))
}

/// The cause enum value of a catalog cause (for tests comparing with the proto).
pub fn proto_cause_name(c: Cause) -> Option<&'static str> {
    pb::Cause::try_from(i32::from(c.number())).ok().map(|p| p.as_str_name())
}

#[cfg(test)]
mod catalog {
    use super::*;

    fn check_or_update(path: &std::path::Path, want: &str) {
        let have = std::fs::read_to_string(path).unwrap_or_default();
        if have != want {
            if std::env::var_os("UPDATE_GENERATED").is_some() {
                std::fs::write(path, want).expect("write generated file");
            } else {
                panic!("{} is out of date with plugin/src/cause.rs: run `UPDATE_GENERATED=1 cargo test -p rdp-preflight catalog`", path.display());
            }
        }
    }

    #[test]
    fn catalog_proto_and_docs_agree() {
        // The generated enum knows every catalog cause by the same number and name.
        for c in CATALOG {
            assert_eq!(
                proto_cause_name(c.cause),
                Some(format!("CAUSE_{}", c.name)).as_deref(),
                "{}",
                c.name
            );
        }
        let proto_causes = (0..1000).filter(|n| pb::Cause::try_from(*n).is_ok()).count();
        assert_eq!(proto_causes, CATALOG.len() + 2, "proto has causes the catalog lacks");
        // The proto file's enum block is exactly what the catalog generates.
        let src = rdp_preflight_proto::PROTO_SOURCE;
        let begin = src.find("// @@CAUSES-BEGIN@@\n").expect("begin marker") + "// @@CAUSES-BEGIN@@\n".len();
        let end = src.find("  // @@CAUSES-END@@").expect("end marker");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        if src[begin..end] != cause::proto_enum_lines() {
            let mut want = src[..begin].to_owned();
            want.push_str(&cause::proto_enum_lines());
            want.push_str(&src[end..]);
            check_or_update(&root.join("proto/preflight/v1/preflight.proto"), &want);
        }
        check_or_update(&root.join("docs/causes.md"), &cause::docs_markdown());
    }

    #[test]
    fn catalog_matches_the_design_contract_when_present() {
        // The shared design page is the source of the public contract; compare when it is
        // beside the checkout (it is in CI and in development).
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/design/causes.md");
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let mut rows = 0;
        for line in text.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() > 4 && cells[1].len() == 3 && cells[1].bytes().all(|b| b.is_ascii_digit()) {
                let n: u16 = cells[1].parse().expect("number");
                let c = Cause::from_number(n).unwrap_or_else(|| panic!("catalog lacks {n}"));
                let info = c.info().expect("row");
                assert_eq!(info.name, cells[2], "name of {n}");
                assert_eq!(
                    matches!(info.severity, cause::Severity::Deny),
                    cells[3] == "deny",
                    "severity of {n}"
                );
                rows += 1;
            }
        }
        assert_eq!(rows, CATALOG.len());
    }

    #[test]
    fn grpc_timeout_header() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("grpc-timeout", "1500m".parse().expect("value"));
        assert_eq!(grpc_timeout(&md), Some(Duration::from_millis(1500)));
        md.insert("grpc-timeout", "2S".parse().expect("value"));
        assert_eq!(grpc_timeout(&md), Some(Duration::from_secs(2)));
        md.insert("grpc-timeout", "x".parse().expect("value"));
        assert_eq!(grpc_timeout(&md), None);
    }

    #[test]
    fn validation_names_every_bad_field() {
        let cfg = Config::embedded();
        let req = pb::CheckRequest {
            request_id: String::new(),
            target: Some(pb::Target {
                host: "bad host!".into(),
                port: 70000,
                requested_protocols: vec![0],
                ..Default::default()
            }),
            credential: Some(pb::Credential {
                username: String::new(),
                domain: String::new(),
                password: "canary-secret".into(),
            }),
            requester: None,
        };
        let st = validate(req, &cfg, None).expect_err("invalid");
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        for field in [
            "request_id",
            "target.host",
            "target.port",
            "target.requested_protocols[0]",
            "credential.username",
        ] {
            assert!(st.message().contains(field), "{field} missing from {}", st.message());
        }
        assert!(!st.message().contains("canary"));
        let details = st.get_error_details();
        assert_eq!(details.bad_request().map(|b| b.field_violations.len()), Some(5));
    }

    #[test]
    fn budget_follows_the_deadline_within_limits() {
        let cfg = Config::embedded();
        assert_eq!(budget(&cfg, None), cfg.default_budget);
        assert_eq!(
            budget(&cfg, Some(Duration::from_millis(1100))),
            Duration::from_millis(1000)
        );
        assert_eq!(budget(&cfg, Some(Duration::from_secs(3600))), cfg.max_budget);
    }
}
