//! Certificate pins: fixed pins from config, and trust-on-first-use pins remembered per target
//! (`host:port` as dialed), in memory or in a JSON file written atomically.
//!
//! A mismatch is never written over: an operator confirms the re-issue and removes the entry.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Mutex,
};

use crate::{config::PinStoreConfig, probe::cert, report::Finding};

/// The pin store.
#[derive(Debug)]
pub struct PinStore {
    fixed: HashMap<String, String>,
    seen: Option<Mutex<BTreeMap<String, String>>>,
    path: Option<PathBuf>,
}

/// What the pin store said of a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PinStatus {
    /// No pin store, or no certificate.
    #[default]
    None,
    /// First sight: recorded now, proves nothing.
    FirstUse,
    /// Equal to a fixed pin or to the one recorded earlier: the target is the one seen before.
    Matched,
    /// Differs from the pin.
    Mismatch,
}

/// Key of a target in the store.
pub fn target_key(host: &str, port: u16) -> String {
    format!("{}:{port}", host.trim_end_matches('.').to_ascii_lowercase())
}

impl PinStore {
    /// Opens (or creates lazily) the store.
    pub fn open(cfg: &PinStoreConfig, fixed: HashMap<String, String>) -> Result<PinStore, String> {
        let (seen, path) = match cfg {
            PinStoreConfig::Off => (None, None),
            PinStoreConfig::Memory => (Some(Mutex::new(BTreeMap::new())), None),
            PinStoreConfig::File(p) => {
                let map = match std::fs::read(p) {
                    Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("pin store {}: {e}", p.display()))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                    Err(e) => return Err(format!("pin store {}: {e}", p.display())),
                };
                (Some(Mutex::new(map)), Some(p.clone()))
            }
        };
        Ok(PinStore { fixed, seen, path })
    }

    /// Compares `fingerprint` with the fixed pin, else the one last seen; remembers a first sight.
    pub fn check(&self, key: &str, fingerprint: &str) -> Option<Finding> {
        self.check_status(key, fingerprint).1
    }

    /// As [`PinStore::check`], and what the comparison proves.
    pub fn check_status(&self, key: &str, fingerprint: &str) -> (PinStatus, Option<Finding>) {
        let judged = |f: Option<Finding>| match f {
            Some(f) => (PinStatus::Mismatch, Some(f)),
            None => (PinStatus::Matched, None),
        };
        if let Some(p) = self.fixed.get(key) {
            return judged(cert::pin_finding(fingerprint, p, "pinned"));
        }
        let Some(seen) = self.seen.as_ref() else {
            return (PinStatus::None, None);
        };
        let mut map = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(key) {
            Some(p) => judged(cert::pin_finding(fingerprint, p, "last seen")),
            None => {
                map.insert(key.to_owned(), fingerprint.to_owned());
                if let Some(path) = &self.path {
                    if let Err(e) = write_atomic(path, &map) {
                        tracing::warn!(path = %path.display(), error = %e, "pin store not written");
                    }
                }
                (PinStatus::FirstUse, None)
            }
        }
    }
}

fn write_atomic(path: &std::path::Path, map: &BTreeMap<String, String>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(map).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cause::Cause;

    #[test]
    fn tofu_then_mismatch_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = PinStoreConfig::File(dir.path().join("pins.json"));
        let s = PinStore::open(&cfg, HashMap::new()).expect("open");
        assert!(s.check("rdp1:3389", "aa").is_none());
        assert!(s.check("rdp1:3389", "aa").is_none());
        let s = PinStore::open(&cfg, HashMap::new()).expect("reopen");
        let f = s.check("rdp1:3389", "bb").expect("mismatch");
        assert_eq!(f.cause, Cause::CertPinMismatch);
        // Not overwritten by the mismatch.
        assert!(s.check("rdp1:3389", "aa").is_none());
    }

    #[test]
    fn fixed_pins_win_and_off_remembers_nothing() {
        let fixed = HashMap::from([("rdp1:3389".to_owned(), "cc".to_owned())]);
        let s = PinStore::open(&PinStoreConfig::Memory, fixed).expect("open");
        assert!(s.check("rdp1:3389", "aa").is_some());
        let off = PinStore::open(&PinStoreConfig::Off, HashMap::new()).expect("open");
        assert!(off.check("x:1", "aa").is_none());
        assert!(off.check("x:1", "bb").is_none());
    }
}
