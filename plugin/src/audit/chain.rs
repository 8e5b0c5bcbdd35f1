//! The hash chain and the files: naming, reading, and verification.
//!
//! Each line is one JSON record; its `prev` is the lower-case hex SHA-256 of the previous
//! line's bytes (without the newline). Files are `audit-<seq of first record, 20 digits>.jsonl`
//! and sort by name in log order. The verifier is pure over bytes (the fuzz target feeds it).

use std::{
    fmt,
    fs::File,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::record::{AuditRecord, GENESIS_PREV};

/// Prefix of audit file names.
pub const FILE_PREFIX: &str = "audit-";
/// Suffix of audit file names.
pub const FILE_SUFFIX: &str = ".jsonl";

/// Lower-case hex SHA-256 of a line (without its newline).
pub fn line_hash(line: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, line);
    let mut s = String::with_capacity(64);
    for b in d.as_ref() {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    s
}

/// The file name for a file whose first record has `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{FILE_PREFIX}{seq:020}{FILE_SUFFIX}")
}

/// The first-record seq a file name announces (`None` if the name is not an audit file's).
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The audit files in `dir`, in log order (by first seq). Other files are ignored.
pub fn list_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(seq) = name.to_str().and_then(parse_file_name) {
            if entry.file_type()?.is_file() {
                out.push((seq, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The fields the chain needs; everything else in a line is opaque to the verifier.
#[derive(Deserialize)]
struct ChainFields {
    seq: u64,
    prev: String,
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where a line is: file name, 1-based line number, and its seq when readable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// File name (no directory).
    pub file: String,
    /// 1-based line number in the file.
    pub line: u64,
    /// The record's seq, when the line could be read.
    pub seq: Option<u64>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)?;
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        Ok(())
    }
}

/// What is wrong at a break in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakKind {
    /// Not a JSON record with a numeric `seq` and a 64-hex-digit `prev`.
    Unreadable(String),
    /// Seq jumps forward: records between were deleted.
    Gap {
        /// The seq that should have come.
        expected: u64,
    },
    /// Seq goes back or repeats: a record was inserted or records were reordered.
    Backwards {
        /// The seq that should have come.
        expected: u64,
    },
    /// `prev` does not match the previous line: that line was edited (or this one, or one was
    /// inserted before it). `previous` names that line.
    PrevMismatch {
        /// The line whose hash should be in `prev`.
        previous: Option<Location>,
    },
    /// The first record is not a genesis record (seq 1, `prev` all zeros): earlier records or
    /// files are gone (retention pruning, or deletion).
    NotGenesis,
    /// A file's name does not announce the seq of its first record (a file renamed, or
    /// records moved between files).
    FileNameMismatch {
        /// Seq in the name.
        named: u64,
    },
    /// An incomplete last line in a file that is not the newest (a file was cut).
    TornLine,
    /// A file with no records that is not the newest.
    EmptyFile,
    /// An anchor given on the command line does not match.
    AnchorMismatch {
        /// Anchored seq.
        seq: u64,
        /// Anchored hash.
        hash: String,
        /// What the log holds at that seq (`None`: no such record).
        found: Option<String>,
    },
}

/// One place where the chain breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    /// Where it was noticed.
    pub at: Location,
    /// What is wrong.
    pub kind: BreakKind,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = &self.at;
        match &self.kind {
            BreakKind::Unreadable(e) => write!(f, "{at}: not a readable audit record: {e}"),
            BreakKind::Gap { expected } => match at.seq {
                Some(s) if s > expected + 1 => write!(
                    f,
                    "{at}: seq gap: records {expected}..={} are missing (deleted) before this line",
                    s - 1
                ),
                _ => write!(
                    f,
                    "{at}: seq gap: record {expected} is missing (deleted) before this line"
                ),
            },
            BreakKind::Backwards { expected } => write!(
                f,
                "{at}: seq goes back (expected {expected}): a record was inserted here or records were reordered"
            ),
            BreakKind::PrevMismatch { previous: Some(p) } => write!(
                f,
                "{at}: prev does not match the hash of the line before: {p} was edited (or this line was inserted or altered)"
            ),
            BreakKind::PrevMismatch { previous: None } => {
                write!(f, "{at}: prev does not match the hash of the line before")
            }
            BreakKind::NotGenesis => write!(
                f,
                "{at}: the log does not start at a genesis record (seq 1, prev all zeros): earlier records are missing (use --allow-pruned after retention pruning)"
            ),
            BreakKind::FileNameMismatch { named } => write!(
                f,
                "{at}: the file name announces seq {named} but its first record has another seq"
            ),
            BreakKind::TornLine => write!(
                f,
                "{at}: incomplete last line in a file that is not the newest (the file was cut)"
            ),
            BreakKind::EmptyFile => write!(f, "{at}: empty audit file that is not the newest"),
            BreakKind::AnchorMismatch { seq, hash, found } => match found {
                Some(h) => write!(f, "anchor seq {seq}: expected hash {hash}, the log has {h}"),
                None => write!(f, "anchor seq {seq}: the log has no such record (truncated?)"),
            },
        }
    }
}

