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

/// Trains the quickstart model one step into `d/ckpt`; returns the checkpoint URL.
fn train_one_step(d: &Path) -> String {
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
    ckpt
}

#[test]
fn the_quickstart_export_has_the_hf_llama_layout_and_true_hashes() {
    let _gang = crate::common::one_gang();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ckpt = train_one_step(d);
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

/// A webhook on 127.0.0.1: answers `status` to every notice, or (`None`) reads it and never
/// answers. Returns its URL and the notices it has read.
fn hook(status: Option<u16>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let notices = seen.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let Ok(k) = sock.read(&mut chunk) else {
                    break None;
                };
                if k == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .and_then(|v| v.trim().parse().ok())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(text[end + 4..end + 4 + len].to_string());
                    }
                }
            };
            let Some(body) = body else { continue };
            seen.lock().unwrap().push(body);
            match status {
                Some(code) => {
                    let reply = format!(
                        "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(reply.as_bytes());
                }
                None => held.push(sock),
            }
        }
    });
    (url, notices)
}

/// The files under `dir` with their modification times (directories too).
fn tree(dir: &Path) -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        out.push((
            d.clone(),
            std::fs::metadata(&d).unwrap().modified().unwrap(),
        ));
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((
                    p.clone(),
                    std::fs::metadata(&p).unwrap().modified().unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Promotion and the serving handoff are one outcome: an export killed after it moved
/// latest.json but before its webhook notice was delivered leaves the notice owed, and the
/// next export of that version delivers it (once) instead of saying it was done; a re-export
/// of a finished, promoted version writes nothing, also where the store is read-only; `export
/// ls` shows a damaged promoted version instead of hiding it.
#[test]
fn an_export_cut_off_before_its_webhook_delivers_it_on_the_next_run() {
    let _gang = crate::common::one_gang();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ckpt = train_one_step(d);
    let to = format!("file://{}/export", d.display());
    let export = |extra: &[&str]| {
        let mut args = vec!["export", ckpt.as_str(), "--to", &to, "--version", "v1"];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };

    // The notice is read but never answered: the export is killed while it waits.
    let (silent, heard) = hook(None);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .current_dir(d)
        .args(export(&["--promote", "--webhook", &silent]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while heard.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "the export never sent its notice"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let lineage = d.join("export/quickstart");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lineage.join("latest.json")).unwrap()).unwrap();
    assert_eq!(latest["version"], "v1");
    let decision: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lineage.join("v1/promotion.json")).unwrap()).unwrap();
    assert!(decision["promoted"].as_bool().unwrap(), "{decision}");
    assert!(
        decision["handoff"]["delivered_unix_ms"].is_null(),
        "{decision}"
    );

    // The next export of the version delivers the owed notice, and says so.
    let (good, notices) = hook(Some(200));
    let (code, out) = lockstep(
        d,
        &export(&["--promote", "--json", "--webhook", &good])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{out}");
    let result: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(result["promoted"], true, "{out}");
    let note = result["note"].as_str().unwrap();
    assert!(
        note.contains("webhook notified") && note.contains("earlier export"),
        "{note}"
    );
    let got = notices.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    let notice: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(notice["version"], "v1");
    let decision: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lineage.join("v1/promotion.json")).unwrap()).unwrap();
    assert!(
        decision["handoff"]["delivered_unix_ms"].is_u64(),
        "{decision}"
    );

    // Delivered once: a further export sends nothing and writes nothing, even read-only.
    let before = tree(&lineage);
    set_writable(&lineage, false);
    let (code, out) = lockstep(
        d,
        &export(&["--promote", "--json", "--webhook", &good])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    set_writable(&lineage, true);
    assert_eq!(code, 0, "{out}");
    let result: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(result["promoted"], true, "{out}");
    assert!(
        result["note"]
            .as_str()
            .unwrap()
            .contains("not written again"),
        "{out}"
    );
    assert_eq!(notices.lock().unwrap().len(), 1);
    assert_eq!(tree(&lineage), before, "a re-export changed the lineage");

    // A damaged promoted version is shown as such, not hidden.
    std::fs::write(lineage.join("v1/lockstep.json"), b"{ torn").unwrap();
    let url = format!("{to}/quickstart");
    let (code, out) = lockstep(d, &["export", "ls", &url]);
    assert_eq!(code, 1, "damaged: {out}");
    assert!(!out.contains("no finished versions"), "{out}");
    let line = out.lines().find(|l| l.contains("v1")).unwrap_or_default();
    assert!(
        line.starts_with('*') && line.contains("DAMAGED") && line.contains("lockstep.json"),
        "{out}"
    );
    let (code, out) = lockstep(d, &["export", "ls", &url, "--json"]);
    assert_eq!(code, 1, "{out}");
    let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(row["version"], "v1");
    assert_eq!(row["promoted"], true);
    assert!(row["damaged"].is_string(), "{row}");
    // So is a promoted version missing a file.
    std::fs::remove_dir_all(lineage.join("v1")).unwrap();
    let (code, out) = lockstep(d, &["export", "ls", &url]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DAMAGED") && out.contains("no lockstep.json"),
        "{out}"
    );
    // Exported again, the version's files are written again, and the export says so.
    let (code, out) = lockstep(
        d,
        &export(&["--promote", "--json"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{out}");
    let result: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(
        result["note"]
            .as_str()
            .unwrap()
            .contains("files written again"),
        "{out}"
    );
    let (code, out) = lockstep(d, &["export", "ls", &url]);
    assert_eq!(code, 0, "{out}");
    // A lockstep.json that is a directory is damaged, not passed over.
    std::fs::create_dir_all(lineage.join("v9/lockstep.json/x")).unwrap();
    std::fs::write(lineage.join("v9/lockstep.json/x/y"), b"{}").unwrap();
    let (code, out) = lockstep(d, &["export", "ls", &url]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("v9") && out.contains("is a directory"),
        "{out}"
    );
    std::fs::remove_dir_all(lineage.join("v9")).unwrap();
    // So is one that is a FIFO (never opened), and a FIFO promotion.json hangs nothing.
    std::fs::create_dir_all(lineage.join("v8")).unwrap();
    nix::unistd::mkfifo(
        &lineage.join("v8/lockstep.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let _ = std::fs::remove_file(lineage.join("v1/promotion.json"));
    nix::unistd::mkfifo(
        &lineage.join("v1/promotion.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let (code, out) = lockstep(d, &["export", "ls", &url]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("v8") && out.contains("is a FIFO"), "{out}");
    std::fs::remove_dir_all(lineage.join("v8")).unwrap();
    std::fs::remove_file(lineage.join("v1/promotion.json")).unwrap();
    // A latest.json naming a path, not a version, says so (not "missing").
    let latest = lineage.join("latest.json");
    let text = std::fs::read_to_string(&latest).unwrap();
    std::fs::write(&latest, text.replace("\"v1\"", "\"../x\"")).unwrap();
    let (code, out) = lockstep(d, &["export", "ls", &url]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("names `../x`, which is not a version name"),
        "{out}"
    );
    // A mistyped lineage is not "no finished versions".
    let (code, out) = lockstep(d, &["export", "ls", &format!("{to}/quikstart")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nothing is stored under"), "{out}");
}

/// Makes `dir` and everything in it read-only (or writable again). Root ignores the modes: the
/// tree comparison is what proves nothing was written.
fn set_writable(dir: &Path, writable: bool) {
    use std::os::unix::fs::PermissionsExt;
    for (p, _) in tree(dir) {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        let mode = if writable {
            mode | 0o200
        } else {
            mode & !0o222
        };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// `configs/lora-chat.toml` runs as a user runs it (`lockstep run`, two ranks): LoRA on the
/// Llama 3-style chat base over the chat data, ending with a promoted PEFT adapter export.
#[test]
fn the_lora_chat_example_runs_end_to_end() {
    let _gang = crate::common::one_gang();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let out = crate::common::lockstep(&root)
        .args(["run", "configs/lora-chat.toml", "--data-dir"])
        .arg(d.join("data"))
        .args([
            "--set",
            "train.steps=4",
            "--set",
            "checkpoint.every_steps=2",
        ])
        .args(["--set", "train.eval_every=2"])
        .args([
            "--set",
            &format!("checkpoint.url=\"file://{}/ckpt\"", d.display()),
        ])
        .args([
            "--set",
            &format!("export.url=\"file://{}/export\"", d.display()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("promoted (the first)"), "{err}");
    let lineage = d.join("export/lora-chat");
    let version = std::fs::read_dir(&lineage)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("adapter_config.json").is_file())
        .expect("an adapter version");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(version.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 16);
    assert!(
        version.join("tokenizer_config.json").is_file(),
        "the base's tokenizer goes along"
    );
}
