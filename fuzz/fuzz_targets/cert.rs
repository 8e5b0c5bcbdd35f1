//! Certificate analysis of whatever DER a target sends, at a fixed `now`.
//! The input is split into a chain at each `0xFF 0xFF 0xFF 0xFF` marker.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rdp_preflight::probe::cert::{analyse, pin_finding, Inputs};
use rustls_pki_types::CertificateDer;

/// 2023-11-14T22:13:20Z: fixed, so that a crash reproduces.
const NOW: i64 = 1_700_000_000;

fn split_chain(data: &[u8]) -> Vec<CertificateDer<'_>> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(4).position(|w| w == [0xff; 4]) {
        out.push(CertificateDer::from(&rest[..i]));
        rest = &rest[i + 4..];
    }
    out.push(CertificateDer::from(rest));
    out
}

fuzz_target!(|data: &[u8]| {
    let chain = split_chain(data);
    for expected_name in ["rdp1.example.test", "192.0.2.10"] {
        let input = Inputs {
            expected_name,
            now: NOW,
            expiring_window: Duration::from_secs(14 * 86_400),
            anchors: &[],
        };
        let (facts, findings) = analyse(&chain, &input);
        for f in &findings {
            assert!((500..600).contains(&f.cause.number()), "{:?}", f.cause);
        }
        if !facts.sha256_fingerprint.is_empty() {
            assert_eq!(facts.sha256_fingerprint.len(), 64);
            let _ = pin_finding(&facts.sha256_fingerprint, &"00".repeat(32), "fuzz");
        }
    }
});
