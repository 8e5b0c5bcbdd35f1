//! `rdp-preflight audit list | summary | verify | tail | export`: the security team's review
//! tools, and the replay of a period to the SIEM.
//!
//! Exit status: 0 success, 1 a broken chain (verify) or an I/O error, 2 usage.

use std::{
    collections::HashMap,
    io::{self, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use std::os::unix::fs::DirBuilderExt;

use clap::{Args, Subcommand};

use super::{
    chain::{self, Entry, VerifyOptions},
    record::{parse_rfc3339, AuditRecord},
};
use crate::cause::Cause;

/// Where the audit files are.
#[derive(Args, Debug, Clone, Default)]
pub struct Source {
    /// Audit directory (default: `RDP_PREFLIGHT_AUDIT__DIR`, else `[audit] dir` of --config).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Config file whose `[audit] dir` to read.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The `audit` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum AuditCommand {
    /// List records, oldest first, as a table or JSON lines.
    List {
        /// Where the audit files are.
        #[command(flatten)]
        source: Source,
        /// Only records since: a duration back from now (`90m`, `24h`, `7d`, `2w`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only records with a finding of this cause (name or number).
        #[arg(long)]
        cause: Option<String>,
        /// Only records for this target host (or resolved/connected address).
        #[arg(long)]
        target: Option<String>,
        /// Only records for this account (`user` or `DOMAIN\user`).
        #[arg(long)]
        account: Option<String>,
        /// Only records with this verdict (`deny`, `allow_with_warnings`, `allow`).
        #[arg(long)]
        verdict: Option<String>,
        /// Print the records' JSON lines exactly as stored.
        #[arg(long)]
        json: bool,
    },
    /// Count records by cause, owner, target and account: what to fix first.
    Summary {
        /// Where the audit files are.
        #[command(flatten)]
        source: Source,
        /// Only records since: a duration back from now (`24h`, `7d`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Rows per table for targets and accounts.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Check every file in order: JSON, seq continuity, prev hashes. Prints the head hash.
    Verify {
        /// Where the audit files are.
        #[command(flatten)]
        source: Source,
        /// Accept a log that does not start at a genesis record (after retention pruning).
        #[arg(long)]
        allow_pruned: bool,
        /// A head recorded earlier (`SEQ:HASH`, as printed by verify); repeatable.
        #[arg(long = "anchor", value_name = "SEQ:HASH")]
        anchors: Vec<String>,
    },
    /// Print the newest records; with --follow, keep printing new ones.
    Tail {
        /// Where the audit files are.
        #[command(flatten)]
        source: Source,
        /// How many records.
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        n: usize,
        /// Keep printing records as they are written (across rotations).
        #[arg(short, long)]
        follow: bool,
        /// Print the records' JSON lines exactly as stored.
        #[arg(long)]
        json: bool,
    },
    /// Send the records since a time to the `[siem]` destination of --config again, as the
    /// plugin sends them (same event uids), or print the events with --stdout.
    Export {
        /// Where the audit files are (and, with --config, where the events go).
        #[command(flatten)]
        source: Source,
        /// Records since: a duration back from now (`90m`, `24h`, `7d`) or an RFC 3339 time.
        #[arg(long)]
        since: String,
        /// `ocsf` or `json` (default: `siem.format` of --config, else `ocsf`).
        #[arg(long)]
        format: Option<String>,
        /// Print the events, one per line, instead of sending them.
        #[arg(long)]
        stdout: bool,
    },
}

/// A failure of an `audit` command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or config.
    #[error("{0}")]
    Usage(String),
    /// Reading the files failed.
    #[error("{0}")]
    Io(String),
}

fn io_err(e: io::Error) -> CliError {
    CliError::Io(e.to_string())
}

/// Runs an `audit` subcommand, printing to stdout.
pub fn run(cmd: AuditCommand) -> ExitCode {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match execute(cmd, &mut out) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(CliError::Usage(e)) => {
            eprintln!("rdp-preflight audit: {e}");
            ExitCode::from(crate::cli::EXIT_USAGE)
        }
        Err(CliError::Io(e)) => {
            eprintln!("rdp-preflight audit: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an `audit` subcommand, writing to `out`; `Ok(false)` when `verify` found a break.
pub fn execute(cmd: AuditCommand, out: &mut dyn Write) -> Result<bool, CliError> {
    match cmd {
        AuditCommand::List {
            source,
            since,
            cause,
            target,
            account,
            verdict,
            json,
        } => {
            let src = resolve(&source)?;
            let filter = Filter::new(since.as_deref(), cause.as_deref(), target, account, verdict, now())?;
            let entries = chain::read_dir(src.dir(), |r| filter.matches(r)).map_err(io_err)?;
            if json {
                for e in &entries {
                    writeln!(out, "{}", e.line).map_err(io_err)?;
                }
            } else {
                write_table(out, &entries).map_err(io_err)?;
                writeln!(out, "{} record(s)", entries.len()).map_err(io_err)?;
            }
            Ok(true)
        }
        AuditCommand::Summary { source, since, top } => {
            let src = resolve(&source)?;
            let filter = Filter::new(since.as_deref(), None, None, None, None, now())?;
            let entries = chain::read_dir(src.dir(), |r| filter.matches(r)).map_err(io_err)?;
            let records: Vec<&AuditRecord> = entries.iter().map(|e| &e.record).collect();
            out.write_all(summary(&records, since.as_deref(), top).as_bytes())
                .map_err(io_err)?;
            Ok(true)
        }
        AuditCommand::Verify {
            source,
            allow_pruned,
            anchors,
        } => {
            let src = resolve(&source)?;
            let anchors = anchors.iter().map(|a| parse_anchor(a)).collect::<Result<Vec<_>, _>>()?;
            let outcome = chain::verify_dir(src.dir(), VerifyOptions { allow_pruned, anchors }).map_err(io_err)?;
            let head = match &src {
                Resolved::Store(s) => s.head_problem.clone(),
                Resolved::Dir(_) => None,
            };
            if let Some(h) = &head {
                writeln!(out, "BROKEN: {h}").map_err(io_err)?;
            }
            write_verify(out, src.label(), &outcome).map_err(io_err)?;
            Ok(outcome.ok() && head.is_none())
        }
        AuditCommand::Tail {
            source,
            n,
            follow,
            json,
        } => {
            let mut src = resolve(&source)?;
            let mut f = Follower::new(src.dir());
            let entries = f.last(n).map_err(io_err)?;
            print_rows(out, &entries, json).map_err(io_err)?;
            out.flush().map_err(io_err)?;
            if follow {
                loop {
                    std::thread::sleep(Duration::from_millis(500));
                    if let Resolved::Store(s) = &mut src {
                        s.fetch()?;
                    }
                    let new = f.poll().map_err(io_err)?;
                    print_rows(out, &new, json).map_err(io_err)?;
                    out.flush().map_err(io_err)?;
                }
            }
            Ok(true)
        }
        AuditCommand::Export {
            source,
            since,
            format,
            stdout,
        } => export(&source, &since, format.as_deref(), stdout, out),
    }
}

/// `audit export`: the records since `since`, to the SIEM destination or `out`.
fn export(
    source: &Source,
    since: &str,
    format: Option<&str>,
    stdout: bool,
    out: &mut dyn Write,
) -> Result<bool, CliError> {
    use crate::siem::{self, Destination, Format};
    let usage = |e: String| CliError::Usage(e);
    let siem_cfg = match &source.config {
        Some(p) => {
            crate::config::Config::load(Some(p))
                .map_err(|e| usage(format!("--config {}: {e}", p.display())))?
                .siem
        }
        None => None,
    };
    let format = match format {
        Some(f) => Format::parse(f, "--format").map_err(usage)?,
        None => siem_cfg.as_ref().map_or(Format::Ocsf, |c| c.format),
    };
    let destination = match (&siem_cfg, stdout) {
        (_, true) => None,
        (Some(c), false) => Some(c.clone()),
        (None, false) => {
            return Err(usage(
                "no destination: pass --config FILE with a [siem] syslog or file, or --stdout".into(),
            ))
        }
    };
    let src = resolve(source)?;
    let filter = Filter::new(Some(since), None, None, None, None, now())?;
    let entries = chain::read_dir(src.dir(), |r| filter.matches(r)).map_err(io_err)?;
    let Some(cfg) = destination else {
        for e in &entries {
            if let Some(b) = siem::encode(&e.record, format, &Destination::Stdout, "", 0) {
                out.write_all(&b).map_err(io_err)?;
            }
        }
        return Ok(true);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err)?;
    let (host, pid) = (siem::hostname(), std::process::id());
    let described = cfg.destination.describe();
    let (sent, skipped, failure) = rt.block_on(async {
        let mut conn = siem::Connection::new(cfg.destination.clone(), cfg.timeout);
        let (mut sent, mut skipped) = (0usize, 0usize);
        for e in &entries {
            let Some(b) = siem::encode(&e.record, format, &cfg.destination, &host, pid).filter(|b| conn.fits(b)) else {
                skipped += 1;
                continue;
            };
            if let Err(err) = conn.send(&b).await {
                return (sent, skipped, Some((e.record.check_id.clone(), err)));
            }
            sent += 1;
        }
        conn.close().await;
        (sent, skipped, None)
    });
    let total = entries.len();
    match failure {
        None => {
            writeln!(out, "exported {sent} of {total} record(s) to {described}").map_err(io_err)?;
            if skipped > 0 {
                writeln!(out, "{skipped} record(s) too large for a datagram were not sent").map_err(io_err)?;
            }
            Ok(skipped == 0)
        }
        Some((check_id, err)) => Err(CliError::Io(format!(
            "{described}: {err}: sent {sent} of {total} record(s); stopped at check {check_id}"
        ))),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The audit log in the shared store, copied into a private temporary directory as the files
/// would hold it, so that every command reads and verifies it with the same code; removed on
/// drop. `audit verify` also checks the store's signed head.
struct FromStore {
    dir: PathBuf,
    label: PathBuf,
    store: std::sync::Arc<crate::store::Store>,
    rt: tokio::runtime::Runtime,
    head_problem: Option<String>,
    last_seq: i64,
}

impl FromStore {
    fn open(cfg: &crate::config::Config) -> Result<FromStore, CliError> {
        let Some(sc) = cfg.store.clone() else {
            return Err(CliError::Usage("audit.backend = \"store\" but no [store] url".into()));
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err)?;
        let store = rt.block_on(crate::store::Store::connect(sc)).map_err(CliError::Io)?;
        let dir = std::env::temp_dir().join(format!("rdp-preflight-audit-{}", ulid::Ulid::new()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io_err)?;
        let label = PathBuf::from(format!("store {}", store.display()));
        let mut me = FromStore {
            dir,
            label,
            store,
            rt,
            head_problem: None,
            last_seq: 0,
        };
        me.fetch()?;
        Ok(me)
    }

    /// Appends the records after the last one fetched; checks the head against the last record.
    fn fetch(&mut self) -> Result<usize, CliError> {
        let (rows, head) = self
            .rt
            .block_on(crate::store::audit::read(&self.store, self.last_seq + 1))
            .map_err(CliError::Io)?;
        if let Some((first, _)) = rows.first() {
            let name = match chain::list_files(&self.dir).map_err(io_err)?.last() {
                Some((_, p)) => p.clone(),
                None => self.dir.join(chain::file_name(u64::try_from(*first).unwrap_or(1))),
            };
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&name)
                .map_err(io_err)?;
            let mut buf = String::new();
            for (_, line) in &rows {
                buf.push_str(line);
                buf.push('\n');
            }
            f.write_all(buf.as_bytes()).map_err(io_err)?;
        }
        if let Some((seq, _)) = rows.last() {
            self.last_seq = *seq;
        }
        let last = rows.last().map(|(_, l)| {
            let seq = serde_json::from_str::<AuditRecord>(l).map_or(0, |r| r.seq);
            (seq, chain::line_hash(l.as_bytes()))
        });
        let last = last.or_else(|| self.last_line());
        self.head_problem = crate::store::audit::check_head(
            self.store.hmac_key(),
            &head,
            last.as_ref().map(|(s, h)| (*s, h.as_str())),
        );
        Ok(rows.len())
    }

    /// The last line already copied (seq, hash).
    fn last_line(&self) -> Option<(u64, String)> {
        let (_, p) = chain::list_files(&self.dir).ok()?.pop()?;
        let text = std::fs::read_to_string(p).ok()?;
        let l = text.lines().last()?;
        let seq = serde_json::from_str::<AuditRecord>(l).ok()?.seq;
        Some((seq, chain::line_hash(l.as_bytes())))
    }
}

impl Drop for FromStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the records are read from.
enum Resolved {
    Dir(PathBuf),
    Store(Box<FromStore>),
}

impl Resolved {
    fn dir(&self) -> &Path {
        match self {
            Resolved::Dir(d) => d,
            Resolved::Store(s) => &s.dir,
        }
    }

    fn label(&self) -> &Path {
        match self {
            Resolved::Dir(d) => d,
            Resolved::Store(s) => &s.label,
        }
    }
}

/// `--dir`, else `RDP_PREFLIGHT_AUDIT__DIR`, else `--config`: its `[audit] dir`, or the shared
/// store when it says `[audit] backend = "store"`.
fn resolve(source: &Source) -> Result<Resolved, CliError> {
    if let Some(path) = source.config.as_ref().filter(|_| source.dir.is_none()) {
        let text =
            std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("--config {}: {e}", path.display())))?;
        let v: toml::Table =
            toml::from_str(&text).map_err(|e| CliError::Usage(format!("--config {}: {e}", path.display())))?;
        let store_backend = v
            .get("audit")
            .and_then(|a| a.get("backend"))
            .and_then(toml::Value::as_str)
            == Some("store");
        if store_backend {
            let cfg = crate::config::Config::load(Some(path))
                .map_err(|e| CliError::Usage(format!("--config {}: {e}", path.display())))?;
            return Ok(Resolved::Store(Box::new(FromStore::open(&cfg)?)));
        }
    }
    resolve_dir(source).map(Resolved::Dir)
}

/// The audit directory: `--dir`, else `RDP_PREFLIGHT_AUDIT__DIR`, else `[audit] dir` of
/// `--config` (read without validating the rest of the file).
pub fn resolve_dir(source: &Source) -> Result<PathBuf, CliError> {
    if let Some(d) = &source.dir {
        return Ok(d.clone());
    }
    if let Some(d) = std::env::var_os("RDP_PREFLIGHT_AUDIT__DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let Some(path) = &source.config else {
        return Err(CliError::Usage(
            "no audit directory: pass --dir DIR, or --config FILE with an [audit] dir".into(),
        ));
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("--config {}: {e}", path.display())))?;
    dir_from_config(&text).map_err(|e| CliError::Usage(format!("--config {}: {e}", path.display())))
}

/// `[audit] dir` of a config file's text.
pub fn dir_from_config(text: &str) -> Result<PathBuf, String> {
    let v: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    match v.get("audit").and_then(|a| a.get("dir")) {
        Some(toml::Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
        Some(_) => Err("audit.dir: must be a non-empty string".into()),
        None => Err("no [audit] dir in this file: the audit log is not configured".into()),
    }
}

/// Parses `--since`: a duration back from `now` (`90s`, `30m`, `24h`, `7d`, `2w`) or an RFC 3339
/// time; returns seconds since the Unix epoch.
pub fn parse_since(s: &str, now: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Some(t) = parse_rfc3339(s) {
        return Ok(t);
    }
    let bad = || format!("--since {s:?}: use a duration such as 90m, 24h, 7d, 2w, or an RFC 3339 time");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    Ok(now.saturating_sub(n.saturating_mul(mult)))
}

fn parse_anchor(a: &str) -> Result<(u64, String), CliError> {
    let bad = || CliError::Usage(format!("--anchor {a:?}: use SEQ:HASH as printed by `audit verify`"));
    let (seq, hash) = a.split_once(':').ok_or_else(bad)?;
    let seq = seq.trim().parse().map_err(|_| bad())?;
    let hash = hash.trim().to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok((seq, hash))
}

/// Which records `list` and `summary` keep.
#[derive(Debug, Default)]
pub struct Filter {
    since: Option<i64>,
    cause: Option<u16>,
    target: Option<String>,
    account: Option<String>,
    verdict: Option<String>,
}

impl Filter {
    /// Parses the options; `now` anchors relative `--since` values.
    pub fn new(
        since: Option<&str>,
        cause: Option<&str>,
        target: Option<String>,
        account: Option<String>,
        verdict: Option<String>,
        now: i64,
    ) -> Result<Filter, CliError> {
        let since = since
            .map(|s| parse_since(s, now))
            .transpose()
            .map_err(CliError::Usage)?;
        let cause = match cause {
            None => None,
            Some(c) => Some(
                c.trim()
                    .parse::<u16>()
                    .ok()
                    .and_then(Cause::from_number)
                    .or_else(|| Cause::from_name(c))
                    .ok_or_else(|| CliError::Usage(format!("--cause {c:?}: no such cause in the catalog")))?
                    .number(),
            ),
        };
        let verdict = match verdict.as_deref().map(str::to_ascii_lowercase) {
            None => None,
            Some(v) if matches!(v.as_str(), "deny" | "allow" | "allow_with_warnings") => Some(v),
            Some(v) => {
                return Err(CliError::Usage(format!(
                    "--verdict {v:?}: use deny, allow_with_warnings or allow"
                )))
            }
        };
        Ok(Filter {
            since,
            cause,
            target: target.map(|t| t.trim().trim_end_matches('.').to_ascii_lowercase()),
            account: account.map(|a| a.trim().to_ascii_lowercase()),
            verdict,
        })
    }

    /// True when `r` passes every option given.
    pub fn matches(&self, r: &AuditRecord) -> bool {
        if let Some(since) = self.since {
            if r.unix_time().is_none_or(|t| t < since) {
                return false;
            }
        }
        if let Some(c) = self.cause {
            if r.primary_cause.number != c && !r.findings.iter().any(|f| f.number == c) {
                return false;
            }
        }
        if let Some(t) = &self.target {
            let host = r.target.host.trim_end_matches('.').to_ascii_lowercase();
            let by_addr = r.target.resolved.iter().any(|a| a == t)
                || r.target.connected.as_deref().is_some_and(|c| {
                    c == t
                        || c.rsplit_once(':')
                            .is_some_and(|(ip, _)| ip.trim_matches(['[', ']']) == t)
                });
            if host != *t && !by_addr {
                return false;
            }
        }
        if let Some(a) = &self.account {
            let Some(acc) = &r.account else {
                return false;
            };
            let user = acc.username.to_ascii_lowercase();
            let full = format!("{}\\{}", acc.domain, acc.username).to_ascii_lowercase();
            if user != *a && full != *a {
                return false;
            }
        }
        if let Some(v) = &self.verdict {
            if r.verdict != *v {
                return false;
            }
        }
        true
    }
}

/// Replaces control characters (a hostile certificate subject could carry terminal escapes).
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn row(r: &AuditRecord) -> [String; 8] {
    let requester = match (r.requester.user.is_empty(), r.requester.source_address.is_empty()) {
        (true, true) => "-".to_owned(),
        (false, true) => r.requester.user.clone(),
        (true, false) => format!("@{}", r.requester.source_address),
        (false, false) => format!("{}@{}", r.requester.user, r.requester.source_address),
    };
    [
        r.time.clone(),
        r.seq.to_string(),
        r.verdict.to_ascii_uppercase(),
        format!("{} {}", r.primary_cause.number, r.primary_cause.name),
        format!("{}:{}", r.target.host, r.target.port),
        r.account_label(),
        requester,
        r.check_id.clone(),
    ]
    .map(|s| clean(&s))
}

const HEADER: [&str; 8] = [
    "TIME",
    "SEQ",
    "VERDICT",
    "CAUSE",
    "TARGET",
    "ACCOUNT",
    "REQUESTER",
    "CHECK_ID",
];

fn write_table(out: &mut dyn Write, entries: &[Entry]) -> io::Result<()> {
    let rows: Vec<[String; 8]> = entries.iter().map(|e| row(&e.record)).collect();
    let mut w = HEADER.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; 8]| -> io::Result<()> {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, HEADER)?;
    for r in &rows {
        line(
            out,
            [&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6], &r[7]].map(String::as_str),
        )?;
    }
    Ok(())
}

fn print_rows(out: &mut dyn Write, entries: &[Entry], json: bool) -> io::Result<()> {
    for e in entries {
        if json {
            writeln!(out, "{}", e.line)?;
        } else {
            writeln!(out, "{}", row(&e.record).join("  "))?;
        }
    }
    Ok(())
}

fn write_verify(out: &mut dyn Write, dir: &Path, o: &chain::Outcome) -> io::Result<()> {
    for n in &o.notes {
        writeln!(out, "note: {n}")?;
    }
    for b in &o.breaks {
        writeln!(out, "BROKEN: {b}")?;
    }
    let range = match (o.first_seq, &o.head) {
        (Some(f), Some((h, _))) => format!(" (seq {f}..={h})"),
        _ => String::new(),
    };
    writeln!(
        out,
        "{}: {} file(s), {} record(s){range}",
        dir.display(),
        o.files,
        o.records
    )?;
    if let Some((seq, hash)) = &o.head {
        writeln!(out, "head {seq}:{hash}")?;
    }
    if o.ok() {
        writeln!(out, "chain intact")?;
    } else {
        writeln!(out, "CHAIN BROKEN: {} break(s)", o.breaks.len())?;
    }
    Ok(())
}

/// A count, and the counts by primary cause within it.
type Tally<'a> = (u64, HashMap<&'a str, u64>);
/// A key, its count, and its causes, most frequent first.
type Ranked<'a> = (String, u64, Vec<(&'a str, u64)>);

