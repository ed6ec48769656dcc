//! `model.base`: what a job starts from, parsed once.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The prefix of a `model.base` naming a lineage's promoted version.
pub const LATEST_EXPORT: &str = "latest-export:";

/// What a job starts from (`model.base`). Written in a config as `"init"`, a Hugging Face
/// Llama directory (a path or a `file://`/`s3://` URL), or `latest-export:<export.url>/<name>`
/// (the version that lineage promoted last). It reads and writes as that same string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BaseModel {
    /// Random weights of the `[model]` architecture.
    #[default]
    Init,
    /// A Hugging Face Llama directory (`config.json`, `model.safetensors`, tokenizer files),
    /// as written.
    Dir(String),
    /// The promoted version of the lineage at this location (`<export.url>/<name>`), as
    /// written.
    LatestExport(String),
}

impl BaseModel {
    /// Parses the config's string (never fails: anything but `init` and `latest-export:…` is
    /// a directory, checked where it is read).
    pub fn parse(s: &str) -> BaseModel {
        if s == "init" {
            BaseModel::Init
        } else if let Some(lineage) = s.strip_prefix(LATEST_EXPORT) {
            BaseModel::LatestExport(lineage.to_string())
        } else {
            BaseModel::Dir(s.to_string())
        }
    }

    /// Where it is read, as written (the directory, or the lineage); `None` for `init`.
    pub fn location(&self) -> Option<&str> {
        match self {
            BaseModel::Init => None,
            BaseModel::Dir(s) | BaseModel::LatestExport(s) => Some(s),
        }
    }

    /// [`BaseModel::location`] as a URL: a plain path becomes `file://PATH`, a trailing `/`
    /// goes. Relative `file://` URLs stay relative (the caller resolves them).
    pub fn url(&self) -> Option<String> {
        self.location().map(as_url)
    }

    /// The same base with its location replaced by `f(location)` (e.g. resolved against a
    /// working directory).
    pub fn map_location(&self, f: impl FnOnce(&str) -> String) -> BaseModel {
        match self {
            BaseModel::Init => BaseModel::Init,
            BaseModel::Dir(s) => BaseModel::Dir(f(s)),
            BaseModel::LatestExport(s) => BaseModel::LatestExport(f(s)),
        }
    }
}

/// A directory path or URL as a URL: `file://` for a plain path, no trailing `/`.
pub fn as_url(location: &str) -> String {
    let l = location.trim_end_matches('/');
    if l.contains("://") {
        l.to_string()
    } else {
        format!("file://{l}")
    }
}

impl std::fmt::Display for BaseModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BaseModel::Init => f.write_str("init"),
            BaseModel::Dir(s) => f.write_str(s),
            BaseModel::LatestExport(s) => write!(f, "{LATEST_EXPORT}{s}"),
        }
    }
}

impl Serialize for BaseModel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BaseModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<BaseModel, D::Error> {
        String::deserialize(d).map(|s| BaseModel::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_reads_and_writes_as_written() {
        for (text, want) in [
            ("init", BaseModel::Init),
            ("/models/llama", BaseModel::Dir("/models/llama".into())),
            ("s3://b/llama/", BaseModel::Dir("s3://b/llama/".into())),
            (
                "latest-export:file://runs/export/nightly",
                BaseModel::LatestExport("file://runs/export/nightly".into()),
            ),
        ] {
            let parsed = BaseModel::parse(text);
            assert_eq!(parsed, want);
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn locations_become_urls() {
        assert_eq!(BaseModel::Init.url(), None);
        assert_eq!(
            BaseModel::parse("/models/llama/").url().as_deref(),
            Some("file:///models/llama")
        );
        assert_eq!(
            BaseModel::parse("latest-export:s3://b/e/n")
                .url()
                .as_deref(),
            Some("s3://b/e/n")
        );
    }
}
