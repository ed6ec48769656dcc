//! Parity with Hugging Face transformers: logits, the loss over AdamW steps, and byte-identical
//! safetensors round trips, against fixtures made by `scripts/make_parity_fixture.py`.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use lockstep_trainer::Solo;
use lockstep_trainer::model::hf::{self, WeightDtype};
use lockstep_trainer::model::{Batch, Llama, tensor_values};
use lockstep_trainer::optim::{AdamW, AdamWConfig};
use lockstep_trainer::step::TrainState;
use safetensors::SafeTensors;

type B = Flex;
type AD = Autodiff<Flex>;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    ids: Vec<i32>,
    rows: usize,
    seq: usize,
    logits: Vec<f32>,
    losses: Vec<f64>,
}

fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let (rows, seq) = (ids.shape()[0], ids.shape()[1]);
    let ids = ids
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let logits = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let losses = st
        .tensor("losses")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Reference {
        ids,
        rows,
        seq,
        logits,
        losses,
    }
}

/// HF's causal-LM loss with `labels = input_ids`: predict token t+1 at position t; the last
/// position of each row has no target.
fn shifted_batch(r: &Reference) -> Batch {
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for row in r.ids.chunks(r.seq) {
        for t in 0..r.seq {
            targets.push(if t + 1 < r.seq { row[t + 1] } else { 0 });
            weights.push(if t + 1 < r.seq { 1.0 } else { 0.0 });
        }
    }
    Batch {
        rows: r.rows,
        seq_len: r.seq,
        inputs: r.ids.clone(),
        targets,
        weights,
    }
}

fn check(name: &str, dtype: WeightDtype) {
    let dir = fixture(name);
    let model = hf::read_dir(&dir).unwrap();
    assert_eq!(model.weights.dtype, dtype);
    let r = reference(name);

    // Logits within 1e-4 of HF's.
    let device = Default::default();
    let llama =
        Llama::<B>::from_values(model.config.clone(), model.weights.values.clone(), &device);
    let logits = tensor_values(llama.forward(&r.ids, r.rows, r.seq));
    assert_eq!(logits.len(), r.logits.len());
    let worst = logits
        .iter()
        .zip(&r.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("{name}: worst logit difference {worst:e}");
    assert!(
        worst < 1e-4,
        "{name}: logits differ from HF's by up to {worst}"
    );

    // Five AdamW steps (lr 1e-3, wd 0.01, clip 1.0) follow HF + torch.optim.AdamW's losses.
    let shapes: Vec<[usize; 2]> = llama.specs.iter().map(|s| s.shape2()).collect();
    let optim = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        &shapes,
        &device,
    );
    let mut state = TrainState::<AD> {
        model: llama,
        optim,
    };
    let batch = shifted_batch(&r);
    for (i, want) in r.losses.iter().enumerate() {
        let got = state
            .step(i as u64, std::slice::from_ref(&batch), 1e-3, 1.0, &mut Solo)
            .unwrap()
            .loss;
        eprintln!("{name}: step {i} loss {got:.6} (HF {want:.6})");
        assert!(
            (got - want).abs() < 1e-4,
            "{name}: step {i} loss {got}, HF + torch AdamW {want}"
        );
    }

    // Import then export at the file's own dtype: the same bytes.
    let original = std::fs::read(dir.join("model.safetensors")).unwrap();
    let exported = hf::export(&model.config, &model.weights.values, dtype).unwrap();
    assert!(
        exported == original,
        "{name}: safetensors round trip changed bytes"
    );
}

#[test]
fn f32_gqa_untied_matches_transformers() {
    check("tiny-llama", WeightDtype::F32);
}

#[test]
fn bf16_tied_matches_transformers() {
    check("tiny-llama-bf16-tied", WeightDtype::Bf16);
}

/// A Llama 3-style model (GQA, tied embeddings, llama3 RoPE scaling across all three
/// frequency bands, a BPE tokenizer.json): logits and five AdamW steps follow transformers.
#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("tiny-llama3", WeightDtype::F32);
    let model = hf::read_dir(&fixture("tiny-llama3")).unwrap();
    assert!(matches!(
        model.config.rope_scaling(),
        Ok(lockstep_trainer::model::RopeScaling::Llama3 { .. })
    ));
    // The exported config.json says so again.
    let json = hf::config_json(&model.config, WeightDtype::F32).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["rope_parameters"]["rope_type"], "llama3");
    assert_eq!(v["rope_parameters"]["factor"], 8.0);
    // Scalings transformers has and this trainer does not are refused by name.
    let mut c = model.config.clone();
    c.extra.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
    );
    let e = c.rope_scaling().unwrap_err();
    assert!(
        e.contains("`yarn` is not supported") && e.contains("llama3"),
        "{e}"
    );
}

/// Linear RoPE scaling follows transformers too.
#[test]
fn linear_rope_scaling_matches_transformers() {
    check("tiny-llama-linear", WeightDtype::F32);
}

#[test]
fn mismatched_weights_are_refused_with_the_tensor_named() {
    let dir = fixture("tiny-llama");
    let mut model = hf::read_dir(&dir).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    model.config.intermediate_size = 128;
    let e = hf::import(&bytes, "model.safetensors", &model.config).unwrap_err();
    // The first parameter (in model order) whose shape differs: layer 0's gate projection.
    assert!(
        e.to_string()
            .contains("`model.layers.0.mlp.gate_proj.weight` has shape [160, 64]"),
        "{e}"
    );
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn exported_directory_reads_back_at_every_dtype() {
    let model = hf::read_dir(&fixture("tiny-llama")).unwrap();
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        hf::write_dir(dir.path(), &model.config, &model.weights.values, dtype).unwrap();
        let back = hf::read_dir(dir.path()).unwrap();
        assert_eq!(back.weights.dtype, dtype);
        assert_eq!(back.config.architecture(), model.config.architecture());
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        // transformers 5 names the dtype `dtype`; the fixture came from it.
        assert_eq!(cfg["dtype"], dtype.torch_name());
        for (a, b) in model.weights.values.iter().zip(&back.weights.values) {
            let tol = if dtype == WeightDtype::F32 { 0.0 } else { 1e-2 };
            assert!(
                a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= tol * x.abs().max(1e-3))
            );
        }
    }
}
