//! The target probe: resolve → tcp → x224 → tls → cert, then network quality.
//!
//! Each stage runs under the check's [`Budget`]; the protocol code ([`x224`], [`cert`]) is
//! sans-IO and this module owns sockets and time. The TLS stage hands its stream on in
//! [`ProbeOutcome::tls`], so a later stage (NLA) continues on the same connection.

pub mod cert;
pub mod pins;
pub mod resolve;
pub mod tls;
pub mod x224;

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use crate::{
    cause::{Cause, Stage},
    config::Config,
    deadline::{deadline_finding, Budget, Expired},
    report::{Finding, StageRecord, StageStatus, TargetFacts},
};

/// The TLS stream a successful TLS stage hands on.
pub type TlsStream = tokio_rustls::client::TlsStream<tls::Recorder<TcpStream>>;

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
}

/// Stage bookkeeping: offsets relative to the check start.
pub struct StageClock {
    start: Instant,
}

impl StageClock {
    /// Starts a stage now.
    pub fn start(budget: &Budget) -> (Self, Duration) {
        (StageClock { start: Instant::now() }, budget.elapsed())
    }
}

/// Builds a record for a stage that started at `offset` and ends now.
pub fn record(
    stage: Stage,
    status: StageStatus,
    offset: Duration,
    clock: &StageClock,
    detail: impl Into<String>,
) -> StageRecord {
    StageRecord {
        stage,
        status,
        start: offset,
        duration: clock.start.elapsed(),
        detail: detail.into(),
    }
}

/// A stage that did not run.
pub fn not_run(stage: Stage, offset: Duration, detail: &str) -> StageRecord {
    StageRecord {
        stage,
        status: StageStatus::NotRun,
        start: offset,
        duration: Duration::ZERO,
        detail: detail.into(),
    }
}

/// Runs probes; one per process, shared by all checks.
pub struct Prober {
    cfg: Arc<Config>,
    provider: Arc<CryptoProvider>,
    pins: pins::PinStore,
}

/// One TCP + X.224 + TLS attempt.
#[derive(Default)]
struct Attempt {
    findings: Vec<Finding>,
    stages: Vec<StageRecord>,
    connected: Option<SocketAddr>,
    selected: Option<u32>,
    flags: Option<u8>,
    failure_code: Option<u32>,
    tls_version: String,
    cipher: String,
    chain: Vec<CertificateDer<'static>>,
    tls: Option<TlsStream>,
    tcp_rtt: Option<Duration>,
    x224_rtt: Option<Duration>,
    /// The first deny-worthy failure.
    failure: Option<Cause>,
    deadline_hit: bool,
}

const TRANSIENT: [Cause; 3] = [
    Cause::X224Closed,
    Cause::TlsClosedDuringHandshake,
    Cause::TcpUnreachable,
];

