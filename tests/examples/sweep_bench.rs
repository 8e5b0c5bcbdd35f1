//! A sweep of N (default 2,000) inventory targets on the simulated fleet, against the plain
//! `Check` throughput of the same run: one pass of `rdp-preflight sweep` (wall time, peak RSS,
//! checks/s), the same targets through `rdp-preflight serve`'s `Check` over gRPC at the same
//! concurrency, the scheduled sweep of `serve` (every target checked within one slot, peak RSS,
//! the `FleetStatus` answer's latency), and what a day of this fleet's history costs in memory.
//! Prints numbers, asserts only that every target was checked.
//!
//! `cargo run --release -p integration-tests --example sweep_bench [-- N [CONCURRENCY [INTERVAL_SECS]]]`

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gateway_sim::{
    bench::peak_rss_kib,
    scenario::{Behavior, CertVariant, TargetSpec},
    targets::start_fleet,
};
use integration_tests::plugin::{client, plugin_bin, serve_binary};
use rdp_preflight::{
    config::FileConfig,
    history::{Entry, History, MemoryHistory, Source},
};
use rdp_preflight_proto::v1 as pb;

/// One line of the result table.
struct Line {
    what: String,
    checks: usize,
    wall: Duration,
    rss_kib: Option<u64>,
    note: String,
}

