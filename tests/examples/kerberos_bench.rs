//! What proving a password costs by Kerberos AS exchange, against an LDAPS simple bind (pooled
//! and on a fresh TLS connection), on the same Samba AD DC in the same run (provisioned here on
//! loopback; needs root for the KDC's port 88).
//!
//! `cargo run --release -p integration-tests --example kerberos_bench [-- N]`

use std::{sync::Arc, time::Duration};

use integration_tests::{
    bench::{measure, Row},
    budget, cred,
    samba::Samba,
};
use rdp_preflight::{
    credential::{CredentialChecker, CredentialOutcome, DirectoryFile},
    guard::{identity::Domains, Guard, Limits},
    kerberos::{KerberosChecker, KerberosFile},
};

/// Proves worker `w`'s password with `check` (a call that must succeed).
async fn run<F, Fut>(name: &str, n: usize, concurrency: usize, check: F) -> Row
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = CredentialOutcome> + Send,
{
    measure(name, n, concurrency, move |w| {
        let check = check.clone();
        async move {
            let o = check(w).await;
            assert!(o.bind_succeeded, "{o:?}");
        }
    })
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(400);
    let s = Samba::start();
    for w in 0..8 {
        s.user(&format!("bench{w}"), "Bench-Pass-1!");
    }
    let limits = Limits::new(Duration::from_secs(900), 1, Duration::ZERO);
    let krb = Arc::new(KerberosChecker::new(
        KerberosFile {
            realm: Some("EXAMPLE.TEST".into()),
            kdcs: vec![s.kdc()],
            spn_check: false,
            ..Default::default()
        }
        .validate()
        .expect("valid")
        .expect("realm"),
        Arc::new(Guard::memory(limits, 1000)),
        Domains::default(),
    ));
    let ldap = |pool_size| {
        Arc::new(CredentialChecker::standalone(
            DirectoryFile {
                servers: vec![s.ldaps_url()],
                ca_file: Some(s.ca_file()),
                bind_as: "upn".into(),
                pool_size,
                ..Default::default()
            }
            .validate()
            .expect("valid")
            .expect("servers"),
            Domains::default(),
        ))
    };
    let mut rows = Vec::new();
    for c in [1usize, 8] {
        let k = krb.clone();
        rows.push(
            run(&format!("Kerberos AS exchange, {c} in flight"), n, c, move |w| {
                let k = k.clone();
                async move {
                    k.check(&cred(&format!("bench{w}"), "EXAMPLE", "Bench-Pass-1!"), None, &budget())
                        .await
                }
            })
            .await,
        );
        let l = ldap(8);
        rows.push(
            run(&format!("LDAP bind, pooled, {c} in flight"), n, c, move |w| {
                let l = l.clone();
                async move {
                    l.check(&cred(&format!("bench{w}@example.test"), "", "Bench-Pass-1!"), &budget())
                        .await
                }
            })
            .await,
        );
        let l = ldap(0);
        rows.push(
            run(&format!("LDAP bind, fresh connection, {c} in flight"), n, c, move |w| {
                let l = l.clone();
                async move {
                    l.check(&cred(&format!("bench{w}@example.test"), "", "Bench-Pass-1!"), &budget())
                        .await
                }
            })
            .await,
        );
    }
    println!("| mode | checks | checks/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} |",
            r.name,
            r.n,
            r.per_sec(),
            r.pct(0.5),
            r.pct(0.99)
        );
    }
}
