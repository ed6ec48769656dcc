//! Job configs for tests and benchmarks (feature `testing`): one builder instead of a TOML
//! template copied into every test file.
//! For example `TestJob::tiny("e2e").world(2).steps(300).set("job.gang_timeout", "\"30s\"")`.

use crate::config::{ConfigError, JobConfig, apply_override};

/// The quickstart's training data in this source tree (4,000 records).
pub const QUICKSTART_DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../configs/data/quickstart.jsonl"
);

/// A job config under construction: a base TOML plus `section.key=value` overrides, applied
/// with the same rules as `--set`.
#[derive(Debug, Clone)]
pub struct TestJob {
    base: String,
    overrides: Vec<String>,
}

impl TestJob {
    /// A tiny model (hidden 32, 2 layers, 4 heads, 2 KV heads, intermediate 64, byte vocabulary)
    /// on the quickstart data, seq_len 32, batch 2, lr 1e-3 with 2 warmup steps, 8 steps, at
    /// world size 1, checkpoints at `file://ckpt` (relative to the working directory) every 4
    /// steps, keeping 10. Fast enough for debug-build tests.
    pub fn tiny(name: &str) -> TestJob {
        let data = std::path::Path::new(QUICKSTART_DATA);
        // Resolve `..` so the URL is a plain absolute path.
        let data = data.canonicalize().unwrap_or_else(|_| data.to_path_buf());
        let base = format!(
            r#"[job]
name = "{name}"
[model]
hidden_size = 32
num_layers = 2
num_heads = 4
num_kv_heads = 2
intermediate_size = 64
[data]
train = ["file://{}"]
seq_len = 32
[train]
steps = 8
batch_size = 2
lr = 1e-3
warmup_steps = 2
[checkpoint]
url = "file://ckpt"
every_steps = 4
keep_last = 10
"#,
            data.display()
        );
        TestJob {
            base,
            overrides: Vec::new(),
        }
    }

    /// A job that cannot train (its data does not exist), for coordinator tests whose workers
    /// are simulated: `memory://` checkpoints, `world` ranks, 10 steps.
    pub fn simulated(name: &str, world: u32) -> TestJob {
        let base = format!(
            "[job]\nname = \"{name}\"\nworld_size = {world}\n[model]\n[data]\n\
             train = [\"file:///nowhere.jsonl\"]\n[train]\nsteps = 10\n[checkpoint]\n\
             url = \"memory://\"\n"
        );
        TestJob {
            base,
            overrides: Vec::new(),
        }
    }

    /// Sets `key` (dotted, e.g. `job.gang_timeout`) to `value` in TOML syntax (or a bare
    /// string), as `--set key=value` would.
    #[must_use]
    pub fn set(mut self, key: &str, value: impl std::fmt::Display) -> TestJob {
        self.overrides.push(format!("{key}={value}"));
        self
    }

    /// `job.world_size`.
    #[must_use]
    pub fn world(self, ranks: u32) -> TestJob {
        self.set("job.world_size", ranks)
    }

    /// `train.steps`.
    #[must_use]
    pub fn steps(self, steps: u64) -> TestJob {
        self.set("train.steps", steps)
    }

    /// `train.batch_size` (per rank).
    #[must_use]
    pub fn batch(self, batch: u32) -> TestJob {
        self.set("train.batch_size", batch)
    }

    /// `checkpoint.url`.
    #[must_use]
    pub fn checkpoint_url(self, url: &str) -> TestJob {
        self.set("checkpoint.url", format!("\"{url}\""))
    }

    /// The TOML text, overrides applied.
    ///
    /// # Panics
    /// When an override cannot be applied (a bug in the test).
    pub fn toml(&self) -> String {
        let doc = self.table().unwrap_or_else(|e| panic!("TestJob: {e}"));
        toml::to_string(&doc).unwrap_or_else(|e| panic!("TestJob: {e}"))
    }

    /// Writes the TOML to `dir/job.toml` and returns that path.
    ///
    /// # Panics
    /// When the file cannot be written (a broken test environment).
    pub fn write_to(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("job.toml");
        std::fs::write(&path, self.toml())
            .unwrap_or_else(|e| panic!("TestJob: write {}: {e}", path.display()));
        path
    }

    /// The validated config.
    pub fn config(&self) -> Result<JobConfig, ConfigError> {
        JobConfig::parse(&self.base, &self.overrides)
    }

    fn table(&self) -> Result<toml::Table, ConfigError> {
        let mut doc: toml::Table = toml::from_str(&self.base)?;
        for o in &self.overrides {
            apply_override(&mut doc, o)?;
        }
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_produce_valid_configs() {
        let c = TestJob::tiny("t")
            .world(2)
            .steps(30)
            .set("job.gang_timeout", "\"5s\"")
            .config()
            .expect("valid");
        assert_eq!(c.job.world_size, 2);
        assert_eq!(c.train.steps, 30);
        assert_eq!(c.job.gang_timeout, std::time::Duration::from_secs(5));
        let text = TestJob::tiny("t").world(2).toml();
        assert_eq!(
            JobConfig::parse(&text, &[]).expect("parses").job.world_size,
            2
        );
        assert!(TestJob::simulated("s", 3).config().is_ok());
    }
}
