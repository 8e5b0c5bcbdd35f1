//! The demo and the integration harness: the scenario's fleet and directory, a plugin
//! configuration that trusts them, and (for the demo) the plugin itself in-process.

use std::{path::PathBuf, sync::Arc, time::Duration};

use rdp_preflight::config::FileConfig;

use crate::{
    directory::{self, DirectoryOptions},
    driver::{self, DirectoryHandle, PlayOptions, RowResult, SimEnv},
    scenario::Scenario,
    targets,
};

/// The default scenario, shipped in the binary so `gateway-sim demo` needs no file.
pub const DEFAULT_SCENARIO: &str = include_str!("../scenarios/default.toml");

/// The fleet `gateway-sim sweep` sweeps by default: a flapping path, certificates expiring
/// within the forecast window, a refused port, an NLA target.
pub const SWEEP_SCENARIO: &str = include_str!("../scenarios/sweep.toml");

/// A running simulated estate and the plugin configuration that fits it.
pub struct Harness {
    /// Fleet and directory.
    pub env: SimEnv,
    /// Plugin configuration: loopback allowed, the sim CAs trusted, pins in memory, the
    /// simulated directory as the credential backend.
    pub plugin_config: FileConfig,
    /// Holds the CA files the configuration points at.
    pub files: tempfile::TempDir,
}

impl Harness {
    /// Starts the scenario's fleet and, when it declares accounts, the simulated directory.
    pub async fn start(scenario: &Scenario) -> Result<Harness, String> {
        let fleet = targets::start_fleet(&scenario.targets)
            .await
            .map_err(|e| format!("fleet: {e}"))?;
        let files = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let ca = files.path().join("fleet-ca.pem");
        std::fs::write(&ca, fleet.ca_pem()).map_err(|e| format!("{}: {e}", ca.display()))?;
        let mut cfg = FileConfig::default();
        cfg.policy.allow_loopback = true;
        cfg.cert.trust_anchors = vec![ca];
        cfg.cert.pin_store = "memory".into();
        cfg.log.level = "warn".into();
        let mut env = SimEnv::new(fleet);
        if !scenario.accounts.is_empty() {
            let mut opts = DirectoryOptions::default();
            if let Some(d) = &scenario.directory {
                opts.plain = d.plain || d.require_tls;
                opts.require_tls = d.require_tls;
                opts.lockout_threshold = d.lockout_threshold;
            }
            let dir = directory::start_directory(&scenario.accounts, opts)
                .await
                .map_err(|e| format!("directory: {e}"))?;
            let dca = files.path().join("directory-ca.pem");
            std::fs::write(&dca, dir.ca_pem()).map_err(|e| format!("{}: {e}", dca.display()))?;
            cfg.directory.servers = vec![dir.ldaps_url()];
            cfg.directory.ca_file = Some(dca);
            cfg.directory.bind_as = format!("dn:{}", dir.user_dn("{user}"));
            env = env.with_directory(dir);
        }
        if Harness::needs_kdc(scenario) {
            let spns: Vec<String> = scenario
                .targets
                .iter()
                .filter_map(|t| t.nla.kerberos_spn.clone())
                .collect();
            let kdc = crate::kdc::start_kdc(&scenario.accounts, &spns)
                .await
                .map_err(|e| format!("KDC: {e}"))?;
            env.kdc = Some(kdc);
        }
        Ok(Harness {
            env,
            plugin_config: cfg,
            files,
        })
    }

    /// The same configuration without the directory: for `nla_only` rows, whose credential the
    /// target alone judges.
    pub fn nla_only_config(&self) -> FileConfig {
        let mut cfg = self.plugin_config.clone();
        cfg.directory = rdp_preflight::credential::DirectoryFile::default();
        cfg
    }

    /// True when some row or target uses Kerberos (the simulated KDC runs).
    pub fn needs_kdc(scenario: &Scenario) -> bool {
        scenario.rows.iter().any(|r| r.kerberos) || scenario.targets.iter().any(|t| t.nla.kerberos_spn.is_some())
    }

