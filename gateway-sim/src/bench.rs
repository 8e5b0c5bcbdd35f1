//! Closed-loop load: `concurrency` workers each send one Check after another against the healthy
//! targets for `duration`; optionally the same number of workers then perform the same target
//! handshakes directly (TCP + X.224 + TLS, no plugin) so the plugin's overhead is visible.
//!
//! NLA mode ([`BenchMode::Nla`]) checks the `nla_healthy` targets instead, offering SSL and
//! HYBRID so that the plugin runs its CredSSP stage; its baseline adds, after the TLS handshake,
//! one TSRequest { NTLM NEGOTIATE } and reads the TSRequest { CHALLENGE } (with a credential:
//! the whole logon, AUTHENTICATE + pubKeyAuth and the server's pubKeyAuth checked), using the
//! sim's own CredSSP client ([`crate::credssp::client`]), not the plugin's.

use std::{
    collections::BTreeMap, fmt::Write as _, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration,
};

use rdp_preflight_proto::v1::{CheckRequest, Credential, Requester, SecurityProtocol, Target};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
    time::{timeout, Instant},
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::{
    credssp::{self, client::Client},
    driver::{plugin_client, verdict_name, REQUESTER_SOURCE, REQUESTER_USER},
    scenario::{Behavior, CertVariant},
    targets::Fleet,
    wire,
};

/// A target the bench checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BenchTarget {
    /// Name (also the expected certificate name).
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
}

/// The fleet's healthy targets with a valid certificate.
pub fn bench_targets(fleet: &Fleet) -> Vec<BenchTarget> {
    fleet
        .targets()
        .iter()
        .filter(|t| t.behavior == Behavior::Healthy && t.cert == CertVariant::Valid)
        .map(|t| BenchTarget {
            name: t.name.clone(),
            addr: t.addr,
        })
        .collect()
}

/// The fleet's `nla_healthy` targets with a valid certificate (for [`BenchMode::Nla`]).
pub fn nla_bench_targets(fleet: &Fleet) -> Vec<BenchTarget> {
    fleet
        .targets()
        .iter()
        .filter(|t| t.behavior == Behavior::NlaHealthy && t.cert == CertVariant::Valid)
        .map(|t| BenchTarget {
            name: t.name.clone(),
            addr: t.addr,
        })
        .collect()
}

/// An account the NLA targets know, for full logons.
#[derive(Clone, PartialEq, Eq)]
pub struct BenchCredential {
    /// User name.
    pub username: String,
    /// Domain (may be empty).
    pub domain: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for BenchCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchCredential")
            .field("username", &self.username)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// What one operation is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BenchMode {
    /// Checks of `healthy` targets; baseline TCP + X.224 + TLS.
    #[default]
    Tls,
    /// Checks of `nla_healthy` targets offering SSL + HYBRID; baseline TCP + X.224 (HYBRID) +
    /// TLS + NEGOTIATE/CHALLENGE, or with a credential the whole NTLM logon.
    Nla {
        /// Sent with every Check (and used by the baseline); `None`: NEGOTIATE/CHALLENGE only.
        credential: Option<BenchCredential>,
    },
}

impl BenchMode {
    /// `tls`, `nla` or `nla-logon`.
    pub fn name(&self) -> &'static str {
        match self {
            BenchMode::Tls => "tls",
            BenchMode::Nla { credential: None } => "nla",
            BenchMode::Nla { credential: Some(_) } => "nla-logon",
        }
    }

    /// The targets of `fleet` this mode checks.
    pub fn targets(&self, fleet: &Fleet) -> Vec<BenchTarget> {
        match self {
            BenchMode::Tls => bench_targets(fleet),
            BenchMode::Nla { .. } => nla_bench_targets(fleet),
        }
    }

    /// What the baseline does, for the summary.
    pub fn baseline_description(&self) -> &'static str {
        match self {
            BenchMode::Tls => "TCP + X.224 + TLS",
            BenchMode::Nla { credential: None } => "TCP + X.224 (HYBRID) + TLS + NTLM NEGOTIATE/CHALLENGE",
            BenchMode::Nla { credential: Some(_) } => {
                "TCP + X.224 (HYBRID) + TLS + NTLM NEGOTIATE/CHALLENGE/AUTHENTICATE + pubKeyAuth"
            }
        }
    }
}

