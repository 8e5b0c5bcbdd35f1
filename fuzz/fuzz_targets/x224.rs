//! X.224 Connection Confirm / Disconnect Request decoder: any bytes a target sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdp_preflight::probe::x224::{decode_server_pdu, Decoded};

fuzz_target!(|data: &[u8]| {
    match decode_server_pdu(data) {
        Ok(Decoded::Complete(pdu, used)) => {
            assert!(used > 0 && used <= data.len(), "used {used} of {}", data.len());
            // The PDU alone decodes to the same thing: trailing bytes never change it.
            assert_eq!(decode_server_pdu(&data[..used]), Ok(Decoded::Complete(pdu, used)));
        }
        Ok(Decoded::Incomplete(need)) => assert!(need > data.len(), "needs {need}, has {}", data.len()),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // Every prefix is handled too (the prober feeds bytes as they arrive).
    for cut in [1, 4, 7, 11] {
        if cut < data.len() {
            let _ = decode_server_pdu(&data[..cut]);
        }
    }
});
