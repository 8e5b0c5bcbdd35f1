//! The target fleet: one loopback listener per `[[target]]`, each speaking real X.224 / TLS
//! bytes and misbehaving in one specific way.
//!
//! Every accepted connection is its own task; every read and write has a deadline (at most
//! [`HOLD_SILENT`], 60 s), so nothing outlives a test by more than that even if a client
//! vanishes. Dropping the [`Fleet`] (or [`Fleet::shutdown`]) stops every listener and
//! connection.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ring::rand::SecureRandom;
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::{timeout, Instant},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::{
    certs::{CertError, SimCa},
    credssp::{self, CredSspServer, Reply},
    scenario::{Behavior, CertVariant, TargetSpec},
    wire,
};

/// Deadline for reading the client's Connection Request or ClientHello.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline for one write.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a complete TLS handshake on a healthy target.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// A healthy target keeps the TLS connection this long unless the client closes first.
pub const HOLD_AFTER_TLS: Duration = Duration::from_secs(10);
/// Silent, legacy and stalled targets hold the connection this long.
pub const HOLD_SILENT: Duration = Duration::from_secs(60);
/// After its last bytes a closing target sends FIN and drains the client for this long, so the
/// client reads the answer before any RST.
pub const LINGER: Duration = Duration::from_secs(2);
/// How much of the real server flight `tls_stall` lets through.
pub const STALL_BYTES: usize = 120;
/// After its pubKeyAuth answer an `nla_*` target waits this long for TSCredentials (which it
/// does not judge), then closes.
pub const CREDENTIALS_WAIT: Duration = Duration::from_secs(2);

/// The fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("target {name:?}: cannot listen on {addr}: {source}")]
    Bind {
        /// Target name.
        name: String,
        /// Address asked for.
        addr: SocketAddr,
        /// OS error.
        source: io::Error,
    },
    /// A target's certificate could not be made.
    #[error("target {name:?}: {source}")]
    Cert {
        /// Target name.
        name: String,
        /// Why.
        source: CertError,
    },
    /// The sim CA could not be made.
    #[error("sim CA: {0}")]
    Ca(CertError),
    /// Two targets share a name.
    #[error("duplicate target name {0:?}")]
    Duplicate(String),
}

/// One running (or remote) target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetTarget {
    /// Scenario name.
    pub name: String,
    /// Its behaviour.
    pub behavior: Behavior,
    /// Its certificate variant.
    pub cert: CertVariant,
    /// Where it listens (for `refused`: where nothing listens).
    pub addr: SocketAddr,
}

/// What `gateway-sim targets` writes so that `gateway-sim run --targets-from-fleet` (another
/// process) can find the targets and the CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetManifest {
    /// Trust bundle PEM (see [`Fleet::ca_pem`]).
    pub ca_pem: String,
    /// The targets.
    pub targets: Vec<FleetTarget>,
    /// The simulated directory started beside the fleet, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<DirectoryManifest>,
}

/// Where a simulated directory started beside the fleet listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryManifest {
    /// `ldaps://…`.
    pub ldaps_url: String,
    /// `ldap://…` (StartTLS or plain), if listening.
    pub ldap_url: Option<String>,
    /// PEM of the CA that issued the directory's certificate.
    pub ca_pem: String,
}

/// A running fleet of simulated targets (or a description of one running elsewhere).
#[derive(Debug)]
pub struct Fleet {
    targets: Vec<FleetTarget>,
    ca_pem: String,
    tasks: JoinSet<()>,
    /// Per target: AUTHENTICATE messages received (CredSSP targets).
    authenticates: std::collections::HashMap<String, Arc<AtomicU64>>,
}

impl Fleet {
    /// Address of the target called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.target(name).map(|t| t.addr)
    }

    /// The target called `name`.
    pub fn target(&self, name: &str) -> Option<&FleetTarget> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// NTLM AUTHENTICATE messages the target called `name` has received (an attempt against
    /// the account's lockout budget on a real server); `None` for a target not run here.
    pub fn authenticates(&self, name: &str) -> Option<u64> {
        self.authenticates.get(name).map(|c| c.load(Ordering::Relaxed))
    }

    /// Every target, in scenario order.
    pub fn targets(&self) -> &[FleetTarget] {
        &self.targets
    }

    /// PEM trust bundle for the plugin's trust anchors: the sim CA (which issues every generated
    /// target certificate) followed by the fixture CAs that issued the `sha1` and the RSA-1024
    /// (`weak_rsa`) certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The manifest of this fleet.
    pub fn manifest(&self) -> FleetManifest {
        FleetManifest {
            ca_pem: self.ca_pem.clone(),
            targets: self.targets.clone(),
            directory: None,
        }
    }

    /// A fleet running in another process, known from its manifest. Owns no task.
    pub fn from_manifest(manifest: FleetManifest) -> Fleet {
        Fleet {
            targets: manifest.targets,
            ca_pem: manifest.ca_pem,
            tasks: JoinSet::new(),
            authenticates: std::collections::HashMap::new(),
        }
    }

    /// Stops every listener and connection and waits until they are gone.
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Where a TLS-serving target gets its server configuration.
enum TlsSource {
    /// One certificate (its configuration and end-entity DER) for every connection.
    Fixed(Arc<ServerConfig>, Arc<[u8]>),
    /// A fresh key and certificate per connection.
    Rotating(Arc<SimCa>),
}

/// A target's state shared by its connections.
struct Target {
    spec: TargetSpec,
    tls: TlsSource,
    connections: AtomicU64,
    authenticates: Arc<AtomicU64>,
}

impl Target {
    fn server_config(&self) -> Result<Arc<ServerConfig>, CertError> {
        Ok(self.tls_identity()?.0)
    }

    /// The server configuration and the end-entity certificate (DER) it presents.
    fn tls_identity(&self) -> Result<(Arc<ServerConfig>, Arc<[u8]>), CertError> {
        match &self.tls {
            TlsSource::Fixed(config, leaf) => Ok((config.clone(), leaf.clone())),
            TlsSource::Rotating(ca) => {
                let cert = ca.issue(&self.spec.name, self.spec.address, CertVariant::Rotating)?;
                let leaf = leaf_of(&cert.chain);
                Ok((cert.server_config()?, leaf))
            }
        }
    }
}

