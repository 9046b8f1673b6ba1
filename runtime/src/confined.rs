//! Reading a file that a tenant controls (a container's root filesystem,
//! the virtio-fs share) without trusting it.
//!
//! A container may replace any file of its own root filesystem: with a
//! FIFO (an open would block the reader forever), a device node (`/dev/zero`
//! never ends), or a symlink to a host path (absolute symlinks resolve
//! against the host's root when the host follows them). So the file is
//! opened with `openat2` below a directory fd of the root:
//! `RESOLVE_IN_ROOT` keeps every `..` and absolute symlink inside it,
//! `RESOLVE_NO_MAGICLINKS` refuses `/proc/*/fd`-style links,
//! `RESOLVE_NO_XDEV` stays on the root's mount, `O_NOFOLLOW` refuses a
//! symlink as the last component, and `O_NONBLOCK` makes opening a FIFO
//! return at once. Only a regular file is read, and at most `max` bytes.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a confined read gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum ConfinedError {
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: String, max: u64 },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

/// The kernel's `struct open_how` (linux/openat2.h); libc's is
/// non-exhaustive and cannot be built outside it.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Reads `path` (relative to `root`, or absolute as seen from inside it)
/// as described in the module docs.
pub fn read_in_root(root: &Path, path: &Path, max: u64) -> Result<Vec<u8>, ConfinedError> {
    let shown = path.display().to_string();
    let io_err = |source: io::Error| ConfinedError::Io {
        path: shown.clone(),
        source,
    };
    let dir = open_dir(root)?;
    let how = OpenHow {
        flags: (libc::O_RDONLY
            | libc::O_NOFOLLOW
            | libc::O_NONBLOCK
            | libc::O_CLOEXEC
            | libc::O_NOCTTY) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV,
    };
    let file = File::from(openat2(&dir, path, &how, &shown)?);
    let meta = file.metadata().map_err(&io_err)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "device"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_dir() {
            "directory"
        } else {
            "special file"
        };
        return Err(ConfinedError::NotRegular { path: shown, kind });
    }
    let mut out = Vec::new();
    file.take(max + 1).read_to_end(&mut out).map_err(&io_err)?;
    if out.len() as u64 > max {
        return Err(ConfinedError::TooLarge { path: shown, max });
    }
    Ok(out)
}

/// An `O_PATH` handle on `path` below `root`, for a host operation on a
/// path a tenant can change (a bind mount from a writable volume): no
/// symlink anywhere on the way, nothing outside `root`, and only a
/// directory or a regular file. Mount points on the way are crossed (they
/// are the host's). Use the handle as `/proc/self/fd/N`: what it names can
/// no longer be swapped for something else.
pub fn open_path_beneath(root: &Path, path: &Path) -> Result<OwnedFd, ConfinedError> {
    let shown = path.display().to_string();
    let dir = open_dir(root)?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    let fd = openat2(&dir, path, &how, &shown)?;
    let ft = File::from(fd.try_clone().map_err(|source| ConfinedError::Io {
        path: shown.clone(),
        source,
    })?)
    .metadata()
    .map_err(|source| ConfinedError::Io {
        path: shown.clone(),
        source,
    })?
    .file_type();
    if !(ft.is_dir() || ft.is_file()) {
        return Err(ConfinedError::NotRegular {
            path: shown,
            kind: if ft.is_symlink() {
                "symbolic link"
            } else {
                "special file"
            },
        });
    }
    Ok(fd)
}

fn open_dir(root: &Path) -> Result<File, ConfinedError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)
        .map_err(|e| ConfinedError::Io {
            path: root.display().to_string(),
            source: e,
        })
}