/// The Check a bench worker sends for operation `i`.
pub fn bench_request(mode: &BenchMode, target: &BenchTarget, i: u64) -> CheckRequest {
    let (requested_protocols, credential) = match mode {
        BenchMode::Tls => (Vec::new(), None),
        BenchMode::Nla { credential } => (
            vec![SecurityProtocol::Ssl as i32, SecurityProtocol::Hybrid as i32],
            credential.as_ref().map(|c| Credential {
                username: c.username.clone(),
                domain: c.domain.clone(),
                password: c.password.clone(),
            }),
        ),
    };
    CheckRequest {
        request_id: format!("bench-{i}"),
        target: Some(Target {
            host: target.addr.ip().to_string(),
            port: u32::from(target.addr.port()),
            expected_name: target.name.clone(),
            requested_protocols,
            ..Default::default()
        }),
        credential,
        requester: Some(Requester {
            user: REQUESTER_USER.to_owned(),
            source_address: REQUESTER_SOURCE.to_owned(),
        }),
    }
}

/// Bench parameters.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// TLS or NLA checks.
    pub mode: BenchMode,
    /// Workers in each phase.
    pub concurrency: usize,
    /// Length of each phase.
    pub duration: Duration,
    /// Deadline of one Check / one direct handshake.
    pub deadline: Duration,
    /// Also run the direct-handshake phase.
    pub baseline: bool,
    /// The plugin's process id, to read its peak RSS.
    pub plugin_pid: Option<u32>,
}

/// Results of one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseStats {
    /// `plugin` or `baseline`.
    pub phase: String,
    /// Operations that completed (a report arrived / the handshake finished).
    pub completed: u64,
    /// Operations that failed, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Verdicts of the completed Checks (empty for the baseline).
    pub verdicts: BTreeMap<String, u64>,
    /// Wall time of the phase, seconds.
    pub elapsed_s: f64,
    /// Completed operations per second.
    pub per_second: f64,
    /// Latency percentiles of completed operations, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl PhaseStats {
    /// Failed operations.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Plugin over baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// Baseline throughput / plugin throughput (how many times slower through the plugin).
    pub throughput: f64,
    /// Plugin p50 / baseline p50.
    pub p50: f64,
    /// Plugin p99 / baseline p99.
    pub p99: f64,
}

/// A whole bench run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// `tls`, `nla` or `nla-logon` ([`BenchMode::name`]).
    pub mode: String,
    /// What the baseline phase does.
    pub baseline_does: String,
    /// Workers per phase.
    pub concurrency: usize,
    /// Seconds per phase.
    pub duration_s: f64,
    /// Targets checked.
    pub targets: Vec<BenchTarget>,
    /// Through the plugin.
    pub plugin: PhaseStats,
    /// Direct handshakes.
    pub baseline: Option<PhaseStats>,
    /// Plugin relative to the baseline.
    pub ratio: Option<Ratio>,
    /// The plugin's VmHWM (peak RSS), KiB.
    pub plugin_peak_rss_kib: Option<u64>,
}

/// The bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// No healthy target to check.
    #[error("no healthy target (behaviour healthy, or nla_healthy for NLA) with a valid certificate to bench against")]
    NoTargets,
    /// Bad plugin endpoint.
    #[error("plugin endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
    /// TLS client configuration.
    #[error("TLS client: {0}")]
    Tls(#[from] rustls::Error),
}

type Op = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send>> + Send + Sync>;