impl Prober {
    /// A prober with the process-wide crypto provider and pin store.
    pub fn new(cfg: Arc<Config>) -> Result<Prober, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pins = pins::PinStore::open(&cfg.pin_store, cfg.pins.clone())?;
        Ok(Prober { cfg, provider, pins })
    }

    /// The pin store.
    pub fn pins(&self) -> &pins::PinStore {
        &self.pins
    }

    /// Probes one target.
    pub async fn probe(&self, req: &ProbeRequest, budget: &Budget) -> ProbeOutcome {
        let mut out = ProbeOutcome {
            facts: TargetFacts {
                host: req.host.clone(),
                port: req.port,
                requested_protocols: req.requested,
                ..TargetFacts::default()
            },
            ..ProbeOutcome::default()
        };
        let later = [
            Stage::Resolve,
            Stage::Tcp,
            Stage::X224,
            Stage::Tls,
            Stage::Cert,
            Stage::Network,
        ];

        // Policy on the name and port.
        let (clock, off) = StageClock::start(budget);
        if let Err(r) = self.cfg.policy.check_name(&req.host, req.port) {
            out.findings.push(policy_finding(&req.host, &r));
            out.stages
                .push(record(Stage::Policy, StageStatus::Failed, off, &clock, r.reason));
            out.stages.extend(
                later
                    .iter()
                    .map(|s| not_run(*s, budget.elapsed(), "target refused by policy")),
            );
            return out;
        }

        // Resolve.
        let (rclock, roff) = StageClock::start(budget);
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
                out.stages
                    .push(record(Stage::Resolve, StageStatus::Ok, roff, &rclock, detail));
                addrs
            }
            Ok(Err(e)) => {
                out.findings.push(e.finding(&req.host));
                out.stages.push(record(
                    Stage::Resolve,
                    StageStatus::Failed,
                    roff,
                    &rclock,
                    e.to_string(),
                ));
                out.stages.insert(
                    0,
                    record(Stage::Policy, StageStatus::Ok, off, &clock, "name and port allowed"),
                );
                out.stages.extend(
                    later[1..]
                        .iter()
                        .map(|s| not_run(*s, budget.elapsed(), "name did not resolve")),
                );
                return out;
            }
            Err(which) => {
                let f = match which {
                    Expired::Check => deadline_finding(Stage::Resolve, budget),
                    Expired::Stage => Finding::new(
                        Cause::ResolveFailed,
                        format!("the resolver did not answer for {:?} in time", req.host),
                    )
                    .with("timeout_ms", self.cfg.resolve_timeout.as_millis()),
                };
                out.findings.push(f);
                out.stages
                    .push(record(Stage::Resolve, StageStatus::Failed, roff, &rclock, "timed out"));
                out.stages.insert(
                    0,
                    record(Stage::Policy, StageStatus::Ok, off, &clock, "name and port allowed"),
                );
                out.stages.extend(
                    later[1..]
                        .iter()
                        .map(|s| not_run(*s, budget.elapsed(), "name did not resolve")),
                );
                return out;
            }
        };
        out.facts.resolved = addrs.clone();

        // Policy on every resolved address.
        if let Some(r) = addrs.iter().find_map(|a| self.cfg.policy.check_addr(a.ip()).err()) {
            out.findings
                .push(policy_finding(&req.host, &r).with("resolved", join(&addrs)));
            out.stages
                .insert(0, record(Stage::Policy, StageStatus::Failed, off, &clock, r.reason));
            out.stages.extend(
                later[1..]
                    .iter()
                    .map(|s| not_run(*s, budget.elapsed(), "target refused by policy")),
            );
            return out;
        }
        out.stages
            .insert(0, record(Stage::Policy, StageStatus::Ok, off, &clock, "target allowed"));

        // TCP + X.224 + TLS, retried once quickly after a failure that flapping paths produce.
        let mut attempt = self.attempt(req, &addrs, budget).await;
        if self.cfg.retry_transient
            && !attempt.deadline_hit
            && attempt.failure.is_some_and(|c| TRANSIENT.contains(&c))
            && budget.remaining() > Duration::from_millis(200)
        {
            let first = attempt.failure;
            let second = self.attempt(req, &addrs, budget).await;
            if second.failure != first && !second.deadline_hit {
                let unstable = Finding::new(
                    Cause::NetUnstable,
                    "two attempts within one check disagreed: the path or the target is flapping",
                )
                .with("first_attempt", first.map_or("ok".to_owned(), |c| c.name().to_owned()))
                .with(
                    "second_attempt",
                    second.failure.map_or("ok".to_owned(), |c| c.name().to_owned()),
                );
                attempt = second;
                attempt.findings.push(unstable);
            } else {
                attempt
                    .findings
                    .iter_mut()
                    .for_each(|f| f.evidence.push(("retried".into(), "same result".into())));
            }
        }
        out.facts.connected = attempt.connected;
        out.facts.selected_protocol = attempt.selected;
        out.facts.negotiation_flags = attempt.flags;
        out.facts.negotiation_failure_code = attempt.failure_code;
        out.facts.tls_version = std::mem::take(&mut attempt.tls_version);
        out.facts.cipher_suite = std::mem::take(&mut attempt.cipher);
        out.stages.append(&mut attempt.stages);
        let mut findings = std::mem::take(&mut attempt.findings);
        let (unstable, rest): (Vec<Finding>, Vec<Finding>) =
            findings.drain(..).partition(|f| f.cause == Cause::NetUnstable);
        out.findings.extend(rest);

        // Certificate.
        let (cclock, coff) = StageClock::start(budget);
        if attempt.chain.is_empty() {
            out.stages.push(not_run(Stage::Cert, coff, "no certificate received"));
        } else {
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
            if let Some(addr) = attempt.connected {
                let key = pins::target_key(addr);
                let mut names = vec![pins::name_key(&req.host, req.port)];
                if req.expected_name != req.host {
                    names.push(pins::name_key(&req.expected_name, req.port));
                }
                let (pin, mismatch) = self.pins.check_status(&key, &names, &facts.sha256_fingerprint);
                out.pin = pin;
                if let Some(f) = mismatch {
                    found.push(
                        f.with("target", &key)
                            .with("expected_name", &req.expected_name)
                            .with("dialled", format!("{}:{}", req.host, req.port)),
                    );
                }
            }
            let failed = found
                .iter()
                .any(|f| self.cfg.severity(f.cause) == crate::cause::Severity::Deny);
            let detail = format!(
                "{} {}, {} finding(s)",
                facts.key_type,
                facts.signature_algorithm,
                found.len()
            );
            out.stages.push(record(
                Stage::Cert,
                if failed { StageStatus::Failed } else { StageStatus::Ok },
                coff,
                &cclock,
                detail,
            ));
            out.facts.certificate = Some(facts);
            out.findings.extend(found);
            out.server_cert = attempt.chain.first().cloned();
        }

        // Network quality, from the round trips already made.
        let (nclock, noff) = StageClock::start(budget);
        let mut net = unstable;
        if let (Some(tcp), Some(x224)) = (attempt.tcp_rtt, attempt.x224_rtt) {
            if tcp > self.cfg.retransmission && x224 < self.cfg.retransmission / 4 {
                net.push(
                    Finding::new(
                        Cause::NetUnstable,
                        "the TCP connect needed a retransmission-scale delay while later round trips were fast: packet loss suspected",
                    )
                    .with("tcp_connect_ms", tcp.as_millis())
                    .with("x224_round_trip_ms", x224.as_millis()),
                );
            } else if tcp.max(x224) > self.cfg.high_latency {
                let rtt = tcp.max(x224);
                net.push(
                    Finding::new(
                        Cause::NetHighLatency,
                        format!("a handshake round trip to the target took {} ms", rtt.as_millis()),
                    )
                    .with("tcp_connect_ms", tcp.as_millis())
                    .with("x224_round_trip_ms", x224.as_millis())
                    .with("threshold_ms", self.cfg.high_latency.as_millis()),
                );
            }
            let status = if net.is_empty() {
                StageStatus::Ok
            } else {
                StageStatus::Failed
            };
            out.stages.push(record(
                Stage::Network,
                status,
                noff,
                &nclock,
                format!("tcp {} ms, x224 {} ms", tcp.as_millis(), x224.as_millis()),
            ));
        } else if !net.is_empty() {
            out.stages.push(record(
                Stage::Network,
                StageStatus::Failed,
                noff,
                &nclock,
                "attempts disagreed",
            ));
        } else {
            out.stages
                .push(not_run(Stage::Network, noff, "no round trips measured"));
        }
        out.findings.extend(net);
        // Hand the stream on only when nothing so far denies the session.
        if !out
            .findings
            .iter()
            .any(|f| self.cfg.severity(f.cause) == crate::cause::Severity::Deny)
        {
            out.tls = attempt.tls.take();
        }
        out
    }

    async fn attempt(&self, req: &ProbeRequest, addrs: &[SocketAddr], budget: &Budget) -> Attempt {
        let mut a = Attempt::default();
        // TCP.
        let (clock, off) = StageClock::start(budget);
        let stream = match budget.run(self.cfg.tcp_timeout, connect_any(addrs)).await {
            Ok(Ok((s, addr, rtt))) => {
                a.connected = Some(addr);
                a.tcp_rtt = Some(rtt);
                a.stages.push(record(
                    Stage::Tcp,
                    StageStatus::Ok,
                    off,
                    &clock,
                    format!("connected to {addr}"),
                ));
                s
            }
            Ok(Err((addr, e))) => {
                let f = tcp_finding(addr, &e);
                a.failure = Some(f.cause);
                a.findings.push(f);
                a.stages
                    .push(record(Stage::Tcp, StageStatus::Failed, off, &clock, e.to_string()));
                a.rest_not_run(budget, &[Stage::X224, Stage::Tls], "TCP connect failed");
                return a;
            }
            Err(which) => {
                a.expired(which, Stage::Tcp, budget, || {
                    Finding::new(Cause::TcpTimeout, "no answer to the TCP connect (SYN) before the stage deadline: a firewall drops it, or the host is down")
                        .with("addresses", join(addrs))
                });
                a.stages
                    .push(record(Stage::Tcp, StageStatus::Failed, off, &clock, "timed out"));
                a.rest_not_run(budget, &[Stage::X224, Stage::Tls], "TCP connect failed");
                return a;
            }
        };

        // X.224.
        let (clock, off) = StageClock::start(budget);
        let mut stream = stream;
        let cr = match x224::encode_connection_request(self.cfg.cookie.as_deref(), req.requested) {
            Ok(b) => b,
            Err(e) => {
                // Validated at config load; a request that still fails to encode is a bug.
                a.findings.push(
                    Finding::new(Cause::X224NotRdp, "the connection request could not be encoded").with("error", e),
                );
                a.failure = Some(Cause::X224NotRdp);
                return a;
            }
        };
        let x0 = Instant::now();
        let answer = budget.run(self.cfg.x224_timeout, exchange_x224(&mut stream, &cr)).await;
        match answer {
            Ok(Ok((pdu, bytes))) => {
                a.x224_rtt = Some(x0.elapsed());
                let (finding, detail) = self.judge_confirm(req, pdu, &bytes, &mut a);
                let failed = finding
                    .as_ref()
                    .is_some_and(|f| self.cfg.severity(f.cause) == crate::cause::Severity::Deny);
                if let Some(f) = finding {
                    if failed {
                        a.failure = Some(f.cause);
                    }
                    a.findings.push(f);
                }
                a.stages.push(record(
                    Stage::X224,
                    if failed { StageStatus::Failed } else { StageStatus::Ok },
                    off,
                    &clock,
                    detail,
                ));
                if failed {
                    a.rest_not_run(budget, &[Stage::Tls], "X.224 negotiation failed");
                    return a;
                }
            }
            Ok(Err(e)) => {
                let f = e.finding();
                a.failure = Some(f.cause);
                a.findings.push(f);
                a.stages.push(record(
                    Stage::X224,
                    StageStatus::Failed,
                    off,
                    &clock,
                    "no valid connection confirm",
                ));
                a.rest_not_run(budget, &[Stage::Tls], "X.224 negotiation failed");
                return a;
            }
            Err(which) => {
                a.expired(which, Stage::X224, budget, || {
                    Finding::new(
                        Cause::X224Timeout,
                        "the target accepted TCP but sent no X.224 Connection Confirm before the stage deadline",
                    )
                    .with("timeout_ms", self.cfg.x224_timeout.as_millis())
                });
                a.stages
                    .push(record(Stage::X224, StageStatus::Failed, off, &clock, "timed out"));
                a.rest_not_run(budget, &[Stage::Tls], "X.224 negotiation failed");
                return a;
            }
        }

        // TLS, on the same socket, when the selected protocol runs inside TLS.
        let (clock, off) = StageClock::start(budget);
        let selected = a.selected.unwrap_or(x224::protocol::RDP);
        if !x224::protocol::uses_tls(selected) {
            a.stages.push(StageRecord {
                stage: Stage::Tls,
                status: StageStatus::Skipped,
                start: off,
                duration: Duration::ZERO,
                detail: format!("{} selected: no TLS", x224::protocol::name(selected)),
            });
            return a;
        }
        let (config, verifier) = match tls::client_config(&self.provider) {
            Ok(c) => c,
            Err(e) => {
                a.findings
                    .push(Finding::new(Cause::TlsAlert, "the TLS client could not be configured").with("tls_error", e));
                a.failure = Some(Cause::TlsAlert);
                return a;
            }
        };
        let server_name = match a.connected.map(|c| c.ip()) {
            _ if x224_name_ok(&req.expected_name) => ServerName::try_from(req.expected_name.clone()).ok(),
            Some(ip) => Some(ServerName::IpAddress(ip.into())),
            None => None,
        };
        let Some(server_name) = server_name else {
            return a;
        };
        let recorder = tls::Recorder::new(stream);
        let seen = recorder.seen();
        let connector = tokio_rustls::TlsConnector::from(config);
        let t0 = Instant::now();
        match budget
            .run(self.cfg.tls_timeout, connector.connect(server_name, recorder))
            .await
        {
            Ok(Ok(tls_stream)) => {
                let (_, conn) = tls_stream.get_ref();
                a.tls_version = conn
                    .protocol_version()
                    .map(|v| tls::version_name(u16::from(v)))
                    .unwrap_or_default();
                a.cipher = conn
                    .negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()))
                    .unwrap_or_default();
                a.chain = verifier.chain();
                a.stages.push(record(
                    Stage::Tls,
                    StageStatus::Ok,
                    off,
                    &clock,
                    format!("{} {}", a.tls_version, a.cipher),
                ));
                a.tls = Some(tls_stream);
            }
            Ok(Err(e)) => {
                let mut f = tls::classify_failure(&e, &seen.first(), seen.total());
                // A protocol_version alert does not say which version the server speaks: ask it
                // with a legacy hello on a second connection.
                if f.cause == Cause::TlsVersionMismatch && !f.evidence.iter().any(|(k, _)| k == "server_version") {
                    if let Some(addr) = a.connected {
                        let probe = legacy_version(addr, req, self.cfg.cookie.as_deref());
                        if let Ok(Some(v)) = budget.run(self.cfg.tls_timeout, probe).await {
                            f.message = format!(
                                "the server only speaks {} (it refused TLS 1.2 and 1.3)",
                                tls::version_name(v)
                            );
                            f.evidence.push(("server_version".into(), tls::version_name(v)));
                            f.evidence.push(("found_by".into(), "legacy ClientHello".into()));
                        }
                    }
                }
                a.chain = verifier.chain();
                if let Some(v) = f.evidence.iter().find(|(k, _)| k == "server_version") {
                    a.tls_version = v.1.clone();
                }
                a.failure = Some(f.cause);
                a.findings.push(f);
                a.stages
                    .push(record(Stage::Tls, StageStatus::Failed, off, &clock, e.to_string()));
            }
            Err(which) => {
                a.chain = verifier.chain();
                let waited = t0.elapsed().as_millis() as u64;
                let x224_ms = a.x224_rtt.map_or(0, |d| d.as_millis() as u64);
                a.expired(which, Stage::Tls, budget, || {
                    tls::classify_stall(&seen.first(), seen.total(), x224_ms, waited)
                });
                a.stages
                    .push(record(Stage::Tls, StageStatus::Failed, off, &clock, "timed out"));
            }
        }
        a
    }

    fn judge_confirm(
        &self,
        req: &ProbeRequest,
        pdu: x224::ServerPdu,
        bytes: &[u8],
        a: &mut Attempt,
    ) -> (Option<Finding>, String) {
        use x224::{Confirm, ServerPdu};
        let raw = bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        match pdu {
            ServerPdu::Disconnect { reason } => (
                Some(
                    Finding::new(
                        Cause::X224Closed,
                        "the target answered the connection request with an X.224 Disconnect Request",
                    )
                    .with("dr_reason", reason.map_or("none".into(), |r| r.to_string()))
                    .with("confirm_bytes", raw),
                ),
                "disconnect request".into(),
            ),
            ServerPdu::Confirm(Confirm::Legacy) => {
                a.selected = Some(x224::protocol::RDP);
                (
                    Some(
                        Finding::new(
                            Cause::NegLegacyServer,
                            "the target answered without negotiation data: Standard RDP Security only",
                        )
                        .with("confirm_bytes", raw),
                    ),
                    "legacy confirm (no negotiation data)".into(),
                )
            }
            ServerPdu::Confirm(Confirm::Failure { flags, code }) => {
                a.flags = Some(flags);
                a.failure_code = Some(code);
                let name = x224::failure::name(code).unwrap_or("unknown");
                let cause = match code {
                    x224::failure::SSL_REQUIRED_BY_SERVER => Cause::NegSslRequired,
                    x224::failure::SSL_NOT_ALLOWED_BY_SERVER => Cause::NegSslNotAllowed,
                    x224::failure::SSL_CERT_NOT_ON_SERVER => Cause::NegSslCertNotOnServer,
                    x224::failure::HYBRID_REQUIRED_BY_SERVER => Cause::NegHybridRequired,
                    _ => Cause::NegFailureOther,
                };
                (
                    Some(
                        Finding::new(
                            cause,
                            format!("the target refused the negotiation: RDP_NEG_FAILURE {code} ({name})"),
                        )
                        .with("failure_code", code)
                        .with("failure_name", name)
                        .with("flags", format!("0x{flags:02x}"))
                        .with("requested_protocols", x224::protocol::names(req.requested)),
                    ),
                    format!("RDP_NEG_FAILURE {code}"),
                )
            }
            ServerPdu::Confirm(Confirm::Negotiated { flags, selected }) => {
                a.flags = Some(flags);
                a.selected = Some(selected);
                let minimum = req.minimum;
                match x224::judge_selection(req.requested, selected, minimum) {
                    Ok(()) => (None, format!("{} selected", x224::protocol::name(selected))),
                    Err(d) => (
                        Some(
                            Finding::new(
                                Cause::NegSecurityDowngrade,
                                format!("the target {d}: {}", x224::protocol::name(selected)),
                            )
                            .with("requested_protocols", x224::protocol::names(req.requested))
                            .with("selected_protocol", x224::protocol::name(selected))
                            .with("minimum_protocol", minimum.map_or("none".into(), x224::protocol::name)),
                        ),
                        format!("{} selected", x224::protocol::name(selected)),
                    ),
                }
            }
        }
    }
}

