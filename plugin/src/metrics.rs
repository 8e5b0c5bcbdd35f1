//! Prometheus metrics (text exposition format 0.0.4) and the admin listener that serves them.
//!
//! Plain atomics, no registry. Every label value comes from a closed set (verdicts, catalog
//! causes, stages, code-defined rejection reasons): never a host name, an account, a request
//! id or anything a caller controls, and never a secret.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    cause::{Cause, Severity, Stage, CATALOG},
    report::{Report, StageStatus, Verdict},
};

/// Buckets (seconds) of the stage and check duration histograms.
const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets (seconds) of the audit write histogram (a write plus an fsync, or a group commit).
const AUDIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

const VERDICTS: [Verdict; 3] = [Verdict::Allow, Verdict::AllowWithWarnings, Verdict::Deny];
/// Stage outcomes with a duration worth a histogram.
const STAGE_STATUSES: [&str; 2] = ["ok", "failed"];
/// DIRECTORY_* causes (651..=655).
const DIRECTORY_FIRST: u16 = 651;
const DIRECTORY_LAST: u16 = 655;

/// A histogram with fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts, one per bound plus +Inf.
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples; `labels` is `k="v",…` or empty.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or_else(|| "+Inf".to_owned(), |v| v.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        if labels.is_empty() {
            let _ = writeln!(out, "{name}_sum {sum}");
            let _ = writeln!(out, "{name}_count {cumulative}");
        } else {
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
        }
    }
}

/// Escapes a label value (`\`, `"`, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Index of a cause: 0 for `Ok`, 1 + its catalog position otherwise.
fn cause_index(c: Cause) -> usize {
    CATALOG.iter().position(|i| i.cause == c).map_or(0, |p| p + 1)
}

fn cause_at(i: usize) -> Cause {
    i.checked_sub(1)
        .and_then(|p| CATALOG.get(p))
        .map_or(Cause::Ok, |info| info.cause)
}

fn verdict_index(v: Verdict) -> usize {
    match v {
        Verdict::Allow => 0,
        Verdict::AllowWithWarnings => 1,
        Verdict::Deny => 2,
    }
}

fn stage_index(s: Stage) -> usize {
    Stage::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

/// The plugin's metrics.
pub struct Metrics {
    in_flight: AtomicI64,
    /// `[verdict][cause]`, flattened.
    checks: Vec<AtomicU64>,
    /// `[cause][severity]`, flattened.
    findings: Vec<AtomicU64>,
    /// By verdict.
    check_duration: Vec<Histogram>,
    /// `[stage][ok|failed]`, flattened.
    stage_duration: Vec<Histogram>,
    /// DIRECTORY_* causes, 651..=655.
    directory_errors: Vec<AtomicU64>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    audit_write: Histogram,
    audit_failures: AtomicU64,
    /// Check outcomes not kept in the history (too many writes pending).
    history_dropped: AtomicU64,
    start_time: f64,
    /// The shared store, when configured.
    store: std::sync::OnceLock<Arc<crate::store::Store>>,
    /// The SIEM export, when configured.
    siem: std::sync::OnceLock<Arc<crate::siem::SiemStats>>,
    /// The fleet's gauges, as last computed from the history (`None`: not yet).
    fleet: Mutex<Option<FleetGauges>>,
}

/// Distinct values of the inventory label kept apart in the certificate gauge; beyond them,
/// `other`.
pub const MAX_LABEL_VALUES: usize = 64;

/// The fleet's state as gauges; every label from a closed set (causes, verdicts) or from the
/// operator's inventory, bounded by [`MAX_LABEL_VALUES`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetGauges {
    /// Targets by the primary cause of their last check (catalog order; zeros included).
    pub by_cause: BTreeMap<&'static str, u64>,
    /// Targets by the verdict of their last check.
    pub by_state: BTreeMap<&'static str, u64>,
    /// Targets flapping.
    pub flapping: u64,
    /// The label key of `sweep.metric_label`, and per value the fewest certificate days left.
    pub cert_min_days: Option<(String, BTreeMap<String, i64>)>,
}

