//! Config file parsing and validation: `toml::from_str::<FileConfig>` then `validate()`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdp_preflight::config::FileConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = toml::from_str::<FileConfig>(text) else {
        return;
    };
    // validate() reads the files the config names (trust anchors, CA files, key files): keep
    // the fuzzer away from devices and pseudo-files that never end or block.
    let resolved = toml::to_string(&file).unwrap_or_default();
    if ["dev", "proc", "sys", "fd"].iter().any(|s| resolved.contains(s)) {
        return;
    }
    if let Err(e) = file.validate() {
        // Errors name the key: never empty.
        assert!(!e.to_string().is_empty());
    }
});
