//! Training data: JSONL records read from object_store URLs, tokenised, shuffled by seed per
//! epoch, packed into sequences and dealt out to ranks.
//!
//! A record is `{"text": ...}` (every token counts in the loss) or `{"prompt": ...,
//! "completion": ...}` (only the completion's tokens count); other fields are ignored. Each document ends with the
//! tokenizer's end-of-sequence id.
//!
//! **Order.** Epoch `e` concatenates the documents in a permutation drawn from `(seed, e)` and
//! cuts the stream into windows of `seq_len + 1` tokens that overlap by one (inputs are the first
//! `seq_len`, targets the last `seq_len`). Every window of every epoch has one global index, so
//! the whole data position is one number — the cursor, saved in checkpoints — and it does not
//! depend on the world size: a step consumes `world_size × grad_accum × batch_size` windows,
//! rank `r` taking its `batch_size` from each micro-batch's block.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::Batch;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// Tokenised documents.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    /// Token ids of each document, end-of-sequence included.
    docs: Vec<Vec<u32>>,
    /// Per document, how many leading tokens are prompt (not counted as targets).
    prompt_len: Vec<usize>,
    /// Tokens over all documents.
    tokens: u64,
    /// Records skipped as bad (with `skip_bad_records`).
    pub skipped: u64,
    /// Files read.
    pub files: usize,
}

/// A JSONL record. Other fields (ids, sources, metadata) are ignored.
#[derive(Deserialize)]
struct Record {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    completion: Option<String>,
}

