//! The sweep lease: one sweep per interval for the whole cluster. Slots are numbered from the
//! Unix epoch (`epoch ms / interval`), so every replica agrees on them; the first replica to
//! move the one row of `sweep_lease` to a slot sweeps it (an `INSERT … ON CONFLICT DO UPDATE …
//! WHERE slot < new slot`: the row lock makes the claim atomic, later claimants update
//! nothing). A replica that dies mid-sweep leaves the rest of that slot unswept; the next slot
//! is claimed as usual.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::Store;
use crate::sweep::Lease;

/// [`Lease`] on the shared store.
pub struct PgLease {
    store: Arc<Store>,
    holder: String,
}

impl PgLease {
    /// A lease claimed under the name `holder` (for operators reading the table).
    pub fn new(store: Arc<Store>, holder: String) -> PgLease {
        PgLease { store, holder }
    }
}

impl Lease for PgLease {
    fn claim(&self, slot: i64) -> BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move {
            let holder = self.holder.clone();
            self.store
                .with(move |c| {
                    Box::pin(async move {
                        c.query_opt(
                            "INSERT INTO sweep_lease (id, slot, holder) VALUES (1, $1, $2)
                             ON CONFLICT (id) DO UPDATE SET slot = EXCLUDED.slot, holder = EXCLUDED.holder,
                                                           taken_at = now()
                             WHERE sweep_lease.slot < EXCLUDED.slot
                             RETURNING slot",
                            &[&slot, &holder],
                        )
                        .await
                        .map(|r| r.is_some())
                    })
                })
                .await
                .map_err(|e| e.to_string())
        })
    }
}
