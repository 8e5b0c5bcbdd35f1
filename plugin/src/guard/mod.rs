//! The lockout guard: a check never spends an account's lockout budget without a reservation
//! taken first, keyed on the identity the directory or the target authenticates.
//!
//! An *attempt* is one LDAP bind or one NLA AUTHENTICATE with the target account's password.
//! Per account (an HMAC of its canonical identity, see [`identity`]) and per window, at most
//! `budget = 1 + guard_max_distinct_failures` attempts may fail, counting those in flight:
//!
//! - **Reserve before the attempt.** [`Guard::admit`] takes a slot atomically in the store before
//!   anything is sent and hands back a [`Ticket`]. A check whose password is already in flight
//!   for the account waits for that attempt and reports its answer (single-flight); a different
//!   password waits while in-flight attempts could still free the budget, and is refused with
//!   `CRED_LOCKOUT_GUARD` once failures alone spend it.
//! - **An attempt sent is an attempt spent.** [`Ticket::sending`] marks the moment the bytes
//!   go out; from then on the attempt counts as failed unless [`Outcome::Proven`] arrives. A
//!   ticket dropped unfinished (the check cancelled by the gateway's deadline or by shutdown)
//!   completes as [`Outcome::Unknown`] if it was sent, and releases its slot if not.
//! - **Never fail open.** A store that cannot answer refuses the attempt.
//! - **Memory first, proof second.** A password refused for the account within the window is
//!   answered from memory without an attempt; a password proven right is remembered for the
//!   success-cache TTL (0: only for checks that waited on that very attempt), and forgotten on
//!   any failed attempt for the account.
//!
//! The state lives behind [`GuardStore`] (reserve, complete, query): [`MemoryStore`] in process,
//! bounded; a shared store gives the same guarantees to many replicas. The HMAC key never
//! leaves the [`Guard`]: a store sees only tags.

pub(crate) mod decide;
pub mod identity;
mod memory;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use ring::{hmac, rand::SystemRandom};

pub use memory::MemoryStore;

use crate::{cause::Cause, deadline::Budget, report::Finding, secret::Password};

/// A boxed future, for the object-safe store interface.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// HMAC tag of an account's canonical identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountKey(pub [u8; 32]);

/// HMAC tag of (account, password).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PasswordKey(pub [u8; 32]);

/// Who answers an attempt: single-flight joins only attempts with the same password *and* the
/// same scope, and only the directory's proofs are reused as a success cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(pub [u8; 32]);

impl Scope {
    /// The directory (LDAP bind or Kerberos AS exchange): one answer for the account.
    pub const DIRECTORY: Scope = Scope([0; 32]);
}

/// Identifies a reservation within a store.
pub type AttemptId = u64;

/// What an attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The password was proven right. `usable` is false when the answer still stops the session
    /// (must change, expired, logon type not granted); `findings` are reported as they are.
    Proven {
        /// Findings of the proving answer (warnings, or the deny that stops the session).
        findings: Vec<Finding>,
        /// A session would work.
        usable: bool,
    },
    /// The directory or target judged the attempt and refused it: counted, and this password is
    /// answered from memory for the rest of the window.
    Refused(Finding),
    /// Sent, but no judgement came back (timeout, reset, cancellation, an error answer): counted,
    /// reported to the checks that waited on it, but not remembered for later checks.
    Unknown(Finding),
    /// Nothing was written: the slot is released.
    NotSent,
    /// Written, but refused before any password check (the target refuses NTLM itself): the
    /// slot is released, as no lockout counter moved.
    Released,
}

/// The store's answer to a reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reserved {
    /// The slot is taken: make the attempt, then complete it.
    Go(AttemptId),
    /// This password was refused within the window (or, for a check that waited on it, the
    /// attempt it waited on came to nothing).
    Remembered {
        /// The finding of that attempt.
        finding: Finding,
        /// How long ago.
        age: Duration,
    },
    /// This password was proven right recently (success cache, or the attempt waited on).
    Proven {
        /// Its findings.
        findings: Vec<Finding>,
        /// A session would work.
        usable: bool,
        /// How long ago.
        age: Duration,
    },
    /// Come back when an attempt in flight has completed.
    Wait(WaitReason),
    /// The budget is spent by failures within the window.
    Refused {
        /// Failed attempts within the window.
        failures: u32,
        /// Attempts in flight.
        in_flight: u32,
        /// When the oldest failure leaves the window.
        retry_after: Duration,
    },
}

/// Why a reservation has to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// The same password is in flight for the same scope: its answer will be ours.
    SamePassword,
    /// Failures plus attempts in flight fill the budget; an attempt in flight may free a slot.
    BudgetInFlight,
}

/// An account's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountState {
    /// Failed attempts within the window.
    pub failures: u32,
    /// Attempts in flight.
    pub in_flight: u32,
}

