//! What a JSONL record may hold, and its tokens.
//!
//! A record is `{"text": ...}` (every token counts in the loss), `{"prompt": ...,
//! "completion": ...}` (only the completion's tokens count), or `{"messages": [{"role": ...,
//! "content": ...}, ...]}` rendered with the base's chat template (only the assistant turns
//! count; see [`crate::chat`]); other fields (ids, sources, metadata) are ignored. A text or
//! prompt/completion document ends with the tokenizer's end-of-sequence id; a chat ends as its
//! template ends it.

use serde::Deserialize;

use crate::tokenizer::Tokenizer;

/// A JSONL record. Other fields (ids, sources, metadata) are ignored.
#[derive(Deserialize)]
struct Record {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    completion: Option<String>,
    #[serde(default)]
    messages: Option<Vec<crate::chat::Message>>,
}

/// One JSONL record's documents, in order: each one's token ids and how many leading ones are
/// prompt (not learnt from). A `text` or `prompt`/`completion` record is one document ending
/// with the end-of-sequence id; a chat record is one document per assistant turn (the turn's
/// context, then the turn), stored to stay together. Or why the record is bad.
pub fn encode_record(
    line: &[u8],
    tokenizer: &Tokenizer,
    vocab: usize,
) -> Result<Vec<(Vec<u32>, usize)>, String> {
    // Parsed once; only a record that does not parse is looked at again, for its error.
    let r: Record = serde_json::from_slice(line).map_err(|e| {
        let chat = serde_json::from_slice::<serde_json::Value>(line)
            .is_ok_and(|v| v.get("messages").is_some());
        if chat {
            format!("`messages` must be a list of {{\"role\": ..., \"content\": ...}}: {e}")
        } else {
            format!("not a JSON record: {e}")
        }
    })?;
    let Some(messages) = r.messages else {
        return encode_single(r, tokenizer, vocab).map(|d| vec![d]);
    };
    if r.text.is_some() || r.prompt.is_some() || r.completion.is_some() {
        return Err(
            "a chat record has `messages` only (not `text`, `prompt` or `completion`)".into(),
        );
    }
    let Some(template) = tokenizer.chat() else {
        return Err(
            "a chat record needs the base model's chat template (`chat_template` in its \
             tokenizer_config.json), and model.base has none"
                .into(),
        );
    };
    let docs = template.documents(&messages, &|s| {
        tokenizer.encode(s).map_err(|e| e.to_string())
    })?;
    for (tokens, _) in &docs {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            ));
        }
    }
    Ok(docs)
}

fn encode_single(
    r: Record,
    tokenizer: &Tokenizer,
    vocab: usize,
) -> Result<(Vec<u32>, usize), String> {
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
    Ok((tokens, prompt_len))
}
