//! Files only this user can read: the data dir is 0700, and the job store, admin token, job
//! configs and worker logs in it are 0600 (they hold tokens, configs and whatever a worker
//! prints). Blocking: call on the blocking pool.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) as 0700. An existing directory keeps its mode (it may be
/// shared, like /tmp); one others can read gets a warning.
pub fn dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(dir) {
        if meta.mode() & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(),
                "this directory is readable by other users; its files are kept 0600");
        }
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Creates (or truncates) `path` as a 0600 file for writing, its directory 0700.
pub fn create(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        self::dir(parent)?;
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode under `open`; tighten it.
    f.set_permissions(Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Writes `bytes` to `path` atomically (a 0600 temporary file, fsynced, renamed over `path`,
/// the directory fsynced): a crash leaves the old file or the new one, never a torn or empty
/// one.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    self::dir(parent)?;
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(parent)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes an existing file 0600.
pub fn restrict(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").mode() & 0o777
    }

    #[test]
    fn files_and_dirs_are_private_and_writes_atomic() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("data");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).expect("chmod");
        let token = d.join("admin.token");
        write(&token, b"secret\n").expect("write");
        assert_eq!(
            mode(&d),
            0o755,
            "an existing (maybe shared) dir keeps its mode"
        );
        assert_eq!(mode(&token), 0o600);
        write(&token, b"second\n").expect("rewrite");
        assert_eq!(std::fs::read(&token).expect("read"), b"second\n");
        let names: Vec<_> = std::fs::read_dir(&d)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        let log = d.join("jobs/j/attempt-1/rank-0.log");
        create(&log).expect("log");
        assert_eq!(mode(&log), 0o600);
        assert_eq!(mode(log.parent().expect("parent")), 0o700);
    }
}
