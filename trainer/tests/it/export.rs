//! Export and promotion: versions are complete before they are visible, the gate keeps a
//! regression out of `latest.json`, a failed export never moves it, and two exporters racing
//! cannot both win.

use std::sync::Arc;

use lockstep_api::testing::TestJob;
use lockstep_storage::{CheckpointStore, CommitInfo, DType, Faults, TensorInput, UnreliableStore};
use lockstep_trainer::export::{self, Lineage, Promotion, Request};
use lockstep_trainer::model::hf::WeightDtype;
use lockstep_trainer::model::{LlamaConfig, param_specs};
use lockstep_trainer::plan::Plan;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

/// Commits a checkpoint of the tiny model at `step` with the given losses under `url`.
async fn checkpoint(url: &str, step: u64, loss: f64, eval_loss: Option<f64>, seed: u32) {
    let job = TestJob::tiny("exp");
    let config = job.config().unwrap();
    let model = LlamaConfig::from_section(&config.model, config.data.seq_len as usize);
    let mut state = Plan::new(&config, 0, 1, None).trainer_state(&config, &model, None);
    state.step = step;
    state.loss = Some(loss);
    state.eval_loss = eval_loss;
    state.eval_step = eval_loss.map(|_| step);
    let tensors: Vec<TensorInput> = param_specs(&model)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let data: Vec<u8> = (0..s.numel() as u32)
                .flat_map(|j| {
                    ((j ^ seed).wrapping_mul(2_654_435_761) as f32 * 1e-10 + i as f32).to_le_bytes()
                })
                .collect();
            TensorInput {
                name: s.name.clone(),
                dtype: DType::F32,
                shape: s.shape.iter().map(|&d| d as u64).collect(),
                data: data.into(),
            }
        })
        .collect();
    let store = CheckpointStore::open(url).unwrap();
    let info = CommitInfo {
        job: "exp".into(),
        step,
        config_hash: "h".into(),
        parent: None,
        trainer_state: serde_json::to_value(&state).unwrap(),
    };
    store.save(info, &tensors, 1).await.unwrap();
}

fn request(checkpoint: String, version: &str) -> Request {
    Request {
        checkpoint,
        name: Some("exp".into()),
        version: Some(version.into()),
        dtype: WeightDtype::F32,
        base: None,
        promote: true,
        max_eval_regression: 0.0,
        lineage: serde_json::json!({"attempts": 1}),
        webhook: None,
        lora: Default::default(),
    }
}

