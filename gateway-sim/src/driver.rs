//! The driver: plays a scenario's rows against a running plugin the way a gateway would (one
//! `Check` per row and repetition) and compares the primary cause and verdict with the row's
//! expectation.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, time::Duration};

use futures::{stream, StreamExt};
use rdp_preflight_proto::v1::{
    preflight_client::PreflightClient, CheckReport, CheckRequest, Credential, Requester, Target, Verdict,
};
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::{
    directory::Directory,
    scenario::{cause_name, Row, Scenario},
    targets::Fleet,
};

/// Requester user the driver puts in every request.
pub const REQUESTER_USER: &str = "gateway-sim";
/// Requester source address the driver puts in every request.
pub const REQUESTER_SOURCE: &str = "127.0.0.1";

/// The simulated directory the plugin was configured with.
#[derive(Debug)]
pub enum DirectoryHandle {
    /// Running in this process (dropping the environment stops it).
    Local(Directory),
    /// Running in another process (`gateway-sim targets`), known from the fleet manifest.
    Remote {
        /// `ldaps://…` URL.
        url: String,
    },
}

impl DirectoryHandle {
    /// The LDAPS URL.
    pub fn url(&self) -> String {
        match self {
            DirectoryHandle::Local(d) => d.ldaps_url(),
            DirectoryHandle::Remote { url } => url.clone(),
        }
    }
}

/// Everything simulated that rows can refer to.
#[derive(Debug)]
pub struct SimEnv {
    /// The target fleet (running in process, or described by a manifest).
    pub fleet: Fleet,
    /// The simulated directory; rows with an `account` are skipped without it.
    pub directory: Option<DirectoryHandle>,
    /// The simulated KDC, when a row or target uses Kerberos.
    pub kdc: Option<crate::kdc::Kdc>,
}

impl SimEnv {
    /// An environment with targets only.
    pub fn new(fleet: Fleet) -> SimEnv {
        SimEnv {
            fleet,
            directory: None,
            kdc: None,
        }
    }

    /// Adds a directory running in this process.
    pub fn with_directory(mut self, directory: Directory) -> SimEnv {
        self.directory = Some(DirectoryHandle::Local(directory));
        self
    }
}

/// How rows are played.
#[derive(Clone, Debug)]
pub struct PlayOptions {
    /// gRPC deadline of each Check (sent to the plugin as `grpc-timeout`).
    pub deadline: Duration,
    /// Rows of different targets played at the same time. Rows naming the same target always
    /// run one after the other, in file order (flapping and pin rows depend on it).
    pub jobs: usize,
    /// A plugin configured without a directory, for `nla_only` rows (the target alone judges
    /// their credential). `None`: those rows go to the main plugin too.
    pub nla_only_plugin: Option<String>,
    /// A plugin configured with `[kerberos]` (the simulated KDC), for `kerberos` rows; `None`:
    /// those rows are skipped.
    pub kerberos_plugin: Option<String>,
}

impl Default for PlayOptions {
    fn default() -> Self {
        PlayOptions {
            deadline: Duration::from_secs(30),
            jobs: 4,
            nla_only_plugin: None,
            kerberos_plugin: None,
        }
    }
}

/// How a row ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Cause and verdict as expected.
    Ok,
    /// The plugin answered something else.
    Mismatch,
    /// Not played (needs the directory).
    Skip,
    /// No report: gRPC error, unknown target, bad endpoint.
    Error,
}

impl Outcome {
    /// Table label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Mismatch => "MISMATCH",
            Outcome::Skip => "SKIP",
            Outcome::Error => "ERROR",
        }
    }
}

/// What happened to one row.
#[derive(Clone, Debug, Serialize)]
pub struct RowResult {
    /// Row name.
    pub row: String,
    /// Target name.
    pub target: String,
    /// Checks sent (the last one is judged).
    pub attempts: u32,
    /// Expected primary cause (catalog name without `CAUSE_`).
    pub expect_cause: String,
    /// Expected verdict (`allow`, `allow_with_warnings`, `deny`).
    pub expect_verdict: String,
    /// Primary cause of the last report.
    pub got_cause: Option<String>,
    /// Verdict of the last report.
    pub got_verdict: Option<String>,
    /// Round-trip time of the last Check, in milliseconds.
    pub latency_ms: f64,
    /// Result.
    pub outcome: Outcome,
    /// Why skipped, or the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The last report, as the plugin sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<CheckReport>,
}

