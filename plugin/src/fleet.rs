//! The fleet as the history sees it: every target's state with its inventory labels, the
//! flapping targets, the hourly cause trend and the certificate forecast, computed from the
//! entries of the trend window ([`crate::history::trend`]). Served by `FleetStatus` and kept
//! in the Prometheus gauges.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    history::{
        now_ms, target_key,
        trend::{self, CauseBucket, Forecast, TargetState},
        History, HistoryConfig,
    },
    sweep::{InventoryTarget, Scheduler},
};

/// One target's state and where the inventory puts it.
#[derive(Clone, Debug)]
pub struct TargetStatus {
    /// The state from the history.
    pub state: TargetState,
    /// The inventory row's labels.
    pub labels: BTreeMap<String, String>,
    /// Whether an inventory row names it.
    pub in_inventory: bool,
}

/// The fleet at one moment.
#[derive(Clone, Debug)]
pub struct Status {
    /// When it was computed, milliseconds since the epoch.
    pub as_of_ms: i64,
    /// By target.
    pub targets: Vec<TargetStatus>,
    /// Hourly targets per primary cause (of the targets selected).
    pub trend: Vec<CauseBucket>,
    /// Certificates expiring within the forecast window, soonest first.
    pub forecast: Vec<Forecast>,
}

/// What to select.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Every pair must be among the target's labels.
    pub labels: BTreeMap<String, String>,
    /// The last check found this cause (primary or not).
    pub cause: Option<String>,
}

/// The history, the trend settings and (with a scheduled sweep) the inventory.
pub struct Fleet {
    history: Arc<dyn History>,
    cfg: HistoryConfig,
    inventory: Option<Arc<Scheduler>>,
    default_port: u16,
}

impl Fleet {
    /// A view of `history`; labels come from the scheduler's inventory when there is one.
    pub fn new(
        history: Arc<dyn History>,
        cfg: HistoryConfig,
        inventory: Option<Arc<Scheduler>>,
        default_port: u16,
    ) -> Fleet {
        Fleet {
            history,
            cfg,
            inventory,
            default_port,
        }
    }

    /// The history.
    pub fn history(&self) -> &Arc<dyn History> {
        &self.history
    }

    /// The trend settings.
    pub fn config(&self) -> &HistoryConfig {
        &self.cfg
    }

    /// The configured default port (a `TargetHistory` request may name a host alone).
    pub fn default_port(&self) -> u16 {
        self.default_port
    }

