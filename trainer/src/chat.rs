//! Chat records (`{"messages": [{"role": ..., "content": ...}, ...]}`) rendered with the base
//! model's own chat template (`tokenizer_config.json`'s `chat_template`, Jinja, rendered with
//! minijinja), the loss on the assistant turns only: a turn's tokens are those of the
//! conversation up to and including it past those of the conversation before it with the
//! generation prompt (what transformers' `apply_chat_template` renders for each).

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The most instructions one rendering of a chat template may take: far more than any real
/// template needs for the longest conversation.
const TEMPLATE_FUEL: u64 = 10_000_000;

/// The most messages one chat record may have: each assistant turn renders the conversation
/// before it again, so the work grows with the square of the turns.
const MAX_MESSAGES: usize = 256;

/// `{% generation %}` / `{% endgeneration %}` (with any whitespace control) removed.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        let Some(j) = rest[i..].find("%}") else {
            break;
        };
        let inner =
            rest[i + 2..i + j].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..i]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[i..i + j + 2]);
        }
        rest = &rest[i + j + 2..];
    }
    out.push_str(rest);
    out
}

/// `s` with control characters escaped (a template's own error text reaches terminals).
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n' {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The longest rendering of one conversation (64 MiB, the longest record).
const MAX_RENDERED: usize = 64 << 20;

/// A chat template and the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
    /// The template parsed, once (every record renders with it).
    env: Environment<'static>,
}

/// One message of a chat record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (what the template knows).
    pub role: String,
    /// Its text.
    pub content: String,
}

impl ChatTemplate {
    /// From a `tokenizer_config.json` (`file` names it in errors): `None` when it has no
    /// `chat_template`. A list of named templates gives its `default`.
    pub fn from_config(bytes: &[u8], file: &str) -> Result<Option<ChatTemplate>> {
        let bad = |reason: String| Error::Model {
            file: file.into(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let source = match &v["chat_template"] {
            serde_json::Value::Null => return Ok(None),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .ok_or_else(|| bad("chat_template lists no `default` template".into()))?,
            _ => return Err(bad("chat_template is not a string".into())),
        };
        // A special token is a string or `{"content": ...}`.
        let token = |key: &str| match &v[key] {
            serde_json::Value::String(s) => s.clone(),
            o => o["content"].as_str().unwrap_or_default().to_string(),
        };
        // Parsed once here, so that a broken template is an error naming the file at start.
        let env =
            Self::env(&source).map_err(|e| bad(format!("chat_template does not parse: {e}")))?;
        Ok(Some(ChatTemplate {
            source,
            bos: token("bos_token"),
            eos: token("eos_token"),
            env,
        }))
    }

    /// What decides the rendering (it keys the token cache).
    pub fn fingerprint(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(
            format!("{}\0{}\0{}", self.source, self.bos, self.eos).as_bytes(),
        )
    }

    fn env(source: &str) -> std::result::Result<Environment<'static>, JinjaError> {
        let mut env = Environment::new();
        // The template comes with the base model: hostile until checked. Its work per
        // rendering is bounded (a loop over a huge range ends with an error, not a hang).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(64);
        // What Hugging Face's Jinja offers templates: Python's string and dict methods
        // (`.strip()`, `.startswith()`, `.items()`), `tojson`, `break`/`continue`.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // `{% generation %}` marks assistant text for transformers' own masks; the turns are
        // found here by rendering, so the block renders as its contents.
        let source = strip_generation_tags(source);
        env.add_template_owned("chat", source)?;
        Ok(env)
    }

    /// `messages` rendered; with `generation`, the prompt for the next assistant turn after.
    fn render(
        &self,
        messages: &[Message],
        generation: bool,
    ) -> std::result::Result<String, String> {
        let t = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let text = t
            .render(context! {
                messages => messages,
                add_generation_prompt => generation,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| {
                let mut s = e.to_string();
                // The template's own words (raise_exception) come first.
                if let Some(d) = e.detail() {
                    s = d.to_string();
                }
                format!("the chat template refuses it: {}", printable(&s))
            })?;
        if text.len() > MAX_RENDERED {
            return Err(format!(
                "the chat template renders it to {} MiB, more than the {} MiB a record may be",
                text.len() >> 20,
                MAX_RENDERED >> 20
            ));
        }
        Ok(text)
    }

    /// A conversation's documents: one per assistant turn, each the tokens since the previous
    /// turn (its context, then the turn), and how many leading ones are context. `encode`
    /// tokenises text (special tokens in the text included). The conversation must end with
    /// an assistant turn.
    pub fn documents(
        &self,
        messages: &[Message],
        encode: &dyn Fn(&str) -> std::result::Result<Vec<u32>, String>,
    ) -> std::result::Result<Vec<(Vec<u32>, usize)>, String> {
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        if messages.len() > MAX_MESSAGES {
            return Err(format!(
                "{} messages, more than the {MAX_MESSAGES} a chat record may have (split the \
                 conversation)",
                messages.len()
            ));
        }
        if messages.last().is_some_and(|m| m.role != "assistant") {
            return Err(
                "the last message must be the assistant's (nothing after it is learnt from)".into(),
            );
        }
        let mut docs = Vec::new();
        let mut done: Vec<u32> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            // Also for a first message: the generation prompt before it is context.
            let before = encode(&self.render(&messages[..i], true)?)?;
            let upto = encode(&self.render(&messages[..=i], false)?)?;
            // Every rendering must extend the one before it, token for token.
            if !before.starts_with(&done) || !upto.starts_with(&before) {
                return Err(format!(
                    "message {} (counting from 1) does not continue, token for token, what the \
                     chat template renders before it (a template that renders turns \
                     differently as the conversation grows, or text that merges with the \
                     preceding tokens), so its loss cannot be placed",
                    i + 1
                ));
            }
            if upto.len() == before.len() {
                return Err(format!("assistant message {i} renders to no tokens"));
            }
            docs.push((upto[done.len()..].to_vec(), before.len() - done.len()));
            done = upto;
        }
        Ok(docs)
    }
}

#[cfg(test)]
mod tests {
    use crate::tokenizer::Tokenizer;
    use crate::tokens::encode_record;

