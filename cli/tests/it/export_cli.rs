//! `lockstep export` through the real binary: the quickstart model trained one step and
//! exported has exactly the Hugging Face Llama layout (names, dtypes, shapes) in its
//! safetensors header, a config.json transformers reads as Llama, and a lockstep.json whose
//! hashes match the files.

use std::path::Path;
use std::process::Command;

use sha2::Digest;

fn lockstep(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The safetensors header: name → (dtype, shape).
fn header(bytes: &[u8]) -> Vec<(String, String, Vec<u64>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out: Vec<_> = h
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (k, v["dtype"].as_str().unwrap().to_string(), shape)
        })
        .collect();
    out.sort();
    out
}

/// What HF's LlamaForCausalLM has for the quickstart config (hidden 256, intermediate 768,
/// 4 layers, 8 heads of 32, 4 KV heads, vocabulary 256, untied LM head), written out by hand.
fn hf_llama_layout(dtype: &str) -> Vec<(String, String, Vec<u64>)> {
    let (h, i, v, kv) = (256, 768, 256, 4 * 32);
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".to_string(), vec![h]),
        ("lm_head.weight".to_string(), vec![v, h]),
    ];
    for l in 0..4 {
        for (name, shape) in [
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            out.push((format!("model.layers.{l}.{name}.weight"), shape));
        }
    }
    let mut out: Vec<_> = out
        .into_iter()
        .map(|(n, s)| (n, dtype.to_string(), s))
        .collect();
    out.sort();
    out
}

#[test]
fn the_quickstart_export_has_the_hf_llama_layout_and_true_hashes() {
    let _gang = crate::common::one_gang();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let cfg = root.join("configs/quickstart.toml");
    let data = root.join("configs/data");
    let ckpt = format!("file://{}/ckpt", d.display());
    let (code, out) = lockstep(
        d,
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--no-progress",
            "--data-cache",
            "cache",
            "--set",
            "train.steps=1",
            "--set",
            "checkpoint.every_steps=1",
            "--set",
            &format!("checkpoint.url=\"{ckpt}\""),
            "--set",
            &format!(
                "data.train=[\"file://{}/quickstart.jsonl\"]",
                data.display()
            ),
            "--set",
            &format!(
                "data.eval=[\"file://{}/quickstart-eval.jsonl\"]",
                data.display()
            ),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let to = format!("file://{}/export", d.display());
    for (dtype, st_dtype) in [("f32", "F32"), ("bf16", "BF16")] {
        let version = format!("v-{dtype}");
        let (code, out) = lockstep(
            d,
            &[
                "export",
                &ckpt,
                "--to",
                &to,
                "--dtype",
                dtype,
                "--version",
                &version,
                "--promote",
            ],
        );
        assert_eq!(code, 0, "{out}");
        let dir = d.join("export/quickstart").join(&version);
        let st = std::fs::read(dir.join("model.safetensors")).unwrap();
        assert_eq!(header(&st), hf_llama_layout(st_dtype));
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], "llama");
        assert_eq!(config["architectures"][0], "LlamaForCausalLM");
        assert_eq!(config["hidden_size"], 256);
        assert_eq!(config["num_key_value_heads"], 4);
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("lockstep.json")).unwrap()).unwrap();
        assert_eq!(record["step"], 1);
        // Lineage: what it was trained from, with the records each data file gave.
        let from = &record["trained_from"];
        assert_eq!(from["base"], "init", "{record}");
        assert_eq!(from["train"][0]["records"], 4000, "{record}");
        assert_eq!(from["eval"][0]["records"], 200, "{record}");
        assert!(
            from["train"][0]["url"]
                .as_str()
                .unwrap()
                .ends_with("quickstart.jsonl")
        );
        assert!(record["eval_loss"].as_f64().is_some(), "{record}");
        assert!(record["train_loss"].as_f64().is_some(), "{record}");
        let files = record["files"].as_array().unwrap();
        assert_eq!(files.len(), 3, "{record}");
        for f in files {
            let bytes = std::fs::read(dir.join(f["name"].as_str().unwrap())).unwrap();
            let sha: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(f["sha256"].as_str().unwrap(), sha, "{}", f["name"]);
        }
    }
    // The f32 version was promoted first; bf16 of the same step has the same eval loss: the
    // gate (no regression) lets it replace it.
    let (code, out) = lockstep(d, &["export", "ls", &format!("{to}/quickstart"), "--json"]);
    assert_eq!(code, 0, "{out}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(
        rows.iter().filter(|r| r["promoted"] == true).count(),
        1,
        "{out}"
    );
    // Bad input is named.
    let (code, out) = lockstep(d, &["export", &format!("{ckpt}@99"), "--to", &to]);
    assert_eq!(code, 1);
    assert!(out.contains("99"), "{out}");
    let (code, out) = lockstep(d, &["export", &ckpt, "--to", &to, "--version", "../x"]);
    assert_eq!(code, 1);
    assert!(out.contains("the version `../x`"), "{out}");
}
