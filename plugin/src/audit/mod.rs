//! The audit log: one JSON line per DENY (or per check, when configured), durable before the
//! answer leaves the plugin, and hash-chained so that an edited, deleted, inserted or reordered
//! record is detected (`rdp-preflight audit verify`).
//!
//! One writer thread owns the files. [`AuditLog::record`] queues a record and waits; the writer
//! drains every queued record (up to `group_commit_max`), assigns `seq` and `prev`, writes them
//! with one `write`, calls `fdatasync` once, and only then acknowledges them all (group
//! commit). A record is therefore acknowledged only when it is on disk; a crash can lose only
//! records that were never acknowledged, and at worst leaves an incomplete last line, which
//! [`AuditLog::open`] cuts off.
//!
//! See `docs/audit.md` for the record format, rotation and the review CLI.

pub mod chain;
pub mod cli;
pub mod record;

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use chain::{verify_dir, Break, BreakKind, Location, Outcome, VerifyOptions};
pub use record::{AuditRecord, GENESIS_PREV};

use crate::report::Verdict;

/// `[audit]`: the audit log, as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditFile {
    /// Where records go: `files` (default: `dir`) or `store` (the shared store's
    /// `audit_record` table; needs `[store] url`).
    pub backend: String,
    /// Directory of the audit files (default none: no audit log).
    pub dir: Option<PathBuf>,
    /// Record every check, not only DENY (default false).
    pub all_checks: bool,
    /// Rotate when a file would grow beyond this many bytes (default 64 MiB).
    pub max_file_bytes: u64,
    /// Rotate when a file's first record is older than this (default 86400 s).
    pub max_file_age_secs: u64,
    /// `fdatasync` before acknowledging (default true; only tests turn it off).
    pub fsync: bool,
    /// Most records written with one `fdatasync` (default 256).
    pub group_commit_max: usize,
}

impl Default for AuditFile {
    fn default() -> Self {
        AuditFile {
            backend: "files".into(),
            dir: None,
            all_checks: false,
            max_file_bytes: 64 * 1024 * 1024,
            max_file_age_secs: 86_400,
            fsync: true,
            group_commit_max: 256,
        }
    }
}

impl AuditFile {
    /// Validates into an [`AuditConfig`] (`None` when no directory is configured); errors
    /// name the key.
    pub fn validate(&self) -> Result<Option<AuditConfig>, String> {
        let backend = match self.backend.as_str() {
            "files" => Backend::Files,
            "store" => Backend::Store,
            other => return Err(format!("audit.backend: {other:?}: use \"files\" or \"store\"")),
        };
        let store_dir = PathBuf::from("store");
        let dir = match (&self.dir, backend) {
            (_, Backend::Store) => &store_dir,
            (Some(d), Backend::Files) => d,
            (None, Backend::Files) => return Ok(None),
        };
        if dir.as_os_str().is_empty() {
            return Err("audit.dir: empty path (leave the key out to disable the audit log)".into());
        }
        if self.max_file_bytes < 4096 {
            return Err("audit.max_file_bytes: must be at least 4096".into());
        }
        if self.max_file_age_secs < 60 {
            return Err("audit.max_file_age_secs: must be at least 60".into());
        }
        if !(1..=65_536).contains(&self.group_commit_max) {
            return Err("audit.group_commit_max: must be between 1 and 65536".into());
        }
        Ok(Some(AuditConfig {
            backend,
            dir: dir.clone(),
            all_checks: self.all_checks,
            max_file_bytes: self.max_file_bytes,
            max_file_age: Duration::from_secs(self.max_file_age_secs),
            fsync: self.fsync,
            group_commit_max: self.group_commit_max,
            #[cfg(test)]
            before_sync: None,
        }))
    }
}

/// Where the records go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Hash-chained files in `dir`, written by one thread with group commit and fsync.
    Files,
    /// The shared store (one chain for the cluster, a signed head).
    Store,
}

