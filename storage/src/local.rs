//! Checkpoint directories on a local (or NFS) filesystem, read without ever following a
//! symbolic link or opening a special file. lockstep writes neither: a link in a checkpoint
//! tree was put there by hand, and following it would let `gc` delete (or `verify` read, or a
//! listing loop through) files outside the tree; a FIFO would hang whoever opens it. A step
//! directory that is or holds one is listed with these *strays*, is never a usable checkpoint,
//! and `gc` removes the strays themselves (a link, never what it points to).

use std::fs::FileType;
use std::io;
use std::os::unix::fs::FileTypeExt;
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

/// What an entry lockstep never writes into a checkpoint tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrayKind {
    /// A symbolic link (never followed).
    Link,
    /// A FIFO (never opened: the open would wait for a writer).
    Fifo,
    /// A Unix socket.
    Socket,
    /// A block or character device file.
    Device,
    /// A regular file where a step directory belongs (not removed by `gc`: it is not
    /// lockstep's).
    File,
}

impl StrayKind {
    /// Of an entry's own type (links not followed); `None` for a directory or a regular file.
    pub(crate) fn of(kind: FileType) -> Option<Self> {
        if kind.is_symlink() {
            Some(Self::Link)
        } else if kind.is_fifo() {
            Some(Self::Fifo)
        } else if kind.is_socket() {
            Some(Self::Socket)
        } else if kind.is_block_device() || kind.is_char_device() {
            Some(Self::Device)
        } else {
            None
        }
    }

    /// In words, with its article ("a symbolic link").
    pub fn describe(self) -> &'static str {
        match self {
            Self::Link => "a symbolic link",
            Self::Fifo => "a FIFO",
            Self::Socket => "a socket",
            Self::Device => "a device file",
            Self::File => "a regular file where lockstep keeps a directory",
        }
    }

    /// Whether `gc` removes it: links and special files hold no data (removing a link leaves
    /// its target alone); a regular file is somebody's and stays.
    pub fn removable(self) -> bool {
        self != Self::File
    }
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
    /// Links and special files: the directory itself, or entries in it.
    pub strays: Vec<(PathBuf, StrayKind)>,
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
            strays: Vec::new(),
        };
        if kind.is_dir() {
            scan_step(&entry.path(), &mut s)?;
        } else {
            let stray = StrayKind::of(kind).unwrap_or(StrayKind::File);
            s.strays.push((entry.path(), stray));
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
        if let Some(stray) = StrayKind::of(kind) {
            s.strays.push((entry.path(), stray));
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

/// The strays that are `dir` or directly in it (a regular file that is `dir` included).
pub(crate) fn strays_in(dir: &Path) -> io::Result<Vec<(PathBuf, StrayKind)>> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => {
            let kind = StrayKind::of(m.file_type()).unwrap_or(StrayKind::File);
            return Ok(vec![(dir.to_path_buf(), kind)]);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let mut strays = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(kind) = StrayKind::of(entry.file_type()?) {
            strays.push((entry.path(), kind));
        }
    }
    Ok(strays)
}

/// `dir` when it is there but is not a directory (a link, a special file, a file).
pub(crate) fn not_a_dir(dir: &Path) -> io::Result<Option<StrayKind>> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(None),
        Ok(m) => Ok(Some(
            StrayKind::of(m.file_type()).unwrap_or(StrayKind::File),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a step directory: its manifest first (so that a removal cut short never leaves a
/// committed step with files missing), then the rest. A link or special file there is
/// removed itself (a link never followed); a regular file there is not lockstep's and stays.
pub(crate) fn remove_step(dir: &Path) -> io::Result<()> {
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    if let Some(kind) = not_a_dir(dir)? {
        return if kind.removable() {
            gone(std::fs::remove_file(dir))
        } else {
            Ok(())
        };
    }
    gone(std::fs::remove_file(dir.join(MANIFEST_FILE)))?;
    gone(std::fs::remove_dir_all(dir))
}

/// Removes links and special files themselves (never what a link points to); regular files
/// and directories are left alone, whatever `strays` says (it may be stale).
pub(crate) fn remove_strays(strays: &[PathBuf]) -> io::Result<()> {
    for l in strays {
        let removable = std::fs::symlink_metadata(l)
            .ok()
            .and_then(|m| StrayKind::of(m.file_type()))
            .is_some_and(StrayKind::removable);
        if removable {
            match std::fs::remove_file(l) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => r?,
            }
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
        assert_eq!(steps[0].strays, vec![(kept.join("up"), StrayKind::Link)]);
        assert_eq!(
            steps[1].strays,
            vec![(root.join("step-000000000010"), StrayKind::Link)]
        );
        assert!(!steps[1].manifest);
        assert_eq!(strays_in(&root.join("step-000000000010")).unwrap().len(), 1);
        // Removing the linked step removes the link; the kept step's files stay.
        remove_step(&root.join("step-000000000010")).unwrap();
        let paths: Vec<PathBuf> = steps[0].strays.iter().map(|s| s.0.clone()).collect();
        remove_strays(&paths).unwrap();
        assert!(kept.join("rank-00000.shard").is_file());
        assert!(kept.join(MANIFEST_FILE).is_file());
        let steps = list_steps(&root).unwrap();
        assert_eq!(steps.len(), 1);
        assert!(steps[0].strays.is_empty());
        // A regular file where a step belongs is listed, and neither removal takes it.
        let file = root.join("step-000000000020");
        std::fs::write(&file, b"notes").unwrap();
        let steps = list_steps(&root).unwrap();
        assert_eq!(steps[1].strays, vec![(file.clone(), StrayKind::File)]);
        remove_step(&file).unwrap();
        remove_strays(std::slice::from_ref(&file)).unwrap();
        assert!(file.is_file());
        assert_eq!(list_steps(&d.path().join("none")).unwrap(), Vec::new());
    }
}
