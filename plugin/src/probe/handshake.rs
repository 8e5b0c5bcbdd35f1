//! The TLS stage's driver: the rustls handshake on the socket the X.224 exchange used, then
//! the classification of a failure by who caused it (see [`super::tls`]), and a second look
//! with a legacy ClientHello on a new connection when the server refused or hung up on a modern
//! one without saying which version it speaks.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::{negotiate, tls, x224, TlsStream};
use crate::{
    cause::Cause,
    deadline::{Budget, Expired},
    report::Finding,
};

/// What the handshake needs besides the socket.
pub struct Params<'a> {
    /// The provider (algorithms, randomness).
    pub provider: &'a Arc<CryptoProvider>,
    /// SNI / the name rustls is given (the verifier judges nothing by it).
    pub server_name: ServerName<'static>,
    /// The address the socket reached (for the legacy second look).
    pub connected: SocketAddr,
    /// The Connection Request sent first on the second look.
    pub connection_request: &'a [u8],
    /// Stage limit.
    pub timeout: Duration,
    /// The X.224 round trip, for the MTU black-hole hint.
    pub x224_round_trip: Option<Duration>,
}

/// How the handshake ended.
#[derive(Default)]
pub struct Handshake {
    /// The stream, on success.
    pub stream: Option<TlsStream>,
    /// The chain the server sent (even on failure, once the Certificate message arrived).
    pub chain: Vec<CertificateDer<'static>>,
    /// Negotiated (or, for a legacy server, offered) version.
    pub version: String,
    /// Negotiated cipher suite.
    pub cipher: String,
    /// A target finding.
    pub finding: Option<Finding>,
    /// Our verifier refused the server's handshake signature: a certificate matter, judged by
    /// the cert stage.
    pub verifier_refusal: Option<String>,
    /// Our own side failed: an internal error.
    pub internal: Option<String>,
    /// The check's budget ran out.
    pub deadline_hit: bool,
    /// One line for the stage record.
    pub detail: String,
}

/// Runs the handshake under the stage limit.
pub async fn run(stream: TcpStream, p: Params<'_>, budget: &Budget) -> Handshake {
    let mut h = Handshake::default();
    let (config, verifier) = match tls::client_config(p.provider) {
        Ok(c) => c,
        Err(e) => {
            h.internal = Some(format!("the TLS client could not be configured: {e}"));
            h.detail = "TLS client configuration failed".into();
            return h;
        }
    };
    let recorder = tls::Recorder::new(stream);
    let seen = recorder.seen();
    let connector = tokio_rustls::TlsConnector::from(config);
    let t0 = Instant::now();
    match budget
        .run(p.timeout, connector.connect(p.server_name.clone(), recorder))
        .await
    {
        Ok(Ok(stream)) => {
            let (_, conn) = stream.get_ref();
            h.version = conn
                .protocol_version()
                .map(|v| tls::version_name(u16::from(v)))
                .unwrap_or_default();
            h.cipher = conn
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default();
            h.chain = verifier.chain();
            h.detail = format!("{} {}", h.version, h.cipher);
            h.stream = Some(stream);
        }
        Ok(Err(e)) => {
            h.chain = verifier.chain();
            h.detail = e.to_string();
            if let Some(r) = verifier.refusal() {
                // Raised by our verifier, not by the target: the cert stage says what it is.
                h.detail = format!("the plugin could not check the server's handshake signature: {r}");
                h.verifier_refusal = Some(r);
                return h;
            }
            match tls::classify_failure(&e, &seen.first(), seen.total()) {
                tls::Blame::Ours(msg) => h.internal = Some(msg),
                tls::Blame::Target(f) => {
                    let f = second_look(f, seen.total(), &p, budget).await;
                    if let Some(v) = f.evidence.iter().find(|(k, _)| k == "server_version") {
                        h.version = v.1.clone();
                    }
                    h.finding = Some(f);
                }
            }
        }
        Err(which) => {
            h.chain = verifier.chain();
            h.detail = "timed out".into();
            let waited = t0.elapsed().as_millis() as u64;
            let x224_ms = p.x224_round_trip.map_or(0, |d| d.as_millis() as u64);
            h.finding = Some(match which {
                Expired::Check => {
                    h.deadline_hit = true;
                    crate::deadline::deadline_finding(crate::cause::Stage::Tls, budget)
                }
                Expired::Stage => tls::classify_stall(&seen.first(), seen.total(), x224_ms, waited),
            });
        }
    }
    h
}

/// A protocol_version alert does not say which version the server speaks, and a server limited
/// to TLS 1.0/1.1 (Schannel) may close or reset on a modern hello without any alert: ask it with
/// a legacy hello on a second connection. A legacy ServerHello makes it TLS_VERSION_MISMATCH
/// naming the version; otherwise the first finding stands.
async fn second_look(mut f: Finding, received: u64, p: &Params<'_>, budget: &Budget) -> Finding {
    let unnamed_version =
        f.cause == Cause::TlsVersionMismatch && !f.evidence.iter().any(|(k, _)| k == "server_version");
    let silent_close = f.cause == Cause::TlsClosedDuringHandshake && received == 0;
    if !unnamed_version && !silent_close {
        return f;
    }
    let answer = budget
        .run(p.timeout, legacy_version(p.connected, p.connection_request))
        .await
        .ok()
        .flatten();
    match answer {
        Some(v) if silent_close => {
            let name = tls::version_name(v);
            let how = f
                .evidence
                .iter()
                .find(|(k, _)| k == "io_error")
                .map_or_else(|| "closed".to_owned(), |(_, v)| v.clone());
            Finding::new(
                Cause::TlsVersionMismatch,
                format!("the server only speaks {name}: it hung up on a TLS 1.2/1.3 hello without an alert and answered a legacy hello"),
            )
            .with("server_version", name)
            .with("found_by", "legacy ClientHello")
            .with("modern_hello", format!("{how} with no alert"))
        }
        Some(v) => {
            f.message = format!(
                "the server only speaks {} (it refused TLS 1.2 and 1.3)",
                tls::version_name(v)
            );
            f.evidence.push(("server_version".into(), tls::version_name(v)));
            f.evidence.push(("found_by".into(), "legacy ClientHello".into()));
            f
        }
        None => {
            f.evidence
                .push(("legacy_hello".into(), "no legacy ServerHello either".into()));
            f
        }
    }
}

/// On a new connection: the X.224 exchange, then a legacy ClientHello; the ServerHello's
/// version, if the server answers one below TLS 1.2.
async fn legacy_version(addr: SocketAddr, cr: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let mut progress = negotiate::Progress::default();
    match negotiate::exchange(&mut stream, cr, &mut progress).await.ok()? {
        x224::ServerPdu::Confirm(x224::Confirm::Negotiated { selected, .. }) if x224::protocol::uses_tls(selected) => {}
        _ => return None,
    }
    let mut random = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).ok()?;
    stream.write_all(&tls::legacy_client_hello(&random)).await.ok()?;
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 11 {
        match stream.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    match tls::first_record(&buf[..got]) {
        tls::FirstRecord::ServerHello(v) if v < 0x0303 => Some(v),
        _ => None,
    }
}
