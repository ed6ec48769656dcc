//! The names in a checkpoint root: `step-NNNNNNNNNNNN/` directories, each committed once its
//! manifest is there.

/// Name of the commit marker in a step directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The step a directory name stands for: exactly as lockstep writes it (`step-` and the step
/// in at least 12 digits), so that the directory listed is the one deleted or read (`step-35`
/// is not step 35's).
pub(crate) fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (format!("step-{step:012}") == name).then_some(step)
}