/// Runs the plugin phase, then (if asked) the baseline phase.
pub async fn bench(
    plugin_endpoint: &str,
    targets: &[BenchTarget],
    options: &BenchOptions,
) -> Result<BenchReport, BenchError> {
    if targets.is_empty() {
        return Err(BenchError::NoTargets);
    }
    let client = plugin_client(plugin_endpoint)?;
    let targets_arc: Arc<[BenchTarget]> = targets.into();
    let deadline = options.deadline;

    let plugin_op: Op = {
        let targets = targets_arc.clone();
        let mode = options.mode.clone();
        Arc::new(move |i| {
            let mut client = client.clone();
            let target = &targets[(i as usize) % targets.len()];
            let mut request = tonic::Request::new(bench_request(&mode, target, i));
            Box::pin(async move {
                request.set_timeout(deadline);
                match client.check(request).await {
                    Ok(report) => Ok(Some(verdict_name(report.into_inner().verdict))),
                    Err(status) => Err(format!("grpc_{:?}", status.code()).to_ascii_lowercase()),
                }
            })
        })
    };
    let plugin = run_phase("plugin", options.concurrency, options.duration, plugin_op).await;
    let plugin_peak_rss_kib = options.plugin_pid.and_then(|pid| peak_rss_kib(pid).ok().flatten());

    let baseline = if options.baseline {
        let connector = TlsConnector::from(permissive_client_config()?);
        let targets = targets_arc.clone();
        let mode = options.mode.clone();
        let op: Op = Arc::new(move |i| {
            let connector = connector.clone();
            let target = targets[(i as usize) % targets.len()].clone();
            let mode = mode.clone();
            Box::pin(async move {
                let work = async {
                    match &mode {
                        BenchMode::Tls => direct_handshake(&connector, &target).await,
                        BenchMode::Nla { credential } => direct_nla(&connector, &target, credential.as_ref()).await,
                    }
                };
                timeout(deadline, work)
                    .await
                    .map_err(|_| "timeout".to_owned())?
                    .map(|()| None)
            })
        });
        Some(run_phase("baseline", options.concurrency, options.duration, op).await)
    } else {
        None
    };

    let ratio = baseline.as_ref().map(|b| Ratio {
        throughput: safe_div(b.per_second, plugin.per_second),
        p50: safe_div(plugin.p50_ms, b.p50_ms),
        p99: safe_div(plugin.p99_ms, b.p99_ms),
    });
    Ok(BenchReport {
        mode: options.mode.name().to_owned(),
        baseline_does: options.mode.baseline_description().to_owned(),
        concurrency: options.concurrency,
        duration_s: options.duration.as_secs_f64(),
        targets: targets.to_vec(),
        plugin,
        baseline,
        ratio,
        plugin_peak_rss_kib,
    })
}

fn safe_div(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

async fn run_phase(name: &str, concurrency: usize, duration: Duration, op: Op) -> PhaseStats {
    let concurrency = concurrency.max(1);
    let started = Instant::now();
    let end = started + duration;
    let mut workers = JoinSet::new();
    for w in 0..concurrency {
        let op = op.clone();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut verdicts: BTreeMap<String, u64> = BTreeMap::new();
            let mut i = w as u64;
            while Instant::now() < end {
                let t0 = Instant::now();
                match op(i).await {
                    Ok(verdict) => {
                        latencies.push(t0.elapsed());
                        if let Some(v) = verdict {
                            *verdicts.entry(v).or_default() += 1;
                        }
                    }
                    Err(kind) => *errors.entry(kind).or_default() += 1,
                }
                i += concurrency as u64;
            }
            (latencies, errors, verdicts)
        });
    }
    let mut stats = PhaseStats {
        phase: name.to_owned(),
        ..Default::default()
    };
    let mut latencies = Vec::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((l, e, v)) => {
                latencies.extend(l);
                for (k, n) in e {
                    *stats.errors.entry(k).or_default() += n;
                }
                for (k, n) in v {
                    *stats.verdicts.entry(k).or_default() += n;
                }
            }
            Err(e) => *stats.errors.entry(format!("worker: {e}")).or_default() += 1,
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    stats.completed = latencies.len() as u64;
    stats.elapsed_s = elapsed.as_secs_f64();
    stats.per_second = stats.completed as f64 / stats.elapsed_s.max(1e-9);
    stats.p50_ms = percentile_ms(&latencies, 0.50);
    stats.p90_ms = percentile_ms(&latencies, 0.90);
    stats.p99_ms = percentile_ms(&latencies, 0.99);
    stats.max_ms = latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    stats
}

/// Nearest-rank percentile of sorted latencies, in milliseconds.
fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

