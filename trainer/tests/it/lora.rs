//! LoRA parity with Hugging Face PEFT, against the fixture `scripts/make_lora_fixture.py` makes:
//! on a Llama 3-style base with adapters on all seven projections, lockstep's logits, the
//! adapters' gradients (the base frozen) and three AdamW steps over the adapters match PEFT's.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use lockstep_trainer::Solo;
use lockstep_trainer::model::hf;
use lockstep_trainer::model::{Batch, Llama, Lora, LoraSettings, tensor_values};
use lockstep_trainer::optim::{AdamW, AdamWConfig};
use lockstep_trainer::step::TrainState;
use safetensors::SafeTensors;

type B = Flex;
type AD = Autodiff<Flex>;

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap_or_else(|_| panic!("the fixture has no `{name}`"))
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn lora_logits_gradients_and_steps_match_peft() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama3");
    let base = hf::read_dir(&dir).unwrap();
    let bytes = std::fs::read(dir.join("lora.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cfg = base.config.clone();
    let settings = LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: lockstep_api::LORA_TARGETS.map(String::from).to_vec(),
    };
    let specs = settings.specs(&cfg);
    assert_eq!(specs.len(), 2 * 7 * cfg.num_hidden_layers);
    let adapters: Vec<Vec<f32>> = specs
        .iter()
        .map(|s| {
            let v = f32s(&st, &format!("lora/{}", s.name));
            assert_eq!(v.len(), s.numel(), "{}", s.name);
            v
        })
        .collect();
    let ids: Vec<i32> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let (rows, seq) = (2, 16);

    // Logits.
    let device = Default::default();
    let mut model = Llama::<B>::from_values(cfg.clone(), base.weights.values.clone(), &device);
    model.lora = Some(Lora::from_values(
        settings.clone(),
        &cfg,
        adapters.clone(),
        &device,
    ));
    let logits = tensor_values(model.forward(&ids, rows, seq));
    let w = worst(&logits, &f32s(&st, "logits"));
    eprintln!("worst logit difference from PEFT {w:e}");
    assert!(w < 1e-5, "logits differ from PEFT's by up to {w}");

    // Merged into the base (what `export.lora = "merge"` writes), the plain model gives the
    // adapted model's logits.
    let mut merged = base.weights.values.clone();
    lockstep_trainer::model::lora::merge(&settings, &cfg, &mut merged, &adapters);
    let plain = Llama::<B>::from_values(cfg.clone(), merged, &device);
    let w = worst(
        &tensor_values(plain.forward(&ids, rows, seq)),
        &f32s(&st, "logits"),
    );
    eprintln!("worst merged-model logit difference from PEFT {w:e}");
    assert!(w < 1e-5, "the merged model's logits differ by up to {w}");

    // The adapters' gradients of HF's causal-LM loss, the base frozen.
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for row in ids.chunks(seq) {
        for t in 0..seq {
            targets.push(if t + 1 < seq { row[t + 1] } else { 0 });
            weights.push(if t + 1 < seq { 1.0 } else { 0.0 });
        }
    }
    let batch = Batch {
        rows,
        seq_len: seq,
        inputs: ids.clone(),
        targets,
        weights,
    };
    let leaves: Vec<Tensor<AD, 2>> = specs
        .iter()
        .zip(&adapters)
        .map(|(s, v)| {
            Tensor::<AD, 2>::from_data(TensorData::new(v.clone(), s.shape2()), &device)
                .require_grad()
        })
        .collect();
    let graph = Llama::<AD> {
        config: cfg.clone(),
        specs: model.specs.clone(),
        params: model
            .params
            .iter()
            .map(|p| Tensor::from_inner(p.clone()))
            .collect(),
        lora: Some(Lora::with_params(
            settings.clone(),
            &cfg,
            specs.clone(),
            leaves.clone(),
        )),
        noise: None,
        precision: lockstep_api::Precision::F32,
    };
    let loss = graph.loss_sum(&batch).div_scalar(batch.counted());
    let grads = loss.backward();
    let mut worst_grad = 0.0f32;
    for (s, leaf) in specs.iter().zip(&leaves) {
        let g = tensor_values(leaf.grad(&grads).expect("an adapter without a gradient"));
        worst_grad = worst_grad.max(worst(&g, &f32s(&st, &format!("grad/{}", s.name))));
    }
    eprintln!("worst adapter gradient difference from PEFT {worst_grad:e}");
    assert!(
        worst_grad < 1e-5,
        "adapter gradients differ from PEFT's by up to {worst_grad}"
    );

    // Three AdamW steps over the adapters only (the base never moves).
    let shapes: Vec<[usize; 2]> = specs.iter().map(|s| s.shape2()).collect();
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
    let base_before = model.values();
    let mut state = TrainState::<AD> { model, optim };
    let losses: Vec<f64> = st
        .tensor("losses")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for (i, want) in losses.iter().enumerate() {
        let got = state
            .step(i as u64, std::slice::from_ref(&batch), 1e-3, 1.0, &mut Solo)
            .unwrap()
            .loss;
        eprintln!("step {i} loss {got:.7} (PEFT + torch AdamW {want:.7})");
        assert!((got - want).abs() < 1e-5, "step {i}: {got} vs {want}");
    }
    assert!(state.model.values() == base_before, "the frozen base moved");
}