impl Corpus {
    /// Adds the JSONL `bytes` of `file`. A bad record is an error naming the file and line,
    /// or — with `skip_bad` — counted in [`Corpus::skipped`] and left out.
    pub fn add_jsonl(
        &mut self,
        file: &str,
        bytes: &[u8],
        tokenizer: &Tokenizer,
        vocab: usize,
        skip_bad: bool,
    ) -> Result<()> {
        self.files += 1;
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let line_no = i as u64 + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match self.add_record(line, tokenizer, vocab) {
                Ok(()) => {}
                Err(_) if skip_bad => self.skipped += 1,
                Err(reason) => {
                    return Err(Error::Data {
                        file: file.into(),
                        line: line_no,
                        reason: format!(
                            "{reason} (set data.skip_bad_records = true to skip such records)"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn add_record(
        &mut self,
        line: &[u8],
        tokenizer: &Tokenizer,
        vocab: usize,
    ) -> Result<(), String> {
        let r: Record =
            serde_json::from_slice(line).map_err(|e| format!("not a JSON record: {e}"))?;
        let (prompt, completion) = match (r.text, r.prompt, r.completion) {
            (Some(t), None, None) => (String::new(), t),
            (None, Some(p), Some(c)) => (p, c),
            _ => {
                return Err("a record needs `text`, or `prompt` and `completion`, not both".into());
            }
        };
        let enc = |s: &str| tokenizer.encode(s).map_err(|e| e.to_string());
        let mut tokens = if prompt.is_empty() {
            Vec::new()
        } else {
            enc(&prompt)?
        };
        let prompt_len = tokens.len();
        tokens.extend(enc(&completion)?);
        tokens.push(tokenizer.eos());
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            ));
        }
        if tokens.len() == prompt_len + 1 {
            return Err("the record has no text to learn from".into());
        }
        self.tokens += tokens.len() as u64;
        self.docs.push(tokens);
        self.prompt_len.push(prompt_len);
        Ok(())
    }

    /// Documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// True when no document was read.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Tokens over all documents.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

/// Deals packed sequences of a [`Corpus`] by global window index.
#[derive(Debug)]
pub struct Packer {
    corpus: Corpus,
    seq_len: usize,
    seed: u64,
    windows_per_epoch: u64,
    /// The epoch whose stream is built: its tokens and whether each counts as a target.
    epoch: Option<(u64, Vec<u32>, Vec<bool>)>,
}

impl Packer {
    /// Packs `corpus` into windows of `seq_len + 1` tokens, shuffled by `seed` per epoch.
    pub fn new(corpus: Corpus, seq_len: usize, seed: u64) -> Result<Packer> {
        let windows = corpus.tokens.saturating_sub(1) / seq_len as u64;
        if windows == 0 {
            return Err(Error::Data {
                file: "data.train".into(),
                line: 0,
                reason: format!(
                    "the data holds {} tokens in {} records; data.seq_len = {seq_len} needs at \
                     least {}",
                    corpus.tokens,
                    corpus.len(),
                    seq_len + 1
                ),
            });
        }
        Ok(Packer {
            corpus,
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

    /// The corpus.
    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    fn build_epoch(&mut self, epoch: u64) {
        if matches!(&self.epoch, Some((e, _, _)) if *e == epoch) {
            return;
        }
        let mut order: Vec<usize> = (0..self.corpus.docs.len()).collect();
        Rng::derive(self.seed, epoch + 1).shuffle(&mut order);
        let n = self.corpus.tokens as usize;
        let mut tokens = Vec::with_capacity(n);
        let mut counts = Vec::with_capacity(n);
        for d in order {
            let doc = &self.corpus.docs[d];
            let p = self.corpus.prompt_len[d];
            tokens.extend_from_slice(doc);
            counts.extend((0..doc.len()).map(|i| i >= p));
        }
        self.epoch = Some((epoch, tokens, counts));
    }

    /// Appends window `index` (global across epochs) to `batch`.
    fn push_window(&mut self, index: u64, batch: &mut Batch) {
        let epoch = index / self.windows_per_epoch;
        let start = ((index % self.windows_per_epoch) * self.seq_len as u64) as usize;
        self.build_epoch(epoch);
        let Some((_, tokens, counts)) = &self.epoch else {
            return;
        };
        let t = self.seq_len;
        batch
            .inputs
            .extend(tokens[start..start + t].iter().map(|&x| x as i32));
        batch
            .targets
            .extend(tokens[start + 1..start + t + 1].iter().map(|&x| x as i32));
        batch.weights.extend(
            counts[start + 1..start + t + 1]
                .iter()
                .map(|&c| if c { 1.0 } else { 0.0 }),
        );
        batch.rows += 1;
    }

    /// `rank`'s micro-batches for the step that starts at window `cursor`.
    pub fn step_batches(
        &mut self,
        cursor: u64,
        rank: usize,
        world: usize,
        batch_size: usize,
        accum: usize,
    ) -> Vec<Batch> {
        (0..accum)
            .map(|a| {
                let mut b = Batch {
                    rows: 0,
                    seq_len: self.seq_len,
                    inputs: Vec::new(),
                    targets: Vec::new(),
                    weights: Vec::new(),
                };
                let first = cursor + ((a * world + rank) * batch_size) as u64;
                for j in 0..batch_size as u64 {
                    self.push_window(first + j, &mut b);
                }
                b
            })
            .collect()
    }

    /// Windows one step consumes.
    pub fn per_step(world: usize, batch_size: usize, accum: usize) -> u64 {
        (world * batch_size * accum) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(lines: &str, skip: bool) -> Result<Corpus> {
        let mut c = Corpus::default();
        c.add_jsonl(
            "mem://d.jsonl",
            lines.as_bytes(),
            &Tokenizer::Bytes,
            256,
            skip,
        )?;
        Ok(c)
    }

    #[test]
    fn prompt_tokens_are_masked_and_text_counts() {
        let c = corpus(r#"{"prompt":"ab","completion":"cd"}"#, false).unwrap();
        let mut p = Packer::new(c, 4, 1).unwrap();
        let b = &p.step_batches(0, 0, 1, 1, 1)[0];
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
        assert_eq!((c.len(), c.skipped), (1, 2));
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
            let whole = one.step_batches(cursor, 0, 1, 4, 1).remove(0);
            let r0 = two.step_batches(cursor, 0, 2, 2, 1).remove(0);
            let r1 = two.step_batches(cursor, 1, 2, 2, 1).remove(0);
            let joined: Vec<i32> = r0.inputs.iter().chain(&r1.inputs).copied().collect();
            assert_eq!(whole.inputs, joined);
        }
        // Epochs differ in order but hold the same tokens.
        let w = one.windows_per_epoch();
        let e0 = one.step_batches(0, 0, 1, w as usize, 1).remove(0);
        let e1 = one.step_batches(w, 0, 1, w as usize, 1).remove(0);
        assert_ne!(e0.inputs, e1.inputs);
    }
}