    /// The configuration for `kerberos` rows: no directory; `[kerberos]` against the simulated
    /// KDC (realm `SIMDOM.TEST`), `nla.auth` left to its default (negotiate). `None` without a
    /// KDC.
    pub fn kerberos_config(&self) -> Option<FileConfig> {
        let kdc = self.env.kdc.as_ref()?;
        let mut cfg = self.nla_only_config();
        cfg.kerberos.realm = Some(crate::kdc::REALM.into());
        cfg.kerberos.kdcs = vec![kdc.addr().to_string()];
        cfg.directory.domains = [("SIMDOM".to_owned(), "simdom.test".to_owned())].into_iter().collect();
        Some(cfg)
    }

    /// True when some row needs the directory-less plugin.
    pub fn needs_nla_only_plugin(scenario: &Scenario) -> bool {
        !scenario.accounts.is_empty() && scenario.rows.iter().any(|r| r.nla_only)
    }

    /// Writes the plugin configuration as TOML (for `rdp-preflight serve --config`).
    pub fn write_plugin_config(&self) -> Result<PathBuf, String> {
        self.write_config("rdp-preflight.toml", &self.plugin_config)
    }

    /// Writes [`Harness::nla_only_config`] as TOML.
    pub fn write_nla_only_config(&self) -> Result<PathBuf, String> {
        self.write_config("rdp-preflight-nla-only.toml", &self.nla_only_config())
    }

    /// Writes [`Harness::kerberos_config`] as TOML, when the KDC runs.
    pub fn write_kerberos_config(&self) -> Result<Option<PathBuf>, String> {
        match self.kerberos_config() {
            Some(cfg) => self.write_config("rdp-preflight-kerberos.toml", &cfg).map(Some),
            None => Ok(None),
        }
    }

    fn write_config(&self, name: &str, cfg: &FileConfig) -> Result<PathBuf, String> {
        let path = self.files.path().join(name);
        let body = toml::to_string_pretty(cfg).map_err(|e| format!("config: {e}"))?;
        std::fs::write(&path, body).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }

    /// The directory URL, when one runs.
    pub fn directory_url(&self) -> Option<String> {
        self.env.directory.as_ref().map(DirectoryHandle::url)
    }
}

/// A plugin served in-process until the returned sender is dropped or fired.
async fn serve_in_process(
    cfg: &FileConfig,
) -> Result<
    (
        String,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), String>>,
    ),
    String,