fn leaf_of(chain: &[rustls_pki_types::CertificateDer<'_>]) -> Arc<[u8]> {
    chain
        .first()
        .map(|c| Arc::from(c.as_ref()))
        .unwrap_or_else(|| Arc::from(&[][..]))
}

/// Starts one listener per target. Must be called inside a tokio runtime.
pub async fn start_fleet(targets: &[TargetSpec]) -> Result<Fleet, Error> {
    let ca = Arc::new(SimCa::generate().map_err(Error::Ca)?);
    let mut fleet = Fleet {
        targets: Vec::new(),
        ca_pem: ca.trust_pem(),
        tasks: JoinSet::new(),
        authenticates: std::collections::HashMap::new(),
    };
    for spec in targets {
        if fleet.target(&spec.name).is_some() {
            return Err(Error::Duplicate(spec.name.clone()));
        }
        let want = SocketAddr::new(spec.address, spec.port);
        let listener = TcpListener::bind(want).await.map_err(|source| Error::Bind {
            name: spec.name.clone(),
            addr: want,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            name: spec.name.clone(),
            addr: want,
            source,
        })?;
        fleet.targets.push(FleetTarget {
            name: spec.name.clone(),
            behavior: spec.behavior,
            cert: spec.cert,
            addr,
        });
        if spec.behavior == Behavior::Refused {
            // Keep the address, close the socket: a SYN to it now gets an RST.
            drop(listener);
            info!(target = %spec.name, %addr, "refusing connections");
            continue;
        }
        let cert_error = |source| Error::Cert {
            name: spec.name.clone(),
            source,
        };
        let tls = if spec.cert == CertVariant::Rotating {
            TlsSource::Rotating(ca.clone())
        } else {
            let cert = ca.issue(&spec.name, spec.address, spec.cert).map_err(cert_error)?;
            let leaf = leaf_of(&cert.chain);
            TlsSource::Fixed(cert.server_config().map_err(cert_error)?, leaf)
        };
        let authenticates = Arc::new(AtomicU64::new(0));
        fleet.authenticates.insert(spec.name.clone(), authenticates.clone());
        let target = Arc::new(Target {
            spec: spec.clone(),
            tls,
            connections: AtomicU64::new(0),
            authenticates,
        });
        info!(target = %spec.name, behavior = %spec.behavior, %addr, "listening");
        fleet.tasks.spawn(accept_loop(listener, target));
    }
    Ok(fleet)
}

async fn accept_loop(listener: TcpListener, target: Arc<Target>) {
    // Connection tasks live in this set: aborting the accept loop drops it and aborts them.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let n = target.connections.fetch_add(1, Ordering::Relaxed);
                    let target = target.clone();
                    connections.spawn(async move {
                        if let Err(e) = serve(stream, &target, n).await {
                            debug!(target = %target.spec.name, %peer, connection = n, error = %e, "connection ended");
                        }
                    });
                }
                Err(e) => {
                    warn!(target = %target.spec.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Why a connection ended early (logged at debug level only).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("client closed")]
    Closed,
    #[error("bad connection request: {0}")]
    Request(#[from] wire::RequestError),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate: {0}")]
    Cert(#[from] CertError),
    #[error("CredSSP framing: {0}")]
    Der(#[from] credssp::DerError),
    #[error("no randomness for the NTLM challenge")]
    Random,
    #[error("weak_rsa flight: {0}")]
    Flight(crate::weak_rsa::FlightError),
}

async fn serve(mut stream: TcpStream, target: &Target, n: u64) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let spec = &target.spec;
    match spec.behavior {
        Behavior::CloseOnAccept => return finish(stream).await,
        // Connections 1, 3, 5 … are healthy; 2, 4, 6 … close on accept.
        Behavior::Flapping if n % 2 == 1 => return finish(stream).await,
        // Runs of `run_length` connections: healthy, closed, healthy …
        Behavior::FlappingPath if (n / spec.run_length.max(1)) % 2 == 1 => return finish(stream).await,
        Behavior::Refused => return Ok(()),
        _ => {}
    }
    if spec.behavior == Behavior::LineService {
        return line_service(stream).await;
    }
    let request = read_request(&mut stream).await;
    match spec.behavior {
        Behavior::Silent => return hold(stream, HOLD_SILENT).await,
        Behavior::Garbage => {
            write(&mut stream, wire::GARBAGE_HTTP).await?;
            return finish(stream).await;
        }
        Behavior::DisconnectRequest => {
            write(&mut stream, &wire::DISCONNECT_REQUEST).await?;
            return finish(stream).await;
        }
        _ => {}
    }
    let request = match request {
        Ok(request) => request,
        Err(e) => {
            let _ = finish(stream).await;
            return Err(e);
        }
    };
    // No RDP_NEG_REQ means Standard RDP Security only.
    let requested = request.requested_protocols.unwrap_or(wire::PROTOCOL_RDP);
    debug!(target = %spec.name, requested, cookie = ?request.cookie, "connection request");

    match spec.behavior {
        Behavior::NegFailure => {
            write(&mut stream, &wire::confirm_with_neg_failure(spec.failure_code)).await?;
            return finish(stream).await;
        }
        Behavior::Downgrade => {
            write(
                &mut stream,
                &wire::confirm_with_neg_rsp(wire::NEG_RSP_FLAGS_WINDOWS, spec.selected_protocol),
            )
            .await?;
            return hold(stream, HOLD_SILENT).await;
        }
        Behavior::Legacy => {
            write(&mut stream, &wire::CONFIRM_LEGACY).await?;
            return hold(stream, HOLD_SILENT).await;
        }
        _ => {}
    }

    // Every other behaviour negotiates like a server that requires `selected_protocol`.
    if spec.behavior == Behavior::Slow {
        tokio::time::sleep(spec.delay).await;
    }
    let selected = spec.selected_protocol;
    if let Some(code) = refusal(requested, selected) {
        write(&mut stream, &wire::confirm_with_neg_failure(code)).await?;
        return finish(stream).await;
    }
    write(
        &mut stream,
        &wire::confirm_with_neg_rsp(wire::NEG_RSP_FLAGS_WINDOWS, selected),
    )
    .await?;
    if !tls_follows(selected) {
        return hold(stream, HOLD_SILENT).await;
    }
    if spec.behavior == Behavior::Slow {
        tokio::time::sleep(spec.delay).await;
    }

    match spec.behavior {
        Behavior::TlsCloseAfterHello => {
            read_client_hello(&mut stream).await?;
            finish(stream).await
        }
        Behavior::TlsDisconnectRequest => {
            read_client_hello(&mut stream).await?;
            write(&mut stream, &wire::DISCONNECT_REQUEST).await?;
            finish(stream).await
        }
        Behavior::Tls10Only => {
            read_client_hello(&mut stream).await?;
            write_tls10_server_hello(&mut stream).await?;
            finish(stream).await
        }
        Behavior::Tls10Alert => {
            // A TLS 1.0-only Schannel: refuses a modern hello, answers a legacy one.
            let version = read_client_hello(&mut stream).await?;
            if version.is_some_and(|v| v >= 0x0303) {
                write(&mut stream, &wire::ALERT_PROTOCOL_VERSION).await?;
            } else {
                write_tls10_server_hello(&mut stream).await?;
            }
            finish(stream).await
        }
        Behavior::Tls10Reset => {
            // Schannel limited to TLS 1.0: a modern hello is reset, no alert.
            let version = read_client_hello(&mut stream).await?;
            if version.is_some_and(|v| v >= 0x0303) {
                return reset(stream);
            }
            write_tls10_server_hello(&mut stream).await?;
            finish(stream).await
        }
        Behavior::WeakRsa => {
            let hello = read_client_hello_random(&mut stream).await?;
            let Some((_, client_random)) = hello else {
                return finish(stream).await;
            };
            let rng = ring::rand::SystemRandom::new();
            let flight = crate::weak_rsa::server_flight(&client_random, &rng).map_err(ConnError::Flight)?;
            write(&mut stream, &flight).await?;
            finish(stream).await
        }
        Behavior::TlsNoSharedCipher => {
            read_client_hello(&mut stream).await?;
            write(&mut stream, &wire::ALERT_HANDSHAKE_FAILURE).await?;
            finish(stream).await
        }
        Behavior::TlsAlert => {
            read_client_hello(&mut stream).await?;
            write(&mut stream, &wire::ALERT_INTERNAL_ERROR).await?;
            finish(stream).await
        }
        Behavior::TlsNotTls => {
            read_client_hello(&mut stream).await?;
            write(&mut stream, wire::NOT_TLS_TEXT).await?;
            finish(stream).await
        }
        Behavior::TlsStall => stall(stream, target.server_config()?).await,
        _ => {
            let (config, leaf) = target.tls_identity()?;
            let acceptor = TlsAcceptor::from(config);
            let tls = timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
                .map_err(|_| ConnError::Timeout)??;
            debug!(target = %spec.name, version = ?tls.get_ref().1.protocol_version(), "TLS handshake done");
            if spec.behavior.is_nla() {
                return nla(tls, spec, &leaf, &target.authenticates).await;
            }
            hold(tls, HOLD_AFTER_TLS).await
        }
    }
}

/// The RDP_NEG_FAILURE code a server requiring `selected` sends when the client did not offer
/// it, or `None` if it can select it.
fn refusal(requested: u32, selected: u32) -> Option<u32> {
    if selected == wire::PROTOCOL_RDP || requested & selected == selected {
        None
    } else if selected & !wire::PROTOCOL_SSL != 0 {
        // HYBRID, HYBRID_EX …: NLA required.
        Some(wire::HYBRID_REQUIRED_BY_SERVER)
    } else {
        Some(wire::SSL_REQUIRED_BY_SERVER)
    }
}

/// SSL, HYBRID, RDSTLS and HYBRID_EX all continue with a TLS handshake.
fn tls_follows(selected: u32) -> bool {
    selected & 0x0f != 0
}

/// Reads one TPKT-framed X.224 Connection Request.
async fn read_request(stream: &mut TcpStream) -> Result<wire::ConnectionRequest, ConnError> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut header = [0u8; wire::TPKT_HEADER_LEN];
    read_exact_by(stream, &mut header, deadline).await?;
    let len = wire::tpkt_length(&header)?;
    let mut pdu = vec![0u8; len];
    pdu[..wire::TPKT_HEADER_LEN].copy_from_slice(&header);
    read_exact_by(stream, &mut pdu[wire::TPKT_HEADER_LEN..], deadline).await?;
    Ok(wire::parse_connection_request(&pdu)?)
}

/// Reads the client's first TLS record (the ClientHello) and discards it. Bytes that are not a
/// handshake record are discarded as they come.
/// Writes a TLS 1.0 ServerHello with a fresh random.
async fn write_tls10_server_hello(stream: &mut TcpStream) -> Result<(), ConnError> {
    let mut random = [0u8; 32];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut random)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
    write(stream, &wire::tls10_server_hello(&random)).await
}

/// Reads the client's first TLS record; returns the ClientHello's client_version when the record
/// holds one.
async fn read_client_hello(stream: &mut TcpStream) -> Result<Option<u16>, ConnError> {
    Ok(read_client_hello_random(stream).await?.map(|(v, _)| v))
}

/// A line-based service on the RDP port: reads until the end of a line (at most 4 KiB, under
/// [`READ_TIMEOUT`]), whatever the bytes before it, then answers like a web server to a request
/// line it cannot parse and closes. Without a line it waits (and then closes).
async fn line_service(mut stream: TcpStream) -> Result<(), ConnError> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut seen = 0usize;
    let mut buf = [0u8; 512];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return finish(stream).await,
            Ok(Ok(0)) => return Err(ConnError::Closed),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.into()),
        };
        seen += n;
        if buf[..n].contains(&b'\n') || seen > 4096 {
            break;
        }
    }
    write(&mut stream, wire::LINE_SERVICE_ANSWER).await?;
    finish(stream).await
}