impl FleetGauges {
    /// The gauges of a fleet status; `label`: the inventory label to split the certificate
    /// gauge by.
    pub fn of(status: &crate::fleet::Status, label: Option<&str>) -> FleetGauges {
        let mut g = FleetGauges {
            by_cause: std::iter::once(Cause::Ok)
                .chain(CATALOG.iter().map(|c| c.cause))
                .map(|c| (c.name(), 0))
                .collect(),
            by_state: VERDICTS.iter().map(|v| (v.as_str(), 0)).collect(),
            ..FleetGauges::default()
        };
        let mut days: BTreeMap<String, i64> = BTreeMap::new();
        for t in &status.targets {
            if let Some(n) = Cause::from_name(&t.state.primary_cause).and_then(|c| g.by_cause.get_mut(c.name())) {
                *n += 1;
            }
            if let Some(n) = g.by_state.get_mut(t.state.verdict.as_str()) {
                *n += 1;
            }
            g.flapping += u64::from(t.state.flapping);
            if let (Some(key), Some(d)) = (label, t.state.cert_days_left(status.as_of_ms)) {
                let mut value = t.labels.get(key).cloned().unwrap_or_default();
                if !days.contains_key(&value) && days.len() >= MAX_LABEL_VALUES {
                    value = "other".into();
                }
                let slot = days.entry(value).or_insert(d);
                *slot = (*slot).min(d);
            }
        }
        g.cert_min_days = label.map(|k| (k.to_owned(), days));
        g
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// All counters at zero.
    pub fn new() -> Metrics {
        let causes = CATALOG.len() + 1;
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Metrics {
            in_flight: AtomicI64::new(0),
            checks: zeros(VERDICTS.len() * causes),
            findings: zeros(causes * 2),
            check_duration: VERDICTS.iter().map(|_| Histogram::new(STAGE_BUCKETS)).collect(),
            stage_duration: (0..Stage::ALL.len() * STAGE_STATUSES.len())
                .map(|_| Histogram::new(STAGE_BUCKETS))
                .collect(),
            directory_errors: zeros(usize::from(DIRECTORY_LAST - DIRECTORY_FIRST) + 1),
            rejected: Mutex::new(BTreeMap::new()),
            audit_write: Histogram::new(AUDIT_BUCKETS),
            audit_failures: AtomicU64::new(0),
            history_dropped: AtomicU64::new(0),
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            store: std::sync::OnceLock::new(),
            siem: std::sync::OnceLock::new(),
            fleet: Mutex::new(None),
        }
    }

    /// Sets the fleet's gauges.
    pub fn set_fleet(&self, g: FleetGauges) {
        *self.fleet.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(g);
    }

    /// Reports the SIEM export's deliveries, losses and queue.
    pub fn set_siem(&self, stats: Arc<crate::siem::SiemStats>) {
        let _ = self.siem.set(stats);
    }

    /// Reports the shared store's health, round trips, errors and refused reservations.
    pub fn set_store(&self, store: Arc<crate::store::Store>) {
        let _ = self.store.set(store);
    }

    /// A check was admitted: in-flight gauge +1.
    pub fn check_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A check ended without a report (its caller went away): in-flight gauge −1.
    pub fn check_abandoned(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// [`Metrics::check_started`] now, and [`Metrics::check_abandoned`] when the guard is
    /// dropped without [`CheckGuard::finish`]: the gauge stays right when a caller cancels.
    pub fn track(&self) -> CheckGuard<'_> {
        self.check_started();
        CheckGuard {
            metrics: self,
            done: false,
        }
    }

    /// A check answered: in-flight −1; checks by verdict and primary cause; findings by cause
    /// and severity; check and stage durations; directory errors.
    pub fn check_finished(&self, report: &Report) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let causes = CATALOG.len() + 1;
        let v = verdict_index(report.verdict);
        if let Some(c) = self.checks.get(v * causes + cause_index(report.primary_cause)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(h) = self.check_duration.get(v) {
            h.observe(report.duration);
        }
        for st in &report.stages {
            let status = match st.status {
                StageStatus::Ok => 0,
                StageStatus::Failed => 1,
                StageStatus::Skipped | StageStatus::NotRun => continue,
            };
            if let Some(h) = self
                .stage_duration
                .get(stage_index(st.stage) * STAGE_STATUSES.len() + status)
            {
                h.observe(st.duration);
            }
        }
        for (f, sev) in &report.findings {
            let s = match sev {
                Severity::Warn => 0,
                Severity::Deny => 1,
            };
            if let Some(c) = self.findings.get(cause_index(f.cause) * 2 + s) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            let n = f.cause.number();
            if (DIRECTORY_FIRST..=DIRECTORY_LAST).contains(&n) {
                if let Some(c) = self.directory_errors.get(usize::from(n - DIRECTORY_FIRST)) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A request refused before a check ran (`overloaded`, `invalid_argument`, …). Reasons are
    /// code constants, so the label set stays closed.
    pub fn rejected(&self, reason: &'static str) {
        let mut m = self.rejected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry(reason).or_default() += 1;
    }

    /// One audit write (queue, write, fsync, acknowledgement) and whether it succeeded.
    pub fn audit_write(&self, d: Duration, ok: bool) {
        self.audit_write.observe(d);
        if !ok {
            self.audit_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A check's outcome that the history did not keep (its writes were backed up).
    pub fn history_dropped(&self) {
        self.history_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks in flight now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Everything, in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let causes = CATALOG.len() + 1;

        header(
            &mut out,
            "rdp_preflight_build_info",
            "gauge",
            "Plugin version (value is always 1).",
        );
        let _ = writeln!(
            out,
            "rdp_preflight_build_info{{version=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION"))
        );
        header(
            &mut out,
            "rdp_preflight_process_start_time_seconds",
            "gauge",
            "Start time of the process, seconds since the Unix epoch.",
        );
        let _ = writeln!(out, "rdp_preflight_process_start_time_seconds {}", self.start_time);

        header(
            &mut out,
            "rdp_preflight_checks_in_flight",
            "gauge",
            "Checks admitted and not yet answered.",
        );
        let _ = writeln!(out, "rdp_preflight_checks_in_flight {}", self.in_flight());

        header(
            &mut out,
            "rdp_preflight_checks_total",
            "counter",
            "Checks answered, by verdict and primary cause.",
        );
        for (vi, v) in VERDICTS.iter().enumerate() {
            for ci in 0..causes {
                let n = self.checks[vi * causes + ci].load(Ordering::Relaxed);
                if n > 0 {
                    let c = cause_at(ci);
                    let _ = writeln!(
                        out,
                        "rdp_preflight_checks_total{{verdict=\"{}\",primary_cause=\"{}\",cause_number=\"{}\"}} {n}",
                        v.as_str(),
                        c.name(),
                        c.number()
                    );
                }
            }
        }

        header(
            &mut out,
            "rdp_preflight_findings_total",
            "counter",
            "Findings reported, by cause and effective severity.",
        );
        for ci in 0..causes {
            for (si, sev) in ["warn", "deny"].iter().enumerate() {
                let n = self.findings[ci * 2 + si].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "rdp_preflight_findings_total{{cause=\"{}\",severity=\"{sev}\"}} {n}",
                        cause_at(ci).name()
                    );
                }
            }
        }

        header(
            &mut out,
            "rdp_preflight_directory_errors_total",
            "counter",
            "Directory failures (DIRECTORY_* causes 651-655), by cause.",
        );
        for (i, c) in self.directory_errors.iter().enumerate() {
            let number = DIRECTORY_FIRST + i as u16;
            if let Some(cause) = Cause::from_number(number) {
                let _ = writeln!(
                    out,
                    "rdp_preflight_directory_errors_total{{cause=\"{}\"}} {}",
                    cause.name(),
                    c.load(Ordering::Relaxed)
                );
            }
        }

        header(
            &mut out,
            "rdp_preflight_requests_rejected_total",
            "counter",
            "Requests refused before a check ran, by reason.",
        );
        {
            let m = self.rejected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (reason, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "rdp_preflight_requests_rejected_total{{reason=\"{}\"}} {n}",
                    escape(reason)
                );
            }
        }

        header(
            &mut out,
            "rdp_preflight_check_duration_seconds",
            "histogram",
            "Duration of whole checks, by verdict.",
        );
        for (vi, v) in VERDICTS.iter().enumerate() {
            let h = &self.check_duration[vi];
            if h.count() > 0 {
                h.render(
                    &mut out,
                    "rdp_preflight_check_duration_seconds",
                    &format!("verdict=\"{}\"", v.as_str()),
                );
            }
        }

        header(
            &mut out,
            "rdp_preflight_stage_duration_seconds",
            "histogram",
            "Duration of check stages that ran, by stage and outcome.",
        );
        for (si, stage) in Stage::ALL.iter().enumerate() {
            for (oi, status) in STAGE_STATUSES.iter().enumerate() {
                let h = &self.stage_duration[si * STAGE_STATUSES.len() + oi];
                if h.count() > 0 {
                    h.render(
                        &mut out,
                        "rdp_preflight_stage_duration_seconds",
                        &format!("stage=\"{}\",status=\"{status}\"", stage.as_str()),
                    );
                }
            }
        }

        header(
            &mut out,
            "rdp_preflight_audit_write_seconds",
            "histogram",
            "Time from queuing an audit record to its acknowledgement (written and fsynced).",
        );
        self.audit_write
            .render(&mut out, "rdp_preflight_audit_write_seconds", "");
        header(
            &mut out,
            "rdp_preflight_audit_write_failures_total",
            "counter",
            "Audit records that could not be written (the check was answered with an error).",
        );
        let _ = writeln!(
            out,
            "rdp_preflight_audit_write_failures_total {}",
            self.audit_failures.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "rdp_preflight_history_dropped_total",
            "counter",
            "Gateway check outcomes not kept in the check history because its writes were backed up.",
        );
        let _ = writeln!(
            out,
            "rdp_preflight_history_dropped_total {}",
            self.history_dropped.load(Ordering::Relaxed)
        );
        if let Some(store) = self.store.get() {
            render_store(&mut out, store);
        }
        if let Some(siem) = self.siem.get() {
            render_siem(&mut out, siem);
        }
        let fleet = self
            .fleet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(g) = fleet {
            render_fleet(&mut out, &g);
        }
        out
    }
}

fn render_fleet(out: &mut String, g: &FleetGauges) {
    header(
        out,
        "rdp_preflight_fleet_targets",
        "gauge",
        "Targets in the check history by the primary cause of their last check.",
    );
    for (cause, n) in &g.by_cause {
        let _ = writeln!(out, "rdp_preflight_fleet_targets{{primary_cause=\"{cause}\"}} {n}");
    }
    header(
        out,
        "rdp_preflight_fleet_targets_by_state",
        "gauge",
        "Targets in the check history by the verdict of their last check.",
    );
    for (state, n) in &g.by_state {
        let _ = writeln!(out, "rdp_preflight_fleet_targets_by_state{{state=\"{state}\"}} {n}");
    }
    header(
        out,
        "rdp_preflight_fleet_flapping_targets",
        "gauge",
        "Targets whose state changed more than history.flap_changes times within the window.",
    );
    let _ = writeln!(out, "rdp_preflight_fleet_flapping_targets {}", g.flapping);
    if let Some((key, days)) = &g.cert_min_days {
        header(
            out,
            "rdp_preflight_fleet_cert_min_days_left",
            "gauge",
            "Fewest whole days before a target's certificate expires, per value of the inventory label sweep.metric_label.",
        );
        for (value, d) in days {
            let _ = writeln!(
                out,
                "rdp_preflight_fleet_cert_min_days_left{{{key}=\"{}\"}} {d}",
                escape(value)
            );
        }
    }
}

fn render_siem(out: &mut String, s: &crate::siem::SiemStats) {
    use crate::siem::SiemStats;
    for (name, kind, help, value) in [
        (
            "rdp_preflight_siem_events_sent_total",
            "counter",
            "Audit records delivered to the SIEM destination.",
            SiemStats::get(&s.sent),
        ),
        (
            "rdp_preflight_siem_events_undelivered_total",
            "counter",
            "Audit records not exported (queue full, too large, or queued at shutdown): replay them with `rdp-preflight audit export --since`.",
            SiemStats::get(&s.undelivered),
        ),
        (
            "rdp_preflight_siem_send_errors_total",
            "counter",
            "Failed connects and writes to the SIEM destination (each one retried with backoff).",
            SiemStats::get(&s.errors),
        ),
        (
            "rdp_preflight_siem_queue_depth",
            "gauge",
            "Audit records waiting to be exported.",
            SiemStats::get(&s.depth),
        ),
    ] {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
}

fn render_store(out: &mut String, store: &crate::store::Store) {
    let st = &store.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    header(
        out,
        "rdp_preflight_store_up",
        "gauge",
        "1 while the shared store answers its probe, 0 while it is unreachable (health NOT_SERVING).",
    );
    let _ = writeln!(out, "rdp_preflight_store_up {}", u8::from(store.healthy()));
    header(
        out,
        "rdp_preflight_store_operation_seconds",
        "summary",
        "Round trips to the shared store (one statement or one short transaction), completed.",
    );
    let _ = writeln!(
        out,
        "rdp_preflight_store_operation_seconds_sum {}",
        load(&st.op_nanos) as f64 / 1e9
    );
    let _ = writeln!(out, "rdp_preflight_store_operation_seconds_count {}", load(&st.ops));
    header(
        out,
        "rdp_preflight_store_errors_total",
        "counter",
        "Store operations that failed or timed out (a reservation that fails is a refused attempt).",
    );
    let _ = writeln!(out, "rdp_preflight_store_errors_total {}", load(&st.errors));
    header(
        out,
        "rdp_preflight_guard_reservations_refused_total",
        "counter",
        "Reservations the shared lockout guard refused because the account's budget is spent.",
    );
    let _ = writeln!(
        out,
        "rdp_preflight_guard_reservations_refused_total {}",
        load(&st.refused)
    );
}

/// Keeps the in-flight gauge right when a check is cancelled: see [`Metrics::track`].
#[must_use = "dropping the guard counts the check as abandoned"]
pub struct CheckGuard<'a> {
    metrics: &'a Metrics,
    done: bool,
}

impl CheckGuard<'_> {
    /// The check answered: [`Metrics::check_finished`].
    pub fn finish(mut self, report: &Report) {
        self.done = true;
        self.metrics.check_finished(report);
    }
}

