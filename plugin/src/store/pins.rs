//! Trust-on-first-use pins in the shared store: the first replica to see a target records its
//! certificate's fingerprint (`INSERT … ON CONFLICT DO NOTHING`: first writer wins
//! cluster-wide), and every replica compares later certificates with that one. Keyed on the
//! connected address and port, like the in-process store; the name the request expected is
//! kept beside it as evidence.

use std::sync::Arc;

use super::Store;

/// What the store says of a fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinAnswer {
    /// Recorded now: nobody had seen the target.
    First,
    /// Equal to the recorded pin.
    Same,
    /// Differs from the recorded pin (given).
    Different(String),
}

/// Records or compares `fingerprint` for `target`.
pub async fn check(
    store: &Arc<Store>,
    target: &str,
    fingerprint: &str,
    expected_name: &str,
) -> Result<PinAnswer, String> {
    let (target, fingerprint, name) = (
        target.to_owned(),
        fingerprint.to_ascii_lowercase(),
        expected_name.to_owned(),
    );
    store
        .with(move |c| {
            Box::pin(async move {
                let inserted = c
                    .query_opt(
                        "INSERT INTO pin (target, fingerprint, expected_name) VALUES ($1, $2, $3)
                         ON CONFLICT (target) DO NOTHING RETURNING fingerprint",
                        &[&target, &fingerprint, &name],
                    )
                    .await?;
                if inserted.is_some() {
                    return Ok(PinAnswer::First);
                }
                let row = c
                    .query_one("SELECT fingerprint FROM pin WHERE target = $1", &[&target])
                    .await?;
                let pinned: String = row.get(0);
                Ok(if pinned.eq_ignore_ascii_case(&fingerprint) {
                    PinAnswer::Same
                } else {
                    PinAnswer::Different(pinned)
                })
            })
        })
        .await
        .map_err(|e| e.to_string())
}
