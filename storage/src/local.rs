//! Checkpoint directories on a local (or NFS) filesystem, read without ever following a
//! symbolic link. lockstep writes none: a link in a checkpoint tree was put there by hand, and
//! following it would let `gc` delete (or `verify` read, or a listing loop through) files
//! outside the tree. A step directory that is a link or holds one is listed with its links, is
//! never a usable checkpoint, and `gc` removes the links themselves.

use std::io;
use std::path::{Path, PathBuf};

use crate::layout::{MANIFEST_FILE, parse_step_dir};
use crate::{Error, Result};

/// Runs `f` on `path` on the blocking pool; an I/O error is [`Error::Io`] naming `op` and
/// `path`.
pub(crate) async fn blocking<T: Send + 'static>(
    op: &'static str,
    path: PathBuf,
    f: impl FnOnce(&Path) -> io::Result<T> + Send + 'static,
) -> Result<T> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || f(&p))
        .await?
        .map_err(|source| Error::Io { op, path, source })
}

/// One step directory as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalStep {
    pub step: u64,
    /// Its manifest is there (a plain file).
    pub manifest: bool,
    /// Plain files in it.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Symbolic links: the directory itself, or entries in it.
    pub links: Vec<PathBuf>,
}

/// Whether a file name is a finished object (object_store's local store stages uploads as
/// `NAME#DIGITS` and renames them when done).
fn is_object(name: &str) -> bool {
    match name.split_once('#') {
        Some((_, suffix)) if !suffix.is_empty() => !suffix.bytes().all(|b| b.is_ascii_digit()),
        _ => true,
    }
}

/// Every step directory under `root`, ascending; none when `root` does not exist.
pub(crate) fn list_steps(root: &Path) -> io::Result<Vec<LocalStep>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(step) = entry.file_name().to_str().and_then(parse_step_dir) else {
            continue;
        };
        // The entry's own type: a link is not followed.
        let kind = entry.file_type()?;
        let mut s = LocalStep {
            step,
            manifest: false,
            files: 0,
            bytes: 0,
            links: Vec::new(),
        };
        if kind.is_symlink() {
            s.links.push(entry.path());
        } else if kind.is_dir() {
            scan_step(&entry.path(), &mut s)?;
        } else {
            continue;
        }
        steps.push(s);
    }
    steps.sort_by_key(|s| s.step);
    Ok(steps)
}

fn scan_step(dir: &Path, s: &mut LocalStep) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            s.links.push(entry.path());
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if kind.is_file() && is_object(name) {
            s.files += 1;
            // Of the entry itself (DirEntry::metadata does not traverse links).
            s.bytes += entry.metadata()?.len();
            s.manifest |= name == MANIFEST_FILE;
        }
    }
    Ok(())
}

/// The symbolic links that are `dir` or directly in it.
pub(crate) fn links_in(dir: &Path) -> io::Result<Vec<PathBuf>> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => return Ok(vec![dir.to_path_buf()]),
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(Vec::new()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let mut links = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_symlink() {
            links.push(entry.path());
        }
    }
    Ok(links)
}

/// Removes a step directory: its manifest first (so that a removal cut short never leaves a
/// committed step with files missing), then the rest. A link is removed, never followed.
pub(crate) fn remove_step(dir: &Path) -> io::Result<()> {
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return gone(std::fs::remove_file(dir));
    }
    gone(std::fs::remove_file(dir.join(MANIFEST_FILE)))?;
    gone(std::fs::remove_dir_all(dir))
}

/// Removes symbolic links themselves (never what they point to).
pub(crate) fn remove_links(links: &[PathBuf]) -> io::Result<()> {
    for l in links {
        if std::fs::symlink_metadata(l).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(l)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_listed_never_followed_and_removed_alone() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("ckpt");
        let kept = root.join("step-000000000005");
        std::fs::create_dir_all(&kept).unwrap();
        std::fs::write(kept.join(MANIFEST_FILE), b"{}").unwrap();
        std::fs::write(kept.join("rank-00000.shard"), b"12345").unwrap();
        std::fs::write(kept.join("rank-00001.shard#3"), b"staged").unwrap();
        // A link to the kept step, and a loop inside it.
        std::os::unix::fs::symlink(&kept, root.join("step-000000000010")).unwrap();
        std::os::unix::fs::symlink("..", kept.join("up")).unwrap();
        let steps = list_steps(&root).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(
            (
                steps[0].step,
                steps[0].manifest,
                steps[0].files,
                steps[0].bytes
            ),
            (5, true, 2, 7)
        );
        assert_eq!(steps[0].links, vec![kept.join("up")]);
        assert_eq!(steps[1].links, vec![root.join("step-000000000010")]);
        assert!(!steps[1].manifest);
        assert_eq!(links_in(&root.join("step-000000000010")).unwrap().len(), 1);
        // Removing the linked step removes the link; the kept step's files stay.
        remove_step(&root.join("step-000000000010")).unwrap();
        remove_links(&steps[0].links).unwrap();
        assert!(kept.join("rank-00000.shard").is_file());
        assert!(kept.join(MANIFEST_FILE).is_file());
        let steps = list_steps(&root).unwrap();
        assert_eq!(steps.len(), 1);
        assert!(steps[0].links.is_empty());
        assert_eq!(list_steps(&d.path().join("none")).unwrap(), Vec::new());
    }
}
