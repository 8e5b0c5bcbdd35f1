//! One sweep over an inventory of targets: every target probed like a gateway's check, but
//! never with a credential (probe stages and the NLA challenge only), so a sweep can never cost
//! a lockout attempt.
//!
//! The inventory is a CSV file with a header line, columns
//! `host,port,expected_name,expected_computer,labels` (all but `host` may be empty; `labels` as
//! `site=par;team=win`). A bad line is an error naming the line.
//!
//! `serve` with `[sweep] inventory` sweeps on a schedule ([`Scheduler`]): one sweep per slot of
//! `interval_secs` (slots are aligned on the Unix epoch, so every replica agrees on them), the
//! targets spread over the slot with jitter (never all at once), at most `concurrency` checks
//! at once and `per_host_concurrency` per host. With the shared store a lease decides which
//! replica sweeps a slot ([`crate::store::lease`]): one sweep per interval for the cluster. The
//! inventory is read again when the file changes; a bad new version is logged with its line
//! and the last good one kept.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    check::{CheckInput, Checker},
    history::{Entry, History, Source},
    report::Report,
};

/// The header an inventory starts with.
pub const HEADER: &str = "host,port,expected_name,expected_computer,labels";

/// One inventory line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryTarget {
    /// Host name or IP literal.
    pub host: String,
    /// Port (`None`: the configured default).
    pub port: Option<u16>,
    /// Name the certificate must carry (empty: the host).
    pub expected_name: String,
    /// Computer the NLA challenge must name (may be empty).
    pub expected_computer: String,
    /// `key=value` labels.
    pub labels: BTreeMap<String, String>,
}

/// Parses an inventory; errors name the line (1-based, the header is line 1).
pub fn parse_inventory(text: &str) -> Result<Vec<InventoryTarget>, String> {
    let mut lines = text.lines().enumerate();
    let header = lines
        .by_ref()
        .find(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(_, l)| l.trim().to_ascii_lowercase().replace(' ', ""));
    if header.as_deref() != Some(HEADER) {
        return Err(format!("line 1: the header must be {HEADER:?}"));
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if cols.len() > 5 {
            return Err(format!("line {n}: {} columns, at most 5", cols.len()));
        }
        let col = |k: usize| cols.get(k).copied().unwrap_or("");
        let host = col(0);
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            return Err(format!("line {n}: host {host:?} is not a host name or IP literal"));
        }
        let port = match col(1) {
            "" => None,
            p => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("line {n}: port {p:?} is not 1..65535"))?,
            ),
        };
        let mut labels = BTreeMap::new();
        for kv in col(4).split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("line {n}: label {kv:?} is not key=value"))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        out.push(InventoryTarget {
            host: host.to_owned(),
            port,
            expected_name: col(2).to_owned(),
            expected_computer: col(3).to_owned(),
            labels,
        });
    }
    Ok(out)
}

/// `[sweep]`: the scheduled sweep, as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepFile {
    /// The inventory CSV (default none: no scheduled sweep).
    pub inventory: Option<PathBuf>,
    /// One sweep per interval (default 900 s).
    pub interval_secs: u64,
    /// Sweep checks at once, over all targets (default 8).
    pub concurrency: usize,
    /// Sweep checks at once towards one host (default 1).
    pub per_host_concurrency: usize,
    /// The inventory label whose values split the certificate gauge (default none).
    pub metric_label: Option<String>,
}

impl Default for SweepFile {
    fn default() -> Self {
        SweepFile {
            inventory: None,
            interval_secs: 900,
            concurrency: 8,
            per_host_concurrency: 1,
            metric_label: None,
        }
    }
}

/// The validated `[sweep]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepConfig {
    /// The inventory file (read at start to validate it, then whenever it changes).
    pub inventory: PathBuf,
    /// The slot length.
    pub interval: Duration,
    /// Global limit.
    pub concurrency: usize,
    /// Per-host limit.
    pub per_host: usize,
    /// The label of the certificate gauge.
    pub metric_label: Option<String>,
}

impl SweepFile {
    /// Validates (`None` without an inventory); the inventory is read now, so a bad line stops
    /// the start with the key, the file and the line.
    pub fn validate(&self) -> Result<Option<SweepConfig>, String> {
        if self.interval_secs == 0 || self.interval_secs > 7 * 86_400 {
            return Err("sweep.interval_secs: between 1 and 604800".into());
        }
        if self.concurrency == 0 {
            return Err("sweep.concurrency: must be > 0".into());
        }
        if self.per_host_concurrency == 0 {
            return Err("sweep.per_host_concurrency: must be > 0".into());
        }
        if let Some(l) = &self.metric_label {
            let ok = l.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !l.starts_with("__")
                && l != "le";
            if !ok {
                return Err(format!("sweep.metric_label: {l:?} is not a Prometheus label name"));
            }
        }
        let Some(path) = &self.inventory else {
            return Ok(None);
        };
        read_inventory(path).map_err(|e| format!("sweep.inventory: {e}"))?;
        Ok(Some(SweepConfig {
            inventory: path.clone(),
            interval: Duration::from_secs(self.interval_secs),
            concurrency: self.concurrency,
            per_host: self.per_host_concurrency,
            metric_label: self.metric_label.clone(),
        }))
    }
}

