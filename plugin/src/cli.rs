//! Command line: `serve`, `check`, `config check`, `--version`.
//!
//! Exit status of `check`: 0 allow (also with warnings), 3 deny, 2 usage or config error,
//! 1 internal error.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    cause::Severity,
    check::{CheckInput, Checker},
    config::{self, Config, FileConfig},
    probe::x224::protocol,
    report::{Report, StageStatus, Verdict},
    secret::{Credential, Password},
};

/// Exit status for a DENY verdict.
pub const EXIT_DENY: u8 = 3;
/// Exit status for usage and configuration errors.
pub const EXIT_USAGE: u8 = 2;

const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nproto: preflight.v1",
    "\ntls: rustls (ring provider), TLS 1.2 and 1.3",
    "\ntarget: ",
    env!("PREFLIGHT_BUILD_TARGET"),
    "\nprofile: ",
    env!("PREFLIGHT_BUILD_PROFILE"),
);

#[derive(Parser, Debug)]
#[command(name = "rdp-preflight", version, long_version = LONG_VERSION, about = "Pre-session RDP target and credential checks for PAM gateways")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gRPC server (Preflight, grpc.health.v1, reflection).
    Serve {
        /// TOML config file (embedded defaults when absent).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding server.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Allow loopback targets (test fleets, local tunnels).
        #[arg(long)]
        allow_loopback: bool,
    },
    /// Run one check in-process and print the report.
    Check(Box<CheckArgs>),
    /// Review the audit log: list, summary, verify, tail.
    Audit {
        #[command(subcommand)]
        command: crate::audit::cli::AuditCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Probe every target of an inventory once (never with a credential) and print the table,
    /// or one JSON object per target per line.
    Sweep(SweepArgs),
    /// The fleet as the running server's check history sees it: `fleet status`,
    /// `fleet history HOST`.
    Fleet {
        #[command(subcommand)]
        command: crate::fleet_cli::FleetCommand,
    },
    /// The shared store: apply its schema migrations.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Args, Debug)]
struct SweepArgs {
    /// The inventory: CSV with the header `host,port,expected_name,expected_computer,labels`.
    #[arg(long)]
    inventory: PathBuf,
    /// TOML config file (policy, trust anchors, limits).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Allow loopback targets.
    #[arg(long)]
    allow_loopback: bool,
    /// Targets probed at once (default 8).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// One JSON object per target per line (host, port, verdict, primary_cause, findings).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Apply the schema migrations the database lacks (also done by `serve` at start; safe
    /// when several replicas start at once).
    Migrate {
        /// The TOML config file naming `[store] url`.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a config file and print the effective configuration (secrets redacted).
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Target host name or IP literal.
    #[arg(long)]
    host: String,
    /// Target port (default from config, 3389).
    #[arg(long)]
    port: Option<u16>,
    /// Name the certificate must carry (default: --host).
    #[arg(long)]
    expected_name: Option<String>,
    /// Computer name the NLA challenge must name.
    #[arg(long)]
    expected_computer: Option<String>,
    /// PEM trust anchors for the target certificate (repeatable; adds to the config's).
    #[arg(long = "trust-anchor")]
    trust_anchors: Vec<PathBuf>,
    /// Requested protocols, comma-separated: rdp, ssl, hybrid, hybrid_ex, rdstls, rdsaad.
    #[arg(long, value_delimiter = ',')]
    protocols: Vec<String>,
    /// Weakest protocol the server may select.
    #[arg(long)]
    min_protocol: Option<String>,
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the report as proto3 JSON.
    #[arg(long)]
    json: bool,
    /// Allow loopback targets.
    #[arg(long)]
    allow_loopback: bool,
    /// Check budget in milliseconds (default from config).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Pin store: auto, memory, off or a file path (overrides cert.pin_store).
    #[arg(long)]
    pin_store: Option<String>,
    /// Target account (sAMAccountName, UPN or the {user} of a DN template).
    #[arg(long)]
    user: Option<String>,
    /// Target account's domain.
    #[arg(long)]
    domain: Option<String>,
    /// Environment variable holding the password (never pass a password on the command line).
    #[arg(long, conflicts_with = "password_file")]
    password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Directory server URL, ldaps:// or ldap:// (repeatable, tried in order; overrides config).
    #[arg(long = "directory")]
    directories: Vec<String>,
    /// PEM trust anchors for the directory's certificate.
    #[arg(long)]
    directory_ca: Option<PathBuf>,
    /// Bind identity: upn, downlevel, dn:TEMPLATE or search.
    #[arg(long)]
    bind_as: Option<String>,
    /// Never complete the NTLM logon on the target (the challenge is still read).
    #[arg(long)]
    no_nla_logon: bool,
    /// When to complete the NTLM logon: auto (only towards a target that proved who it is),
    /// always, or off (overrides config).
    #[arg(long, value_name = "MODE")]
    nla_logon: Option<String>,
    /// How the NLA logon authenticates: ntlm, kerberos (the service ticket, never NTLM) or
    /// negotiate (overrides config).
    #[arg(long, value_name = "MODE")]
    nla_auth: Option<String>,
    /// Kerberos realm: prove the credential by AS exchange (overrides config).
    #[arg(long)]
    realm: Option<String>,
    /// KDC as HOST:PORT (repeatable, tried in order; overrides config).
    #[arg(long = "kdc")]
    kdcs: Vec<String>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Serve {
            config,
            listen,
            allow_loopback,
        } => serve(config.as_deref(), listen, allow_loopback),
        Command::Check(args) => check(*args),
        Command::Audit { command } => crate::audit::cli::run(command),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(&file),
        Command::Store {
            command: StoreCommand::Migrate { config },
        } => store_migrate(&config),
        Command::Sweep(args) => sweep(&args),
        Command::Fleet { command } => crate::fleet_cli::run(command),
    }
}

fn sweep(args: &SweepArgs) -> ExitCode {
    let mut file = match FileConfig::load(args.config.as_deref()) {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    file.policy.allow_loopback |= args.allow_loopback;
    let cfg = match file.validate() {
        Ok(c) => Arc::new(c),
        Err(e) => return usage(e),
    };
    init_tracing(&cfg);
    let inventory = match std::fs::read_to_string(&args.inventory)
        .map_err(|e| e.to_string())
        .and_then(|t| crate::sweep::parse_inventory(&t))
    {
        Ok(i) => i,
        Err(e) => return usage(format!("--inventory {}: {e}", args.inventory.display())),
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    let reports = rt.block_on(async {
        let (checker, store) = Checker::open(cfg.clone()).await?;
        // With the shared store, the pass is part of the cluster's history.
        let history = store.map(|s| {
            Arc::new(crate::store::history::PgHistory::new(s, cfg.history)) as Arc<dyn crate::history::History>
        });
        Ok::<_, String>(crate::sweep::run_pass(Arc::new(checker), &inventory, args.concurrency, history).await)
    });
    let reports = match reports {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    let mut out = std::io::stdout().lock();
    if !args.json {
        let _ = writeln!(
            out,
            "{:<32} {:>5}  {:<20} {:<34} {:>8}",
            "HOST", "PORT", "VERDICT", "PRIMARY CAUSE", "MS"
        );
    }
    for r in &reports {
        if args.json {
            let p = crate::service::to_proto(r);
            let full = serde_json::to_value(&p).unwrap_or_default();
            let line = serde_json::json!({
                "host": r.target.host,
                "port": r.target.port,
                "verdict": full["verdict"],
                "primary_cause": full["primaryCause"],
                "findings": full["findings"],
            });
            let _ = writeln!(out, "{line}");
        } else {
            let _ = writeln!(
                out,
                "{:<32} {:>5}  {:<20} {:<34} {:>8.1}",
                esc(&r.target.host),
                r.target.port,
                r.verdict.as_str(),
                r.primary_cause.name(),
                r.duration.as_secs_f64() * 1000.0
            );
        }
    }
    let denied = reports
        .iter()
        .filter(|r| r.verdict == crate::report::Verdict::Deny)
        .count();
    if !args.json {
        let _ = writeln!(out, "{} target(s), {denied} denied", reports.len());
    }
    if denied > 0 {
        ExitCode::from(EXIT_DENY)
    } else {
        ExitCode::SUCCESS
    }
}

fn store_migrate(path: &std::path::Path) -> ExitCode {
    let cfg = match Config::load(Some(path)) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    init_tracing(&cfg);
    let Some(sc) = cfg.store.clone() else {
        return usage(format!("{}: no [store] url", path.display()));
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    match rt.block_on(crate::store::Store::open(sc)) {
        Ok(s) => {
            println!("store {}: schema up to date", s.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rdp-preflight: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("rdp-preflight: {msg}");
    ExitCode::from(EXIT_USAGE)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("rdp-preflight: runtime: {e}");
            ExitCode::FAILURE
        })
}

/// A layer of the `tracing` subscriber.
type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Initialises `tracing` (stderr; JSON when configured). `RUST_LOG` wins over the config.
pub fn init_tracing(cfg: &Config) {
    init_tracing_with(cfg, None);
}

/// Like [`init_tracing`], with one more layer (the OTLP log bridge).
fn init_tracing_with(cfg: &Config, extra: Option<BoxedLayer>) {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let mut layers: Vec<BoxedLayer> = vec![if cfg.log_json { fmt.json().boxed() } else { fmt.boxed() }];
    layers.extend(extra);
    let _ = tracing_subscriber::registry().with(layers).with(filter).try_init();
}

fn serve(path: Option<&Path>, listen: Option<String>, allow_loopback: bool) -> ExitCode {
    let mut file = match FileConfig::load(path) {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    if let Some(l) = listen {
        file.server.listen = l;
    }
    file.policy.allow_loopback |= allow_loopback;
    let cfg = match file.validate() {
        Ok(c) => Arc::new(c),
        Err(e) => return usage(e),
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    // The OTLP exporters need the runtime to exist when they are built.
    let telemetry = match &cfg.otel {
        Some(o) => {
            let _in_runtime = rt.enter();
            match crate::otel::Telemetry::start(o) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("rdp-preflight: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    init_tracing_with(&cfg, telemetry.as_ref().and_then(crate::otel::Telemetry::log_layer));
    let code = rt.block_on(async move {
        let bound = match crate::Bound::bind(&cfg).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("rdp-preflight: cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        };
        let ready = |addr: &str| {
            tracing::info!(listen = %addr, version = env!("CARGO_PKG_VERSION"), "serving preflight.v1");
            // Machine-readable line for supervisors and tests that bind port 0.
            println!("listening on {addr}");
            let _ = std::io::stdout().flush();
        };
        match crate::serve_with_ready(cfg, bound, shutdown_signal(), ready).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rdp-preflight: {e}");
                ExitCode::FAILURE
            }
        }
    });
    // Exports what is batched; the runtime's workers still run the exporters' channel.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    code
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn read_password(args: &CheckArgs) -> Result<Option<Password>, String> {
    if let Some(var) = &args.password_env {
        return std::env::var(var)
            .map(|p| Some(Password::new(p)))
            .map_err(|_| format!("--password-env: environment variable {var} is not set"));
    }
    if let Some(path) = &args.password_file {
        let s = std::fs::read_to_string(path).map_err(|e| format!("--password-file {}: {e}", path.display()))?;
        let s = s
            .strip_suffix('\n')
            .map(|s| s.strip_suffix('\r').unwrap_or(s))
            .unwrap_or(&s)
            .to_owned();
        return Ok(Some(Password::new(s)));
    }
    Ok(None)
}

fn check(args: CheckArgs) -> ExitCode {
    let mut file = match FileConfig::load(args.config.as_deref()) {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    file.policy.allow_loopback |= args.allow_loopback;
    file.cert.trust_anchors.extend(args.trust_anchors.iter().cloned());
    if let Some(p) = &args.pin_store {
        file.cert.pin_store = p.clone();
    }
    if !args.directories.is_empty() {
        file.directory.servers = args.directories.clone();
    }
    if let Some(ca) = &args.directory_ca {
        file.directory.ca_file = Some(ca.clone());
    }
    if let Some(b) = &args.bind_as {
        file.directory.bind_as = b.clone();
    }
    if let Some(m) = &args.nla_logon {
        file.nla.logon = m.clone();
    }
    if let Some(m) = &args.nla_auth {
        file.nla.auth = m.clone();
    }
    if let Some(r) = &args.realm {
        file.kerberos.realm = Some(r.clone());
    }
    if !args.kdcs.is_empty() {
        file.kerberos.kdcs = args.kdcs.clone();
    }
    if args.no_nla_logon {
        file.nla.logon = "off".into();
    }
    let cfg = match file.validate() {
        Ok(c) => Arc::new(c),
        Err(e) => return usage(e),
    };
    init_tracing(&cfg);
    let password = match read_password(&args) {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let credential = match (&args.user, password) {
        (Some(u), Some(p)) => Some(Credential {
            username: u.clone(),
            domain: args.domain.clone().unwrap_or_default(),
            password: p,
        }),
        // A user without a password is checked as CRED_MISSING, never as an empty bind.
        (Some(u), None) => Some(Credential {
            username: u.clone(),
            domain: args.domain.clone().unwrap_or_default(),
            password: Password::new(String::new()),
        }),
        (None, Some(_)) => return usage("--password-env/--password-file need --user"),
        (None, None) => None,
    };
    if let Some(c) = &credential {
        if let Err((field, why)) = crate::check::validate_credential(&cfg, c) {
            return usage(format!("--domain ({field}): {why}"));
        }
    }
    let mut requested = 0;
    for p in &args.protocols {
        match config::parse_protocol(p) {
            Some(v) => requested |= v,
            None => return usage(format!("--protocols: unknown protocol {p:?}")),
        }
    }
    if args.protocols.is_empty() {
        requested = cfg.default_protocols;
    }
    let minimum = match &args.min_protocol {
        Some(p) => match config::parse_protocol(p) {
            Some(v) => Some(v),
            None => return usage(format!("--min-protocol: unknown protocol {p:?}")),
        },
        None => cfg.minimum_protocol,
    };
    let input = CheckInput {
        request_id: format!("cli-{}", std::process::id()),
        host: args.host.clone(),
        port: args.port.unwrap_or(cfg.default_port),
        expected_name: args.expected_name.clone().unwrap_or_else(|| args.host.clone()),
        requested,
        minimum,
        expected_computer: args.expected_computer.clone().unwrap_or_default(),
        credential,
        requester_user: std::env::var("USER").unwrap_or_default(),
        requester_source: "cli".into(),
        budget: args.timeout_ms.map_or(cfg.default_budget, Duration::from_millis),
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    let report = rt.block_on(async {
        let (checker, _store) = Checker::open(cfg.clone()).await?;
        checker
            .run(input)
            .await
            .map_err(|e| format!("internal error: {}", e.message))
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    if args.json {
        match crate::service::report_json(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("rdp-preflight: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", render_table(&report));
    }
    match report.verdict {
        Verdict::Deny => ExitCode::from(EXIT_DENY),
        _ => ExitCode::SUCCESS,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Text that came from the target or the directory (certificate subjects, NTLM names, LDAP
/// diagnostics, evidence), made safe for a terminal: control characters (C0, DEL, C1, so no
/// escape sequences and no forged lines) and bidirectional overrides are written as `\u{..}`
/// escapes; everything else is kept as is.
pub fn esc(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The readable report: summary, stages with timings, findings with evidence and remediation.
pub fn render_table(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let t = &r.target;
    let verdict = match r.verdict {
        Verdict::Allow => "ALLOW",
        Verdict::AllowWithWarnings => "ALLOW_WITH_WARNINGS",
        Verdict::Deny => "DENY",
    };
    let _ = writeln!(s, "check {}  request {}", r.check_id, esc(&r.request_id));
    let _ = writeln!(
        s,
        "target  {}:{}  verdict {verdict}  primary {} ({})  in {} ms",
        esc(&t.host),
        t.port,
        r.primary_cause,
        r.primary_cause.number(),
        ms(r.duration)
    );
    if let Some(info) = r.primary_cause.info() {
        let e = info.client_error();
        if e.disconnect_reason != 0 {
            let _ = writeln!(
                s,
                "client  would have shown {}: {} (FreeRDP ERRCONNECT_{})",
                e.code, e.text, e.freerdp
            );
        }
    }
    let _ = writeln!(
        s,
        "\n{:<11} {:<8} {:>9} {:>9}  detail",
        "stage", "status", "start ms", "took ms"
    );
    for st in &r.stages {
        let status = match st.status {
            StageStatus::Ok => "ok",
            StageStatus::Failed => "FAILED",
            StageStatus::Skipped => "skipped",
            StageStatus::NotRun => "not run",
        };
        let _ = writeln!(
            s,
            "{:<11} {:<8} {:>9} {:>9}  {}",
            st.stage.as_str(),
            status,
            ms(st.start),
            ms(st.duration),
            esc(&st.detail)
        );
    }
    if !r.findings.is_empty() {
        let _ = writeln!(s, "\nfindings");
        for (f, sev) in &r.findings {
            let sev = match sev {
                Severity::Deny => "DENY",
                Severity::Warn => "warn",
            };
            let owner = f.cause.info().map_or("", |i| i.owner.as_str());
            let _ = writeln!(
                s,
                "  [{sev}] {} {}  (stage {}, owner {owner})",
                f.cause.number(),
                f.cause,
                f.stage
            );
            let _ = writeln!(s, "        {}", esc(&f.message));
            if !f.evidence.is_empty() {
                let ev = f
                    .evidence
                    .iter()
                    .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
                    .collect::<Vec<_>>()
                    .join("  ");
                let _ = writeln!(s, "        evidence: {ev}");
            }
            if let Some(i) = f.cause.info() {
                let _ = writeln!(s, "        fix: {}", i.remediation);
            }
        }
    }
    let _ = writeln!(s, "\nfacts");
    if let Some(a) = t.connected {
        let _ = writeln!(
            s,
            "  connected {a} (resolved {})",
            t.resolved
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        s,
        "  requested {}  selected {}",
        protocol::names(t.requested_protocols),
        t.selected_protocol.map_or("-".to_owned(), protocol::name)
    );
    if !t.tls_version.is_empty() {
        let _ = writeln!(s, "  tls {} {}", esc(&t.tls_version), esc(&t.cipher_suite));
    }
    if let Some(c) = &t.certificate {
        let _ = writeln!(s, "  cert subject {}  issuer {}", esc(&c.subject), esc(&c.issuer));
        let _ = writeln!(
            s,
            "       valid {} .. {}  {} {}  {}  sha256 {}",
            crate::probe::cert::rfc3339(c.not_before),
            crate::probe::cert::rfc3339(c.not_after),
            esc(&c.key_type),
            c.key_bits,
            esc(&c.signature_algorithm),
            c.sha256_fingerprint
        );
        let _ = writeln!(
            s,
            "       verifier: {}{}",
            esc(&c.verifier_verdict),
            if c.self_signed { " (self-signed)" } else { "" }
        );
    }
    let n = &r.nla;
    if n.credssp_version != 0 {
        let offset = n.clock_offset_millis.map_or("-".to_owned(), |o| format!("{o:+} ms"));
        let _ = writeln!(
            s,
            "  nla CredSSP v{}  computer {} / {}  domain {} / {}  os {}  clock offset {offset}  logon {}",
            n.credssp_version,
            esc(&n.netbios_computer),
            esc(&n.dns_computer),
            esc(&n.netbios_domain),
            esc(&n.dns_domain),
            esc(&n.os_version),
            esc(&n.logon)
        );
    }
    let c = &r.credential;
    match c.checked_by.as_str() {
        "" => {}
        "ldap" => {
            let _ = writeln!(
                s,
                "  credential checked by LDAP bind as {} at {}",
                esc(&c.bind_identity),
                esc(&c.directory_server)
            );
        }
        other => {
            let _ = writeln!(s, "  credential checked by {} on the target", esc(other));
        }
    }
    s
}

fn config_check(file: &Path) -> ExitCode {
    match Config::load(Some(file)) {
        Ok(cfg) => {
            // A pin file that `serve` would refuse (corrupt, unreadable) fails the check too.
            if let Err(e) = crate::probe::pins::PinStore::open(&cfg.pin_store, cfg.pins.clone()) {
                return usage(e);
            }
            // The file mirror holds paths and env-var names for secrets, never secret values.
            match toml::to_string_pretty(&cfg.file) {
                Ok(t) => {
                    println!("# {}: valid; effective configuration:", file.display());
                    print!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rdp-preflight: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => usage(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cause::Cause,
        report::{CertFacts, CredentialFacts, Finding, NlaFacts, TargetFacts},
    };

    /// Target-controlled text (a certificate subject, NTLM names, an LDAP diagnostic) reaches
    /// the table escaped: no terminal escape sequence, no forged line.
    #[test]
    fn table_escapes_control_characters_from_the_target() {
        let hostile = "CN=evil\x1b[2J\r\n[deny] 0 OK forged\u{202e}";
        let report = Report {
            check_id: "01".into(),
            request_id: "r1".into(),
            verdict: Verdict::Deny,
            primary_cause: Cause::CredInvalid,
            findings: vec![(
                Finding::new(Cause::CredInvalid, format!("directory said: {hostile}")).with("diagnostic", hostile),
                Severity::Deny,
            )],
            stages: Vec::new(),
            target: TargetFacts {
                host: "rdp1".into(),
                port: 3389,
                certificate: Some(CertFacts {
                    subject: hostile.into(),
                    issuer: hostile.into(),
                    ..CertFacts::default()
                }),
                ..TargetFacts::default()
            },
            credential: CredentialFacts::default(),
            nla: NlaFacts {
                credssp_version: 6,
                netbios_computer: hostile.into(),
                ..NlaFacts::default()
            },
            started_at: (0, 0),
            duration: Duration::ZERO,
        };
        let table = render_table(&report);
        assert!(!table.contains('\x1b'), "{table}");
        assert!(!table.contains('\r'), "{table}");
        assert!(!table.contains('\u{202e}'), "{table}");
        assert!(!table.lines().any(|l| l.starts_with("[deny] 0 OK")), "{table}");
        assert!(
            table.contains("CN=evil\\u{1b}[2J\\u{d}\\u{a}[deny] 0 OK forged"),
            "{table}"
        );
        assert_eq!(esc("plain CN=rdp1, O=Ünïcode"), "plain CN=rdp1, O=Ünïcode");
    }
}
