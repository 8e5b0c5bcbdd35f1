//! OpenTelemetry: one trace per check over OTLP/gRPC (`[otel] endpoint`), and optionally the
//! plugin's logs through the `tracing` bridge (`[otel] logs`).
//!
//! A trace is built from the finished [`Report`], not from live spans: a root span `check`
//! from the check's start to its end, and one child span per stage at its recorded offset and
//! duration, with the stage's status and cause. Attributes come from a closed set (ids,
//! verdict, cause names and numbers, stage names, the target's host and port): never an
//! account, a password, evidence or a message. Spans are batched and exported by the SDK's
//! background thread, so a check never waits on the collector.

use std::{
    path::PathBuf,
    time::{Duration, UNIX_EPOCH},
};

use opentelemetry::{
    trace::{Span, SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _},
    Context, KeyValue,
};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use serde::{Deserialize, Serialize};

use crate::report::{Report, StageStatus};

/// Instrumentation scope of our spans and logs.
const SCOPE: &str = "rdp-preflight";

/// `[otel]`, as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelFile {
    /// OTLP/gRPC collector, `http://host:4317` or `https://host:4317` (default none: off).
    pub endpoint: Option<String>,
    /// PEM trust anchors of the collector's certificate (required with `https://`).
    pub ca_file: Option<PathBuf>,
    /// Also export the plugin's logs over OTLP (default false).
    pub logs: bool,
    /// Limit for each export (default 5000 ms).
    pub timeout_ms: u64,
}

impl Default for OtelFile {
    fn default() -> Self {
        OtelFile {
            endpoint: None,
            ca_file: None,
            logs: false,
            timeout_ms: 5_000,
        }
    }
}

/// Validated `[otel]`.
#[derive(Clone, Debug)]
pub struct OtelConfig {
    /// The collector.
    pub endpoint: String,
    /// PEM of the collector's CA (with `https://`).
    pub ca_pem: Option<String>,
    /// Export logs too.
    pub logs: bool,
    /// Export limit.
    pub timeout: Duration,
}

impl OtelFile {
    /// Validates into an [`OtelConfig`] (`None` without an endpoint); errors name the key.
    pub fn validate(&self) -> Result<Option<OtelConfig>, String> {
        if !(1..=600_000).contains(&self.timeout_ms) {
            return Err("otel.timeout_ms: must be between 1 and 600000".into());
        }
        let Some(endpoint) = self.endpoint.as_deref().map(str::trim) else {
            if self.ca_file.is_some() {
                return Err("otel.ca_file: only used with an https:// otel.endpoint".into());
            }
            if self.logs {
                return Err("otel.logs: needs otel.endpoint".into());
            }
            return Ok(None);
        };
        let bad = |why: &str| format!("otel.endpoint: {endpoint:?}: {why}");
        let uri: tonic::transport::Uri = endpoint.parse().map_err(|e| bad(&format!("{e}")))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        let ca_pem = match (uri.scheme_str(), &self.ca_file) {
            (Some("https"), Some(ca)) => {
                let pem = std::fs::read_to_string(ca).map_err(|e| format!("otel.ca_file: {}: {e}", ca.display()))?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!("otel.ca_file: {}: no PEM certificate", ca.display()));
                }
                Some(pem)
            }
            (Some("https"), None) => {
                return Err(
                    "otel.ca_file: required with an https:// otel.endpoint (the system's roots are not used)".into(),
                )
            }
            (Some("http"), None) => None,
            (Some("http"), Some(_)) => return Err("otel.ca_file: only used with an https:// otel.endpoint".into()),
            _ => return Err(bad("use http://host:port or https://host:port")),
        };
        Ok(Some(OtelConfig {
            endpoint: endpoint.to_owned(),
            ca_pem,
            logs: self.logs,
            timeout: Duration::from_millis(self.timeout_ms),
        }))
    }
}

/// The exporters. Build it inside the tokio runtime (the tonic channel needs it); the SDK
/// exports from its own background threads.
pub struct Telemetry {
    traces: opentelemetry_sdk::trace::SdkTracerProvider,
    logs: Option<opentelemetry_sdk::logs::SdkLoggerProvider>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("logs", &self.logs.is_some())
            .finish_non_exhaustive()
    }
}

fn resource() -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder()
        .with_service_name(SCOPE)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

fn tls(cfg: &OtelConfig) -> Option<tonic::transport::ClientTlsConfig> {
    cfg.ca_pem.as_ref().map(|pem| {
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem))
    })
}

