//! The audit reader and verifier: arbitrary (damaged, hostile) audit files. The input is split
//! into up to three files at `0xFF` bytes (which never occur in JSON text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdp_preflight::audit::{
    chain::{verify_bytes, VerifyOptions},
    AuditRecord,
};

const NAMES: [&str; 3] = [
    "audit-00000000000000000001.jsonl",
    "audit-00000000000000000002.jsonl",
    "audit-00000000000000000003.jsonl",
];

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.splitn(3, |b| *b == 0xff).collect();
    let files: Vec<(&str, &[u8])> = NAMES.iter().copied().zip(parts.iter().copied()).collect();
    let lines = data.iter().filter(|b| **b == b'\n').count() as u64;
    for allow_pruned in [false, true] {
        let out = verify_bytes(
            &files,
            VerifyOptions {
                allow_pruned,
                anchors: vec![(1, "0".repeat(64))],
            },
        );
        assert!(out.records <= lines);
        assert_eq!(out.files, files.len() as u64);
        for b in &out.breaks {
            let _ = b.to_string();
        }
    }
    for part in &parts {
        for line in part.split(|b| *b == b'\n') {
            if let Ok(r) = serde_json::from_slice::<AuditRecord>(line) {
                let _ = (r.unix_time(), r.account_label(), serde_json::to_string(&r));
            }
        }
    }
});
