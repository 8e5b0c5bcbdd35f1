//! The plugin cannot be turned against its network, leaks no password, and survives hostile
//! targets: real sockets on loopback, the real binary where logs matter.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use gateway_sim::{
    demo::{Harness, DEFAULT_SCENARIO},
    scenario::Scenario,
};
use integration_tests::plugin::{admin_addr, metrics_text, plugin_bin, serve_binary, InProcess};
use rdp_preflight::config::FileConfig;
use rdp_preflight_proto::v1::{self as pb, Cause, CheckRequest, StageStatus, Target, Verdict};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const CANARY: &str = "Canary-9f3c-Pw!";

fn req(host: &str, port: u16) -> CheckRequest {
    CheckRequest {
        request_id: format!("sec-{host}-{port}"),
        target: Some(Target {
            host: host.into(),
            port: u32::from(port),
            ..Default::default()
        }),
        credential: None,
        requester: Some(pb::Requester {
            user: "tester".into(),
            source_address: "127.0.0.1".into(),
        }),
    }
}

fn base_config() -> FileConfig {
    let mut cfg = FileConfig::default();
    cfg.cert.pin_store = "memory".into();
    cfg
}

fn stage_status(r: &pb::CheckReport, s: pb::Stage) -> Option<StageStatus> {
    r.stages.iter().find(|x| x.stage() == s).map(|x| x.status())
}

/// SSRF: loopback (also through a DNS name), cloud metadata and non-allowlisted targets are
/// refused before any connection is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refuses_loopback_metadata_and_unlisted_targets_without_traffic() {
    // Something listens on loopback: a refused policy must not even connect to it.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let plugin = InProcess::start(&base_config()).await;
    let mut client = plugin.client().await;
    for host in [
        "127.0.0.1",
        "localhost",
        "169.254.169.254",
        "fd00:ec2::254",
        "::1",
        "0.0.0.0",
    ] {
        let r = client.check(req(host, port)).await.expect("answered").into_inner();
        assert_eq!(r.primary_cause(), Cause::PolicyTargetDenied, "{host}: {r:?}");
        assert_eq!(r.verdict(), Verdict::Deny);
        assert_eq!(stage_status(&r, pb::Stage::Tcp), Some(StageStatus::NotRun), "{host}");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), listener.accept())
            .await
            .is_err(),
        "a refused target was connected to"
    );

    // The opt-in allows loopback but never the metadata address.
    let mut cfg = base_config();
    cfg.policy.allow_loopback = true;
    cfg.policy.allow_networks = vec!["10.0.0.0/8".into(), "127.0.0.0/8".into()];
    cfg.policy.allow_ports = vec![port];
    let plugin = InProcess::start(&cfg).await;
    let mut client = plugin.client().await;
    let r = client
        .check(req("169.254.169.254", port))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(r.primary_cause(), Cause::PolicyTargetDenied);
    let r = client
        .check(req("192.0.2.10", port))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(r.primary_cause(), Cause::PolicyTargetDenied, "outside allow_networks");
    let r = client
        .check(req("127.0.0.1", 3389))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(r.primary_cause(), Cause::PolicyTargetDenied, "port outside allow_ports");
    let evidence: Vec<_> = r.findings[0].evidence.iter().map(|e| e.value.clone()).collect();
    assert!(evidence.iter().any(|v| v.contains("allow_ports")), "{evidence:?}");
}