/// Validated `[audit]`.
#[derive(Clone)]
pub struct AuditConfig {
    /// Files or the shared store.
    pub backend: Backend,
    /// Directory of the audit files (created, mode 0750, when missing).
    pub dir: PathBuf,
    /// Record every check, not only DENY.
    pub all_checks: bool,
    /// Rotation size.
    pub max_file_bytes: u64,
    /// Rotation age.
    pub max_file_age: Duration,
    /// `fdatasync` before acknowledging.
    pub fsync: bool,
    /// Most records per `fdatasync`.
    pub group_commit_max: usize,
    /// Test hook: runs on the writer thread just before each `fdatasync`.
    #[cfg(test)]
    pub(crate) before_sync: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditConfig")
            .field("dir", &self.dir)
            .field("all_checks", &self.all_checks)
            .field("max_file_bytes", &self.max_file_bytes)
            .field("max_file_age", &self.max_file_age)
            .field("fsync", &self.fsync)
            .field("group_commit_max", &self.group_commit_max)
            .finish()
    }
}

impl AuditConfig {
    /// Defaults for `dir` (tests, tools).
    pub fn new(dir: impl Into<PathBuf>) -> AuditConfig {
        let f = AuditFile {
            dir: Some(dir.into()),
            ..AuditFile::default()
        };
        match f.validate() {
            Ok(Some(c)) => c,
            // The defaults are valid for any non-empty path; an empty one gets the current dir.
            _ => AuditConfig {
                backend: Backend::Files,
                dir: PathBuf::from("."),
                all_checks: false,
                max_file_bytes: 64 * 1024 * 1024,
                max_file_age: Duration::from_secs(86_400),
                fsync: true,
                group_commit_max: 256,
                #[cfg(test)]
                before_sync: None,
            },
        }
    }
}

/// Why the audit log cannot take a record. The service answers an error, never an unrecorded
/// DENY.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// A file operation failed.
    #[error("audit log {path}: {op}: {message}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error kind.
        kind: io::ErrorKind,
        /// The OS error text.
        message: String,
    },
    /// The newest file ends in a complete line that is not an audit record: the log was
    /// damaged; `audit verify` says more. The writer will not guess where to continue.
    #[error("audit log {}:{line}: {reason}; run `rdp-preflight audit verify` and move the damaged file aside", file.display())]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// 1-based line number (0 when unknown).
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The record could not be encoded.
    #[error("audit record: {0}")]
    Encode(String),
    /// The writer stopped (shutdown, or it could not start).
    #[error("audit log closed")]
    Closed,
    /// The shared store did not commit the batch (unreachable, slow, failed).
    #[error("audit log in the store: {0}")]
    Store(String),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> AuditError + 'a {
    move |e| AuditError::Io {
        path: path.to_owned(),
        op,
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// Where an acknowledged record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Its seq.
    pub seq: u64,
    /// SHA-256 of its line (the next record's `prev`).
    pub hash: String,
    /// Its `prev` (the previous record's hash).
    pub prev: String,
}

/// Counters of the writer (for tests and the metrics).
#[derive(Debug, Default)]
pub struct AuditStats {
    records: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    durable_seq: AtomicU64,
}

impl AuditStats {
    /// Records written and acknowledged.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::SeqCst)
    }
    /// Batches written (one `write` each).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }
    /// `fdatasync` calls on audit files.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::SeqCst)
    }
    /// Highest seq known to be on disk (0: none yet).
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::SeqCst)
    }
}

type Ack = oneshot::Sender<Result<Receipt, AuditError>>;

enum Msg {
    Record(Box<AuditRecord>, Ack),
    Close(oneshot::Sender<()>),
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    all_checks: bool,
    dir: PathBuf,
    stats: Arc<AuditStats>,
    /// The SIEM export, offered every acknowledged record.
    export: std::sync::OnceLock<crate::siem::Exporter>,
}

