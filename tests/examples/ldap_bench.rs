//! Credential checks per second and latency over LDAPS against a real slapd (ppolicy on):
//! pooled connections (rebinding), a fresh TLS connection per check, and one `ldapwhoami`
//! process per bind (what a shell script would pay), measured in the same run.
//!
//! `cargo run --release -p integration-tests --example ldap_bench [-- N]`

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::Instant,
};

use integration_tests::{
    bench::{measure, Row},
    budget, cred,
    slapd::{self, Slapd},
};
use rdp_preflight::credential::{CredentialChecker, DirectoryFile};

async fn run_checker(name: &str, c: Arc<CredentialChecker>, n: usize, concurrency: usize) -> Row {
    // One account per worker: concurrent checks of one account would share one bind.
    measure(name, n, concurrency, move |w| {
        let c = c.clone();
        async move {
            let o = c
                .check(&cred(&format!("bench{w}"), "", "Bench-Pass-1"), &budget())
                .await;
            assert!(o.bind_succeeded, "{o:?}");
        }
    })
    .await
}

fn run_ldapwhoami(s: &Slapd, n: usize) -> Row {
    let dn = slapd::user_dn("good");
    let start = Instant::now();
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let ok = Command::new("ldapwhoami")
            .env("LDAPTLS_CACERT", s.ca_file())
            .env("LDAPCONF", "/dev/null")
            .args(["-x", "-H", &s.ldaps_url(), "-D", &dn, "-w", slapd::password("good")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|st| st.success())
            .unwrap_or(false);
        assert!(ok, "ldapwhoami failed");
        lat.push(t.elapsed());
    }
    Row {
        name: "ldapwhoami process per bind (baseline)".into(),
        n,
        wall: start.elapsed(),
        lat,
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let s = Slapd::start(true);
    let file = |pool_size| DirectoryFile {
        servers: vec![s.ldaps_url()],
        ca_file: Some(s.ca_file()),
        bind_as: slapd::DN_TEMPLATE.into(),
        pool_size,
        ..Default::default()
    };
    let checker = |pool_size| {
        Arc::new(CredentialChecker::standalone(
            file(pool_size).validate().expect("valid").expect("some"),
            Default::default(),
        ))
    };
    let mut rows = Vec::new();
    rows.push(run_checker("pooled, 1 in flight", checker(4), n, 1).await);
    rows.push(run_checker("pooled, 8 in flight", checker(8), n, 8).await);
    rows.push(run_checker("fresh TLS connection, 1 in flight", checker(0), n / 4, 1).await);
    rows.push(run_checker("fresh TLS connection, 8 in flight", checker(0), n / 4, 8).await);
    rows.push(run_ldapwhoami(&s, n / 20));
    println!(
        "LDAPS simple binds (ppolicy control) against slapd on loopback, {} cores",
        num_cores()
    );
    println!();
    println!("| mode | binds | binds/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} |",
            r.name,
            r.n,
            r.n as f64 / r.wall.as_secs_f64(),
            r.pct(0.50),
            r.pct(0.99)
        );
    }
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