/// Options of a verification.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Accept a log whose first record is not a genesis record (after retention pruning).
    pub allow_pruned: bool,
    /// `(seq, hash)` pairs recorded earlier (the head hashes printed by `audit verify`).
    pub anchors: Vec<(u64, String)>,
}

/// The result of a verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Files read.
    pub files: u64,
    /// Records read.
    pub records: u64,
    /// The last record: seq and the hash of its line (anchor this externally).
    pub head: Option<(u64, String)>,
    /// First seq in the log.
    pub first_seq: Option<u64>,
    /// Every break, in log order.
    pub breaks: Vec<Break>,
    /// Non-fatal observations (an incomplete last line in the newest file: a write in
    /// progress or a crash mid-write, never acknowledged).
    pub notes: Vec<String>,
}

impl Outcome {
    /// True when the chain is intact.
    pub fn ok(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Incremental verifier: feed files in order, lines in order.
pub struct Verifier {
    opts: VerifyOptions,
    out: Outcome,
    expected_seq: Option<u64>,
    expected_prev: Option<String>,
    previous: Option<Location>,
    file: String,
    file_named: Option<u64>,
    file_lines: u64,
    pending_torn: Option<Location>,
    pending_empty: Option<Location>,
}

impl Verifier {
    /// A verifier with these options.
    pub fn new(opts: VerifyOptions) -> Verifier {
        Verifier {
            opts,
            out: Outcome::default(),
            expected_seq: None,
            expected_prev: None,
            previous: None,
            file: String::new(),
            file_named: None,
            file_lines: 0,
            pending_torn: None,
            pending_empty: None,
        }
    }

    /// Starts the next file (its name, without directory).
    pub fn begin_file(&mut self, name: &str) {
        self.end_file();
        // A torn or empty file followed by another file is a break.
        if let Some(at) = self.pending_torn.take() {
            self.out.breaks.push(Break {
                at,
                kind: BreakKind::TornLine,
            });
        }
        if let Some(at) = self.pending_empty.take() {
            self.out.breaks.push(Break {
                at,
                kind: BreakKind::EmptyFile,
            });
        }
        self.out.files += 1;
        self.file = name.to_owned();
        self.file_named = parse_file_name(name);
        self.file_lines = 0;
    }

    fn end_file(&mut self) {
        if !self.file.is_empty() && self.file_lines == 0 && self.pending_torn.is_none() {
            self.pending_empty = Some(Location {
                file: self.file.clone(),
                line: 0,
                seq: None,
            });
        }
    }

    /// Feeds one complete line (without its newline).
    pub fn line(&mut self, line: &[u8]) {
        self.file_lines += 1;
        let mut at = Location {
            file: self.file.clone(),
            line: self.file_lines,
            seq: None,
        };
        let fields = match serde_json::from_slice::<ChainFields>(line) {
            Ok(f) if is_hash(&f.prev) => f,
            Ok(_) => {
                self.brk(at, BreakKind::Unreadable("prev is not 64 lower-case hex digits".into()));
                return;
            }
            Err(e) => {
                self.brk(at, BreakKind::Unreadable(e.to_string()));
                return;
            }
        };
        at.seq = Some(fields.seq);
        let hash = line_hash(line);
        if self.file_lines == 1 {
            if let Some(named) = self.file_named {
                if named != fields.seq {
                    self.brk(at.clone(), BreakKind::FileNameMismatch { named });
                }
            }
        }
        match (self.expected_seq, self.expected_prev.clone()) {
            (None, _) => {
                self.out.first_seq = Some(fields.seq);
                if (fields.seq != 1 || fields.prev != GENESIS_PREV) && !self.opts.allow_pruned {
                    self.brk(at.clone(), BreakKind::NotGenesis);
                }
            }
            (Some(exp), prev) => {
                if fields.seq > exp {
                    self.brk(at.clone(), BreakKind::Gap { expected: exp });
                } else if fields.seq < exp {
                    self.brk(at.clone(), BreakKind::Backwards { expected: exp });
                }
                if prev.as_deref() != Some(fields.prev.as_str()) {
                    // With a seq break already reported, the prev mismatch is the same event.
                    if fields.seq == exp {
                        self.brk(
                            at.clone(),
                            BreakKind::PrevMismatch {
                                previous: self.previous.clone(),
                            },
                        );
                    }
                }
            }
        }
        for (seq, want) in &self.opts.anchors {
            if *seq == fields.seq && *want != hash {
                let b = Break {
                    at: at.clone(),
                    kind: BreakKind::AnchorMismatch {
                        seq: *seq,
                        hash: want.clone(),
                        found: Some(hash.clone()),
                    },
                };
                self.out.breaks.push(b);
            }
        }
        self.out.records += 1;
        // Resynchronise on this line so that later breaks are reported on their own.
        self.expected_seq = Some(fields.seq.saturating_add(1));
        self.expected_prev = Some(hash.clone());
        self.previous = Some(at);
        self.out.head = Some((fields.seq, hash));
    }

    fn brk(&mut self, at: Location, kind: BreakKind) {
        self.out.breaks.push(Break { at, kind });
    }

    /// Notes an incomplete last line (bytes after the last newline) of the current file.
    pub fn torn_tail(&mut self, bytes: usize) {
        self.pending_torn = Some(Location {
            file: self.file.clone(),
            line: self.file_lines + 1,
            seq: None,
        });
        self.out.notes.push(format!(
            "{}:{}: incomplete last line ({bytes} bytes): a write in progress or a crash mid-write (never acknowledged)",
            self.file,
            self.file_lines + 1
        ));
    }

    /// Ends the verification.
    pub fn finish(mut self) -> Outcome {
        self.end_file();
        // The newest file may be empty (just rotated) or end in a torn line: not a break.
        if let Some(at) = self.pending_empty.take() {
            if self.out.records == 0 && self.out.files > 0 {
                self.out.notes.push(format!("{}: empty", at.file));
            }
        }
        let head_seq = self.out.head.as_ref().map(|(s, _)| *s);
        for (seq, want) in &self.opts.anchors {
            if head_seq.is_none_or(|h| h < *seq) {
                self.out.breaks.push(Break {
                    at: Location {
                        file: self.file.clone(),
                        line: self.file_lines,
                        seq: head_seq,
                    },
                    kind: BreakKind::AnchorMismatch {
                        seq: *seq,
                        hash: want.clone(),
                        found: None,
                    },
                });
            }
        }
        self.out
    }
}

/// Reads one file's complete lines, calling `f` for each (without the newline); returns the
/// length of an incomplete last line (0 when the file ends with a newline).
pub fn for_each_line(r: impl io::Read, mut f: impl FnMut(&[u8])) -> io::Result<usize> {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(0);
        }
        if buf.last() != Some(&b'\n') {
            return Ok(buf.len());
        }
        buf.pop();
        f(&buf);
    }
}