    /// Token ids and loss masks equal what transformers' `apply_chat_template` gives, for a
    /// Llama 3-style template and ChatML (fixture made by `scripts/make_chat_fixture.py`).
    #[test]
    fn chat_records_match_transformers_apply_chat_template() {
        for family in ["llama3", "chatml"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/chat")
                .join(family);
            let json = std::fs::read(dir.join("tokenizer.json")).unwrap();
            let config = std::fs::read(dir.join("tokenizer_config.json")).unwrap();
            let template = super::ChatTemplate::from_config(&config, "tokenizer_config.json")
                .unwrap()
                .unwrap();
            let t = Tokenizer::from_json(&json, "tokenizer.json", Some(0))
                .unwrap()
                .with_chat(Some(template));
            let expected: Vec<serde_json::Value> =
                serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
            for (n, case) in expected.iter().enumerate() {
                let line = serde_json::json!({"messages": case["messages"]}).to_string();
                let docs = encode_record(line.as_bytes(), &t, 320).unwrap();
                let ids: Vec<u32> = docs.iter().flat_map(|(d, _)| d.clone()).collect();
                let mask: Vec<u32> = docs
                    .iter()
                    .flat_map(|(d, p)| (0..d.len()).map(move |i| u32::from(i >= *p)))
                    .collect();
                let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
                let want_mask: Vec<u32> =
                    serde_json::from_value(case["loss_mask"].clone()).unwrap();
                assert_eq!(ids, want_ids, "{family} conversation {n}: ids");
                assert_eq!(mask, want_mask, "{family} conversation {n}: loss mask");
                let turns = case["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["role"] == "assistant")
                    .count();
                assert_eq!(docs.len(), turns, "one document per assistant turn");
            }
            // Records that do not fit: named, not rendered wrong.
            let bad = |line: &str| encode_record(line.as_bytes(), &t, 320).unwrap_err();
            assert!(bad(r#"{"messages": []}"#).contains("empty"));
            assert!(
                bad(r#"{"messages": [{"role": "user", "content": "hi"}]}"#)
                    .contains("last message")
            );
            assert!(bad(r#"{"messages": [{"role": "user"}]}"#).contains("role"));
            assert!(
                bad(r#"{"messages": [{"role": "user", "content": "a"}], "text": "b"}"#)
                    .contains("only")
            );
            // A template that would run without end is stopped.
            let endless = br#"{"chat_template": "{% for i in range(9000) %}{% for j in range(9000) %}x{% endfor %}{% endfor %}"}"#;
            let t2 = Tokenizer::from_json(&json, "tokenizer.json", Some(0))
                .unwrap()
                .with_chat(super::ChatTemplate::from_config(endless, "c").unwrap());
            let e = encode_record(
                br#"{"messages": [{"role": "assistant", "content": "a"}]}"#,
                &t2,
                320,
            )
            .unwrap_err();
            assert!(e.contains("chat template"), "{e}");
            let many: Vec<serde_json::Value> = (0..300)
                .map(|i| serde_json::json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": "x"}))
                .collect();
            let e = bad(&serde_json::json!({ "messages": many }).to_string());
            assert!(e.contains("300 messages"), "{e}");
            let first = r#"{"messages": [{"role": "assistant", "content": "first"}]}"#;
            if family == "chatml" {
                // The generation prompt before a first assistant message is context.
                let docs = encode_record(first.as_bytes(), &t, 320).unwrap();
                let header = t.encode("<|im_start|>assistant\n").unwrap();
                assert_eq!(docs[0].1, header.len(), "{docs:?}");
            } else {
                // Llama 3's puts the BOS before the first message only: the turn is not a
                // continuation of its generation prompt, and is refused rather than mis-masked.
                assert!(bad(first).contains("counting from 1"), "{}", bad(first));
            }
            if family == "chatml" {
                let e = bad(
                    r#"{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
                );
                assert!(e.contains("unknown role robot"), "{e}");
            }
        }
        // Python string methods, `tojson`, loop controls and `{% generation %}` work as in
        // transformers; a template's error text is printed with control characters escaped.
        let json = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/chat/chatml/tokenizer.json"),
        )
        .unwrap();
        let with = |template: &str| {
            let config = serde_json::json!({ "chat_template": template }).to_string();
            Tokenizer::from_json(&json, "tokenizer.json", Some(0))
                .unwrap()
                .with_chat(super::ChatTemplate::from_config(config.as_bytes(), "c").unwrap())
        };
        let t = with(
            "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
             {{ m.role.upper() }}: {% if m.role == 'assistant' %}{% generation %}\
             {{ m.content.strip() }}{% endgeneration %}{% else %}{{ m.content | tojson }}\
             {% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}",
        );
        let docs = encode_record(
            br#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "  yo  "}]}"#,
            &t,
            320,
        )
        .unwrap();
        let text = t.decode(&docs[0].0).unwrap();
        assert_eq!(text, "USER: \"hi\"\nASSISTANT: yo\n", "{docs:?}");
        let t = with("{{ raise_exception('\x1b[2Jbad') }}");
        let e = encode_record(
            br#"{"messages": [{"role": "assistant", "content": "a"}]}"#,
            &t,
            320,
        )
        .unwrap_err();
        assert!(e.contains("\\u{1b}[2Jbad") && !e.contains('\x1b'), "{e}");

        // A base without a template: chat records are refused saying so.
        let e = encode_record(
            br#"{"messages": [{"role": "assistant", "content": "a"}]}"#,
            &Tokenizer::Bytes,
            256,
        )
        .unwrap_err();
        assert!(e.contains("chat template"), "{e}");
    }
}
