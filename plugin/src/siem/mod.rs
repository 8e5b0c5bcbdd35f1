//! SIEM export: every audit record, as an OCSF event (or the record's own JSON), to syslog
//! (RFC 5424 over TLS or TCP with octet counting, over UDP, or to a Unix datagram socket) or as
//! JSON lines to a file or stdout.
//!
//! The export comes after the audit log, never instead of it, and never holds up an answer: the
//! audit log offers each acknowledged record to a bounded queue ([`Exporter::offer`] does not
//! wait), and one task delivers the queue, reconnecting with exponential backoff while the
//! destination is down. A record that cannot be queued (the queue is full) or delivered (at
//! shutdown) is counted in `rdp_preflight_siem_events_undelivered_total`; `rdp-preflight audit
//! export --since …` replays any period from the audit log, with the same event uids (the
//! records' `check_id`), so a SIEM recognises what it already has. See `docs/siem.md`.

pub mod ocsf;
pub mod syslog;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, watch},
};

use crate::audit::AuditRecord;

/// First wait after a failed delivery; doubled per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between delivery attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a shutdown waits for the queue to drain.
const DRAIN: Duration = Duration::from_secs(5);
/// Largest datagram sent over UDP or a Unix datagram socket.
const MAX_DATAGRAM: usize = 65_000;

/// `[siem]`: the SIEM export, as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiemFile {
    /// Syslog destination: `tls://host:port`, `tcp://host:port`, `udp://host:port` or
    /// `unix:///path` (default none).
    pub syslog: Option<String>,
    /// JSON lines to this file instead (`-`: stdout) (default none).
    pub file: Option<PathBuf>,
    /// `ocsf` (default) or `json` (the audit record as written).
    pub format: String,
    /// PEM trust anchors of the syslog server's certificate (required with `tls://`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Events held while the destination is slow or down (default 10000).
    pub queue: usize,
    /// Limit for connecting (TLS handshake included) and for each write (default 5000 ms).
    pub timeout_ms: u64,
}

impl Default for SiemFile {
    fn default() -> Self {
        SiemFile {
            syslog: None,
            file: None,
            format: "ocsf".into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            queue: 10_000,
            timeout_ms: 5_000,
        }
    }
}

/// What the events carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An OCSF event ([`ocsf::event`]).
    Ocsf,
    /// The audit record's JSON.
    Json,
}

impl Format {
    /// Parses `ocsf` or `json`; errors name `key`.
    pub fn parse(s: &str, key: &str) -> Result<Format, String> {
        match s {
            "ocsf" => Ok(Format::Ocsf),
            "json" => Ok(Format::Json),
            other => Err(format!("{key}: {other:?}: use \"ocsf\" or \"json\"")),
        }
    }
}

/// Where events go.
#[derive(Clone, Debug)]
pub enum Destination {
    /// Syslog over TLS, octet counting (RFC 5425).
    Tls {
        /// Host name (verified against the certificate) or address.
        host: String,
        /// Port.
        port: u16,
        /// rustls client configuration (trust anchors, optional client certificate).
        tls: Arc<rustls::ClientConfig>,
    },
    /// Syslog over plain TCP, octet counting (RFC 6587).
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// Syslog over UDP, one message per datagram (RFC 5426).
    Udp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// Syslog to a Unix datagram socket (a local relay).
    Unix(PathBuf),
    /// JSON lines appended to a file.
    File(PathBuf),
    /// JSON lines on stdout.
    Stdout,
}

impl Destination {
    /// For logs: the URL or path, never a secret.
    pub fn describe(&self) -> String {
        match self {
            Destination::Tls { host, port, .. } => format!("tls://{host}:{port}"),
            Destination::Tcp { host, port } => format!("tcp://{host}:{port}"),
            Destination::Udp { host, port } => format!("udp://{host}:{port}"),
            Destination::Unix(p) => format!("unix://{}", p.display()),
            Destination::File(p) => p.display().to_string(),
            Destination::Stdout => "stdout".into(),
        }
    }
}

