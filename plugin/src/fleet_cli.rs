//! `rdp-preflight fleet status` and `fleet history HOST`: the running server's view over gRPC
//! (`FleetStatus`, `TargetHistory`), so they show the same history whether it lives in memory
//! or in the shared store. The server's address, bearer token and TLS come from `--config`
//! (the server's own config file) or the flags.

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};
use rdp_preflight_proto::v1 as pb;

use crate::{audit::record::rfc3339_millis, cli::esc, config::Config};

/// `fleet …`.
#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Every target's state: target, state, cause, since, flaps in the window, certificate days
    /// left; then the flapping targets and the certificate forecast.
    Status {
        #[command(flatten)]
        server: ServerArgs,
        /// Only targets with this inventory label (`key=value`, repeatable: all must match).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Only targets whose last check found this cause (e.g. CERT_EXPIRED).
        #[arg(long)]
        cause: Option<String>,
        /// The FleetStatus answer as proto3 JSON.
        #[arg(long)]
        json: bool,
    },
    /// One target's checks, newest first.
    History {
        /// `host:port`, or a host (the default port).
        target: String,
        #[command(flatten)]
        server: ServerArgs,
        /// At most this many checks (default 50).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per check per line.
        #[arg(long)]
        json: bool,
    },
}

/// How to reach the server.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// The server's config file: its listen address, bearer token and TLS.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The server's URL (default: http://<server.listen>, https:// when it serves TLS).
    #[arg(long)]
    server: Option<String>,
    /// PEM CA of the server's certificate (for https).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// File with the bearer token (default: the config's server.bearer_token_file).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

type Client = pb::preflight_client::PreflightClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Token>,
>;

/// Adds `authorization: Bearer …` when a token is configured.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

async fn connect(a: &ServerArgs) -> Result<Client, String> {
    let cfg = match &a.config {
        Some(p) => Config::load(Some(p)).map_err(|e| e.to_string())?,
        None => Config::embedded(),
    };
    let tls = cfg.server_tls.is_some();
    let url = a.server.clone().unwrap_or_else(|| {
        let l = cfg.listen;
        format!("{}://{l}", if tls { "https" } else { "http" })
    });
    let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| format!("--server {url}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30));
    if url.starts_with("https://") {
        let mut t = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &a.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("--ca-file {}: {e}", ca.display()))?;
            t = t.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        ep = ep.tls_config(t).map_err(|e| format!("TLS: {e}"))?;
    }
    let token = match &a.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("--token-file {}: {e}", p.display()))?
                .trim()
                .to_owned(),
        ),
        None => cfg.bearer_token.as_ref().map(|t| t.expose().to_owned()),
    };
    let token = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| "the bearer token is not a valid header value".to_owned())?,
        ),
        None => None,
    };
    let channel = ep.connect().await.map_err(|e| format!("{url}: {e}"))?;
    Ok(pb::preflight_client::PreflightClient::with_interceptor(
        channel,
        Token(token),
    ))
}

fn cause_name(n: i32) -> String {
    pb::Cause::try_from(n).map_or_else(
        |_| n.to_string(),
        |c| c.as_str_name().trim_start_matches("CAUSE_").to_owned(),
    )
}

fn state_name(v: i32) -> &'static str {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Allow) => "allow",
        Ok(pb::Verdict::AllowWithWarnings) => "warn",
        Ok(pb::Verdict::Deny) => "deny",
        _ => "?",
    }
}

fn time(t: Option<&pbjson_types::Timestamp>) -> String {
    t.map_or_else(String::new, |t| {
        rfc3339_millis(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
            .chars()
            .take(19)
            .collect::<String>()
            .replace('T', " ")
    })
}

/// Runs a `fleet` command.
pub fn run(cmd: FleetCommand) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rdp-preflight: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match cmd {
            FleetCommand::Status {
                server,
                labels,
                cause,
                json,
            } => status(&server, &labels, cause.as_deref(), json).await,
            FleetCommand::History {
                target,
                server,
                limit,
                json,
            } => history(&server, &target, limit, json).await,
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdp-preflight: {e}");
            ExitCode::from(crate::cli::EXIT_USAGE)
        }
    }
}

async fn status(a: &ServerArgs, labels: &[String], cause: Option<&str>, json: bool) -> Result<(), String> {
    let mut req = pb::FleetStatusRequest::default();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| format!("--label {l:?}: use KEY=VALUE"))?;
        req.labels.insert(k.to_owned(), v.to_owned());
    }
    if let Some(c) = cause {
        let c = crate::cause::Cause::from_name(c).ok_or_else(|| format!("--cause {c:?}: unknown cause"))?;
        req.cause = i32::from(c.number());
    }
    let mut client = connect(a).await?;
    let s = client
        .fleet_status(req)
        .await
        .map_err(|e| format!("FleetStatus: {}", e.message()))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(());
    }
    let hours = s.window_seconds / 3600;
    let _ = writeln!(
        out,
        "{:<32} {:<6} {:<30} {:<20} {:>10} {:>9}",
        "TARGET",
        "STATE",
        "CAUSE",
        "SINCE (UTC)",
        format!("FLAPS/{hours}H"),
        "CERT DAYS"
    );
    for t in &s.targets {
        let since = time(t.since.as_ref());
        let checked = t.last_checked.is_some();
        let _ = writeln!(
            out,
            "{:<32} {:<6} {:<30} {:<20} {:>10} {:>9}",
            esc(&t.target),
            if checked { state_name(t.verdict) } else { "-" },
            if checked {
                cause_name(t.primary_cause)
            } else {
                "not checked yet".to_owned()
            },
            if t.since_exact { since } else { format!("≤{since}") },
            format!("{}{}", t.changes, if t.flapping { " FLAP" } else { "" }),
            t.cert_days_left.map_or_else(|| "-".to_owned(), |d| d.to_string())
        );
    }
    let _ = writeln!(out, "{} target(s)", s.targets.len());
    for f in &s.findings {
        let _ = writeln!(out, "{}: {}", f.kind, esc(&f.message));
    }
    if !s.forecast.is_empty() {
        let _ = writeln!(out, "certificates expiring soonest:");
        for f in &s.forecast {
            let _ = writeln!(
                out,
                "  {:<32} {:>5} day(s)  {}",
                esc(&f.target),
                f.days_left,
                time(f.not_after.as_ref())
            );
        }
    }
    Ok(())
}

async fn history(a: &ServerArgs, target: &str, limit: u32, json: bool) -> Result<(), String> {
    let mut client = connect(a).await?;
    let h = client
        .target_history(pb::TargetHistoryRequest {
            target: target.to_owned(),
            page_size: limit,
            page_token: String::new(),
        })
        .await
        .map_err(|e| format!("TargetHistory: {}", e.message()))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if !json {
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<6} {:<30} {:>8}  CERT",
            "STARTED (UTC)", "SOURCE", "STATE", "CAUSE", "MS"
        );
    }
    for e in &h.entries {
        if json {
            let _ = writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default());
        } else {
            let _ = writeln!(
                out,
                "{:<20} {:<8} {:<6} {:<30} {:>8}  {}",
                time(e.started_at.as_ref()),
                e.source,
                state_name(e.verdict),
                cause_name(e.primary_cause),
                e.duration_millis,
                e.cert_sha256_fingerprint.get(..16).unwrap_or("-")
            );
        }
    }
    if !json {
        let _ = writeln!(out, "{} check(s)", h.entries.len());
    }
    Ok(())
}
