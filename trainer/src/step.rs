//! One optimizer step: forward and backward over the micro-batches, gradient all-reduce,
//! clipping, AdamW. Parameters and moments live on the inner (non-autodiff) backend between
//! steps; each step wraps the parameters as autodiff leaves.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::model::{Batch, Llama, tensor_values};
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

impl<B: AutodiffBackend> TrainState<B> {
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
        let mut counts = [micro.iter().map(Batch::counted).sum::<f64>() as f32];
        collective.all_reduce_sum(&mut counts)?;
        let counted = f64::from(counts[0]).max(1.0);

        let leaves: Vec<Tensor<B, 2>> = self
            .model
            .params
            .iter()
            .map(|p| Tensor::from_inner(p.clone()).require_grad())
            .collect();
        let graph = Llama::<B> {
            config: self.model.config.clone(),
            specs: self.model.specs.clone(),
            params: leaves.clone(),
        };
        let mut loss_sum = 0.0f64;
        let mut grads: Option<Vec<Tensor<B::InnerBackend, 2>>> = None;
        for batch in micro {
            let loss = graph.loss_sum(batch).div_scalar(counted);
            let g = loss.backward();
            loss_sum += loss.into_scalar().elem::<f64>();
            let these: Vec<_> = leaves
                .iter()
                .zip(&self.model.params)
                .map(|(l, p)| l.grad(&g).unwrap_or_else(|| p.zeros_like()))
                .collect();
            grads = Some(match grads {
                None => these,
                Some(acc) => acc.into_iter().zip(these).map(|(a, b)| a + b).collect(),
            });
        }
        let mut grads = grads.ok_or_else(|| Error::Invalid("a step needs a micro-batch".into()))?;

        if collective.world_size() > 1 {
            let mut flat: Vec<f32> = Vec::with_capacity(self.model.num_params() + 1);
            for g in &grads {
                flat.extend(tensor_values(g.clone()));
            }
            flat.push(loss_sum as f32);
            collective.all_reduce_sum(&mut flat)?;
            loss_sum = f64::from(flat.pop().unwrap_or(0.0));
            let mut at = 0;
            for (g, s) in grads.iter_mut().zip(&self.model.specs) {
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
        let params = std::mem::take(&mut self.model.params);
        self.model.params = self.optim.step(params, grads, lr);
        Ok(StepStats {
            loss: loss_sum,
            grad_norm,
            counted,
        })
    }
}
