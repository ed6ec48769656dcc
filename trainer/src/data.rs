//! Training data: the documents of a [`TokenStore`] (JSONL records tokenised once per machine;
//! what a record may hold is in [`crate::tokens::record`]), shuffled by seed per epoch, packed
//! into sequences and dealt out to ranks.
//!
//! **Order.** Epoch `e` concatenates the documents in a permutation drawn from `(seed, e)` and
//! cuts the stream into windows of `seq_len + 1` tokens that overlap by one (inputs are the first
//! `seq_len`, targets the last `seq_len`). Every window of every epoch has one global index, so
//! the whole data position is one number — the cursor, saved in checkpoints — and it does not
//! depend on the world size: a step consumes `world_size × grad_accum × batch_size` windows,
//! rank `r` taking its `batch_size` from each micro-batch's block.

use crate::error::{Error, Result};
use crate::model::Batch;
use crate::rng::Rng;
use crate::tokens::TokenStore;

/// Deals packed sequences of a [`TokenStore`] by global window index.
#[derive(Debug)]
pub struct Packer {
    store: TokenStore,
    seq_len: usize,
    seed: u64,
    windows_per_epoch: u64,
    /// The epoch whose order is built: its documents in order, and where each starts in the
    /// epoch's token stream (one more entry than documents).
    epoch: Option<(u64, Vec<u32>, Vec<u64>)>,
}

impl Packer {
    /// Packs `store`'s documents into windows of `seq_len + 1` tokens, shuffled by `seed` per
    /// epoch.
    pub fn new(store: TokenStore, seq_len: usize, seed: u64) -> Result<Packer> {
        let windows = store.tokens().saturating_sub(1) / seq_len as u64;
        if windows == 0 {
            return Err(Error::Data {
                file: "data.train".into(),
                line: 0,
                reason: format!(
                    "the data holds {} tokens in {} records{}; data.seq_len = {seq_len} needs \
                     at least {}",
                    store.tokens(),
                    store.len(),
                    match store.skipped() {
                        0 => String::new(),
                        n => format!(
                            " ({n} bad records skipped: the log of the tokenising run names \
                             the first)"
                        ),
                    },
                    seq_len + 1
                ),
            });
        }
        Ok(Packer {
            store,
            seq_len,
            seed,
            windows_per_epoch: windows,
            epoch: None,
        })
    }

    /// Windows in one epoch.
    pub fn windows_per_epoch(&self) -> u64 {
        self.windows_per_epoch
    }

    /// The tokenised data.
    pub fn store(&self) -> &TokenStore {
        &self.store
    }

    fn build_epoch(&mut self, epoch: u64) {
        if matches!(&self.epoch, Some((e, _, _)) if *e == epoch) {
            return;
        }
        let n = self.store.len();
        // Records are shuffled (a chat's documents stay together and in order); with one
        // document per record this is the documents' permutation.
        let mut records = self.store.records();
        Rng::derive(self.seed, epoch + 1).shuffle(&mut records);
        let order: Vec<u32> = records
            .into_iter()
            .flat_map(|r| r.map(|d| d as u32))
            .collect();
        let mut starts = Vec::with_capacity(n + 1);
        let mut at = 0u64;
        starts.push(0);
        for &d in &order {
            at += u64::from(self.store.doc(d as usize).0);
            starts.push(at);
        }
        self.epoch = Some((epoch, order, starts));
    }

