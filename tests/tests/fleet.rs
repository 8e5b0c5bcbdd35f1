//! The plugin against the simulated fleet over real loopback sockets: through the real
//! `rdp-preflight serve` binary, through the gRPC API in-process, and through the CLI.

use std::{process::Command, time::Duration};

use gateway_sim::{
    demo::{Harness, DEFAULT_SCENARIO},
    driver::{self, PlayOptions},
    scenario::Scenario,
};
use integration_tests::plugin::{plugin_bin, serve_binary, InProcess};
use rdp_preflight_proto::v1::{self as pb, Cause, CheckRequest, StageStatus, Target, Verdict};

fn default_scenario() -> Scenario {
    Scenario::parse(DEFAULT_SCENARIO).expect("default scenario parses")
}

fn request(id: &str, addr: std::net::SocketAddr, expected_name: &str) -> CheckRequest {
    CheckRequest {
        request_id: id.into(),
        target: Some(Target {
            host: addr.ip().to_string(),
            port: u32::from(addr.port()),
            expected_name: expected_name.into(),
            ..Default::default()
        }),
        credential: None,
        requester: Some(pb::Requester {
            user: "tester".into(),
            source_address: "127.0.0.1".into(),
        }),
    }
}

/// Issue 4: the real binary against the fleet and directory with the default scenario, every
/// row matching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_scenario_every_row_matches_through_the_serve_binary() {
    let scenario = default_scenario();
    let harness = Harness::start(&scenario).await.expect("fleet starts");
    let config = harness.write_plugin_config().expect("config written");
    let served = serve_binary(&config, &[]);
    // Rows whose credential only the target judges go to a plugin without a directory.
    let nla_only = serve_binary(&harness.write_nla_only_config().expect("config"), &[]);
    // Kerberos rows go to a plugin whose credential check is the AS exchange with the sim's KDC.
    let kerberos = serve_binary(
        &harness
            .write_kerberos_config()
            .expect("config")
            .expect("the default scenario has Kerberos rows"),
        &[],
    );
    let opts = PlayOptions {
        deadline: Duration::from_secs(30),
        jobs: 8,
        nla_only_plugin: Some(nla_only.endpoint()),
        kerberos_plugin: Some(kerberos.endpoint()),
    };
    let rows = driver::play_with(&served.endpoint(), &scenario, &harness.env, &opts).await;
    let table = driver::format_table(&rows);
    assert!(!rows.is_empty());
    let skipped = rows.iter().filter(|r| r.outcome == driver::Outcome::Skip).count();
    assert_eq!(skipped, 0, "rows skipped:\n{table}");
    assert!(driver::all_passed(&rows), "mismatches:\n{table}");
}

/// Every cause the fleet and the simulated directory can produce has a default-scenario row.
#[test]
fn default_scenario_covers_the_probe_causes() {
    let scenario = default_scenario();
    let have: Vec<String> = scenario
        .rows
        .iter()
        .map(|r| gateway_sim::scenario::cause_name(r.expect_cause).to_owned())
        .collect();
    for want in [
        "TCP_REFUSED",
        "X224_CLOSED",
        "X224_TIMEOUT",
        "X224_NOT_RDP",
        "NEG_SSL_REQUIRED",
        "NEG_SSL_NOT_ALLOWED",
        "NEG_SSL_CERT_NOT_ON_SERVER",
        "NEG_HYBRID_REQUIRED",
        "NEG_FAILURE_OTHER",
        "NEG_SECURITY_DOWNGRADE",
        "NEG_LEGACY_SERVER",
        "TLS_CLOSED_DURING_HANDSHAKE",
        "TLS_VERSION_MISMATCH",
        "TLS_NO_SHARED_CIPHER",
        "TLS_HANDSHAKE_TIMEOUT",
        "TLS_ALERT",
        "TLS_PROTOCOL_ERROR",
        "CERT_EXPIRED",
        "CERT_NOT_YET_VALID",
        "CERT_EXPIRING_SOON",
        "CERT_NAME_MISMATCH",
        "CERT_UNTRUSTED",
        "CERT_PIN_MISMATCH",
        "CERT_WEAK",
        "CERT_WRONG_USAGE",
        "NET_HIGH_LATENCY",
        "NET_UNSTABLE",
        "CRED_INVALID",
        "CRED_ACCOUNT_NOT_FOUND",
        "CRED_ACCOUNT_DISABLED",
        "CRED_ACCOUNT_LOCKED",
        "CRED_PASSWORD_EXPIRED",
        "CRED_PASSWORD_MUST_CHANGE",
        "CRED_ACCOUNT_EXPIRED",
        "CRED_LOGON_HOURS",
        "CRED_WORKSTATION_RESTRICTED",
        "CRED_TOKEN_TOO_LARGE",
        "CRED_LOCKOUT_GUARD",
        "CRED_MISSING",
        "NLA_CREDSSP_OUTDATED",
        "NLA_LOGON_FAILED",
        "NLA_ACCESS_DENIED",
        "NLA_NTLM_REFUSED",
        "TARGET_IDENTITY_MISMATCH",
        "TARGET_SPN_MISSING",
        "CLOCK_SKEW",
    ] {
        assert!(have.iter().any(|h| h == want), "no default-scenario row expects {want}");
    }
}