impl RowResult {
    fn new(row: &Row) -> RowResult {
        RowResult {
            row: row.name.clone(),
            target: row.target.clone(),
            attempts: 0,
            expect_cause: cause_name(row.expect_cause).to_owned(),
            expect_verdict: row.expect_verdict.as_str().to_owned(),
            got_cause: None,
            got_verdict: None,
            latency_ms: 0.0,
            outcome: Outcome::Error,
            detail: None,
            report: None,
        }
    }

    fn fail(mut self, outcome: Outcome, detail: impl Into<String>) -> RowResult {
        self.outcome = outcome;
        self.detail = Some(detail.into());
        self
    }

    /// OK or SKIP.
    pub fn passed(&self) -> bool {
        matches!(self.outcome, Outcome::Ok | Outcome::Skip)
    }
}

/// Verdict name as the scenario writes it (`allow_with_warnings`).
pub fn verdict_name(verdict: i32) -> String {
    match Verdict::try_from(verdict) {
        Ok(v) => v.as_str_name().trim_start_matches("VERDICT_").to_ascii_lowercase(),
        Err(_) => format!("unknown({verdict})"),
    }
}

/// Cause name as the scenario writes it (`CERT_EXPIRED`).
pub fn primary_cause_name(cause: i32) -> String {
    match rdp_preflight_proto::v1::Cause::try_from(cause) {
        Ok(c) => cause_name(c).to_owned(),
        Err(_) => format!("UNKNOWN({cause})"),
    }
}

/// The Check a row sends on its `attempt`-th play (1-based).
pub fn check_request(scenario: &Scenario, row: &Row, addr: SocketAddr, attempt: u32) -> CheckRequest {
    let credential = row
        .account
        .as_deref()
        .and_then(|name| scenario.account(name))
        .map(|account| Credential {
            username: row.user.clone().unwrap_or_else(|| account.name.clone()),
            domain: account.domain.clone().unwrap_or_default(),
            password: row.password.clone().unwrap_or_else(|| account.password.clone()),
        });
    CheckRequest {
        request_id: format!("sim-{}-{attempt}", row.name),
        target: Some(Target {
            host: row.host.clone().unwrap_or_else(|| addr.ip().to_string()),
            port: u32::from(addr.port()),
            expected_name: row.expected_name.clone().unwrap_or_else(|| row.target.clone()),
            requested_protocols: row.protocols.iter().map(|p| *p as i32).collect(),
            minimum_protocol: 0,
            expected_computer: row.expected_computer.clone().unwrap_or_default(),
        }),
        credential,
        requester: Some(Requester {
            user: REQUESTER_USER.to_owned(),
            source_address: REQUESTER_SOURCE.to_owned(),
        }),
    }
}

/// A lazily connecting client for `plugin_endpoint` (`http://127.0.0.1:50051`).
pub fn plugin_client(plugin_endpoint: &str) -> Result<PreflightClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(plugin_endpoint.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    Ok(PreflightClient::new(endpoint.connect_lazy()))
}

/// Rows of one target with their index in the scenario.
type RowGroup<'a> = Vec<(usize, &'a Row)>;

/// Plays every row with [`PlayOptions::default`]; results are in row order.
pub async fn play(plugin_endpoint: &str, scenario: &Scenario, env: &SimEnv) -> Vec<RowResult> {
    play_with(plugin_endpoint, scenario, env, &PlayOptions::default()).await
}