/// The audit log: a handle on the writer thread; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("dir", &self.inner.dir).finish()
    }
}

impl AuditLog {
    /// Opens (creating the directory if needed) and resumes the chain from the newest file. An
    /// incomplete last line (a crash mid-write: never acknowledged) is cut off and logged.
    pub async fn open(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        if !cfg.fsync {
            tracing::warn!(dir = %cfg.dir.display(), "audit.fsync = false: records are acknowledged before they are durable");
        }
        let (tx, rx) = mpsc::channel(cfg.group_commit_max.saturating_mul(4).max(64));
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(AuditStats::default());
        let all_checks = cfg.all_checks;
        let dir = cfg.dir.clone();
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || match Writer::resume(cfg, thread_stats) {
                Ok(w) => {
                    let _ = ready_tx.send(Ok(()));
                    w.run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(io_err(&dir, "start the writer thread"))?;
        ready_rx.await.map_err(|_| AuditError::Closed)??;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx,
                all_checks,
                dir,
                stats,
                export: std::sync::OnceLock::new(),
            }),
        })
    }

    /// An audit log in the shared store: a task takes batches of queued records (up to
    /// `group_commit_max`) and commits each in one transaction before acknowledging them.
    pub fn open_store(cfg: AuditConfig, store: Arc<crate::store::Store>) -> AuditLog {
        let (tx, mut rx) = mpsc::channel::<Msg>(cfg.group_commit_max.saturating_mul(4).max(64));
        let stats = Arc::new(AuditStats::default());
        let task_stats = stats.clone();
        let max = cfg.group_commit_max;
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch: Vec<(Box<AuditRecord>, Ack)> = Vec::new();
                let mut closing = None;
                let mut next = Some(first);
                while let Some(m) = next.take() {
                    match m {
                        Msg::Record(r, ack) => batch.push((r, ack)),
                        Msg::Close(done) => closing = Some(done),
                    }
                    if batch.len() < max && closing.is_none() {
                        next = rx.try_recv().ok();
                    }
                }
                if !batch.is_empty() {
                    let records = batch.iter().map(|(r, _)| (**r).clone()).collect();
                    match crate::store::audit::append(&store, records).await {
                        Ok(receipts) => {
                            task_stats.batches.fetch_add(1, Ordering::SeqCst);
                            task_stats.records.fetch_add(receipts.len() as u64, Ordering::SeqCst);
                            if let Some(last) = receipts.last() {
                                task_stats.durable_seq.store(last.seq, Ordering::SeqCst);
                                tracing::info!(audit_seq = last.seq, audit_hash = %last.hash, "audit records committed to the store");
                            }
                            for ((_, ack), r) in batch.into_iter().zip(receipts) {
                                let _ = ack.send(Ok(r));
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "audit write to the store failed");
                            for (_, ack) in batch {
                                let _ = ack.send(Err(AuditError::Store(e.clone())));
                            }
                        }
                    }
                }
                if let Some(done) = closing {
                    let _ = done.send(());
                    return;
                }
            }
        });
        AuditLog {
            inner: Arc::new(Inner {
                tx,
                all_checks: cfg.all_checks,
                dir: cfg.dir,
                stats,
                export: std::sync::OnceLock::new(),
            }),
        }
    }

    /// True when a check with this verdict must be recorded.
    pub fn wants(&self, verdict: Verdict) -> bool {
        self.inner.all_checks || verdict == Verdict::Deny
    }

    /// Records `rec`; returns once its line is written and `fdatasync`ed.
    pub async fn record(&self, rec: AuditRecord) -> Result<(), AuditError> {
        self.append(rec).await.map(|_| ())
    }

    /// Like [`AuditLog::record`], returning where the record is. Once acknowledged, the record
    /// (with its `seq` and `prev`) is offered to the SIEM export, which never makes it wait.
    pub async fn append(&self, rec: AuditRecord) -> Result<Receipt, AuditError> {
        let exported = self.inner.export.get().map(|x| (x, rec.clone()));
        let (ack, done) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Record(Box::new(rec), ack))
            .await
            .map_err(|_| AuditError::Closed)?;
        let receipt = done.await.map_err(|_| AuditError::Closed)??;
        if let Some((x, mut rec)) = exported {
            rec.seq = receipt.seq;
            rec.prev.clone_from(&receipt.prev);
            x.offer(rec);
        }
        Ok(receipt)
    }

    /// Offers every record acknowledged from now on to `exporter` (set once).
    pub fn export_to(&self, exporter: crate::siem::Exporter) {
        let _ = self.inner.export.set(exporter);
    }

    /// Writes what is queued, syncs, and stops the writer. Later `record` calls on clones
    /// fail with [`AuditError::Closed`].
    pub async fn close(self) {
        let (ack, done) = oneshot::channel();
        if self.inner.tx.send(Msg::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Writer counters.
    pub fn stats(&self) -> &AuditStats {
        &self.inner.stats
    }
}

/// The writer thread's state.
struct Writer {
    cfg: AuditConfig,
    stats: Arc<AuditStats>,
    file: File,
    path: PathBuf,
    /// Bytes in `file`.
    size: u64,
    /// When the current file's first record was written (rotation by age).
    started: SystemTime,
    next_seq: u64,
    prev: String,
    /// A write or sync failed: reread the state from disk before the next batch.
    broken: bool,
}

/// Bytes read backwards at a time when looking for the last line.
const TAIL_CHUNK: u64 = 64 * 1024;

/// The end of a file as the writer needs it.
struct FileTail {
    /// Length up to and including the last newline (bytes after it are an incomplete line).
    complete: u64,
    /// The last complete line, without its newline.
    last: Option<Vec<u8>>,
}

/// Reads a file backwards, a chunk at a time, to find its last complete line.
fn file_tail(file: &mut File) -> io::Result<FileTail> {
    let len = file.metadata()?.len();
    let mut start = len;
    let mut data: Vec<u8> = Vec::new();
    let mut complete: Option<u64> = None;
    loop {
        // Look for the last newline, then the one before it.
        if complete.is_none() {
            if let Some(i) = data.iter().rposition(|b| *b == b'\n') {
                complete = Some(start + i as u64 + 1);
            }
        }
        if let Some(end) = complete {
            let end_rel = (end - start) as usize - 1;
            if let Some(j) = data[..end_rel].iter().rposition(|b| *b == b'\n') {
                return Ok(FileTail {
                    complete: end,
                    last: Some(data[j + 1..end_rel].to_vec()),
                });
            }
            if start == 0 {
                return Ok(FileTail {
                    complete: end,
                    last: Some(data[..end_rel].to_vec()),
                });
            }
        } else if start == 0 {
            return Ok(FileTail {
                complete: 0,
                last: None,
            });
        }
        let from = start.saturating_sub(TAIL_CHUNK);
        let mut chunk = vec![0u8; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&data);
        data = chunk;
        start = from;
    }
}

/// When a file was started: its birth time where the filesystem records one, else the time of
/// its first record.
fn file_started(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.created())
        .ok()
        .or_else(|| first_record_time(path))
        .unwrap_or_else(SystemTime::now)
}

