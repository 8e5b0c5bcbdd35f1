//! Check history: every check's outcome (gateway checks and sweep checks alike), kept in the
//! shared store when one is configured ([`crate::store::history`]), else in a bounded
//! in-process [`MemoryHistory`] (retention by age and by count).
//!
//! An [`Entry`] holds the time, the target, the verdict, the primary cause, every cause, the
//! stage timings and the certificate's fingerprint and expiry; the account only as the audit
//! record names it (`DOMAIN\user`), never a password. [`trend`] computes the fleet's state,
//! flapping targets, cause trends and the certificate forecast from entries, with the clock
//! injected.

pub mod trend;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::report::{Report, StageStatus};

/// Who asked for the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A gateway's `Check`.
    Gateway,
    /// The scheduled or one-pass sweep.
    Sweep,
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Start of the check, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// How long the check took, milliseconds.
    pub duration_ms: u64,
    /// `host:port` as requested.
    pub target: String,
    /// Gateway or sweep.
    pub source: Source,
    /// The plugin's id of the check (time-sortable).
    pub check_id: String,
    /// `allow`, `allow_with_warnings` or `deny`.
    pub verdict: String,
    /// The primary cause's public name (`OK` when none).
    pub primary_cause: String,
    /// Every finding's cause, in stage order.
    pub causes: Vec<String>,
    /// Stages that ran: (stage, duration in microseconds).
    pub stages: Vec<(String, u64)>,
    /// SHA-256 of the target's certificate (empty: none seen).
    pub cert_fingerprint: String,
    /// The certificate's notAfter, seconds since the Unix epoch.
    pub cert_not_after: Option<i64>,
    /// The account as the audit record names it (`DOMAIN\user`), when the check carried one.
    pub account: Option<String>,
}

/// `host:port`, the key of a target in the history (IPv6 literals in brackets).
pub fn target_key(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Entry {
    /// The entry of a finished check; `account` as [`account_label`] makes it.
    pub fn new(report: &Report, host: &str, port: u16, account: Option<String>, source: Source) -> Entry {
        let cert = report.target.certificate.as_ref();
        Entry {
            at_ms: report.started_at.0.saturating_mul(1000) + i64::from(report.started_at.1 / 1_000_000),
            duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
            target: target_key(host, port),
            source,
            check_id: report.check_id.clone(),
            verdict: report.verdict.as_str().to_owned(),
            primary_cause: report.primary_cause.name().to_owned(),
            causes: report.findings.iter().map(|(f, _)| f.cause.name().to_owned()).collect(),
            stages: report
                .stages
                .iter()
                .filter(|s| matches!(s.status, StageStatus::Ok | StageStatus::Failed))
                .map(|s| {
                    (
                        s.stage.as_str().to_owned(),
                        u64::try_from(s.duration.as_micros()).unwrap_or(u64::MAX),
                    )
                })
                .collect(),
            cert_fingerprint: cert.map(|c| c.sha256_fingerprint.clone()).unwrap_or_default(),
            cert_not_after: cert.map(|c| c.not_after),
            account,
        }
    }
}

/// The account as the audit record shows it: `DOMAIN\user`, or `user`; never the password.
pub fn account_label(c: &crate::secret::Credential) -> String {
    if c.domain.is_empty() {
        c.username.clone()
    } else {
        format!("{}\\{}", c.domain, c.username)
    }
}

/// Where the history lives.
pub trait History: Send + Sync + 'static {
    /// Keeps one entry.
    fn record(&self, entry: Entry) -> BoxFuture<'_, Result<(), String>>;
    /// Every entry that started at or after `since_ms`, oldest first.
    fn since(&self, since_ms: i64) -> BoxFuture<'_, Result<Vec<Entry>, String>>;
    /// One target's entries, newest first: at most `limit`, those whose check id sorts before
    /// `before` (a page token: the last check id of the previous page) when given.
    fn target<'a>(
        &'a self,
        target: &'a str,
        before: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Entry>, String>>;
}

