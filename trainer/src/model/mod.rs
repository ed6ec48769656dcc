//! A Llama-architecture decoder in Burn: RMSNorm, RoPE, grouped-query causal attention, SwiGLU
//! MLP, optionally tied embeddings — computed the way Hugging Face's `LlamaForCausalLM` does, so
//! a model imported from a HF checkpoint gives HF's logits.
//!
//! Parameters are a flat list of named tensors in Hugging Face's names and layouts (linear
//! weights `[out, in]`; flex and CUDA multiply by the transposed view without copying), so
//! import, export, checkpoints, the optimizer and gradient all-reduce all walk one list.
//! Vectors (norm weights) are held as `[1, n]` matrices; [`ParamSpec::shape`] is the real shape.
//!
//! - [`config`]: [`LlamaConfig`], the HF `config.json`.
//! - [`hf`]: safetensors import and export.
//! - [`lora`]: LoRA adapters on a frozen base, as PEFT makes them.

pub mod config;
pub mod hf;
pub mod lora;

use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData, bf16};
use lockstep_api::Precision;

pub use config::{LlamaConfig, RopeScaling};
pub use lora::{Lora, LoraSettings};

use crate::rng::Rng;

/// One parameter's name (Hugging Face's) and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// E.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// HF shape: `[out, in]` for linear weights, `[n]` for norm weights.
    pub shape: Vec<usize>,
}

impl ParamSpec {
    fn new(name: impl Into<String>, shape: &[usize]) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Norm weights (vectors): initialised to one, never weight-decayed.
    pub fn is_vector(&self) -> bool {
        self.shape.len() == 1
    }

    /// The `[rows, cols]` shape the tensor is held in.
    pub fn shape2(&self) -> [usize; 2] {
        match self.shape.as_slice() {
            [n] => [1, *n],
            [r, c] => [*r, *c],
            _ => [1, self.numel()],
        }
    }
}

/// Per-layer parameter order (indices within a layer's block).
const PER_LAYER: usize = 9;
const ATTN_NORM: usize = 0;
const Q: usize = 1;
const K: usize = 2;
const V: usize = 3;
const O: usize = 4;
const MLP_NORM: usize = 5;
const GATE: usize = 6;
const UP: usize = 7;
const DOWN: usize = 8;

/// Every parameter of `cfg` in order: embedding, each layer's nine, final norm, LM head
/// (absent when tied).
pub fn param_specs(cfg: &LlamaConfig) -> Vec<ParamSpec> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let hd = cfg.head_size();
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
    let mut specs = vec![ParamSpec::new("model.embed_tokens.weight", &[v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        specs.push(ParamSpec::new(p("input_layernorm"), &[h]));
        specs.push(ParamSpec::new(p("self_attn.q_proj"), &[q, h]));
        specs.push(ParamSpec::new(p("self_attn.k_proj"), &[kv, h]));
        specs.push(ParamSpec::new(p("self_attn.v_proj"), &[kv, h]));
        specs.push(ParamSpec::new(p("self_attn.o_proj"), &[h, q]));
        specs.push(ParamSpec::new(p("post_attention_layernorm"), &[h]));
        specs.push(ParamSpec::new(p("mlp.gate_proj"), &[i, h]));
        specs.push(ParamSpec::new(p("mlp.up_proj"), &[i, h]));
        specs.push(ParamSpec::new(p("mlp.down_proj"), &[h, i]));
    }
    specs.push(ParamSpec::new("model.norm.weight", &[h]));
    if !cfg.tie_word_embeddings {
        specs.push(ParamSpec::new("lm_head.weight", &[v, h]));
    }
    specs
}

/// A Llama decoder: its architecture and its parameters in [`param_specs`] order.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    /// The architecture.
    pub config: LlamaConfig,
    /// Names and shapes, parallel to `params`.
    pub specs: Vec<ParamSpec>,
    /// The parameters, each `[rows, cols]` per [`ParamSpec::shape2`].
    pub params: Vec<Tensor<B, 2>>,
    /// LoRA adapters on the (then frozen) parameters, if any.
    pub lora: Option<Lora<B>>,
    /// Seeds the adapters' dropout masks for one forward pass (training); `None`: no
    /// dropout (evaluation).
    pub noise: Option<u64>,
    /// `train.precision`: with `bf16-mixed` the projections and the output head multiply in
    /// bf16 (whatever dtype their weights are held in).
    pub precision: Precision,
}

/// Token ids and loss targets for one micro-batch of `rows` sequences of `seq_len` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Sequences.
    pub rows: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Input ids, `rows * seq_len`.
    pub inputs: Vec<i32>,
    /// The next token at each position, `rows * seq_len`.
    pub targets: Vec<i32>,
    /// 1.0 where the target counts in the loss, 0.0 where it is masked (prompt tokens).
    pub weights: Vec<f32>,
}

