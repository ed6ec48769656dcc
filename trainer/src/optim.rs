//! AdamW over the model's parameter list, global-norm gradient clipping and the learning-rate
//! schedule — written out (rather than Burn's optimizer) so the moments are plain named tensors
//! that go into checkpoints under the parameters' HF names, and so every operation matches
//! PyTorch's `torch.optim.AdamW` step for step.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use lockstep_api::Schedule;
use serde::{Deserialize, Serialize};

/// AdamW hyperparameters (the learning rate comes from the schedule each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (applied to every parameter, as `torch.optim.AdamW` does).
    pub weight_decay: f64,
}

/// AdamW state: first and second moments per parameter, and the steps taken.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    /// Hyperparameters.
    pub config: AdamWConfig,
    /// First moments, parallel to the parameters.
    pub m: Vec<Tensor<B, 2>>,
    /// Second moments.
    pub v: Vec<Tensor<B, 2>>,
    /// Steps taken (bias correction uses it).
    pub steps: u64,
}

impl<B: Backend> AdamW<B> {
    /// Zero moments for parameters of `shapes`.
    pub fn new(config: AdamWConfig, shapes: &[[usize; 2]], device: &B::Device) -> AdamW<B> {
        let zeros = || {
            shapes
                .iter()
                .map(|s| Tensor::zeros(*s, device))
                .collect::<Vec<_>>()
        };
        AdamW {
            config,
            m: zeros(),
            v: zeros(),
            steps: 0,
        }
    }

    /// One AdamW step at learning rate `lr`: returns the updated parameters. The arithmetic
    /// follows `torch.optim.adamw._single_tensor_adamw`.
    pub fn step(
        &mut self,
        params: Vec<Tensor<B, 2>>,
        grads: Vec<Tensor<B, 2>>,
        lr: f64,
    ) -> Vec<Tensor<B, 2>> {
        let c = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        let mut out = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.into_iter().zip(grads).enumerate() {
            let p = if c.weight_decay != 0.0 {
                p.mul_scalar(1.0 - lr * c.weight_decay)
            } else {
                p
            };
            let m = self.m[i].clone();
            let m = m.clone() + (g.clone() - m).mul_scalar(1.0 - c.beta1);
            let v =
                self.v[i].clone().mul_scalar(c.beta2) + (g.clone() * g).mul_scalar(1.0 - c.beta2);
            let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(c.eps);
            out.push(p - (m.clone() / denom).mul_scalar(step_size));
            self.m[i] = m;
            self.v[i] = v;
        }
        out
    }
}

/// Clips `grads` to a global L2 norm of at most `max_norm` (0 = no clipping) as
/// `torch.nn.utils.clip_grad_norm_` does, and returns the norm before clipping.
pub fn clip_grad_norm<B: Backend>(grads: &mut [Tensor<B, 2>], max_norm: f64) -> f64 {
    let squares: Vec<Tensor<B, 1>> = grads
        .iter()
        .map(|g| g.clone().powi_scalar(2).sum())
        .collect();
    let total = Tensor::cat(squares, 0).sum().sqrt().into_scalar();
    let total: f64 = burn::tensor::ElementConversion::elem(total);
    if max_norm > 0.0 {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        for g in grads.iter_mut() {
            *g = g.clone().mul_scalar(coef);
        }
    }
    total
}

/// The learning rate at each step: linear warmup from 0, then the configured decay to
/// `lr * min_lr_ratio` at the last step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total steps.
    pub total: u64,
    /// Decay shape.
    pub kind: Schedule,
    /// Final rate as a fraction of `lr`.
    pub min_ratio: f64,
}

impl LrSchedule {
    /// The rate for optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let min = self.lr * self.min_ratio;
        match self.kind {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr - (self.lr - min) * progress,
            Schedule::Cosine => {
                min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        for kind in [Schedule::Cosine, Schedule::Linear] {
            let s = LrSchedule {
                lr: 1.0,
                warmup: 10,
                total: 110,
                kind,
                min_ratio: 0.1,
            };
            assert!((s.at(0) - 0.1).abs() < 1e-12);
            assert!((s.at(9) - 1.0).abs() < 1e-12);
            assert!((s.at(10) - 1.0).abs() < 1e-12);
            assert!((s.at(60) - 0.55).abs() < 1e-12, "{kind:?} {}", s.at(60));
            assert!((s.at(110) - 0.1).abs() < 1e-12);
            assert!((s.at(500) - 0.1).abs() < 1e-12);
            let xs: Vec<f64> = (10..110).map(|i| s.at(i)).collect();
            assert!(xs.windows(2).all(|w| w[1] <= w[0]));
        }
        let c = LrSchedule {
            lr: 2.0,
            warmup: 0,
            total: 5,
            kind: Schedule::Constant,
            min_ratio: 0.0,
        };
        assert_eq!(c.at(3), 2.0);
    }
}
