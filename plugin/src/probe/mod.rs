//! The target probe: policy → resolve → tcp → x224 → tls → cert → network.
//!
//! One file per stage: [`tcp`], [`negotiate`] (the X.224 exchange and a pure judgement of the
//! confirm), [`handshake`] (the TLS driver; classification in [`tls`]), [`cert`] (pure),
//! [`network`] (pure). This module runs them in order under the check's [`Budget`], keeps one
//! [`StageLog`] (a stage not reached is reported as not run by construction) and retries once
//! after a failure that flapping paths produce. The TLS stage hands its stream on in
//! [`ProbeOutcome::tls`], so a later stage (NLA) continues on the same connection.

pub mod cert;
pub mod handshake;
pub mod negotiate;
pub mod network;
pub mod pins;
pub mod resolve;
pub mod tcp;
pub mod tls;
pub mod x224;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::{net::TcpStream, time::Instant};

use crate::{
    cause::{Cause, Stage},
    config::Config,
    deadline::{deadline_finding, Budget, Expired},
    report::{Finding, StageLog, StageRecord, StageStatus, StageTimer, TargetFacts},
};

/// The TLS stream a successful TLS stage hands on.
pub type TlsStream = tokio_rustls::client::TlsStream<tls::Recorder<TcpStream>>;

/// The probe's stages, in order.
pub const STAGES: [Stage; 7] = [
    Stage::Policy,
    Stage::Resolve,
    Stage::Tcp,
    Stage::X224,
    Stage::Tls,
    Stage::Cert,
    Stage::Network,
];

/// What to probe.
#[derive(Clone, Debug)]
pub struct ProbeRequest {
    /// Host name or IP literal.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Name the certificate must carry.
    pub expected_name: String,
    /// requestedProtocols to send.
    pub requested: u32,
    /// Weakest acceptable selection.
    pub minimum: Option<u32>,
    /// `Cookie: mstshash=` value for the Connection Request (`None`: no cookie line).
    pub cookie: Option<String>,
}

/// What the probe found.
#[derive(Debug, Default)]
pub struct ProbeOutcome {
    /// Findings (severity applied later).
    pub findings: Vec<Finding>,
    /// Stage records in order: policy, resolve, tcp, x224, tls, cert, network.
    pub stages: Vec<StageRecord>,
    /// Facts.
    pub facts: TargetFacts,
    /// The TLS stream, when the TLS stage succeeded and nothing before it denied.
    pub tls: Option<TlsStream>,
    /// The server's end-entity certificate (its public key binds CredSSP).
    pub server_cert: Option<CertificateDer<'static>>,
    /// What the pin store said of that certificate.
    pub pin: pins::PinStatus,
    /// Our own side failed (an "impossible" state, an encoding or library error): the check
    /// cannot give a verdict, and the gateway gets an internal error rather than a target
    /// cause.
    pub internal: Option<String>,
}

/// Runs probes; one per process, shared by all checks.
pub struct Prober {
    cfg: Arc<Config>,
    provider: Arc<CryptoProvider>,
    pins: pins::PinStore,
    in_flight: AtomicUsize,
}

/// A stage that failed: its finding, and whether the check's own budget ran out.
struct Failed {
    finding: Finding,
    deadline: bool,
}

impl Failed {
    fn expired(which: Expired, stage: Stage, budget: &Budget, stage_finding: impl FnOnce() -> Finding) -> Failed {
        match which {
            Expired::Check => Failed {
                finding: deadline_finding(stage, budget),
                deadline: true,
            },
            Expired::Stage => Failed {
                finding: stage_finding(),
                deadline: false,
            },
        }
    }
}

/// One TCP + X.224 + TLS attempt.
#[derive(Default)]
struct Attempt {
    findings: Vec<Finding>,
    stages: Vec<StageRecord>,
    /// Why the attempt stopped before the end, for the stages it did not reach.
    stopped: Option<&'static str>,
    connected: Option<SocketAddr>,
    negotiated: negotiate::Judgement,
    tls_version: String,
    cipher: String,
    chain: Vec<CertificateDer<'static>>,
    tls: Option<TlsStream>,
    verifier_refusal: Option<String>,
    tcp_rtt: Option<Duration>,
    x224_rtt: Option<Duration>,
    scheduler_lag: Duration,
    /// The first deny-worthy failure.
    failure: Option<Cause>,
    deadline_hit: bool,
    internal: Option<String>,
}