fn trusting_config(harness: &Harness) -> rdp_preflight::config::FileConfig {
    harness.plugin_config.clone()
}

/// A stall that outlives the check budget is CHECK_DEADLINE_EXCEEDED, with the stages not
/// reached reported as not run, answered before the caller's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_exceeded_is_a_partial_deny_report() {
    let scenario = default_scenario();
    let harness = Harness::start(&scenario).await.expect("fleet");
    let plugin = InProcess::start(&trusting_config(&harness)).await;
    let mut client = plugin.client().await;
    let silent = harness.env.fleet.addr("silent").expect("silent target");
    let mut req = tonic::Request::new(request("deadline-1", silent, "silent"));
    req.set_timeout(Duration::from_millis(1200));
    let t0 = std::time::Instant::now();
    let report = client
        .check(req)
        .await
        .expect("answered within the deadline")
        .into_inner();
    assert!(t0.elapsed() < Duration::from_millis(1200), "took {:?}", t0.elapsed());
    assert_eq!(report.verdict(), Verdict::Deny);
    assert_eq!(report.primary_cause(), Cause::CheckDeadlineExceeded);
    let status = |s: pb::Stage| report.stages.iter().find(|r| r.stage() == s).map(|r| r.status());
    assert_eq!(status(pb::Stage::X224), Some(StageStatus::Failed));
    assert_eq!(status(pb::Stage::Tls), Some(StageStatus::NotRun));
    assert_eq!(status(pb::Stage::Cert), Some(StageStatus::NotRun));
}

/// A full accept queue drops SYNs: the connect never completes, which is TCP_TIMEOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_dropped_is_tcp_timeout() {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = sock.listen(0).expect("listen with backlog 0");
    let addr = listener.local_addr().expect("addr");
    // Fill the accept queue; the listener never accepts.
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let mut cfg = rdp_preflight::config::FileConfig::default();
    cfg.policy.allow_loopback = true;
    cfg.cert.pin_store = "memory".into();
    cfg.probe.tcp_timeout_ms = 400;
    cfg.network.retry_transient = false;
    let plugin = InProcess::start(&cfg).await;
    let report = plugin
        .client()
        .await
        .check(request("tcp-timeout", addr, "x"))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(report.primary_cause(), Cause::TcpTimeout, "{report:?}");
    drop(listener);
}