/// Reads and parses an inventory file; errors name the file and the line.
pub fn read_inventory(path: &std::path::Path) -> Result<Vec<InventoryTarget>, String> {
    std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| parse_inventory(&t))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The input of a sweep check: the inventory's target, the config's defaults, never a
/// credential (a sweep cannot spend a lockout attempt).
fn sweep_input(cfg: &crate::config::Config, t: &InventoryTarget, request_id: String) -> CheckInput {
    CheckInput {
        request_id,
        host: t.host.clone(),
        port: t.port.unwrap_or(cfg.default_port),
        expected_name: if t.expected_name.is_empty() {
            t.host.clone()
        } else {
            t.expected_name.clone()
        },
        requested: cfg.default_protocols,
        minimum: cfg.minimum_protocol,
        expected_computer: t.expected_computer.clone(),
        credential: None,
        requester_user: "sweep".into(),
        requester_source: "sweep".into(),
        budget: cfg.default_budget.max(Duration::from_secs(1)),
    }
}

/// Runs one check of a sweep and keeps it in the history.
async fn sweep_check(checker: &Checker, input: CheckInput, history: Option<&Arc<dyn History>>) -> Report {
    let (host, port) = (input.host.clone(), input.port);
    let report = checker.check(input).await;
    if let Some(h) = history {
        if let Err(e) = h.record(Entry::new(&report, &host, port, None, Source::Sweep)).await {
            tracing::warn!(error = %e, "check history not written");
        }
    }
    report
}

/// Who may sweep a slot: always this replica, or the holder of the store's lease.
pub trait Lease: Send + Sync + 'static {
    /// Whether this replica sweeps slot `slot` (the first to claim it does).
    fn claim(&self, slot: i64) -> futures::future::BoxFuture<'_, Result<bool, String>>;
}

/// Without the store: one replica, every slot is its own.
pub struct LocalLease;

impl Lease for LocalLease {
    fn claim(&self, _slot: i64) -> futures::future::BoxFuture<'_, Result<bool, String>> {
        Box::pin(async { Ok(true) })
    }
}

/// Offsets of `n` checks within a slot of `interval`: check `i` in the `i`-th of `n` equal
/// parts, at a random point of it (`jitter[i]` in `[0, 1)`), so the checks are spread over the
/// slot and never start together.
pub fn offsets(interval: Duration, jitter: &[f64]) -> Vec<Duration> {
    let n = jitter.len().max(1) as f64;
    jitter
        .iter()
        .enumerate()
        .map(|(i, j)| interval.mul_f64(((i as f64 + j.clamp(0.0, 0.999)) / n).min(1.0)))
        .collect()
}

fn jitter(n: usize) -> Vec<f64> {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; n * 2];
    // A failing system RNG leaves the checks at the start of their parts: still spread.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes
        .chunks_exact(2)
        .map(|c| f64::from(u16::from_le_bytes([c[0], c[1]])) / 65_536.0)
        .collect()
}

/// The scheduled sweep of `serve`.
pub struct Scheduler {
    checker: Arc<Checker>,
    cfg: SweepConfig,
    history: Arc<dyn History>,
    lease: Arc<dyn Lease>,
    global: Arc<tokio::sync::Semaphore>,
    per_host: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// The inventory in force and the file's modification time it was read at.
    inventory: Mutex<(Option<std::time::SystemTime>, Arc<Vec<InventoryTarget>>)>,
}

impl Scheduler {
    /// A scheduler; the inventory is read at the first slot.
    pub fn new(checker: Arc<Checker>, cfg: SweepConfig, history: Arc<dyn History>, lease: Arc<dyn Lease>) -> Scheduler {
        Scheduler {
            checker,
            global: Arc::new(tokio::sync::Semaphore::new(cfg.concurrency)),
            cfg,
            history,
            lease,
            per_host: Mutex::new(HashMap::new()),
            inventory: Mutex::new((None, Arc::new(Vec::new()))),
        }
    }

