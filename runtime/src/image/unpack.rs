//! Unpacking one layer blob (gzip, zstd or plain tar) into a directory usable as an overlayfs
//! lower dir.
//!
//! The registry is untrusted: no entry may create, change or link anything outside the layer
//! directory. Regular files, directories, symlinks and hard links go through the `tar` crate's
//! `unpack_in`, which refuses `..` components, canonicalises each parent (so a symlink planted by
//! an earlier entry cannot redirect a later one outside) and never opens an existing path for
//! writing (it unlinks and creates anew). Whiteouts, device nodes and xattrs are done here, with
//! the same containment check. OCI whiteouts become overlayfs whiteouts: `.wh.NAME` -> a 0/0
//! character device `NAME`, `.wh..wh..opq` -> `trusted.overlay.opaque=y` on its directory.
//! `trusted.overlay.*` xattrs carried in the tar are dropped, since they would steer overlayfs.

use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

/// Why a layer could not be unpacked.
#[derive(Debug)]
pub(crate) enum UnpackError {
    /// The archive is malformed or tries to escape its directory.
    Unsafe(String),
    /// Local I/O failure (disk full, ...), or a decompression/tar read error.
    Io(io::Error),
}

impl From<io::Error> for UnpackError {
    fn from(e: io::Error) -> Self {
        UnpackError::Io(e)
    }
}

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnpackError::Unsafe(s) => f.write_str(s),
            UnpackError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// What unpacking a layer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
    /// Bytes of regular file content written.
    pub bytes: u64,
    /// Entries created (inodes, hard links not counted).
    pub inodes: u64,
}

/// Compression of a layer blob, detected from its first bytes (registries mislabel media types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Hashes everything read through it: the diff_id is the digest of the uncompressed stream.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the layer blob at `blob` into the existing, empty directory `dest`.
pub(crate) fn unpack_layer(blob: &Path, dest: &Path) -> Result<Unpacked, UnpackError> {
    let file = File::open(blob)?;
    let mut buffered = BufReader::with_capacity(256 * 1024, file);
    let compression = sniff(buffered.fill_buf()?);
    let reader: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
        Compression::None => Box::new(buffered),
    };
    unpack_stream(reader, dest)
}

/// Unpacks an uncompressed tar stream into `dest`.
pub(crate) fn unpack_stream(reader: impl Read, dest: &Path) -> Result<Unpacked, UnpackError> {
    let mut hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
    };
    let root = dest.canonicalize()?;
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(true);
        // xattrs are applied below, filtered.
        archive.set_unpack_xattrs(false);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw_path = entry.path()?.into_owned();
            let rel = clean_relative(&raw_path)?;
            let Some(name) = rel.file_name().map(|n| n.to_owned()) else {
                // The layer root itself ("./"): its directory already exists.
                continue;
            };
            let name_bytes = name.as_bytes();
            if name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                let parent = ensure_dir_inside(&root, rel.parent().unwrap_or(Path::new("")))?;
                if name == OsStr::new(OPAQUE_WHITEOUT) {
                    xattr::set(&parent, "trusted.overlay.opaque", b"y")?;
                } else if name_bytes.starts_with(b".wh..wh.") {
                    // aufs bookkeeping (.wh..wh.plnk etc.): meaningless for overlayfs.
                } else {
                    let hidden = OsStr::from_bytes(&name_bytes[WHITEOUT_PREFIX.len()..]);
                    let target = parent.join(hidden);
                    remove_existing(&target)?;
                    nix::sys::stat::mknod(
                        &target,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::empty(),
                        nix::sys::stat::makedev(0, 0),
                    )
                    .map_err(io::Error::from)?;
                    inodes += 1;
                }
                continue;
            }

            let xattrs = collect_xattrs(&mut entry)?;
            let kind = entry.header().entry_type();
            let written_at =
                if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                    make_node(&root, &rel, &entry)?
                } else if kind.is_hard_link() {
                    make_hard_link(&root, &rel, &entry)?
                } else {
                    if !entry
                        .unpack_in(&root)
                        .map_err(|e| classify_tar_error(&raw_path, e))?
                    {
                        return Err(UnpackError::Unsafe(format!(
                            "entry {} escapes the layer directory",
                            raw_path.display()
                        )));
                    }
                    root.join(&rel)
                };
            for (key, value) in xattrs {
                xattr::set(&written_at, OsStr::from_bytes(&key), &value)?;
            }
            if kind.is_file() || kind == tar::EntryType::Continuous {
                bytes += entry.header().size().unwrap_or(0);
            }
            if !kind.is_hard_link() {
                inodes += 1;
            }
        }
    }
    // Trailing zero blocks after the end-of-archive marker are part of the diff_id.
    io::copy(&mut hashing, &mut io::sink())?;
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
        bytes,
        inodes,
    })
}