/// Health reports SERVING for the service; reflection lists it; bad requests are
/// INVALID_ARGUMENT naming the fields; ListCauses serves the catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_validation_and_catalog() {
    let mut cfg = rdp_preflight::config::FileConfig::default();
    cfg.cert.pin_store = "memory".into();
    let plugin = InProcess::start(&cfg).await;
    let channel = tonic::transport::Channel::from_shared(plugin.endpoint())
        .expect("uri")
        .connect()
        .await
        .expect("connect");

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "preflight.v1.Preflight".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        h.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.message().await.expect("message").expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"preflight.v1.Preflight".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");

    // The same through v1alpha, the only version grpcio-reflection and older clients speak.
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
            server_reflection_response::MessageResponse, ServerReflectionRequest,
        };
        let mut refl = ServerReflectionClient::new(channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = refl
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("reflection v1alpha")
            .into_inner();
        let resp = stream.message().await.expect("message").expect("a response");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected {resp:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"preflight.v1.Preflight".to_owned()), "{names:?}");
    }

    let mut client = pb::preflight_client::PreflightClient::new(channel);
    let bad = CheckRequest {
        request_id: String::new(),
        target: Some(Target {
            host: "-bad-".into(),
            port: 70_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let st = client.check(bad).await.expect_err("invalid");
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    for f in ["request_id", "target.host", "target.port"] {
        assert!(st.message().contains(f), "{f} not named in {}", st.message());
    }
    let causes = client
        .list_causes(pb::ListCausesRequest {})
        .await
        .expect("causes")
        .into_inner()
        .causes;
    assert_eq!(causes.len(), rdp_preflight::cause::CATALOG.len());
    let expired = causes.iter().find(|c| c.number == 501).expect("501");
    assert_eq!(expired.name, "CERT_EXPIRED");
    assert_eq!(expired.severity(), pb::Severity::Deny);
}

/// The same checks through the CLI: table and proto3 JSON output, exit 0 / 3 / 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_check_reports_and_exit_codes() {
    let scenario = default_scenario();
    let harness = Harness::start(&scenario).await.expect("fleet");
    let ca = harness.files.path().join("fleet-ca.pem");
    let bin = plugin_bin();
    let run = |name: &str, json: bool| {
        let addr = harness.env.fleet.addr(name).unwrap_or_else(|| panic!("target {name}"));
        let mut cmd = Command::new(&bin);
        cmd.args([
            "check",
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args([
            "--expected-name",
            name,
            "--allow-loopback",
            "--pin-store",
            "memory",
            "--trust-anchor",
        ])
        .arg(&ca);
        if json {
            cmd.arg("--json");
        }
        cmd.output().expect("run rdp-preflight check")
    };
    let out = tokio::task::block_in_place(|| run("healthy-tls", false));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("verdict ALLOW"), "{text}");
    assert!(text.contains("tls         ok"), "{text}");

    let out = tokio::task::block_in_place(|| run("cert-expired", true));
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("proto3 JSON");
    assert_eq!(v["verdict"], "VERDICT_DENY");
    assert_eq!(v["primaryCause"], "CAUSE_CERT_EXPIRED");
    assert_eq!(v["findings"][0]["cause"], "CAUSE_CERT_EXPIRED");
    assert_eq!(
        v["target"]["certificate"]["sha256Fingerprint"].as_str().map(str::len),
        Some(64)
    );
    assert_eq!(v["predictedClientError"]["code"], "0x1B07 or 0x904/0x7");

    let out = Command::new(&bin).args(["check", "--port", "1"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "missing --host is a usage error");
    let out = Command::new(&bin)
        .args(["check", "--host", "127.0.0.1", "--protocols", "quic"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("quic"));
}

/// A TLS 1.0-only server that answers a modern hello with a protocol_version alert is named by
/// the legacy hello on a second connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_version_is_named_even_after_an_alert() {
    let scenario = default_scenario();
    let harness = Harness::start(&scenario).await.expect("fleet");
    let plugin = InProcess::start(&trusting_config(&harness)).await;
    let addr = harness.env.fleet.addr("tls10-alert").expect("target");
    let r = plugin
        .client()
        .await
        .check(request("tls10-alert", addr, "tls10-alert"))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.primary_cause(), Cause::TlsVersionMismatch);
    let ev = |k: &str| {
        r.findings[0]
            .evidence
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
    };
    assert_eq!(ev("alert_name").as_deref(), Some("ProtocolVersion"));
    assert_eq!(ev("server_version").as_deref(), Some("TLSv1.0"));
    assert_eq!(r.target.as_ref().map(|t| t.tls_version.as_str()), Some("TLSv1.0"));
}

/// Without a directory an empty password is still CRED_MISSING, never an allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_password_without_a_directory_is_cred_missing() {
    let scenario = default_scenario();
    let harness = Harness::start(&scenario).await.expect("fleet");
    let plugin = InProcess::start(&harness.nla_only_config()).await;
    let addr = harness.env.fleet.addr("healthy-tls").expect("target");
    let mut req = request("empty-password", addr, "healthy-tls");
    req.credential = Some(pb::Credential {
        username: "alice".into(),
        domain: String::new(),
        password: String::new(),
    });
    let r = plugin.client().await.check(req).await.expect("ok").into_inner();
    assert_eq!(r.primary_cause(), Cause::CredMissing);
    assert_eq!(r.verdict(), Verdict::Deny);
}

/// Bypasses closed, end to end: a legacy confirm is judged against the request's minimum
/// protocol, and every spelling of one server shares its certificate pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_confirm_and_respelled_hosts_do_not_step_around_policy() {
    let scenario = default_scenario();
    let harness = Harness::start(&scenario).await.expect("fleet");
    let plugin = InProcess::start(&trusting_config(&harness)).await;
    let mut client = plugin.client().await;

    // minimum_protocol = hybrid: a server answering without negotiation data is a downgrade.
    let legacy = harness.env.fleet.addr("legacy").expect("legacy target");
    let mut req = request("legacy-min-hybrid", legacy, "legacy");
    if let Some(t) = req.target.as_mut() {
        t.minimum_protocol = pb::SecurityProtocol::Hybrid as i32;
    }
    let report = client.check(req).await.expect("ok").into_inner();
    assert_eq!(report.verdict(), Verdict::Deny, "{report:?}");
    assert_eq!(report.primary_cause(), Cause::NegSecurityDowngrade, "{report:?}");

    // A new certificate on every connection: the first check pins it by the address it
    // reached; re-spelling the host must not make it a first sight again.
    let rotating = harness.env.fleet.addr("cert-rotating").expect("rotating target");
    let first = client
        .check(request("pin-first", rotating, "cert-rotating"))
        .await
        .expect("ok")
        .into_inner();
    assert_ne!(first.primary_cause(), Cause::CertPinMismatch, "{first:?}");
    for spelling in ["127.1", "0x7f000001"] {
        let mut req = request(&format!("pin-{spelling}"), rotating, "cert-rotating");
        if let Some(t) = req.target.as_mut() {
            t.host = spelling.into();
        }
        let report = client.check(req).await.expect("ok").into_inner();
        assert_eq!(report.primary_cause(), Cause::CertPinMismatch, "{spelling}: {report:?}");
    }
}