/// Validated `[siem]`.
#[derive(Clone, Debug)]
pub struct SiemConfig {
    /// Where events go.
    pub destination: Destination,
    /// What they carry.
    pub format: Format,
    /// Queue capacity.
    pub queue: usize,
    /// Connect and write limit.
    pub timeout: Duration,
}

fn host_port(rest: &str, key: &str, url: &str) -> Result<(String, u16), String> {
    let bad = || format!("{key}: {url:?}: expected host:port");
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || rest.contains('/') {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn tls_config(f: &SiemFile) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let Some(ca) = &f.ca_file else {
        return Err("siem.ca_file: required with a tls:// syslog destination (the system's roots are not used)".into());
    };
    let read_err = |key: &str, p: &Path, e: &dyn std::fmt::Display| format!("{key}: {}: {e}", p.display());
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| read_err("siem.ca_file", ca, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err("siem.ca_file", ca, &e))?;
    for c in certs {
        roots.add(c).map_err(|e| read_err("siem.ca_file", ca, &e))?;
    }
    if roots.is_empty() {
        return Err(format!("siem.ca_file: {}: no certificate", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("siem TLS: {e}"))?
        .with_root_certificates(roots);
    let cfg = match (&f.client_cert, &f.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| read_err("siem.client_cert", cert, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| read_err("siem.client_cert", cert, &e))?;
            if chain.is_empty() {
                return Err(format!("siem.client_cert: {}: no certificate", cert.display()));
            }
            let k = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err("siem.client_key", key, &e))?;
            builder
                .with_client_auth_cert(chain, k)
                .map_err(|e| format!("siem.client_key: {}: {e}", key.display()))?
        }
        (Some(_), None) => return Err("siem.client_key: required with siem.client_cert".into()),
        (None, Some(_)) => return Err("siem.client_cert: required with siem.client_key".into()),
    };
    Ok(Arc::new(cfg))
}

impl SiemFile {
    /// Validates into a [`SiemConfig`] (`None` when no destination is set); errors name the
    /// key. Files are read now.
    pub fn validate(&self) -> Result<Option<SiemConfig>, String> {
        let format = Format::parse(&self.format, "siem.format")?;
        if !(1..=1_000_000).contains(&self.queue) {
            return Err("siem.queue: must be between 1 and 1000000".into());
        }
        if !(1..=600_000).contains(&self.timeout_ms) {
            return Err("siem.timeout_ms: must be between 1 and 600000".into());
        }
        let is_tls = self.syslog.as_deref().is_some_and(|s| s.trim().starts_with("tls://"));
        if !is_tls {
            for (key, set) in [
                ("siem.ca_file", self.ca_file.is_some()),
                ("siem.client_cert", self.client_cert.is_some()),
                ("siem.client_key", self.client_key.is_some()),
            ] {
                if set {
                    return Err(format!("{key}: only used with a tls:// siem.syslog destination"));
                }
            }
        }
        let destination = match (&self.syslog, &self.file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err("siem.file: set either siem.syslog or siem.file, not both".into());
            }
            (None, Some(f)) if f.as_os_str() == "-" => Destination::Stdout,
            (None, Some(f)) if f.as_os_str().is_empty() => {
                return Err("siem.file: empty path (use \"-\" for stdout)".into())
            }
            (None, Some(f)) => Destination::File(f.clone()),
            (Some(url), None) => {
                let url = url.trim();
                let key = "siem.syslog";
                let (scheme, rest) = url.split_once("://").ok_or_else(|| {
                    format!("{key}: {url:?}: use tls://host:port, tcp://host:port, udp://host:port or unix:///path")
                })?;
                match scheme {
                    "tls" => {
                        let (host, port) = host_port(rest, key, url)?;
                        rustls_pki_types::ServerName::try_from(host.clone())
                            .map_err(|e| format!("{key}: {url:?}: {e}"))?;
                        Destination::Tls {
                            host,
                            port,
                            tls: tls_config(self)?,
                        }
                    }
                    "tcp" => {
                        let (host, port) = host_port(rest, key, url)?;
                        Destination::Tcp { host, port }
                    }
                    "udp" => {
                        let (host, port) = host_port(rest, key, url)?;
                        Destination::Udp { host, port }
                    }
                    "unix" if rest.starts_with('/') => Destination::Unix(PathBuf::from(rest)),
                    "unix" => return Err(format!("{key}: {url:?}: use an absolute path, unix:///path")),
                    other => {
                        return Err(format!(
                            "{key}: {url:?}: unknown scheme {other:?}: use tls, tcp, udp or unix"
                        ))
                    }
                }
            }
        };
        Ok(Some(SiemConfig {
            destination,
            format,
            queue: self.queue,
            timeout: Duration::from_millis(self.timeout_ms),
        }))
    }
}