/// Closes with a TCP reset (SO_LINGER 0), no FIN, no alert.
fn reset(stream: TcpStream) -> Result<(), ConnError> {
    stream.set_zero_linger()?;
    drop(stream);
    Ok(())
}

/// Reads the client's first TLS record; returns the ClientHello's client_version and random
/// when the record holds one.
async fn read_client_hello_random(stream: &mut TcpStream) -> Result<Option<(u16, [u8; 32])>, ConnError> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut header = [0u8; 5];
    read_exact_by(stream, &mut header, deadline).await?;
    // ContentType handshake (22), version, length u16 BE (at most 2^14 + 2048)
    if header[0] != 0x16 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]])).min(18_432);
    let mut body = vec![0u8; len];
    read_exact_by(stream, &mut body, deadline).await?;
    // msg_type ClientHello (1) | length u24 | client_version u16 | random[32]
    Ok(match body.as_slice() {
        [1, _, _, _, hi, lo, rest @ ..] if rest.len() >= 32 => {
            let mut random = [0u8; 32];
            random.copy_from_slice(&rest[..32]);
            Some((u16::from_be_bytes([*hi, *lo]), random))
        }
        _ => None,
    })
}

async fn read_exact_by<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), ConnError> {
    match tokio::time::timeout_at(deadline, stream.read_exact(buf)).await {
        Err(_) => Err(ConnError::Timeout),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ConnError::Closed),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), ConnError> {
    timeout(WRITE_TIMEOUT, stream.write_all(bytes))
        .await
        .map_err(|_| ConnError::Timeout)??;
    Ok(())
}

