//! The check history in the shared store: one table for every replica (`check_history`), so a
//! target's history and the fleet's trends are the same whichever replica is asked. Entries
//! older than `history.retention_secs` are deleted by the replica that records, at most once
//! a minute.

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc,
};

use futures::future::BoxFuture;

use super::Store;
use crate::history::{now_ms, Entry, History, HistoryConfig};

/// [`History`] on PostgreSQL.
pub struct PgHistory {
    store: Arc<Store>,
    cfg: HistoryConfig,
    last_prune_ms: AtomicI64,
}

impl PgHistory {
    /// The history of the store's cluster.
    pub fn new(store: Arc<Store>, cfg: HistoryConfig) -> PgHistory {
        PgHistory {
            store,
            cfg,
            last_prune_ms: AtomicI64::new(0),
        }
    }

    async fn prune_if_due(&self) -> Result<(), String> {
        let now = now_ms();
        let last = self.last_prune_ms.load(Ordering::Relaxed);
        if now - last < 60_000
            || self
                .last_prune_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        let secs = f64::from(u32::try_from(self.cfg.retention.as_secs()).unwrap_or(u32::MAX));
        self.store
            .with(move |c| {
                Box::pin(async move {
                    c.execute(
                        "DELETE FROM check_history WHERE at < now() - make_interval(secs => $1)",
                        &[&secs],
                    )
                    .await
                    .map(|_| ())
                })
            })
            .await
            .map_err(|e| e.to_string())
    }
}

fn parse(rows: &[tokio_postgres::Row]) -> Vec<Entry> {
    rows.iter()
        .filter_map(|r| serde_json::from_value(r.get::<_, serde_json::Value>(0)).ok())
        .collect()
}

impl History for PgHistory {
    fn record(&self, entry: Entry) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let json = serde_json::to_value(&entry).map_err(|e| e.to_string())?;
            let at = entry.at_ms as f64 / 1000.0;
            self.store
                .with(move |c| {
                    Box::pin(async move {
                        c.execute(
                            "INSERT INTO check_history (check_id, target, at, entry)
                             VALUES ($1, $2, to_timestamp($3), $4) ON CONFLICT (check_id) DO NOTHING",
                            &[&entry.check_id, &entry.target, &at, &json],
                        )
                        .await
                        .map(|_| ())
                    })
                })
                .await
                .map_err(|e| e.to_string())?;
            self.prune_if_due().await
        })
    }

    fn since(&self, since_ms: i64) -> BoxFuture<'_, Result<Vec<Entry>, String>> {
        let since = since_ms as f64 / 1000.0;
        Box::pin(async move {
            self.store
                .with(move |c| {
                    Box::pin(async move {
                        c.query(
                            "SELECT entry FROM check_history WHERE at >= to_timestamp($1) ORDER BY at, check_id",
                            &[&since],
                        )
                        .await
                        .map(|rows| parse(&rows))
                    })
                })
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn target<'a>(
        &'a self,
        target: &'a str,
        before: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Entry>, String>> {
        let (target, before) = (target.to_owned(), before.map(str::to_owned));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Box::pin(async move {
            self.store
                .with(move |c| {
                    Box::pin(async move {
                        c.query(
                            "SELECT entry FROM check_history
                             WHERE target = $1 AND ($2::text IS NULL OR check_id < $2)
                             ORDER BY check_id DESC LIMIT $3",
                            &[&target, &before, &limit],
                        )
                        .await
                        .map(|rows| parse(&rows))
                    })
                })
                .await
                .map_err(|e| e.to_string())
        })
    }
}
