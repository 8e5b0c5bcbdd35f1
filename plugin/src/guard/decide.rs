//! The guard's decision, shared by every store: given one account's state (read atomically by
//! the store), what a reservation gets. Pure: no clock, no I/O.

use std::time::Duration;

use super::{Limits, PasswordKey, Reserved, Scope, WaitReason};
use crate::report::Finding;

/// A failed attempt within the window.
pub(crate) struct FailureView<'a> {
    pub(crate) password: PasswordKey,
    /// Since its completion.
    pub(crate) age: Duration,
    pub(crate) finding: &'a Finding,
    /// `Outcome::Refused` (remembered for everyone) rather than `Outcome::Unknown`.
    pub(crate) judged: bool,
}

/// The latest proof within its keep time.
pub(crate) struct ProofView<'a> {
    pub(crate) password: PasswordKey,
    pub(crate) scope: Scope,
    pub(crate) age: Duration,
    pub(crate) findings: &'a [Finding],
    pub(crate) usable: bool,
}

/// One account's state, expired entries already left out.
#[derive(Default)]
pub(crate) struct View<'a> {
    /// Oldest first.
    pub(crate) failures: Vec<FailureView<'a>>,
    pub(crate) in_flight: Vec<(PasswordKey, Scope)>,
    pub(crate) proof: Option<ProofView<'a>>,
}

/// What a reservation gets; `None`: go (the store takes the slot in the same atomic step).
pub(crate) fn decide(
    v: &View<'_>,
    password: PasswordKey,
    scope: Scope,
    joined: bool,
    limits: &Limits,
) -> Option<Reserved> {
    // A refusal of this password is remembered; an unjudged answer only for those that waited
    // on it.
    if let Some(f) = v
        .failures
        .iter()
        .rev()
        .find(|f| f.password == password && (f.judged || joined))
    {
        return Some(Reserved::Remembered {
            finding: f.finding.clone(),
            age: f.age,
        });
    }
    if v.in_flight.iter().any(|(p, s)| *p == password && *s == scope) {
        return Some(Reserved::Wait(WaitReason::SamePassword));
    }
    if let Some(p) = &v.proof {
        if p.password == password && p.scope == scope && (joined || p.age < limits.success_ttl) {
            return Some(Reserved::Proven {
                findings: p.findings.to_vec(),
                usable: p.usable,
                age: p.age,
            });
        }
    }
    let failures = v.failures.len() as u32;
    let in_flight = v.in_flight.len() as u32;
    if failures + in_flight >= limits.budget {
        if failures < limits.budget && in_flight > 0 {
            return Some(Reserved::Wait(WaitReason::BudgetInFlight));
        }
        let oldest = v.failures.iter().map(|f| f.age).max().unwrap_or_default();
        return Some(Reserved::Refused {
            failures,
            in_flight,
            retry_after: limits.window.saturating_sub(oldest),
        });
    }
    None
}