impl Attempt {
    fn rest_not_run(&mut self, budget: &Budget, stages: &[Stage], why: &str) {
        self.stages
            .extend(stages.iter().map(|s| not_run(*s, budget.elapsed(), why)));
    }

    fn expired(&mut self, which: Expired, stage: Stage, budget: &Budget, stage_finding: impl FnOnce() -> Finding) {
        let f = match which {
            Expired::Check => {
                self.deadline_hit = true;
                deadline_finding(stage, budget)
            }
            Expired::Stage => stage_finding(),
        };
        self.failure = Some(f.cause);
        self.findings.push(f);
    }
}

/// A DNS name usable as SNI (IP literals and odd names fall back to the connected IP).
fn x224_name_ok(name: &str) -> bool {
    config_ip(name).is_none() && ServerName::try_from(name.to_owned()).is_ok()
}

fn config_ip(name: &str) -> Option<std::net::IpAddr> {
    crate::policy::is_ip_literal(name)
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

/// Connects to each address in turn; returns the first success or the last error.
async fn connect_any(addrs: &[SocketAddr]) -> Result<(TcpStream, SocketAddr, Duration), (SocketAddr, io::Error)> {
    let mut last = None;
    for addr in addrs {
        let t0 = Instant::now();
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let rtt = t0.elapsed();
                // Small writes (X.224, TLS, CredSSP) must not wait for delayed ACKs.
                if let Err(e) = s.set_nodelay(true) {
                    return Err((*addr, e));
                }
                return Ok((s, *addr, rtt));
            }
            Err(e) => last = Some((*addr, e)),
        }
    }
    Err(last.unwrap_or_else(|| {
        (
            SocketAddr::from(([0, 0, 0, 0], 0)),
            io::Error::new(io::ErrorKind::NotFound, "no address to connect to"),
        )
    }))
}