impl Drop for CheckGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.check_abandoned();
        }
    }
}

/// `[admin]`: the HTTP listener for `/metrics` and `/healthz`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    /// Listen address, e.g. `127.0.0.1:9464` (default none: no admin listener).
    pub listen: Option<String>,
    /// Allow a non-loopback listen address (plain HTTP, no authentication). Default false.
    pub allow_remote: bool,
}

impl AdminFile {
    /// The address to listen on (`None`: no admin listener); errors name the key.
    pub fn validate(&self) -> Result<Option<SocketAddr>, String> {
        let Some(l) = &self.listen else {
            return Ok(None);
        };
        let addr: SocketAddr = l
            .trim()
            .parse()
            .map_err(|e| format!("admin.listen: {l:?}: {e} (use IP:PORT, e.g. 127.0.0.1:9464)"))?;
        if !addr.ip().is_loopback() && !self.allow_remote {
            return Err(format!(
                "admin.listen: {addr} is not a loopback address; the admin listener is plain HTTP \
                 without authentication: set admin.allow_remote = true to expose it"
            ));
        }
        Ok(Some(addr))
    }
}

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics` and `GET /healthz` on `listener` until `shutdown` completes.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{http::header, routing::get, Router};
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::report::{CredentialFacts, Finding, NlaFacts, StageRecord, TargetFacts};

    fn report(verdict: Verdict, cause: Cause, findings: Vec<(Finding, Severity)>) -> Report {
        Report {
            check_id: "01CHECK".into(),
            request_id: "req-canary-request".into(),
            verdict,
            primary_cause: cause,
            findings,
            stages: vec![
                StageRecord {
                    stage: Stage::Tcp,
                    status: StageStatus::Ok,
                    start: Duration::ZERO,
                    duration: Duration::from_millis(3),
                    detail: String::new(),
                },
                StageRecord {
                    stage: Stage::Credential,
                    status: StageStatus::Failed,
                    start: Duration::ZERO,
                    duration: Duration::from_millis(40),
                    detail: String::new(),
                },
                StageRecord {
                    stage: Stage::Nla,
                    status: StageStatus::Skipped,
                    start: Duration::ZERO,
                    duration: Duration::ZERO,
                    detail: String::new(),
                },
            ],
            target: TargetFacts {
                host: "canary-host.example.test".into(),
                port: 3389,
                ..TargetFacts::default()
            },
            credential: CredentialFacts {
                bind_identity: "canary-account@example.test".into(),
                ..CredentialFacts::default()
            },
            nla: NlaFacts::default(),
            started_at: (0, 0),
            duration: Duration::from_millis(45),
        }
    }

    #[test]
    fn fleet_gauges_keep_their_labels_bounded() {
        use crate::{fleet::TargetStatus, history::trend::TargetState};
        const NOW: i64 = 1_800_000_000_000;
        let target = |i: usize, cause: Cause, flapping: bool| TargetStatus {
            state: TargetState {
                target: format!("rdp{i}:3389"),
                verdict: if cause == Cause::Ok { "allow" } else { "deny" }.into(),
                primary_cause: cause.name().into(),
                causes: vec![],
                since_ms: NOW,
                since_exact: true,
                last_ms: NOW,
                changes: 0,
                flapping,
                sequence: vec![],
                cert_not_after: Some(NOW / 1000 + 86_400 * (10 + i as i64)),
                cert_fingerprint: String::new(),
            },
            labels: [("site".to_owned(), format!("site{i}"))].into_iter().collect(),
            in_inventory: true,
        };
        let status = crate::fleet::Status {
            as_of_ms: NOW,
            targets: (0..100)
                .map(|i| target(i, if i % 2 == 0 { Cause::Ok } else { Cause::CertExpired }, i == 7))
                .collect(),
            trend: vec![],
            forecast: vec![],
        };
        let g = FleetGauges::of(&status, Some("site"));
        let (_, days) = g.cert_min_days.clone().expect("by site");
        assert_eq!(days.len(), MAX_LABEL_VALUES + 1, "64 values and other");
        assert_eq!(days.get("site0"), Some(&10));
        assert_eq!(days.get("other"), Some(&(10 + MAX_LABEL_VALUES as i64)));
        let m = Metrics::new();
        m.set_fleet(g);
        let text = m.render();
        assert_eq!(
            sample(&text, "rdp_preflight_fleet_targets{primary_cause=\"CERT_EXPIRED\"}"),
            Some(50.0)
        );
        assert_eq!(
            sample(&text, "rdp_preflight_fleet_targets{primary_cause=\"TCP_REFUSED\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "rdp_preflight_fleet_targets_by_state{state=\"deny\"}"),
            Some(50.0)
        );
        assert_eq!(sample(&text, "rdp_preflight_fleet_flapping_targets"), Some(1.0));
        assert_eq!(
            sample(&text, "rdp_preflight_fleet_cert_min_days_left{site=\"site3\"}"),
            Some(13.0)
        );
        assert!(!text.contains("rdp3:3389"), "never a host name in a label");
        assert!(FleetGauges::of(&status, None).cert_min_days.is_none());
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn checks_stages_directory_errors_and_in_flight() {
        let m = Metrics::new();
        m.check_started();
        m.check_started();
        assert!(m.render().contains("rdp_preflight_checks_in_flight 2\n"));
        let dir = Finding::new(Cause::DirectoryUnreachable, "no directory server answered: canary-Pa55");
        m.check_finished(&report(
            Verdict::Deny,
            Cause::DirectoryUnreachable,
            vec![(dir, Severity::Deny)],
        ));
        m.check_finished(&report(
            Verdict::AllowWithWarnings,
            Cause::CertUntrusted,
            vec![(Finding::new(Cause::CertUntrusted, "self-signed"), Severity::Warn)],
        ));
        m.rejected("overloaded");
        m.rejected("overloaded");
        m.rejected("invalid_argument");
        m.audit_write(Duration::from_micros(700), true);
        m.audit_write(Duration::from_millis(3), false);
        let t = m.render();
        assert_eq!(sample(&t, "rdp_preflight_checks_in_flight"), Some(0.0));
        assert_eq!(
            sample(
                &t,
                "rdp_preflight_checks_total{verdict=\"deny\",primary_cause=\"DIRECTORY_UNREACHABLE\",cause_number=\"651\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "rdp_preflight_checks_total{verdict=\"allow_with_warnings\",primary_cause=\"CERT_UNTRUSTED\",cause_number=\"505\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "rdp_preflight_findings_total{cause=\"CERT_UNTRUSTED\",severity=\"warn\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "rdp_preflight_directory_errors_total{cause=\"DIRECTORY_UNREACHABLE\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "rdp_preflight_directory_errors_total{cause=\"DIRECTORY_TIMEOUT\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&t, "rdp_preflight_requests_rejected_total{reason=\"overloaded\"}"),
            Some(2.0)
        );
        // Histograms: cumulative buckets, +Inf equals count, sum in seconds.
        let tcp = "rdp_preflight_stage_duration_seconds_bucket{stage=\"tcp\",status=\"ok\",le=";
        assert_eq!(sample(&t, &format!("{tcp}\"0.0025\"}}")), Some(0.0));
        assert_eq!(sample(&t, &format!("{tcp}\"0.005\"}}")), Some(2.0));
        assert_eq!(sample(&t, &format!("{tcp}\"+Inf\"}}")), Some(2.0));
        assert_eq!(
            sample(
                &t,
                "rdp_preflight_stage_duration_seconds_count{stage=\"credential\",status=\"failed\"}"
            ),
            Some(2.0)
        );
        assert!(!t.contains("stage=\"nla\""), "skipped stages have no duration");
        assert_eq!(sample(&t, "rdp_preflight_audit_write_seconds_count"), Some(2.0));
        assert_eq!(
            sample(&t, "rdp_preflight_audit_write_seconds_bucket{le=\"0.001\"}"),
            Some(1.0)
        );
        let sum = sample(&t, "rdp_preflight_audit_write_seconds_sum").expect("sum");
        assert!((sum - 0.0037).abs() < 1e-9, "{sum}");
        assert_eq!(sample(&t, "rdp_preflight_audit_write_failures_total"), Some(1.0));
        // No unbounded or secret label values.
        assert!(!t.contains("canary"), "{t}");
    }

    #[test]
    fn guard_counts_an_abandoned_check() {
        let m = Metrics::new();
        {
            let _g = m.track();
            assert_eq!(m.in_flight(), 1);
        }
        assert_eq!(m.in_flight(), 0);
        m.track().finish(&report(Verdict::Allow, Cause::Ok, vec![]));
        assert_eq!(m.in_flight(), 0);
        assert!(m.render().contains("primary_cause=\"OK\""));
    }

    #[test]
    fn exposition_format_is_well_formed() {
        let m = Metrics::new();
        for c in CATALOG {
            m.check_finished(&report(
                Verdict::Deny,
                c.cause,
                vec![(Finding::new(c.cause, "x"), Severity::Deny)],
            ));
        }
        let t = m.render();
        let mut families = std::collections::HashSet::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().expect("name");
                assert!(families.insert(name.to_owned()), "TYPE twice for {name}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series value");
            value.parse::<f64>().unwrap_or_else(|_| panic!("value of {line}"));
            let name = series.split('{').next().expect("name");
            assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "metric name {name}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
                .unwrap_or(name);
            assert!(families.contains(family), "sample before its TYPE: {line}");
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                }
            }
        }
        // Label values are bounded by the catalog.
        let series = t
            .lines()
            .filter(|l| l.starts_with("rdp_preflight_checks_total{"))
            .count();
        assert_eq!(series, CATALOG.len());
    }

    #[test]
    fn admin_listen_must_be_loopback_unless_allowed() {
        assert_eq!(AdminFile::default().validate(), Ok(None));
        let f = |l: &str, remote: bool| AdminFile {
            listen: Some(l.into()),
            allow_remote: remote,
        };
        assert_eq!(
            f("127.0.0.1:9464", false).validate(),
            Ok(Some("127.0.0.1:9464".parse().expect("addr")))
        );
        assert!(f("[::1]:9464", false).validate().is_ok());
        assert!(f("0.0.0.0:9464", false)
            .validate()
            .expect_err("remote")
            .starts_with("admin.listen:"));
        assert!(f("0.0.0.0:9464", true).validate().is_ok());
        assert!(f("localhost", false)
            .validate()
            .expect_err("bad")
            .starts_with("admin.listen:"));
        assert!(toml::from_str::<AdminFile>("listen = \"127.0.0.1:1\"\nbogus = 1\n").is_err());
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn admin_listener_serves_metrics_and_health_then_stops() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let m = Arc::new(Metrics::new());
        m.check_started();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_admin(listener, m.clone(), async move {
            let _ = stopped.await;
        }));
        let r = get(addr, "/metrics").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{r}"
        );
        assert!(r.contains("rdp_preflight_checks_in_flight 1"), "{r}");
        let h = get(addr, "/healthz").await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"), "{h}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stops")
            .expect("join")
            .expect("serve");
    }
}