fn top<'a>(counts: &HashMap<String, Tally<'a>>, n: usize) -> Vec<Ranked<'a>> {
    let mut v: Vec<Ranked<'a>> = counts
        .iter()
        .map(|(k, (c, causes))| {
            let mut cs: Vec<(&str, u64)> = causes.iter().map(|(k, v)| (*k, *v)).collect();
            cs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            (k.clone(), *c, cs)
        })
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// The `summary` report: counts by verdict, primary cause (with owner and fix), owner, target
/// and account, most frequent first.
pub fn summary(records: &[&AuditRecord], since: Option<&str>, n: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let window = since.map_or_else(|| "all records".to_owned(), |w| format!("since {w}"));
    let (first, last) = (
        records.first().map(|r| r.time.as_str()),
        records.last().map(|r| r.time.as_str()),
    );
    let _ = write!(s, "{} record(s), {window}", records.len());
    if let (Some(f), Some(l)) = (first, last) {
        let _ = write!(s, " ({f} .. {l})");
    }
    let _ = writeln!(s);
    if records.is_empty() {
        return s;
    }
    let mut verdicts: HashMap<&str, u64> = HashMap::new();
    let mut causes: HashMap<(u16, &str), u64> = HashMap::new();
    let mut owners: HashMap<&str, u64> = HashMap::new();
    let mut targets: HashMap<String, Tally<'_>> = HashMap::new();
    let mut accounts: HashMap<String, Tally<'_>> = HashMap::new();
    for r in records {
        *verdicts.entry(r.verdict.as_str()).or_default() += 1;
        let name = r.primary_cause.name.as_str();
        *causes.entry((r.primary_cause.number, name)).or_default() += 1;
        let owner = Cause::from_number(r.primary_cause.number)
            .and_then(Cause::info)
            .map_or("-", |i| i.owner.as_str());
        *owners.entry(owner).or_default() += 1;
        let t = targets
            .entry(clean(&format!("{}:{}", r.target.host, r.target.port)))
            .or_default();
        t.0 += 1;
        *t.1.entry(name).or_default() += 1;
        if r.account.is_some() {
            let a = accounts.entry(clean(&r.account_label())).or_default();
            a.0 += 1;
            *a.1.entry(name).or_default() += 1;
        }
    }
    let mut vs: Vec<_> = verdicts.into_iter().collect();
    vs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let vs: Vec<String> = vs.iter().map(|(v, c)| format!("{v} {c}")).collect();
    let _ = writeln!(s, "verdicts: {}", vs.join(", "));

    let _ = writeln!(s, "\nby primary cause (what to fix first)");
    let mut cs: Vec<_> = causes.into_iter().collect();
    cs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for ((num, name), count) in &cs {
        let info = Cause::from_number(*num).and_then(Cause::info);
        let owner = info.map_or("-", |i| i.owner.as_str());
        let _ = writeln!(s, "{count:>8}  {num} {name}  (owner {owner})");
        if let Some(i) = info {
            let _ = writeln!(s, "          fix: {}", i.remediation);
        }
    }
    let _ = writeln!(s, "\nby owner");
    let mut os: Vec<_> = owners.into_iter().collect();
    os.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    for (o, c) in os {
        let _ = writeln!(s, "{c:>8}  {o}");
    }
    for (title, map) in [("target", &targets), ("account", &accounts)] {
        if map.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\nby {title} (top {n} of {})", map.len());
        for (k, c, cs) in top(map, n) {
            let detail: Vec<String> = cs.iter().take(3).map(|(n, c)| format!("{n} {c}")).collect();
            let _ = writeln!(s, "{c:>8}  {k}  ({})", detail.join(", "));
        }
    }
    s
}