    /// Appends window `index` (global across epochs) to `batch`.
    fn push_window(&mut self, index: u64, batch: &mut Batch, ids: &mut Vec<u32>) -> Result<()> {
        let epoch = index / self.windows_per_epoch;
        let start = (index % self.windows_per_epoch) * self.seq_len as u64;
        self.build_epoch(epoch);
        let Some((_, order, starts)) = &self.epoch else {
            return Ok(());
        };
        let need = self.seq_len as u64 + 1;
        ids.clear();
        let mut counts = Vec::with_capacity(need as usize);
        // The document holding the window's first token, then on until it is full (the
        // epoch holds at least `start + need` tokens: windows are counted that way).
        let mut k = starts.partition_point(|&s| s <= start) - 1;
        let mut pos = start;
        while (ids.len() as u64) < need {
            let d = order[k] as usize;
            let (len, prompt) = self.store.doc(d);
            let offset = (pos - starts[k]) as u32;
            let take = (len - offset).min((need - ids.len() as u64) as u32);
            self.store.read(d, offset, take, ids)?;
            counts.extend((offset..offset + take).map(|i| i >= prompt));
            pos += u64::from(take);
            k += 1;
        }
        let t = self.seq_len;
        batch.inputs.extend(ids[..t].iter().map(|&x| x as i32));
        batch.targets.extend(ids[1..].iter().map(|&x| x as i32));
        batch
            .weights
            .extend(counts[1..].iter().map(|&c| if c { 1.0 } else { 0.0 }));
        batch.rows += 1;
        Ok(())
    }

    /// `rank`'s micro-batches for the step that starts at window `cursor`.
    pub fn step_batches(
        &mut self,
        cursor: u64,
        rank: usize,
        world: usize,
        batch_size: usize,
        accum: usize,
    ) -> Result<Vec<Batch>> {
        (0..accum)
            .map(|a| {
                self.windows(
                    cursor + ((a * world + rank) * batch_size) as u64,
                    batch_size,
                )
            })
            .collect()
    }

    /// Windows `first..first + count` (global indices) as one batch.
    pub fn windows(&mut self, first: u64, count: usize) -> Result<Batch> {
        let mut ids = Vec::with_capacity(self.seq_len + 1);
        let mut b = Batch {
            rows: 0,
            seq_len: self.seq_len,
            inputs: Vec::new(),
            targets: Vec::new(),
            weights: Vec::new(),
        };
        for j in 0..count as u64 {
            self.push_window(first + j, &mut b, &mut ids)?;
        }
        Ok(b)
    }

    /// Windows one step consumes.
    pub fn per_step(world: usize, batch_size: usize, accum: usize) -> u64 {
        (world * batch_size * accum) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tokenizer::Tokenizer;
    use crate::tokens::{Builder, Encoding, Lines, encode_record, open};

    /// A token store of `lines` (in a temporary directory; the open store outlives it).
    fn corpus(lines: &str, skip: bool) -> Result<TokenStore> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let enc = Encoding {
            tokenizer: &Tokenizer::Bytes,
            vocab: 256,
            skip_bad: skip,
            columns: Default::default(),
        };
        let mut b = Builder::create(&dir, &enc)?;
        let mut l = Lines::new("mem://d.jsonl");
        l.feed(lines.as_bytes(), |n, line| b.add("mem://d.jsonl", n, line))?;
        l.finish(|n, line| b.add("mem://d.jsonl", n, line))?;
        b.finish(&dir)?;
        open(&dir, &enc)
    }

