//! The audit log in the shared store: one chain for the whole cluster.
//!
//! Every batch is one transaction that locks the head row (`audit_head`, `FOR UPDATE`), gives
//! the records the next seqs and `prev` hashes (the same JSON lines as the files), inserts
//! them, moves the head and signs it (HMAC of `seq:hash` with `store.hmac_key_file`, a key that
//! never enters the database), and commits with synchronous commit before any DENY of the
//! batch is answered. What `audit verify` detects, made directly in the database:
//! - an UPDATE of a record: the next record's `prev` no longer matches;
//! - an INSERT or a reorder: the seqs inside the lines go back or repeat;
//! - a DELETE in the middle: a seq gap; of the tail: the signed head names a later record;
//! - an edit of the head: its signature no longer verifies (the key is not in the database).
//!
//! Not detectable from the database alone: the head and tail replaced together by an older
//! copy of both (a rollback to a state that was once genuine). Keep `audit verify`'s head line
//! (or the `audit_seq`/`audit_hash` that each replica logs) outside, and pass it back as
//! `--anchor SEQ:HASH`.

use std::sync::Arc;

use ring::hmac;

use super::Store;
use crate::audit::{chain, AuditRecord, Receipt};

/// The signature of a head.
pub fn head_mac(key: &[u8], seq: i64, hash: &str) -> String {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&k, format!("audit-head:{seq}:{hash}").as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The head row as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Last seq (0: none).
    pub seq: i64,
    /// Hash of its line.
    pub hash: String,
    /// Its signature.
    pub mac: String,
}

/// Appends a batch in one transaction; the receipts in order. `Err` when nothing of the batch
/// is committed (or that is unknown: the caller answers an error either way).
pub async fn append(store: &Arc<Store>, mut records: Vec<AuditRecord>) -> Result<Vec<Receipt>, String> {
    let key = store.hmac_key().to_vec();
    store
        .with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let head = tx
                    .query_one("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE", &[])
                    .await?;
                let (mut seq, mut prev): (i64, String) = (head.get(0), head.get(1));
                let insert = tx
                    .prepare_cached("INSERT INTO audit_record (seq, line) VALUES ($1, $2)")
                    .await?;
                let mut receipts = Vec::with_capacity(records.len());
                for rec in &mut records {
                    seq += 1;
                    rec.seq = u64::try_from(seq).unwrap_or_default();
                    rec.prev.clone_from(&prev);
                    // Serialising an AuditRecord cannot fail (strings and numbers only).
                    let line = serde_json::to_string(rec).unwrap_or_default();
                    let hash = chain::line_hash(line.as_bytes());
                    tx.execute(&insert, &[&seq, &line]).await?;
                    receipts.push(Receipt {
                        seq: rec.seq,
                        hash: hash.clone(),
                        prev: prev.clone(),
                    });
                    prev = hash;
                }
                tx.execute(
                    "UPDATE audit_head SET seq = $1, hash = $2, mac = $3 WHERE id = 1",
                    &[&seq, &prev, &head_mac(&key, seq, &prev)],
                )
                .await?;
                // synchronous_commit on: durable on the server before the DENY is answered.
                tx.execute("SET LOCAL synchronous_commit = on", &[]).await?;
                tx.commit().await?;
                Ok(receipts)
            })
        })
        .await
        .map_err(|e| e.to_string())
}

/// Every record line in seq order (from `from_seq` on), and the head.
pub async fn read(store: &Arc<Store>, from_seq: i64) -> Result<(Vec<(i64, String)>, Head), String> {
    store
        .with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", &[])
                    .await?;
                let rows = tx
                    .query(
                        "SELECT seq, line FROM audit_record WHERE seq >= $1 ORDER BY seq",
                        &[&from_seq],
                    )
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                let h = tx
                    .query_opt("SELECT seq, hash, mac FROM audit_head WHERE id = 1", &[])
                    .await?;
                tx.commit().await?;
                let head = h.map_or(
                    Head {
                        seq: -1,
                        hash: String::new(),
                        mac: String::new(),
                    },
                    |h| Head {
                        seq: h.get(0),
                        hash: h.get(1),
                        mac: h.get(2),
                    },
                );
                Ok((rows, head))
            })
        })
        .await
        .map_err(|e| e.to_string())
}

/// What is wrong with the head, given the records read (`None`: it matches).
pub fn check_head(key: &[u8], head: &Head, last: Option<(u64, &str)>) -> Option<String> {
    if head.seq < 0 {
        return Some("the head row (audit_head) is missing: it was deleted".into());
    }
    let signed = head.seq == 0 && head.mac.is_empty() || head_mac(key, head.seq, &head.hash) == head.mac;
    if !signed {
        return Some(format!(
            "the head (seq {}) does not carry a valid signature: audit_head was edited in the database",
            head.seq
        ));
    }
    let head_seq = u64::try_from(head.seq).unwrap_or_default();
    match last {
        None if head_seq == 0 => None,
        None => Some(format!(
            "the signed head names seq {head_seq} but the table holds no record: records were deleted"
        )),
        Some((seq, hash)) if seq == head_seq && hash == head.hash => None,
        Some((seq, _)) if seq < head_seq => Some(format!(
            "the signed head names seq {head_seq} but the last record is seq {seq}: records {}..={head_seq} were deleted (the tail)",
            seq + 1
        )),
        Some((seq, _)) if seq > head_seq => Some(format!(
            "record seq {seq} is beyond the signed head (seq {head_seq}): inserted in the database"
        )),
        Some((seq, _)) => Some(format!(
            "record seq {seq} differs from the one the signed head names: edited in the database"
        )),
    }
}