fn first_record_time(path: &Path) -> Option<SystemTime> {
    let f = File::open(path).ok()?;
    let mut line = Vec::new();
    let mut r = io::BufReader::new(f.take(1024 * 1024));
    io::BufRead::read_until(&mut r, b'\n', &mut line).ok()?;
    #[derive(Deserialize)]
    struct T {
        time: String,
    }
    let t: T = serde_json::from_slice(line.strip_suffix(b"\n")?).ok()?;
    let secs = record::parse_rfc3339(&t.time)?;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "sync the directory"))
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o640)
        .open(path)
        .map_err(io_err(path, "open"))
}

impl Writer {
    /// Reads the state of the log from disk: the newest record's seq and hash, the file to
    /// append to. Cuts an incomplete last line off the newest file.
    fn resume(cfg: AuditConfig, stats: Arc<AuditStats>) -> Result<Writer, AuditError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&cfg.dir)
            .map_err(io_err(&cfg.dir, "create the directory"))?;
        let files = chain::list_files(&cfg.dir).map_err(io_err(&cfg.dir, "list"))?;
        let mut last: Option<(u64, String)> = None;
        let mut newest_has_records = false;
        for (i, (_, path)) in files.iter().enumerate().rev() {
            let newest = i + 1 == files.len();
            let mut f = OpenOptions::new()
                .read(true)
                .write(newest)
                .open(path)
                .map_err(io_err(path, "open"))?;
            let FileTail { complete, last: line } = file_tail(&mut f).map_err(io_err(path, "read"))?;
            let len = f.metadata().map_err(io_err(path, "stat"))?.len();
            if complete < len {
                if !newest {
                    return Err(AuditError::Corrupt {
                        file: path.clone(),
                        line: 0,
                        reason: "incomplete last line in a file that is not the newest".into(),
                    });
                }
                f.set_len(complete)
                    .map_err(io_err(path, "cut the incomplete last line"))?;
                f.sync_all().map_err(io_err(path, "sync"))?;
                tracing::warn!(
                    file = %path.display(),
                    bytes = len - complete,
                    "audit: cut an incomplete last line (a crash mid-write; it was never acknowledged)"
                );
            }
            let Some(line) = line else {
                continue;
            };
            #[derive(Deserialize)]
            struct Head {
                seq: u64,
            }
            let head: Head = serde_json::from_slice(&line).map_err(|e| AuditError::Corrupt {
                file: path.clone(),
                line: 0,
                reason: format!("last line is not an audit record: {e}"),
            })?;
            newest_has_records = newest;
            last = Some((head.seq, chain::line_hash(&line)));
            break;
        }
        let (next_seq, prev) = match last {
            Some((seq, hash)) => (seq.saturating_add(1), hash),
            None => (1, GENESIS_PREV.to_owned()),
        };
        let (path, started) = match files.last() {
            Some((_, p)) if newest_has_records => (p.clone(), file_started(p)),
            Some((named, p)) if *named == next_seq => (p.clone(), SystemTime::now()),
            Some((_, p)) => {
                // An empty newest file whose name does not fit (it holds nothing): replace it.
                std::fs::remove_file(p).map_err(io_err(p, "remove an empty misnamed file"))?;
                (cfg.dir.join(chain::file_name(next_seq)), SystemTime::now())
            }
            None => (cfg.dir.join(chain::file_name(next_seq)), SystemTime::now()),
        };
        let file = open_append(&path)?;
        sync_dir(&cfg.dir)?;
        let size = file.metadata().map_err(io_err(&path, "stat"))?.len();
        stats.durable_seq.store(next_seq - 1, Ordering::SeqCst);
        tracing::info!(dir = %cfg.dir.display(), next_seq, file = %path.display(), "audit log open");
        Ok(Writer {
            cfg,
            stats,
            file,
            path,
            size,
            started,
            next_seq,
            prev,
            broken: false,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut closing: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let first = if closing.is_empty() {
                rx.blocking_recv()
            } else {
                rx.try_recv().ok()
            };
            let Some(first) = first else {
                break;
            };
            let mut batch = Vec::new();
            let mut push = |m: Msg, batch: &mut Vec<(Box<AuditRecord>, Ack)>| match m {
                Msg::Record(r, ack) => batch.push((r, ack)),
                // Refuse new records; what is queued still gets written.
                Msg::Close(ack) => closing.push(ack),
            };
            push(first, &mut batch);
            while batch.len() < self.cfg.group_commit_max {
                match rx.try_recv() {
                    Ok(m) => push(m, &mut batch),
                    Err(_) => break,
                }
            }
            if !closing.is_empty() {
                rx.close();
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
        }
        if self.cfg.fsync {
            let _ = self.file.sync_data();
        }
        tracing::info!(dir = %self.cfg.dir.display(), next_seq = self.next_seq, "audit log closed");
        for ack in closing {
            let _ = ack.send(());
        }
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        #[cfg(test)]
        if let Some(h) = &self.cfg.before_sync {
            h();
        }
        if self.cfg.fsync {
            self.file.sync_data().map_err(io_err(&self.path, "fdatasync"))?;
            self.stats.fsyncs.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), AuditError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(buf).map_err(io_err(&self.path, "write"))?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Closes the current file (synced) and starts `audit-<seq>.jsonl`.
    fn rotate(&mut self, seq: u64, buf: &mut Vec<u8>) -> Result<(), AuditError> {
        self.write(buf)?;
        buf.clear();
        self.sync()?;
        let path = self.cfg.dir.join(chain::file_name(seq));
        self.file = open_append(&path)?;
        // The new file's directory entry must survive a crash too.
        sync_dir(&self.cfg.dir)?;
        tracing::info!(file = %path.display(), "audit: rotated");
        self.path = path;
        self.size = 0;
        self.started = SystemTime::now();
        Ok(())
    }

    fn needs_rotation(&self, pending: u64, line: u64) -> bool {
        let used = self.size + pending;
        if used == 0 {
            return false;
        }
        used + line > self.cfg.max_file_bytes
            || SystemTime::now()
                .duration_since(self.started)
                .is_ok_and(|age| age >= self.cfg.max_file_age)
    }

    fn commit(&mut self, batch: Vec<(Box<AuditRecord>, Ack)>) {
        if self.broken {
            match Writer::resume(self.cfg.clone(), self.stats.clone()) {
                Ok(w) => *self = w,
                Err(e) => {
                    tracing::error!(error = %e, "audit log unavailable");
                    for (_, ack) in batch {
                        let _ = ack.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
        let (mut seq, mut prev) = (self.next_seq, self.prev.clone());
        let mut buf = Vec::new();
        let mut acks: Vec<(Ack, Receipt)> = Vec::with_capacity(batch.len());
        let mut result = Ok(());
        for (mut rec, ack) in batch {
            rec.seq = seq;
            rec.prev.clone_from(&prev);
            let line = match serde_json::to_vec(&rec) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ack.send(Err(AuditError::Encode(e.to_string())));
                    continue;
                }
            };
            if result.is_ok() && self.needs_rotation(buf.len() as u64, line.len() as u64 + 1) {
                result = self.rotate(seq, &mut buf);
            }
            let hash = chain::line_hash(&line);
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            acks.push((
                ack,
                Receipt {
                    seq,
                    hash: hash.clone(),
                    prev: prev.clone(),
                },
            ));
            prev = hash;
            seq += 1;
        }
        if acks.is_empty() {
            return;
        }
        let result = result.and_then(|()| self.write(&buf)).and_then(|()| self.sync());
        match result {
            Ok(()) => {
                self.next_seq = seq;
                self.prev = prev;
                self.stats.batches.fetch_add(1, Ordering::SeqCst);
                self.stats.records.fetch_add(acks.len() as u64, Ordering::SeqCst);
                self.stats.durable_seq.store(seq - 1, Ordering::SeqCst);
                for (ack, receipt) in acks {
                    let _ = ack.send(Ok(receipt));
                }
            }
            Err(e) => {
                // What reached the disk is unknown: reread it before the next batch. Records of
                // this batch that did reach it were answered with an error, never the reverse.
                tracing::error!(error = %e, "audit write failed");
                self.broken = true;
                for (ack, _) in acks {
                    let _ = ack.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
