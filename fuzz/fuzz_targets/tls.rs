//! TLS first-record classifier and handshake-failure classification: the server's first bytes
//! after the ClientHello. The first input byte picks the I/O error the handshake ended with.
#![no_main]

use std::io;

use libfuzzer_sys::fuzz_target;
use rdp_preflight::probe::tls::{classify_failure, classify_stall, first_record};
use rustls::{AlertDescription, InvalidMessage, PeerIncompatible};

fn error(selector: u8, first: &[u8]) -> io::Error {
    let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
    match selector % 8 {
        0 => io::Error::from(io::ErrorKind::UnexpectedEof),
        1 => io::Error::from(io::ErrorKind::ConnectionReset),
        2 => tls(rustls::Error::AlertReceived(AlertDescription::from(
            first.get(6).copied().unwrap_or(selector),
        ))),
        3 => tls(rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType)),
        4 => tls(rustls::Error::PeerIncompatible(
            PeerIncompatible::NoCipherSuitesInCommon,
        )),
        5 => tls(rustls::Error::General("fuzz".into())),
        6 => io::Error::from(io::ErrorKind::TimedOut),
        _ => io::Error::new(io::ErrorKind::Other, "fuzz"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, first)) = data.split_first() else {
        return;
    };
    let _ = first_record(first);
    let total = first.len() as u64;
    let f = classify_failure(&error(selector, first), first, total);
    assert!((400..500).contains(&f.cause.number()), "{:?}", f.cause);
    let s = classify_stall(first, total, u64::from(selector), 5000);
    assert!((400..500).contains(&s.cause.number()), "{:?}", s.cause);
});