fn tcp_finding(addr: SocketAddr, e: &io::Error) -> Finding {
    let (cause, msg) = match e.kind() {
        io::ErrorKind::ConnectionRefused => (
            Cause::TcpRefused,
            "the target refused the TCP connection: nothing listens on the port",
        ),
        io::ErrorKind::TimedOut => (Cause::TcpTimeout, "the TCP connect timed out"),
        // The handshake completed and the target reset it before the connect returned.
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => (
            Cause::X224Closed,
            "the target accepted TCP and reset the connection at once",
        ),
        _ => (
            Cause::TcpUnreachable,
            "the target is unreachable (no route, ICMP unreachable or network down)",
        ),
    };
    Finding::new(cause, msg)
        .with("address", addr)
        .with(
            "os_error",
            e.raw_os_error()
                .map_or_else(|| format!("{:?}", e.kind()), |c| c.to_string()),
        )
        .with("error", e)
}

/// Why the X.224 exchange failed.
#[derive(Debug, thiserror::Error)]
enum X224Error {
    #[error("connection closed before a confirm")]
    Closed { got: Vec<u8>, error: Option<io::Error> },
    #[error("not an RDP answer: {0}")]
    NotRdp(x224::DecodeError, Vec<u8>),
}

impl X224Error {
    fn finding(&self) -> Finding {
        let hex = |b: &[u8]| {
            b.iter()
                .take(32)
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            X224Error::Closed { got, error } => Finding::new(
                Cause::X224Closed,
                "the target accepted TCP, then closed the connection before an X.224 Connection Confirm",
            )
            .with("bytes_received", got.len())
            .with(
                "how",
                error.as_ref().map_or("FIN".to_owned(), |e| format!("{:?}", e.kind())),
            ),
            X224Error::NotRdp(e, got) => Finding::new(
                Cause::X224NotRdp,
                "the reply is not an X.224 Connection Confirm: another service answers on this port",
            )
            .with("decode_error", e)
            .with("first_bytes", hex(got))
            .with(
                "first_bytes_text",
                String::from_utf8_lossy(&got[..got.len().min(32)]).escape_debug(),
            ),
        }
    }
}