/// A canary password used on every path (directory bind, NLA logon, invalid request, CLI)
/// never shows in logs at trace level, audit files, metrics or error messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_password_never_leaks() {
    let scenario = Scenario::parse(DEFAULT_SCENARIO).expect("scenario");
    let mut harness = Harness::start(&scenario).await.expect("fleet");
    let audit = tempfile::tempdir().expect("tmp");
    harness.plugin_config.audit.dir = Some(audit.path().join("a"));
    harness.plugin_config.audit.all_checks = true;
    harness.plugin_config.admin.listen = Some("127.0.0.1:0".into());
    let env = [("RUST_LOG", "trace")];
    let served = serve_binary(&harness.write_plugin_config().expect("config"), &env);
    let mut nla_cfg = harness.nla_only_config();
    nla_cfg.audit.dir = Some(audit.path().join("b"));
    nla_cfg.audit.all_checks = true;
    nla_cfg.admin.listen = Some("127.0.0.1:0".into());
    let nla_path = harness.files.path().join("nla-canary.toml");
    std::fs::write(&nla_path, toml::to_string(&nla_cfg).expect("toml")).expect("write");
    let nla = serve_binary(&nla_path, &env);

    let target = |name: &str| harness.env.fleet.addr(name).expect("target");
    let with_cred = |addr: SocketAddr, name: &str, user: &str| {
        let mut r = req(&addr.ip().to_string(), addr.port());
        r.target.as_mut().expect("target").expected_name = name.into();
        r.credential = Some(pb::Credential {
            username: user.into(),
            domain: String::new(),
            password: CANARY.into(),
        });
        r
    };
    let mut client = integration_tests::plugin::client(&served.endpoint()).await;
    let r = client
        .check(with_cred(target("healthy-tls"), "healthy-tls", "alice"))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.primary_cause(), Cause::CredInvalid, "directory path ran");
    let mut nla_client = integration_tests::plugin::client(&nla.endpoint()).await;
    let r = nla_client
        .check(with_cred(target("nla-healthy"), "nla-healthy", "wanda"))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.primary_cause(), Cause::NlaLogonFailed, "NLA logon path ran: {r:?}");
    let mut bad = with_cred(target("healthy-tls"), "healthy-tls", "");
    bad.request_id = String::new();
    let st = client.check(bad).await.expect_err("invalid");
    assert!(!format!("{st:?}").contains(CANARY));

    // The CLI, with the password from the environment.
    let addr = target("healthy-tls");
    let ca = harness.files.path().join("fleet-ca.pem");
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(plugin_bin())
            .args([
                "check",
                "--host",
                &addr.ip().to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args([
                "--allow-loopback",
                "--pin-store",
                "memory",
                "--expected-name",
                "healthy-tls",
                "--trust-anchor",
            ])
            .arg(&ca)
            .args(["--user", "alice", "--password-env", "PREFLIGHT_CANARY", "--json"])
            .args(["--directory", &harness.directory_url().expect("directory")])
            .arg("--directory-ca")
            .arg(harness.plugin_config.directory.ca_file.as_ref().expect("ca"))
            .args(["--bind-as", &harness.plugin_config.directory.bind_as])
            .env("PREFLIGHT_CANARY", CANARY)
            .env("RUST_LOG", "trace")
            .output()
            .expect("cli")
    });
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let cli = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cli.contains("CAUSE_CRED_INVALID"));
    assert!(!cli.contains(CANARY), "CLI output leaks the password");

    for (what, s) in [("plugin", &served), ("nla plugin", &nla)] {
        let log = s.stderr.lock().map(|l| l.clone()).unwrap_or_default();
        assert!(log.len() > 1000, "{what}: trace logs were captured");
        assert!(!log.contains(CANARY), "{what} logs leak the password");
        let admin = admin_addr(&log).unwrap_or_else(|| panic!("{what}: admin address in logs"));
        let m = metrics_text(&admin).await;
        assert!(m.contains("rdp_preflight_checks_total"), "{m}");
        assert!(!m.contains(CANARY));
    }
    let mut audit_text = String::new();
    for sub in ["a", "b"] {
        for e in std::fs::read_dir(audit.path().join(sub)).expect("audit dir").flatten() {
            audit_text.push_str(&std::fs::read_to_string(e.path()).expect("read"));
        }
    }
    assert!(
        audit_text.contains("\"alice\"") && audit_text.contains("\"wanda\""),
        "accounts are recorded"
    );
    assert!(!audit_text.contains(CANARY), "audit files leak the password");
}

