//! The lockout guard and the optional success cache: in-memory, keyed by HMAC-SHA256 under a
//! random per-process key. Neither stores a password, nor anything from which one could be
//! recovered without that key (which never leaves the process).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use ring::{hmac, rand::SystemRandom};

use crate::{cause::Cause, report::Finding, secret::Password};

type Key = [u8; 32];

/// What the guard says about an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead and bind.
    Proceed,
    /// This very password failed for this account within the window: the same finding, from
    /// memory, without binding again.
    Remembered(Finding),
    /// Another bad attempt could lock the account: `CRED_LOCKOUT_GUARD`, without binding.
    Refused(Finding),
}

struct Failure {
    password_key: Key,
    at: Instant,
    finding: Finding,
}

/// Remembers recent failures per account. One per process, shared by the LDAP and NLA stages.
pub struct LockoutGuard {
    key: hmac::Key,
    window: Duration,
    max_distinct: u32,
    failures: Mutex<HashMap<Key, Vec<Failure>>>,
}

impl std::fmt::Debug for LockoutGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockoutGuard")
            .field("window", &self.window)
            .field("max_distinct", &self.max_distinct)
            .finish_non_exhaustive()
    }
}

fn new_key() -> hmac::Key {
    // SystemRandom only fails when the OS has no randomness at all; a fixed key would still
    // never store a password, but keys would be guessable, so fall back to the clock as well.
    hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new()).unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hmac::Key::new(hmac::HMAC_SHA256, &t.to_le_bytes())
    })
}

