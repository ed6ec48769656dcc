//! Opening local files that may be hostile: a FIFO nobody writes to must not hang the open,
//! and a file that never ends (`/dev/zero`) must not fill memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` with `opts` without waiting on a FIFO (`O_NONBLOCK`), and without following a
/// symbolic link when `follow` is false (one there is an error). Anything but a regular file
/// is refused, naming what it is. The descriptor is returned in blocking mode.
pub fn open_regular(path: &Path, opts: &mut OpenOptions, follow: bool) -> io::Result<File> {
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let f = opts
        .custom_flags(nofollow | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            // The raw errors of these two cases say nothing a user can act on.
            let what = match e.raw_os_error() {
                Some(libc::ELOOP) if !follow => "a symbolic link (not followed here)",
                Some(libc::ENXIO) => "a FIFO or socket",
                _ => return e,
            };
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is {what}, not a regular file", path.display()),
            )
        })?;
    let kind = f.metadata()?.file_type();
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is {}, not a regular file",
                path.display(),
                describe(kind)
            ),
        ));
    }
    blocking(&f)?;
    Ok(f)
}

/// Reads at most `max + 1` bytes of `path` (so a caller sees a file over `max` by its length)
/// following links. A regular file, or a pipe that a writer feeds (`<(…)`); the open never
/// waits for a writer, and a FIFO without one reads as empty.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    blocking(&f)?;
    let mut bytes = Vec::new();
    f.take(max + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether `path` is a FIFO (a pipe): an empty read from one means nobody wrote to it.
pub fn is_pipe(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// What a file that is not a regular file is, in words ("a FIFO").
pub(crate) fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device file"
    } else {
        "something else"
    }
}

/// Clears `O_NONBLOCK` on `f`.
fn blocking(f: &File) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL)?);
    fcntl(f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_are_refused_or_read_empty_without_waiting() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(ok.success());
        let e = open_regular(&fifo, OpenOptions::new().read(true), false).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        // Opened for writing with no reader: named too, not "No such device or address".
        let e = open_regular(&fifo, OpenOptions::new().write(true), false).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        assert!(read_bounded(&fifo, 10).unwrap().is_empty());
        assert!(is_pipe(&fifo));
        let file = d.path().join("f");
        std::fs::write(&file, b"0123456789abc").unwrap();
        assert_eq!(read_bounded(&file, 4).unwrap(), b"01234");
        let link = d.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let e = open_regular(&link, OpenOptions::new().read(true), false).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert!(open_regular(&link, OpenOptions::new().read(true), true).is_ok());
    }
}