/// The `tar` crate reports escapes as plain `io::Error`s; keep them apart from disk failures.
fn classify_tar_error(path: &Path, e: io::Error) -> UnpackError {
    let msg = e.to_string();
    if msg.contains("outside of destination") || msg.contains("escapes") {
        UnpackError::Unsafe(format!(
            "entry {} points outside the layer: {msg}",
            path.display()
        ))
    } else {
        UnpackError::Io(io::Error::new(
            e.kind(),
            format!("entry {}: {msg}", path.display()),
        ))
    }
}

/// Strips leading `/` and `.`; refuses `..` anywhere.
fn clean_relative(path: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(UnpackError::Unsafe(format!(
                    "entry {} contains '..'",
                    path.display()
                )))
            }
            Component::Normal(p) => out.push(p),
        }
    }
    Ok(out)
}

/// Makes sure directory `rel` exists inside `root` (creating missing parts) and returns its
/// canonical path, refusing if an existing component resolves outside `root`.
fn ensure_dir_inside(root: &Path, rel: &Path) -> Result<PathBuf, UnpackError> {
    let full = root.join(rel);
    let mut existing = full.as_path();
    let mut missing = Vec::new();
    while existing.symlink_metadata().is_err() {
        missing.push(
            existing
                .file_name()
                .map(|n| n.to_owned())
                .ok_or_else(|| UnpackError::Unsafe(format!("bad directory {}", rel.display())))?,
        );
        existing = existing
            .parent()
            .ok_or_else(|| UnpackError::Unsafe(format!("bad directory {}", rel.display())))?;
    }
    let mut cur = existing.canonicalize()?;
    if !cur.starts_with(root) {
        return Err(UnpackError::Unsafe(format!(
            "directory {} resolves outside the layer",
            rel.display()
        )));
    }
    for name in missing.into_iter().rev() {
        cur.push(name);
        match fs::create_dir(&cur) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !fs::symlink_metadata(&cur)?.is_dir() {
        return Err(UnpackError::Unsafe(format!(
            "{} is not a directory",
            rel.display()
        )));
    }
    Ok(cur)
}

/// Removes whatever is at `path` (never following a symlink there).
fn remove_existing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn make_node<R: Read>(
    root: &Path,
    rel: &Path,
    entry: &tar::Entry<'_, R>,
) -> Result<PathBuf, UnpackError> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let name = rel
        .file_name()
        .ok_or_else(|| UnpackError::Unsafe(format!("bad node path {}", rel.display())))?;
    let parent = ensure_dir_inside(root, rel.parent().unwrap_or(Path::new("")))?;
    let target = parent.join(name);
    remove_existing(&target)?;
    let h = entry.header();
    let kind = h.entry_type();
    let (flag, dev) = if kind.is_character_special() {
        (SFlag::S_IFCHR, true)
    } else if kind.is_block_special() {
        (SFlag::S_IFBLK, true)
    } else {
        (SFlag::S_IFIFO, false)
    };
    let rdev = if dev {
        // Some writers leave the fields blank for 0.
        makedev(
            u64::from(h.device_major().ok().flatten().unwrap_or(0)),
            u64::from(h.device_minor().ok().flatten().unwrap_or(0)),
        )
    } else {
        0
    };
    let mode = Mode::from_bits_truncate(h.mode()? & 0o7777);
    mknod(&target, flag, mode, rdev).map_err(io::Error::from)?;
    let uid = h.uid()?;
    let gid = h.gid()?;
    std::os::unix::fs::lchown(
        &target,
        Some(u32::try_from(uid).unwrap_or(u32::MAX)),
        Some(u32::try_from(gid).unwrap_or(u32::MAX)),
    )?;
    // mknod applies the umask; set the exact mode afterwards.
    nix::sys::stat::fchmodat(
        None,
        &target,
        mode,
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(io::Error::from)?;
    Ok(target)
}

/// Hard links are made here rather than by the `tar` crate so that a link name is always taken
/// relative to the layer root (never as a host path) and must name something inside it.
fn make_hard_link<R: Read>(
    root: &Path,
    rel: &Path,
    entry: &tar::Entry<'_, R>,
) -> Result<PathBuf, UnpackError> {
    let link = entry.link_name()?.ok_or_else(|| {
        UnpackError::Unsafe(format!("hard link {} without a target", rel.display()))
    })?;
    let link_rel = clean_relative(&link)?;
    let unusable = |why: String| {
        UnpackError::Unsafe(format!(
            "hard link {} -> {}: {why}",
            rel.display(),
            link.display()
        ))
    };
    let link_name = link_rel
        .file_name()
        .ok_or_else(|| unusable("empty target".into()))?;
    // Resolve the target's directory only: a link to a symlink links the symlink itself.
    let link_dir = root
        .join(link_rel.parent().unwrap_or(Path::new("")))
        .canonicalize()
        .map_err(|e| unusable(e.to_string()))?;
    if !link_dir.starts_with(root) {
        return Err(unusable("target leaves the layer".into()));
    }
    let canon = link_dir.join(link_name);
    let meta = fs::symlink_metadata(&canon).map_err(|e| unusable(e.to_string()))?;
    if meta.is_dir() {
        return Err(unusable("target is a directory".into()));
    }
    let name = rel
        .file_name()
        .ok_or_else(|| UnpackError::Unsafe(format!("bad link path {}", rel.display())))?;
    let parent = ensure_dir_inside(root, rel.parent().unwrap_or(Path::new("")))?;
    let target = parent.join(name);
    if target == canon {
        return Ok(target);
    }
    remove_existing(&target)?;
    fs::hard_link(&canon, &target)?;
    Ok(target)
}

/// An extended attribute: name, value.
type Xattr = (Vec<u8>, Vec<u8>);

/// `SCHILY.xattr.*` PAX records of an entry, minus the ones that would steer overlayfs.
fn collect_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<Xattr>, UnpackError> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.starts_with(OVERLAY_XATTR_PREFIX) || name.is_empty() {
                    continue;
                }
                out.push((name.to_vec(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    /// Builds a tar; `set_path` refuses `..`, so hostile names are written into the raw header.
    fn build(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = header("placeholder", *kind, data.len() as u64, 0o640);
            {
                let name = &mut h.as_old_mut().name;
                name.fill(0);
                name[..path.len()].copy_from_slice(path.as_bytes());
            }
            if let Some(l) = link {
                let ln = &mut h.as_old_mut().linkname;
                ln.fill(0);
                ln[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn unpacks_plain_gzip_and_zstd_with_matching_diff_id() {
        use tar::EntryType as E;
        let tar = build(&[
            ("bin/", E::Directory, b"", None),
            ("bin/busybox", E::Regular, b"#!fake\n", None),
            ("bin/sh", E::Symlink, b"", Some("busybox")),
            ("bin/ash", E::Link, b"", Some("bin/busybox")),
            ("dev/null", E::Char, b"", None),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for blob in [&tar, &gz, &zst] {
            // (dev/null is written with blank device numbers: read as 0/0.)
            let dir = tempfile::tempdir().unwrap();
            let blob_path = dir.path().join("blob");
            fs::write(&blob_path, blob).unwrap();
            let dest = dir.path().join("fs");
            fs::create_dir(&dest).unwrap();
            let u = unpack_layer(&blob_path, &dest).unwrap();
            assert_eq!(u.diff_id, sha(&tar));
            assert_eq!(u.bytes, 7);
            let bb = fs::symlink_metadata(dest.join("bin/busybox")).unwrap();
            assert_eq!((bb.uid(), bb.gid()), (1234, 5678));
            assert_eq!(bb.permissions().mode() & 0o7777, 0o640);
            assert_eq!(
                fs::read_link(dest.join("bin/sh")).unwrap(),
                Path::new("busybox")
            );
            assert_eq!(fs::metadata(dest.join("bin/ash")).unwrap().ino(), bb.ino());
            let null = fs::symlink_metadata(dest.join("dev/null")).unwrap();
            assert!(null.file_type().is_char_device());
        }
    }

    #[test]
    fn converts_oci_whiteouts_to_overlay_whiteouts() {
        use tar::EntryType as E;
        let tar = build(&[
            ("etc/", E::Directory, b"", None),
            ("etc/.wh.passwd", E::Regular, b"", None),
            ("var/lib/.wh..wh..opq", E::Regular, b"", None),
            ("var/lib/kept", E::Regular, b"x", None),
            ("var/.wh..wh.plnk", E::Regular, b"", None),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let u = unpack_stream(&tar[..], dir.path()).unwrap();
        assert_eq!(u.diff_id, sha(&tar));
        let wh = fs::symlink_metadata(dir.path().join("etc/passwd")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(!dir.path().join("etc/.wh.passwd").exists());
        let opq = xattr::get(dir.path().join("var/lib"), "trusted.overlay.opaque").unwrap();
        assert_eq!(opq.as_deref(), Some(&b"y"[..]));
        assert!(dir.path().join("var/lib/kept").exists());
        assert!(!dir.path().join("var/lib/.wh..wh..opq").exists());
        assert!(!dir.path().join("var/.wh..wh.plnk").exists());
    }

    /// A hostile layer must not create or modify anything outside its directory.
    #[test]
    fn refuses_path_traversal() {
        use tar::EntryType as E;
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"original").unwrap();
        let o = outside.path().to_str().unwrap().to_string();
        let cases: Vec<Vec<u8>> = vec![
            build(&[("../escaped", E::Regular, b"x", None)]),
            build(&[("a/../../escaped", E::Regular, b"x", None)]),
            // symlink to the outside dir, then a file through it
            build(&[
                ("link", E::Symlink, b"", Some(&o)),
                ("link/victim", E::Regular, b"pwned", None),
            ]),
            // relative symlink escape
            build(&[
                ("d/", E::Directory, b"", None),
                ("d/up", E::Symlink, b"", Some("../../../../../../../..")),
                ("d/up/tmp/escaped", E::Regular, b"x", None),
            ]),
            // hard link to a file outside
            build(&[("hl", E::Link, b"", Some(&format!("{o}/victim")))]),
            build(&[("hl", E::Link, b"", Some("../victim"))]),
            // hard link through a symlink leading outside
            build(&[
                ("link", E::Symlink, b"", Some(&o)),
                ("hl", E::Link, b"", Some("link/victim")),
            ]),
            // whiteout / opaque through a symlink leading outside
            build(&[
                ("link", E::Symlink, b"", Some(&o)),
                ("link/.wh.victim", E::Regular, b"", None),
            ]),
            build(&[
                ("link", E::Symlink, b"", Some(&o)),
                ("link/.wh..wh..opq", E::Regular, b"", None),
            ]),
            // device node through a symlink
            build(&[
                ("link", E::Symlink, b"", Some(&o)),
                ("link/victim", E::Char, b"", None),
            ]),
        ];
        for (i, tar) in cases.iter().enumerate() {
            let layer = tempfile::tempdir().unwrap();
            let res = unpack_stream(&tar[..], layer.path());
            assert!(
                matches!(res, Err(UnpackError::Unsafe(_))),
                "case {i}: {res:?}"
            );
            assert_eq!(fs::read(&victim).unwrap(), b"original", "case {i}");
            let names: Vec<_> = fs::read_dir(outside.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("victim")], "case {i}");
            assert!(xattr::get(outside.path(), "trusted.overlay.opaque")
                .unwrap()
                .is_none());
            assert!(!Path::new("/tmp/escaped").exists(), "case {i}");
        }
    }

    #[test]
    fn drops_overlay_xattrs_keeps_others() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
            ("SCHILY.xattr.user.note", &b"hello"[..]),
        ])
        .unwrap();
        let h = header("f", tar::EntryType::Regular, 1, 0o644);
        b.append(&h, &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        unpack_stream(&tar[..], dir.path()).unwrap();
        let f = dir.path().join("f");
        assert_eq!(
            xattr::get(&f, "user.note").unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        assert!(xattr::get(&f, "trusted.overlay.redirect")
            .unwrap()
            .is_none());
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let tar = build(&[("f", tar::EntryType::Regular, &[7u8; 4000], None)]);
        let dir = tempfile::tempdir().unwrap();
        let res = unpack_stream(&tar[..1000], dir.path());
        assert!(res.is_err());
    }
}