fn tag(key: &hmac::Key, parts: &[&[u8]]) -> Key {
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

/// Lower-case user and domain: the account as the directory would see it.
fn normalize(account: &str, domain: &str) -> (String, String) {
    (account.trim().to_lowercase(), domain.trim().to_lowercase())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps inconsistent: keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LockoutGuard {
    /// A guard with the given window and number of further distinct passwords allowed after a
    /// first failure.
    pub fn new(window: Duration, max_distinct_failures: u32) -> Self {
        LockoutGuard {
            key: new_key(),
            window,
            max_distinct: max_distinct_failures,
            failures: Mutex::default(),
        }
    }

    fn account_key(&self, account: &str, domain: &str) -> Key {
        let (a, d) = normalize(account, domain);
        tag(&self.key, &[b"account", a.as_bytes(), d.as_bytes()])
    }

    fn password_key(&self, account: &str, domain: &str, password: &Password) -> Key {
        let (a, d) = normalize(account, domain);
        tag(
            &self.key,
            &[b"password", a.as_bytes(), d.as_bytes(), password.expose().as_bytes()],
        )
    }

    /// Decides whether a bind with this password may be made now.
    pub fn admit(&self, account: &str, domain: &str, password: &Password) -> Admission {
        let acct = self.account_key(account, domain);
        let pw = self.password_key(account, domain, password);
        let now = Instant::now();
        let mut map = lock(&self.failures);
        let Some(list) = map.get_mut(&acct) else {
            return Admission::Proceed;
        };
        list.retain(|f| now.duration_since(f.at) < self.window);
        if list.is_empty() {
            map.remove(&acct);
            return Admission::Proceed;
        }
        if let Some(f) = list.iter().find(|f| f.password_key == pw) {
            let age = now.duration_since(f.at).as_secs();
            let finding = f
                .finding
                .clone()
                .with("from_memory", true)
                .with("remembered_for_secs", age);
            return Admission::Remembered(finding);
        }
        let n = list.len() as u32;
        if n > self.max_distinct {
            let oldest = list.iter().map(|f| f.at).min().unwrap_or(now);
            let retry = self.window.saturating_sub(now.duration_since(oldest)).as_secs();
            let finding = Finding::new(
                Cause::CredLockoutGuard,
                format!(
                    "not binding: {n} different passwords already failed for this account in the \
                     last {}s; one more bad bind could lock it out",
                    self.window.as_secs()
                ),
            )
            .with("recent_failures", n)
            .with("guard_window_secs", self.window.as_secs())
            .with("retry_after_secs", retry);
            return Admission::Refused(finding);
        }
        Admission::Proceed
    }

    /// Remembers a failed attempt (a bind the directory answered with a credential failure).
    pub fn record_failure(&self, account: &str, domain: &str, password: &Password, finding: &Finding) {
        let acct = self.account_key(account, domain);
        let pw = self.password_key(account, domain, password);
        let now = Instant::now();
        let mut map = lock(&self.failures);
        // Bound the memory: drop expired entries of other accounts now and then.
        if map.len() > 10_000 {
            map.retain(|_, l| l.iter().any(|f| now.duration_since(f.at) < self.window));
        }
        let list = map.entry(acct).or_default();
        list.retain(|f| now.duration_since(f.at) < self.window && f.password_key != pw);
        list.push(Failure {
            password_key: pw,
            at: now,
            finding: finding.clone(),
        });
    }

    /// Forgets the account's failures (its password has just been proven right).
    pub fn record_success(&self, account: &str, domain: &str) {
        let acct = self.account_key(account, domain);
        lock(&self.failures).remove(&acct);
    }
}

/// Short-lived memory of successful binds (off unless a TTL is configured).
pub(crate) struct SuccessCache {
    key: hmac::Key,
    ttl: Duration,
    entries: Mutex<HashMap<Key, (Instant, Vec<Finding>)>>,
}

impl SuccessCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        SuccessCache {
            key: new_key(),
            ttl,
            entries: Mutex::default(),
        }
    }

    fn key(&self, account: &str, domain: &str, password: &Password) -> Key {
        let (a, d) = normalize(account, domain);
        tag(&self.key, &[a.as_bytes(), d.as_bytes(), password.expose().as_bytes()])
    }

    pub(crate) fn get(&self, account: &str, domain: &str, password: &Password) -> Option<Vec<Finding>> {
        if self.ttl.is_zero() {
            return None;
        }
        let k = self.key(account, domain, password);
        let mut map = lock(&self.entries);
        match map.get(&k) {
            Some((at, f)) if at.elapsed() < self.ttl => Some(f.clone()),
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    pub(crate) fn put(&self, account: &str, domain: &str, password: &Password, warnings: Vec<Finding>) {
        if self.ttl.is_zero() {
            return;
        }
        let k = self.key(account, domain, password);
        let now = Instant::now();
        let mut map = lock(&self.entries);
        if map.len() > 10_000 {
            map.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        }
        map.insert(k, (now, warnings));
    }

    /// Drops the entry for this account and password: called when a bind with it fails.
    pub(crate) fn forget(&self, account: &str, domain: &str, password: &Password) {
        if self.ttl.is_zero() {
            return;
        }
        let k = self.key(account, domain, password);
        lock(&self.entries).remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw(s: &str) -> Password {
        Password::new(s.into())
    }

    #[test]
    fn same_wrong_password_is_answered_from_memory() {
        let g = LockoutGuard::new(Duration::from_secs(900), 1);
        assert_eq!(g.admit("Alice", "EXAMPLE", &pw("a")), Admission::Proceed);
        g.record_failure("Alice", "EXAMPLE", &pw("a"), &Finding::new(Cause::CredInvalid, "bad"));
        // case-insensitive account
        match g.admit("alice", "example", &pw("a")) {
            Admission::Remembered(f) => {
                assert_eq!(f.cause, Cause::CredInvalid);
                assert!(f.evidence.iter().any(|(k, v)| k == "from_memory" && v == "true"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn distinct_passwords_are_limited_then_refused() {
        let g = LockoutGuard::new(Duration::from_secs(900), 1);
        let bad = Finding::new(Cause::CredInvalid, "bad");
        g.record_failure("bob", "", &pw("a"), &bad);
        assert_eq!(g.admit("bob", "", &pw("b")), Admission::Proceed);
        g.record_failure("bob", "", &pw("b"), &bad);
        match g.admit("bob", "", &pw("c")) {
            Admission::Refused(f) => assert_eq!(f.cause, Cause::CredLockoutGuard),
            other => panic!("{other:?}"),
        }
        // still remembered, not refused, for a password already seen
        assert!(matches!(g.admit("bob", "", &pw("a")), Admission::Remembered(_)));
        // another account is unaffected
        assert_eq!(g.admit("carol", "", &pw("c")), Admission::Proceed);
        // a success clears the memory
        g.record_success("BOB", "");
        assert_eq!(g.admit("bob", "", &pw("c")), Admission::Proceed);
    }

    #[test]
    fn zero_distinct_refuses_any_other_password_and_window_expires() {
        let g = LockoutGuard::new(Duration::from_millis(50), 0);
        g.record_failure("dan", "d", &pw("a"), &Finding::new(Cause::CredInvalid, "bad"));
        assert!(matches!(g.admit("dan", "d", &pw("b")), Admission::Refused(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(g.admit("dan", "d", &pw("b")), Admission::Proceed);
        assert_eq!(g.admit("dan", "d", &pw("a")), Admission::Proceed);
    }

    #[test]
    fn nothing_stored_contains_the_password() {
        let g = LockoutGuard::new(Duration::from_secs(900), 1);
        g.record_failure(
            "eve",
            "",
            &pw("canary-guard-pw"),
            &Finding::new(Cause::CredInvalid, "bad"),
        );
        let dump = format!("{g:?}");
        assert!(!dump.contains("canary"));
        let map = lock(&g.failures);
        for (k, list) in map.iter() {
            assert!(!k.windows(6).any(|w| w == b"canary"));
            for f in list {
                assert!(!f.password_key.windows(6).any(|w| w == b"canary"));
            }
        }
    }

    #[test]
    fn success_cache_honours_ttl_and_password() {
        let c = SuccessCache::new(Duration::from_millis(50));
        assert!(c.get("a", "", &pw("x")).is_none());
        c.put("a", "", &pw("x"), vec![]);
        assert!(c.get("A", "", &pw("x")).is_some());
        assert!(c.get("a", "", &pw("y")).is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get("a", "", &pw("x")).is_none());
        let off = SuccessCache::new(Duration::ZERO);
        off.put("a", "", &pw("x"), vec![]);
        assert!(off.get("a", "", &pw("x")).is_none());
    }
}