async fn latest_version(store: &Arc<dyn ObjectStore>) -> Option<String> {
    let bytes = store
        .get(&Path::from("exports/exp/latest.json"))
        .await
        .ok()?
        .bytes()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    Some(v["version"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_promotes_improvements_only_and_a_rerun_promotes_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    checkpoint(&ckpt, 10, 2.0, Some(2.5), 1).await;
    checkpoint(&ckpt, 20, 1.5, Some(2.7), 2).await;
    checkpoint(&ckpt, 30, 1.2, Some(2.4), 3).await;
    let to = format!("file://{}/export", dir.path().display());
    let run = |step: u64, version: &str, regression: f64| {
        let mut r = request(format!("{ckpt}@{step}"), version);
        r.max_eval_regression = regression;
        let to = to.clone();
        async move { export::export(&r, &to, None).await.unwrap() }
    };
    let a = run(10, "a", 0.0).await;
    assert_eq!(a.promotion, Promotion::Promoted { replaced: None });
    // Worse eval loss (2.7 > 2.5): kept, with the reason; within a 0.25 allowance: promoted.
    let b = run(20, "b", 0.0).await;
    match &b.promotion {
        Promotion::Kept { reason } => assert!(
            reason.contains("2.7000") && reason.contains("2.5000"),
            "{reason}"
        ),
        p => panic!("{p:?}"),
    }
    let b2 = run(20, "b2", 0.25).await;
    assert_eq!(
        b2.promotion,
        Promotion::Promoted {
            replaced: Some("a".into())
        }
    );
    let c = run(30, "c", 0.0).await;
    assert_eq!(
        c.promotion,
        Promotion::Promoted {
            replaced: Some("b2".into())
        }
    );
    // The same export again: nothing written, nothing promoted twice.
    assert_eq!(
        run(30, "c", 0.0).await.promotion,
        Promotion::AlreadyExported { promoted: true }
    );
    // An exported version that was kept is judged again against today's promoted one.
    match run(20, "b", 0.0).await.promotion {
        Promotion::Kept { reason } => assert!(reason.contains("promoted c's 2.4000"), "{reason}"),
        p => panic!("{p:?}"),
    }
    // Other weights under an existing version are refused.
    let e = export::export(&request(format!("{ckpt}@10"), "c"), &to, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already holds a version with other files"),
        "{e}"
    );
    // Exported without --promote, then again with it: promoted then (not "already done").
    checkpoint(&ckpt, 40, 1.0, Some(2.0), 4).await;
    let mut r = request(format!("{ckpt}@40"), "d");
    r.promote = false;
    assert_eq!(
        export::export(&r, &to, None).await.unwrap().promotion,
        Promotion::NotAsked
    );
    r.promote = true;
    assert_eq!(
        export::export(&r, &to, None).await.unwrap().promotion,
        Promotion::Promoted {
            replaced: Some("c".into())
        }
    );

    // Re-running the export of c (promoted once, since replaced by d) does not roll back.
    match run(30, "c", 10.0).await.promotion {
        Promotion::Kept { reason } => assert!(reason.contains("replaced by d"), "{reason}"),
        p => panic!("{p:?}"),
    }
    let lineage = Lineage::open(&to, "exp").unwrap();
    assert_eq!(lineage.latest().await.unwrap().unwrap().version, "d");
    let versions = lineage.versions().await.unwrap();
    let names: Vec<&str> = versions.iter().map(|(r, _)| r.version.as_str()).collect();
    assert_eq!(names, vec!["a", "b", "b2", "c", "d"]);
    let (b_record, b_decision) = &versions[1];
    assert!(!b_decision.as_ref().unwrap().promoted);
    assert_eq!(b_record.eval_loss, Some(2.7));
    assert_eq!(b_record.lineage["attempts"], 1);
    // Every file the record lists is there with its sha256.
    for f in &versions[3].0.files {
        let bytes = std::fs::read(dir.path().join("export/exp/c").join(&f.name)).unwrap();
        assert_eq!(bytes.len() as u64, f.bytes, "{}", f.name);
    }
    // Deterministic: the same weights give byte-identical model files.
    let st = |v: &str| {
        std::fs::read(dir.path().join(format!("export/exp/{v}/model.safetensors"))).unwrap()
    };
    assert_eq!(st("b"), st("b2"));
}

/// Whatever fails while exporting, latest.json still names the version it named, or a complete
/// new one: never a version missing a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_export_never_moves_latest_to_an_incomplete_version() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    checkpoint(&ckpt, 10, 2.0, Some(2.5), 1).await;
    checkpoint(&ckpt, 20, 1.0, Some(1.5), 2).await;
    let (mut failed, mut promoted) = (0, 0);
    for seed in 1..=40 {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let clean = Lineage::with_store(
            inner.clone(),
            Path::from("exports/exp"),
            "memory://exports/exp",
        );
        export::export(
            &request(format!("{ckpt}@10"), "old"),
            "memory://unused",
            Some(clean),
        )
        .await
        .unwrap();
        let flaky = UnreliableStore::new(
            inner.clone(),
            Faults {
                fail_rate: 0.1,
                seed,
                ..Default::default()
            },
        );
        let lineage = Lineage::with_store(
            Arc::new(flaky),
            Path::from("exports/exp"),
            "memory://exports/exp",
        );
        let r = export::export(
            &request(format!("{ckpt}@20"), "new"),
            "memory://unused",
            Some(lineage),
        )
        .await;
        let latest = latest_version(&inner).await.unwrap();
        if latest == "new" {
            promoted += 1;
            // Promoted: every file of the version is there.
            let record: serde_json::Value = serde_json::from_slice(
                &inner
                    .get(&Path::from("exports/exp/new/lockstep.json"))
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap(),
            )
            .unwrap();
            for f in record["files"].as_array().unwrap() {
                let p = Path::from(format!("exports/exp/new/{}", f["name"].as_str().unwrap()));
                let size = inner.head(&p).await.unwrap().size;
                assert_eq!(size, f["bytes"].as_u64().unwrap());
            }
        } else {
            assert_eq!(latest, "old", "seed {seed}");
        }
        if let Err(e) = r {
            eprintln!("seed {seed}: {e}");
            failed += 1;
        }
    }
    assert!(
        failed > 0 && promoted > 0,
        "failed {failed}, promoted {promoted} of 40"
    );
}

/// Two exporters promoting different versions at once: the pointer moves once per winner,
/// and each decision is taken against what it really replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_exporters_cannot_both_replace_the_same_version() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    checkpoint(&ckpt, 10, 2.0, Some(2.0), 1).await;
    checkpoint(&ckpt, 20, 1.0, Some(1.0), 2).await;
    let to = format!("file://{}/export", dir.path().display());
    let (rx, ry) = (
        request(format!("{ckpt}@10"), "x"),
        request(format!("{ckpt}@20"), "y"),
    );
    let (x, y) = tokio::join!(
        export::export(&rx, &to, None),
        export::export(&ry, &to, None)
    );
    let (x, y) = (x.unwrap().promotion, y.unwrap().promotion);
    let firsts = [&x, &y]
        .iter()
        .filter(|p| matches!(p, Promotion::Promoted { replaced: None }))
        .count();
    assert_eq!(firsts, 1, "both claimed to be the first: {x:?} {y:?}");
    // y (eval 1.0) ends promoted whoever came first; x (2.0) is promoted only if it was first.
    let lineage = Lineage::open(&to, "exp").unwrap();
    assert_eq!(lineage.latest().await.unwrap().unwrap().version, "y");
}