/// A store that cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is full of accounts with attempts in flight.
    #[error("the lockout guard is full ({0} accounts with attempts in flight)")]
    Full(usize),
    /// The store is unreachable or failed.
    #[error("the lockout guard's store failed: {0}")]
    Unavailable(String),
}

/// The guard's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Attempts that may fail per window, counting those in flight (`1 + max_distinct`).
    pub budget: u32,
    /// How long a failure counts.
    pub window: Duration,
    /// How long a proof is reused for later checks (0: only for checks that waited on it).
    pub success_ttl: Duration,
}

impl Limits {
    /// `budget = 1 + max_distinct_failures`.
    pub fn new(window: Duration, max_distinct_failures: u32, success_ttl: Duration) -> Self {
        Limits {
            budget: max_distinct_failures.saturating_add(1),
            window,
            success_ttl,
        }
    }
}

/// The guard's state: reserve, complete, query. Each call is atomic for one account; the
/// implementation decides how (a mutex in process, one statement in a database).
pub trait GuardStore: Send + Sync + 'static {
    /// Takes a slot for an attempt with `password` in `scope`, or says why not. `joined`: the
    /// caller waited on an attempt with this password and wants its answer.
    fn reserve(
        &self,
        account: AccountKey,
        password: PasswordKey,
        scope: Scope,
        joined: bool,
    ) -> BoxFuture<'_, Result<Reserved, StoreError>>;
    /// Completes a reservation.
    fn complete(
        &self,
        account: AccountKey,
        attempt: AttemptId,
        outcome: Outcome,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Completes a reservation from a destructor: must not block; may finish later.
    fn complete_detached(self: Arc<Self>, account: AccountKey, attempt: AttemptId, outcome: Outcome);
    /// The account's failures and attempts in flight.
    fn state(&self, account: AccountKey) -> BoxFuture<'_, Result<AccountState, StoreError>>;
    /// Resolves when an attempt may have completed (or after a short poll interval).
    fn changed(&self) -> BoxFuture<'_, ()>;
    /// The limits in force.
    fn limits(&self) -> Limits;
}

/// What the guard says about an attempt.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead: the slot is reserved.
    Go(Ticket),
    /// A finding from memory, without an attempt (remembered refusal, or the answer of the
    /// attempt this check waited on).
    Remembered(Finding),
    /// Proven right recently, without an attempt.
    Proven {
        /// Findings of the proof, marked `from_memory`.
        findings: Vec<Finding>,
        /// A session would work.
        usable: bool,
    },
    /// `CRED_LOCKOUT_GUARD`: another attempt could lock the account, or the guard cannot tell.
    Refused(Finding),
}

/// One process's guard: the HMAC key and the store.
pub struct Guard {
    key: hmac::Key,
    store: Arc<dyn GuardStore>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("limits", &self.store.limits())
            .finish_non_exhaustive()
    }
}

fn random_key() -> hmac::Key {
    // SystemRandom only fails when the OS has no randomness at all; keys must still differ per
    // process, so fall back to the clock (a guessable key still never stores a password).
    hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new()).unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hmac::Key::new(hmac::HMAC_SHA256, &t.to_le_bytes())
    })
}

