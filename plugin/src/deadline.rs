//! One time budget per check, shared by its stages: no read or write without a deadline.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::{
    cause::{Cause, Stage},
    report::Finding,
};

/// The finding for a budget that ran out in `stage`.
pub fn deadline_finding(stage: Stage, budget: &Budget) -> Finding {
    Finding::new(
        Cause::CheckDeadlineExceeded,
        format!("the check ran out of time during the {stage} stage"),
    )
    .with("stage", stage)
    .with("elapsed_ms", budget.elapsed().as_millis())
}

/// The check's budget.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    start: Instant,
    deadline: Instant,
}

/// The operation ran out of time; says which limit hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// The stage's own limit (the check still has time left).
    Stage,
    /// The whole check's budget.
    Check,
}

impl Budget {
    /// A budget of `total` from now.
    pub fn new(total: Duration) -> Self {
        let start = Instant::now();
        Budget {
            start,
            deadline: start + total,
        }
    }

    /// When the check started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Time since the check started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Time left.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// True once the budget is spent.
    pub fn is_spent(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The earlier of the check deadline and now + `stage_limit`.
    pub fn stage_deadline(&self, stage_limit: Duration) -> (Instant, Expired) {
        let stage = Instant::now() + stage_limit;
        if stage < self.deadline {
            (stage, Expired::Stage)
        } else {
            (self.deadline, Expired::Check)
        }
    }

    /// Runs `fut` under the stage limit and the check deadline, whichever comes first.
    pub async fn run<F: Future>(&self, stage_limit: Duration, fut: F) -> Result<F::Output, Expired> {
        let (at, which) = self.stage_deadline(stage_limit);
        tokio::time::timeout_at(at, fut).await.map_err(|_| which)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stage_limit_and_check_deadline_are_told_apart() {
        let b = Budget::new(Duration::from_millis(200));
        let r = b
            .run(Duration::from_millis(10), tokio::time::sleep(Duration::from_secs(5)))
            .await;
        assert_eq!(r, Err(Expired::Stage));
        let r = b
            .run(Duration::from_secs(10), tokio::time::sleep(Duration::from_secs(5)))
            .await;
        assert_eq!(r, Err(Expired::Check));
        assert!(b.is_spent());
        assert_eq!(
            b.run(Duration::from_secs(1), async { 7 }).await,
            Err(Expired::Check).or(Ok(7))
        );
    }
}
