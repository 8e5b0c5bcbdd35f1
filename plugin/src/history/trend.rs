//! Pure computations over history entries, with the clock passed in: every target's current
//! state and since when, its state changes within a window (more than N: flapping, with the
//! sequence of causes as evidence), the number of targets per primary cause in hourly buckets,
//! and the certificate forecast.
//!
//! A target's *state* is its verdict and primary cause: `TLS_HANDSHAKE_FAILED` after
//! `TCP_TIMEOUT` is a change even though both deny.

use std::collections::{BTreeMap, BTreeSet};

use super::Entry;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// One target as the history sees it now. An inventory target with no check in the window yet
/// has the default: an empty verdict and cause, `last_ms` 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetState {
    /// `host:port`.
    pub target: String,
    /// Verdict of the last check.
    pub verdict: String,
    /// Primary cause of the last check.
    pub primary_cause: String,
    /// Every cause of the last check.
    pub causes: Vec<String>,
    /// Start of the first check of the current state.
    pub since_ms: i64,
    /// `false` when the state was already this at the oldest entry read (it may be older).
    pub since_exact: bool,
    /// Start of the last check.
    pub last_ms: i64,
    /// State changes within the window.
    pub changes: u32,
    /// More than the threshold's changes within the window.
    pub flapping: bool,
    /// The primary causes of the states within the window, oldest first, one per state run
    /// (the evidence of flapping).
    pub sequence: Vec<String>,
    /// The last certificate seen: its notAfter (seconds since the epoch) …
    pub cert_not_after: Option<i64>,
    /// … and its fingerprint.
    pub cert_fingerprint: String,
}

impl TargetState {
    /// Whole days until the certificate expires, at `now_ms` (negative: whole days since it
    /// expired; 0 within a day either side).
    pub fn cert_days_left(&self, now_ms: i64) -> Option<i64> {
        self.cert_not_after.map(|t| (t.saturating_mul(1000) - now_ms) / DAY_MS)
    }
}

fn state(e: &Entry) -> (&str, &str) {
    (e.verdict.as_str(), e.primary_cause.as_str())
}