impl Attempt {
    fn fail(&mut self, f: Failed, why: &'static str) {
        self.failure = Some(f.finding.cause);
        self.deadline_hit |= f.deadline;
        self.findings.push(f.finding);
        self.stopped = Some(why);
    }
}

const TRANSIENT: [Cause; 3] = [
    Cause::X224Closed,
    Cause::TlsClosedDuringHandshake,
    Cause::TcpUnreachable,
];

/// Counts a probe in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Prober {
    /// A prober with the process-wide crypto provider and pin store.
    pub fn new(cfg: Arc<Config>) -> Result<Prober, String> {
        Prober::with_store(cfg, None)
    }

    /// As [`Prober::new`]; with the shared store and `cert.pin_store = "auto"`, pins live in
    /// the store.
    pub fn with_store(cfg: Arc<Config>, store: Option<Arc<crate::store::Store>>) -> Result<Prober, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pins = match store {
            Some(s) if cfg.file.cert.pin_store == "auto" => pins::PinStore::shared(cfg.pins.clone(), s),
            _ => pins::PinStore::open(&cfg.pin_store, cfg.pins.clone())?,
        };
        Ok(Prober {
            cfg,
            provider,
            pins,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// The pin store.
    pub fn pins(&self) -> &pins::PinStore {
        &self.pins
    }

    /// True when the finding denies the session at its effective severity.
    fn denies(&self, f: &Finding) -> bool {
        self.cfg.severity(f.cause) == crate::cause::Severity::Deny
    }

    /// Probes one target.
    pub async fn probe(&self, req: &ProbeRequest, budget: &Budget) -> ProbeOutcome {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _counted = InFlight(&self.in_flight);
        let mut log = StageLog::new(&STAGES);
        let mut out = ProbeOutcome {
            facts: TargetFacts {
                host: req.host.clone(),
                port: req.port,
                requested_protocols: req.requested,
                ..TargetFacts::default()
            },
            ..ProbeOutcome::default()
        };
        self.run(req, budget, &mut log, &mut out).await;
        out.stages = log.finish(budget.elapsed());
        out
    }

    async fn run(&self, req: &ProbeRequest, budget: &Budget, log: &mut StageLog, out: &mut ProbeOutcome) {
        // Policy on the name and port.
        let policy = StageTimer::start(Stage::Policy, budget.elapsed());
        if let Err(r) = self.cfg.policy.check_name(&req.host, req.port) {
            out.findings.push(policy_finding(&req.host, &r));
            log.set(policy.record(StageStatus::Failed, r.reason));
            log.stop("target refused by policy");
            return;
        }

        // Resolve.
        let resolve = StageTimer::start(Stage::Resolve, budget.elapsed());
        let addrs = match budget
            .run(self.cfg.resolve_timeout, resolve::resolve(&req.host, req.port))
            .await
        {
            Ok(Ok((addrs, literal))) => {
                let detail = if literal {
                    "IP literal: no DNS lookup".to_owned()
                } else {
                    format!("{} address(es)", addrs.len())
                };
                log.set(resolve.record(StageStatus::Ok, detail));
                addrs
            }
            Ok(Err(e)) => {
                out.findings.push(e.finding(&req.host));
                log.set(policy.record(StageStatus::Ok, "name and port allowed"));
                log.set(resolve.record(StageStatus::Failed, e.to_string()));
                log.stop("name did not resolve");
                return;
            }
            Err(which) => {
                out.findings.push(match which {
                    Expired::Check => deadline_finding(Stage::Resolve, budget),
                    Expired::Stage => Finding::new(
                        Cause::ResolveFailed,
                        format!("the resolver did not answer for {:?} in time", req.host),
                    )
                    .with("timeout_ms", self.cfg.resolve_timeout.as_millis()),
                });
                log.set(policy.record(StageStatus::Ok, "name and port allowed"));
                log.set(resolve.record(StageStatus::Failed, "timed out"));
                log.stop("name did not resolve");
                return;
            }
        };
        out.facts.resolved = addrs.clone();

        // Policy on every resolved address.
        if let Some(r) = addrs.iter().find_map(|a| self.cfg.policy.check_addr(a.ip()).err()) {
            out.findings
                .push(policy_finding(&req.host, &r).with("resolved", join(&addrs)));
            log.set(policy.record(StageStatus::Failed, r.reason));
            log.stop("target refused by policy");
            return;
        }
        log.set(policy.record(StageStatus::Ok, "target allowed"));

        // TCP + X.224 + TLS, retried once quickly after a failure that flapping paths produce.
        let cr = match x224::encode_connection_request(req.cookie.as_deref(), req.requested) {
            Ok(b) => b,
            Err(e) => {
                // The cookie is checked before the probe; a request that still fails to encode
                // is our error, not the target's.
                out.internal = Some(format!("the connection request could not be encoded: {e}"));
                log.stop("internal error");
                return;
            }
        };
        let mut attempt = self.attempt(req, &addrs, &cr, budget).await;
        let mut unstable = Vec::new();
        if self.cfg.retry_transient
            && !attempt.deadline_hit
            && attempt.failure.is_some_and(|c| TRANSIENT.contains(&c))
            && budget.remaining() > Duration::from_millis(200)
        {
            let first = attempt.failure;
            let second = self.attempt(req, &addrs, &cr, budget).await;
            if second.failure != first && !second.deadline_hit {
                unstable.push(
                    Finding::new(
                        Cause::NetUnstable,
                        "two attempts within one check disagreed: the path or the target is flapping",
                    )
                    .with("first_attempt", first.map_or("ok".to_owned(), |c| c.name().to_owned()))
                    .with(
                        "second_attempt",
                        second.failure.map_or("ok".to_owned(), |c| c.name().to_owned()),
                    ),
                );
                attempt = second;
            } else {
                attempt
                    .findings
                    .iter_mut()
                    .for_each(|f| f.evidence.push(("retried".into(), "same result".into())));
            }
        }
        out.facts.connected = attempt.connected;
        out.facts.selected_protocol = attempt.negotiated.selected;
        out.facts.negotiation_flags = attempt.negotiated.flags;
        out.facts.negotiation_failure_code = attempt.negotiated.failure_code;
        out.facts.tls_version = std::mem::take(&mut attempt.tls_version);
        out.facts.cipher_suite = std::mem::take(&mut attempt.cipher);
        for r in attempt.stages.drain(..) {
            log.set(r);
        }
        out.findings.append(&mut attempt.findings);
        if let Some(msg) = attempt.internal.take() {
            out.internal = Some(msg);
            log.stop("internal error");
            return;
        }
        if let Some(why) = attempt.stopped {
            log.stop(why);
        }

        // Certificate.
        let cert_timer = StageTimer::start(Stage::Cert, budget.elapsed());
        if attempt.chain.is_empty() {
            if log.stopped().is_none() {
                log.set(cert_timer.record(StageStatus::NotRun, "no certificate received"));
            }
        } else {
            let record = self.cert_stage(req, &mut attempt, out, &cert_timer).await;
            log.set(record);
        }

        // Network quality, from the round trips that say something about the path.
        let net_timer = StageTimer::start(Stage::Network, budget.elapsed());
        let judged = network::judge(&network::Inputs {
            tcp_connect: attempt.tcp_rtt,
            x224_round_trip: attempt.x224_rtt,
            load: network::Load {
                probes_in_flight: self.in_flight.load(Ordering::Relaxed),
                scheduler_lag: attempt.scheduler_lag,
            },
            high_latency: self.cfg.high_latency,
            retransmission: self.cfg.retransmission,
        });
        match judged {
            Some((mut found, detail)) => {
                found.splice(0..0, unstable);
                let status = if found.is_empty() {
                    StageStatus::Ok
                } else {
                    StageStatus::Failed
                };
                log.set(net_timer.record(status, detail));
                out.findings.extend(found);
            }
            None if !unstable.is_empty() => {
                log.set(net_timer.record(StageStatus::Failed, "attempts disagreed"));
                out.findings.extend(unstable);
            }
            None => {
                if log.stopped().is_none() {
                    log.set(net_timer.record(StageStatus::NotRun, "no round trips measured"));
                }
            }
        }
        // Hand the stream on only when nothing so far denies the session.
        if !out.findings.iter().any(|f| self.denies(f)) {
            out.tls = attempt.tls.take();
        }
    }

    /// The cert stage: analysis, pins, and the verifier's refusal of a key it cannot check.
    async fn cert_stage(
        &self,
        req: &ProbeRequest,
        attempt: &mut Attempt,
        out: &mut ProbeOutcome,
        timer: &StageTimer,
    ) -> StageRecord {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let inputs = cert::Inputs {
            expected_name: &req.expected_name,
            now,
            expiring_window: self.cfg.expiring_window,
            anchors: &self.cfg.trust_anchors,
        };
        let (facts, mut found) = cert::analyse(&attempt.chain, &inputs);
        if let Some(refusal) = attempt.verifier_refusal.take() {
            found = refused_signature(found, &facts, &refusal);
        }
        if let Some(addr) = attempt.connected {
            let key = pins::target_key(addr);
            let mut names = vec![pins::name_key(&req.host, req.port)];
            if req.expected_name != req.host {
                names.push(pins::name_key(&req.expected_name, req.port));
            }
            let (pin, mismatch) = self
                .pins
                .check_shared(&key, &names, &facts.sha256_fingerprint, &req.expected_name)
                .await;
            out.pin = pin;
            if let Some(f) = mismatch {
                found.push(
                    f.with("target", &key)
                        .with("expected_name", &req.expected_name)
                        .with("dialled", format!("{}:{}", req.host, req.port)),
                );
            }
        }
        let failed = found.iter().any(|f| self.denies(f));
        let detail = format!(
            "{} {}, {} finding(s)",
            facts.key_type,
            facts.signature_algorithm,
            found.len()
        );
        out.facts.certificate = Some(facts);
        out.findings.extend(found);
        out.server_cert = attempt.chain.first().cloned();
        timer.record(if failed { StageStatus::Failed } else { StageStatus::Ok }, detail)
    }

    async fn attempt(&self, req: &ProbeRequest, addrs: &[SocketAddr], cr: &[u8], budget: &Budget) -> Attempt {
        let mut a = Attempt::default();

        // TCP.
        let timer = StageTimer::start(Stage::Tcp, budget.elapsed());
        let tcp = match budget.run(self.cfg.tcp_timeout, tcp::connect_any(addrs)).await {
            Ok(Ok(c)) => c,
            Ok(Err(tcp::ConnectError::Ours(msg))) => {
                a.stages.push(timer.record(StageStatus::Failed, "internal error"));
                a.internal = Some(msg);
                return a;
            }
            Ok(Err(tcp::ConnectError::Target(addr, e))) => {
                a.stages.push(timer.record(StageStatus::Failed, e.to_string()));
                a.fail(
                    Failed {
                        finding: tcp::finding(addr, &e),
                        deadline: false,
                    },
                    "TCP connect failed",
                );
                return a;
            }
            Err(which) => {
                a.stages.push(timer.record(StageStatus::Failed, "timed out"));
                a.fail(
                    Failed::expired(which, Stage::Tcp, budget, || tcp::timeout_finding(addrs)),
                    "TCP connect failed",
                );
                return a;
            }
        };
        a.connected = Some(tcp.addr);
        a.tcp_rtt = Some(tcp.rtt);
        a.stages
            .push(timer.record(StageStatus::Ok, format!("connected to {}", tcp.addr)));
        let mut stream = tcp.stream;

        // X.224.
        let timer = StageTimer::start(Stage::X224, budget.elapsed());
        let mut progress = negotiate::Progress::default();
        let answer = budget
            .run(
                self.cfg.x224_timeout,
                negotiate::exchange(&mut stream, cr, &mut progress),
            )
            .await;
        a.x224_rtt = progress.round_trip;
        a.scheduler_lag = scheduler_lag().await;
        let pdu = match answer {
            Ok(Ok(pdu)) => pdu,
            Ok(Err(e)) => {
                a.stages
                    .push(timer.record(StageStatus::Failed, "no valid connection confirm"));
                a.fail(
                    Failed {
                        finding: e.finding(),
                        deadline: false,
                    },
                    "X.224 negotiation failed",
                );
                return a;
            }
            Err(which) => {
                a.stages.push(timer.record(StageStatus::Failed, "timed out"));
                let got = std::mem::take(&mut progress.got);
                a.fail(
                    Failed::expired(which, Stage::X224, budget, || {
                        if got.first().is_some_and(|b| *b != 0x03) {
                            negotiate::not_rdp_finding(&got, "not a TPKT header, then nothing more")
                        } else {
                            Finding::new(
                                Cause::X224Timeout,
                                "the target accepted TCP but sent no X.224 Connection Confirm before the stage deadline",
                            )
                            .with("timeout_ms", self.cfg.x224_timeout.as_millis())
                            .with("bytes_received", got.len())
                            .with("cookie_sent", req.cookie.is_some())
                        }
                    }),
                    "X.224 negotiation failed",
                );
                return a;
            }
        };
        a.negotiated = negotiate::judge(req.requested, req.minimum, pdu, &progress.got);
        let findings = std::mem::take(&mut a.negotiated.findings);
        let deny = findings.iter().find(|f| self.denies(f)).map(|f| f.cause);
        a.stages.push(timer.record(
            if deny.is_some() {
                StageStatus::Failed
            } else {
                StageStatus::Ok
            },
            a.negotiated.detail.clone(),
        ));
        a.findings.extend(findings);
        if deny.is_some() {
            a.failure = deny;
            a.stopped = Some("X.224 negotiation failed");
            return a;
        }

        // TLS, on the same socket, when the selected protocol runs inside TLS.
        let timer = StageTimer::start(Stage::Tls, budget.elapsed());
        let selected = a.negotiated.selected.unwrap_or(x224::protocol::RDP);
        if !x224::protocol::uses_tls(selected) {
            a.stages.push(timer.record(
                StageStatus::Skipped,
                format!("{} selected: no TLS", x224::protocol::name(selected)),
            ));
            a.stopped = Some("no TLS selected");
            return a;
        }
        let server_name = if sni_name_ok(&req.expected_name) {
            ServerName::try_from(req.expected_name.clone()).ok()
        } else {
            None
        }
        .unwrap_or_else(|| ServerName::IpAddress(tcp.addr.ip().into()));
        let h = handshake::run(
            stream,
            handshake::Params {
                provider: &self.provider,
                server_name,
                connected: tcp.addr,
                connection_request: cr,
                timeout: self.cfg.tls_timeout,
                x224_round_trip: a.x224_rtt,
            },
            budget,
        )
        .await;
        a.chain = h.chain;
        a.tls_version = h.version;
        a.cipher = h.cipher;
        if let Some(msg) = h.internal {
            a.stages.push(timer.record(StageStatus::Failed, "internal error"));
            a.internal = Some(msg);
            return a;
        }
        if let Some(r) = h.verifier_refusal {
            // Ours, not the target's: the cert stage reports it; later stages still run.
            a.stages.push(timer.record(StageStatus::Failed, h.detail));
            a.verifier_refusal = Some(r);
            return a;
        }
        match h.finding {
            Some(f) => {
                a.stages.push(timer.record(StageStatus::Failed, h.detail));
                a.fail(
                    Failed {
                        finding: f,
                        deadline: h.deadline_hit,
                    },
                    "TLS handshake failed",
                );
            }
            None => {
                a.stages.push(timer.record(StageStatus::Ok, h.detail));
                a.tls = h.stream;
            }
        }
        a
    }
}

/// The finding for a handshake signature our verifier refused: a key our TLS library cannot
/// check (RSA below 2048 bits and the like) is CERT_WEAK with that evidence, merged into the
/// analysis' own CERT_WEAK when there is one. A key it can check whose signature does not
/// verify means the server does not hold the certificate's key.
fn refused_signature(mut found: Vec<Finding>, facts: &crate::report::CertFacts, refusal: &str) -> Vec<Finding> {
    let uncheckable = (facts.key_type == "RSA" && !(2048..=8192).contains(&facts.key_bits))
        || !matches!(facts.key_type.as_str(), "RSA" | "EC P-256" | "EC P-384" | "Ed25519");
    let evidence = |f: Finding| {
        f.with("key_bits", facts.key_bits)
            .with("key_type", &facts.key_type)
            .with("handshake_signature", "not checkable by the plugin's TLS library")
            .with("verifier_error", refusal)
    };
    if uncheckable {
        match found.iter_mut().find(|f| f.cause == Cause::CertWeak) {
            Some(weak) => {
                let f = std::mem::replace(weak, Finding::new(Cause::CertWeak, ""));
                *weak = evidence(f);
                weak.message
                    .push_str(": the plugin cannot check the server's handshake signature with it");
            }
            None => found.push(evidence(Finding::new(
                Cause::CertWeak,
                format!(
                    "the certificate's {} {}-bit key is one the plugin's TLS library refuses for signatures: the handshake signature could not be checked",
                    facts.key_type, facts.key_bits
                ),
            ))),
        }
    } else {
        found.push(
            Finding::new(
                Cause::TlsProtocolError,
                "the server's handshake signature does not verify with its certificate's key: it does not hold that key (interception, or a broken key store)",
            )
            .with("key_type", &facts.key_type)
            .with("key_bits", facts.key_bits)
            .with("verifier_error", refusal),
        );
    }
    found
}

/// How long a task that yields waits to run again: our own CPU queue.
async fn scheduler_lag() -> Duration {
    let t = Instant::now();
    tokio::task::yield_now().await;
    t.elapsed()
}

/// A DNS name usable as SNI (IP literals and odd names fall back to the connected IP).
fn sni_name_ok(name: &str) -> bool {
    crate::policy::is_ip_literal(name).is_none() && ServerName::try_from(name.to_owned()).is_ok()
}

fn policy_finding(host: &str, r: &crate::policy::Refusal) -> Finding {
    Finding::new(
        Cause::PolicyTargetDenied,
        format!("the target is outside the plugin's target policy: {}", r.reason),
    )
    .with("host", host)
    .with("refused", &r.subject)
    .with("reason", r.reason)
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::CertFacts;

    #[test]
    fn a_key_our_library_cannot_check_is_cert_weak_never_a_tls_cause() {
        let facts = CertFacts {
            key_type: "RSA".into(),
            key_bits: 1024,
            ..CertFacts::default()
        };
        let weak = Finding::new(Cause::CertWeak, "the certificate has a weak key");
        let found = refused_signature(vec![weak], &facts, "invalid peer certificate: BadSignature");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].cause, Cause::CertWeak);
        assert!(found[0].evidence.contains(&("key_bits".into(), "1024".into())));
        assert!(found[0]
            .evidence
            .iter()
            .any(|(k, v)| k == "handshake_signature" && v.starts_with("not checkable")));
        // Without an analysis finding to merge into, one is made.
        let found = refused_signature(Vec::new(), &facts, "x");
        assert_eq!(found.iter().map(|f| f.cause).collect::<Vec<_>>(), vec![Cause::CertWeak]);
        // A checkable key whose signature fails is not a weak certificate.
        let strong = CertFacts {
            key_type: "RSA".into(),
            key_bits: 2048,
            ..CertFacts::default()
        };
        let found = refused_signature(Vec::new(), &strong, "x");
        assert_eq!(found[0].cause, Cause::TlsProtocolError);
    }
}