/// Counters of the export (rendered by the metrics as `rdp_preflight_siem_*`).
#[derive(Debug, Default)]
pub struct SiemStats {
    /// Events handed to the destination.
    pub sent: AtomicU64,
    /// Records that were not delivered: queue full, too large for a datagram, or still queued
    /// at shutdown. Replay them with `rdp-preflight audit export`.
    pub undelivered: AtomicU64,
    /// Failed connects and writes (each is retried).
    pub errors: AtomicU64,
    /// Records waiting in the queue.
    pub depth: AtomicU64,
}

impl SiemStats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The bytes one record becomes on `destination`; `None` when it cannot be encoded.
pub fn encode(rec: &AuditRecord, format: Format, destination: &Destination, host: &str, pid: u32) -> Option<Vec<u8>> {
    let body = match format {
        Format::Ocsf => serde_json::to_string(&ocsf::event(rec)).ok()?,
        Format::Json => serde_json::to_string(rec).ok()?,
    };
    Some(match destination {
        Destination::File(_) | Destination::Stdout => {
            let mut b = body.into_bytes();
            b.push(b'\n');
            b
        }
        Destination::Tls { .. } | Destination::Tcp { .. } => {
            syslog::octet_counted(&syslog::message(rec, host, pid, &body))
        }
        Destination::Udp { .. } | Destination::Unix(_) => syslog::message(rec, host, pid, &body).into_bytes(),
    })
}

/// This host's name for the syslog header (`-` when unknown).
pub fn hostname() -> String {
    dns_lookup::get_hostname().unwrap_or_else(|_| "-".into())
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// An open destination.
enum Open {
    Stream(Box<dyn Stream>),
    Udp(tokio::net::UdpSocket),
    Unix(tokio::net::UnixDatagram),
    File(tokio::fs::File),
    Stdout,
}

/// A connection to the destination, opened when needed and dropped on any error.
pub struct Connection {
    destination: Destination,
    timeout: Duration,
    open: Option<Open>,
}

async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out after {} ms", limit.as_millis())),
    }
}

async fn resolve(host: &str, port: u16, limit: Duration) -> Result<Vec<SocketAddr>, String> {
    let addrs = within(limit, "resolve", tokio::net::lookup_host((host.to_owned(), port))).await?;
    let v: Vec<SocketAddr> = addrs.collect();
    if v.is_empty() {
        return Err(format!("resolve {host}: no address"));
    }
    Ok(v)
}

impl Connection {
    /// A connection to `destination` (nothing is opened yet); `timeout` bounds each connect
    /// and each write.
    pub fn new(destination: Destination, timeout: Duration) -> Connection {
        Connection {
            destination,
            timeout,
            open: None,
        }
    }