/// A real HTTP server on 127.0.0.1 answering 503 to the first `failures` requests, then
/// `status`; returns its URL and the bodies it received.
async fn hook_server(failures: usize, status: u16) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then content-length bytes of body.
            let body = loop {
                let k = sock.read(&mut chunk).await.unwrap();
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
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(text[end + 4..end + 4 + len].to_string());
                    }
                }
            };
            let Some(body) = body else { continue };
            n += 1;
            let code = if n <= failures { 503 } else { status };
            if code == 200 {
                seen.lock().unwrap().push(body);
            }
            let reply =
                format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = sock.write_all(reply.as_bytes()).await;
        }
    });
    (url, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_notifies_the_webhook_through_its_failures() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    checkpoint(&ckpt, 10, 2.0, Some(2.5), 1).await;
    checkpoint(&ckpt, 20, 2.0, Some(2.9), 2).await;
    let to = format!("file://{}/export", dir.path().display());
    // Two 503s, then accepted on the third try.
    let (url, bodies) = hook_server(2, 200).await;
    let mut req = request(format!("{ckpt}@10"), "a");
    req.webhook = Some(url.clone());
    let out = export::export(&req, &to, None).await.unwrap();
    assert_eq!(out.webhook, Some(Ok(3)));
    let got: Vec<serde_json::Value> = bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["model"], "exp");
    assert_eq!(got[0]["version"], "a");
    assert_eq!(got[0]["eval_loss"], 2.5);
    assert!(got[0]["url"].as_str().unwrap().ends_with("/export/exp/a"));
    // Not promoted (a regression): no notice.
    let mut req = request(format!("{ckpt}@20"), "b");
    req.webhook = Some(url);
    let out = export::export(&req, &to, None).await.unwrap();
    assert!(matches!(out.promotion, Promotion::Kept { .. }));
    assert_eq!(out.webhook, None);
    assert_eq!(bodies.lock().unwrap().len(), 1);
    // A webhook that refuses (404) is not retried; the promotion stands.
    checkpoint(&ckpt, 30, 1.0, Some(1.0), 3).await;
    let (refusing, _) = hook_server(0, 404).await;
    let mut req = request(format!("{ckpt}@30"), "c");
    req.webhook = Some(refusing);
    let out = export::export(&req, &to, None).await.unwrap();
    assert_eq!(
        out.promotion,
        Promotion::Promoted {
            replaced: Some("a".into())
        }
    );
    match out.webhook {
        Some(Err(e)) => assert!(e.contains("refused") && e.contains("404"), "{e}"),
        w => panic!("{w:?}"),
    }
    // The notice is still owed: the next export of the version delivers it, once.
    let (good, delivered) = hook_server(0, 200).await;
    req.webhook = Some(good);
    let out = export::export(&req, &to, None).await.unwrap();
    assert_eq!(out.promotion, Promotion::AlreadyExported { promoted: true });
    assert_eq!(out.webhook, Some(Ok(1)));
    let notice: serde_json::Value = serde_json::from_str(&delivered.lock().unwrap()[0]).unwrap();
    assert_eq!(notice["version"], "c");
    assert_eq!(notice["replaced"], "a");
    let out = export::export(&req, &to, None).await.unwrap();
    assert_eq!(out.webhook, None);
    assert_eq!(delivered.lock().unwrap().len(), 1);
    // Not promoted: a version that is not latest.json's owes no notice, and its re-export
    // leaves the record of the first decision about it as it was.
    let b_decision = dir.path().join("export/exp/b/promotion.json");
    let before = std::fs::read(&b_decision).unwrap();
    let mut req_b = request(format!("{ckpt}@20"), "b");
    req_b.webhook = req.webhook.clone();
    let out = export::export(&req_b, &to, None).await.unwrap();
    assert!(
        matches!(out.promotion, Promotion::Kept { .. }),
        "{:?}",
        out.promotion
    );
    assert_eq!(out.webhook, None);
    assert_eq!(delivered.lock().unwrap().len(), 1);
    assert_eq!(std::fs::read(&b_decision).unwrap(), before);
}

