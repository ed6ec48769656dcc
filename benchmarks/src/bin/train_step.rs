//! CPU training-step benchmark: lockstep's Burn (flex) Llama step against PyTorch +
//! transformers on the same model, side by side in one run.
//!
//! ```text
//! LOCKSTEP_BENCH_PYTHON=/path/to/venv/bin/python \
//! cargo run --release -p lockstep-benchmarks --bin train_step [-- STEPS [BACKEND]]
//! ```
//!
//! BACKEND is `flex` (the trainer's CPU backend); `ndarray` and `candle` are there for comparison
//! when built with `--features ndarray` (add `openblas` for OpenBLAS, which needs Debian's
//! libopenblas-dev) or `--features candle`.
//!
//! The model is the benchmark model of `../shared/anchors/torch_train_cpu.py`: vocab 256, hidden
//! 256, intermediate 768, 4 layers, 8 heads, 4 kv heads, seq 128, batch 8, fp32, AdamW (no weight
//! decay, no clipping — as the anchor). Both sides use the same number of threads (all cores:
//! rayon's pool for flex, `--threads N` for PyTorch) and random token ids each step; each reports
//! the median step time after 5 warm-up steps. Without LOCKSTEP_BENCH_PYTHON only lockstep runs.
//! Prints a table and, last, one JSON object. `train_step --smoke` (the test suite's run): 6
//! steps, no anchor.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::backend::{Autodiff, Flex};
use lockstep_api::config::ModelSection;
use lockstep_trainer::Solo;
use lockstep_trainer::model::{Batch, Llama, LlamaConfig};
use lockstep_trainer::optim::{AdamW, AdamWConfig};
use lockstep_trainer::rng::Rng;
use lockstep_trainer::step::TrainState;
use serde_json::json;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 8;
const SEQ: usize = 128;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn lockstep<B: burn::tensor::backend::Backend>(steps: usize) -> Result<(f64, usize)> {
    let section = ModelSection {
        base: lockstep_api::BaseModel::Init,
        hidden_size: 256,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        intermediate_size: 768,
        vocab_size: 256,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_embeddings: false,
    };
    let config = LlamaConfig::from_section(&section, SEQ);
    let device = Default::default();
    let model = Llama::<B>::init(config, 0, &device);
    let params = model.num_params();
    let shapes: Vec<[usize; 2]> = model.specs.iter().map(|s| s.shape2()).collect();
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let optim = AdamW::new(adamw, &shapes, &device);
    let mut state = TrainState::<Autodiff<B>> { model, optim };
    let mut rng = Rng::new(1);
    let mut times = Vec::new();
    for i in 0..steps {
        // As the anchor: random ids, labels = ids (so position t predicts id t+1).
        let ids: Vec<i32> = (0..BATCH * SEQ).map(|_| rng.below(256) as i32).collect();
        let mut targets = Vec::with_capacity(ids.len());
        let mut weights = Vec::with_capacity(ids.len());
        for row in ids.chunks(SEQ) {
            for t in 0..SEQ {
                targets.push(*row.get(t + 1).unwrap_or(&0));
                weights.push(if t + 1 < SEQ { 1.0 } else { 0.0 });
            }
        }
        let batch = Batch {
            rows: BATCH,
            seq_len: SEQ,
            inputs: ids,
            targets,
            weights,
        };
        let t0 = Instant::now();
        let stats = state.step(i as u64, &[batch], 3e-4, 0.0, &mut Solo)?;
        times.push(t0.elapsed().as_secs_f64());
        if !stats.loss.is_finite() {
            bail!("step {i}: loss {}", stats.loss);
        }
        if i == 0 {
            eprintln!("lockstep first step loss {:.4}", stats.loss);
        }
    }
    Ok((median(times[5..].to_vec()), params))
}

fn torch(steps: usize, threads: usize) -> Result<Option<(f64, String)>> {
    let Ok(python) = std::env::var("LOCKSTEP_BENCH_PYTHON") else {
        eprintln!("LOCKSTEP_BENCH_PYTHON unset: skipping the PyTorch anchor");
        return Ok(None);
    };
    let script = std::env::var("LOCKSTEP_BENCH_ANCHOR")
        .unwrap_or_else(|_| "../shared/anchors/torch_train_cpu.py".into());
    let o = Command::new(&python)
        .arg(&script)
        .arg(steps.to_string())
        .arg("--threads")
        .arg(threads.to_string())
        .output()
        .with_context(|| format!("run {python} {script}"))?;
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    if !o.status.success() {
        bail!("anchor failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let line = text
        .lines()
        .find(|l| l.contains("ms/step="))
        .context("anchor printed no ms/step")?;
    let ms: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ms/step="))
        .context("no ms/step= field")?
        .parse()?;
    Ok(Some((ms / 1e3, line.to_string())))
}

fn main() -> Result<()> {
    let smoke = lockstep_benchmarks::smoke();
    let steps: usize = if smoke {
        6
    } else {
        std::env::args()
            .nth(1)
            .map(|s| s.parse())
            .transpose()
            .context("STEPS must be a number")?
            .unwrap_or(30)
            .max(8)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tokens = (BATCH * SEQ) as f64;
    let anchor_run = |steps, threads| {
        if smoke {
            Ok(None)
        } else {
            torch(steps, threads)
        }
    };
    // PyTorch first, then lockstep, then PyTorch again: the better of the two anchor runs.
    let t1 = anchor_run(steps, threads)?;
    let backend = match std::env::args().nth(2) {
        Some(b) if !smoke => b,
        _ => "flex".into(),
    };
    let (ours, params) = match backend.as_str() {
        "flex" => lockstep::<Flex>(steps)?,
        #[cfg(feature = "ndarray")]
        "ndarray" => lockstep::<burn::backend::NdArray>(steps)?,
        #[cfg(feature = "candle")]
        "candle" => lockstep::<burn::backend::Candle>(steps)?,
        other => bail!("backend `{other}` is not built in (features: ndarray, openblas, candle)"),
    };
    let t2 = anchor_run(steps, threads)?;
    let anchor = match (t1, t2) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    println!(
        "train step, {threads} threads, {:.2}M params, batch {BATCH} × seq {SEQ}",
        params as f64 / 1e6
    );
    println!(
        "  lockstep (burn {backend:7}): {:8.1} ms/step {:8.0} tokens/s",
        ours * 1e3,
        tokens / ours
    );
    let mut out = json!({
        "threads": threads,
        "params": params,
        "backend": backend,
        "lockstep_ms_per_step": ours * 1e3,
        "lockstep_tokens_per_s": tokens / ours,
    });
    if let Some((t, line)) = anchor {
        println!(
            "  pytorch:              {:8.1} ms/step {:8.0} tokens/s",
            t * 1e3,
            tokens / t
        );
        println!("  ({line})");
        println!(
            "  lockstep ÷ pytorch ms/step: {:.2} (target ≤ 1.0)",
            ours / t
        );
        out["pytorch_ms_per_step"] = json!(t * 1e3);
        out["pytorch_tokens_per_s"] = json!(tokens / t);
        out["ratio"] = json!(ours / t);
    }
    println!("{out}");
    Ok(())
}
