//! The in-process guard store: one mutex over a map of accounts, bounded.
//!
//! Memory is bounded whatever the request stream: at most `capacity` accounts. Expired state is
//! pruned from the front of a time-ordered queue (amortised O(1) per call, never a full scan on
//! insert); when the map is full, an account with no failure and nothing in flight (only a
//! remembered proof) is evicted first, then the account whose state is oldest. An account with
//! an attempt in flight is never evicted: when every account has one, reservations fail
//! (closed) with [`StoreError::Full`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{
    decide::{decide, FailureView, ProofView, View},
    AccountKey, AccountState, AttemptId, BoxFuture, GuardStore, Limits, Outcome, PasswordKey, Reserved, Scope,
    StoreError,
};
use crate::report::Finding;

/// How long the answer of an attempt stays available to the checks that waited on it.
const JOIN_GRACE: Duration = Duration::from_secs(30);

/// How many of the oldest entries an eviction looks at.
const EVICTION_LOOKAHEAD: usize = 64;

/// Poll interval of [`GuardStore::changed`] (a completion also wakes waiters at once).
const POLL: Duration = Duration::from_millis(20);

struct Failed {
    password: PasswordKey,
    at: Instant,
    finding: Finding,
    /// `Outcome::Refused`: remembered for every later check; else only for those that waited.
    judged: bool,
}

struct Flight {
    id: AttemptId,
    password: PasswordKey,
    scope: Scope,
    reserved_at: Instant,
}

struct Proof {
    password: PasswordKey,
    scope: Scope,
    at: Instant,
    findings: Vec<Finding>,
    usable: bool,
}

#[derive(Default)]
struct Entry {
    failures: Vec<Failed>,
    in_flight: Vec<Flight>,
    proof: Option<Proof>,
}

impl Entry {
    fn prune(&mut self, now: Instant, limits: &Limits) {
        self.failures.retain(|f| now.duration_since(f.at) < limits.window);
        let keep = limits.success_ttl.max(JOIN_GRACE);
        if self.proof.as_ref().is_some_and(|p| now.duration_since(p.at) >= keep) {
            self.proof = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.failures.is_empty() && self.in_flight.is_empty() && self.proof.is_none()
    }

    /// When this entry's oldest state expires (None: nothing expires, e.g. only in flight).
    fn next_expiry(&self, limits: &Limits) -> Option<Instant> {
        let f = self.failures.iter().map(|f| f.at + limits.window).min();
        let p = self.proof.as_ref().map(|p| p.at + limits.success_ttl.max(JOIN_GRACE));
        match (f, p) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

struct Inner {
    map: HashMap<AccountKey, Entry>,
    /// (expiry, account): pushed whenever an entry gains state that expires; stale items are
    /// skipped when popped.
    expiry: VecDeque<(Instant, AccountKey)>,
    next_id: AttemptId,
}

/// The in-process store.
pub struct MemoryStore {
    limits: Limits,
    capacity: usize,
    inner: Mutex<Inner>,
    notify: Notify,
    evictions: AtomicU64,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("limits", &self.limits)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// A store for `capacity` accounts at most (at least 1).
    pub fn new(limits: Limits, capacity: usize) -> Self {
        MemoryStore {
            limits,
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                expiry: VecDeque::new(),
                next_id: 1,
            }),
            notify: Notify::new(),
            evictions: AtomicU64::new(0),
        }
    }

    /// Accounts held now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// True when no account is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Accounts evicted because the store was full.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves at worst an account counted too high.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops expired state from the front of the queue; compacts the queue when stale items
    /// pile up (amortised: only after as many pushes as there are accounts).
    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some(&(at, key)) = inner.expiry.front() {
            if at > now {
                break;
            }
            inner.expiry.pop_front();
            if let Some(e) = inner.map.get_mut(&key) {
                e.prune(now, &self.limits);
                if e.is_empty() {
                    inner.map.remove(&key);
                }
            }
        }
        if inner.expiry.len() > 4 * inner.map.len() + 1024 {
            let mut q: Vec<(Instant, AccountKey)> = inner
                .map
                .iter()
                .filter_map(|(k, e)| e.next_expiry(&self.limits).map(|t| (t, *k)))
                .collect();
            q.sort();
            inner.expiry = q.into();
        }
    }