> {
    let cfg = Arc::new(cfg.validate().map_err(|e| e.to_string())?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(rdp_preflight::run(cfg, listener, async {
        let _ = stopped.await;
    }));
    Ok((format!("http://{addr}"), stop, task))
}

/// Starts everything, plays the scenario against an in-process plugin, returns the rows.
pub async fn run_demo(scenario: &Scenario, jobs: usize) -> Result<Vec<RowResult>, String> {
    let harness = Harness::start(scenario).await?;
    let (endpoint, stop, task) = serve_in_process(&harness.plugin_config).await?;
    let nla_only = if Harness::needs_nla_only_plugin(scenario) {
        Some(serve_in_process(&harness.nla_only_config()).await?)
    } else {
        None
    };
    let kerberos = match harness.kerberos_config() {
        Some(cfg) => Some(serve_in_process(&cfg).await?),
        None => None,
    };
    let opts = PlayOptions {
        deadline: Duration::from_secs(30),
        jobs,
        nla_only_plugin: nla_only.as_ref().map(|(e, _, _)| e.clone()),
        kerberos_plugin: kerberos.as_ref().map(|(e, _, _)| e.clone()),
    };
    let rows = driver::play_with(&endpoint, scenario, &harness.env, &opts).await;
    let _ = stop.send(());
    for (_, s, t) in nla_only.into_iter().chain(kerberos) {
        let _ = s.send(());
        let _ = t.await;
    }
    match task.await {
        Ok(Ok(())) => Ok(rows),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(format!("plugin task: {e}")),
    }
}

/// What [`run_sweep`] saw.
pub struct SweepDemo {
    /// The fleet as the history saw it after the last slot.
    pub status: rdp_preflight::fleet::Status,
    /// NLA AUTHENTICATE messages the targets received (a sweep sends none).
    pub authenticates: u64,
    /// Binds the simulated directory received (a sweep sends none).
    pub binds: u64,
    /// `host:port` of each target, by scenario name.
    pub keys: Vec<(String, String)>,
}

/// Starts the scenario's fleet and sweeps it with the plugin's scheduler, in-process, for
/// `slots` slots of `interval_secs` (the inventory: every target, labelled with its behaviour;
/// `flap_changes`: the flapping threshold); never a credential.
pub async fn run_sweep(
    scenario: &Scenario,
    interval_secs: u64,
    slots: u64,
    flap_changes: u32,
) -> Result<SweepDemo, String> {
    use rdp_preflight::{check::Checker, fleet, history, sweep};
    let harness = Harness::start(scenario).await?;
    let fleet_env = &harness.env.fleet;
    let mut inventory = String::from(sweep::HEADER);
    inventory.push('\n');
    let mut keys = Vec::new();
    for t in &scenario.targets {
        let addr = fleet_env
            .addr(&t.name)
            .ok_or_else(|| format!("{}: not started", t.name))?;
        let computer = if t.behavior.is_nla() {
            t.nla.computer.as_str()
        } else {
            ""
        };
        inventory.push_str(&format!(
            "{},{},{},{computer},behavior={}\n",
            addr.ip(),
            addr.port(),
            t.name,
            t.behavior
        ));
        keys.push((t.name.clone(), history::target_key(&addr.ip().to_string(), addr.port())));
    }
    let path = harness.files.path().join("inventory.csv");
    std::fs::write(&path, inventory).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut file = harness.plugin_config.clone();
    file.sweep.inventory = Some(path);
    file.sweep.interval_secs = interval_secs;
    file.history.flap_changes = flap_changes;
    let cfg = Arc::new(file.validate().map_err(|e| e.to_string())?);
    let sc = cfg.sweep.clone().ok_or("no sweep")?;
    let history: Arc<dyn history::History> = Arc::new(history::MemoryHistory::new(cfg.history));
    let (checker, _) = Checker::open(cfg.clone()).await?;
    let scheduler = Arc::new(sweep::Scheduler::new(
        Arc::new(checker),
        sc,
        history.clone(),
        Arc::new(sweep::LocalLease),
    ));
    let view = fleet::Fleet::new(history, cfg.history, Some(scheduler.clone()), cfg.default_port);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(scheduler.run(async {
        let _ = stopped.await;
    }));
    // To the first boundary, then `slots` slots and a little for the last checks.
    let interval_ms = interval_secs.saturating_mul(1000);
    let now = u64::try_from(history::now_ms()).unwrap_or(0);
    let wait = interval_ms - now % interval_ms + slots * interval_ms + 500;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let _ = stop.send(());
    let _ = run.await;
    let status = view.status(&fleet::Filter::default()).await?;
    let authenticates = scenario
        .targets
        .iter()
        .filter_map(|t| fleet_env.authenticates(&t.name))
        .sum();
    let binds = match &harness.env.directory {
        Some(DirectoryHandle::Local(d)) => d.bind_count(),
        _ => 0,
    };
    Ok(SweepDemo {
        status,
        authenticates,
        binds,
        keys,
    })
}

/// The human summary of a sweep demo.
pub fn format_sweep(d: &SweepDemo) -> String {
    use std::fmt::Write as _;
    let name = |key: &str| {
        d.keys
            .iter()
            .find(|(_, k)| k == key)
            .map_or(key.to_owned(), |(n, _)| n.clone())
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<20} {:<22} {:>7} {:>5} {:>9}",
        "TARGET", "STATE", "CAUSE", "CHANGES", "FLAP", "CERT DAYS"
    );
    for t in &d.status.targets {
        let s = &t.state;
        let _ = writeln!(
            out,
            "{:<14} {:<20} {:<22} {:>7} {:>5} {:>9}",
            name(&s.target),
            s.verdict,
            s.primary_cause,
            s.changes,
            if s.flapping { "yes" } else { "" },
            s.cert_days_left(d.status.as_of_ms)
                .map_or_else(|| "-".into(), |x| x.to_string())
        );
    }
    for t in d.status.targets.iter().filter(|t| t.state.flapping) {
        let _ = writeln!(
            out,
            "flapping: {} ({})",
            name(&t.state.target),
            t.state.sequence.join(" → ")
        );
    }
    for f in &d.status.forecast {
        let when = if f.days_left < 0 {
            format!("expired {} day(s) ago", -f.days_left)
        } else {
            format!("expires in {} day(s)", f.days_left)
        };
        let _ = writeln!(out, "certificate: {} {when}", name(&f.target));
    }
    let _ = writeln!(
        out,
        "credentials sent: {} NLA AUTHENTICATE, {} directory bind(s)",
        d.authenticates, d.binds
    );
    out
}