fn tag(key: &hmac::Key, parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        // Length-prefixed so that ("ab","c") and ("a","bc") differ.
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

impl Guard {
    /// An in-process guard with a random per-process key.
    pub fn memory(limits: Limits, capacity: usize) -> Guard {
        Guard::new(random_key(), Arc::new(MemoryStore::new(limits, capacity)))
    }

    /// A guard over any store; `key` must be the same for every process sharing the store.
    pub fn new(key: hmac::Key, store: Arc<dyn GuardStore>) -> Guard {
        Guard { key, store }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.store.limits()
    }

    /// The key of an account from its canonical identity (see [`identity`]).
    pub fn account(&self, canonical: &str) -> AccountKey {
        AccountKey(tag(&self.key, &[b"account", canonical.as_bytes()]))
    }

    /// The scope of an NLA logon to one target (the connected address and port).
    pub fn target_scope(&self, target: &str) -> Scope {
        Scope(tag(&self.key, &[b"target", target.as_bytes()]))
    }

    fn password(&self, account: AccountKey, password: &Password) -> PasswordKey {
        PasswordKey(tag(&self.key, &[b"password", &account.0, password.expose().as_bytes()]))
    }

    /// The account's failures and attempts in flight; an error means "cannot tell".
    pub async fn state(&self, account: AccountKey) -> Result<AccountState, StoreError> {
        self.store.state(account).await
    }

    /// Reserves an attempt with `password` for `account`, waiting (within the check's budget)
    /// while an attempt in flight decides. Never an attempt without a reservation.
    pub async fn admit(&self, account: AccountKey, password: &Password, scope: Scope, budget: &Budget) -> Admission {
        let pw = self.password(account, password);
        let limits = self.store.limits();
        let mut joined = false;
        loop {
            let answer = match self.store.reserve(account, pw, scope, joined).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "lockout guard unavailable: no attempt");
                    return Admission::Refused(
                        Finding::new(
                            Cause::CredLockoutGuard,
                            format!("not attempting: the lockout guard cannot count this attempt ({e})"),
                        )
                        .with("guard_error", e),
                    );
                }
            };
            match answer {
                Reserved::Go(attempt) => {
                    return Admission::Go(Ticket {
                        store: Some(self.store.clone()),
                        account,
                        attempt,
                        sent: false,
                    })
                }
                Reserved::Remembered { finding, age } => {
                    let f = finding
                        .with("from_memory", true)
                        .with("remembered_for_secs", age.as_secs());
                    return Admission::Remembered(if joined { f.with("shared_attempt", true) } else { f });
                }
                Reserved::Proven { findings, usable, age } => {
                    return Admission::Proven {
                        findings: findings
                            .into_iter()
                            .map(|f| f.with("from_memory", true).with("remembered_for_secs", age.as_secs()))
                            .collect(),
                        usable,
                    }
                }
                Reserved::Refused {
                    failures,
                    in_flight,
                    retry_after,
                } => return Admission::Refused(refusal(failures, in_flight, retry_after, limits)),
                Reserved::Wait(reason) => {
                    joined |= reason == WaitReason::SamePassword;
                    // Poll at most until the check's budget runs out.
                    if budget
                        .run(Duration::from_secs(3600), self.store.changed())
                        .await
                        .is_err()
                    {
                        let why = match reason {
                            WaitReason::SamePassword => "an attempt with this password is still in flight",
                            WaitReason::BudgetInFlight => "attempts in flight fill the account's budget",
                        };
                        return Admission::Refused(
                            Finding::new(
                                Cause::CredLockoutGuard,
                                format!("not attempting: {why} and the check ran out of time waiting for it"),
                            )
                            .with("waited_for", "attempt_in_flight")
                            .with("guard_budget", limits.budget),
                        );
                    }
                }
            }
        }
    }
}

fn refusal(failures: u32, in_flight: u32, retry_after: Duration, limits: Limits) -> Finding {
    Finding::new(
        Cause::CredLockoutGuard,
        format!(
            "not attempting: {failures} attempt(s) already failed for this account in the last {}s \
             (budget {}); one more bad attempt could lock it out",
            limits.window.as_secs(),
            limits.budget
        ),
    )
    .with("recent_failures", failures)
    .with("in_flight", in_flight)
    .with("guard_budget", limits.budget)
    .with("guard_window_secs", limits.window.as_secs())
    .with("retry_after_secs", retry_after.as_secs())
}

/// A reserved attempt. Finish it with the outcome; dropped unfinished it completes as
/// [`Outcome::Unknown`] if [`Ticket::sending`] was called, else releases the slot.
pub struct Ticket {
    store: Option<Arc<dyn GuardStore>>,
    account: AccountKey,
    attempt: AttemptId,
    sent: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("attempt", &self.attempt)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// The attempt's bytes are about to be written: from now on it counts.
    pub fn sending(&mut self) {
        self.sent = true;
    }

    /// Whether [`Ticket::sending`] was called.
    pub fn was_sent(&self) -> bool {
        self.sent
    }

    /// The write itself failed before anything went out: the attempt may be made again on
    /// another connection under the same reservation.
    pub fn not_sent(&mut self) {
        self.sent = false;
    }

    /// Completes the reservation. An outcome other than `NotSent` for an attempt never marked
    /// as sent is still recorded as given.
    pub async fn finish(mut self, outcome: Outcome) {
        let Some(store) = self.store.take() else { return };
        let outcome = match outcome {
            Outcome::NotSent if self.sent => Outcome::Unknown(cancelled()),
            o => o,
        };
        if let Err(e) = store.complete(self.account, self.attempt, outcome.clone()).await {
            // The store keeps the reservation until it expires: counted, the safe side.
            tracing::warn!(error = %e, "lockout guard: outcome not recorded; the reservation stays counted");
        }
    }
}

fn cancelled() -> Finding {
    Finding::new(
        Cause::CredLockoutGuard,
        "an attempt with this password was sent but its answer never came (the check was cancelled): \
         it counts against the account's budget",
    )
    .with("attempt", "cancelled")
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            let outcome = if self.sent {
                Outcome::Unknown(cancelled())
            } else {
                Outcome::NotSent
            };
            store.complete_detached(self.account, self.attempt, outcome);
        }
    }
}

#[cfg(test)]
mod tests;