/// What the plugin's target probe does, without the plugin: TCP connect (TCP_NODELAY), X.224
/// request/confirm, TLS handshake (certificate not verified, handshake signature verified).
async fn direct_handshake(connector: &TlsConnector, target: &BenchTarget) -> Result<(), String> {
    let (mut tls, _) = connect_tls(connector, target).await?;
    let _ = tls.shutdown().await;
    Ok(())
}

/// [`direct_handshake`], then the CredSSP exchange: TSRequest { NEGOTIATE } and the
/// TSRequest { CHALLENGE } read and parsed; with a credential also TSRequest { AUTHENTICATE,
/// pubKeyAuth, clientNonce } and the server's pubKeyAuth checked (no TSCredentials, as the plugin
/// sends none).
async fn direct_nla(
    connector: &TlsConnector,
    target: &BenchTarget,
    credential: Option<&BenchCredential>,
) -> Result<(), String> {
    let (mut tls, selected) = connect_tls(connector, target).await?;
    if selected != wire::PROTOCOL_HYBRID {
        return Err(format!("x224 selected {selected}, not HYBRID"));
    }
    let public_key = match credential {
        Some(_) => {
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or("tls: no server certificate")?;
            credssp::subject_public_key(cert).map_err(|e| format!("certificate: {e}"))?
        }
        None => Vec::new(),
    };
    let mut client = match credential {
        Some(c) => Client::new(&c.username, &c.domain, &c.password, public_key),
        None => Client::new("", "", "", public_key),
    };
    let challenge = exchange(&mut tls, &client.negotiate(), "negotiate").await?;
    match credential {
        None => {
            client.challenge(&challenge).map_err(|e| format!("challenge: {e}"))?;
        }
        Some(_) => {
            let authenticate = client.authenticate(&challenge).map_err(|e| format!("challenge: {e}"))?;
            let answer = exchange(&mut tls, &authenticate, "authenticate").await?;
            client.finish(&answer).map_err(|e| format!("logon: {e}"))?;
        }
    }
    let _ = tls.shutdown().await;
    Ok(())
}

/// Writes one TSRequest and reads the answer.
async fn exchange(tls: &mut TlsStream<TcpStream>, request: &[u8], step: &str) -> Result<Vec<u8>, String> {
    tls.write_all(request)
        .await
        .map_err(|e| format!("{step} write: {:?}", e.kind()))?;
    tls.flush().await.map_err(|e| format!("{step} write: {:?}", e.kind()))?;
    read_ts_request(tls).await.map_err(|e| format!("{step} answer: {e}"))
}

/// Reads one DER-framed TSRequest.
async fn read_ts_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(512);
    let total = loop {
        if let Some(total) = credssp::frame_length(&buf).map_err(|e| e.to_string())? {
            break total;
        }
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| format!("{:?}", e.kind()))?;
        buf.push(byte[0]);
    };
    let have = buf.len();
    buf.resize(total.max(have), 0);
    stream
        .read_exact(&mut buf[have..])
        .await
        .map_err(|e| format!("{:?}", e.kind()))?;
    Ok(buf)
}

/// TCP connect (TCP_NODELAY), X.224 request (SSL | HYBRID) / confirm, TLS handshake. Returns
/// the stream and the confirm's selectedProtocol.
async fn connect_tls(connector: &TlsConnector, target: &BenchTarget) -> Result<(TlsStream<TcpStream>, u32), String> {
    let mut tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect: {:?}", e.kind()))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {:?}", e.kind()))?;
    tcp.write_all(&wire::connection_request(wire::PROTOCOL_SSL | wire::PROTOCOL_HYBRID))
        .await
        .map_err(|e| format!("x224 write: {:?}", e.kind()))?;
    let mut confirm = [0u8; 19];
    tcp.read_exact(&mut confirm)
        .await
        .map_err(|e| format!("x224 read: {:?}", e.kind()))?;
    // offset 5: CC; offset 11: RDP_NEG_RSP
    if confirm[5] & 0xf0 != 0xd0 || confirm[11] != 0x02 {
        return Err("x224 not a confirm".to_owned());
    }
    let selected = u32::from_le_bytes([confirm[15], confirm[16], confirm[17], confirm[18]]);
    let name = ServerName::try_from(target.name.clone()).unwrap_or(ServerName::IpAddress(target.addr.ip().into()));
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {:?}", e.kind()))?;
    Ok((tls, selected))
}

