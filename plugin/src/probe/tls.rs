//! TLS handshake on the socket the X.224 exchange used, with rustls.
//!
//! The verifier accepts any chain (it keeps it for [`super::cert`] to judge) but still verifies
//! the handshake signature with the provider's algorithms, so the key the server proves is the
//! key in the certificate that gets analysed. The raw bytes the server sends are recorded so that
//! a failed handshake can be classified: closed with no alert, X.224 Disconnect Request, alert,
//! a legacy-version ServerHello, not TLS at all, or a flight that stalls (MTU black hole).

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    AlertDescription, DigitallySignedStruct, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::x224;
use crate::{cause::Cause, report::Finding};

/// How many leading server bytes are kept for classification.
const KEEP: usize = 64;

/// What a [`Recorder`] has seen, shared so it can be read after a failed or stalled handshake.
#[derive(Debug, Default)]
pub struct Seen {
    first: Mutex<Vec<u8>>,
    total: AtomicU64,
}

impl Seen {
    /// Bytes read so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The first bytes read (at most 64).
    pub fn first(&self) -> Vec<u8> {
        self.first.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// A stream that remembers the first bytes it read and counts the rest.
#[derive(Debug)]
pub struct Recorder<S> {
    inner: S,
    seen: Arc<Seen>,
}

impl<S> Recorder<S> {
    /// Wraps a stream.
    pub fn new(inner: S) -> Self {
        Recorder {
            inner,
            seen: Arc::default(),
        }
    }

    /// What has been read, shared.
    pub fn seen(&self) -> Arc<Seen> {
        self.seen.clone()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            let seen = &self.seen;
            if seen.total.load(Ordering::Relaxed) < KEEP as u64 {
                if let Ok(mut first) = seen.first.lock() {
                    let take = KEEP.saturating_sub(first.len()).min(new.len());
                    first.extend_from_slice(&new[..take]);
                }
            }
            seen.total.fetch_add(new.len() as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Keeps the server's chain; verifies only the handshake signature.
#[derive(Debug)]
pub struct CaptureVerifier {
    provider: Arc<CryptoProvider>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
    refusal: Mutex<Option<String>>,
}

impl CaptureVerifier {
    /// A verifier using `provider`'s signature algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        CaptureVerifier {
            provider,
            chain: Mutex::new(Vec::new()),
            refusal: Mutex::new(None),
        }
    }

    /// Why this verifier refused the server's handshake signature, if it did: a failure raised
    /// by our side (a key or scheme our library cannot check, or a signature that does not
    /// verify), not by the target's TLS stack.
    pub fn refusal(&self) -> Option<String> {
        self.refusal.lock().ok().and_then(|r| r.clone())
    }

    fn keep(
        &self,
        r: Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if let Err(e) = &r {
            if let Ok(mut slot) = self.refusal.lock() {
                *slot = Some(e.to_string());
            }
        }
        r
    }

    /// The chain the server sent (end entity first); empty before the Certificate message.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl ServerCertVerifier for CaptureVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut c) = self.chain.lock() {
            c.clear();
            c.push(end_entity.clone().into_owned());
            c.extend(intermediates.iter().map(|i| i.clone().into_owned()));
        }
        // Judged by the cert stage, which records the path verifier's verdict.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.keep(rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.keep(rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        ))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config for one connection, with its own capturing verifier.
pub fn client_config(
    provider: &Arc<CryptoProvider>,
) -> Result<(Arc<rustls::ClientConfig>, Arc<CaptureVerifier>), rustls::Error> {
    let verifier = Arc::new(CaptureVerifier::new(provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((Arc::new(config), verifier))
}

/// Name of a TLS protocol version as reports show it.
pub fn version_name(v: u16) -> String {
    match v {
        0x0300 => "SSLv3".into(),
        0x0301 => "TLSv1.0".into(),
        0x0302 => "TLSv1.1".into(),
        0x0303 => "TLSv1.2".into(),
        0x0304 => "TLSv1.3".into(),
        other => format!("0x{other:04x}"),
    }
}

/// A minimal legacy ClientHello (TLS 1.0 record, client_version TLS 1.1, RSA and ECDHE-RSA CBC
/// suites, no extensions), sent only to learn which legacy version a server that refused
/// TLS 1.2/1.3 with a protocol_version alert speaks. Nothing is negotiated with it.
///
/// ```text
/// record:    16 | 03 01 | len u16
/// handshake: 01 | len u24 | client_version 03 02 | random[32] | session_id len 00
///            | cipher_suites len u16 | suites… | compression len 01 | null 00
/// ```
pub fn legacy_client_hello(random: &[u8; 32]) -> Vec<u8> {
    const SUITES: [u16; 6] = [
        0xc013, // TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA
        0xc014, // TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA
        0x002f, // TLS_RSA_WITH_AES_128_CBC_SHA
        0x0035, // TLS_RSA_WITH_AES_256_CBC_SHA
        0x000a, // TLS_RSA_WITH_3DES_EDE_CBC_SHA
        0x00ff, // TLS_EMPTY_RENEGOTIATION_INFO_SCSV
    ];
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&[0x03, 0x02]); // client_version TLS 1.1
    body.extend_from_slice(random);
    body.push(0); // session_id: empty
    body.extend_from_slice(&((SUITES.len() * 2) as u16).to_be_bytes());
    for suite in SUITES {
        body.extend_from_slice(&suite.to_be_bytes());
    }
    body.extend_from_slice(&[0x01, 0x00]); // compression_methods: null only
    let mut hs = vec![0x01]; // ClientHello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// What the server's first bytes were, as far as classification cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstRecord {
    /// Nothing arrived.
    Nothing,
    /// A TPKT (X.224) PDU, e.g. a Disconnect Request.
    Tpkt(Option<x224::ServerPdu>),
    /// A TLS alert record: level, description.
    Alert(u8, u8),
    /// A ServerHello offering this `legacy_version` (the record's for SSLv3/TLS1.0/1.1).
    ServerHello(u16),
    /// Some other TLS record (content type 20..=23).
    OtherTls(u8),
    /// Not TLS.
    NotTls,
}

/// Classifies the server's first bytes (pure; used on handshake failure).
pub fn first_record(b: &[u8]) -> FirstRecord {
    match b {
        [] => FirstRecord::Nothing,
        [0x03, 0x00, ..] => FirstRecord::Tpkt(match x224::decode_server_pdu(b) {
            Ok(x224::Decoded::Complete(pdu, _)) => Some(pdu),
            _ => None,
        }),
        // Alert: type 21, version, length 2, level, description.
        [0x15, 0x03, _, _, _, level, desc, ..] => FirstRecord::Alert(*level, *desc),
        // Handshake record whose first message is a ServerHello (type 2):
        // type(1) version(2) length(2) | msg_type(1) length(3) | server_version(2)
        [0x16, 0x03, _, _, _, 0x02, _, _, _, hi, lo, ..] => FirstRecord::ServerHello(u16::from_be_bytes([*hi, *lo])),
        [t @ 0x14..=0x17, 0x03, ..] | [t @ 0x14..=0x17] => FirstRecord::OtherTls(*t),
        _ => FirstRecord::NotTls,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .take(16)
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Who a failed handshake is down to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The target: a 4xx finding.
    Target(Finding),
    /// Our own side (the TLS library refused to go on for a reason of its own: randomness,
    /// time, encoding, an inconsistent state): an internal error, never a target cause.
    Ours(String),
}

impl Blame {
    /// The target finding (tests).
    pub fn finding(self) -> Option<Finding> {
        match self {
            Blame::Target(f) => Some(f),
            Blame::Ours(_) => None,
        }
    }
}

/// Classifies a failed handshake: a 4xx finding when the target caused it, else our own error.
/// A refusal by the capturing verifier is handled before this (it is a certificate finding).
pub fn classify_failure(err: &io::Error, first: &[u8], total: u64) -> Blame {
    let tls_err = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    // Errors only our side raises: no target bytes explain them.
    if let Some(
        e @ (rustls::Error::General(_)
        | rustls::Error::FailedToGetCurrentTime
        | rustls::Error::FailedToGetRandomBytes
        | rustls::Error::EncryptError
        | rustls::Error::BadMaxFragmentSize
        | rustls::Error::InconsistentKeys(_)
        | rustls::Error::UnsupportedNameType
        | rustls::Error::InvalidCertificate(_)
        | rustls::Error::InvalidCertRevocationList(_)
        | rustls::Error::InvalidEncryptedClientHello(_)
        | rustls::Error::Other(_)),
    ) = tls_err
    {
        return Blame::Ours(format!("the TLS library failed on our side: {e}"));
    }
    Blame::Target(classify_target(err, first, total))
}

fn classify_target(err: &io::Error, first: &[u8], total: u64) -> Finding {
    let rec = first_record(first);
    let tls_err = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    let evidence = |f: Finding| f.with("bytes_received", total).with("first_bytes", hex(first));
    if let FirstRecord::Tpkt(pdu) = &rec {
        let what = match pdu {
            Some(x224::ServerPdu::Disconnect { .. }) => "an X.224 Disconnect Request",
            _ => "an X.224 PDU",
        };
        return evidence(Finding::new(
            Cause::TlsClosedDuringHandshake,
            format!("the server answered the TLS ClientHello with {what}: it cannot use its certificate's private key"),
        ));
    }
    if let FirstRecord::ServerHello(v) = rec {
        if v < 0x0303 {
            return evidence(
                Finding::new(
                    Cause::TlsVersionMismatch,
                    format!("the server only speaks {}", version_name(v)),
                )
                .with("server_version", version_name(v)),
            );
        }
    }
    let alert = match (tls_err, &rec) {
        (Some(rustls::Error::AlertReceived(d)), _) => Some(u8::from(*d)),
        (_, FirstRecord::Alert(_, d)) => Some(*d),
        _ => None,
    };
    if let Some(code) = alert {
        let desc = AlertDescription::from(code);
        let name = format!("{desc:?}");
        let (cause, msg) = match desc {
            AlertDescription::ProtocolVersion => (
                Cause::TlsVersionMismatch,
                "the server refused every TLS version offered (protocol_version alert)".to_owned(),
            ),
            AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity => (
                Cause::TlsNoSharedCipher,
                format!("the server shares no cipher suite or group with the plugin ({name} alert)"),
            ),
            _ => (
                Cause::TlsAlert,
                format!("the server aborted the TLS handshake with a fatal {name} alert"),
            ),
        };
        return evidence(Finding::new(cause, msg).with("alert", code).with("alert_name", name));
    }
    if rec == FirstRecord::NotTls {
        return evidence(Finding::new(
            Cause::TlsProtocolError,
            "the server answered the ClientHello with bytes that are not TLS",
        ));
    }
    let closed = matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    );
    if closed {
        let msg = if total == 0 {
            "the server closed the connection after the ClientHello with no TLS alert: it cannot use its certificate's private key"
        } else {
            "the server closed the connection in the middle of the TLS handshake with no alert"
        };
        return evidence(Finding::new(Cause::TlsClosedDuringHandshake, msg).with("io_error", err.kind()));
    }
    match tls_err {
        Some(
            e @ (rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. }),
        ) => evidence(
            Finding::new(Cause::TlsProtocolError, "the server's TLS messages are malformed").with("tls_error", e),
        ),
        Some(rustls::Error::PeerIncompatible(p)) => evidence(
            Finding::new(
                Cause::TlsVersionMismatch,
                "the server's TLS parameters are incompatible with TLS 1.2/1.3",
            )
            .with("tls_error", format!("{p:?}")),
        ),
        // Everything else the library reports is about what the peer sent.
        Some(e) => evidence(
            Finding::new(Cause::TlsProtocolError, "the server's TLS messages broke the protocol").with("tls_error", e),
        ),
        None => evidence(
            Finding::new(
                Cause::TlsClosedDuringHandshake,
                "the TLS handshake failed on the socket",
            )
            .with("io_error", err),
        ),
    }
}

/// The handshake ran out of its stage time: a stall. `x224_rtt_ms` is the round trip the
/// small X.224 exchange took, for the MTU black-hole hint.
pub fn classify_stall(first: &[u8], total: u64, x224_rtt_ms: u64, waited_ms: u64) -> Finding {
    let base = Finding::new(Cause::TlsHandshakeTimeout, "")
        .with("bytes_received", total)
        .with("first_bytes", hex(first))
        .with("waited_ms", waited_ms)
        .with("x224_round_trip_ms", x224_rtt_ms);
    if total > 0 {
        Finding { message: format!("the server's TLS flight stopped after {total} bytes while the small X.224 exchange took {x224_rtt_ms} ms: path-MTU black hole suspected (VPN/MTU mismatch)"), ..base }
            .with("mtu_black_hole_suspected", true)
    } else {
        Finding {
            message: "the server's TLS flight never arrived".to_owned(),
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(err: &io::Error, first: &[u8], total: u64) -> Finding {
        classify_failure(err, first, total).finding().expect("a target cause")
    }

    fn err_eof() -> io::Error {
        io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")
    }

    #[test]
    fn first_record_shapes() {
        assert_eq!(first_record(&[]), FirstRecord::Nothing);
        // X.224 DR in place of a ServerHello.
        let dr = [0x03, 0x00, 0x00, 0x0b, 0x06, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00];
        assert_eq!(
            first_record(&dr),
            FirstRecord::Tpkt(Some(x224::ServerPdu::Disconnect { reason: Some(0) }))
        );
        // Fatal handshake_failure alert.
        assert_eq!(
            first_record(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
            FirstRecord::Alert(2, 40)
        );
        // TLS 1.0 ServerHello: record v1.0, handshake type 2, length, server_version 03 01.
        let sh10 = [0x16, 0x03, 0x01, 0x00, 0x2a, 0x02, 0x00, 0x00, 0x26, 0x03, 0x01, 0xaa];
        assert_eq!(first_record(&sh10), FirstRecord::ServerHello(0x0301));
        assert_eq!(first_record(b"SSH-2.0-OpenSSH"), FirstRecord::NotTls);
    }

    #[test]
    fn classification() {
        let dr = [0x03, 0x00, 0x00, 0x0b, 0x06, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00];
        assert_eq!(target(&err_eof(), &dr, 11).cause, Cause::TlsClosedDuringHandshake);
        assert_eq!(target(&err_eof(), &[], 0).cause, Cause::TlsClosedDuringHandshake);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(target(&reset, &[], 0).cause, Cause::TlsClosedDuringHandshake);
        let sh10 = [0x16, 0x03, 0x01, 0x00, 0x2a, 0x02, 0x00, 0x00, 0x26, 0x03, 0x01];
        let f = target(&io::Error::new(io::ErrorKind::InvalidData, "x"), &sh10, 47);
        assert_eq!(f.cause, Cause::TlsVersionMismatch);
        assert!(f.evidence.contains(&("server_version".into(), "TLSv1.0".into())));
        let alert = |d: u8| {
            let rec = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, d];
            let e = io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(AlertDescription::from(d)),
            );
            target(&e, &rec, 7)
        };
        assert_eq!(alert(40).cause, Cause::TlsNoSharedCipher);
        assert_eq!(alert(71).cause, Cause::TlsNoSharedCipher);
        assert_eq!(alert(70).cause, Cause::TlsVersionMismatch);
        let f = alert(80);
        assert_eq!(f.cause, Cause::TlsAlert);
        assert!(f.evidence.contains(&("alert".into(), "80".into())), "{:?}", f.evidence);
        assert!(f.evidence.contains(&("alert_name".into(), "InternalError".into())));
        let f = target(&io::Error::new(io::ErrorKind::InvalidData, "x"), b"HTTP/1.1 400", 12);
        assert_eq!(f.cause, Cause::TlsProtocolError);
        // Failures raised by our own library are never a target cause.
        let ours = io::Error::other(rustls::Error::FailedToGetRandomBytes);
        assert!(matches!(classify_failure(&ours, &[], 0), Blame::Ours(_)));
        let ours = io::Error::other(rustls::Error::EncryptError);
        assert!(matches!(classify_failure(&ours, &[], 0), Blame::Ours(_)));
    }

    #[test]
    fn legacy_hello_layout() {
        let h = legacy_client_hello(&[0xaa; 32]);
        assert_eq!(&h[..3], &[0x16, 0x03, 0x01], "handshake record, TLS 1.0");
        assert_eq!(
            usize::from(u16::from_be_bytes([h[3], h[4]])),
            h.len() - 5,
            "record length"
        );
        assert_eq!(h[5], 0x01, "ClientHello");
        assert_eq!(
            u32::from_be_bytes([0, h[6], h[7], h[8]]) as usize,
            h.len() - 9,
            "handshake length"
        );
        assert_eq!(&h[9..11], &[0x03, 0x02], "client_version TLS 1.1");
        assert_eq!(&h[11..43], &[0xaa; 32]);
        assert_eq!(h[43], 0, "no session id");
        assert_eq!(&h[44..46], &[0x00, 0x0c], "six suites");
        assert_eq!(&h[46..48], &[0xc0, 0x13]);
        assert_eq!(&h[h.len() - 2..], &[0x01, 0x00], "null compression, no extensions");
    }

    #[test]
    fn stall_hint() {
        let f = classify_stall(&[0x16, 0x03, 0x03], 120, 1, 5000);
        assert_eq!(f.cause, Cause::TlsHandshakeTimeout);
        assert!(f.evidence.contains(&("mtu_black_hole_suspected".into(), "true".into())));
        let f = classify_stall(&[], 0, 1, 5000);
        assert!(!f.evidence.iter().any(|(k, _)| k == "mtu_black_hole_suspected"));
    }
}