/// Plays every row; results are in row order.
pub async fn play_with(
    plugin_endpoint: &str,
    scenario: &Scenario,
    env: &SimEnv,
    options: &PlayOptions,
) -> Vec<RowResult> {
    let clients = plugin_client(plugin_endpoint).and_then(|main| {
        let nla_only = match &options.nla_only_plugin {
            Some(e) => plugin_client(e)?,
            None => main.clone(),
        };
        let kerberos = match &options.kerberos_plugin {
            Some(e) => plugin_client(e)?,
            None => main.clone(),
        };
        Ok((main, nla_only, kerberos))
    });
    let (client, nla_client, krb_client) = match clients {
        Ok(clients) => clients,
        Err(e) => {
            return scenario
                .rows
                .iter()
                .map(|row| {
                    RowResult::new(row).fail(Outcome::Error, format!("plugin endpoint {plugin_endpoint:?}: {e}"))
                })
                .collect();
        }
    };
    // Rows grouped by target, groups in order of first appearance.
    let mut groups: BTreeMap<&str, (usize, RowGroup<'_>)> = BTreeMap::new();
    for (i, row) in scenario.rows.iter().enumerate() {
        groups
            .entry(row.target.as_str())
            .or_insert_with(|| (i, Vec::new()))
            .1
            .push((i, row));
    }
    let mut groups: Vec<_> = groups.into_values().collect();
    groups.sort_by_key(|(first, _)| *first);

    let mut results: Vec<(usize, RowResult)> = stream::iter(groups)
        .map(|(_, rows)| {
            let (client, nla_client, krb_client) = (client.clone(), nla_client.clone(), krb_client.clone());
            async move {
                let mut out = Vec::with_capacity(rows.len());
                for (i, row) in rows {
                    let c = if row.kerberos {
                        krb_client.clone()
                    } else if row.nla_only {
                        nla_client.clone()
                    } else {
                        client.clone()
                    };
                    out.push((i, play_row(c, scenario, env, row, options).await));
                }
                out
            }
        })
        .buffer_unordered(options.jobs.max(1))
        .flat_map(stream::iter)
        .collect()
        .await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

async fn play_row(
    client: PreflightClient<Channel>,
    scenario: &Scenario,
    env: &SimEnv,
    row: &Row,
    options: &PlayOptions,
) -> RowResult {
    let result = RowResult::new(row);
    if row.kerberos && options.kerberos_plugin.is_none() {
        return result.fail(
            Outcome::Skip,
            "a Kerberos row and no plugin configured with the simulated KDC",
        );
    }
    // An `nla_only` credential is judged by the target itself: no directory needed.
    if row.account.is_some() && !row.nla_only && !row.kerberos && env.directory.is_none() {
        return result.fail(
            Outcome::Skip,
            "the row names an account and no simulated directory is running",
        );
    }
    let Some(addr) = env.fleet.addr(&row.target) else {
        return result.fail(Outcome::Error, format!("target {:?} is not in the fleet", row.target));
    };
    let mut result = result;
    let mut last = None;
    for attempt in 1..=row.repeat {
        let mut request = tonic::Request::new(check_request(scenario, row, addr, attempt));
        request.set_timeout(options.deadline);
        let started = Instant::now();
        let answer = client.clone().check(request).await;
        result.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        result.attempts = attempt;
        last = Some(answer);
    }
    match last {
        Some(Ok(response)) => judge(result, row, response.into_inner()),
        Some(Err(status)) => result.fail(
            Outcome::Error,
            format!("gRPC {:?}: {}", status.code(), status.message()),
        ),
        None => result.fail(Outcome::Error, "no attempt"),
    }
}

fn judge(mut result: RowResult, row: &Row, report: CheckReport) -> RowResult {
    let cause_ok = report.primary_cause == row.expect_cause as i32;
    let verdict_ok = report.verdict == row.expect_verdict.to_proto() as i32;
    result.got_cause = Some(primary_cause_name(report.primary_cause));
    result.got_verdict = Some(verdict_name(report.verdict));
    result.outcome = if cause_ok && verdict_ok {
        Outcome::Ok
    } else {
        Outcome::Mismatch
    };
    result.report = Some(report);
    result
}

/// True when every row is OK or skipped.
pub fn all_passed(results: &[RowResult]) -> bool {
    results.iter().all(RowResult::passed)
}

/// The human table: row, expected, got, latency, result (then details of failures).
pub fn format_table(results: &[RowResult]) -> String {
    let rows: Vec<[String; 5]> = results
        .iter()
        .map(|r| {
            let got = match (&r.got_cause, &r.got_verdict) {
                (Some(c), Some(v)) => format!("{c}/{v}"),
                _ => "-".to_owned(),
            };
            let latency = if r.attempts > 0 {
                format!("{:.1}", r.latency_ms)
            } else {
                "-".to_owned()
            };
            [
                r.row.clone(),
                format!("{}/{}", r.expect_cause, r.expect_verdict),
                got,
                latency,
                r.outcome.label().to_owned(),
            ]
        })
        .collect();
    let header = ["ROW", "EXPECTED", "GOT", "MS", "RESULT"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
    let _ = writeln!(
        out,
        "\n{} rows: {} ok, {} mismatch, {} skipped, {} errors",
        results.len(),
        count(Outcome::Ok),
        count(Outcome::Mismatch),
        count(Outcome::Skip),
        count(Outcome::Error)
    );
    for r in results
        .iter()
        .filter(|r| r.outcome == Outcome::Error || r.outcome == Outcome::Skip)
    {
        if let Some(detail) = &r.detail {
            let _ = writeln!(out, "{} {}: {detail}", r.outcome.label(), r.row);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    };

    use rdp_preflight_proto::v1::{
        preflight_server::{Preflight, PreflightServer},
        Cause, ListCausesRequest, ListCausesResponse,
    };
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::targets::start_fleet;

    /// A stand-in plugin: answers by port (the refused target gets TCP_REFUSED, everything else
    /// OK) and records what it was sent.
    struct FakePlugin {
        refused_port: u32,
        seen: Arc<std::sync::Mutex<Vec<CheckRequest>>>,
        calls: AtomicU32,
    }

    #[tonic::async_trait]
    impl Preflight for FakePlugin {
        async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckReport>, Status> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            assert!(request.metadata().get("grpc-timeout").is_some(), "no deadline sent");
            let request = request.into_inner();
            self.seen.lock().unwrap().push(request.clone());
            let target = request.target.unwrap_or_default();
            let (cause, verdict) = if target.port == self.refused_port {
                (Cause::TcpRefused, Verdict::Deny)
            } else {
                (Cause::Ok, Verdict::Allow)
            };
            Ok(Response::new(CheckReport {
                request_id: request.request_id,
                verdict: verdict as i32,
                primary_cause: cause as i32,
                ..Default::default()
            }))
        }

        async fn list_causes(&self, _: Request<ListCausesRequest>) -> Result<Response<ListCausesResponse>, Status> {
            Ok(Response::new(ListCausesResponse::default()))
        }

        async fn fleet_status(
            &self,
            _: Request<rdp_preflight_proto::v1::FleetStatusRequest>,
        ) -> Result<Response<rdp_preflight_proto::v1::FleetStatusResponse>, Status> {
            Err(Status::unimplemented("not used by the driver"))
        }

        async fn target_history(
            &self,
            _: Request<rdp_preflight_proto::v1::TargetHistoryRequest>,
        ) -> Result<Response<rdp_preflight_proto::v1::TargetHistoryResponse>, Status> {
            Err(Status::unimplemented("not used by the driver"))
        }
    }

    const SCENARIO: &str = r#"
[[target]]
name = "healthy-tls"
behavior = "healthy"
[[target]]
name = "refused"
behavior = "refused"

[[account]]
name = "alice"
password = "Correct-Horse-1"
state = "good"
domain = "EXAMPLE"

[[row]]
name = "ok"
target = "healthy-tls"
protocols = ["ssl", "hybrid"]
expect_cause = "OK"
expect_verdict = "allow"
repeat = 2
[[row]]
name = "refused"
target = "refused"
expect_cause = "TCP_REFUSED"
expect_verdict = "deny"
[[row]]
name = "wrong-expectation"
target = "refused"
expect_cause = "X224_CLOSED"
expect_verdict = "deny"
[[row]]
name = "needs-directory"
target = "healthy-tls"
account = "alice"
password = "wrong"
expect_cause = "CRED_INVALID"
expect_verdict = "deny"
"#;

    #[tokio::test]
    async fn plays_rows_and_judges_them() {
        let scenario = Scenario::parse(SCENARIO).unwrap();
        let env = SimEnv::new(start_fleet(&scenario.targets).await.unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let plugin = FakePlugin {
            refused_port: u32::from(env.fleet.addr("refused").unwrap().port()),
            seen: seen.clone(),
            calls: AtomicU32::new(0),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PreflightServer::new(plugin))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );

        let results = play(&endpoint, &scenario, &env).await;
        let outcomes: Vec<_> = results.iter().map(|r| (r.row.as_str(), r.outcome)).collect();
        assert_eq!(
            outcomes,
            vec![
                ("ok", Outcome::Ok),
                ("refused", Outcome::Ok),
                ("wrong-expectation", Outcome::Mismatch),
                ("needs-directory", Outcome::Skip),
            ]
        );
        assert_eq!(results[0].attempts, 2);
        assert_eq!(results[2].got_cause.as_deref(), Some("TCP_REFUSED"));
        assert!(!all_passed(&results));

        let seen = seen.lock().unwrap();
        let ok: Vec<_> = seen.iter().filter(|r| r.request_id.starts_with("sim-ok-")).collect();
        assert_eq!(
            ok.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(),
            ["sim-ok-1", "sim-ok-2"]
        );
        let target = ok[0].target.as_ref().unwrap();
        assert_eq!(target.host, "127.0.0.1");
        assert_eq!(target.expected_name, "healthy-tls");
        assert_eq!(target.requested_protocols, vec![2, 3]);
        let requester = ok[0].requester.as_ref().unwrap();
        assert_eq!(
            (requester.user.as_str(), requester.source_address.as_str()),
            ("gateway-sim", "127.0.0.1")
        );
        assert!(ok[0].credential.is_none());

        let table = format_table(&results);
        assert!(table.contains("MISMATCH") && table.contains("SKIP"), "{table}");
        let json = serde_json::to_value(&results[1]).unwrap();
        assert_eq!(json["outcome"], "ok");
        assert_eq!(json["report"]["primaryCause"], "CAUSE_TCP_REFUSED");
        server.abort();
    }

    #[test]
    fn credential_comes_from_the_account_with_row_override() {
        let scenario = Scenario::parse(SCENARIO).unwrap();
        let row = &scenario.rows[3];
        let req = check_request(&scenario, row, "127.0.0.2:3390".parse().unwrap(), 1);
        let cred = req.credential.unwrap();
        assert_eq!(
            (cred.username.as_str(), cred.domain.as_str(), cred.password.as_str()),
            ("alice", "EXAMPLE", "wrong")
        );
        assert_eq!(req.request_id, "sim-needs-directory-1");
        assert_eq!(req.target.unwrap().port, 3390);
    }

    #[tokio::test]
    async fn nla_only_rows_send_the_credential_without_a_directory() {
        let text = r#"
[[target]]
name = "nla-healthy"
behavior = "nla_healthy"
[[account]]
name = "nina"
password = "Nla-Pass-1"
state = "good"
[[row]]
name = "nla-logon"
target = "nla-healthy"
account = "nina"
nla_only = true
expected_computer = "NLA-HEALTHY"
expect_cause = "OK"
expect_verdict = "allow"
"#;
        let scenario = Scenario::parse(text).unwrap();
        let env = SimEnv::new(start_fleet(&scenario.targets).await.unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let plugin = FakePlugin {
            refused_port: 0,
            seen: seen.clone(),
            calls: AtomicU32::new(0),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PreflightServer::new(plugin))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let results = play(&endpoint, &scenario, &env).await;
        assert_eq!(results[0].outcome, Outcome::Ok, "{:?}", results[0].detail);
        let seen = seen.lock().unwrap();
        let credential = seen[0].credential.as_ref().unwrap();
        assert_eq!(
            (credential.username.as_str(), credential.password.as_str()),
            ("nina", "Nla-Pass-1")
        );
        assert_eq!(seen[0].target.as_ref().unwrap().expected_computer, "NLA-HEALTHY");
        server.abort();
    }

    #[tokio::test]
    async fn bad_endpoint_is_an_error_per_row() {
        let scenario = Scenario::parse(SCENARIO).unwrap();
        let env = SimEnv::new(Fleet::from_manifest(crate::targets::FleetManifest {
            ca_pem: String::new(),
            targets: vec![],
            directory: None,
        }));
        let results = play("not a url", &scenario, &env).await;
        assert!(results.iter().all(|r| r.outcome == Outcome::Error));
    }
}
