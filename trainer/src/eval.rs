//! Held-out evaluation: the loss of the model on every window of `data.eval` (one epoch, in
//! the seed's order), forward only. The windows are split into contiguous blocks, one per rank,
//! and the per-rank sums of loss and counted targets are summed over the gang, so every rank
//! gets the same bits and the result does not depend on the world size beyond float rounding.

use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;

use crate::collective::Collective;
use crate::data::Packer;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::tokens::TokenStore;

/// The held-out set and how to walk it.
#[derive(Debug)]
pub struct Evaluator {
    packer: Packer,
    batch: usize,
}

impl Evaluator {
    /// Evaluates on `store`'s windows of `seq_len + 1` tokens, `batch` sequences at a time.
    pub fn new(store: TokenStore, seq_len: usize, seed: u64, batch: usize) -> Result<Evaluator> {
        let packer = Packer::new(store, seq_len, seed).map_err(|e| match e {
            Error::Data { line, reason, .. } => Error::Data {
                file: "data.eval".into(),
                line,
                reason,
            },
            e => e,
        })?;
        Ok(Evaluator {
            packer,
            batch: batch.max(1),
        })
    }

    /// Windows evaluated over the whole gang.
    pub fn windows(&self) -> u64 {
        self.packer.windows_per_epoch()
    }

    /// The mean loss per counted target over every window, across the gang (the same value on
    /// every rank). `step` names the step in errors.
    pub fn run<B: Backend>(
        &mut self,
        step: u64,
        model: &Llama<B>,
        collective: &mut dyn Collective,
    ) -> Result<f64> {
        let (rank, world) = (collective.rank() as u64, collective.world_size() as u64);
        let n = self.windows();
        let per = n.div_ceil(world);
        let (first, end) = ((rank * per).min(n), ((rank + 1) * per).min(n));
        let (mut loss, mut counted) = (0.0f64, 0.0f64);
        let mut at = first;
        while at < end {
            let rows = (end - at).min(self.batch as u64) as usize;
            let batch = self.packer.windows(at, rows)?;
            counted += batch.counted();
            loss += model.loss_sum(&batch).into_scalar().elem::<f64>();
            at += rows as u64;
        }
        // f64 sums through an f32 all-reduce: each as a high and a low part.
        let split = |x: f64| {
            let hi = x as f32;
            [hi, (x - f64::from(hi)) as f32]
        };
        let mut sums = [split(loss), split(counted)].concat();
        collective.all_reduce_sum(&mut sums)?;
        let loss = f64::from(sums[0]) + f64::from(sums[1]);
        let counted = f64::from(sums[2]) + f64::from(sums[3]);
        let mean = loss / counted.max(1.0);
        if !mean.is_finite() {
            return Err(Error::NotFinite {
                step,
                what: "the eval loss",
            });
        }
        Ok(mean)
    }
}
