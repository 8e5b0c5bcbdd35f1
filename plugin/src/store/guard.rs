//! The lockout guard on PostgreSQL: every reservation and completion is one short transaction
//! that first takes a transaction-scoped advisory lock on the account, then reads the
//! account's attempts, decides with the same code as the in-process store
//! ([`crate::guard::decide`]) and writes: no read-then-write race between replicas.
//!
//! One row per attempt (`guard_attempt`): in flight (0), refused (1), unknown (2), proven (3).
//! Rows leave with the window (failures and attempts in flight) or the success TTL (proofs). An
//! attempt in flight for longer than [`STALE_IN_FLIGHT`] belongs to a replica that died after
//! sending it: it counts as an unknown failure until the window ends.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use serde_json::{json, Value};

use super::Store;
use crate::{
    cause::{Cause, Stage},
    guard::{
        decide::{decide, FailureView, ProofView, View},
        AccountKey, AccountState, AttemptId, BoxFuture, GuardStore, Limits, Outcome, PasswordKey, Reserved, Scope,
        StoreError,
    },
    report::Finding,
};

/// A future that borrows a pooled client.
pub type ClientFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>;

/// An attempt in flight for longer than this was lost with its replica.
pub const STALE_IN_FLIGHT: Duration = Duration::from_secs(60);

/// How long a proof stays for the checks that waited on it (as in memory).
const JOIN_GRACE: Duration = Duration::from_secs(30);

/// Poll interval of [`GuardStore::changed`].
const POLL: Duration = Duration::from_millis(25);

const IN_FLIGHT: i16 = 0;
const REFUSED: i16 = 1;
const UNKNOWN: i16 = 2;
const PROVEN: i16 = 3;

/// The guard's state in the shared store.
pub struct PgGuardStore {
    store: Arc<Store>,
    limits: Limits,
    /// Wakes this replica's waiters at once when one of its attempts completes; waiters for
    /// another replica's attempt poll.
    local: tokio::sync::Notify,
}

impl std::fmt::Debug for PgGuardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgGuardStore")
            .field("store", &self.store.display())
            .field("limits", &self.limits)
            .finish()
    }
}

impl PgGuardStore {
    /// A guard store on `store` with these limits (the same on every replica).
    pub fn new(store: Arc<Store>, limits: Limits) -> Self {
        PgGuardStore {
            store,
            limits,
            local: tokio::sync::Notify::new(),
        }
    }
}

/// The advisory lock of an account: the first 8 bytes of its tag.
fn lock_id(a: &AccountKey) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&a.0[..8]);
    i64::from_be_bytes(b)
}

/// A transaction holding the account's advisory lock until it ends.
async fn locked<'a>(
    c: &'a mut deadpool_postgres::Client,
    account: &AccountKey,
) -> Result<deadpool_postgres::Transaction<'a>, tokio_postgres::Error> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_id(account)])
        .await?;
    Ok(tx)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn finding_json(f: &Finding) -> Value {
    json!({
        "cause": f.cause.number(),
        "stage": f.stage.as_str(),
        "message": f.message,
        "evidence": f.evidence,
    })
}

fn finding_from(v: &Value) -> Option<Finding> {
    let cause = Cause::from_number(u16::try_from(v.get("cause")?.as_u64()?).ok()?)?;
    let stage_name = v.get("stage")?.as_str()?;
    let stage = Stage::ALL.iter().copied().find(|s| s.as_str() == stage_name)?;
    let message = v.get("message")?.as_str()?.to_owned();
    let evidence = v
        .get("evidence")?
        .as_array()?
        .iter()
        .filter_map(|p| Some((p.get(0)?.as_str()?.to_owned(), p.get(1)?.as_str()?.to_owned())))
        .collect();
    Some(Finding {
        cause,
        stage,
        message,
        evidence,
    })
}

fn findings_from(v: &Value) -> Vec<Finding> {
    v.as_array()
        .map(|a| a.iter().filter_map(finding_from).collect())
        .unwrap_or_default()
}

fn tag32(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if b.len() == 32 {
        out.copy_from_slice(b);
    }
    out
}

/// One row as read for a decision.
struct Row {
    password: PasswordKey,
    scope: Scope,
    state: i16,
    age: Duration,
    findings: Vec<Finding>,
    usable: bool,
}

