//! `lockstep data preview` as a user runs it: the records of a config's data as training
//! tokenises them (through the same token store), with the ids that carry loss.

use lockstep_api::testing::TestJob;

use crate::common::lockstep;

fn preview(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = lockstep(dir)
        .args(["data", "preview", "job.toml", "--data-cache", "cache"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn preview_shows_tokens_and_the_loss_mask_as_training_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("d.jsonl"),
        "{\"prompt\":\"Q: 2+2?\\nA: \",\"completion\":\"4.\"}\n{\"text\":\"hé\"}\n",
    )
    .unwrap();
    TestJob::tiny("pv")
        .set(
            "data.train",
            format!("[\"file://{}/d.jsonl\"]", d.display()),
        )
        .write_to(d);
    let (code, out, err) = preview(d, &["--json", "--records", "5"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    // Bytes are ids, the end id 0 last; only the completion (and the end) carry loss.
    let ids: Vec<u64> = "Q: 2+2?\nA: 4.".bytes().map(u64::from).chain([0]).collect();
    assert_eq!(rows[0]["input_ids"], serde_json::json!(ids));
    let mask: Vec<u64> = (0..ids.len()).map(|i| u64::from(i >= 11)).collect();
    assert_eq!(rows[0]["loss_mask"], serde_json::json!(mask));
    assert_eq!(rows[0]["text"], "Q: 2+2?\nA: 4.<eos>");
    assert!(rows[0]["file"].as_str().unwrap().ends_with("/d.jsonl"));
    assert_eq!(rows[1]["input_ids"], serde_json::json!([104, 195, 169, 0]));
    assert_eq!(rows[1]["loss_mask"], serde_json::json!([1, 1, 1, 1]));
    // The same store training uses: a second preview tokenises nothing.
    let (code, out, err) = preview(d, &["--records", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("tokenising"), "{err}");
    assert!(out.contains("2 records"), "{out}");
    assert!(out.contains("text: Q: 2+2?\\nA: [4.<eos>]"), "{out}");
    assert!(!out.contains("record 1 "), "one record asked for: {out}");

    // Bad input is named: a bad record by file and line, a bad count by its flag.
    std::fs::write(d.join("d.jsonl"), "{\"text\":\"ok\"}\n{\"oops\":1}\n").unwrap();
    let (code, _, err) = preview(d, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("d.jsonl:2"), "{err}");
    let (code, _, err) = preview(d, &["--records", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--records 0"), "{err}");
    let (code, _, err) = preview(d, &["--eval"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("data.eval lists no files"), "{err}");
}

/// Chat records (`messages`) are rendered with the base's own chat template: `data preview`
/// shows one record per conversation with the loss on the assistant turns only, and a LoRA job
/// trains on them.
#[test]
fn chat_records_are_templated_previewed_and_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A Llama 3-style base with the Llama 3 chat template.
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures");
    let base = d.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures.join("tiny-llama3").join(f), base.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures.join("chat/llama3").join(f), base.join(f)).unwrap();
    }
    let mut data = String::new();
    for i in 0..200 {
        data.push_str(
            &serde_json::json!({"messages": [
                {"role": "user", "content": format!("what is {i} plus one?")},
                {"role": "assistant", "content": format!("{}", i + 1)},
                {"role": "user", "content": "and twice that?"},
                {"role": "assistant", "content": format!("{}", 2 * (i + 1))},
            ]})
            .to_string(),
        );
        data.push('\n');
    }
    std::fs::write(d.join("chat.jsonl"), data).unwrap();
    TestJob::tiny("chat")
        .steps(3)
        .set("model.base", format!("\"{}\"", base.display()))
        .set(
            "data.train",
            format!("[\"file://{}/chat.jsonl\"]", d.display()),
        )
        .set("lora.r", 4)
        .checkpoint_url(&format!("file://{}/ckpt", d.display()))
        .write_to(d);
    let (code, out, err) = preview(d, &["--json", "--records", "2"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    let ids: Vec<u32> = serde_json::from_value(rows[0]["input_ids"].clone()).unwrap();
    let mask: Vec<bool> = serde_json::from_value::<Vec<u8>>(rows[0]["loss_mask"].clone())
        .unwrap()
        .into_iter()
        .map(|m| m == 1)
        .collect();
    assert_eq!(ids[0], 300, "starts with <|begin_of_text|>");
    // Two assistant turns, each `<content><|eot_id|>` (id 303) carrying the loss.
    let runs = mask.windows(2).filter(|w| !w[0] && w[1]).count();
    assert_eq!(runs, 2, "{mask:?}");
    assert!(
        mask.last() == Some(&true) && ids.last() == Some(&303),
        "{ids:?}"
    );
    let (code, text, err) = preview(d, &["--records", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("<|start_header_id|>assistant<|end_header_id|>"),
        "{text}"
    );

    let out = lockstep(d)
        .args([
            "train",
            "--config",
            "job.toml",
            "--no-progress",
            "--data-cache",
            "cache",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("data: 400 documents"),
        "one document per assistant turn: {err}"
    );
}