    /// The inventory, read again when the file's modification time changed; a bad new version
    /// is logged (with its line) and the last good one kept.
    pub fn inventory(&self) -> Arc<Vec<InventoryTarget>> {
        let mtime = std::fs::metadata(&self.cfg.inventory).and_then(|m| m.modified()).ok();
        let mut inv = self.inventory.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if mtime.is_some() && mtime != inv.0 {
            match read_inventory(&self.cfg.inventory) {
                Ok(targets) => {
                    tracing::info!(targets = targets.len(), "sweep inventory read");
                    *inv = (mtime, Arc::new(targets));
                }
                Err(e) => {
                    tracing::error!(error = %e, "sweep inventory not reloaded: keeping the last good one");
                    inv.0 = mtime;
                }
            }
        }
        inv.1.clone()
    }

    fn host_limit(&self, host: &str) -> Arc<tokio::sync::Semaphore> {
        let mut m = self.per_host.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(host.to_ascii_lowercase())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.cfg.per_host)))
            .clone()
    }

    /// Sweeps every slot this replica wins, from the next slot boundary until `stop`.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()> + Send) {
        tokio::pin!(stop);
        let interval_ms = i64::try_from(self.cfg.interval.as_millis()).unwrap_or(i64::MAX).max(1);
        let mut tasks = tokio::task::JoinSet::new();
        'slots: loop {
            let now = crate::history::now_ms();
            let slot = now.div_euclid(interval_ms) + 1;
            let start = tokio::time::Instant::now()
                + Duration::from_millis(u64::try_from(slot * interval_ms - now).unwrap_or(0));
            tokio::select! {
                () = &mut stop => break 'slots,
                () = tokio::time::sleep_until(start) => {}
            }
            match self.lease.claim(slot).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(slot, "sweep slot taken by another replica");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(slot, error = %e, "sweep lease not taken: skipping the slot");
                    continue;
                }
            }
            let inventory = self.inventory();
            tracing::info!(slot, targets = inventory.len(), "sweep started");
            let offsets = offsets(self.cfg.interval, &jitter(inventory.len()));
            for (i, (t, at)) in inventory.iter().zip(offsets).enumerate() {
                tokio::select! {
                    () = &mut stop => break 'slots,
                    () = tokio::time::sleep_until(start + at) => {}
                }
                // Finished checks leave the set now: a completed task keeps its memory until
                // joined.
                while tasks.try_join_next().is_some() {}
                let input = sweep_input(self.checker.config(), t, format!("sweep-{slot}-{i}"));
                let (me, host) = (self.clone(), self.host_limit(&t.host));
                tasks.spawn(async move {
                    let Ok(_global) = me.global.clone().acquire_owned().await else {
                        return;
                    };
                    let Ok(_host) = host.acquire_owned().await else {
                        return;
                    };
                    sweep_check(&me.checker, input, Some(&me.history)).await;
                });
            }
        }
        // Stopped: sweep checks carry no credential, so cancelling those in flight costs
        // nothing but their answer.
        tasks.shutdown().await;
    }
}

