//! One optimizer step: forward and backward over the micro-batches, gradient all-reduce,
//! clipping, AdamW. Parameters and moments live on the inner (non-autodiff) backend between
//! steps; each step wraps the parameters as autodiff leaves.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::model::{Batch, Llama, Lora, tensor_values};
use crate::optim::{AdamW, clip_grad_norm};

/// The model and optimizer state one rank trains.
#[derive(Debug, Clone)]
pub struct TrainState<B: AutodiffBackend> {
    /// Parameters (fp32 master weights).
    pub model: Llama<B::InnerBackend>,
    /// AdamW moments.
    pub optim: AdamW<B::InnerBackend>,
}

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over every counted target of the step, across all ranks.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Targets counted across all ranks.
    pub counted: f64,
}

/// Floats per all-reduce bucket (25 MB): large enough to keep the links busy, small enough to
/// bound what one call holds.
pub const BUCKET: usize = 25 * 1000 * 1000 / 4;

/// One lane's share of the loss and its gradient per parameter.
type LaneGrads<B> = (f64, Vec<Tensor<<B as AutodiffBackend>::InnerBackend, 2>>);

/// Lanes a micro-batch is split into (see [`TrainState::step`]). A constant, not the core count,
/// so that the sums computed do not change with the machine's size.
pub const LANES: usize = 2;

/// `batch` cut into up to `lanes` contiguous groups of rows, in order.
fn split_rows(batch: &Batch, lanes: usize) -> Vec<Batch> {
    let lanes = lanes.clamp(1, batch.rows.max(1));
    let t = batch.seq_len;
    let mut out = Vec::with_capacity(lanes);
    let mut start = 0;
    for i in 0..lanes {
        let rows = batch.rows / lanes + usize::from(i < batch.rows % lanes);
        let span = start * t..(start + rows) * t;
        out.push(Batch {
            rows,
            seq_len: t,
            inputs: batch.inputs[span.clone()].to_vec(),
            targets: batch.targets[span.clone()].to_vec(),
            weights: batch.weights[span].to_vec(),
        });
        start += rows;
    }
    out
}

impl<B: AutodiffBackend> TrainState<B> {
    /// Forward and backward of one lane: its share of the loss and a gradient per trained
    /// parameter (with LoRA the base takes part as constants: no gradient is computed for it).
    /// `noise` seeds the adapters' dropout.
    fn lane_grads(&self, lane: &Batch, counted: f64, noise: u64) -> Result<LaneGrads<B>> {
        let (_, trained) = self.model.trained();
        let leaves: Vec<Tensor<B, 2>> = trained
            .iter()
            .map(|p| Tensor::from_inner(p.clone()).require_grad())
            .collect();
        let config = self.model.config.clone();
        let graph = match &self.model.lora {
            None => Llama::<B> {
                config,
                specs: self.model.specs.clone(),
                params: leaves.clone(),
                lora: None,
                noise: None,
                precision: self.model.precision,
            },
            Some(l) => {
                let lora =
                    Lora::with_params(l.settings.clone(), &config, l.specs.clone(), leaves.clone());
                Llama::<B> {
                    specs: self.model.specs.clone(),
                    params: self
                        .model
                        .params
                        .iter()
                        .map(|p| Tensor::from_inner(p.clone()))
                        .collect(),
                    config,
                    lora: Some(lora),
                    noise: Some(noise),
                    precision: self.model.precision,
                }
            }
        };
        let loss = graph.loss_sum(lane).div_scalar(counted);
        let g = loss.backward();
        let value = loss.into_scalar().elem::<f64>();
        let grads = leaves
            .iter()
            .zip(trained)
            .map(|(l, p)| l.grad(&g).unwrap_or_else(|| p.zeros_like()))
            .collect();
        Ok((value, grads))
    }

