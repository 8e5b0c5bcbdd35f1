//! The shared store: N replicas behave as one plugin on PostgreSQL.
//!
//! `[store] url` unset keeps the single-instance behaviour (memory and files), the embedded
//! default. Set, the lockout guard's budget, reservations and single-flight live in the
//! database ([`guard::PgGuardStore`]), so the budget is global whatever the number of replicas;
//! `cert.pin_store = "auto"` pins there ([`pins`], first writer wins), and `[audit] backend =
//! "store"` records there ([`audit`], one chain, signed head).
//!
//! - A pool of connections (`deadpool-postgres`), TLS through rustls with `store.ca_file`
//!   (`store.tls = "disable"` only towards a loopback address), every statement under
//!   `store.statement_timeout_ms`.
//! - Schema migrations are versioned in [`migrations`] and applied at start (or by
//!   `rdp-preflight store migrate`) under a transaction-scoped advisory lock, so replicas that
//!   start together apply each version once.
//! - [`Store::healthy`] is kept by a probe task: health reports NOT_SERVING while the database
//!   is unreachable and SERVING again by itself when it is back.

pub mod audit;
pub mod guard;
pub mod history;
pub mod lease;
mod migrations;
pub mod pins;

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// `[store]`: the shared store, as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreFile {
    /// `postgres://user@host:port/db` (default none: single-instance, memory and files).
    pub url: Option<String>,
    /// File holding the database password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the database password.
    pub password_env: Option<String>,
    /// PEM trust anchors of the database server's certificate.
    pub ca_file: Option<PathBuf>,
    /// `require` (default) or `disable` (only towards a loopback address).
    pub tls: String,
    /// Connections per replica (default 8).
    pub pool_size: usize,
    /// Limit to connect (default 3000 ms).
    pub connect_timeout_ms: u64,
    /// Limit for each statement or short transaction, pool wait included (default 2000 ms).
    pub statement_timeout_ms: u64,
    /// File holding the key (at least 32 bytes) that the lockout guard's HMAC tags are made
    /// with; the same on every replica, never in the database (a database dump then cannot be
    /// used to test passwords offline). Required with `url`.
    pub hmac_key_file: Option<PathBuf>,
}

impl Default for StoreFile {
    fn default() -> Self {
        StoreFile {
            url: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            tls: "require".into(),
            pool_size: 8,
            connect_timeout_ms: 3000,
            statement_timeout_ms: 2000,
            hmac_key_file: None,
        }
    }
}

/// The validated `[store]`.
#[derive(Clone)]
pub struct StoreConfig {
    /// The parsed URL (password, if any, from the file or variable).
    pg: tokio_postgres::Config,
    /// Where it points, for logs (no password).
    pub display: String,
    /// TLS towards the database (`None`: plain, loopback only).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Pool size.
    pub pool_size: usize,
    /// Per statement / transaction.
    pub statement_timeout: Duration,
    /// The guard's HMAC key.
    hmac_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("display", &self.display)
            .field("tls", &self.tls.is_some())
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

fn read_secret(path: &std::path::Path, key: &str) -> Result<Zeroizing<String>, String> {
    let s = std::fs::read_to_string(path).map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    Ok(Zeroizing::new(s.trim_end_matches(['\r', '\n']).to_owned()))
}

impl StoreFile {
    /// Validates into a [`StoreConfig`] (`None` when no URL is set); errors name the key.
    pub fn validate(&self) -> Result<Option<StoreConfig>, String> {
        let Some(url) = self.url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("store.url: not a postgres:// URL ({e})"))?;
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err("store.url: use postgres://user@host:port/db".into());
        }
        if pg.get_password().is_some() {
            return Err("store.url: no password in the URL: use store.password_file or store.password_env".into());
        }
        let password = match (&self.password_file, &self.password_env) {
            (Some(_), Some(_)) => {
                return Err("store.password_file: set either it or store.password_env, not both".into())
            }
            (Some(p), None) => Some(read_secret(p, "store.password_file")?),
            (None, Some(v)) => Some(Zeroizing::new(
                std::env::var(v).map_err(|_| format!("store.password_env: variable {v} is not set"))?,
            )),
            (None, None) => None,
        };
        if let Some(p) = &password {
            pg.password(p.as_bytes());
        }
        let hosts: Vec<String> = pg
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        if hosts.is_empty() {
            return Err("store.url: no host".into());
        }
        let loopback = hosts.iter().all(|h| {
            h == "localhost"
                || h.starts_with('/')
                || h.trim_matches(['[', ']'])
                    .parse::<IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        });
        let tls = match self.tls.as_str() {
            "require" => {
                let Some(ca) = &self.ca_file else {
                    return Err(
                        "store.ca_file: required with store.tls = \"require\" (the system's roots are not used)".into(),
                    );
                };
                // Never fall back to a plain connection.
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(client_config(ca)?)
            }
            "disable" if loopback => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
            "disable" => {
                return Err(format!(
                    "store.tls: \"disable\" only towards a loopback address; {} is not",
                    hosts.join(",")
                ))
            }
            other => return Err(format!("store.tls: {other:?}: use \"require\" or \"disable\"")),
        };
        if self.pool_size == 0 {
            return Err("store.pool_size: must be > 0".into());
        }
        if self.connect_timeout_ms == 0 || self.statement_timeout_ms == 0 {
            return Err("store.connect_timeout_ms / store.statement_timeout_ms: must be > 0".into());
        }
        pg.connect_timeout(Duration::from_millis(self.connect_timeout_ms));
        let Some(key_file) = &self.hmac_key_file else {
            return Err("store.hmac_key_file: required with store.url (the same key on every replica)".into());
        };
        let key = read_secret(key_file, "store.hmac_key_file")?;
        if key.len() < 32 {
            return Err("store.hmac_key_file: the key must be at least 32 bytes".into());
        }
        let display = format!(
            "postgres://{}@{}:{}/{}",
            pg.get_user().unwrap_or(""),
            hosts.join(","),
            pg.get_ports().first().copied().unwrap_or(5432),
            pg.get_dbname().unwrap_or("")
        );
        Ok(Some(StoreConfig {
            pg,
            display,
            tls,
            pool_size: self.pool_size,
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
            hmac_key: Zeroizing::new(key.as_bytes().to_vec()),
        }))
    }
}