/// Every target's state, by target; `entries` in any order. Changes are counted within
/// `[now_ms - window_ms, now_ms]`; more than `flap_changes` is flapping.
pub fn states(entries: &[Entry], now_ms: i64, window_ms: i64, flap_changes: u32) -> Vec<TargetState> {
    let mut by_target: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        by_target.entry(e.target.as_str()).or_default().push(e);
    }
    let window_start = now_ms.saturating_sub(window_ms);
    by_target
        .into_iter()
        .filter_map(|(target, mut es)| {
            es.sort_by(|a, b| (a.at_ms, &a.check_id).cmp(&(b.at_ms, &b.check_id)));
            let last = *es.last()?;
            // The start of the current run of the last state.
            let run_start = es.iter().rposition(|e| state(e) != state(last)).map_or(0, |i| i + 1);
            let mut changes = 0u32;
            let mut sequence: Vec<String> = Vec::new();
            let mut prev: Option<&Entry> = None;
            for e in es.iter().copied() {
                if e.at_ms >= window_start {
                    let changed = prev.is_some_and(|p| state(p) != state(e));
                    if changed {
                        changes += 1;
                    }
                    if changed || sequence.is_empty() {
                        sequence.push(e.primary_cause.clone());
                    }
                }
                prev = Some(e);
            }
            let cert = es.iter().rev().find(|e| e.cert_not_after.is_some());
            Some(TargetState {
                target: target.to_owned(),
                verdict: last.verdict.clone(),
                primary_cause: last.primary_cause.clone(),
                causes: last.causes.clone(),
                since_ms: es.get(run_start).map_or(last.at_ms, |e| e.at_ms),
                since_exact: run_start > 0,
                last_ms: last.at_ms,
                changes,
                flapping: changes > flap_changes,
                sequence,
                cert_not_after: cert.and_then(|e| e.cert_not_after),
                cert_fingerprint: cert.map(|e| e.cert_fingerprint.clone()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Targets per primary cause in one hour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CauseBucket {
    /// Start of the hour, milliseconds since the epoch.
    pub hour_ms: i64,
    /// The primary cause.
    pub cause: String,
    /// Targets whose last check in that hour had that primary cause.
    pub targets: u32,
}

/// Per hour within `[now_ms - window_ms, now_ms]` and per primary cause, how many targets
/// had it as the primary cause of their last check in that hour; by hour, then cause.
pub fn cause_trend(entries: &[Entry], now_ms: i64, window_ms: i64) -> Vec<CauseBucket> {
    let from = now_ms.saturating_sub(window_ms).div_euclid(HOUR_MS) * HOUR_MS;
    // (hour, target) → (at, cause) of the last check in that hour.
    let mut last: BTreeMap<(i64, &str), (i64, &str, &str)> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.at_ms >= from && e.at_ms <= now_ms) {
        let hour = e.at_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let slot =
            last.entry((hour, e.target.as_str()))
                .or_insert((e.at_ms, e.check_id.as_str(), e.primary_cause.as_str()));
        if (e.at_ms, e.check_id.as_str()) >= (slot.0, slot.1) {
            *slot = (e.at_ms, e.check_id.as_str(), e.primary_cause.as_str());
        }
    }
    let mut counts: BTreeMap<(i64, &str), u32> = BTreeMap::new();
    for ((hour, _), (_, _, cause)) in last {
        *counts.entry((hour, cause)).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|((hour_ms, cause), targets)| CauseBucket {
            hour_ms,
            cause: cause.to_owned(),
            targets,
        })
        .collect()
}

/// A certificate that expires soon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forecast {
    /// `host:port`.
    pub target: String,
    /// notAfter, seconds since the epoch.
    pub not_after: i64,
    /// Whole days left (negative: expired).
    pub days_left: i64,
    /// The certificate's fingerprint.
    pub fingerprint: String,
}

/// Targets whose last certificate expires within `within_ms` of `now_ms` (expired ones
/// included), soonest first.
pub fn cert_forecast(states: &[TargetState], now_ms: i64, within_ms: i64) -> Vec<Forecast> {
    let mut out: Vec<Forecast> = states
        .iter()
        .filter_map(|s| {
            let not_after = s.cert_not_after?;
            (not_after.saturating_mul(1000) <= now_ms.saturating_add(within_ms)).then(|| Forecast {
                target: s.target.clone(),
                not_after,
                days_left: s.cert_days_left(now_ms).unwrap_or_default(),
                fingerprint: s.cert_fingerprint.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| (a.not_after, &a.target).cmp(&(b.not_after, &b.target)));
    out
}

/// Distinct targets in `entries`.
pub fn target_count(entries: &[Entry]) -> usize {
    entries.iter().map(|e| e.target.as_str()).collect::<BTreeSet<_>>().len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::entry;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn state_since_and_changes_within_the_window() {
        let mut es = vec![
            entry(NOW - 30 * HOUR_MS, "a:3389", "OK"),
            entry(NOW - 20 * HOUR_MS, "a:3389", "TLS_HANDSHAKE_FAILED"),
            entry(NOW - 10 * HOUR_MS, "a:3389", "TLS_HANDSHAKE_FAILED"),
            entry(NOW - HOUR_MS, "a:3389", "TLS_HANDSHAKE_FAILED"),
            entry(NOW - 2 * HOUR_MS, "b:3389", "OK"),
        ];
        es.reverse();
        let s = states(&es, NOW, 24 * HOUR_MS, 4);
        assert_eq!(s.len(), 2);
        let a = &s[0];
        assert_eq!(a.primary_cause, "TLS_HANDSHAKE_FAILED");
        assert_eq!(a.since_ms, NOW - 20 * HOUR_MS);
        assert!(a.since_exact);
        assert_eq!(a.last_ms, NOW - HOUR_MS);
        // OK → TLS happened 20 h ago: inside a 24 h window, outside a 12 h one.
        assert_eq!(a.changes, 1);
        assert_eq!(a.sequence, ["TLS_HANDSHAKE_FAILED"]);
        assert_eq!(states(&es, NOW, 12 * HOUR_MS, 4)[0].changes, 0);
        assert!(!s[1].since_exact, "b was OK at its first entry: since at least then");
    }

    #[test]
    fn a_target_changing_more_than_n_times_is_flapping_with_its_sequence() {
        let causes = [
            "OK",
            "TCP_TIMEOUT",
            "OK",
            "TCP_TIMEOUT",
            "OK",
            "TCP_TIMEOUT",
            "TCP_TIMEOUT",
        ];
        let es: Vec<Entry> = causes
            .iter()
            .enumerate()
            .map(|(i, c)| entry(NOW - 7 * HOUR_MS + i as i64 * HOUR_MS, "f:3389", c))
            .collect();
        let s = &states(&es, NOW, 24 * HOUR_MS, 4)[0];
        assert_eq!(s.changes, 5);
        assert!(s.flapping);
        assert_eq!(
            s.sequence,
            ["OK", "TCP_TIMEOUT", "OK", "TCP_TIMEOUT", "OK", "TCP_TIMEOUT"]
        );
        assert!(
            !states(&es, NOW, 24 * HOUR_MS, 5)[0].flapping,
            "5 changes is not more than 5"
        );
        // Only the last three hours: TIMEOUT → OK → TIMEOUT, two changes.
        assert_eq!(states(&es, NOW, 3 * HOUR_MS, 4)[0].changes, 2);
    }

    #[test]
    fn targets_per_cause_in_hourly_buckets() {
        let h0 = (NOW - 3 * HOUR_MS).div_euclid(HOUR_MS) * HOUR_MS;
        let es = vec![
            entry(h0 + 10, "a:1", "OK"),
            entry(h0 + 20, "a:1", "CERT_EXPIRED"),
            entry(h0 + 30, "b:1", "CERT_EXPIRED"),
            entry(h0 + HOUR_MS + 5, "a:1", "OK"),
            entry(h0 + HOUR_MS + 6, "b:1", "OK"),
            entry(NOW - 30 * HOUR_MS, "c:1", "TCP_REFUSED"),
        ];
        let t = cause_trend(&es, NOW, 24 * HOUR_MS);
        let got: Vec<(i64, &str, u32)> = t
            .iter()
            .map(|b| (b.hour_ms - h0, b.cause.as_str(), b.targets))
            .collect();
        assert_eq!(got, [(0, "CERT_EXPIRED", 2), (HOUR_MS, "OK", 2)]);
    }

    #[test]
    fn forecast_is_soonest_first_within_the_window() {
        let day = 86_400;
        let now_s = NOW / 1000;
        let mut es = Vec::new();
        for (t, days) in [("late:1", 40), ("soon:1", 3), ("mid:1", 12), ("gone:1", -2)] {
            let mut e = entry(NOW - 1000, t, "OK");
            e.cert_not_after = Some(now_s + days * day + 60);
            e.cert_fingerprint = format!("fp-{t}");
            es.push(e);
        }
        es.push(entry(NOW - 1000, "nocert:1", "TCP_REFUSED"));
        let s = states(&es, NOW, 24 * HOUR_MS, 4);
        let f = cert_forecast(&s, NOW, 30 * DAY_MS);
        let got: Vec<(&str, i64)> = f.iter().map(|x| (x.target.as_str(), x.days_left)).collect();
        assert_eq!(got, [("gone:1", -1), ("soon:1", 3), ("mid:1", 12)]);
        assert_eq!(target_count(&es), 5);
    }
}