    #[test]
    fn prompt_tokens_are_masked_and_text_counts() {
        let c = corpus(r#"{"prompt":"ab","completion":"cd"}"#, false).unwrap();
        let mut p = Packer::new(c, 4, 1).unwrap();
        let b = &p.step_batches(0, 0, 1, 1, 1).unwrap()[0];
        assert_eq!(b.inputs, vec![97, 98, 99, 100]);
        assert_eq!(b.targets, vec![98, 99, 100, 0]);
        // Targets b (prompt) masked; c, d, eos counted.
        assert_eq!(b.weights, vec![0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn bad_records_name_file_and_line_or_are_counted() {
        let text = "{\"text\":\"hello\",\"id\":7}\n\n{\"txt\":\"typo\"}\nnot json\n";
        let e = corpus(text, false).unwrap_err().to_string();
        assert!(e.starts_with("mem://d.jsonl:3:"), "{e}");
        let c = corpus(text, true).unwrap();
        assert_eq!((c.len(), c.skipped()), (1, 2));
        let e = corpus(r#"{"prompt":"only"}"#, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(":1:"), "{e}");
    }

    #[test]
    fn too_little_data_for_one_sequence_is_an_error() {
        let c = corpus(r#"{"text":"hi"}"#, false).unwrap();
        let e = Packer::new(c, 8, 0).unwrap_err().to_string();
        assert!(e.contains("data.seq_len"), "{e}");
    }

    #[test]
    fn ranks_split_the_global_order_whatever_the_world_size() {
        let lines: String = (0..50)
            .map(|i| format!("{{\"text\":\"doc {i} ....\"}}\n"))
            .collect();
        let mut one = Packer::new(corpus(&lines, false).unwrap(), 8, 7).unwrap();
        let mut two = Packer::new(corpus(&lines, false).unwrap(), 8, 7).unwrap();
        // W=1, b=4 versus W=2, b=2: the same windows in the same step, split by rank.
        for step in 0..30u64 {
            let cursor = step * 4;
            let whole = one.step_batches(cursor, 0, 1, 4, 1).unwrap().remove(0);
            let r0 = two.step_batches(cursor, 0, 2, 2, 1).unwrap().remove(0);
            let r1 = two.step_batches(cursor, 1, 2, 2, 1).unwrap().remove(0);
            let joined: Vec<i32> = r0.inputs.iter().chain(&r1.inputs).copied().collect();
            assert_eq!(whole.inputs, joined);
        }
        // Epochs differ in order but hold the same tokens.
        let w = one.windows_per_epoch();
        let e0 = one.step_batches(0, 0, 1, w as usize, 1).unwrap().remove(0);
        let e1 = one.step_batches(w, 0, 1, w as usize, 1).unwrap().remove(0);
        assert_ne!(e0.inputs, e1.inputs);
    }

    #[test]
    fn windows_are_the_shuffled_documents_back_to_back() {
        // Documents of different lengths, prompts included, so windows cross document ends.
        let lines: String = (0..40)
            .map(|i| {
                if i % 3 == 0 {
                    format!(
                        "{{\"prompt\":\"q{i}\",\"completion\":\"{}\"}}\n",
                        "a".repeat(i % 7 + 1)
                    )
                } else {
                    format!("{{\"text\":\"{}\"}}\n", "t".repeat(i % 11 + 1))
                }
            })
            .collect();
        let docs: Vec<(Vec<u32>, usize)> = lines
            .lines()
            .map(|l| {
                encode_record(l.as_bytes(), &Tokenizer::Bytes, 256)
                    .unwrap()
                    .remove(0)
            })
            .collect();
        let mut p = Packer::new(corpus(&lines, false).unwrap(), 5, 9).unwrap();
        let w = p.windows_per_epoch();
        for epoch in 0..3u64 {
            let mut order: Vec<u32> = (0..docs.len() as u32).collect();
            Rng::derive(9, epoch + 1).shuffle(&mut order);
            let (mut stream, mut counts) = (Vec::new(), Vec::new());
            for d in order {
                let (t, prompt) = &docs[d as usize];
                stream.extend(t.iter().map(|&x| x as i32));
                counts.extend((0..t.len()).map(|i| if i >= *prompt { 1.0 } else { 0.0 }));
            }
            let b = p
                .step_batches(epoch * w, 0, 1, w as usize, 1)
                .unwrap()
                .remove(0);
            for i in 0..w as usize {
                let s = i * 5;
                assert_eq!(
                    b.inputs[i * 5..i * 5 + 5],
                    stream[s..s + 5],
                    "epoch {epoch} window {i}"
                );
                assert_eq!(b.targets[i * 5..i * 5 + 5], stream[s + 1..s + 6]);
                assert_eq!(b.weights[i * 5..i * 5 + 5], counts[s + 1..s + 6]);
            }
        }
    }
}