fn client_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("store.ca_file: {}: {e}", ca.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("store.ca_file: {}: {e}", ca.display()))?;
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("store.ca_file: {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("store.ca_file: {}: no certificate", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("store TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A store that cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection, or the database failed.
    #[error("store: {0}")]
    Db(String),
    /// Over `store.statement_timeout_ms`.
    #[error("store: no answer within {0:?}")]
    Timeout(Duration),
}

/// Round trips and errors, for metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Operations that completed.
    pub ops: AtomicU64,
    /// Their total duration, nanoseconds.
    pub op_nanos: AtomicU64,
    /// Operations that failed or timed out.
    pub errors: AtomicU64,
    /// Reservations the guard refused (budget spent) through this store.
    pub refused: AtomicU64,
}

/// The connection pool and the store's health.
pub struct Store {
    pool: Pool,
    cfg: StoreConfig,
    healthy: AtomicBool,
    /// For metrics.
    pub stats: StoreStats,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Store {
    /// Builds the pool (connections are made lazily), then connects once and applies the
    /// migrations; an error names what failed.
    pub async fn open(cfg: StoreConfig) -> Result<Arc<Store>, String> {
        let store = Store::connect(cfg).await?;
        store.migrate().await?;
        store.healthy.store(true, Ordering::Relaxed);
        Ok(store)
    }

    /// Builds the pool without migrating (readers such as `audit verify`).
    pub async fn connect(cfg: StoreConfig) -> Result<Arc<Store>, String> {
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match &cfg.tls {
            Some(tls) => Manager::from_config(
                cfg.pg.clone(),
                tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone()),
                mgr_cfg,
            ),
            None => Manager::from_config(cfg.pg.clone(), tokio_postgres::NoTls, mgr_cfg),
        };
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .wait_timeout(Some(cfg.statement_timeout))
            .create_timeout(Some(cfg.statement_timeout.max(Duration::from_secs(1))))
            .recycle_timeout(Some(cfg.statement_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| format!("store {}: {e}", cfg.display))?;
        Ok(Arc::new(Store {
            pool,
            cfg,
            healthy: AtomicBool::new(false),
            stats: StoreStats::default(),
        }))
    }

    /// Where it points (no password).
    pub fn display(&self) -> &str {
        &self.cfg.display
    }

    /// The key the guard's tags are made with.
    pub fn hmac_key(&self) -> &[u8] {
        &self.cfg.hmac_key
    }

    /// Applies the migrations not yet applied; safe when several replicas start together.
    pub async fn migrate(&self) -> Result<(), String> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| format!("store {}: {e}", self.cfg.display))?;
        migrations::apply(&mut client)
            .await
            .map_err(|e| format!("store {}: migration: {e}", self.cfg.display))
    }

    /// Runs `f` on a pooled connection under the statement limit, counting it for metrics.
    pub(crate) async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut deadpool_postgres::Client) -> guard::ClientFuture<'c, T>,
    {
        let started = Instant::now();
        let limit = self.cfg.statement_timeout;
        let run = async {
            let mut client = self.pool.get().await.map_err(|e| StoreError::Db(e.to_string()))?;
            f(&mut client).await.map_err(|e| StoreError::Db(db_error(&e)))
        };
        let r = match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(limit)),
        };
        match &r {
            Ok(_) => {
                self.stats.ops.fetch_add(1, Ordering::Relaxed);
                let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.stats.op_nanos.fetch_add(nanos, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "store operation failed");
            }
        }
        r
    }

    /// Whether the last probe reached the database.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// One probe: `SELECT 1` within the statement limit; updates [`Store::healthy`].
    pub async fn probe(&self) -> bool {
        let ok = self
            .with(|c| Box::pin(async move { c.simple_query("SELECT 1").await.map(|_| ()) }))
            .await
            .is_ok();
        let was = self.healthy.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!(store = %self.cfg.display, "store reachable again");
            } else {
                tracing::error!(store = %self.cfg.display, "store unreachable");
            }
        }
        ok
    }

    /// Probes every `every` and calls `on_change(healthy)` when the state changes, until
    /// `stop` resolves.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        on_change: impl Fn(bool) -> futures::future::BoxFuture<'static, ()> + Send,
        stop: impl std::future::Future<Output = ()> + Send,
    ) {
        tokio::pin!(stop);
        let mut last = self.healthy();
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(every) => {}
            }
            let now = self.probe().await;
            if now != last {
                on_change(now).await;
                last = now;
            }
        }
    }
}

/// A database error with its SQLSTATE and message, never the parameters.
fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}