fn print(lines: &[Line]) {
    println!(
        "| {:<58} | {:>6} | {:>8} | {:>9} | {:>13} | note |",
        "run", "checks", "wall s", "checks/s", "peak RSS MiB"
    );
    println!("|---|---:|---:|---:|---:|---|");
    for l in lines {
        println!(
            "| {:<58} | {:>6} | {:>8.2} | {:>9.0} | {:>13} | {} |",
            l.what,
            l.checks,
            l.wall.as_secs_f64(),
            l.checks as f64 / l.wall.as_secs_f64(),
            l.rss_kib
                .map_or_else(|| "-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
            l.note
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |i: usize, d: u64| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let n = usize::try_from(arg(1, 2000)).expect("n");
    let c = usize::try_from(arg(2, 8)).expect("concurrency");
    let interval = arg(3, 30);

    // The fleet: per 20 targets, one refused, one expiring within days, one expired, one NLA,
    // sixteen healthy.
    let specs: Vec<TargetSpec> = (0..n)
        .map(|i| {
            let behavior = match i % 20 {
                0 => Behavior::Refused,
                3 => Behavior::NlaHealthy,
                _ => Behavior::Healthy,
            };
            let mut s = TargetSpec::new(format!("t{i}"), behavior);
            s.cert = match i % 20 {
                1 => CertVariant::ExpiringSoon,
                2 => CertVariant::Expired,
                _ => CertVariant::Valid,
            };
            s
        })
        .collect();
    let t0 = Instant::now();
    let fleet = start_fleet(&specs).await.expect("fleet");
    eprintln!("fleet of {n} targets up in {:.1} s", t0.elapsed().as_secs_f64());
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = tmp.path().join("ca.pem");
    std::fs::write(&ca, fleet.ca_pem()).expect("ca");
    let mut inventory = String::from("host,port,expected_name,expected_computer,labels\n");
    for (i, s) in specs.iter().enumerate() {
        let port = fleet.addr(&s.name).expect("target").port();
        inventory.push_str(&format!("127.0.0.1,{port},{},,site=s{}\n", s.name, i % 10));
    }
    // A refused target's port is released, and a later target's listener may get it: the
    // inventory then names that port twice, and the history holds one target for both rows.
    let distinct = specs
        .iter()
        .map(|s| fleet.addr(&s.name).expect("target").port())
        .collect::<std::collections::BTreeSet<u16>>()
        .len();
    let inv = tmp.path().join("inventory.csv");
    std::fs::write(&inv, &inventory).expect("inventory");
    let mut cfg = FileConfig::default();
    cfg.policy.allow_loopback = true;
    cfg.cert.trust_anchors = vec![ca];
    cfg.cert.pin_store = "memory".into();
    cfg.log.level = "warn".into();
    cfg.server.max_concurrent_checks = c.max(64);
    let write = |name: &str, cfg: &FileConfig| {
        let p = tmp.path().join(name);
        std::fs::write(&p, toml::to_string(cfg).expect("toml")).expect("config");
        p
    };
    let plain = write("plain.toml", &cfg);
    let bin = plugin_bin();
    let mut lines = Vec::new();

    // 1. One pass of the sweep command.
    let t = Instant::now();
    let mut child = Command::new(&bin)
        .args(["sweep", "--json", "--concurrency", &c.to_string(), "--inventory"])
        .arg(&inv)
        .arg("--config")
        .arg(&plain)
        .stdout(Stdio::piped())
        .spawn()
        .expect("sweep");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).count());
    let mut rss = None;
    while child.try_wait().expect("wait").is_none() {
        rss = peak_rss_kib(pid).ok().flatten().or(rss);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = t.elapsed();
    let count = reader.join().expect("reader");
    assert_eq!(count, n, "one JSON line per target");
    lines.push(Line {
        what: format!("`rdp-preflight sweep`, one pass, {c} in flight"),
        checks: count,
        wall,
        rss_kib: rss,
        note: "process start to exit, config and inventory read included".into(),
    });

    // 2. The same targets through Check on `serve`.
    let served = serve_binary(&plain, &[]);
    let endpoint = served.endpoint();
    let ports: Vec<u32> = specs
        .iter()
        .map(|s| u32::from(fleet.addr(&s.name).expect("target").port()))
        .collect();
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..c {
        let (endpoint, ports, names) = (endpoint.clone(), ports.clone(), names.clone());
        tasks.push(tokio::spawn(async move {
            let mut cl = client(&endpoint).await;
            let mut done = 0;
            for i in (w..ports.len()).step_by(c) {
                cl.check(pb::CheckRequest {
                    request_id: format!("b{i}"),
                    target: Some(pb::Target {
                        host: "127.0.0.1".into(),
                        port: ports[i],
                        expected_name: names[i].clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .expect("answered");
                done += 1;
            }
            done
        }));
    }
    let mut count = 0;
    for task in tasks {
        count += task.await.expect("worker");
    }
    lines.push(Line {
        what: format!("`Check` over gRPC on `serve`, {c} in flight"),
        checks: count,
        wall: t.elapsed(),
        rss_kib: peak_rss_kib(served.child.id()).ok().flatten(),
        note: "the same targets, history kept in memory".into(),
    });
    drop(served);

    // 3. The scheduled sweep of `serve`: one slot.
    let mut sweep_cfg = cfg.clone();
    sweep_cfg.sweep.inventory = Some(inv.clone());
    sweep_cfg.sweep.interval_secs = interval;
    sweep_cfg.sweep.concurrency = c;
    sweep_cfg.sweep.per_host_concurrency = c;
    let served = serve_binary(&write("sweep.toml", &sweep_cfg), &[]);
    let mut cl = client(&served.endpoint()).await;
    // Wait for the first slot boundary after start, then until every target is in the history.
    let now = rdp_preflight::history::now_ms();
    let slot_ms = i64::try_from(interval * 1000).expect("ms");
    let boundary = Instant::now() + Duration::from_millis(u64::try_from(slot_ms - now % slot_ms).expect("ms"));
    tokio::time::sleep_until(boundary.into()).await;
    let (mut seen, mut status_ms) = (0, 0.0);
    while seen < distinct && boundary.elapsed() < Duration::from_secs(interval * 2) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        let s = cl
            .fleet_status(pb::FleetStatusRequest::default())
            .await
            .expect("answered")
            .into_inner();
        status_ms = t.elapsed().as_secs_f64() * 1000.0;
        seen = s.targets.len();
    }
    let all_in = boundary.elapsed();
    assert_eq!(seen, distinct, "every target checked within the slot");
    lines.push(Line {
        what: format!("scheduled sweep in `serve`, {interval} s slot, {c} at most in flight"),
        checks: seen,
        wall: all_in,
        rss_kib: peak_rss_kib(served.child.id()).ok().flatten(),
        note: format!(
            "spread over the slot by design (checks/s = N / slot); FleetStatus over {seen} targets: {status_ms:.0} ms{}",
            if distinct < n { format!(" ({} rows share a port reused after a refused target's)", n - distinct) } else { String::new() }
        ),
    });
    drop(served);
    print(&lines);

    // 4. What the in-memory history costs: a day of this fleet swept every 15 minutes.
    let day = n * 96;
    let mut file = cfg.clone();
    file.history.max_entries = day;
    let checker =
        rdp_preflight::check::Checker::new(std::sync::Arc::new(file.validate().expect("valid"))).expect("checker");
    let t1 = fleet.addr("t1").expect("target");
    let report = checker
        .check(rdp_preflight::check::CheckInput {
            request_id: "entry".into(),
            host: "127.0.0.1".into(),
            port: t1.port(),
            expected_name: "t1".into(),
            requested: rdp_preflight::probe::x224::protocol::SSL | rdp_preflight::probe::x224::protocol::HYBRID,
            minimum: None,
            expected_computer: String::new(),
            credential: None,
            requester_user: "bench".into(),
            requester_source: "bench".into(),
            budget: Duration::from_secs(10),
        })
        .await;
    let entry = Entry::new(&report, "127.0.0.1", t1.port(), None, Source::Sweep);
    let json = serde_json::to_string(&entry).expect("json").len();
    let rss = || vm_rss_kib().unwrap_or(0);
    let before = rss();
    let h = MemoryHistory::new(file.history.validate().expect("valid"));
    let now = rdp_preflight::history::now_ms();
    for i in 0..day {
        let mut e = entry.clone();
        e.at_ms = now - i64::try_from(day - i).expect("i") * 450;
        e.check_id = format!("{:026}", i);
        e.target = format!("127.0.0.1:{}", 20_000 + i % n);
        h.record(e).await.expect("kept");
    }
    let after = rss();
    let t = Instant::now();
    let all = h.since(now - 86_400_000).await.expect("read");
    let states = rdp_preflight::history::trend::states(&all, now, 86_400_000, 4);
    println!(
        "in-memory history: {} entries ({n} targets × 96 a day): +{:.1} MiB resident ({:.0} B per entry; its JSON {json} B); \
         reading the window and computing {} states: {:.0} ms",
        h.len(),
        (after.saturating_sub(before)) as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 * 1024.0 / h.len() as f64,
        states.len(),
        t.elapsed().as_secs_f64() * 1000.0
    );
}

/// VmRSS (current resident set) of this process, KiB.
fn vm_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
