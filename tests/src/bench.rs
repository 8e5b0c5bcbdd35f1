//! Shared by the benchmark examples: one measured row and its percentiles.

use std::time::Duration;

/// What one benchmark row measured.
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Operations.
    pub n: usize,
    /// Wall time of all of them.
    pub wall: Duration,
    /// Each operation's latency.
    pub lat: Vec<Duration>,
}

impl Row {
    /// The `p` quantile (0..=1) of the latencies, in milliseconds.
    pub fn pct(&self, p: f64) -> f64 {
        let mut v = self.lat.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }

    /// Operations per second of wall time.
    pub fn per_sec(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64()
    }
}