/// Probes every target, at most `concurrency` at once, without a credential; the reports in
/// inventory order, each kept in `history` when given.
pub async fn run_pass(
    checker: Arc<Checker>,
    targets: &[InventoryTarget],
    concurrency: usize,
    history: Option<Arc<dyn History>>,
) -> Vec<Report> {
    use futures::StreamExt;
    // At most `concurrency` checks exist at once (each spawned, so they spread over the
    // runtime's threads, and a slow one holds only its own slot); then inventory order.
    let tasks = targets.iter().enumerate().map(|(i, t)| {
        let input = sweep_input(checker.config(), t, format!("sweep-{i}"));
        let (checker, history) = (checker.clone(), history.clone());
        let task = tokio::spawn(async move { sweep_check(&checker, input, history.as_ref()).await });
        async move { (i, task.await) }
    });
    let mut done: Vec<(usize, Report)> = futures::stream::iter(tasks)
        .buffer_unordered(concurrency.max(1))
        .filter_map(|(i, r)| async move {
            r.map(|r| (i, r))
                .inspect_err(|e| tracing::error!(error = %e, "sweep task failed"))
                .ok()
        })
        .collect()
        .await;
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_lines_and_their_errors() {
        let inv = parse_inventory(
            "host,port,expected_name,expected_computer,labels\n\
             # a comment\n\
             rdp1.example.test,3389,,RDP1,site=par;team=win\n\
             10.0.0.5,,rdp5.example.test,,\n\
             rdp9\n",
        )
        .expect("valid");
        assert_eq!(inv.len(), 3);
        assert_eq!(inv[0].port, Some(3389));
        assert_eq!(inv[0].labels.get("site").map(String::as_str), Some("par"));
        assert_eq!(inv[1].port, None);
        assert_eq!(inv[1].expected_name, "rdp5.example.test");
        assert_eq!(inv[2].host, "rdp9");
        let err = |t: &str| parse_inventory(t).expect_err("invalid");
        assert!(err("host,port\nrdp1,3389\n").starts_with("line 1:"));
        assert!(err(&format!("{HEADER}\nrdp1,99999\n")).starts_with("line 2:"));
        assert!(err(&format!("{HEADER}\nrdp1,3389\n,3389\n")).starts_with("line 3:"));
        assert!(err(&format!("{HEADER}\nrdp1,3389,,,site\n")).contains("key=value"));
        assert!(err(&format!("{HEADER}\nrdp1,1,a,b,c=d,extra\n")).contains("columns"));
    }

    #[test]
    fn offsets_spread_the_checks_over_the_interval() {
        let interval = Duration::from_secs(900);
        let o = offsets(interval, &[0.0, 0.5, 0.999, 0.25]);
        assert_eq!(o[0], Duration::ZERO);
        assert_eq!(o[1], Duration::from_secs_f64(900.0 * 1.5 / 4.0));
        assert!(o.windows(2).all(|w| w[0] < w[1]), "in order: {o:?}");
        assert!(o.iter().all(|d| *d < interval));
        // Each check in its own quarter.
        for (i, d) in o.iter().enumerate() {
            assert_eq!((d.as_secs_f64() / 225.0) as usize, i);
        }
        assert!(offsets(interval, &[]).is_empty());
        let j = jitter(1000);
        assert!(j.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(j.iter().any(|x| *x > 0.5) && j.iter().any(|x| *x < 0.5), "random");
    }

    #[test]
    fn the_inventory_is_read_again_when_it_changes_and_a_bad_version_keeps_the_last_good() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = dir.path().join("inv.csv");
        let write = |body: String, secs: u64| {
            std::fs::write(&inv, body).expect("write");
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs);
            std::fs::File::options()
                .append(true)
                .open(&inv)
                .and_then(|f| f.set_modified(t))
                .expect("mtime");
        };
        write(format!("{HEADER}\nrdp1,3389,,,\n"), 0);
        let mut file = crate::config::FileConfig::default();
        file.cert.pin_store = "memory".into();
        file.sweep.inventory = Some(inv.clone());
        let cfg = Arc::new(file.validate().expect("valid"));
        let history = Arc::new(crate::history::MemoryHistory::new(cfg.history));
        let sc = cfg.sweep.clone().expect("sweep");
        let checker = Arc::new(Checker::new(cfg).expect("checker"));
        let s = Scheduler::new(checker, sc, history, Arc::new(LocalLease));
        assert_eq!(s.inventory().len(), 1);
        write(format!("{HEADER}\nrdp1,3389,,,\nrdp2,3389,,,\n"), 60);
        assert_eq!(s.inventory().len(), 2, "changed: read again");
        write(format!("{HEADER}\nrdp1,3389,,,\nrdp2,nope,,,\nrdp3,,,,\n"), 120);
        assert_eq!(s.inventory().len(), 2, "a bad version: the last good one");
        write(format!("{HEADER}\nrdp3,,,,\n"), 180);
        assert_eq!(
            s.inventory().iter().map(|t| t.host.as_str()).collect::<Vec<_>>(),
            ["rdp3"]
        );
    }

    #[test]
    fn sweep_config_errors_name_the_key_and_the_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let inv = dir.path().join("inv.csv");
        std::fs::write(&inv, format!("{HEADER}\nrdp1,3389,,,\nrdp2,x,,,\n")).expect("write");
        let f = SweepFile {
            inventory: Some(inv.clone()),
            ..SweepFile::default()
        };
        let e = f.validate().expect_err("bad line");
        assert!(e.starts_with("sweep.inventory:") && e.contains("line 3"), "{e}");
        std::fs::write(&inv, format!("{HEADER}\nrdp1,3389,,,\n")).expect("write");
        assert_eq!(
            f.validate().expect("valid").map(|c| c.interval),
            Some(Duration::from_secs(900))
        );
        assert_eq!(SweepFile::default().validate(), Ok(None));
        for (f, key) in [
            (
                SweepFile {
                    interval_secs: 0,
                    ..SweepFile::default()
                },
                "sweep.interval_secs",
            ),
            (
                SweepFile {
                    concurrency: 0,
                    ..SweepFile::default()
                },
                "sweep.concurrency",
            ),
            (
                SweepFile {
                    per_host_concurrency: 0,
                    ..SweepFile::default()
                },
                "sweep.per_host_concurrency",
            ),
        ] {
            assert!(f.validate().expect_err("invalid").starts_with(key));
        }
    }
}
