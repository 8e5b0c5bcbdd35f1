//! Closed-loop load: `concurrency` workers each send one Check after another against the healthy
//! targets for `duration`; optionally the same number of workers then perform the same target
//! handshakes directly (TCP + X.224 + TLS, no plugin) so the plugin's overhead is visible.

use std::{
    collections::BTreeMap, fmt::Write as _, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration,
};

use rdp_preflight_proto::v1::{CheckRequest, Requester, Target};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
    time::{timeout, Instant},
};
use tokio_rustls::TlsConnector;

use crate::{
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

/// Bench parameters.
#[derive(Clone, Debug)]
pub struct BenchOptions {
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
    #[error("no healthy target with a valid certificate to bench against")]
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
        Arc::new(move |i| {
            let mut client = client.clone();
            let target = targets[(i as usize) % targets.len()].clone();
            Box::pin(async move {
                let mut request = tonic::Request::new(CheckRequest {
                    request_id: format!("bench-{i}"),
                    target: Some(Target {
                        host: target.addr.ip().to_string(),
                        port: u32::from(target.addr.port()),
                        expected_name: target.name.clone(),
                        ..Default::default()
                    }),
                    credential: None,
                    requester: Some(Requester {
                        user: REQUESTER_USER.to_owned(),
                        source_address: REQUESTER_SOURCE.to_owned(),
                    }),
                });
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
        let op: Op = Arc::new(move |i| {
            let connector = connector.clone();
            let target = targets[(i as usize) % targets.len()].clone();
            Box::pin(async move {
                timeout(deadline, direct_handshake(&connector, &target))
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
    let name = ServerName::try_from(target.name.clone()).unwrap_or(ServerName::IpAddress(target.addr.ip().into()));
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {:?}", e.kind()))?;
    let _ = tls.shutdown().await;
    Ok(())
}

fn permissive_client_config() -> Result<Arc<ClientConfig>, rustls::Error> {
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
    let _ = writeln!(out, "targets: {}", names.join(", "));
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
