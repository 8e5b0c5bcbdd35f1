//! One sweep over an inventory of targets: every target probed like a gateway's check, but
//! never with a credential (probe stages and the NLA challenge only), so a sweep can never cost
//! a lockout attempt.
//!
//! The inventory is a CSV file with a header line, columns
//! `host,port,expected_name,expected_computer,labels` (all but `host` may be empty; `labels` as
//! `site=par;team=win`). A bad line is an error naming the line.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use crate::{
    check::{CheckInput, Checker},
    history::{Entry, History, Source},
    report::Report,
};

/// The header an inventory starts with.
pub const HEADER: &str = "host,port,expected_name,expected_computer,labels";

/// One inventory line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryTarget {
    /// Host name or IP literal.
    pub host: String,
    /// Port (`None`: the configured default).
    pub port: Option<u16>,
    /// Name the certificate must carry (empty: the host).
    pub expected_name: String,
    /// Computer the NLA challenge must name (may be empty).
    pub expected_computer: String,
    /// `key=value` labels.
    pub labels: BTreeMap<String, String>,
}

/// Parses an inventory; errors name the line (1-based, the header is line 1).
pub fn parse_inventory(text: &str) -> Result<Vec<InventoryTarget>, String> {
    let mut lines = text.lines().enumerate();
    let header = lines
        .by_ref()
        .find(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(_, l)| l.trim().to_ascii_lowercase().replace(' ', ""));
    if header.as_deref() != Some(HEADER) {
        return Err(format!("line 1: the header must be {HEADER:?}"));
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if cols.len() > 5 {
            return Err(format!("line {n}: {} columns, at most 5", cols.len()));
        }
        let col = |k: usize| cols.get(k).copied().unwrap_or("");
        let host = col(0);
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            return Err(format!("line {n}: host {host:?} is not a host name or IP literal"));
        }
        let port = match col(1) {
            "" => None,
            p => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("line {n}: port {p:?} is not 1..65535"))?,
            ),
        };
        let mut labels = BTreeMap::new();
        for kv in col(4).split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("line {n}: label {kv:?} is not key=value"))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        out.push(InventoryTarget {
            host: host.to_owned(),
            port,
            expected_name: col(2).to_owned(),
            expected_computer: col(3).to_owned(),
            labels,
        });
    }
    Ok(out)
}

/// Probes every target, at most `concurrency` at once, without a credential; the reports in
/// inventory order, each kept in `history` when given.
pub async fn run_pass(
    checker: Arc<Checker>,
    targets: &[InventoryTarget],
    concurrency: usize,
    history: Option<Arc<dyn History>>,
) -> Vec<Report> {
    let cfg = checker.config().clone();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let input = CheckInput {
            request_id: format!("sweep-{i}"),
            host: t.host.clone(),
            port: t.port.unwrap_or(cfg.default_port),
            expected_name: if t.expected_name.is_empty() {
                t.host.clone()
            } else {
                t.expected_name.clone()
            },
            requested: cfg.default_protocols,
            minimum: cfg.minimum_protocol,
            expected_computer: t.expected_computer.clone(),
            // Never a credential: a sweep cannot spend a lockout attempt.
            credential: None,
            requester_user: "sweep".into(),
            requester_source: "sweep".into(),
            budget: cfg.default_budget.max(Duration::from_secs(1)),
        };
        let (checker, sem, history) = (checker.clone(), sem.clone(), history.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let (host, port) = (input.host.clone(), input.port);
            let report = checker.check(input).await;
            if let Some(h) = history {
                if let Err(e) = h.record(Entry::new(&report, &host, port, None, Source::Sweep)).await {
                    tracing::warn!(error = %e, "check history not written");
                }
            }
            report
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(r) => out.push(r),
            Err(e) => tracing::error!(error = %e, "sweep task failed"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_lines_and_their_errors() {
        let inv = parse_inventory(
            "host,port,expected_name,expected_computer,labels\n\
             # a comment\n\
             rdp1.example.test,3389,,RDP1,site=par;team=win\n\
             10.0.0.5,,rdp5.example.test,,\n\
             rdp9\n",
        )
        .expect("valid");
        assert_eq!(inv.len(), 3);
        assert_eq!(inv[0].port, Some(3389));
        assert_eq!(inv[0].labels.get("site").map(String::as_str), Some("par"));
        assert_eq!(inv[1].port, None);
        assert_eq!(inv[1].expected_name, "rdp5.example.test");
        assert_eq!(inv[2].host, "rdp9");
        let err = |t: &str| parse_inventory(t).expect_err("invalid");
        assert!(err("host,port\nrdp1,3389\n").starts_with("line 1:"));
        assert!(err(&format!("{HEADER}\nrdp1,99999\n")).starts_with("line 2:"));
        assert!(err(&format!("{HEADER}\nrdp1,3389\n,3389\n")).starts_with("line 3:"));
        assert!(err(&format!("{HEADER}\nrdp1,3389,,,site\n")).contains("key=value"));
        assert!(err(&format!("{HEADER}\nrdp1,1,a,b,c=d,extra\n")).contains("columns"));
    }
}