impl Telemetry {
    /// Starts the exporters and installs the tracer provider as the global one.
    pub fn start(cfg: &OtelConfig) -> Result<Telemetry, String> {
        let mut b = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(cfg.timeout);
        if let Some(t) = tls(cfg) {
            b = b.with_tls_config(t);
        }
        let exporter = b.build().map_err(|e| format!("otel.endpoint: {e}"))?;
        let traces = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build();
        opentelemetry::global::set_tracer_provider(traces.clone());
        let logs = if cfg.logs {
            let mut b = opentelemetry_otlp::LogExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(cfg.timeout);
            if let Some(t) = tls(cfg) {
                b = b.with_tls_config(t);
            }
            let exporter = b.build().map_err(|e| format!("otel.endpoint: {e}"))?;
            Some(
                opentelemetry_sdk::logs::SdkLoggerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource())
                    .build(),
            )
        } else {
            None
        };
        Ok(Telemetry { traces, logs })
    }

    /// The `tracing` layer that exports the plugin's own events as OTLP logs (`otel.logs`).
    /// Only events of this crate: the exporter's own transport (tonic, h2) would otherwise log
    /// about its exports, which it would export.
    pub fn log_layer<S>(&self) -> Option<Box<dyn tracing_subscriber::Layer<S> + Send + Sync>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        let provider = self.logs.as_ref()?;
        let only_ours = tracing_subscriber::filter::Targets::new().with_target("rdp_preflight", tracing::Level::TRACE);
        Some(Box::new(
            opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(provider).with_filter(only_ours),
        ))
    }

    /// Exports what is batched and stops the exporters (blocking, bounded by their timeouts).
    pub fn shutdown(&self) {
        if let Err(e) = self.traces.shutdown() {
            tracing::warn!(error = %e, "otel: traces not all exported at shutdown");
        }
        if let Some(l) = &self.logs {
            if let Err(e) = l.shutdown() {
                tracing::warn!(error = %e, "otel: logs not all exported at shutdown");
            }
        }
    }
}

fn status(s: StageStatus) -> &'static str {
    match s {
        StageStatus::Ok => "ok",
        StageStatus::Failed => "failed",
        StageStatus::Skipped => "skipped",
        StageStatus::NotRun => "not_run",
    }
}

/// Emits the trace of one finished check on the global tracer (a no-op when none is set).
pub fn record_check(report: &Report) {
    let tracer = opentelemetry::global::tracer_provider().tracer(SCOPE);
    let start = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(report.started_at.0).unwrap_or(0))
        + Duration::from_nanos(u64::from(report.started_at.1));
    let ids = [
        KeyValue::new("rdp_preflight.check_id", report.check_id.clone()),
        KeyValue::new("rdp_preflight.request_id", report.request_id.clone()),
    ];
    let mut attrs = ids.to_vec();
    attrs.extend([
        KeyValue::new("rdp_preflight.verdict", report.verdict.as_str()),
        KeyValue::new("rdp_preflight.primary_cause", report.primary_cause.name()),
        KeyValue::new(
            "rdp_preflight.primary_cause_number",
            i64::from(report.primary_cause.number()),
        ),
        KeyValue::new("server.address", report.target.host.clone()),
        KeyValue::new("server.port", i64::from(report.target.port)),
    ]);
    let root = tracer
        .span_builder("check")
        .with_kind(SpanKind::Server)
        .with_start_time(start)
        .with_attributes(attrs)
        .start_with_context(&tracer, &Context::new());
    let cx = Context::new().with_span(root);
    for st in &report.stages {
        let cause = report
            .findings
            .iter()
            .find(|(f, _)| f.stage == st.stage)
            .map(|(f, _)| f.cause);
        let mut attrs = ids.to_vec();
        attrs.push(KeyValue::new("rdp_preflight.stage", st.stage.as_str()));
        attrs.push(KeyValue::new("rdp_preflight.stage.status", status(st.status)));
        if let Some(c) = cause {
            attrs.push(KeyValue::new("rdp_preflight.cause", c.name()));
            attrs.push(KeyValue::new("rdp_preflight.cause_number", i64::from(c.number())));
        }
        let begin = start + st.start;
        let mut span = tracer
            .span_builder(format!("stage {}", st.stage.as_str()))
            .with_kind(SpanKind::Internal)
            .with_start_time(begin)
            .with_attributes(attrs)
            .start_with_context(&tracer, &cx);
        if st.status == StageStatus::Failed {
            span.set_status(Status::error(cause.map_or("failed", |c| c.name())));
        }
        span.end_with_timestamp(begin + st.duration);
    }
    let span = cx.span();
    if report.verdict == crate::report::Verdict::Deny {
        span.set_status(Status::error(report.primary_cause.name()));
    }
    span.end_with_timestamp(start + report.duration);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_key() {
        assert!(OtelFile::default().validate().expect("off").is_none());
        let with = |e: &str| OtelFile {
            endpoint: Some(e.into()),
            ..OtelFile::default()
        };
        let c = with("http://127.0.0.1:4317").validate().expect("ok").expect("on");
        assert_eq!(c.endpoint, "http://127.0.0.1:4317");
        for (f, key) in [
            (with("127.0.0.1:4317"), "otel.endpoint"),
            (with("ftp://x:1"), "otel.endpoint"),
            (with("https://collector:4317"), "otel.ca_file"),
            (
                OtelFile {
                    ca_file: Some("/nonexistent.pem".into()),
                    ..with("https://collector:4317")
                },
                "otel.ca_file: /nonexistent.pem",
            ),
            (
                OtelFile {
                    logs: true,
                    ..OtelFile::default()
                },
                "otel.logs",
            ),
            (
                OtelFile {
                    timeout_ms: 0,
                    ..with("http://x:1")
                },
                "otel.timeout_ms",
            ),
        ] {
            let e = f.validate().expect_err(key);
            assert!(e.starts_with(key), "{e}");
        }
        assert!(toml::from_str::<OtelFile>("endpoint = \"http://x:1\"\nbogus = 1\n").is_err());
    }
}
