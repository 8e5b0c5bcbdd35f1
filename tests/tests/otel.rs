//! OpenTelemetry export of the real plugin to an OTLP/gRPC receiver built in the test from the
//! protocol's own types (opentelemetry-proto): one trace per check, a root span `check` and one
//! child span per stage with the stage's timing, status and cause, the ids as attributes; logs
//! through the tracing bridge; the request's password in no span, attribute or log record.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use integration_tests::plugin::{client, serve_binary};
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            logs_service_server::{LogsService, LogsServiceServer},
            ExportLogsServiceRequest, ExportLogsServiceResponse,
        },
        trace::v1::{
            trace_service_server::{TraceService, TraceServiceServer},
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        },
    },
    common::v1::{any_value::Value, KeyValue},
    trace::v1::{status::StatusCode, Span},
};
use rdp_preflight::config::FileConfig;
use rdp_preflight_proto::v1 as pb;
use tonic::{Request, Response, Status};

const CANARY: &str = "Canary-Otel-Pa55w0rd-91c2";

/// What the receiver got.
#[derive(Clone, Default)]
struct Sink {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        r: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.traces.lock().expect("lock").push(r.into_inner());
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        r: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        self.logs.lock().expect("lock").push(r.into_inner());
        Ok(Response::new(ExportLogsServiceResponse { partial_success: None }))
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn s_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn spans(sink: &Sink) -> Vec<Span> {
    let t = sink.traces.lock().expect("lock");
    t.iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| ss.spans.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_check_with_a_span_per_stage_and_no_secret() {
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let otlp = listener.local_addr().expect("addr");
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink.clone()))
        .add_service(LogsServiceServer::new(sink.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);

    let tmp = tempfile::tempdir().expect("tmp");
    let (dir, ca) = integration_tests::one_account_directory("olga", "Right-Pass-1", tmp.path()).await;
    let mut f = FileConfig::default();
    f.policy.allow_loopback = true;
    f.cert.pin_store = "memory".into();
    f.directory.servers = vec![dir.ldaps_url()];
    f.directory.ca_file = Some(ca);
    f.otel.endpoint = Some(format!("http://{otlp}"));
    f.otel.logs = true;
    f.log.level = "debug".into();
    let config = tmp.path().join("plugin.toml");
    std::fs::write(&config, toml::to_string(&f).expect("toml")).expect("config");
    let served = tokio::task::block_in_place(|| {
        serve_binary(
            &config,
            &[("OTEL_BSP_SCHEDULE_DELAY", "100"), ("OTEL_BLRP_SCHEDULE_DELAY", "100")],
        )
    });
    let mut c = client(&served.endpoint()).await;
    let port = integration_tests::slapd::free_port();
    let mut reports = Vec::new();
    for (i, with) in [false, true].into_iter().enumerate() {
        let answer = c.check(pb::CheckRequest {
            request_id: format!("otel-{i}"),
            target: Some(pb::Target {
                host: "127.0.0.1".into(),
                port: u32::from(port),
                ..Default::default()
            }),
            credential: with.then(|| pb::Credential {
                username: "olga".into(),
                domain: String::new(),
                password: CANARY.into(),
            }),
            requester: None,
        });
        let r = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no answer in 30 s; plugin log:\n{}",
                    served.stderr.lock().map(|l| l.clone()).unwrap_or_default()
                )
            })
            .expect("answered")
            .into_inner();
        reports.push(r);
    }

    // Every check's trace: its root and one span per stage.
    let want: usize = reports.iter().map(|r| 1 + r.stages.len()).sum();
    let t0 = Instant::now();
    while spans(&sink).len() < want {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{} of {want} spans exported",
            spans(&sink).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = spans(&sink);
    assert_eq!(all.len(), want, "no span twice, none extra");
    let mut traces: BTreeMap<Vec<u8>, Vec<Span>> = BTreeMap::new();
    for s in all {
        traces.entry(s.trace_id.clone()).or_default().push(s);
    }
    assert_eq!(traces.len(), reports.len(), "one trace per check");
    for r in &reports {
        let spans = traces
            .values()
            .find(|t| {
                t.iter()
                    .any(|s| s.name == "check" && s_attr(&s.attributes, "rdp_preflight.check_id") == Some(&r.check_id))
            })
            .unwrap_or_else(|| panic!("no trace for check {}", r.check_id));
        let root = spans.iter().find(|s| s.name == "check").expect("root");
        assert!(root.parent_span_id.is_empty(), "the check span is the root");
        assert_eq!(
            s_attr(&root.attributes, "rdp_preflight.request_id"),
            Some(r.request_id.as_str())
        );
        let verdict = s_attr(&root.attributes, "rdp_preflight.verdict").expect("verdict");
        assert_eq!(verdict, "deny");
        assert_eq!(
            root.status.as_ref().map(|s| s.code),
            Some(StatusCode::Error as i32),
            "a DENY is an error"
        );
        let children: Vec<&Span> = spans.iter().filter(|s| s.name != "check").collect();
        assert_eq!(children.len(), r.stages.len(), "a span per stage");
        for st in &r.stages {
            let name = format!("stage {}", stage_name(st.stage()));
            let s = children
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no span {name}"));
            assert_eq!(s.parent_span_id, root.span_id);
            assert_eq!(
                s_attr(&s.attributes, "rdp_preflight.check_id"),
                Some(r.check_id.as_str())
            );
            assert_eq!(
                s_attr(&s.attributes, "rdp_preflight.request_id"),
                Some(r.request_id.as_str())
            );
            // The stage's timing, as the report gives it (microseconds).
            let d = (s.end_time_unix_nano - s.start_time_unix_nano) / 1000;
            assert!(
                d.abs_diff(st.duration_micros) <= 1,
                "{name}: {d} µs vs {}",
                st.duration_micros
            );
            let off = (s.start_time_unix_nano - root.start_time_unix_nano) / 1000;
            assert!(off.abs_diff(st.start_offset_micros) <= 1, "{name}: offset {off}");
            assert!(s.end_time_unix_nano <= root.end_time_unix_nano + 1000);
        }
        let tcp = children.iter().find(|s| s.name == "stage tcp").expect("tcp");
        assert_eq!(s_attr(&tcp.attributes, "rdp_preflight.cause"), Some("TCP_REFUSED"));
        assert_eq!(s_attr(&tcp.attributes, "rdp_preflight.stage.status"), Some("failed"));
    }
    let res_attrs = sink.traces.lock().expect("lock")[0].resource_spans[0]
        .resource
        .as_ref()
        .expect("resource")
        .attributes
        .clone();
    assert_eq!(s_attr(&res_attrs, "service.name"), Some("rdp-preflight"));

    // Logs through the bridge: the plugin's own events, e.g. each check's "check finished".
    let t0 = Instant::now();
    loop {
        let text = format!("{:?}", sink.logs.lock().expect("lock"));
        if text.matches("check finished").count() >= reports.len() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "check logs exported: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Canary: nowhere in what was exported.
    let everything = format!(
        "{:?}{:?}",
        sink.traces.lock().expect("lock"),
        sink.logs.lock().expect("lock")
    );
    assert!(!everything.contains(CANARY), "the password was exported");
    let log = served.stderr.lock().map(|l| l.clone()).unwrap_or_default();
    assert!(!log.contains(CANARY));
    drop(served);
}

fn stage_name(s: pb::Stage) -> String {
    s.as_str_name().trim_start_matches("STAGE_").to_ascii_lowercase()
}