/// Exports of one version running at once send its webhook notice once: `promotion.json`
/// moves by compare-and-swap, and only the export that recorded itself as sending sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_of_one_version_at_once_send_one_notice() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    checkpoint(&ckpt, 10, 2.0, Some(2.0), 1).await;
    let to = format!("file://{}/export", dir.path().display());
    // Slow to accept (two 503s first, about 1.5 s): the others find it being sent.
    let (url, bodies) = hook_server(2, 200).await;
    let mut req = request(format!("{ckpt}@10"), "v");
    req.webhook = Some(url);
    let (a, b, c, d) = tokio::join!(
        export::export(&req, &to, None),
        export::export(&req, &to, None),
        export::export(&req, &to, None),
        export::export(&req, &to, None)
    );
    let outs = [a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap()];
    assert_eq!(bodies.lock().unwrap().len(), 1, "one notice");
    let senders = outs.iter().filter(|o| o.webhook.is_some()).count();
    assert_eq!(
        senders,
        1,
        "{:?}",
        outs.iter().map(|o| &o.webhook).collect::<Vec<_>>()
    );
    assert!(outs.iter().all(|o| !matches!(o.webhook, Some(Err(_)))));
    let firsts = outs
        .iter()
        .filter(|o| o.promotion == Promotion::Promoted { replaced: None })
        .count();
    assert_eq!(firsts, 1);
    // Delivered: a later export of it sends nothing.
    let out = export::export(&req, &to, None).await.unwrap();
    assert_eq!((out.webhook, out.notice_sent_by), (None, None));
    assert_eq!(bodies.lock().unwrap().len(), 1);
}