fn openat2(dir: &File, path: &Path, how: &OpenHow, shown: &str) -> Result<OwnedFd, ConfinedError> {
    let io_err = |source: io::Error| ConfinedError::Io {
        path: shown.to_string(),
        source,
    };
    let rel = path.strip_prefix("/").unwrap_or(path);
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: openat2 reads a NUL-terminated path and an open_how of the
    // size passed, both alive for the call, and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT) => ConfinedError::NotFound(shown.to_string()),
            Some(libc::ELOOP | libc::EXDEV) => ConfinedError::NotRegular {
                path: shown.to_string(),
                kind: "symbolic link",
            },
            _ => io_err(e),
        });
    }
    // SAFETY: the syscall just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        d
    }

    #[test]
    fn reads_a_regular_file() {
        let d = root();
        std::fs::write(d.path().join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        let got = read_in_root(d.path(), Path::new("/etc/passwd"), 1024).unwrap();
        assert_eq!(got, b"root:x:0:0::/:/bin/sh\n");
        assert!(matches!(
            read_in_root(d.path(), Path::new("/etc/group"), 1024),
            Err(ConfinedError::NotFound(_))
        ));
    }

    /// The attack of a tenant that replaced its /etc/passwd with a FIFO:
    /// the read must return at once, not wait for a writer.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = root();
        nix::unistd::mkfifo(
            &d.path().join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let t = std::time::Instant::now();
        let e = read_in_root(d.path(), Path::new("/etc/passwd"), 1024).unwrap_err();
        assert!(
            matches!(e, ConfinedError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    /// Symlinks to host files: neither the last component nor a directory
    /// on the way may lead outside the root.
    #[test]
    fn symlinks_do_not_leave_the_root() {
        let d = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.path().join("etc/passwd")).unwrap();
        let e = read_in_root(d.path(), Path::new("/etc/passwd"), 1024).unwrap_err();
        assert!(matches!(e, ConfinedError::NotRegular { .. }), "{e}");
        // A directory symlink to an absolute host path resolves inside the
        // root, where there is no such file.
        std::os::unix::fs::symlink(outside.path(), d.path().join("lnk")).unwrap();
        let e = read_in_root(d.path(), Path::new("/lnk/secret"), 1024).unwrap_err();
        assert!(matches!(e, ConfinedError::NotFound(_)), "{e}");
        // `..` stops at the root.
        let e = read_in_root(d.path(), Path::new("../../../../etc/hostname"), 1024);
        assert!(matches!(e, Err(ConfinedError::NotFound(_))), "{e:?}");
    }

    #[test]
    fn devices_and_large_files_are_refused() {
        let d = root();
        // A device node as an image could carry one (here: the host's
        // /dev/zero bind-mounted would cross a mount; a node is created).
        nix::sys::stat::mknod(
            &d.path().join("etc/zero"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 5),
        )
        .unwrap();
        let e = read_in_root(d.path(), Path::new("/etc/zero"), 1024).unwrap_err();
        assert!(
            matches!(e, ConfinedError::NotRegular { kind: "device", .. }),
            "{e}"
        );
        std::fs::write(d.path().join("etc/big"), vec![b'x'; 4096]).unwrap();
        let e = read_in_root(d.path(), Path::new("/etc/big"), 1024).unwrap_err();
        assert!(
            matches!(e, ConfinedError::TooLarge { max: 1024, .. }),
            "{e}"
        );
        assert_eq!(
            read_in_root(d.path(), Path::new("/etc/big"), 4096)
                .unwrap()
                .len(),
            4096
        );
    }

    /// A bind source below a tenant's volume: a symlink anywhere on the way
    /// (planted to point the host at its own files) is refused.
    #[test]
    fn path_beneath_refuses_symlinks_on_the_way() {
        let d = root();
        std::fs::create_dir_all(d.path().join("vol/a/sub")).unwrap();
        assert!(open_path_beneath(d.path(), Path::new("vol/a/sub")).is_ok());
        std::os::unix::fs::symlink("/etc", d.path().join("vol/b")).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("vol/c")).unwrap();
        for p in ["vol/b", "vol/b/ssl", "vol/c/sub", "vol/../../etc"] {
            assert!(open_path_beneath(d.path(), Path::new(p)).is_err(), "{p}");
        }
    }
}
