use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::cause::Cause;

fn pw(s: &str) -> Password {
    Password::new(s.into())
}

fn bad() -> Finding {
    Finding::new(Cause::CredInvalid, "bad")
}

fn guard(max_distinct: u32, ttl: Duration) -> Guard {
    Guard::memory(Limits::new(Duration::from_secs(900), max_distinct, ttl), 1000)
}

fn budget() -> Budget {
    Budget::new(Duration::from_secs(5))
}

async fn go(g: &Guard, acct: AccountKey, p: &str) -> Ticket {
    match g.admit(acct, &pw(p), Scope::DIRECTORY, &budget()).await {
        Admission::Go(t) => t,
        other => panic!("expected Go, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_password_is_remembered_and_the_budget_is_then_spent() {
    let g = guard(1, Duration::ZERO);
    let a = g.account("alice@example.test");
    let mut t = go(&g, a, "one").await;
    t.sending();
    t.finish(Outcome::Refused(bad())).await;
    match g.admit(a, &pw("one"), Scope::DIRECTORY, &budget()).await {
        Admission::Remembered(f) => {
            assert_eq!(f.cause, Cause::CredInvalid);
            assert!(f.evidence.iter().any(|(k, v)| k == "from_memory" && v == "true"));
        }
        other => panic!("{other:?}"),
    }
    let mut t = go(&g, a, "two").await;
    t.sending();
    t.finish(Outcome::Refused(bad())).await;
    match g.admit(a, &pw("three"), Scope::DIRECTORY, &budget()).await {
        Admission::Refused(f) => {
            assert_eq!(f.cause, Cause::CredLockoutGuard);
            assert!(f.evidence.contains(&("recent_failures".into(), "2".into())));
        }
        other => panic!("{other:?}"),
    }
    // Another account is unaffected.
    let _ = go(&g, g.account("bob@example.test"), "three").await;
}

#[tokio::test]
async fn in_flight_attempts_count_and_a_different_password_waits_then_is_refused() {
    let g = guard(0, Duration::ZERO);
    let a = g.account("carol@example.test");
    let mut t = go(&g, a, "one").await;
    t.sending();
    // Budget 1 and one in flight: a second password waits; it runs out of time here.
    let short = Budget::new(Duration::from_millis(80));
    match g.admit(a, &pw("two"), Scope::DIRECTORY, &short).await {
        Admission::Refused(f) => assert!(f.evidence.iter().any(|(k, _)| k == "waited_for")),
        other => panic!("{other:?}"),
    }
    // Once the attempt in flight fails, the budget is spent for good.
    t.finish(Outcome::Refused(bad())).await;
    assert!(matches!(
        g.admit(a, &pw("two"), Scope::DIRECTORY, &budget()).await,
        Admission::Refused(_)
    ));
}

#[tokio::test]
async fn a_waiting_password_goes_once_the_attempt_in_flight_is_proven() {
    let g = std::sync::Arc::new(guard(0, Duration::ZERO));
    let a = g.account("dan@example.test");
    let mut t = go(&g, a, "right").await;
    t.sending();
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.admit(a, &pw("other"), Scope::DIRECTORY, &budget()).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(!waiter.is_finished());
    t.finish(Outcome::Proven {
        findings: vec![],
        usable: true,
    })
    .await;
    assert!(matches!(waiter.await.expect("join"), Admission::Go(_)));
}

#[tokio::test]
async fn concurrent_checks_with_one_password_share_one_attempt() {
    let g = std::sync::Arc::new(guard(1, Duration::ZERO));
    let a = g.account("erin@example.test");
    let mut t = go(&g, a, "stale").await;
    t.sending();
    let mut waiters = Vec::new();
    for _ in 0..8 {
        let g = g.clone();
        waiters.push(tokio::spawn(async move {
            g.admit(a, &pw("stale"), Scope::DIRECTORY, &budget()).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    t.finish(Outcome::Unknown(Finding::new(Cause::DirectoryTimeout, "no answer")))
        .await;
    for w in waiters {
        match w.await.expect("join") {
            Admission::Remembered(f) => {
                assert_eq!(f.cause, Cause::DirectoryTimeout);
                assert!(f.evidence.iter().any(|(k, _)| k == "shared_attempt"));
            }
            other => panic!("{other:?}"),
        }
    }
    // An unjudged answer is not remembered for later checks: one more slot is left.
    let mut t = go(&g, a, "stale").await;
    t.sending();
    t.finish(Outcome::Unknown(Finding::new(Cause::DirectoryTimeout, "no answer")))
        .await;
    assert!(matches!(
        g.admit(a, &pw("stale"), Scope::DIRECTORY, &budget()).await,
        Admission::Refused(_)
    ));
}

#[tokio::test]
async fn a_dropped_ticket_counts_once_sent_and_releases_otherwise() {
    let g = guard(0, Duration::ZERO);
    let a = g.account("fay@example.test");
    drop(go(&g, a, "x").await);
    assert_eq!(g.state(a).await.expect("state"), AccountState::default());
    let mut t = go(&g, a, "x").await;
    t.sending();
    drop(t);
    assert_eq!(
        g.state(a).await.expect("state"),
        AccountState {
            failures: 1,
            in_flight: 0
        }
    );
    assert!(matches!(
        g.admit(a, &pw("y"), Scope::DIRECTORY, &budget()).await,
        Admission::Refused(_)
    ));
}

#[tokio::test]
async fn success_cache_is_behind_the_guard_and_forgotten_on_any_failure() {
    let g = guard(2, Duration::from_secs(60));
    let a = g.account("gus@example.test");
    let t = go(&g, a, "right").await;
    t.finish(Outcome::Proven {
        findings: vec![],
        usable: true,
    })
    .await;
    assert!(matches!(
        g.admit(a, &pw("right"), Scope::DIRECTORY, &budget()).await,
        Admission::Proven { usable: true, .. }
    ));
    // A proof is not reused for another scope (an NLA logon to a target).
    let nla = g.target_scope("127.0.0.1:3389");
    let t = match g.admit(a, &pw("right"), nla, &budget()).await {
        Admission::Go(t) => t,
        other => panic!("{other:?}"),
    };
    t.finish(Outcome::Refused(Finding::new(Cause::NlaLogonFailed, "refused")))
        .await;
    // The failed NLA logon forgets the proof and is remembered for the directory too.
    match g.admit(a, &pw("right"), Scope::DIRECTORY, &budget()).await {
        Admission::Remembered(f) => assert_eq!(f.cause, Cause::NlaLogonFailed),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_success_keeps_failures_that_completed_after_it_was_sent() {
    let g = guard(1, Duration::ZERO);
    let a = g.account("hal@example.test");
    let mut right = go(&g, a, "right").await;
    right.sending();
    let mut wrong = go(&g, a, "wrong").await;
    wrong.sending();
    // The failure completes while the success is in flight: the directory may have seen it
    // after the success, so it must stay counted.
    wrong.finish(Outcome::Refused(bad())).await;
    right
        .finish(Outcome::Proven {
            findings: vec![],
            usable: true,
        })
        .await;
    assert_eq!(g.state(a).await.expect("state").failures, 1);
}

#[test]
fn memory_is_bounded_and_evicts_clean_entries_first() {
    let limits = Limits::new(Duration::from_secs(900), 1, Duration::from_secs(60));
    let s = std::sync::Arc::new(MemoryStore::new(limits, 4));
    let key = |i: u8| AccountKey([i; 32]);
    let p = PasswordKey([9; 32]);
    let run = |f: BoxFuture<'_, Result<Reserved, StoreError>>| futures::executor::block_on(f);
    // Accounts 1 and 2 failed; 3 was proven right.
    for i in 1..=3 {
        let Ok(Reserved::Go(id)) = run(s.reserve(key(i), p, Scope::DIRECTORY, false)) else {
            panic!("go")
        };
        let outcome = if i == 3 {
            Outcome::Proven {
                findings: vec![],
                usable: true,
            }
        } else {
            Outcome::Refused(bad())
        };
        futures::executor::block_on(s.complete(key(i), id, outcome)).expect("complete");
    }
    // Account 4 is in flight.
    assert!(matches!(
        run(s.reserve(key(4), p, Scope::DIRECTORY, false)),
        Ok(Reserved::Go(_))
    ));
    // A fifth account evicts the proven one (3), not a failure.
    assert!(matches!(
        run(s.reserve(key(5), p, Scope::DIRECTORY, false)),
        Ok(Reserved::Go(_))
    ));
    assert_eq!(s.len(), 4);
    assert_eq!(s.evictions(), 1);
    assert!(matches!(
        run(s.reserve(key(1), p, Scope::DIRECTORY, false)),
        Ok(Reserved::Remembered { .. })
    ));
    // Random names never grow it past its capacity.
    for i in 0..200u32 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k[31] = 0xee;
        if let Ok(Reserved::Go(id)) = run(s.reserve(AccountKey(k), p, Scope::DIRECTORY, false)) {
            futures::executor::block_on(s.complete(AccountKey(k), id, Outcome::Refused(bad()))).expect("complete");
        }
        assert!(s.len() <= 4);
    }
}

#[test]
fn nothing_stored_contains_the_password() {
    let g = guard(1, Duration::from_secs(60));
    let a = g.account("ivy@example.test");
    let dump = format!("{g:?} {a:?}");
    assert!(!dump.contains("canary"));
    let key = g.password(a, &pw("canary-guard-pw"));
    assert!(!key.0.windows(6).any(|w| w == b"canary"));
}

#[derive(Clone, Debug)]
enum Op {
    Reserve { account: u8, password: u8, scope: u8 },
    Complete { pick: usize, outcome: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..2, 0u8..4, 0u8..2).prop_map(|(account, password, scope)| Op::Reserve {
            account,
            password,
            scope
        }),
        (any::<usize>(), 0u8..4).prop_map(|(pick, outcome)| Op::Complete { pick, outcome }),
    ]
}

proptest! {
    /// Over random interleavings of reservations and outcomes, the attempts that failed or are
    /// in flight for an account, since the last proof that cleared them, never exceed the
    /// budget: a directory whose threshold is budget + 1 is never reached.
    #[test]
    fn failed_attempts_never_exceed_the_budget(max_distinct in 0u32..3, ops in proptest::collection::vec(op(), 1..120)) {
        let limits = Limits::new(Duration::from_secs(3600), max_distinct, Duration::from_secs(1));
        let s = MemoryStore::new(limits, 16);
        // Model: per account, attempts (id, completion time as a sequence number or None).
        #[derive(Clone)]
        struct Attempt { account: u8, id: AttemptId, reserved: u64, done: Option<(u64, bool)> }
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut clock = 0u64;
        for op in ops {
            clock += 1;
            match op {
                Op::Reserve { account, password, scope } => {
                    let r = futures::executor::block_on(s.reserve(
                        AccountKey([account; 32]),
                        PasswordKey([password; 32]),
                        Scope([scope; 32]),
                        false,
                    ));
                    if let Ok(Reserved::Go(id)) = r {
                        attempts.push(Attempt { account, id, reserved: clock, done: None });
                    }
                }
                Op::Complete { pick, outcome } => {
                    let open: Vec<usize> = (0..attempts.len()).filter(|&i| attempts[i].done.is_none()).collect();
                    if open.is_empty() { continue; }
                    let i = open[pick % open.len()];
                    let a = attempts[i].clone();
                    let (o, failed) = match outcome {
                        0 => (Outcome::Proven { findings: vec![], usable: true }, false),
                        1 => (Outcome::Refused(bad()), true),
                        2 => (Outcome::Unknown(bad()), true),
                        _ => (Outcome::NotSent, false),
                    };
                    let proven = matches!(o, Outcome::Proven { .. });
                    futures::executor::block_on(s.complete(AccountKey([a.account; 32]), a.id, o)).expect("complete");
                    if failed || proven {
                        attempts[i].done = Some((clock, proven));
                    } else {
                        attempts.remove(i);
                    }
                }
            }
            for account in 0..2u8 {
                let mine: Vec<&Attempt> = attempts.iter().filter(|a| a.account == account).collect();
                // The latest proof (by completion) clears failures that completed before it was reserved.
                let cleared_before = mine
                    .iter()
                    .filter_map(|a| match a.done { Some((_, true)) => Some(a.reserved), _ => None })
                    .max()
                    .unwrap_or(0);
                let counted = mine
                    .iter()
                    .filter(|a| match a.done {
                        None => true,
                        Some((at, false)) => at >= cleared_before,
                        Some((_, true)) => false,
                    })
                    .count() as u32;
                prop_assert!(counted <= limits.budget, "account {account}: {counted} > budget {}", limits.budget);
            }
        }
    }
}
