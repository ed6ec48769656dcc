//! `lockstep ckpt`: list, inspect, verify and garbage-collect checkpoints.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;
use lockstep_storage::{CheckpointStore, RetentionPolicy, StrayKind};

use super::{CliError, Result};

/// Inspect, verify and garbage-collect checkpoints.
#[derive(Debug, Subcommand)]
pub enum CkptCommand {
    /// List the checkpoints under URL: committed ones, uncommitted debris, and step directories
    /// that are or hold a symbolic link or special file (never followed or opened; not usable
    /// until removed).
    Ls {
        /// Checkpoint root, e.g. file://runs/quickstart/checkpoints or s3://bucket/job/checkpoints.
        url: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a checkpoint's manifest: shards, tensors, dtypes, sizes and compression ratios.
    Inspect {
        /// URL[@STEP]; without @STEP (or with @latest) the newest committed checkpoint.
        target: String,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every file size, footer, chunk hash and tensor hash of a checkpoint. Exits 0 only
    /// when everything checks; 1 when something is corrupt (each problem names its file and
    /// chunk); 2 when the checkpoint cannot be read at all.
    Verify {
        /// URL[@STEP]; without @STEP (or with @latest) the newest committed checkpoint.
        target: String,
        /// Verify every committed checkpoint instead of one.
        #[arg(long)]
        all: bool,
    },
    /// Delete committed checkpoints outside the retention policy, and uncommitted debris older
    /// than the newest commit.
    ///
    /// Counts only checkpoints that verify, with the rules resume uses: every checkpoint it
    /// would keep is verified first (read in full), and one that does not verify is kept but
    /// not counted, so --keep-last verified checkpoints remain beside it; when none verifies,
    /// nothing is deleted. The newest verified checkpoint and --protect steps are never
    /// deleted. Symbolic links and special files (FIFOs, sockets, devices) that are or are
    /// directly in a step directory, and a `set-aside` that is one, are removed themselves
    /// (lockstep makes none): a link is never followed, what it points to is not touched. A regular file where a checkpoint directory
    /// belongs is reported and left. Nothing outside the checkpoint tree is ever deleted.
    Gc {
        /// Checkpoint root.
        url: String,
        /// Keep this many of the newest checkpoints.
        #[arg(long)]
        keep_last: usize,
        /// Also keep every step divisible by this.
        #[arg(long)]
        keep_every: Option<u64>,
        /// Never delete this step (repeatable), e.g. one a running job resumed from.
        #[arg(long = "protect", value_name = "STEP")]
        protect: Vec<u64>,
        /// Show what would be deleted without deleting.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs one subcommand, its report on stdout. Exit status 0 when all is well, 1 when `verify`
/// found corruption, 2 when the checkpoint cannot be read at all.
pub fn run(cmd: CkptCommand) -> ExitCode {
    super::block_on(2, async move {
        report(cmd, &mut std::io::stdout().lock()).await
    })
}

/// Runs one subcommand, writing its report to `out`.
async fn report(cmd: CkptCommand, out: &mut impl Write) -> Result<ExitCode> {
    match cmd {
        CkptCommand::Ls { url, json } => ls(&url, json, out).await,
        CkptCommand::Inspect { target, json } => inspect(&target, json, out).await,
        CkptCommand::Verify { target, all } => verify(&target, all, out).await,
        CkptCommand::Gc {
            url,
            keep_last,
            keep_every,
            protect,
            dry_run,
        } => {
            let policy = RetentionPolicy {
                keep_last,
                keep_every,
            };
            gc(&url, &policy, &protect, dry_run, out).await
        }
    }
}

/// `URL[@STEP]` (storage's one parser), a bad step being a usage error.
fn split_target(target: &str) -> Result<(&str, Option<u64>)> {
    lockstep_storage::store::split_target(target).map_err(|e| CliError::Usage(e.to_string()))
}

async fn resolve(target: &str) -> Result<(CheckpointStore, u64)> {
    let (url, step) = split_target(target)?;
    let store = CheckpointStore::open_existing(url)?;
    // The newest committed step; a link or special file in another step does not stand in
    // the way of reading this one (resume is stricter: it refuses the whole tree).
    let newest = || async {
        let all = store.list_all().await?;
        Ok::<_, CliError>(all.iter().rev().find(|s| s.committed).map(|s| s.step))
    };
    let step = match step {
        Some(s) => s,
        None => match newest().await? {
            Some(s) => s,
            None => {
                return Err(CliError::Usage(format!(
                    "no committed checkpoint under `{url}`"
                )));
            }
        },
    };
    Ok((store, step))
}

async fn ls(url: &str, json: bool, out: &mut impl Write) -> Result<ExitCode> {
    let store = CheckpointStore::open_existing(url)?;
    let steps = store.list_all().await?;
    if json {
        let rows: Vec<_> = steps
            .iter()
            .map(|s| {
                let strays: Vec<_> = s
                    .strays
                    .iter()
                    .map(|x| serde_json::json!({"path": x.path, "kind": x.kind.describe()}))
                    .collect();
                serde_json::json!({"step": s.step, "committed": s.committed, "files": s.files, "bytes": s.bytes, "strays": strays})
            })
            .collect();
        let text = serde_json::to_string_pretty(&rows)
            .map_err(|e| CliError::Usage(format!("render the listing: {e}")))?;
        writeln!(out, "{text}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let aside = store.set_aside_stray().await?;
    if let Some(x) = &aside {
        writeln!(
            out,
            "set-aside: {x}: resume will not set checkpoints aside through it ({})",
            if x.kind.removable() {
                "`lockstep ckpt gc` removes it"
            } else {
                "move it aside"
            }
        )?;
    }
    if steps.is_empty() {
        writeln!(out, "no checkpoints under {}", store.url())?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:>14}  {:<11}  {:>5}  {:>10}",
        "STEP", "STATE", "FILES", "SIZE"
    )?;
    for s in &steps {
        let state = if let Some(x) = s.strays.first() {
            match x.kind {
                StrayKind::Link => "symlink",
                StrayKind::File => "not a dir",
                _ => "special",
            }
        } else if s.committed {
            "committed"
        } else {
            "uncommitted"
        };
        writeln!(
            out,
            "{:>14}  {:<11}  {:>5}  {:>10}",
            s.step,
            state,
            s.files,
            human_bytes(s.bytes)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What `ckpt inspect` lists at most, line by line (`--json` gives everything).
const SHOWN_SHARDS: usize = 64;
const SHOWN_TENSORS: usize = 1000;
const SHOWN_STATE_CHARS: usize = 4000;

async fn inspect(target: &str, json: bool, out: &mut impl Write) -> Result<ExitCode> {
    let (store, step) = resolve(target).await?;
    let m = store.manifest(step).await?;
    if json {
        writeln!(out, "{}", String::from_utf8_lossy(&m.to_json()))?;
        return Ok(ExitCode::SUCCESS);
    }
    // Stored bytes per tensor, from the shards' chunk indexes (no chunk data is read). A
    // manifest of many shards is summarised: the first SHOWN_SHARDS are read and listed, and
    // per-tensor ratios (which need every index) are left out.
    let every_shard = m.shards.len() <= SHOWN_SHARDS;
    let mut stored = vec![0u64; m.tensors.len()];
    let mut shard_rows = Vec::new();
    for info in m.shards.iter().take(SHOWN_SHARDS) {
        let footer = store.read_index(step, info).await?;
        let mut codecs = std::collections::BTreeMap::<&'static str, u64>::new();
        for c in &footer.chunks {
            *codecs.entry(c.codec.name()).or_default() += 1;
        }
        for (ti, t) in m.tensors.iter().enumerate() {
            for p in t.pieces.iter().filter(|p| p.shard == info.rank) {
                let end = p.offset + p.length;
                stored[ti] += footer
                    .chunks
                    .iter()
                    .filter(|c| c.raw_offset >= p.offset && c.raw_offset + c.raw_len <= end)
                    .map(|c| c.len)
                    .sum::<u64>();
            }
        }
        shard_rows.push((info.clone(), codecs));
    }
    writeln!(out, "checkpoint {}@{step}", store.url())?;
    writeln!(
        out,
        "job {}  world size {}  config {}  parent {}  committed {} (unix ms)",
        m.job,
        m.world_size,
        m.config_hash,
        m.parent.map_or("-".to_string(), |p| p.to_string()),
        m.created_unix_ms
    )?;
    writeln!(out, "\nshards")?;
    writeln!(
        out,
        "  {:>4}  {:<18}  {:>10}  {:>10}  {:>6}  {:>6}  codecs",
        "RANK", "FILE", "STORED", "RAW", "RATIO", "CHUNKS"
    )?;
    for (s, codecs) in &shard_rows {
        let codecs: Vec<String> = codecs.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        writeln!(
            out,
            "  {:>4}  {:<18}  {:>10}  {:>10}  {:>6}  {:>6}  {}",
            s.rank,
            s.file,
            human_bytes(s.bytes),
            human_bytes(s.raw_bytes),
            ratio(s.bytes, s.raw_bytes),
            s.chunks,
            codecs.join(" ")
        )?;
    }
    if !every_shard {
        let rest = &m.shards[SHOWN_SHARDS..];
        writeln!(
            out,
            "  … and {} more shards: {} stored, {} raw (--json lists them all)",
            rest.len(),
            human_bytes(rest.iter().map(|s| s.bytes).sum()),
            human_bytes(rest.iter().map(|s| s.raw_bytes).sum()),
        )?;
    }
    writeln!(out, "\ntensors ({})", m.tensors.len())?;
    writeln!(
        out,
        "  {:<40}  {:<5}  {:<18}  {:>10}  {:>6}  {:>6}",
        "NAME", "DTYPE", "SHAPE", "RAW", "RATIO", "PIECES"
    )?;
    for (t, stored) in m.tensors.iter().zip(&stored).take(SHOWN_TENSORS) {
        let raw = t.nbytes().unwrap_or_default();
        writeln!(
            out,
            "  {:<40}  {:<5}  {:<18}  {:>10}  {:>6}  {:>6}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            human_bytes(raw),
            if every_shard {
                ratio(*stored, raw)
            } else {
                "-".into()
            },
            t.pieces.len()
        )?;
    }
    if m.tensors.len() > SHOWN_TENSORS {
        writeln!(
            out,
            "  … and {} more tensors (--json lists them all)",
            m.tensors.len() - SHOWN_TENSORS
        )?;
    }
    let (total_stored, total_raw): (u64, u64) = m
        .shards
        .iter()
        .fold((0, 0), |(a, b), s| (a + s.bytes, b + s.raw_bytes));
    writeln!(
        out,
        "\ntotal  stored {}  raw {}  ratio {}",
        human_bytes(total_stored),
        human_bytes(total_raw),
        ratio(total_stored, total_raw)
    )?;
    let state = m.trainer_state.to_string();
    match state.char_indices().nth(SHOWN_STATE_CHARS) {
        None => writeln!(out, "trainer state  {state}")?,
        Some((cut, _)) => writeln!(
            out,
            "trainer state  {}… ({} bytes; --json shows it all)",
            &state[..cut],
            state.len()
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(target: &str, all: bool, out: &mut impl Write) -> Result<ExitCode> {
    let (store, steps) = if all {
        let (url, step) = split_target(target)?;
        if step.is_some() {
            return Err(CliError::Usage(format!(
                "--all verifies every checkpoint; drop the @STEP from `{target}`"
            )));
        }
        let store = CheckpointStore::open_existing(url)?;
        let steps = store.list().await?;
        if steps.is_empty() {
            return Err(CliError::Usage(format!(
                "no committed checkpoint under `{url}`"
            )));
        }
        (store, steps)
    } else {
        let (store, step) = resolve(target).await?;
        (store, vec![step])
    };
    let mut failed = false;
    for step in steps {
        let started = std::time::Instant::now();
        let report = store.verify(step).await?;
        if report.is_ok() {
            writeln!(
                out,
                "OK    {}@{step}: {} shards, {} chunks, {} stored, {} raw verified in {:.2}s",
                store.url(),
                report.shards,
                report.chunks,
                human_bytes(report.stored_bytes),
                human_bytes(report.raw_bytes),
                started.elapsed().as_secs_f64()
            )?;
        } else {
            failed = true;
            writeln!(
                out,
                "FAIL  {}@{step}: {} problem(s)",
                store.url(),
                report.problems.len()
            )?;
            for p in &report.problems {
                writeln!(out, "  {p}")?;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn gc(
    url: &str,
    policy: &RetentionPolicy,
    protect: &[u64],
    dry_run: bool,
    out: &mut impl Write,
) -> Result<ExitCode> {
    let store = CheckpointStore::open_existing(url)?;
    let report = store.gc(policy, protect, dry_run).await?;
    let verb = if dry_run { "would delete" } else { "deleted" };
    for (step, reason) in &report.kept {
        let unchecked = if report.unchecked.contains(step) {
            "; holds links or special files, verified once gc removes them"
        } else {
            ""
        };
        writeln!(out, "keep          {step:>14}  ({reason:?}{unchecked})")?;
    }
    for step in &report.deleted {
        writeln!(out, "{verb:<12}  {step:>14}")?;
    }
    for step in &report.debris {
        writeln!(out, "{verb:<12}  {step:>14}  (uncommitted debris)")?;
    }
    for (step, why) in &report.unverified {
        writeln!(
            out,
            "keep          {step:>14}  (does not verify, not counted: {why})"
        )?;
    }
    let unlink = if dry_run { "would remove" } else { "removed" };
    let mut removed = 0;
    for x in &report.strays {
        if x.kind.removable() {
            removed += 1;
            writeln!(
                out,
                "{unlink} {x}: lockstep writes none (not followed or opened)"
            )?;
        } else {
            writeln!(
                out,
                "left         {x}: not lockstep's, not removed (move it aside)"
            )?;
        }
    }
    writeln!(
        out,
        "{} checkpoint(s) kept, {} {verb}, {} debris director(ies) {verb}, {} not verifying \
         (kept), {removed} link(s) or special file(s) {unlink}",
        report.kept.len(),
        report.deleted.len(),
        report.debris.len(),
        report.unverified.len(),
    )?;
    Ok(ExitCode::SUCCESS)
}

fn ratio(stored: u64, raw: u64) -> String {
    if raw == 0 {
        "-".into()
    } else {
        format!("{:.3}", stored as f64 / raw as f64)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