impl Batch {
    /// Targets that count in the loss.
    pub fn counted(&self) -> f64 {
        self.weights.iter().map(|&w| w as f64).sum()
    }
}

impl<B: Backend> Llama<B> {
    /// A randomly initialised model: weights ~ N(0, 0.02²) as HF's `initializer_range`, norms
    /// one. Drawn on the host from `seed`, so every backend and machine starts identically.
    pub fn init(config: LlamaConfig, seed: u64, device: &B::Device) -> Llama<B> {
        let values = init_values(&config, seed);
        Self::from_values(config, values, device)
    }

    /// A model from parameter values in [`param_specs`] order (`f32`, row-major, HF layout).
    pub fn from_values(config: LlamaConfig, values: Vec<Vec<f32>>, device: &B::Device) -> Llama<B> {
        Self::from_values_as(config, values, device, DType::F32)
    }

    /// As [`Llama::from_values`], holding the parameters in `dtype` (`F32` or `BF16`: a frozen
    /// base under `bf16-mixed`). Each tensor's f32 values are released as soon as it is made.
    pub fn from_values_as(
        config: LlamaConfig,
        values: Vec<Vec<f32>>,
        device: &B::Device,
        dtype: DType,
    ) -> Llama<B> {
        let specs = param_specs(&config);
        let params = specs
            .iter()
            .zip(values)
            .map(|(s, v)| {
                if dtype == DType::BF16 {
                    let half: Vec<bf16> = v.into_iter().map(bf16::from_f32).collect();
                    Tensor::from_data(TensorData::new(half, s.shape2()), (device, DType::BF16))
                } else {
                    Tensor::from_data(TensorData::new(v, s.shape2()), device)
                }
            })
            .collect();
        Llama {
            config,
            specs,
            params,
            lora: None,
            noise: None,
            precision: Precision::F32,
        }
    }

    /// The parameters a step trains: the adapters with LoRA, else every parameter.
    pub fn trained(&self) -> (&[ParamSpec], &[Tensor<B, 2>]) {
        match &self.lora {
            Some(l) => (&l.specs, &l.params),
            None => (&self.specs, &self.params),
        }
    }

    /// Replaces the trained parameters (see [`Llama::trained`]).
    pub fn set_trained(&mut self, params: Vec<Tensor<B, 2>>) {
        match &mut self.lora {
            Some(l) => l.params = params,
            None => self.params = params,
        }
    }

    /// Takes the trained parameters out (see [`Llama::trained`]), leaving none.
    pub fn take_trained(&mut self) -> Vec<Tensor<B, 2>> {
        match &mut self.lora {
            Some(l) => std::mem::take(&mut l.params),
            None => std::mem::take(&mut self.params),
        }
    }

    /// Layer `l`'s projection `which` of `x`: `x·Wᵀ`, plus its adapter's
    /// `dropout(x)·Aᵀ·Bᵀ · alpha/r` when it has one.
    fn project(
        &self,
        x: Tensor<B, 2>,
        l: usize,
        which: usize,
        rng: &mut Option<Rng>,
    ) -> Tensor<B, 2> {
        let adapters = self
            .lora
            .as_ref()
            .and_then(|lora| Some((lora, lora.pair(l, which)?)));
        let bf16 = self.precision == Precision::Bf16Mixed;
        // Under bf16-mixed the input is rounded to bf16 once, for the base and the adapters.
        let xb = if bf16 {
            to_dtype(x.clone(), FloatDType::BF16)
        } else {
            x.clone()
        };
        let base = self.linear(xb.clone(), self.layer(l, which));
        let Some((lora, (a, b))) = adapters else {
            return base;
        };
        let p = lora.settings.dropout;
        let x = match rng {
            Some(rng) if p > 0.0 => {
                let [n, width] = x.dims();
                let mask = lora::dropout_mask(rng, n, width, p);
                x * Tensor::from_data(TensorData::new(mask, [n, width]), &a.device())
            }
            _ => xb,
        };
        base + self
            .linear(self.linear(x, a), b)
            .mul_scalar(lora.settings.scale())
    }

    /// `x·wᵀ`, in f32; under `bf16-mixed` both are rounded to bf16 and so is the product
    /// (accumulated in f32 by the backend), which comes back as f32.
    fn linear(&self, x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
        match self.precision {
            Precision::F32 => linear(to_dtype(x, FloatDType::F32), to_dtype(w, FloatDType::F32)),
            Precision::Bf16Mixed => to_dtype(
                linear(to_dtype(x, FloatDType::BF16), to_dtype(w, FloatDType::BF16)),
                FloatDType::F32,
            ),
        }
    }