    async fn connect(&self) -> Result<Open, String> {
        let t = self.timeout;
        Ok(match &self.destination {
            Destination::Tcp { host, port } | Destination::Tls { host, port, .. } => {
                let addrs = resolve(host, *port, t).await?;
                let tcp = within(t, "connect", tokio::net::TcpStream::connect(&addrs[..])).await?;
                let _ = tcp.set_nodelay(true);
                match &self.destination {
                    Destination::Tls { tls, .. } => {
                        let name = rustls_pki_types::ServerName::try_from(host.clone())
                            .map_err(|e| format!("server name {host}: {e}"))?;
                        let c = tokio_rustls::TlsConnector::from(tls.clone());
                        Open::Stream(Box::new(within(t, "TLS handshake", c.connect(name, tcp)).await?))
                    }
                    _ => Open::Stream(Box::new(tcp)),
                }
            }
            Destination::Udp { host, port } => {
                let addrs = resolve(host, *port, t).await?;
                let bind: SocketAddr = if addrs[0].is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    ([0u16; 8], 0).into()
                };
                let s = within(t, "bind", tokio::net::UdpSocket::bind(bind)).await?;
                within(t, "connect", s.connect(addrs[0])).await?;
                Open::Udp(s)
            }
            Destination::Unix(path) => {
                let s = tokio::net::UnixDatagram::unbound().map_err(|e| format!("socket: {e}"))?;
                s.connect(path)
                    .map_err(|e| format!("connect {}: {e}", path.display()))?;
                Open::Unix(s)
            }
            Destination::File(path) => {
                let f = within(
                    t,
                    "open",
                    // Events name accounts: not for every local user to read.
                    tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o640)
                        .open(path),
                )
                .await?;
                Open::File(f)
            }
            Destination::Stdout => Open::Stdout,
        })
    }

    /// Sends one encoded event; on an error the connection is dropped (the next send reopens
    /// it).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let r = self.try_send(bytes).await;
        if r.is_err() {
            self.open = None;
        }
        r
    }

    async fn try_send(&mut self, bytes: &[u8]) -> Result<(), String> {
        // A syslog server never writes to us: a readable stream is one it has closed. Notice
        // it before writing, so that an event is not written into a dead connection.
        if let Some(Open::Stream(s)) = &mut self.open {
            let mut probe = [0u8; 64];
            // End of stream or an error: closed (or reset) by the server. Bytes a server sent
            // anyway (nothing in the protocol) are ignored.
            if let Some(Ok(0) | Err(_)) = futures::FutureExt::now_or_never(s.read(&mut probe)) {
                tracing::debug!("siem: the server closed the connection; reconnecting");
                self.open = None;
            }
        }
        if self.open.is_none() {
            self.open = Some(self.connect().await?);
        }
        let t = self.timeout;
        match &mut self.open {
            Some(Open::Stream(s)) => {
                within(t, "write", s.write_all(bytes)).await?;
                within(t, "flush", s.flush()).await
            }
            Some(Open::Udp(s)) => within(t, "send", s.send(bytes)).await.map(|_| ()),
            Some(Open::Unix(s)) => within(t, "send", s.send(bytes)).await.map(|_| ()),
            Some(Open::File(f)) => {
                within(t, "write", f.write_all(bytes)).await?;
                within(t, "flush", f.flush()).await
            }
            Some(Open::Stdout) => {
                // On the blocking pool: a slow reader of stdout must not stall a runtime thread.
                let b = bytes.to_vec();
                let w = tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    let mut o = std::io::stdout().lock();
                    o.write_all(&b).and_then(|()| o.flush())
                });
                within(t, "write", async { w.await.map_err(std::io::Error::other)? }).await
            }
            None => Err("not connected".into()),
        }
    }

    /// Closes the connection (TLS close_notify, TCP FIN), within the timeout.
    pub async fn close(&mut self) {
        if let Some(Open::Stream(mut s)) = self.open.take() {
            let _ = tokio::time::timeout(self.timeout, s.shutdown()).await;
        }
    }

    /// Whether `bytes` fit the destination (datagrams are bounded).
    pub fn fits(&self, bytes: &[u8]) -> bool {
        !matches!(self.destination, Destination::Udp { .. } | Destination::Unix(_)) || bytes.len() <= MAX_DATAGRAM
    }
}

struct Inner {
    tx: mpsc::Sender<AuditRecord>,
    stats: Arc<SiemStats>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    destination: String,
}