/// On a new connection: the X.224 exchange, then a legacy ClientHello; the ServerHello's
/// version, if the server answers one below TLS 1.2.
async fn legacy_version(addr: SocketAddr, req: &ProbeRequest, cookie: Option<&str>) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let cr = x224::encode_connection_request(cookie, req.requested).ok()?;
    match exchange_x224(&mut stream, &cr).await.ok()? {
        (x224::ServerPdu::Confirm(x224::Confirm::Negotiated { selected, .. }), _)
            if x224::protocol::uses_tls(selected) => {}
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

/// Sends the Connection Request and reads until the decoder has a whole answer.
async fn exchange_x224(stream: &mut TcpStream, cr: &[u8]) -> Result<(x224::ServerPdu, Vec<u8>), X224Error> {
    stream.write_all(cr).await.map_err(|e| X224Error::Closed {
        got: Vec::new(),
        error: Some(e),
    })?;
    let mut buf = Vec::with_capacity(32);
    let mut chunk = [0u8; 512];
    loop {
        match x224::decode_server_pdu(&buf) {
            Ok(x224::Decoded::Complete(pdu, used)) => {
                buf.truncate(used);
                return Ok((pdu, buf));
            }
            Ok(x224::Decoded::Incomplete(_)) => {}
            Err(e) => return Err(X224Error::NotRdp(e, buf)),
        }
        // Read only what the PDU needs: TLS bytes that follow belong to the next stage.
        let want = match x224::decode_server_pdu(&buf) {
            Ok(x224::Decoded::Incomplete(n)) => n.saturating_sub(buf.len()).clamp(1, chunk.len()),
            _ => 1,
        };
        match stream.read(&mut chunk[..want]).await {
            Ok(0) => return Err(X224Error::Closed { got: buf, error: None }),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(X224Error::Closed {
                    got: buf,
                    error: Some(e),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_map_to_their_causes() {
        let addr: SocketAddr = "192.0.2.1:3389".parse().expect("addr");
        let cause = |k: io::ErrorKind| tcp_finding(addr, &io::Error::from(k)).cause;
        assert_eq!(cause(io::ErrorKind::ConnectionRefused), Cause::TcpRefused);
        assert_eq!(cause(io::ErrorKind::TimedOut), Cause::TcpTimeout);
        assert_eq!(cause(io::ErrorKind::NetworkUnreachable), Cause::TcpUnreachable);
        assert_eq!(cause(io::ErrorKind::HostUnreachable), Cause::TcpUnreachable);
        assert_eq!(cause(io::ErrorKind::NetworkDown), Cause::TcpUnreachable);
        assert_eq!(cause(io::ErrorKind::ConnectionReset), Cause::X224Closed);
        // ENETUNREACH as the OS reports it keeps the raw number as evidence.
        let f = tcp_finding(addr, &io::Error::from_raw_os_error(101));
        assert_eq!(f.cause, Cause::TcpUnreachable);
        assert!(
            f.evidence.contains(&("os_error".into(), "101".into())),
            "{:?}",
            f.evidence
        );
    }
}
