//! What the shared store costs, measured in one run against a real PostgreSQL (a fresh cluster
//! on loopback, started here) and gateway-sim's simulated AD over LDAPS:
//!
//! - one reservation + completion of the lockout guard, in process and on PostgreSQL;
//! - credential checks (a bind with the right password) per second and p50/p99 latency, with
//!   the in-process guard and with the guard on PostgreSQL, at concurrency 1 and 8.
//!
//! `cargo run --release -p integration-tests --example store_bench [-- N]`

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use gateway_sim::{
    directory::{start_directory, DirectoryOptions},
    scenario::Account,
};
use integration_tests::{
    bench::{measure, Row},
    cred,
    postgres::Postgres,
};
use rdp_preflight::{
    credential::{CredentialChecker, DirectoryFile},
    deadline::Budget,
    guard::{identity::Domains, Admission, Guard, Limits, Outcome, Scope},
    secret::Password,
    store::{guard::PgGuardStore, Store, StoreFile},
};

/// Prints a row of the table.
fn print(r: &Row) {
    println!(
        "{:<44} {:>7} {:>10.0} {:>9.3} {:>9.3}",
        r.name,
        r.n,
        r.per_sec(),
        r.pct(0.5),
        r.pct(0.99)
    );
}

fn budget() -> Budget {
    Budget::new(Duration::from_secs(10))
}

/// Sequential reservations + completions (proofs) over `accounts` distinct accounts.
async fn reservations(name: &str, g: &Guard, n: usize) -> Row {
    let password = Password::new("Bench-Pass-1".into());
    let start = Instant::now();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let a = g.account(&format!("bench-{i}@example.test"));
        let t0 = Instant::now();
        match g.admit(a, &password, Scope::DIRECTORY, &budget()).await {
            Admission::Go(mut t) => {
                t.sending();
                t.finish(Outcome::Proven {
                    findings: vec![],
                    usable: true,
                })
                .await;
            }
            other => panic!("{other:?}"),
        }
        lat.push(t0.elapsed());
    }
    Row {
        name: name.into(),
        n,
        wall: start.elapsed(),
        lat,
    }
}

/// Each worker checks its own account (one account shared by concurrent checks would measure
/// single-flight, not throughput).
async fn checks(name: &str, c: Arc<CredentialChecker>, n: usize, concurrency: usize) -> Row {
    measure(name, n, concurrency, move |w| {
        let c = c.clone();
        async move {
            let o = c
                .check(&cred(&format!("bench{w}"), "EXAMPLE", "Bench-Pass-1"), &budget())
                .await;
            assert!(o.bind_succeeded, "{o:?}");
        }
    })
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let pg = Postgres::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let key = tmp.path().join("guard.key");
    std::fs::write(&key, "store-bench-key-0123456789abcdef0123456789\n").expect("key");
    let store_cfg = StoreFile {
        url: Some(pg.url()),
        tls: "disable".into(),
        hmac_key_file: Some(key),
        ..Default::default()
    }
    .validate()
    .expect("valid")
    .expect("store");
    let store = Store::open(store_cfg).await.expect("store");
    let limits = Limits::new(Duration::from_secs(900), 1, Duration::ZERO);
    let pg_guard = || {
        Arc::new(Guard::new(
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, store.hmac_key()),
            Arc::new(PgGuardStore::new(store.clone(), limits)),
        ))
    };

    let accounts: Vec<Account> = (0..8)
        .map(|w| Account {
            name: format!("bench{w}"),
            password: "Bench-Pass-1".into(),
            state: "good".into(),
            domain: None,
        })
        .collect();
    let dir = start_directory(&accounts, DirectoryOptions::default())
        .await
        .expect("directory");
    let ca = tmp.path().join("dir-ca.pem");
    std::fs::write(&ca, dir.ca_pem()).expect("ca");
    let cfg = DirectoryFile {
        servers: vec![dir.ldaps_url()],
        ca_file: Some(ca),
        bind_as: "upn".into(),
        pool_size: 8,
        ..Default::default()
    }
    .validate()
    .expect("valid")
    .expect("servers");
    let memory = || Arc::new(CredentialChecker::standalone(cfg.clone(), Domains::default()));
    let shared = || Arc::new(CredentialChecker::new(cfg.clone(), pg_guard(), Domains::default()));

    println!("{:<44} {:>7} {:>10} {:>9} {:>9}", "", "n", "per s", "p50 ms", "p99 ms");
    let mem_guard = Guard::memory(limits, 100_000);
    print(&reservations("guard: reserve + complete, in process", &mem_guard, n).await);
    print(&reservations("guard: reserve + complete, PostgreSQL", &pg_guard(), n).await);
    for concurrency in [1, 8] {
        print(
            &checks(
                &format!("bind check, in-process guard, c={concurrency}"),
                memory(),
                n,
                concurrency,
            )
            .await,
        );
        print(
            &checks(
                &format!("bind check, PostgreSQL guard, c={concurrency}"),
                shared(),
                n,
                concurrency,
            )
            .await,
        );
    }
    println!("binds answered by the directory: {}", dir.bind_count());
    let ops = store.stats.ops.load(std::sync::atomic::Ordering::Relaxed);
    let nanos = store.stats.op_nanos.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "store: {ops} transactions, mean {:.3} ms each (two per attempt: reserve, complete)",
        nanos as f64 / 1e6 / ops.max(1) as f64
    );
}
