//! Record files that survive a crash or power loss whole: a reader finds
//! either the old content or the new one, never a mix or an empty file.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed [`write_atomic`]; `path` is the file the step worked on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct WriteError {
    /// "writing", "renaming over" or "syncing directory".
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// For callers whose errors are `io::Error`: keeps the kind, and the step
/// and path in the message.
impl From<WriteError> for io::Error {
    fn from(e: WriteError) -> Self {
        io::Error::new(e.source.kind(), e)
    }
}

/// Replaces `path` with `data`: writes a hidden temporary sibling (the same
/// directory, so the rename cannot cross file systems), fsyncs it, renames
/// it over `path` and fsyncs the directory, without which the rename itself
/// may be lost. On failure the temporary is removed; one a crash leaves
/// behind is recognised by [`is_temporary`].
///
/// The file is created mode 0600: records hold what kubelet put in pod and
/// container configs (environment variables filled from Secrets among
/// them), for nobody but root.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), WriteError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // pid and counter: concurrent writers of one path never share a temporary.
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let fail = |op, path: &Path, source| {
        let _ = fs::remove_file(&tmp);
        WriteError {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        });
    written.map_err(|e| fail("writing", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| fail("renaming over", path, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| WriteError {
            op: "syncing directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// Whether a directory entry is a temporary an interrupted [`write_atomic`]
/// left; the file it was replacing is intact, so it can be deleted.
pub fn is_temporary(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b".") && b.windows(4).any(|w| w == b".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.json");
        write_atomic(&p, b"{}").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }

    #[test]
    fn replaces_content_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsStr::new("rec.json").to_owned()]);
    }

    #[test]
    fn failure_names_the_step_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be renamed over by a file.
        let p = dir.path().join("taken");
        fs::create_dir(&p).unwrap();
        let e = write_atomic(&p, b"x").unwrap_err();
        assert_eq!(e.op, "renaming over");
        assert_eq!(e.path, p);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        let e = write_atomic(&dir.path().join("missing/rec"), b"x").unwrap_err();
        assert_eq!(e.op, "writing");
    }

    #[test]
    fn temporaries_are_recognised() {
        // The name write_atomic gives its temporary.
        let tmp = format!(".rec.json.tmp-{}-0", std::process::id());
        assert!(is_temporary(OsStr::new(&tmp)));
        assert!(is_temporary(OsStr::new(".a.json.tmp123")));
        assert!(!is_temporary(OsStr::new("rec.json")));
        assert!(!is_temporary(OsStr::new("a.tmp")));
        assert!(!is_temporary(OsStr::new(".hidden")));
    }
}
