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