/// Reads new records as they are appended, across rotations (`tail --follow`).
pub struct Follower {
    dir: PathBuf,
    current: Option<(PathBuf, u64)>,
    last_seq: Option<u64>,
}

impl Follower {
    /// Follows the log in `dir`.
    pub fn new(dir: &Path) -> Follower {
        Follower {
            dir: dir.to_owned(),
            current: None,
            last_seq: None,
        }
    }

    /// The last `n` records, and positions the follower after them.
    pub fn last(&mut self, n: usize) -> io::Result<Vec<Entry>> {
        let files = chain::list_files(&self.dir)?;
        let mut out: Vec<Entry> = Vec::new();
        for (i, (_, path)) in files.iter().enumerate().rev() {
            let mut these = Vec::new();
            let end = chain::read_file(path, 0, &mut |e| these.push(e))?;
            if i + 1 == files.len() {
                self.current = Some((path.clone(), end));
            }
            these.append(&mut out);
            out = these;
            if out.len() >= n {
                break;
            }
        }
        self.last_seq = out.last().map(|e| e.record.seq);
        let skip = out.len().saturating_sub(n);
        out.drain(..skip);
        Ok(out)
    }

    /// Records written since the last call.
    pub fn poll(&mut self) -> io::Result<Vec<Entry>> {
        let files = chain::list_files(&self.dir)?;
        let mut out = Vec::new();
        let start = match (&self.current, self.last_seq) {
            // Continue in the current file, then every newer one.
            (Some((path, _)), _) if files.iter().any(|(_, p)| p == path) => {
                files.iter().position(|(_, p)| p == path).unwrap_or(0)
            }
            // The current file is gone (retention): resume where the next seq lives.
            (_, Some(last)) => files
                .iter()
                .rposition(|(first, _)| *first <= last.saturating_add(1))
                .unwrap_or(0),
            _ => 0,
        };
        let last_seq = self.last_seq;
        for (_, path) in files.iter().skip(start) {
            let offset = match &self.current {
                Some((p, off)) if p == path => *off,
                _ => 0,
            };
            let end = chain::read_file(path, offset, &mut |e| {
                if last_seq.is_none_or(|l| e.record.seq > l) {
                    out.push(e);
                }
            })?;
            self.current = Some((path.clone(), end));
        }
        if let Some(e) = out.last() {
            self.last_seq = Some(e.record.seq);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_durations_and_rfc3339() {
        let now = 1_700_000_000;
        assert_eq!(parse_since("24h", now), Ok(now - 86_400));
        assert_eq!(parse_since("7d", now), Ok(now - 7 * 86_400));
        assert_eq!(parse_since("90m", now), Ok(now - 5400));
        assert_eq!(parse_since("2023-11-14T22:13:20Z", now), Ok(1_700_000_000));
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("5y", now).is_err());
        assert!(parse_since("", now).is_err());
    }

    #[test]
    fn audit_dir_comes_from_the_config_file() {
        assert_eq!(
            dir_from_config("[audit]\ndir = \"/var/lib/x\"\n"),
            Ok(PathBuf::from("/var/lib/x"))
        );
        assert!(dir_from_config("[server]\nlisten = \"127.0.0.1:1\"\n").is_err());
        assert!(dir_from_config("[audit]\ndir = 3\n").is_err());
    }

    #[test]
    fn anchors_parse() {
        let h = "a".repeat(64);
        assert_eq!(parse_anchor(&format!("12:{h}")).ok(), Some((12, h.clone())));
        assert!(parse_anchor("12").is_err());
        assert!(parse_anchor("x:abc").is_err());
    }

    #[test]
    fn unknown_cause_is_a_usage_error() {
        assert!(matches!(
            Filter::new(None, Some("NOPE"), None, None, None, 0),
            Err(CliError::Usage(_))
        ));
        assert!(Filter::new(None, Some("tcp_refused"), None, None, None, 0).is_ok());
        assert!(Filter::new(None, Some("201"), None, None, None, 0).is_ok());
    }
}