    fn layer(&self, l: usize, which: usize) -> Tensor<B, 2> {
        self.params[1 + l * PER_LAYER + which].clone()
    }

    fn final_norm(&self) -> Tensor<B, 2> {
        self.params[1 + self.config.num_hidden_layers * PER_LAYER].clone()
    }

    fn lm_head(&self) -> Tensor<B, 2> {
        if self.config.tie_word_embeddings {
            self.params[0].clone()
        } else {
            self.params[2 + self.config.num_hidden_layers * PER_LAYER].clone()
        }
    }

    /// Logits `[rows * seq_len, vocab]` for `inputs` (`rows` sequences of `seq_len` ids).
    pub fn forward(&self, inputs: &[i32], rows: usize, seq_len: usize) -> Tensor<B, 2> {
        let c = &self.config;
        let device = self.params[0].device();
        let (nh, nkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_size());
        let n = rows * seq_len;
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(inputs.to_vec(), [n]), &device);
        let rope = Rope::<B>::new(c, rows, seq_len, &device);
        let causal = causal_bias::<B>(seq_len, &device);
        let eps = c.rms_norm_eps;
        let mut x = to_dtype(self.params[0].clone().select(0, ids), FloatDType::F32); // [n, h]
        // Dropout masks, drawn in a fixed order from the pass's seed.
        let mut rng = self.noise.map(|s| Rng::derive(s, 0xd0));
        let rng = &mut rng;
        for l in 0..c.num_hidden_layers {
            let a = rms_norm(x.clone(), self.layer(l, ATTN_NORM), eps);
            // [rows, heads, seq, hd] after RoPE, applied while rows are still contiguous.
            let heads =
                |t: Tensor<B, 2>, k: usize| t.reshape([rows, seq_len, k, hd]).swap_dims(1, 2);
            let rep = nh / nkv;
            let q = heads(rope.apply(self.project(a.clone(), l, Q, rng), &rope.q), nh);
            let k = rope.apply(self.project(a.clone(), l, K, rng), &rope.kv);
            let k = heads(repeat_kv(k, nkv, hd, rep), nh);
            let v = heads(repeat_kv(self.project(a, l, V, rng), nkv, hd, rep), nh);
            let o = causal_attention(q, k, v, causal.clone(), hd)
                .swap_dims(1, 2)
                .reshape([n, nh * hd]);
            x = x + self.project(o, l, O, rng);
            let m = rms_norm(x.clone(), self.layer(l, MLP_NORM), eps);
            let g = silu(self.project(m.clone(), l, GATE, rng)) * self.project(m, l, UP, rng);
            x = x + self.project(g, l, DOWN, rng);
        }
        let x = rms_norm(x, self.final_norm(), eps);
        self.linear(x, self.lm_head())
    }

    /// The summed cross-entropy of `batch`'s counted targets (divide by the number counted for
    /// the mean). A scalar tensor `[1]`.
    pub fn loss_sum(&self, batch: &Batch) -> Tensor<B, 1> {
        let device = self.params[0].device();
        let n = batch.rows * batch.seq_len;
        let logits = self.forward(&batch.inputs, batch.rows, batch.seq_len);
        let logp = log_softmax(logits, 1);
        let targets =
            Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), [n, 1]), &device);
        let weights =
            Tensor::<B, 2>::from_data(TensorData::new(batch.weights.clone(), [n, 1]), &device);
        (logp.gather(1, targets) * weights).sum().neg()
    }

    /// Parameter count.
    pub fn num_params(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// Every parameter's values, `f32` row-major in HF layout, in [`param_specs`] order.
    pub fn values(&self) -> Vec<Vec<f32>> {
        self.params
            .iter()
            .map(|p| tensor_values(p.clone()))
            .collect()
    }
}

/// The values [`Llama::init`] starts from, on the host.
pub fn init_values(config: &LlamaConfig, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::derive(seed, 0x1417);
    param_specs(config)
        .iter()
        .map(|s| {
            if s.is_vector() {
                vec![1.0; s.numel()]
            } else {
                (0..s.numel())
                    .map(|_| (rng.normal() * 0.02) as f32)
                    .collect()
            }
        })
        .collect()
}

/// A tensor's `f32` values, row-major.
pub fn tensor_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    let data = t.into_data();
    match data.as_slice::<f32>() {
        Ok(s) => s.to_vec(),
        Err(_) => data.iter::<f32>().collect(),
    }
}

/// `x · wᵀ` for a HF-layout weight `[out, in]`.
fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    x.matmul(w.transpose())
}

/// HF `LlamaRMSNorm`: `w * x / sqrt(mean(x²) + eps)` over the last dimension.
fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let inv = (x.clone().powi_scalar(2).mean_dim(1) + eps).sqrt().recip();
    x * inv * to_dtype(w, FloatDType::F32)
}