/// `[history]`: retention and the trend settings, as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryFile {
    /// Entries older than this are dropped (default 604800 s: 7 days).
    pub retention_secs: u64,
    /// Without the store, at most this many entries are kept in memory (default 100000).
    pub max_entries: usize,
    /// The window of the flapping count and of the hourly cause trend (default 86400 s).
    pub flap_window_secs: u64,
    /// A target whose state changed more than this many times within the window is flapping
    /// (default 4).
    pub flap_changes: u32,
    /// The certificate forecast: certificates expiring within this many days (default 30).
    pub forecast_days: u32,
}

impl Default for HistoryFile {
    fn default() -> Self {
        HistoryFile {
            retention_secs: 7 * 86_400,
            max_entries: 100_000,
            flap_window_secs: 86_400,
            flap_changes: 4,
            forecast_days: 30,
        }
    }
}

/// The validated `[history]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Age limit.
    pub retention: Duration,
    /// Count limit (memory).
    pub max_entries: usize,
    /// Flapping and trend window.
    pub flap_window: Duration,
    /// More changes than this within the window: flapping.
    pub flap_changes: u32,
    /// Certificate forecast window.
    pub forecast: Duration,
}

impl HistoryFile {
    /// Validates; errors name the key.
    pub fn validate(&self) -> Result<HistoryConfig, String> {
        if self.retention_secs == 0 {
            return Err("history.retention_secs: must be > 0".into());
        }
        if self.max_entries == 0 {
            return Err("history.max_entries: must be > 0".into());
        }
        if self.flap_window_secs < 3600 || self.flap_window_secs > self.retention_secs {
            return Err("history.flap_window_secs: between 3600 and history.retention_secs".into());
        }
        if self.flap_changes == 0 {
            return Err("history.flap_changes: must be > 0".into());
        }
        Ok(HistoryConfig {
            retention: Duration::from_secs(self.retention_secs),
            max_entries: self.max_entries,
            flap_window: Duration::from_secs(self.flap_window_secs),
            flap_changes: self.flap_changes,
            forecast: Duration::from_secs(u64::from(self.forecast_days) * 86_400),
        })
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The bounded in-process history: at most `max_entries` entries, none older than
/// `retention`; the oldest leave first.
pub struct MemoryHistory {
    cfg: HistoryConfig,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    entries: Mutex<VecDeque<Entry>>,
}

impl MemoryHistory {
    /// A history on the wall clock.
    pub fn new(cfg: HistoryConfig) -> MemoryHistory {
        MemoryHistory::with_clock(cfg, Arc::new(now_ms))
    }

    /// A history on an injected clock (milliseconds since the epoch).
    pub fn with_clock(cfg: HistoryConfig, clock: Arc<dyn Fn() -> i64 + Send + Sync>) -> MemoryHistory {
        MemoryHistory {
            cfg,
            clock,
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn prune(&self, q: &mut VecDeque<Entry>) {
        let oldest = (self.clock)().saturating_sub(i64::try_from(self.cfg.retention.as_millis()).unwrap_or(i64::MAX));
        while q.front().is_some_and(|e| e.at_ms < oldest) || q.len() > self.cfg.max_entries {
            q.pop_front();
        }
    }
}

impl History for MemoryHistory {
    fn record(&self, entry: Entry) -> BoxFuture<'_, Result<(), String>> {
        let mut q = self.lock();
        // Kept in start order: a check that started earlier but finished later goes before
        // the later starters.
        let at = q.partition_point(|e| e.at_ms <= entry.at_ms);
        q.insert(at, entry);
        self.prune(&mut q);
        Box::pin(async { Ok(()) })
    }

    fn since(&self, since_ms: i64) -> BoxFuture<'_, Result<Vec<Entry>, String>> {
        let mut q = self.lock();
        self.prune(&mut q);
        let from = q.partition_point(|e| e.at_ms < since_ms);
        let out = q.range(from..).cloned().collect();
        Box::pin(async { Ok(out) })
    }

    fn target<'a>(
        &'a self,
        target: &'a str,
        before: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Entry>, String>> {
        let mut q = self.lock();
        self.prune(&mut q);
        let mut out: Vec<Entry> = q
            .iter()
            .filter(|e| e.target == target && before.is_none_or(|b| e.check_id.as_str() < b))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.check_id.cmp(&a.check_id));
        out.truncate(limit);
        Box::pin(async { Ok(out) })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    pub(crate) fn entry(at_ms: i64, target: &str, cause: &str) -> Entry {
        Entry {
            at_ms,
            duration_ms: 5,
            target: target.into(),
            source: Source::Sweep,
            check_id: format!("{at_ms:020}"),
            verdict: if cause == "OK" { "allow" } else { "deny" }.into(),
            primary_cause: cause.into(),
            causes: if cause == "OK" { vec![] } else { vec![cause.into()] },
            stages: vec![("tcp".into(), 120)],
            cert_fingerprint: String::new(),
            cert_not_after: None,
            account: None,
        }
    }

    fn cfg(retention_secs: u64, max_entries: usize) -> HistoryConfig {
        HistoryFile {
            retention_secs,
            max_entries,
            flap_window_secs: 3600,
            ..HistoryFile::default()
        }
        .validate()
        .expect("valid")
    }

    #[tokio::test]
    async fn retention_bounds_what_is_kept_by_age_and_count() {
        let now = Arc::new(AtomicI64::new(10_000_000));
        let clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::Relaxed))
        };
        let h = MemoryHistory::with_clock(cfg(3600, 5), clock);
        for i in 0..8 {
            h.record(entry(10_000_000 - 1000 * (8 - i), "a:3389", "OK"))
                .await
                .expect("kept");
        }
        // The count: the 5 newest.
        assert_eq!(h.len(), 5);
        let all = h.since(0).await.expect("read");
        assert_eq!(all.first().map(|e| e.at_ms), Some(10_000_000 - 5000));
        // The age: an hour later only what is younger than an hour remains.
        now.store(10_000_000 + 3_600_000 - 2500, Ordering::Relaxed);
        assert_eq!(h.since(0).await.expect("read").len(), 2);
        now.store(20_000_000, Ordering::Relaxed);
        assert!(h.since(0).await.expect("read").is_empty());
        assert!(h.is_empty());
    }

    #[tokio::test]
    async fn one_target_newest_first_in_pages() {
        let h = MemoryHistory::with_clock(cfg(86_400, 100), Arc::new(|| 1_000_000));
        for i in 0..7 {
            h.record(entry(900_000 + i, "a:3389", "OK")).await.expect("kept");
            h.record(entry(900_000 + i, "b:3389", "TCP_REFUSED"))
                .await
                .expect("kept");
        }
        let p1 = h.target("a:3389", None, 3).await.expect("page");
        assert_eq!(
            p1.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
            [900_006, 900_005, 900_004]
        );
        let token = p1.last().map(|e| e.check_id.clone());
        let p2 = h.target("a:3389", token.as_deref(), 10).await.expect("page");
        assert_eq!(p2.len(), 4);
        assert!(p2.iter().all(|e| e.target == "a:3389" && e.at_ms < 900_004));
    }

    #[test]
    fn config_errors_name_the_key() {
        let bad = |f: HistoryFile| f.validate().expect_err("invalid");
        assert!(bad(HistoryFile {
            retention_secs: 0,
            ..Default::default()
        })
        .starts_with("history.retention_secs"));
        assert!(bad(HistoryFile {
            flap_window_secs: 60,
            ..Default::default()
        })
        .starts_with("history.flap_window_secs"));
        assert!(bad(HistoryFile {
            flap_changes: 0,
            ..Default::default()
        })
        .starts_with("history.flap_changes"));
    }
}
