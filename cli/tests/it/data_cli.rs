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
