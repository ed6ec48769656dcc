//! Promotion: the gate a new version must pass, and the compare-and-swap of `latest.json`.

use bytes::Bytes;
use lockstep_storage::pointer::Swap;

use super::{Latest, Lineage, Promotion, Record, now_ms};
use crate::error::{Error, Result};

/// Why `new` may not replace `old`, if it may not.
pub fn gate(new: &Record, old: &Latest, max_regression: f64) -> Option<String> {
    // A cross-entropy is never negative: such a loss is a damaged record, never promoted.
    for (what, l) in [("eval loss", new.eval_loss), ("train loss", new.train_loss)] {
        if l.is_some_and(|l| !l.is_finite() || l < 0.0) {
            return Some(format!("its {what} {l:?} is not a plausible loss"));
        }
    }
    // A promoted version without any loss (exported from a checkpoint that had none) cannot
    // be compared with: a measured version may replace it, or the lineage would be stuck.
    if old.eval_loss.is_none() && old.train_loss.is_none() {
        return None;
    }
    let (n, o, what) = match (new.eval_loss, old.eval_loss) {
        (Some(n), Some(o)) => (n, o, "eval loss"),
        _ => match (new.train_loss, old.train_loss) {
            (Some(n), Some(o)) => (n, o, "train loss (one of the two has no eval loss)"),
            _ => {
                return Some(format!(
                    "{} and the promoted {} have no loss in common to compare",
                    new.version, old.version
                ));
            }
        },
    };
    // A NaN loss never passes.
    let passes = n.is_finite() && n <= o + max_regression;
    (!passes).then(|| {
        format!(
            "its {what} {n:.4} is worse than the promoted {}'s {o:.4} by more than \
             export.max_eval_regression = {max_regression}",
            old.version
        )
    })
}

/// Moves `latest.json` to `record` if the gate allows, by compare-and-swap (re-deciding when
/// another exporter moved it first).
pub(super) async fn promote(
    lineage: &Lineage,
    record: &Record,
    dir_url: &str,
    max_regression: f64,
) -> Result<Promotion> {
    let new = Latest {
        version: record.version.clone(),
        url: dir_url.to_string(),
        step: record.step,
        train_loss: record.train_loss,
        eval_loss: record.eval_loss,
        promoted_unix_ms: now_ms(),
    };
    let bytes = Bytes::from(
        serde_json::to_vec_pretty(&new)
            .map_err(|e| Error::Internal(format!("latest.json: {e}")))?,
    );
    for _ in 0..16 {
        let current = lineage.latest.read().await?;
        let (expected, replaced) = match &current {
            None => (None, None),
            Some((b, seen)) => {
                let old: Latest = serde_json::from_slice(b).map_err(|e| {
                    Error::Usage(format!(
                        "{}: not a lockstep latest.json ({e}); move it aside to promote",
                        lineage.latest.url()
                    ))
                })?;
                if old.version == record.version {
                    return Ok(Promotion::AlreadyExported { promoted: true });
                }
                if let Some(reason) = gate(record, &old, max_regression) {
                    return Ok(Promotion::Kept { reason });
                }
                (Some(seen), Some(old.version))
            }
        };
        match lineage.latest.swap(expected, bytes.clone()).await? {
            Swap::Done => return Ok(Promotion::Promoted { replaced }),
            Swap::Conflict => continue,
        }
    }
    Err(Error::Internal(format!(
        "{}: moved by other exporters 16 times in a row; try again",
        lineage.latest.url()
    )))
}
