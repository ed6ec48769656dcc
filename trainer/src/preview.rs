//! `lockstep data preview`: how a job's records become tokens — the text as the tokenizer
//! reads it back, the ids, which of them carry loss — read through the token store training
//! uses (built here if this machine has none for the data yet).

use std::path::Path;

use lockstep_api::JobConfig;

use crate::error::{Error, Result};
use crate::inputs::{load_tokenizer, load_tokens};
use crate::tokens::Watch;

/// The most records one preview shows.
pub const MAX_RECORDS: usize = 1000;

/// One record as training sees it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its index among the file set's usable records (bad ones skipped are not counted).
    pub index: usize,
    /// The file it came from.
    pub file: String,
    /// Its token ids, the end-of-sequence id last.
    pub input_ids: Vec<u32>,
    /// Per id: whether predicting it counts in the loss.
    pub loss_mask: Vec<bool>,
    /// The ids read back as text, in runs of the same mask: (carries loss, text).
    pub spans: Vec<(bool, String)>,
}

/// What a preview found.
#[derive(Debug, Clone)]
pub struct Preview {
    /// The first records.
    pub records: Vec<Record>,
    /// Usable records in the file set.
    pub docs: usize,
    /// Their tokens.
    pub tokens: u64,
    /// Records skipped as bad (`data.skip_bad_records`).
    pub skipped: u64,
}

/// The first `records` of `data.train` (or `data.eval`) of `config`, tokenised as a run of it
/// would, through the token store in `cache`. `note` hears about long tokenising.
pub fn preview(
    config: &JobConfig,
    eval: bool,
    cache: &Path,
    records: usize,
    note: &mut dyn FnMut(String),
) -> Result<Preview> {
    if records == 0 || records > MAX_RECORDS {
        return Err(Error::Usage(format!(
            "--records {records}: show 1 to {MAX_RECORDS}"
        )));
    }
    let (field, urls) = if eval {
        ("data.eval", &config.data.eval)
    } else {
        ("data.train", &config.data.train)
    };
    if urls.is_empty() {
        return Err(Error::Usage(format!("{field} lists no files to preview")));
    }
    let rt = crate::runtime::io("preview-io")?;
    let (tokenizer, vocab) = load_tokenizer(config, &rt)?;
    let mut watch = Watch {
        who: format!("`lockstep data preview` of job {}", config.job.name),
        stop: None,
        note,
    };
    let store = load_tokens(config, urls, cache, &tokenizer, vocab, &rt, &mut watch)?;
    // Which file each record came from: the files' records are stored in order.
    let mut ends = Vec::new();
    let mut end = 0u64;
    for f in store.per_file() {
        end += f.records;
        ends.push((end, f.url.clone()));
    }
    let mut out = Vec::new();
    let all = store.records();
    for (d, docs) in all.iter().take(records).enumerate() {
        // A record's documents (one, or a chat's turns) back to back.
        let mut ids = Vec::new();
        let mut loss_mask = Vec::new();
        for doc in docs.clone() {
            let (len, prompt) = store.doc(doc);
            store.read(doc, 0, len, &mut ids)?;
            loss_mask.extend((0..len).map(|i| i >= prompt));
        }
        let mut spans: Vec<(bool, String)> = Vec::new();
        let mut start = 0;
        while start < ids.len() {
            let mask = loss_mask[start];
            let stop = (start..ids.len())
                .find(|&i| loss_mask[i] != mask)
                .unwrap_or(ids.len());
            spans.push((mask, tokenizer.decode(&ids[start..stop])?));
            start = stop;
        }
        let file = ends
            .iter()
            .find(|(e, _)| (d as u64) < *e)
            .map_or_else(String::new, |(_, u)| u.clone());
        out.push(Record {
            index: d,
            file,
            input_ids: ids,
            loss_mask,
            spans,
        });
    }
    Ok(Preview {
        records: out,
        docs: all.len(),
        tokens: store.tokens(),
        skipped: store.skipped(),
    })
}