/// The export: a bounded queue and the task that delivers it. Cheap to clone.
#[derive(Clone)]
pub struct Exporter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("destination", &self.inner.destination)
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// Starts the delivery task (on the current tokio runtime).
    pub fn start(cfg: SiemConfig) -> Exporter {
        let (tx, rx) = mpsc::channel(cfg.queue);
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(SiemStats::default());
        let destination = cfg.destination.describe();
        tracing::info!(destination = %destination, format = ?cfg.format, queue = cfg.queue, "siem export on");
        let task = tokio::spawn(deliver(cfg, rx, stats.clone(), stopped));
        Exporter {
            inner: Arc::new(Inner {
                tx,
                stats,
                stop,
                task: std::sync::Mutex::new(Some(task)),
                destination,
            }),
        }
    }

    /// Queues `rec` without waiting; a full queue counts it as undelivered.
    pub fn offer(&self, rec: AuditRecord) {
        let s = &self.inner.stats;
        // Counted before it is queued, so that the task never takes it below zero.
        SiemStats::add(&s.depth, 1);
        match self.inner.tx.try_send(rec) {
            Ok(()) => {}
            Err(e) => {
                s.depth.fetch_sub(1, Ordering::Relaxed);
                let first = s.undelivered.fetch_add(1, Ordering::Relaxed) == 0;
                let rec = match &e {
                    mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
                };
                let log = || {
                    tracing::warn!(
                        check_id = %rec.check_id,
                        time = %rec.time,
                        "siem: queue full or closed: record not exported (replay with `rdp-preflight audit export --since`)"
                    )
                };
                if first || SiemStats::get(&s.undelivered).is_multiple_of(1000) {
                    log();
                }
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> Arc<SiemStats> {
        self.inner.stats.clone()
    }

    /// Delivers what is queued (for at most a few seconds), then stops; what is left is
    /// counted as undelivered.
    pub async fn close(&self) {
        let _ = self.inner.stop.send(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

/// The delivery task.
async fn deliver(
    cfg: SiemConfig,
    mut rx: mpsc::Receiver<AuditRecord>,
    stats: Arc<SiemStats>,
    mut stop: watch::Receiver<bool>,
) {
    let host = hostname();
    let pid = std::process::id();
    let mut conn = Connection::new(cfg.destination.clone(), cfg.timeout);
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut backoff = BACKOFF_MIN;
    'records: loop {
        let rec = if deadline.is_some() {
            match rx.try_recv() {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => break },
                _ = stop.changed() => {
                    deadline = Some(tokio::time::Instant::now() + DRAIN);
                    continue;
                }
            }
        };
        stats.depth.fetch_sub(1, Ordering::Relaxed);
        let Some(bytes) = encode(&rec, cfg.format, &cfg.destination, &host, pid).filter(|b| conn.fits(b)) else {
            SiemStats::add(&stats.undelivered, 1);
            tracing::warn!(check_id = %rec.check_id, "siem: event cannot be encoded or is too large for a datagram: not exported");
            continue;
        };
        let mut failing = false;
        loop {
            match conn.send(&bytes).await {
                Ok(()) => {
                    SiemStats::add(&stats.sent, 1);
                    if failing {
                        tracing::info!(destination = %cfg.destination.describe(), "siem: delivering again");
                    }
                    backoff = BACKOFF_MIN;
                    continue 'records;
                }
                Err(e) => {
                    SiemStats::add(&stats.errors, 1);
                    if !failing {
                        tracing::warn!(destination = %cfg.destination.describe(), error = %e, "siem: delivery failed; retrying with backoff");
                        failing = true;
                    }
                }
            }
            let wait = tokio::time::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match deadline {
                Some(d) if tokio::time::Instant::now() >= d => {
                    SiemStats::add(&stats.undelivered, 1);
                    break 'records;
                }
                Some(d) => {
                    let _ = tokio::time::timeout_at(d, wait).await;
                }
                None => {
                    tokio::select! {
                        _ = wait => {}
                        _ = stop.changed() => deadline = Some(tokio::time::Instant::now() + DRAIN),
                    }
                }
            }
        }
    }
    // Stopping: whatever is still queued was not delivered.
    rx.close();
    let mut left = 0u64;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    if left > 0 {
        stats.depth.fetch_sub(left, Ordering::Relaxed);
        SiemStats::add(&stats.undelivered, left);
        tracing::warn!(records = left, "siem: records still queued at shutdown were not exported (replay with `rdp-preflight audit export --since`)");
    }
    conn.close().await;
}

#[cfg(test)]
mod tests;