/// `t` in `dtype` (unchanged, and no autodiff node, when it already is).
fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    if t.dtype() == DType::from(dtype) {
        t
    } else {
        t.cast(dtype)
    }
}

/// HF's rotary position embedding for positions `0..seq`: `x * cos + rotate_half(x) * sin` with
/// `rotate_half([a, b]) = [-b, a]`, the frequencies concatenated twice. `rotate_half` is a product
/// with a fixed signed permutation matrix and the tables are expanded to the operand's full
/// shape, so every operation is on contiguous, same-shape tensors (slices, concatenation and
/// broadcasts cost strided copies forward and backward).
struct Rope<B: Backend> {
    /// `[hd, hd]`: `x · rot = rotate_half(x)`.
    rot: Tensor<B, 2>,
    /// Tables for the query heads.
    q: RopeTables<B>,
    /// Tables for the key heads.
    kv: RopeTables<B>,
    hd: usize,
}

/// `cos` and `sin`, `[rows * seq * heads, hd]`, row `(r, t, h)` holding position `t`'s.
struct RopeTables<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    fn new(c: &LlamaConfig, rows: usize, seq: usize, device: &B::Device) -> Rope<B> {
        let hd = c.head_size();
        let half = hd / 2;
        // As HF computes them: inverse frequencies in f32 (scaled as `rope_parameters` says),
        // then position × frequency in f32.
        let inv = c.rope_inv_freq();
        let mut cos = Vec::with_capacity(seq * hd);
        let mut sin = Vec::with_capacity(seq * hd);
        for p in 0..seq {
            for j in 0..hd {
                let f = p as f32 * inv[j % half];
                cos.push(f.cos());
                sin.push(f.sin());
            }
        }
        let tables = |heads: usize| {
            let expand = |per_pos: &[f32]| {
                let mut out = Vec::with_capacity(rows * seq * heads * hd);
                for _ in 0..rows {
                    for pos in per_pos.chunks(hd) {
                        for _ in 0..heads {
                            out.extend_from_slice(pos);
                        }
                    }
                }
                Tensor::from_data(TensorData::new(out, [rows * seq * heads, hd]), device)
            };
            RopeTables {
                cos: expand(&cos),
                sin: expand(&sin),
            }
        };
        // rotate_half(x)[j] = -x[j + half] for j < half, x[j - half] otherwise.
        let mut rot = vec![0.0f32; hd * hd];
        for j in 0..half {
            rot[(j + half) * hd + j] = -1.0;
            rot[j * hd + j + half] = 1.0;
        }
        Rope {
            rot: Tensor::from_data(TensorData::new(rot, [hd, hd]), device),
            q: tables(c.num_attention_heads),
            kv: tables(c.kv_heads()),
            hd,
        }
    }

    /// Rotates `x` (`[rows * seq, heads * hd]`, position-major) with `t`'s tables.
    fn apply(&self, x: Tensor<B, 2>, t: &RopeTables<B>) -> Tensor<B, 2> {
        let [n, width] = x.dims();
        let x = x.reshape([n * width / self.hd, self.hd]);
        let rotated = x.clone().matmul(self.rot.clone());
        (x * t.cos.clone() + rotated * t.sin.clone()).reshape([n, width])
    }
}

/// `[1, 1, seq, seq]`: 0 where a query may attend (key position ≤ query position), -inf after.
fn causal_bias<B: Backend>(seq: usize, device: &B::Device) -> Tensor<B, 4> {
    let mut bias = vec![0.0f32; seq * seq];
    for q in 0..seq {
        for k in q + 1..seq {
            bias[q * seq + k] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_data(TensorData::new(bias, [1, 1, seq, seq]), device)
}

/// `softmax(q·kᵀ / sqrt(hd) + causal) · v` over `[rows, heads, seq, hd]`. Every row keeps its
/// diagonal, so no row is all -inf.
fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: Tensor<B, 4>,
    hd: usize,
) -> Tensor<B, 4> {
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (hd as f64).sqrt())
        + causal;
    softmax(scores, 3).matmul(v)
}

/// Grouped-query attention: each of the `kv` heads of `x` (`[n, kv * hd]`) serves `times`
/// consecutive query heads; returns `[n, kv * times * hd]`, as HF's `repeat_kv`. Done before the
/// head transpose, on contiguous rows.
fn repeat_kv<B: Backend>(x: Tensor<B, 2>, kv: usize, hd: usize, times: usize) -> Tensor<B, 2> {
    if times == 1 {
        return x;
    }
    let n = x.dims()[0];
    x.reshape([n, kv, 1, hd])
        .repeat_dim(2, times)
        .reshape([n, kv * times * hd])
}