/// Spawns a loopback server running `serve` on every connection.
async fn hostile<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Reads the 19-byte X.224 request and answers a confirm selecting TLS.
/// Reads the whole Connection Request (its TPKT length: the cookie makes it longer than 19
/// bytes). Leaving part of it unread would make the close an RST that can discard what the
/// hostile server wrote before the client reads it.
async fn read_cr(s: &mut tokio::net::TcpStream) {
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).await.is_err() {
        return;
    }
    let len = usize::from(u16::from_be_bytes([head[2], head[3]])).saturating_sub(4);
    let mut rest = vec![0u8; len.min(4096)];
    let _ = s.read_exact(&mut rest).await;
}

async fn confirm_ssl(s: &mut tokio::net::TcpStream) {
    read_cr(s).await;
    // TPKT len 19 | LI 14 | CC | refs | class | RDP_NEG_RSP flags 0 len 8 | SSL
    let cc = [3, 0, 0, 19, 14, 0xd0, 0, 0, 0, 0, 0, 2, 0, 8, 0, 1, 0, 0, 0];
    let _ = s.write_all(&cc).await;
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Hostile targets: endless garbage, oversized TLS records, a 1 MiB certificate message, a
/// one-byte-a-second drip and thousands of resets end in a cause within the check deadline,
/// with memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_targets_cannot_exhaust_memory_or_outlive_the_deadline() {
    let mut cfg = base_config();
    cfg.policy.allow_loopback = true;
    cfg.probe.x224_timeout_ms = 1500;
    cfg.probe.tls_timeout_ms = 1500;
    cfg.network.retry_transient = false;
    let plugin = InProcess::start(&cfg).await;
    let mut client = plugin.client().await;
    let rss0 = vm_rss_kib();

    let endless = |after_confirm: bool| {
        move |mut s: tokio::net::TcpStream| async move {
            if after_confirm {
                confirm_ssl(&mut s).await;
            }
            let junk = vec![0x41u8; 64 * 1024];
            for _ in 0..4096 {
                if s.write_all(&junk).await.is_err() {
                    break;
                }
            }
        }
    };
    let oversized = |mut s: tokio::net::TcpStream| async move {
        confirm_ssl(&mut s).await;
        let mut rec = vec![0x16, 0x03, 0x03, 0xff, 0xff];
        rec.extend(std::iter::repeat_n(0u8, 0xffff));
        for _ in 0..64 {
            if s.write_all(&rec).await.is_err() {
                break;
            }
        }
    };
    let huge_cert = |mut s: tokio::net::TcpStream| async move {
        confirm_ssl(&mut s).await;
        // Handshake records carrying a Certificate message (type 11) that claims 1 MiB.
        let mut first = vec![0x16, 0x03, 0x03, 0x40, 0x00, 0x0b, 0x10, 0x00, 0x00];
        first.extend(std::iter::repeat_n(0x30u8, 0x4000 - 4));
        let _ = s.write_all(&first).await;
        let mut rec = vec![0x16, 0x03, 0x03, 0x40, 0x00];
        rec.extend(std::iter::repeat_n(0x30u8, 0x4000));
        for _ in 0..64 {
            if s.write_all(&rec).await.is_err() {
                break;
            }
        }
    };
    let drip = |mut s: tokio::net::TcpStream| async move {
        read_cr(&mut s).await;
        for b in [3u8, 0, 0, 19, 14, 0xd0, 0, 0, 0, 0, 0, 2, 0, 8, 0, 1, 0, 0, 0] {
            if s.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let cases: Vec<(&str, SocketAddr, &[Cause])> = vec![
        ("endless garbage", hostile(endless(false)).await, &[Cause::X224NotRdp]),
        (
            "garbage after the confirm",
            hostile(endless(true)).await,
            &[Cause::TlsProtocolError],
        ),
        (
            "oversized TLS records",
            hostile(oversized).await,
            &[Cause::TlsProtocolError, Cause::TlsAlert],
        ),
        (
            "1 MiB certificate message",
            hostile(huge_cert).await,
            &[Cause::TlsProtocolError, Cause::TlsAlert],
        ),
        ("one byte a second", hostile(drip).await, &[Cause::X224Timeout]),
    ];
    for (what, addr, causes) in cases {
        let mut r = tonic::Request::new(req("127.0.0.1", addr.port()));
        r.set_timeout(Duration::from_secs(4));
        let t0 = Instant::now();
        let report = client
            .check(r)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .into_inner();
        assert!(t0.elapsed() < Duration::from_secs(4), "{what} took {:?}", t0.elapsed());
        assert_eq!(report.verdict(), Verdict::Deny, "{what}");
        assert!(
            causes.contains(&report.primary_cause()),
            "{what}: {:?}",
            report.primary_cause()
        );
    }

    // Thousands of resets: accept and close at once with SO_LINGER 0 (RST).
    let resets = hostile(|s: tokio::net::TcpStream| async move {
        // A zero linger makes close() send RST at once (it cannot block: nothing to flush).
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
        drop(s);
    })
    .await;
    let t0 = Instant::now();
    let mut answered = 0;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2000u32 {
        let mut c = client.clone();
        tasks.spawn(async move {
            c.check(req("127.0.0.1", resets.port()))
                .await
                .map(|r| (i, r.into_inner()))
        });
        if tasks.len() >= 32 {
            if let Some(Ok(Ok((_, r)))) = tasks.join_next().await {
                assert!(
                    matches!(r.primary_cause(), Cause::X224Closed | Cause::TcpRefused),
                    "{:?}",
                    r.findings
                );
                answered += 1;
            }
        }
    }
    while let Some(res) = tasks.join_next().await {
        if let Ok(Ok((_, r))) = res {
            assert!(
                matches!(r.primary_cause(), Cause::X224Closed | Cause::TcpRefused),
                "{:?}",
                r.primary_cause()
            );
            answered += 1;
        }
    }
    assert_eq!(answered, 2000, "every reset check answered");
    assert!(t0.elapsed() < Duration::from_secs(60));
    // Still healthy afterwards.
    let r = client
        .check(req("127.0.0.1", resets.port()))
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(r.verdict(), Verdict::Deny);
    let grown_mib = vm_rss_kib().saturating_sub(rss0) / 1024;
    assert!(grown_mib < 64, "memory grew by {grown_mib} MiB");
}

/// Overload: beyond the concurrent checks and the queue, RESOURCE_EXHAUSTED at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_resource_exhausted_not_a_backlog() {
    // A target that accepts and never answers keeps the one slot busy.
    let silent = hostile(|mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let mut cfg = base_config();
    cfg.policy.allow_loopback = true;
    cfg.server.max_concurrent_checks = 1;
    cfg.server.max_queued_checks = 0;
    cfg.probe.x224_timeout_ms = 1500;
    let plugin = InProcess::start(&cfg).await;
    let mut first = plugin.client().await;
    let busy = tokio::spawn(async move { first.check(req("127.0.0.1", silent.port())).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let st = plugin
        .client()
        .await
        .check(req("127.0.0.1", silent.port()))
        .await
        .expect_err("overloaded");
    assert_eq!(st.code(), tonic::Code::ResourceExhausted);
    assert!(t0.elapsed() < Duration::from_millis(500), "refused at once, not queued");
    let r = busy
        .await
        .expect("task")
        .expect("the admitted check is answered")
        .into_inner();
    assert_eq!(r.primary_cause(), Cause::X224Timeout);
}

/// Listener hardening: a bearer token is required when configured; a Unix socket serves;
/// TLS with a client CA refuses clients without a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_unix_socket_and_mutual_tls() {
    let dir = tempfile::tempdir().expect("tmp");
    let token = "s3cret-token-0123456789";
    std::fs::write(dir.path().join("token"), format!("{token}\n")).expect("write");
    let mut cfg = base_config();
    cfg.server.bearer_token_file = Some(dir.path().join("token"));
    let plugin = InProcess::start(&cfg).await;
    let mut client = plugin.client().await;
    let st = client
        .list_causes(pb::ListCausesRequest {})
        .await
        .expect_err("no token");
    assert_eq!(st.code(), tonic::Code::Unauthenticated);
    let mut r = tonic::Request::new(pb::ListCausesRequest {});
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("header"));
    assert!(client.list_causes(r).await.is_ok());
    let mut r = tonic::Request::new(pb::ListCausesRequest {});
    r.metadata_mut().insert(
        "authorization",
        "Bearer wrong-token-0123456789".parse().expect("header"),
    );
    assert_eq!(
        client.list_causes(r).await.expect_err("wrong").code(),
        tonic::Code::Unauthenticated
    );

    // Unix domain socket.
    let sock = dir.path().join("preflight.sock");
    let mut cfg = base_config();
    cfg.server.unix_socket = Some(sock.clone());
    let validated = std::sync::Arc::new(cfg.validate().expect("valid"));
    let bound = rdp_preflight::Bound::bind(&validated).await.expect("bind unix");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(rdp_preflight::serve(validated, bound, async {
        let _ = stopped.await;
    }));
    let path = sock.clone();
    let channel = tonic::transport::Endpoint::from_static("http://unix.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect over the socket");
    let causes = pb::preflight_client::PreflightClient::new(channel)
        .list_causes(pb::ListCausesRequest {})
        .await
        .expect("served over the Unix socket");
    assert!(!causes.into_inner().causes.is_empty());
    let _ = stop.send(());
    let _ = server.await;

    // Mutual TLS: a client without a certificate is refused at the handshake.
    let ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    let mut ca = ca;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("cert");
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("write");
    std::fs::write(dir.path().join("server.pem"), server_cert.pem()).expect("write");
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).expect("write");
    let mut cfg = base_config();
    cfg.server.tls_cert = Some(dir.path().join("server.pem"));
    cfg.server.tls_key = Some(dir.path().join("server.key"));
    cfg.server.client_ca = Some(dir.path().join("ca.pem"));
    let plugin = InProcess::start(&cfg).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_cert.pem()))
        .domain_name("localhost");
    let endpoint = format!("https://localhost:{}", plugin.addr.port());
    let refused = async {
        let ch = tonic::transport::Endpoint::from_shared(endpoint.clone())?
            .tls_config(tls.clone())?
            .connect()
            .await?;
        pb::preflight_client::PreflightClient::new(ch)
            .list_causes(pb::ListCausesRequest {})
            .await
            .map_err(|e| e.into())
    };
    let r: Result<_, Box<dyn std::error::Error>> = refused.await;
    assert!(r.is_err(), "a client without a certificate must be refused");
    let client_key = rcgen::KeyPair::generate().expect("key");
    let client_cert = rcgen::CertificateParams::new(vec!["gateway".to_owned()])
        .expect("params")
        .signed_by(&client_key, &issuer)
        .expect("cert");
    let tls = tls.identity(tonic::transport::Identity::from_pem(
        client_cert.pem(),
        client_key.serialize_pem(),
    ));
    let ch = tonic::transport::Endpoint::from_shared(endpoint)
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("mTLS connect");
    let causes = pb::preflight_client::PreflightClient::new(ch)
        .list_causes(pb::ListCausesRequest {})
        .await
        .expect("served over mTLS");
    assert!(!causes.into_inner().causes.is_empty());
}

/// Graceful shutdown: SIGTERM while a check is in flight lets it finish (its DENY is answered
/// and in the audit log), then the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_checks_in_flight_and_flushes_the_audit_log() {
    // A target that answers nothing for a while: the check is in flight when SIGTERM arrives.
    let slow = hostile(|mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    })
    .await;
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = base_config();
    cfg.policy.allow_loopback = true;
    cfg.probe.x224_timeout_ms = 1000;
    cfg.audit.dir = Some(dir.path().join("audit"));
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write");
    let mut served = serve_binary(&path, &[]);
    let mut client = integration_tests::plugin::client(&served.endpoint()).await;
    let in_flight = tokio::spawn(async move { client.check(req("127.0.0.1", slow.port())).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = served.child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let report = in_flight
        .await
        .expect("task")
        .expect("the check in flight is answered")
        .into_inner();
    assert_eq!(report.primary_cause(), Cause::X224Timeout);
    let status = tokio::task::block_in_place(|| {
        for _ in 0..100 {
            if let Ok(Some(s)) = served.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exits 0 after draining");
    let audit: String = std::fs::read_dir(dir.path().join("audit"))
        .expect("audit dir")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(audit.contains(&report.check_id), "the drained DENY is in the audit log");
}