/// A notice whose sending cannot be recorded (a store this exporter may only read) is not
/// sent, with an error saying why: every export would send it again. An export that can
/// write delivers it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_that_cannot_be_recorded_is_not_sent_again_and_again() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    checkpoint(&ckpt, 10, 2.0, Some(2.0), 1).await;
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let lineage = |read_only: bool| {
        let store: Arc<dyn ObjectStore> = Arc::new(UnreliableStore::new(
            inner.clone(),
            Faults {
                read_only,
                ..Default::default()
            },
        ));
        Lineage::with_store(store, Path::from("exports/exp"), "memory://exports/exp")
    };
    let (refusing, _) = hook_server(0, 404).await;
    let mut req = request(format!("{ckpt}@10"), "v");
    req.webhook = Some(refusing);
    let out = export::export(&req, "memory://exports", Some(lineage(false)))
        .await
        .unwrap();
    assert_eq!(out.promotion, Promotion::Promoted { replaced: None });
    assert!(matches!(out.webhook, Some(Err(_))), "{:?}", out.webhook);
    // Owed; read-only exporters cannot record sending it, so they do not send it.
    let (good, delivered) = hook_server(0, 200).await;
    req.webhook = Some(good);
    for _ in 0..2 {
        let out = export::export(&req, "memory://exports", Some(lineage(true)))
            .await
            .unwrap();
        assert_eq!(out.promotion, Promotion::AlreadyExported { promoted: true });
        match &out.webhook {
            Some(Err(e)) => assert!(e.contains("not sent") && e.contains("read-only"), "{e}"),
            w => panic!("{w:?}"),
        }
        assert_eq!(delivered.lock().unwrap().len(), 0);
    }
    let out = export::export(&req, "memory://exports", Some(lineage(false)))
        .await
        .unwrap();
    assert_eq!(out.webhook, Some(Ok(1)));
    assert_eq!(delivered.lock().unwrap().len(), 1);
}

/// A nightly job's base, `latest-export:<lineage>`, is the promoted version, every file checked
/// against its lockstep.json: a damaged file is refused by name; no promoted version is an
/// error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promoted_version_is_checked_before_it_is_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    checkpoint(&ckpt, 10, 2.0, Some(2.5), 1).await;
    let to = format!("file://{}/export", dir.path().display());
    let lineage = format!("{to}/exp");
    let e = export::resolve_latest(&lineage)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("latest.json") && e.contains("no promoted version"),
        "{e}"
    );
    export::export(&request(format!("{ckpt}@10"), "a"), &to, None)
        .await
        .unwrap();
    assert_eq!(
        export::resolve_latest(&lineage).await.unwrap(),
        format!("{lineage}/a")
    );
    let st = dir.path().join("export/exp/a/model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&st, &bytes).unwrap();
    let e = export::resolve_latest(&lineage)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("damaged"),
        "{e}"
    );
    // A lockstep.json that lists nothing would check nothing: refused, as permanent.
    let record = dir.path().join("export/exp/a/lockstep.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    json["files"] = serde_json::json!([]);
    std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();
    let e = export::resolve_latest(&lineage).await.unwrap_err();
    assert!(e.is_permanent(), "{e}");
    assert!(
        e.to_string().contains("lists no `model.safetensors`"),
        "{e}"
    );
    // A file name or a promoted version that leaves the lineage: damaged, permanent.
    json["files"] = serde_json::json!([
        {"name": "model.safetensors", "bytes": 1, "sha256": "00"},
        {"name": "config.json", "bytes": 1, "sha256": "00"},
        {"name": "../../escape", "bytes": 1, "sha256": "00"},
    ]);
    std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();
    let e = export::resolve_latest(&lineage).await.unwrap_err();
    assert!(
        e.is_permanent() && e.to_string().contains("`../../escape`"),
        "{e}"
    );
    let latest = dir.path().join("export/exp/latest.json");
    let mut l: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&latest).unwrap()).unwrap();
    l["version"] = serde_json::json!("../other");
    std::fs::write(&latest, serde_json::to_vec(&l).unwrap()).unwrap();
    let e = export::resolve_latest(&lineage).await.unwrap_err();
    assert!(
        e.is_permanent() && e.to_string().contains("`../other`"),
        "{e}"
    );
}

/// The lineage's own file names cannot be versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_names_are_not_versions() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    checkpoint(&ckpt, 10, 2.0, Some(2.5), 1).await;
    let to = format!("file://{}/export", dir.path().display());
    for v in ["latest.json", ".latest.json.lock"] {
        let e = export::export(&request(format!("{ckpt}@10"), v), &to, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("reserved"), "{v}: {e}");
    }
    assert!(!dir.path().join("export/exp/latest.json").exists());
}
