//! Certificate pins: fixed pins from config, and trust-on-first-use pins remembered per target
//! in memory or in a JSON file written atomically.
//!
//! Remembered pins are keyed on the address and port the TCP connection reached
//! (`127.0.0.1:3389`, `[2001:db8::1]:3389`), never on the request's spelling of the host:
//! `127.1`, `0x7f000001` and a name that resolves to the same server share one pin, so a
//! mismatch cannot be turned into a first sight by re-spelling the target. The expected name is
//! evidence beside the finding. Fixed pins match the connected address, or the name the request
//! dialled.
//!
//! A mismatch is never written over: an operator confirms the re-issue and removes the entry.
//! A pin file that cannot be read or parsed stops the start (the error names the file): it is
//! never silently replaced by an empty store.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
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
    /// With `[store]` and `cert.pin_store = "auto"`: the pins of the whole cluster.
    shared: Option<std::sync::Arc<crate::store::Store>>,
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

/// Key of a target in the store: the connected address and port (IPv4-mapped IPv6 addresses
/// as the IPv4 address they carry).
pub fn target_key(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// Key of a fixed pin written with a name: `host:port`, lower case, no trailing dot.
pub fn name_key(host: &str, port: u16) -> String {
    format!("{}:{port}", host.trim_end_matches('.').to_ascii_lowercase())
}

impl PinStore {
    /// Opens (or creates lazily) the store.
    pub fn open(cfg: &PinStoreConfig, fixed: HashMap<String, String>) -> Result<PinStore, String> {
        let (seen, path) = match cfg {
            PinStoreConfig::Off => (None, None),
            PinStoreConfig::Memory => (Some(Mutex::new(BTreeMap::new())), None),
            PinStoreConfig::File(p) => {
                let map: BTreeMap<String, String> = match std::fs::read(p) {
                    Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                        format!(
                            "pin store {}: corrupt ({e}); fix or move the file aside (a new one starts empty)",
                            p.display()
                        )
                    })?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                    Err(e) => return Err(format!("pin store {}: {e}", p.display())),
                };
                let by_name = map.keys().filter(|k| k.parse::<SocketAddr>().is_err()).count();
                if by_name > 0 {
                    tracing::warn!(
                        path = %p.display(),
                        entries = by_name,
                        "pin store entries keyed by host name are no longer matched: pins are keyed on the connected address"
                    );
                }
                (Some(Mutex::new(map)), Some(p.clone()))
            }
        };
        Ok(PinStore {
            fixed,
            seen,
            path,
            shared: None,
        })
    }

    /// Pins in the shared store instead of memory or a file: the first replica to see a
    /// target records its pin for all.
    pub fn shared(fixed: HashMap<String, String>, store: std::sync::Arc<crate::store::Store>) -> PinStore {
        PinStore {
            fixed,
            seen: None,
            path: None,
            shared: Some(store),
        }
    }

    /// As [`PinStore::check_status`], through the shared store when there is one. A store that
    /// cannot answer is a finding (the certificate could not be compared), never a first sight.
    pub async fn check_shared(
        &self,
        key: &str,
        names: &[String],
        fingerprint: &str,
        expected_name: &str,
    ) -> (PinStatus, Option<Finding>) {
        let Some(store) = &self.shared else {
            return self.check_status(key, names, fingerprint);
        };
        if let Some(p) = std::iter::once(key)
            .chain(names.iter().map(String::as_str))
            .find_map(|k| self.fixed.get(k))
        {
            return match cert::pin_finding(fingerprint, p, "pinned") {
                Some(f) => (PinStatus::Mismatch, Some(f)),
                None => (PinStatus::Matched, None),
            };
        }
        use crate::store::pins::PinAnswer;
        match crate::store::pins::check(store, key, fingerprint, expected_name).await {
            Ok(PinAnswer::First) => (PinStatus::FirstUse, None),
            Ok(PinAnswer::Same) => (PinStatus::Matched, None),
            Ok(PinAnswer::Different(pinned)) => (
                PinStatus::Mismatch,
                cert::pin_finding(fingerprint, &pinned, "first seen by the cluster"),
            ),
            Err(e) => (
                PinStatus::None,
                Some(
                    Finding::new(
                        crate::cause::Cause::CertUntrusted,
                        "the pin store cannot be read: the certificate was not compared with the pin recorded for \
                         this target (not taken as a first sight either)",
                    )
                    .with("pin_store", "unreadable")
                    .with("error", e),
                ),
            ),
        }
    }

    /// Compares `fingerprint` with the fixed pin, else the one last seen; remembers a first sight.
    /// `key` is [`target_key`]; `names` are further keys ([`name_key`]) a fixed pin may use.
    pub fn check(&self, key: &str, names: &[String], fingerprint: &str) -> Option<Finding> {
        self.check_status(key, names, fingerprint).1
    }

    /// As [`PinStore::check`], and what the comparison proves.
    pub fn check_status(&self, key: &str, names: &[String], fingerprint: &str) -> (PinStatus, Option<Finding>) {
        let judged = |f: Option<Finding>| match f {
            Some(f) => (PinStatus::Mismatch, Some(f)),
            None => (PinStatus::Matched, None),
        };
        let fixed = std::iter::once(key)
            .chain(names.iter().map(String::as_str))
            .find_map(|k| self.fixed.get(k));
        if let Some(p) = fixed {
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
        assert!(s.check("10.0.0.5:3389", &[], "aa").is_none());
        assert!(s.check("10.0.0.5:3389", &[], "aa").is_none());
        let s = PinStore::open(&cfg, HashMap::new()).expect("reopen");
        let f = s.check("10.0.0.5:3389", &[], "bb").expect("mismatch");
        assert_eq!(f.cause, Cause::CertPinMismatch);
        // Not overwritten by the mismatch.
        assert!(s.check("10.0.0.5:3389", &[], "aa").is_none());
    }

    #[test]
    fn fixed_pins_win_and_off_remembers_nothing() {
        let fixed = HashMap::from([("rdp1:3389".to_owned(), "cc".to_owned())]);
        let s = PinStore::open(&PinStoreConfig::Memory, fixed).expect("open");
        assert!(s.check("10.0.0.5:3389", &[name_key("RDP1.", 3389)], "aa").is_some());
        let off = PinStore::open(&PinStoreConfig::Off, HashMap::new()).expect("open");
        assert!(off.check("10.0.0.5:1", &[], "aa").is_none());
        assert!(off.check("10.0.0.5:1", &[], "bb").is_none());
    }

    /// Every spelling of one server is one key: the connected address.
    #[test]
    fn spellings_of_one_server_share_a_pin() {
        let v4: SocketAddr = "127.0.0.1:3389".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:3389".parse().expect("addr");
        assert_eq!(target_key(v4), "127.0.0.1:3389");
        assert_eq!(target_key(mapped), "127.0.0.1:3389");
        let s = PinStore::open(&PinStoreConfig::Memory, HashMap::new()).expect("open");
        // First sight through the name, then `127.1` and `0x7f000001` reach the same address.
        assert!(s.check(&target_key(v4), &[name_key("rdp1", 3389)], "aa").is_none());
        for spelling in ["127.1", "0x7f000001"] {
            let (status, f) = s.check_status(&target_key(v4), &[name_key(spelling, 3389)], "bb");
            assert_eq!(status, PinStatus::Mismatch, "{spelling}");
            assert_eq!(f.expect("finding").cause, Cause::CertPinMismatch);
        }
    }

    #[test]
    fn a_corrupt_pin_file_stops_the_start_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("pins.json");
        std::fs::write(&path, b"{\"127.0.0.1:3389\": \"aa\",").expect("write");
        let e = PinStore::open(&PinStoreConfig::File(path.clone()), HashMap::new()).expect_err("corrupt");
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("corrupt"), "{e}");
        // Not reset behind the operator's back.
        assert_eq!(
            std::fs::read(&path).expect("still there"),
            b"{\"127.0.0.1:3389\": \"aa\","
        );
    }
}