/// Each misdiagnosis class through the gRPC API, with the evidence that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_limits_and_line_services_and_silent_tls10_get_their_own_cause() {
    let scenario = default_scenario();
    let harness = Harness::start(&scenario).await.expect("fleet");
    let plugin = InProcess::start(&trusting_config(&harness)).await;
    let mut client = plugin.client().await;
    let check = |name: &'static str| {
        let addr = harness.env.fleet.addr(name).expect("target");
        request(name, addr, name)
    };
    let evidence = |f: &pb::Finding, k: &str| {
        f.evidence
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
            .unwrap_or_default()
    };

    // RSA-1024: our TLS library cannot check the signature; the certificate is weak, the
    // target did not abort anything.
    let r = client.check(check("cert-rsa1024")).await.expect("ok").into_inner();
    assert_eq!(r.verdict(), Verdict::AllowWithWarnings, "{r:?}");
    assert!(!r.findings.iter().any(|f| f.cause() == Cause::TlsAlert), "{r:?}");
    let weak = r
        .findings
        .iter()
        .find(|f| f.cause() == Cause::CertWeak)
        .expect("CERT_WEAK");
    assert_eq!(evidence(weak, "key_bits"), "1024");
    assert!(
        evidence(weak, "handshake_signature").starts_with("not checkable"),
        "{weak:?}"
    );

    // A web server on the port answers the cookie line: not RDP, not a timeout.
    let r = client.check(check("line-service")).await.expect("ok").into_inner();
    assert_eq!(r.primary_cause(), Cause::X224NotRdp, "{r:?}");
    let f = &r.findings[0];
    assert!(evidence(f, "first_bytes_text").starts_with("HTTP/1.1 400"), "{f:?}");

    // TLS 1.0 only, resetting a modern hello without an alert: named by the legacy hello.
    let r = client.check(check("tls10-reset")).await.expect("ok").into_inner();
    assert_eq!(r.primary_cause(), Cause::TlsVersionMismatch, "{r:?}");
    let f = &r.findings[0];
    assert_eq!(evidence(f, "server_version"), "TLSv1.0", "{f:?}");
    assert!(evidence(f, "modern_hello").contains("no alert"), "{f:?}");
}
