//! Text to token ids: Hugging Face `tokenizers` for a `tokenizer.json`, or bytes (ids 0–255)
//! when the job has none (the quickstart).

use crate::error::{Error, Result};

/// A tokenizer and its end-of-sequence id (appended after every document).
pub enum Tokenizer {
    /// UTF-8 bytes are the ids; the end of a document is id 0 (NUL, which text never holds).
    Bytes,
    /// A Hugging Face tokenizer.
    Hf {
        /// The tokenizer.
        inner: Box<tokenizers::Tokenizer>,
        /// End-of-sequence id.
        eos: u32,
        /// xxh3-64 of the `tokenizer.json` it was parsed from.
        hash: u64,
        /// The base's chat template (`tokenizer_config.json`), for chat records.
        chat: Option<Box<crate::chat::ChatTemplate>>,
    },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => f.write_str("Tokenizer::Bytes"),
            Tokenizer::Hf { eos, .. } => write!(f, "Tokenizer::Hf {{ eos: {eos} }}"),
        }
    }
}

/// End-of-sequence tokens tried, in order, when the model config names none.
const EOS_NAMES: [&str; 5] = [
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<eos>",
    "<|eot_id|>",
];

impl Tokenizer {
    /// Parses a `tokenizer.json` (`file` names it in errors). `eos` is the model config's
    /// `eos_token_id`, if any; else a conventional end token in the vocabulary is used.
    pub fn from_json(bytes: &[u8], file: &str, eos: Option<u32>) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Model {
            file: file.into(),
            reason: format!("not a tokenizer.json: {e}"),
        })?;
        let eos = eos
            .or_else(|| EOS_NAMES.iter().find_map(|n| inner.token_to_id(n)))
            .ok_or_else(|| Error::Model {
                file: file.into(),
                reason: format!(
                    "no end-of-sequence token: config.json has no eos_token_id and the \
                     vocabulary has none of {EOS_NAMES:?}"
                ),
            })?;
        Ok(Tokenizer::Hf {
            inner: Box::new(inner),
            eos,
            hash: xxhash_rust::xxh3::xxh3_64(bytes),
            chat: None,
        })
    }

    /// This tokenizer with the base's chat template (for chat records).
    pub fn with_chat(self, template: Option<crate::chat::ChatTemplate>) -> Tokenizer {
        match self {
            Tokenizer::Hf {
                inner, eos, hash, ..
            } => Tokenizer::Hf {
                inner,
                eos,
                hash,
                chat: template.map(Box::new),
            },
            t => t,
        }
    }

    /// The chat template chat records are rendered with, if the base has one.
    pub fn chat(&self) -> Option<&crate::chat::ChatTemplate> {
        match self {
            Tokenizer::Hf { chat, .. } => chat.as_deref(),
            Tokenizer::Bytes => None,
        }
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf { inner, .. } => inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Internal(format!("tokenize: {e}"))),
        }
    }

    /// The text of `ids` as this tokenizer reads them back (special tokens written out; for
    /// bytes, invalid UTF-8 replaced and the end id shown as `<eos>`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let mut out = String::new();
                let mut run = Vec::new();
                for &id in ids {
                    if id == 0 || id > 255 {
                        out.push_str(&String::from_utf8_lossy(&run));
                        run.clear();
                        out.push_str(if id == 0 { "<eos>" } else { "\u{fffd}" });
                    } else {
                        run.push(id as u8);
                    }
                }
                out.push_str(&String::from_utf8_lossy(&run));
                Ok(out)
            }
            Tokenizer::Hf { inner, .. } => inner
                .decode(ids, false)
                .map_err(|e| Error::Internal(format!("decode: {e}"))),
        }
    }

    /// What decides this tokenizer's output: the same string for the same tokenizer and end
    /// id, a different one otherwise (it keys the token cache).
    pub fn fingerprint(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".into(),
            Tokenizer::Hf {
                eos, hash, chat, ..
            } => match chat {
                None => format!("hf-{hash:016x}-eos{eos}"),
                Some(c) => format!("hf-{hash:016x}-eos{eos}-chat{:016x}", c.fingerprint()),
            },
        }
    }

    /// The id that ends each document.
    pub fn eos(&self) -> u32 {
        match self {
            Tokenizer::Bytes => 0,
            Tokenizer::Hf { eos, .. } => *eos,
        }
    }

    /// The smallest vocabulary that holds every id this tokenizer produces.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf { inner, .. } => inner.get_vocab_size(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_ids() {
        let t = Tokenizer::Bytes;
        assert_eq!(t.encode("hé").unwrap(), vec![104, 195, 169]);
        assert_eq!(t.eos(), 0);
    }

    #[test]
    fn hf_tokenizer_matches_the_python_library() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
        let json = std::fs::read(dir.join("tokenizer.json")).unwrap();
        let t = Tokenizer::from_json(&json, "tokenizer.json", None).unwrap();
        assert_eq!(t.eos(), 0, "<eos> is the first special token");
        let expected: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        for case in expected {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(t.encode(text).unwrap(), ids, "{text}");
        }
        let e = Tokenizer::from_json(b"{}", "x/tokenizer.json", None).unwrap_err();
        assert!(e.to_string().contains("x/tokenizer.json"), "{e}");
    }
}