/// Reads and discards until the client closes, an error, or `limit`.
async fn hold<S: AsyncRead + Unpin>(mut stream: S, limit: Duration) -> Result<(), ConnError> {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}

/// Sends FIN, then drains the client for [`LINGER`] so it reads our last bytes before any RST.
async fn finish(mut stream: TcpStream) -> Result<(), ConnError> {
    timeout(WRITE_TIMEOUT, stream.shutdown())
        .await
        .map_err(|_| ConnError::Timeout)??;
    hold(stream, LINGER).await
}

/// The CredSSP conversation of an `nla_*` target on its TLS stream: TSRequests in, answers out,
/// as [`CredSspServer`] decides. Every read has a deadline ([`READ_TIMEOUT`], then
/// [`CREDENTIALS_WAIT`] once the logon succeeded).
async fn nla<S: AsyncRead + AsyncWrite + Unpin>(
    mut tls: S,
    spec: &TargetSpec,
    certificate: &[u8],
    authenticates: &AtomicU64,
) -> Result<(), ConnError> {
    let public_key = credssp::subject_public_key(certificate)?;
    let mut challenge = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut challenge)
        .map_err(|_| ConnError::Random)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0));
    let mut server = CredSspServer::new(spec, public_key, challenge, now);
    loop {
        let waiting_for_credentials = server.awaiting_credentials();
        let wait = if waiting_for_credentials {
            CREDENTIALS_WAIT
        } else {
            READ_TIMEOUT
        };
        let message = match read_ts_request(&mut tls, Instant::now() + wait).await {
            Ok(Some(message)) => message,
            // The client is done (after the CHALLENGE when it has no credential).
            Ok(None) => return finish_stream(tls).await,
            Err(ConnError::Timeout) if waiting_for_credentials => return finish_stream(tls).await,
            Err(e) => {
                let _ = finish_stream(tls).await;
                return Err(e);
            }
        };
        if server.awaiting_authenticate() {
            authenticates.fetch_add(1, Ordering::Relaxed);
        }
        match server.handle(&message) {
            Reply::Continue(answer) | Reply::Authenticated(answer) => write_flush(&mut tls, &answer).await?,
            Reply::Refuse(answer) => {
                write_flush(&mut tls, &answer).await?;
                return finish_stream(tls).await;
            }
            Reply::Close => return finish_stream(tls).await,
        }
    }
}

/// Reads one TSRequest (a DER SEQUENCE framed by its own length, at most
/// [`credssp::MAX_TS_REQUEST`] bytes). `None`: the client closed before its first byte.
async fn read_ts_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Instant,
) -> Result<Option<Vec<u8>>, ConnError> {
    let mut buf = vec![0u8; 1];
    match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        Err(_) => return Err(ConnError::Timeout),
        Ok(Ok(0)) => return Ok(None),
        Ok(Ok(_)) => {}
        // TCP FIN without a TLS close_notify.
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
    }
    // The tag and the length octets, one byte at a time (at most 6).
    let total = loop {
        if let Some(total) = credssp::frame_length(&buf)? {
            break total;
        }
        let mut byte = [0u8; 1];
        read_exact_by(stream, &mut byte, deadline).await?;
        buf.push(byte[0]);
    };
    let have = buf.len();
    buf.resize(total.max(have), 0);
    read_exact_by(stream, &mut buf[have..], deadline).await?;
    Ok(Some(buf))
}

/// Writes and flushes (a TLS stream keeps records buffered until flushed).
async fn write_flush<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), ConnError> {
    timeout(WRITE_TIMEOUT, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| ConnError::Timeout)??;
    Ok(())
}

/// Like [`finish`] for any stream: shutdown (for TLS: close_notify, then FIN), then drain for
/// [`LINGER`].
async fn finish_stream<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Result<(), ConnError> {
    timeout(WRITE_TIMEOUT, stream.shutdown())
        .await
        .map_err(|_| ConnError::Timeout)??;
    hold(stream, LINGER).await
}