    /// Makes room for one more account, looking only at the oldest few entries.
    fn make_room(&self, inner: &mut Inner) -> Result<(), StoreError> {
        if inner.map.len() < self.capacity {
            return Ok(());
        }
        while let Some((_, k)) = inner.expiry.front() {
            if inner.map.contains_key(k) {
                break;
            }
            inner.expiry.pop_front();
        }
        let oldest: Vec<AccountKey> = inner.expiry.iter().take(EVICTION_LOOKAHEAD).map(|(_, k)| *k).collect();
        let pick = |want_clean: bool| {
            oldest.iter().copied().find(|k| {
                inner
                    .map
                    .get(k)
                    .is_some_and(|e| e.in_flight.is_empty() && (!want_clean || e.failures.is_empty()))
            })
        };
        // An entry with no failure (only a remembered proof) first, else the oldest one with
        // nothing in flight.
        match pick(true).or_else(|| pick(false)) {
            Some(k) => {
                inner.map.remove(&k);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            None => Err(StoreError::Full(inner.map.len())),
        }
    }

    fn reserve_now(
        &self,
        account: AccountKey,
        password: PasswordKey,
        scope: Scope,
        joined: bool,
    ) -> Result<Reserved, StoreError> {
        let now = Instant::now();
        let limits = self.limits;
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        if !inner.map.contains_key(&account) {
            self.make_room(&mut inner)?;
        }
        let id = inner.next_id;
        let e = inner.map.entry(account).or_default();
        e.prune(now, &limits);
        let view = View {
            failures: e
                .failures
                .iter()
                .map(|f| FailureView {
                    password: f.password,
                    age: now.duration_since(f.at),
                    finding: &f.finding,
                    judged: f.judged,
                })
                .collect(),
            in_flight: e.in_flight.iter().map(|f| (f.password, f.scope)).collect(),
            proof: e.proof.as_ref().map(|p| ProofView {
                password: p.password,
                scope: p.scope,
                age: now.duration_since(p.at),
                findings: &p.findings,
                usable: p.usable,
            }),
        };
        if let Some(answer) = decide(&view, password, scope, joined, &limits) {
            return Ok(answer);
        }
        e.in_flight.push(Flight {
            id,
            password,
            scope,
            reserved_at: now,
        });
        inner.next_id += 1;
        Ok(Reserved::Go(id))
    }

    fn complete_now(&self, account: AccountKey, attempt: AttemptId, outcome: Outcome) {
        let now = Instant::now();
        let limits = self.limits;
        let mut inner = self.lock();
        let Some(e) = inner.map.get_mut(&account) else { return };
        let Some(pos) = e.in_flight.iter().position(|f| f.id == attempt) else {
            return;
        };
        let flight = e.in_flight.swap_remove(pos);
        let judged = matches!(outcome, Outcome::Refused(_));
        match outcome {
            Outcome::NotSent | Outcome::Released => {}
            Outcome::Proven { findings, usable } => {
                // The password is right: the directory resets its counter too, but only for the
                // failures it had seen before this attempt went out; one that completed later
                // may have reached it after the success and still counts.
                e.failures.retain(|f| f.at >= flight.reserved_at);
                e.proof = Some(Proof {
                    password: flight.password,
                    scope: flight.scope,
                    at: now,
                    findings,
                    usable,
                });
            }
            Outcome::Refused(finding) | Outcome::Unknown(finding) => {
                // Any failed attempt forgets the proof (the success cache).
                e.proof = None;
                e.failures.push(Failed {
                    password: flight.password,
                    at: now,
                    finding,
                    judged,
                });
            }
        }
        let next = e.next_expiry(&limits);
        let empty = e.is_empty();
        if empty {
            inner.map.remove(&account);
        } else if let Some(t) = next {
            inner.expiry.push_back((t.max(now), account));
        }
        drop(inner);
        self.notify.notify_waiters();
    }
}

impl GuardStore for MemoryStore {
    fn reserve(
        &self,
        account: AccountKey,
        password: PasswordKey,
        scope: Scope,
        joined: bool,
    ) -> BoxFuture<'_, Result<Reserved, StoreError>> {
        let r = self.reserve_now(account, password, scope, joined);
        Box::pin(async move { r })
    }

    fn complete(
        &self,
        account: AccountKey,
        attempt: AttemptId,
        outcome: Outcome,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.complete_now(account, attempt, outcome);
        Box::pin(async { Ok(()) })
    }

    fn complete_detached(self: Arc<Self>, account: AccountKey, attempt: AttemptId, outcome: Outcome) {
        self.complete_now(account, attempt, outcome);
    }

    fn state(&self, account: AccountKey) -> BoxFuture<'_, Result<AccountState, StoreError>> {
        let now = Instant::now();
        let mut inner = self.lock();
        let s = inner.map.get_mut(&account).map_or_else(AccountState::default, |e| {
            e.prune(now, &self.limits);
            AccountState {
                failures: e.failures.len() as u32,
                in_flight: e.in_flight.len() as u32,
            }
        });
        Box::pin(async move { Ok(s) })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(POLL, self.notify.notified()).await;
        })
    }

    fn limits(&self) -> Limits {
        self.limits
    }
}