    fn inventory(&self) -> BTreeMap<String, InventoryTarget> {
        self.inventory
            .as_ref()
            .map(|s| {
                s.inventory()
                    .iter()
                    .map(|t| (target_key(&t.host, t.port.unwrap_or(self.default_port)), t.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The fleet now, selected by `filter`.
    pub async fn status(&self, filter: &Filter) -> Result<Status, String> {
        let now = now_ms();
        let window = i64::try_from(self.cfg.flap_window.as_millis()).unwrap_or(i64::MAX);
        let entries = self.history.since(now.saturating_sub(window)).await?;
        Ok(compute(
            &entries,
            &self.inventory(),
            filter,
            now,
            window,
            self.cfg.flap_changes,
            i64::try_from(self.cfg.forecast.as_millis()).unwrap_or(i64::MAX),
        ))
    }
}

/// The pure part of [`Fleet::status`].
pub fn compute(
    entries: &[crate::history::Entry],
    inventory: &BTreeMap<String, InventoryTarget>,
    filter: &Filter,
    now_ms: i64,
    window_ms: i64,
    flap_changes: u32,
    forecast_ms: i64,
) -> Status {
    let checked = trend::states(entries, now_ms, window_ms, flap_changes);
    let seen: std::collections::BTreeSet<String> = checked.iter().map(|s| s.target.clone()).collect();
    // Inventory targets with no check in the window yet: listed, with an empty state.
    let unchecked = inventory
        .keys()
        .filter(|k| !seen.contains(*k))
        .map(|k| TargetState {
            target: k.clone(),
            ..TargetState::default()
        })
        .collect::<Vec<_>>();
    let mut targets: Vec<TargetStatus> = checked
        .into_iter()
        .chain(unchecked)
        .map(|state| {
            let row = inventory.get(&state.target);
            TargetStatus {
                labels: row.map(|r| r.labels.clone()).unwrap_or_default(),
                in_inventory: row.is_some(),
                state,
            }
        })
        .filter(|t| {
            filter.labels.iter().all(|(k, v)| t.labels.get(k) == Some(v))
                && filter
                    .cause
                    .as_ref()
                    .is_none_or(|c| t.state.causes.contains(c) || t.state.primary_cause == *c)
        })
        .collect();
    targets.sort_by(|a, b| a.state.target.cmp(&b.state.target));
    // The trend of the targets selected (no copy of the entries when all are).
    let trend = if filter.labels.is_empty() && filter.cause.is_none() {
        trend::cause_trend(entries, now_ms, window_ms)
    } else {
        let selected: std::collections::BTreeSet<&str> = targets.iter().map(|t| t.state.target.as_str()).collect();
        let kept: Vec<crate::history::Entry> = entries
            .iter()
            .filter(|e| selected.contains(e.target.as_str()))
            .cloned()
            .collect();
        trend::cause_trend(&kept, now_ms, window_ms)
    };
    let states: Vec<TargetState> = targets.iter().map(|t| t.state.clone()).collect();
    Status {
        as_of_ms: now_ms,
        trend,
        forecast: trend::cert_forecast(&states, now_ms, forecast_ms),
        targets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::entry;

    /// Inventory rows `host` on port 3389, labelled `site=<site>` unless the site is empty.
    fn inventory(rows: &[(&str, &str)]) -> BTreeMap<String, InventoryTarget> {
        rows.iter()
            .map(|(host, site)| {
                let labels = (!site.is_empty())
                    .then(|| ("site".to_owned(), (*site).to_owned()))
                    .into_iter()
                    .collect();
                let row = InventoryTarget {
                    host: (*host).into(),
                    port: None,
                    expected_name: String::new(),
                    expected_computer: String::new(),
                    labels,
                };
                (format!("{host}:3389"), row)
            })
            .collect()
    }

    #[test]
    fn inventory_targets_not_checked_yet_are_listed() {
        const NOW: i64 = 1_800_000_000_000;
        let es = vec![entry(NOW - 1000, "b:3389", "OK")];
        let inv = inventory(&[("a", ""), ("b", "")]);
        let s = compute(&es, &inv, &Filter::default(), NOW, 86_400_000, 4, 30 * 86_400_000);
        let names: Vec<_> = s
            .targets
            .iter()
            .map(|t| (t.state.target.as_str(), t.state.last_ms))
            .collect();
        assert_eq!(names, vec![("a:3389", 0), ("b:3389", NOW - 1000)]);
        assert!(s.targets[0].in_inventory && s.targets[0].state.verdict.is_empty());
        // A cause filter selects checked targets only.
        let f = Filter {
            cause: Some("OK".into()),
            ..Filter::default()
        };
        let s = compute(&es, &inv, &f, NOW, 86_400_000, 4, 30 * 86_400_000);
        assert_eq!(s.targets.len(), 1);
    }

    #[test]
    fn labels_and_cause_select_targets() {
        const NOW: i64 = 1_800_000_000_000;
        let es = vec![
            entry(NOW - 1000, "a:3389", "OK"),
            entry(NOW - 1000, "b:3389", "CERT_EXPIRED"),
            entry(NOW - 1000, "c:3389", "CERT_EXPIRED"),
        ];
        let inv = inventory(&[("a", "par"), ("b", "par"), ("c", "lyo")]);
        let run = |labels: &[(&str, &str)], cause: Option<&str>| {
            let f = Filter {
                labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                cause: cause.map(str::to_owned),
            };
            compute(&es, &inv, &f, NOW, 86_400_000, 4, 30 * 86_400_000)
                .targets
                .iter()
                .map(|t| t.state.target.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&[], None), ["a:3389", "b:3389", "c:3389"]);
        assert_eq!(run(&[("site", "par")], None), ["a:3389", "b:3389"]);
        assert_eq!(run(&[("site", "par")], Some("CERT_EXPIRED")), ["b:3389"]);
        assert!(run(&[("team", "x")], None).is_empty());
        let s = compute(&es, &inv, &Filter::default(), NOW, 86_400_000, 4, 30 * 86_400_000);
        assert!(s.targets.iter().all(|t| t.in_inventory));
        assert_eq!(s.trend.iter().map(|b| b.targets).sum::<u32>(), 3);
        let par = Filter {
            labels: [("site".to_owned(), "par".to_owned())].into_iter().collect(),
            cause: None,
        };
        let s = compute(&es, &inv, &par, NOW, 86_400_000, 4, 30 * 86_400_000);
        assert_eq!(
            s.trend.iter().map(|b| b.targets).sum::<u32>(),
            2,
            "the trend of the selected targets"
        );
    }
}