/// Runs a real rustls server handshake but lets only the first [`STALL_BYTES`] of its flight
/// reach the client, then goes silent: the path-MTU black-hole signature.
async fn stall(mut stream: TcpStream, config: Arc<ServerConfig>) -> Result<(), ConnError> {
    let mut conn = rustls::ServerConnection::new(config)?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buf = [0u8; 4096];
    while !conn.wants_write() {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(ConnError::Timeout),
            Ok(Ok(0)) => return Err(ConnError::Closed),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.into()),
        };
        let mut input = &buf[..n];
        while !input.is_empty() {
            conn.read_tls(&mut input)?;
            conn.process_new_packets()?;
        }
    }
    let mut flight = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut flight)?;
    }
    debug!(
        flight = flight.len(),
        sent = STALL_BYTES.min(flight.len()),
        "stalling the server flight"
    );
    write(&mut stream, &flight[..STALL_BYTES.min(flight.len())]).await?;
    hold(stream, HOLD_SILENT).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::IpAddr;

    use rustls::pki_types::ServerName;
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::TlsConnector;
    use x509_parser::prelude::*;

    use super::*;

    /// The 19-byte Connection Request of the brief, requesting SSL | HYBRID.
    const CR: [u8; 19] = [
        0x03, 0x00, 0x00, 0x13, // TPKT v3, length 19
        0x0e, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x00, // LI 14, CR, DST-REF, SRC-REF, class 0
        0x01, 0x00, 0x08, 0x00, // RDP_NEG_REQ, flags 0, length 8
        0x03, 0x00, 0x00, 0x00, // requestedProtocols SSL | HYBRID
    ];
    const SHORT: Duration = Duration::from_millis(300);

    fn spec(name: &str, behavior: Behavior) -> TargetSpec {
        TargetSpec::new(name, behavior)
    }

    async fn fleet_of(spec: TargetSpec) -> (Fleet, SocketAddr) {
        let name = spec.name.clone();
        let fleet = start_fleet(&[spec]).await.unwrap();
        let addr = fleet.addr(&name).unwrap();
        (fleet, addr)
    }

    async fn connect_and_request(addr: SocketAddr, request: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(request).await.unwrap();
        s
    }

    /// Reads until EOF (or reset) within 3 s; panics on timeout.
    async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match timeout(Duration::from_secs(3), s.read(&mut buf))
                .await
                .expect("target did not close")
            {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Asserts nothing arrives for a short while.
    async fn assert_silent(s: &mut TcpStream) {
        let mut buf = [0u8; 64];
        assert!(timeout(SHORT, s.read(&mut buf)).await.is_err(), "target was not silent");
    }

    async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        timeout(Duration::from_secs(3), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        buf
    }

    fn confirm_ssl() -> Vec<u8> {
        // TPKT 19 | LI 14 CC DST 0000 SRC 1234 class 0 | RDP_NEG_RSP flags 1f len 8 SSL
        vec![
            3, 0, 0, 0x13, 0x0e, 0xd0, 0, 0, 0x12, 0x34, 0, 0x02, 0x1f, 0x08, 0, 1, 0, 0, 0,
        ]
    }

    fn permissive_client() -> TlsConnector {
        TlsConnector::from(crate::bench::permissive_client_config().unwrap())
    }

    /// X.224 exchange + TLS handshake; returns the end-entity certificate (DER).
    async fn handshake(addr: SocketAddr) -> Vec<u8> {
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(read_n(&mut s, 19).await, confirm_ssl());
        let tls = permissive_client()
            .connect(ServerName::try_from("localhost").unwrap(), s)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    async fn cert_of(variant: CertVariant) -> Vec<u8> {
        let mut s = spec("cert-test", Behavior::Healthy);
        s.cert = variant;
        let (_fleet, addr) = fleet_of(s).await;
        handshake(addr).await
    }

    fn now() -> i64 {
        ::time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
        cert.subject_alternative_name()
            .unwrap()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::DNSName(d) => (*d).to_owned(),
                        GeneralName::IPAddress(ip) => IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap()).to_string(),
                        other => format!("{other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn healthy_confirms_ssl_and_completes_tls_with_a_valid_cert() {
        let (fleet, addr) = fleet_of(spec("healthy-tls", Behavior::Healthy)).await;
        let der = handshake(addr).await;
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(
            cert.validity().not_before.timestamp() < now()
                && cert.validity().not_after.timestamp() > now() + 300 * 86_400
        );
        assert_eq!(sans(&cert), vec!["healthy-tls", "localhost", "127.0.0.1"]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!cert.is_ca());
        // Issued by the sim CA of the trust bundle.
        let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(fleet.ca_pem().as_bytes()).unwrap();
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca.subject());
        cert.verify_signature(Some(ca.public_key())).unwrap();
        assert_eq!(fleet.ca_pem().matches("BEGIN CERTIFICATE").count(), 3);
    }

    #[tokio::test]
    async fn healthy_nla_selects_hybrid_or_refuses_ssl_only_clients() {
        let (_fleet, addr) = fleet_of(spec("nla", Behavior::HealthyNla)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(read_n(&mut s, 19).await[15..], [2, 0, 0, 0]);
        let tls = permissive_client()
            .connect(ServerName::try_from("nla").unwrap(), s)
            .await
            .unwrap();
        assert!(tls.get_ref().1.peer_certificates().is_some());
        // A client offering SSL only gets HYBRID_REQUIRED_BY_SERVER.
        let mut ssl_only = CR;
        ssl_only[15] = 0x01;
        let mut s = connect_and_request(addr, &ssl_only).await;
        assert_eq!(
            read_to_close(&mut s).await,
            [3, 0, 0, 0x13, 0x0e, 0xd0, 0, 0, 0x12, 0x34, 0, 0x03, 0, 0x08, 0, 5, 0, 0, 0]
        );
    }

    #[tokio::test]
    async fn neg_failure_sends_the_code_and_closes() {
        for code in [1u8, 2, 3, 4, 5, 6, 99] {
            let mut t = spec("nf", Behavior::NegFailure);
            t.failure_code = u32::from(code);
            let (_fleet, addr) = fleet_of(t).await;
            let mut s = connect_and_request(addr, &CR).await;
            let got = read_to_close(&mut s).await;
            // TPKT 19 | CC | RDP_NEG_FAILURE type 3, flags 0, length 8, failureCode LE
            assert_eq!(
                got,
                [3, 0, 0, 0x13, 0x0e, 0xd0, 0, 0, 0x12, 0x34, 0, 0x03, 0, 0x08, 0, code, 0, 0, 0]
            );
        }
    }

    #[tokio::test]
    async fn downgrade_selects_standard_rdp_security() {
        let (_fleet, addr) = fleet_of(spec("down", Behavior::Downgrade)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(
            read_n(&mut s, 19).await,
            [3, 0, 0, 0x13, 0x0e, 0xd0, 0, 0, 0x12, 0x34, 0, 0x02, 0x1f, 0x08, 0, 0, 0, 0, 0]
        );
        assert_silent(&mut s).await;
    }

    #[tokio::test]
    async fn legacy_confirms_without_negotiation_data() {
        let (_fleet, addr) = fleet_of(spec("legacy", Behavior::Legacy)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(
            read_n(&mut s, 11).await,
            [3, 0, 0, 0x0b, 0x06, 0xd0, 0, 0, 0x12, 0x34, 0]
        );
        assert_silent(&mut s).await;
    }

    #[tokio::test]
    async fn close_on_accept_closes_without_a_byte() {
        let (_fleet, addr) = fleet_of(spec("coa", Behavior::CloseOnAccept)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert!(read_to_close(&mut s).await.is_empty());
    }

    #[tokio::test]
    async fn silent_says_nothing() {
        let (_fleet, addr) = fleet_of(spec("silent", Behavior::Silent)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert_silent(&mut s).await;
    }

    #[tokio::test]
    async fn garbage_answers_http() {
        let (_fleet, addr) = fleet_of(spec("garbage", Behavior::Garbage)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert!(read_to_close(&mut s).await.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
    }

    #[tokio::test]
    async fn disconnect_request_instead_of_confirm() {
        let (_fleet, addr) = fleet_of(spec("dr", Behavior::DisconnectRequest)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(read_to_close(&mut s).await, [3, 0, 0, 0x0b, 0x06, 0x80, 0, 0, 0, 0, 0]);
    }

    /// Confirm selecting SSL, then a ClientHello-shaped record; returns what follows until close.
    async fn after_client_hello(behavior: Behavior) -> Vec<u8> {
        let (_fleet, addr) = fleet_of(spec("tls-fault", behavior)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(read_n(&mut s, 19).await, confirm_ssl());
        // A (fake) ClientHello record: handshake, TLS 1.0 record version, 4-byte body.
        s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00])
            .await
            .unwrap();
        read_to_close(&mut s).await
    }

    #[tokio::test]
    async fn tls_faults_after_the_client_hello() {
        assert!(after_client_hello(Behavior::TlsCloseAfterHello).await.is_empty());
        assert_eq!(
            after_client_hello(Behavior::TlsDisconnectRequest).await,
            [3, 0, 0, 0x0b, 0x06, 0x80, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            after_client_hello(Behavior::TlsNoSharedCipher).await,
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]
        );
        assert_eq!(
            after_client_hello(Behavior::TlsAlert).await,
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50]
        );
        let text = after_client_hello(Behavior::TlsNotTls).await;
        assert!(!text.is_empty() && text.is_ascii());
        let hello = after_client_hello(Behavior::Tls10Only).await;
        assert_eq!(hello.len(), 47);
        assert_eq!(&hello[..5], &[0x16, 0x03, 0x01, 0x00, 0x2a]); // handshake record, TLS 1.0, 42 bytes
        assert_eq!(hello[5], 0x02); // ServerHello
        assert_eq!(&hello[9..11], &[0x03, 0x01]); // legacy_version TLS 1.0
        assert_eq!(&hello[44..46], &[0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    }

    #[tokio::test]
    async fn line_service_waits_for_a_line_then_answers_http() {
        let (_fleet, addr) = fleet_of(spec("line", Behavior::LineService)).await;
        // The 19-byte request without a cookie ends no line: no answer.
        let mut s = connect_and_request(addr, &CR).await;
        let mut byte = [0u8; 1];
        assert!(timeout(Duration::from_millis(300), s.read(&mut byte)).await.is_err());
        // A line end: the service answers.
        s.write_all(b"\r\n").await.unwrap();
        assert!(read_to_close(&mut s).await.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
    }

    #[tokio::test]
    async fn tls10_reset_resets_a_modern_hello_and_answers_a_legacy_one() {
        // A hello too short to carry a TLS 1.2 client_version is answered like a legacy one.
        let hello = after_client_hello(Behavior::Tls10Reset).await;
        assert_eq!(&hello[..5], &[0x16, 0x03, 0x01, 0x00, 0x2a]);
        let (_fleet, addr) = fleet_of(spec("tls10-reset", Behavior::Tls10Reset)).await;
        let mut s = connect_and_request(addr, &CR).await;
        read_n(&mut s, 19).await;
        let err = permissive_client()
            .connect(ServerName::try_from("tls10-reset").unwrap(), s)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    #[tokio::test]
    async fn weak_rsa_presents_an_rsa_1024_certificate() {
        let (_fleet, addr) = fleet_of(spec("cert-rsa1024", Behavior::WeakRsa)).await;
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(read_n(&mut s, 19).await, confirm_ssl());
        let tls = permissive_client();
        // ring refuses RSA-1024 for signatures: the handshake cannot complete here.
        assert!(tls
            .connect(ServerName::try_from("cert-rsa1024").unwrap(), s)
            .await
            .is_err());
        let der = rustls_pki_types::CertificateDer::from_pem_slice(crate::weak_rsa::CERT_PEM.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = cert.public_key().parsed() else {
            panic!("not RSA")
        };
        assert_eq!(rsa.key_size(), 1024);
        assert_eq!(sans(&cert), vec!["cert-rsa1024", "localhost", "127.0.0.1"]);
    }

    #[tokio::test]
    async fn tls10_only_fails_a_real_rustls_client() {
        let (_fleet, addr) = fleet_of(spec("tls10", Behavior::Tls10Only)).await;
        let mut s = connect_and_request(addr, &CR).await;
        read_n(&mut s, 19).await;
        let err = permissive_client()
            .connect(ServerName::try_from("tls10").unwrap(), s)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ServerDoesNotSupportTls12Or13"), "{err}");
    }

    #[tokio::test]
    async fn tls_stall_sends_120_bytes_of_a_real_flight_then_nothing() {
        let (_fleet, addr) = fleet_of(spec("stall", Behavior::TlsStall)).await;
        let s = connect_and_request(addr, &CR).await;
        let (mut rd, wr) = tokio::io::split(s);
        let mut confirm = [0u8; 19];
        rd.read_exact(&mut confirm).await.unwrap();
        assert_eq!(confirm.to_vec(), confirm_ssl());
        // Drive a real ClientHello through a rustls client connection by hand.
        let config = crate::bench::permissive_client_config().unwrap();
        let mut client = rustls::ClientConnection::new(config, ServerName::try_from("stall").unwrap()).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        let mut wr = wr;
        wr.write_all(&hello).await.unwrap();
        let mut flight = vec![0u8; STALL_BYTES];
        timeout(Duration::from_secs(3), rd.read_exact(&mut flight))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(flight[0], 0x16, "starts with a handshake record");
        let mut more = [0u8; 16];
        assert!(
            timeout(SHORT, rd.read(&mut more)).await.is_err(),
            "sent more than {STALL_BYTES} bytes"
        );
    }

    #[tokio::test]
    async fn slow_delays_the_confirm() {
        let mut t = spec("slow", Behavior::Slow);
        t.delay = Duration::from_millis(200);
        let (_fleet, addr) = fleet_of(t).await;
        let started = std::time::Instant::now();
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(read_n(&mut s, 19).await, confirm_ssl());
        assert!(started.elapsed() >= Duration::from_millis(200));
        let tls = permissive_client()
            .connect(ServerName::try_from("slow").unwrap(), s)
            .await
            .unwrap();
        assert!(tls.get_ref().1.peer_certificates().is_some());
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn flapping_alternates() {
        let (_fleet, addr) = fleet_of(spec("flap", Behavior::Flapping)).await;
        for i in 0..4 {
            let mut s = connect_and_request(addr, &CR).await;
            if i % 2 == 0 {
                assert_eq!(read_n(&mut s, 19).await, confirm_ssl(), "connection {}", i + 1);
            } else {
                assert!(read_to_close(&mut s).await.is_empty(), "connection {}", i + 1);
            }
        }
    }

    #[tokio::test]
    async fn refused_gets_rst() {
        let (_fleet, addr) = fleet_of(spec("refused", Behavior::Refused)).await;
        let err = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn cert_variants_have_their_property() {
        let day = 86_400;
        let der = cert_of(CertVariant::Expired).await;
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert!(c.validity().not_after.timestamp() < now() - day / 2);

        let der = cert_of(CertVariant::NotYetValid).await;
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert!(c.validity().not_before.timestamp() > now() + day);

        let der = cert_of(CertVariant::ExpiringSoon).await;
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        let left = c.validity().not_after.timestamp() - now();
        assert!((2 * day..=3 * day + 60).contains(&left), "{left}");

        let der = cert_of(CertVariant::WrongName).await;
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(sans(&c), vec!["other.example.test"]);

        let der = cert_of(CertVariant::SelfSignedCa).await;
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert!(c.is_ca());
        assert_eq!(c.subject(), c.issuer());
        c.verify_signature(None).unwrap();

        let der = cert_of(CertVariant::Sha1).await;
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            c.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_PKCS1_SHA1WITHRSA
        );
        match c.public_key().parsed().unwrap() {
            x509_parser::public_key::PublicKey::RSA(rsa) => assert_eq!(rsa.key_size(), 2048),
            other => panic!("not RSA: {other:?}"),
        }
        assert!(c.validity().not_after.timestamp() > now() + 50 * 365 * day);

        let der = cert_of(CertVariant::WrongEku).await;
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[tokio::test]
    async fn rotating_presents_a_new_key_per_connection() {
        let mut t = spec("rot", Behavior::Healthy);
        t.cert = CertVariant::Rotating;
        let (_fleet, addr) = fleet_of(t).await;
        let a = handshake(addr).await;
        let b = handshake(addr).await;
        assert_ne!(a, b);
        let (_, ca) = X509Certificate::from_der(&a).unwrap();
        let (_, cb) = X509Certificate::from_der(&b).unwrap();
        assert_ne!(ca.public_key().raw, cb.public_key().raw);
    }

    #[tokio::test]
    async fn shutdown_closes_listeners() {
        let (fleet, addr) = fleet_of(spec("h", Behavior::Healthy)).await;
        let mut held = connect_and_request(addr, &CR).await;
        read_n(&mut held, 19).await;
        fleet.shutdown().await;
        assert!(TcpStream::connect(addr).await.is_err());
        // The open connection's task is gone too.
        assert!(read_to_close(&mut held).await.is_empty());
    }

    #[tokio::test]
    async fn manifest_round_trips_through_json() {
        let mut flap = spec("flap", Behavior::Flapping);
        flap.address = IpAddr::from([127, 0, 0, 2]);
        let fleet = start_fleet(&[spec("h", Behavior::Healthy), flap, spec("r", Behavior::Refused)])
            .await
            .unwrap();
        let json = serde_json::to_string(&fleet.manifest()).unwrap();
        assert!(json.contains(r#""behavior":"flapping""#), "{json}");
        let remote = Fleet::from_manifest(serde_json::from_str(&json).unwrap());
        assert_eq!(remote.targets(), fleet.targets());
        assert_eq!(remote.ca_pem(), fleet.ca_pem());
        assert_eq!(remote.addr("flap").unwrap().ip(), IpAddr::from([127, 0, 0, 2]));
        assert!(
            start_fleet(&[spec("d", Behavior::Healthy), spec("d", Behavior::Silent)])
                .await
                .is_err()
        );
    }

    // ------------------------------------------------------------ CredSSP targets

    fn nla_spec(name: &str, behavior: Behavior) -> TargetSpec {
        let mut t = spec(name, behavior);
        t.nla.accounts = vec![crate::scenario::Account {
            name: "nina".to_owned(),
            password: "Nla-Pass-1".to_owned(),
            state: "good".to_owned(),
            domain: None,
        }];
        t
    }

    /// X.224 (HYBRID selected) + TLS; returns the stream and the server's SubjectPublicKey,
    /// cross-checked with x509-parser.
    async fn nla_connect(addr: SocketAddr) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
        let mut s = connect_and_request(addr, &CR).await;
        assert_eq!(read_n(&mut s, 19).await[15..], [2, 0, 0, 0], "HYBRID selected");
        let tls = permissive_client()
            .connect(ServerName::try_from("localhost").unwrap(), s)
            .await
            .unwrap();
        let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let key = credssp::subject_public_key(&der).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(key, cert.public_key().subject_public_key.data.to_vec());
        (tls, key)
    }

    /// Sends a TSRequest and reads the answer; `None` if the server closed instead.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, request: &[u8]) -> Option<Vec<u8>> {
        s.write_all(request).await.unwrap();
        s.flush().await.unwrap();
        read_answer(s).await
    }

    async fn read_answer<S: AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(3);
        match read_ts_request(s, deadline).await {
            Ok(answer) => answer,
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn nla_healthy_completes_a_logon_and_refuses_a_wrong_password() {
        use crate::credssp::test_client::TestClient;
        let mut t = nla_spec("nla-ok", Behavior::NlaHealthy);
        t.nla.computer = "RDP-SIM01".to_owned();
        let (_fleet, addr) = fleet_of(t).await;

        let (mut tls, key) = nla_connect(addr).await;
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", key);
        let challenge = exchange(&mut tls, &client.negotiate()).await.unwrap();
        let c = credssp::TsRequest::decode(&challenge).unwrap();
        let parsed = crate::credssp::test_client::parse_challenge(&c.nego_tokens[0]);
        let pairs = crate::ntlm::parse_av_pairs(&parsed.target_info).unwrap();
        assert!(pairs
            .iter()
            .any(|(id, v)| *id == 1 && crate::ntlm::from_utf16le(v).unwrap() == "RDP-SIM01"));
        let answer = exchange(&mut tls, &client.authenticate(&challenge)).await.unwrap();
        assert_eq!(client.finish(&answer), Ok(()));
        // No TSCredentials: the target closes after a short wait.
        let started = std::time::Instant::now();
        assert_eq!(read_answer(&mut tls).await, None);
        assert!(started.elapsed() >= CREDENTIALS_WAIT - Duration::from_millis(100));

        let (mut tls, key) = nla_connect(addr).await;
        let mut client = TestClient::new("nina", "", "wrong", key);
        let challenge = exchange(&mut tls, &client.negotiate()).await.unwrap();
        let answer = exchange(&mut tls, &client.authenticate(&challenge)).await.unwrap();
        assert_eq!(client.finish(&answer), Err("errorCode 0xc000006d".to_owned()));
        assert_eq!(read_answer(&mut tls).await, None, "closed after the errorCode");

        // A client without a credential stops after the CHALLENGE; so does the target.
        let (mut tls, key) = nla_connect(addr).await;
        let mut client = TestClient::new("", "", "", key);
        assert!(exchange(&mut tls, &client.negotiate()).await.is_some());
        tls.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn nla_error_and_nla_close_over_tls() {
        use crate::credssp::test_client::TestClient;
        let mut t = nla_spec("nla-locked", Behavior::NlaError);
        t.nla.ntstatus = 0xC000_0234;
        let (_fleet, addr) = fleet_of(t).await;
        let (mut tls, key) = nla_connect(addr).await;
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", key);
        let challenge = exchange(&mut tls, &client.negotiate()).await.unwrap();
        let answer = exchange(&mut tls, &client.authenticate(&challenge)).await.unwrap();
        let ts = credssp::TsRequest::decode(&answer).unwrap();
        assert_eq!(
            (ts.version, ts.error_code, ts.pub_key_auth),
            (6, Some(0xC000_0234), None)
        );
        assert_eq!(read_answer(&mut tls).await, None);

        let (_fleet, addr) = fleet_of(nla_spec("nla-close", Behavior::NlaClose)).await;
        let (mut tls, key) = nla_connect(addr).await;
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", key);
        let challenge = exchange(&mut tls, &client.negotiate()).await.unwrap();
        assert_eq!(exchange(&mut tls, &client.authenticate(&challenge)).await, None);
    }

    #[tokio::test]
    async fn nla_old_speaks_version_4_and_the_old_binding() {
        use crate::credssp::test_client::TestClient;
        let (_fleet, addr) = fleet_of(nla_spec("nla-old", Behavior::NlaOld)).await;
        let (mut tls, key) = nla_connect(addr).await;
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", key);
        let challenge = exchange(&mut tls, &client.negotiate()).await.unwrap();
        assert_eq!(credssp::TsRequest::decode(&challenge).unwrap().version, 4);
        let answer = exchange(&mut tls, &client.authenticate(&challenge)).await.unwrap();
        assert_eq!(client.finish(&answer), Ok(()));
    }

    #[tokio::test]
    async fn nla_target_closes_on_garbage_and_refuses_ssl_only() {
        let (_fleet, addr) = fleet_of(nla_spec("nla-g", Behavior::NlaHealthy)).await;
        let (mut tls, _) = nla_connect(addr).await;
        // Not a SEQUENCE: closed without an answer.
        assert_eq!(exchange(&mut tls, b"GET / HTTP/1.1\r\n\r\n").await, None);
        // A length above the limit: closed too.
        let (mut tls, _) = nla_connect(addr).await;
        assert_eq!(exchange(&mut tls, &[0x30, 0x84, 0x7f, 0xff, 0xff, 0xff]).await, None);
        let mut ssl_only = CR;
        ssl_only[15] = 0x01;
        let mut s = connect_and_request(addr, &ssl_only).await;
        assert_eq!(read_to_close(&mut s).await[15], 5, "HYBRID_REQUIRED_BY_SERVER");
    }

    #[tokio::test]
    async fn subject_public_key_of_every_variant_matches_x509_parser() {
        for variant in [CertVariant::Valid, CertVariant::Sha1, CertVariant::SelfSignedCa] {
            let der = cert_of(variant).await;
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            let key = credssp::subject_public_key(&der).unwrap();
            assert_eq!(key, cert.public_key().subject_public_key.data.to_vec(), "{variant}");
        }
    }

    #[test]
    fn refusal_codes() {
        assert_eq!(refusal(0x3, 0x1), None);
        assert_eq!(refusal(0x3, 0x2), None);
        assert_eq!(refusal(0x1, 0x2), Some(5));
        assert_eq!(refusal(0x0, 0x1), Some(1));
        assert_eq!(refusal(0x1, 0x0), None);
    }
}