/// A client config that accepts any certificate (still verifying the handshake signature) and
/// never resumes: every handshake a full one.
pub(crate) fn permissive_client_config() -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider)))
        .with_no_client_auth();
    // Every handshake a full one, as the plugin's probe does.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts any certificate; still verifies the handshake signature.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// VmHWM (peak resident set) of a process, in KiB, from /proc/PID/status.
pub fn peak_rss_kib(pid: u32) -> std::io::Result<Option<u64>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
}

/// The human summary.
pub fn format_bench(report: &BenchReport) -> String {
    let mut out = String::new();
    let names: Vec<_> = report
        .targets
        .iter()
        .map(|t| format!("{} {}", t.name, t.addr))
        .collect();
    let _ = writeln!(out, "mode: {}; targets: {}", report.mode, names.join(", "));
    let _ = writeln!(
        out,
        "concurrency {}, {:.1} s per phase",
        report.concurrency, report.duration_s
    );
    let _ = writeln!(
        out,
        "{:<9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "phase", "completed", "per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "errors"
    );
    for p in std::iter::once(&report.plugin).chain(report.baseline.as_ref()) {
        let _ = writeln!(
            out,
            "{:<9} {:>9} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            p.phase,
            p.completed,
            p.per_second,
            p.p50_ms,
            p.p90_ms,
            p.p99_ms,
            p.max_ms,
            p.error_count()
        );
        for (kind, n) in &p.errors {
            let _ = writeln!(out, "  {} error {kind}: {n}", p.phase);
        }
    }
    if !report.plugin.verdicts.is_empty() {
        let v: Vec<_> = report.plugin.verdicts.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(out, "plugin verdicts: {}", v.join(", "));
    }
    if report.baseline.is_some() {
        let _ = writeln!(out, "baseline: {}", report.baseline_does);
    }
    if let Some(r) = &report.ratio {
        let _ = writeln!(
            out,
            "direct / plugin throughput {:.2}x; plugin / direct latency p50 {:.2}x, p99 {:.2}x",
            r.throughput, r.p50, r.p99
        );
    }
    if let Some(kib) = report.plugin_peak_rss_kib {
        let _ = writeln!(out, "plugin peak RSS (VmHWM): {:.1} MiB", kib as f64 / 1024.0);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{scenario::TargetSpec, targets::start_fleet};

    #[test]
    fn percentiles_use_nearest_rank() {
        let l: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&l, 0.5), 50.0);
        assert_eq!(percentile_ms(&l, 0.99), 99.0);
        assert_eq!(percentile_ms(&l, 1.0), 100.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }

    #[test]
    fn reads_own_peak_rss() {
        let kib = peak_rss_kib(std::process::id()).unwrap().unwrap();
        assert!(kib > 0);
    }

    fn nla_target_with(account: &str, password: &str) -> TargetSpec {
        let mut t = TargetSpec::new("bench-nla", Behavior::NlaHealthy);
        t.nla.accounts = vec![crate::scenario::Account {
            name: account.to_owned(),
            password: password.to_owned(),
            state: "good".to_owned(),
            domain: None,
        }];
        t
    }

    fn credential(user: &str, password: &str) -> BenchCredential {
        BenchCredential {
            username: user.to_owned(),
            domain: String::new(),
            password: password.to_owned(),
        }
    }

    #[test]
    fn nla_checks_offer_hybrid_and_carry_the_credential() {
        let target = BenchTarget {
            name: "bench-nla".to_owned(),
            addr: "127.0.0.1:3389".parse().unwrap(),
        };
        let tls = bench_request(&BenchMode::Tls, &target, 7);
        assert_eq!(tls.request_id, "bench-7");
        assert!(tls.target.unwrap().requested_protocols.is_empty());
        assert!(tls.credential.is_none());

        let nla = bench_request(&BenchMode::Nla { credential: None }, &target, 1);
        let t = nla.target.unwrap();
        let offered = vec![SecurityProtocol::Ssl as i32, SecurityProtocol::Hybrid as i32];
        assert_eq!(t.requested_protocols, offered);
        assert_eq!(
            (t.host.as_str(), t.port, t.expected_name.as_str()),
            ("127.0.0.1", 3389, "bench-nla")
        );
        assert!(nla.credential.is_none());

        let mode = BenchMode::Nla {
            credential: Some(credential("nina", "Nla-Pass-1")),
        };
        let c = bench_request(&mode, &target, 2).credential.unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("nina", "Nla-Pass-1"));
        assert_eq!(mode.name(), "nla-logon");
        assert!(!format!("{mode:?}").contains("Nla-Pass-1"));
    }

    #[tokio::test]
    async fn nla_targets_are_the_nla_healthy_ones() {
        let fleet = start_fleet(&[
            TargetSpec::new("bench-healthy", Behavior::Healthy),
            nla_target_with("nina", "Nla-Pass-1"),
            TargetSpec::new("bench-nla-error", Behavior::NlaError),
        ])
        .await
        .unwrap();
        let names = |v: Vec<BenchTarget>| v.into_iter().map(|t| t.name).collect::<Vec<_>>();
        assert_eq!(names(BenchMode::Tls.targets(&fleet)), ["bench-healthy"]);
        assert_eq!(
            names(BenchMode::Nla { credential: None }.targets(&fleet)),
            ["bench-nla"]
        );
    }

    #[tokio::test]
    async fn nla_baseline_exchanges_and_logs_on_directly() {
        let fleet = start_fleet(&[nla_target_with("nina", "Nla-Pass-1")]).await.unwrap();
        let targets = nla_bench_targets(&fleet);
        let connector = TlsConnector::from(permissive_client_config().unwrap());
        direct_nla(&connector, &targets[0], None).await.unwrap();
        direct_nla(&connector, &targets[0], Some(&credential("nina", "Nla-Pass-1")))
            .await
            .unwrap();
        let refused = direct_nla(&connector, &targets[0], Some(&credential("nina", "wrong")))
            .await
            .unwrap_err();
        assert!(refused.contains("0xc000006d"), "{refused}");
        // A TLS-only target selects SSL: the NLA baseline says so instead of hanging.
        let tls_fleet = start_fleet(&[TargetSpec::new("bench-healthy", Behavior::Healthy)])
            .await
            .unwrap();
        let err = direct_nla(&connector, &bench_targets(&tls_fleet)[0], None)
            .await
            .unwrap_err();
        assert!(err.contains("not HYBRID"), "{err}");

        let options = BenchOptions {
            mode: BenchMode::Nla { credential: None },
            concurrency: 2,
            duration: Duration::from_millis(300),
            deadline: Duration::from_millis(500),
            baseline: true,
            plugin_pid: None,
        };
        let report = bench("http://127.0.0.1:1", &targets, &options).await.unwrap();
        assert_eq!(report.mode, "nla");
        let baseline = report.baseline.clone().unwrap();
        assert!(baseline.completed > 0 && baseline.error_count() == 0, "{baseline:?}");
        assert!(format_bench(&report).contains("NEGOTIATE/CHALLENGE"));
    }

    #[tokio::test]
    async fn baseline_handshakes_complete_against_a_healthy_target() {
        let fleet = start_fleet(&[TargetSpec::new("bench-healthy", Behavior::Healthy)])
            .await
            .unwrap();
        let targets = bench_targets(&fleet);
        assert_eq!(targets.len(), 1);
        let connector = TlsConnector::from(permissive_client_config().unwrap());
        direct_handshake(&connector, &targets[0]).await.unwrap();
        // The phase loop is bounded by its duration even with a plugin that is not there.
        let options = BenchOptions {
            mode: BenchMode::Tls,
            concurrency: 2,
            duration: Duration::from_millis(300),
            deadline: Duration::from_millis(500),
            baseline: true,
            plugin_pid: None,
        };
        let started = Instant::now();
        let report = bench("http://127.0.0.1:1", &targets, &options).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(report.plugin.completed, 0);
        assert!(report.plugin.error_count() > 0);
        let baseline = report.baseline.unwrap();
        assert!(baseline.completed > 0 && baseline.error_count() == 0, "{baseline:?}");
        assert!(format_bench(&BenchReport {
            baseline: Some(baseline),
            ..report
        })
        .contains("baseline"));
    }
}
