//! `lockstep plan`: what one rank needs, and whether it fits, as a user runs it.

use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .arg("plan")
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The case: a full fine-tune of Llama 3.1 8B does not fit an 80 GB GPU (exit 1, the
/// figures and the knob named); its LoRA bf16-mixed version does (exit 0).
#[test]
fn an_8b_full_fine_tune_is_refused_on_80gb_and_its_lora_version_fits() {
    let full = plan(&["configs/llama3-8b-full.toml", "--device-memory", "80GB"]);
    let said = text(&full);
    assert_eq!(full.status.code(), Some(1), "{said}");
    assert!(
        said.contains("full fine-tuning of 8.0B parameters needs")
            && said.contains("this GPU has 80.0 GB")
            && said.contains(
                "set [lora] (r = 8 on q_proj, v_proj) and train.precision = \"bf16-mixed\""
            ),
        "{said}"
    );
    let lora = plan(&["configs/llama3-8b-lora.toml", "--device-memory", "80GB"]);
    let said = text(&lora);
    assert_eq!(lora.status.code(), Some(0), "{said}");
    assert!(
        said.contains("8.0B frozen (bf16) + 41.9M trained parameters (f32)")
            && said.contains("fits"),
        "{said}"
    );
    // --json: the figures in bytes, the lines adding up to the total.
    let json = plan(&[
        "configs/llama3-8b-lora.toml",
        "--device-memory",
        "80GB",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["fits"], true, "{v}");
    assert_eq!(
        v["sized_by"],
        "model.base configs/models/llama3.1-8b's config.json"
    );
    let parts: u64 = [
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "runtime",
    ]
    .iter()
    .map(|k| v[k].as_u64().unwrap())
    .sum();
    assert_eq!(parts, v["total"].as_u64().unwrap(), "{v}");
}

/// On this machine: the quickstart fits; a machine-sized limit that is too small is refused
/// with what would fit; bad command lines exit 2 naming what is wrong.
#[test]
fn the_quickstart_fits_this_machine_and_bad_requests_are_named() {
    let ok = plan(&["configs/quickstart.toml"]);
    let said = text(&ok);
    assert_eq!(ok.status.code(), Some(0), "{said}");
    assert!(said.contains("on this machine"), "{said}");
    let small = plan(&[
        "configs/quickstart.toml",
        "--device",
        "cpu",
        "--device-memory",
        "100MiB",
    ]);
    let said = text(&small);
    assert_eq!(small.status.code(), Some(1), "{said}");
    assert!(
        said.contains("each rank's machine has 105 MB") && said.contains("train.batch_size = 1"),
        "{said}"
    );
    for (args, expect) in [
        (
            vec!["configs/quickstart.toml", "--device-memory", "80XB"],
            "unknown unit",
        ),
        (
            vec!["configs/quickstart.toml", "--device", "gpu"],
            "--device gpu needs --device-memory",
        ),
        (
            vec![
                "configs/quickstart.toml",
                "--set",
                "model.base=\"/nonexistent/model\"",
            ],
            "model.base `/nonexistent/model`: config.json: `file:///nonexistent/model/config.json` not found",
        ),
        (
            vec!["configs/quickstart.toml", "--set", "train.precision=fp8"],
            "train.precision",
        ),
        (
            vec!["configs/quickstart.toml", "--set", "lora.r=300"],
            "lora.r = 300 is more than q_proj's smaller side (256x256)",
        ),
    ] {
        let out = plan(&args);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.contains(expect), "{args:?}: {said}");
    }
}

/// A base's config.json is as hostile as any input: each problem is named (file and field),
/// with exit 2, and a FIFO in its place is not waited on.
#[test]
fn a_bad_base_config_json_is_named_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/llama3-8b-lora.toml"),
    )
    .unwrap();
    let good: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs/models/llama3.1-8b/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut v = good.clone();
        v[key] = value;
        v.to_string()
    };
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "config.json"),
        ("notjson", Some("{".into()), "not JSON"),
        ("zero", Some(with("hidden_size", 0.into())), "hidden_size"),
        (
            "float",
            Some(with("hidden_size", 4096.5.into())),
            "`hidden_size` is 4096.5",
        ),
        (
            "heads",
            Some(with("num_attention_heads", 1000.into())),
            "1000 heads ≠ hidden_size 4096",
        ),
        (
            "kv",
            Some(with("num_key_value_heads", 0.into())),
            "num_key_value_heads",
        ),
        (
            "huge",
            Some(with("num_hidden_layers", 4_294_967_295u64.into())),
            "num_hidden_layers",
        ),
        ("empty", Some(String::new()), "config.json: empty"),
        (
            "bom",
            Some(format!("\u{feff}{}", good)),
            "config.json: not JSON",
        ),
        (
            "mistral",
            Some(with("model_type", "mistral".into())),
            "model_type `mistral` is not supported",
        ),
        (
            "gelu",
            Some(with("hidden_act", "gelu".into())),
            "hidden_act `gelu` is not supported",
        ),
        (
            "headdim",
            Some(with("head_dim", 64.into())),
            "head_dim 64 × 32 heads ≠ hidden_size 4096",
        ),
        (
            "tied",
            Some(with("tie_word_embeddings", "true".into())),
            "`tie_word_embeddings` is \"true\", not true or false",
        ),
        (
            "yarn",
            Some(with(
                "rope_scaling",
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            )),
            "yarn",
        ),
    ];
    for (name, json, expect) in cases {
        let base = dir.path().join(name);
        std::fs::create_dir_all(&base).unwrap();
        if let Some(j) = json {
            std::fs::write(base.join("config.json"), j).unwrap();
        }
        let toml = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &toml,
            cfg.replace("configs/models/llama3.1-8b", base.to_str().unwrap()),
        )
        .unwrap();
        let out = plan(&[toml.to_str().unwrap(), "--device-memory", "80GB"]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {said}");
        assert!(
            said.contains("model.base") && said.contains(expect),
            "{name}: {said}"
        );
    }
    // A FIFO named config.json: refused at once, not read.
    let fifo = dir.path().join("fifo");
    std::fs::create_dir_all(&fifo).unwrap();
    let made = Command::new("mkfifo")
        .arg(fifo.join("config.json"))
        .status()
        .unwrap();
    assert!(made.success());
    let toml = dir.path().join("fifo.toml");
    std::fs::write(
        &toml,
        cfg.replace("configs/models/llama3.1-8b", fifo.to_str().unwrap()),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = plan(&[toml.to_str().unwrap(), "--device-memory", "80GB"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("is a FIFO, not a regular file"), "{said}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}
