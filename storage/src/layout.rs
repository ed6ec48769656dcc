//! The names in a checkpoint root: `step-NNNNNNNNNNNN/` directories, each committed once its
//! manifest is there.

/// Name of the commit marker in a step directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The step a directory name stands for (`step-` and digits only).
pub(crate) fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
