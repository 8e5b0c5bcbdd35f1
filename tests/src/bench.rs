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

/// Runs `op(worker)` once per worker to warm up, then `n` times in all over `concurrency`
/// workers, timing each call; `op` asserts its own success.
pub async fn measure<F, Fut>(name: &str, n: usize, concurrency: usize, op: F) -> Row
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let concurrency = concurrency.max(1);
    for w in 0..concurrency {
        op(w).await;
    }
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..n / concurrency {
                let t = std::time::Instant::now();
                op(w).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("benchmark task"));
    }
    Row {
        name: name.into(),
        n: lat.len(),
        wall: start.elapsed(),
        lat,
    }
}