    /// Runs one step at learning rate `lr` on this rank's `micro` batches. The loss is the sum
    /// over every rank's counted targets divided by their total count, so W ranks with batch `b`
    /// compute what one rank with batch `W·b` would.
    pub fn step(
        &mut self,
        step: u64,
        micro: &[Batch],
        lr: f64,
        clip: f64,
        collective: &mut dyn Collective,
    ) -> Result<StepStats> {
        let device = self.model.params[0].device();
        let seed = self.model.lora.as_ref().map_or(0, |l| l.seed);
        let mut counts = [micro.iter().map(Batch::counted).sum::<f64>() as f32];
        collective.all_reduce_sum(&mut counts)?;
        let counted = f64::from(counts[0]).max(1.0);

        let mut loss_sum = 0.0f64;
        let mut grads: Option<Vec<Tensor<B::InnerBackend, 2>>> = None;
        for (i, batch) in micro.iter().enumerate() {
            // The rows of a micro-batch are split into fixed lanes that run forward and backward
            // on their own threads with their own autodiff graphs: the backend parallelises
            // large matrix products but runs element-wise work on one thread, so two lanes keep
            // both of a small machine's cores busy. The split depends only on the batch (not on
            // the core count), and the lanes' gradients are summed in lane order, so results do
            // not depend on thread timing.
            let lanes = split_rows(batch, LANES);
            let this: &Self = self;
            let results: Vec<Result<LaneGrads<B>>> = std::thread::scope(|scope| {
                let handles: Vec<_> = lanes
                    .iter()
                    .enumerate()
                    .map(|(j, lane)| {
                        let noise =
                            xxhash_rust::xxh3::xxh3_64(format!("{seed}/{step}/{i}/{j}").as_bytes());
                        scope.spawn(move || this.lane_grads(lane, counted, noise))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(Error::Internal("a training lane panicked".into()))
                        })
                    })
                    .collect()
            });
            for r in results {
                let (loss, these) = r?;
                loss_sum += loss;
                grads = Some(match grads {
                    None => these,
                    Some(acc) => acc.into_iter().zip(these).map(|(a, b)| a + b).collect(),
                });
            }
        }
        let mut grads =
            grads.ok_or_else(|| Error::Internal("a step needs a micro-batch".into()))?;

        if collective.world_size() > 1 {
            let (specs, _) = self.model.trained();
            let numel: usize = specs.iter().map(|s| s.numel()).sum();
            let mut flat: Vec<f32> = Vec::with_capacity(numel + 1);
            for g in &grads {
                flat.extend(tensor_values(g.clone()));
            }
            flat.push(loss_sum as f32);
            for bucket in flat.chunks_mut(BUCKET) {
                collective.all_reduce_sum(bucket)?;
            }
            loss_sum = f64::from(flat.pop().unwrap_or(0.0));
            let mut at = 0;
            for (g, s) in grads.iter_mut().zip(specs) {
                let n = s.numel();
                *g = Tensor::from_data(
                    TensorData::new(flat[at..at + n].to_vec(), s.shape2()),
                    &device,
                );
                at += n;
            }
        }
        if !loss_sum.is_finite() {
            return Err(Error::NotFinite {
                step,
                what: "the loss",
            });
        }
        let grad_norm = clip_grad_norm(&mut grads, clip);
        if !grad_norm.is_finite() {
            return Err(Error::NotFinite {
                step,
                what: "the gradient norm",
            });
        }
        let params = self.model.take_trained();
        let stepped = self.optim.step(params, grads, lr);
        self.model.set_trained(stepped);
        Ok(StepStats {
            loss: loss_sum,
            grad_norm,
            counted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_cover_the_rows_in_order() {
        let b = Batch {
            rows: 5,
            seq_len: 2,
            inputs: (0..10).collect(),
            targets: (10..20).collect(),
            weights: vec![1.0; 10],
        };
        let lanes = split_rows(&b, 2);
        assert_eq!(lanes.iter().map(|l| l.rows).collect::<Vec<_>>(), vec![3, 2]);
        let joined: Vec<i32> = lanes.iter().flat_map(|l| l.inputs.clone()).collect();
        assert_eq!(joined, b.inputs);
        assert_eq!(lanes[1].targets, vec![16, 17, 18, 19]);
        let one = Batch {
            rows: 1,
            ..b.clone()
        };
        assert_eq!(split_rows(&one, 2).len(), 1);
    }
}
