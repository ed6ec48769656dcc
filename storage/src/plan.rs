//! Which rank writes which bytes: a pure, deterministic split of the checkpoint's tensors.
//!
//! Data-parallel replicas hold the same values, so each byte is written once: the tensors are
//! laid end to end and cut into `world_size` nearly equal ranges, each cut moved down to an
//! element boundary. A rank's pieces are contiguous in that order, so a large tensor may be
//! split between two ranks and a rank may write many small tensors. Every rank computes the
//! same plan from the same tensor list.

use std::ops::Range;

/// A tensor's size, as the planner needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSize {
    /// Bytes.
    pub nbytes: u64,
    /// Bytes per element (cuts respect it).
    pub element_size: u64,
}

/// One planned piece: a byte range of tensor `tensor` (index into the input list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPiece {
    /// Index of the tensor in the list given to [`plan`].
    pub tensor: usize,
    /// Byte range within the tensor.
    pub range: Range<u64>,
}

/// Splits `tensors` among `world_size` ranks; element `r` of the result is rank `r`'s pieces.
pub fn plan(tensors: &[TensorSize], world_size: u32) -> Vec<Vec<PlannedPiece>> {
    let w = world_size.max(1) as u64;
    let total: u64 = tensors.iter().map(|t| t.nbytes).sum();
    let mut ranks: Vec<Vec<PlannedPiece>> = vec![Vec::new(); w as usize];
    let mut start = 0u64; // global offset of the current tensor
    for (i, t) in tensors.iter().enumerate() {
        let elem = t.element_size.max(1);
        // Cut points inside this tensor, aligned down to an element.
        let mut at = 0u64;
        while at < t.nbytes {
            let global = start + at;
            // The rank owning `global` when the stream is cut at cut(r) = total*r/w.
            let cut = |r: u64| (r as u128 * total as u128 / w as u128) as u64;
            let mut rank = ((global as u128 * w as u128) / total.max(1) as u128) as u64;
            rank = rank.min(w - 1);
            while rank + 1 < w && cut(rank + 1) <= global {
                rank += 1;
            }
            while rank > 0 && cut(rank) > global {
                rank -= 1;
            }
            let cut_global = cut(rank + 1);
            let mut end = cut_global.saturating_sub(start).min(t.nbytes);
            end -= end % elem;
            if end <= at {
                // The cut falls inside this element: the element stays whole with this rank.
                end = (at + elem).min(t.nbytes);
            }
            ranks[rank as usize].push(PlannedPiece {
                tensor: i,
                range: at..end,
            });
            at = end;
        }
        if t.nbytes == 0 {
            // Empty tensors still need an entry so they round-trip; rank 0 records them.
            ranks[0].push(PlannedPiece {
                tensor: i,
                range: 0..0,
            });
        }
        start += t.nbytes;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pieces_tile_every_tensor_and_balance(
            sizes in proptest::collection::vec((0u64..5000, prop_oneof![Just(1u64), Just(2), Just(4)]), 1..20),
            w in 1u32..9,
        ) {
            let tensors: Vec<TensorSize> = sizes
                .iter()
                .map(|&(n, e)| TensorSize { nbytes: n * e, element_size: e })
                .collect();
            let plan = plan(&tensors, w);
            prop_assert_eq!(plan.len(), w as usize);
            for (i, t) in tensors.iter().enumerate() {
                let mut pieces: Vec<_> = plan.iter().flatten().filter(|p| p.tensor == i).collect();
                pieces.sort_by_key(|p| p.range.start);
                let mut at = 0;
                for p in pieces {
                    prop_assert_eq!(p.range.start, at);
                    prop_assert_eq!(p.range.start % t.element_size, 0);
                    at = p.range.end;
                }
                prop_assert_eq!(at, t.nbytes);
            }
            let total: u64 = tensors.iter().map(|t| t.nbytes).sum();
            let max_elem = 4;
            for r in &plan {
                let bytes: u64 = r.iter().map(|p| p.range.end - p.range.start).sum();
                prop_assert!(bytes <= total / w as u64 + 1 + 2 * max_elem, "{} of {}", bytes, total);
            }
        }
    }
}