/// Verifies in-memory files, in the order given (the fuzz target's entry point).
pub fn verify_bytes(files: &[(&str, &[u8])], opts: VerifyOptions) -> Outcome {
    let mut v = Verifier::new(opts);
    for (name, bytes) in files {
        v.begin_file(name);
        // Reading from a slice cannot fail.
        if let Ok(torn) = for_each_line(*bytes, |l| v.line(l)) {
            if torn > 0 {
                v.torn_tail(torn);
            }
        }
    }
    v.finish()
}

/// Verifies every audit file in `dir`, in order.
pub fn verify_dir(dir: &Path, opts: VerifyOptions) -> io::Result<Outcome> {
    let files = list_files(dir)?;
    let mut v = Verifier::new(opts);
    for (_, path) in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        v.begin_file(&name);
        let f = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let torn = for_each_line(f, |l| v.line(l))?;
        if torn > 0 {
            v.torn_tail(torn);
        }
    }
    Ok(v.finish())
}

/// A record read back, with where it is.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The record.
    pub record: AuditRecord,
    /// The exact line (for `--json` output).
    pub line: String,
    /// Where it is.
    pub at: Location,
}

/// Reads every record of `dir` in log order, skipping lines that are not records (the verifier
/// reports those). `keep` decides which records are kept (saves memory on large logs).
pub fn read_dir(dir: &Path, mut keep: impl FnMut(&AuditRecord) -> bool) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (_, path) in list_files(dir)? {
        read_file(&path, 0, &mut |e| {
            if keep(&e.record) {
                out.push(e);
            }
        })?;
    }
    Ok(out)
}

/// Reads the complete lines of one file from byte `offset`, calling `f` for each record;
/// returns the offset just after the last complete line.
pub fn read_file(path: &Path, offset: u64, f: &mut dyn FnMut(Entry)) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut consumed = offset;
    let mut line_no = 0u64;
    for_each_line(file, |l| {
        consumed += l.len() as u64 + 1;
        line_no += 1;
        if let Ok(record) = serde_json::from_slice::<AuditRecord>(l) {
            f(Entry {
                at: Location {
                    file: name.clone(),
                    line: line_no,
                    seq: Some(record.seq),
                },
                line: String::from_utf8_lossy(l).into_owned(),
                record,
            });
        }
    })?;
    Ok(consumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_sort_in_log_order() {
        assert_eq!(file_name(1), "audit-00000000000000000001.jsonl");
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("audit-1.jsonl"), None);
        assert_eq!(parse_file_name("audit-0000000000000000000x.jsonl"), None);
        assert!(file_name(9) < file_name(10));
    }

    #[test]
    fn line_hash_is_sha256_hex() {
        assert_eq!(
            line_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn garbage_is_reported_not_panicked_on() {
        let out = verify_bytes(
            &[("x", b"\xff\xfe\n{}\n{\"seq\":1,\"prev\":\"zz\"}\npartial")],
            VerifyOptions::default(),
        );
        assert_eq!(out.records, 0);
        assert_eq!(out.breaks.len(), 3, "{:?}", out.breaks);
        assert_eq!(out.notes.len(), 1);
    }
}