fn lost_attempt() -> Finding {
    Finding::new(
        Cause::CredLockoutGuard,
        "an attempt with this password was sent by a replica that stopped before its answer: it counts \
         against the account's budget",
    )
    .with("attempt", "lost")
}

impl GuardStore for PgGuardStore {
    fn reserve(
        &self,
        account: AccountKey,
        password: PasswordKey,
        scope: Scope,
        joined: bool,
    ) -> BoxFuture<'_, Result<Reserved, StoreError>> {
        let limits = self.limits;
        Box::pin(async move {
            let r = self
                .store
                .with(move |c| {
                    Box::pin(async move {
                        let tx = locked(c, &account).await?;
                        let acct = &account.0[..];
                        let prune = tx
                            .prepare_cached(
                                "DELETE FROM guard_attempt WHERE account = $1 AND (
                                     (state < 3 AND coalesce(completed_at, reserved_at)
                                         < clock_timestamp() - $2::float8 * interval '1 millisecond')
                                  OR (state = 3 AND completed_at
                                         < clock_timestamp() - $3::float8 * interval '1 millisecond'))",
                            )
                            .await?;
                        let keep = limits.success_ttl.max(JOIN_GRACE);
                        tx.execute(&prune, &[&acct, &ms(limits.window), &ms(keep)]).await?;
                        let read = tx
                            .prepare_cached(
                                "SELECT password, scope, state,
                                        EXTRACT(EPOCH FROM clock_timestamp() - coalesce(completed_at, reserved_at))::float8,
                                        findings, usable
                                   FROM guard_attempt WHERE account = $1
                                  ORDER BY coalesce(completed_at, reserved_at), id",
                            )
                            .await?;
                        let rows: Vec<Row> = tx
                            .query(&read, &[&acct])
                            .await?
                            .iter()
                            .map(|r| {
                                let p: Vec<u8> = r.get(0);
                                let s: Vec<u8> = r.get(1);
                                let age: f64 = r.get(3);
                                let f: Value = r.get(4);
                                Row {
                                    password: PasswordKey(tag32(&p)),
                                    scope: Scope(tag32(&s)),
                                    state: r.get(2),
                                    age: Duration::from_secs_f64(age.max(0.0)),
                                    findings: findings_from(&f),
                                    usable: r.get(5),
                                }
                            })
                            .collect();
                        let lost = lost_attempt();
                        let mut view = View::default();
                        for r in &rows {
                            match r.state {
                                IN_FLIGHT if r.age >= STALE_IN_FLIGHT => view.failures.push(FailureView {
                                    password: r.password,
                                    age: r.age,
                                    finding: &lost,
                                    judged: false,
                                }),
                                IN_FLIGHT => view.in_flight.push((r.password, r.scope)),
                                REFUSED | UNKNOWN => {
                                    if let Some(f) = r.findings.first() {
                                        view.failures.push(FailureView {
                                            password: r.password,
                                            age: r.age,
                                            finding: f,
                                            judged: r.state == REFUSED,
                                        });
                                    }
                                }
                                _ => {
                                    // The newest proof (rows come oldest first).
                                    view.proof = Some(ProofView {
                                        password: r.password,
                                        scope: r.scope,
                                        age: r.age,
                                        findings: &r.findings,
                                        usable: r.usable,
                                    });
                                }
                            }
                        }
                        if let Some(answer) = decide(&view, password, scope, joined, &limits) {
                            tx.commit().await?;
                            return Ok(answer);
                        }
                        let insert = tx
                            .prepare_cached(
                                "INSERT INTO guard_attempt (account, password, scope, state)
                                 VALUES ($1, $2, $3, 0) RETURNING id",
                            )
                            .await?;
                        let row = tx
                            .query_one(&insert, &[&acct, &&password.0[..], &&scope.0[..]])
                            .await?;
                        let id: i64 = row.get(0);
                        tx.commit().await?;
                        Ok(Reserved::Go(u64::try_from(id).unwrap_or_default()))
                    })
                })
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            if matches!(r, Reserved::Refused { .. }) {
                self.store
                    .stats
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(r)
        })
    }

    fn complete(
        &self,
        account: AccountKey,
        attempt: AttemptId,
        outcome: Outcome,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let id = i64::try_from(attempt).unwrap_or(i64::MAX);
            let r = self
                .store
                .with(move |c| {
                    Box::pin(async move {
                        let tx = locked(c, &account).await?;
                        let acct = &account.0[..];
                        let (state, findings, usable) = match &outcome {
                            Outcome::NotSent | Outcome::Released => {
                                tx.execute(
                                    "DELETE FROM guard_attempt WHERE id = $1 AND account = $2 AND state = 0",
                                    &[&id, &acct],
                                )
                                .await?;
                                tx.commit().await?;
                                return Ok(());
                            }
                            Outcome::Proven { findings, usable } => (PROVEN, findings.clone(), *usable),
                            Outcome::Refused(f) => (REFUSED, vec![f.clone()], false),
                            Outcome::Unknown(f) => (UNKNOWN, vec![f.clone()], false),
                        };
                        let json = Value::Array(findings.iter().map(finding_json).collect());
                        let updated = tx
                            .execute(
                                "UPDATE guard_attempt SET state = $3, completed_at = clock_timestamp(),
                                        findings = $4, usable = $5
                                  WHERE id = $1 AND account = $2 AND state = 0",
                                &[&id, &acct, &state, &json, &usable],
                            )
                            .await?;
                        if updated == 1 {
                            if state == PROVEN {
                                // The directory reset its count for the failures it had seen
                                // before this attempt went out; the older proofs are replaced.
                                tx.execute(
                                    "DELETE FROM guard_attempt WHERE account = $1 AND (
                                         (state IN (1, 2) AND completed_at
                                             < (SELECT reserved_at FROM guard_attempt WHERE id = $2))
                                      OR (state = 3 AND id <> $2))",
                                    &[&acct, &id],
                                )
                                .await?;
                            } else {
                                // Any failed attempt forgets the proof (the success cache).
                                tx.execute("DELETE FROM guard_attempt WHERE account = $1 AND state = 3", &[&acct])
                                    .await?;
                            }
                        }
                        tx.commit().await?;
                        Ok(())
                    })
                })
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()));
            self.local.notify_waiters();
            r
        })
    }

    fn complete_detached(self: Arc<Self>, account: AccountKey, attempt: AttemptId, outcome: Outcome) {
        // A reservation not completed stays in flight and then counts as lost: the safe side.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = self.complete(account, attempt, outcome).await {
                    tracing::warn!(error = %e, "lockout guard: outcome not recorded; the reservation stays counted");
                }
            });
        }
    }

    fn state(&self, account: AccountKey) -> BoxFuture<'_, Result<AccountState, StoreError>> {
        let window = ms(self.limits.window);
        Box::pin(async move {
            self.store
                .with(move |c| {
                    Box::pin(async move {
                        let r = c
                            .query_one(
                                "SELECT count(*) FILTER (WHERE state IN (1, 2) OR (state = 0 AND reserved_at
                                            < clock_timestamp() - $3::float8 * interval '1 millisecond')),
                                        count(*) FILTER (WHERE state = 0 AND reserved_at
                                            >= clock_timestamp() - $3::float8 * interval '1 millisecond')
                                   FROM guard_attempt
                                  WHERE account = $1
                                    AND coalesce(completed_at, reserved_at)
                                        >= clock_timestamp() - $2::float8 * interval '1 millisecond'",
                                &[&&account.0[..], &window, &ms(STALE_IN_FLIGHT)],
                            )
                            .await?;
                        let failures: i64 = r.get(0);
                        let in_flight: i64 = r.get(1);
                        Ok(AccountState {
                            failures: u32::try_from(failures).unwrap_or(u32::MAX),
                            in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
                        })
                    })
                })
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(POLL, self.local.notified()).await;
        })
    }

    fn limits(&self) -> Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_survive_the_round_trip() {
        let f = Finding::new(Cause::NlaLogonFailed, "refused")
            .at(Stage::Nla)
            .with("ntstatus", "0xC000006D");
        assert_eq!(finding_from(&finding_json(&f)), Some(f));
        assert_eq!(findings_from(&json!([{"cause": 9999}])), vec![]);
        assert_eq!(findings_from(&json!("garbage")), vec![]);
    }
}
