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

/// What one layer may hold. A layer is untrusted input: a few megabytes of
/// gzip can expand to terabytes, a tar can declare a gigabyte file name
/// (GNU long-name and PAX records are read into memory whole) or millions
/// of entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Uncompressed tar stream bytes.
    pub max_bytes: u64,
    /// Entries (files, directories, links, whiteouts).
    pub max_entries: u64,
    /// One GNU long-name/long-link or PAX record.
    pub max_metadata_record: u64,
}

impl Default for LayerLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 30,
            max_entries: 2_000_000,
            max_metadata_record: 1 << 20,
        }
    }
}

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
        match guard_message(&e) {
            Some(m) => UnpackError::Unsafe(m),
            None => UnpackError::Io(e),
        }
    }
}

/// The [`TarGuard`] refusal inside `e`, which the `tar` crate may have
/// wrapped (its wrapper's message hides the cause).
fn guard_message(e: &io::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let m = err.to_string();
        if let Some(i) = m.find(GUARD_TAG) {
            return Some(format!("the layer holds {}", &m[i + GUARD_TAG.len()..]));
        }
        cur = match err.downcast_ref::<io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
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
pub(crate) fn unpack_layer(
    blob: &Path,
    dest: &Path,
    limits: &LayerLimits,
) -> Result<Unpacked, UnpackError> {
    let file = File::open(blob)?;
    let mut buffered = BufReader::with_capacity(256 * 1024, file);
    let compression = sniff(buffered.fill_buf()?);
    let reader: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
        Compression::None => Box::new(buffered),
    };
    unpack_stream(reader, dest, limits)
}

/// Unpacks an uncompressed tar stream into `dest`.
pub(crate) fn unpack_stream(
    reader: impl Read,
    dest: &Path,
    limits: &LayerLimits,
) -> Result<Unpacked, UnpackError> {
    let mut hashing = HashingReader {
        inner: TarGuard::new(reader, *limits),
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
                let hidden = &name_bytes[WHITEOUT_PREFIX.len()..];
                // `.wh.`, `.wh..` and `.wh...` would white out the directory
                // itself or its parent, which is outside this entry's say
                // (and, at the top, outside the layer).
                if matches!(hidden, b"" | b"." | b"..") {
                    return Err(UnpackError::Unsafe(format!(
                        "whiteout entry {} names no file",
                        raw_path.display()
                    )));
                }
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

/// Tracks a tar stream's headers as the `tar` crate reads it, to refuse
/// what would make the crate allocate or work without bound before it
/// does: a GNU long-name/long-link or PAX record larger than
/// `max_metadata_record`, more than `max_entries` entries, more than
/// `max_bytes` in all. It follows the format itself (512-byte blocks, the
/// size field in octal or base-256, a PAX `size` overriding the next
/// entry's, old-GNU sparse extension headers), so it knows where each
/// header is without buffering the stream.
struct TarGuard<R> {
    inner: R,
    limits: LayerLimits,
    total: u64,
    entries: u64,
    /// Bytes of the current header block seen so far.
    header: Vec<u8>,
    /// Data bytes (rounded up to blocks) left in the current entry.
    skip: u64,
    /// Sparse extension headers still to come, and the data after them.
    sparse_ext: bool,
    pending_data: u64,
    /// Content of the current PAX record, to find its `size`.
    pax: Option<Vec<u8>>,
    pax_left: u64,
    /// A PAX `size` for the next entry.
    next_size: Option<u64>,
}

fn guard_error(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{GUARD_TAG}{msg}"))
}

/// Marks the guard's errors so that they become [`UnpackError::Unsafe`].
const GUARD_TAG: &str = "layer limit: ";

impl<R> TarGuard<R> {
    fn new(inner: R, limits: LayerLimits) -> Self {
        Self {
            inner,
            limits,
            total: 0,
            entries: 0,
            header: Vec::with_capacity(512),
            skip: 0,
            sparse_ext: false,
            pending_data: 0,
            pax: None,
            pax_left: 0,
            next_size: None,
        }
    }

    fn observe(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = (data.len() as u64).min(self.skip) as usize;
                if let Some(p) = self.pax.as_mut() {
                    let take = (n as u64).min(self.pax_left) as usize;
                    p.extend_from_slice(&data[..take]);
                    self.pax_left -= take as u64;
                }
                self.skip -= n as u64;
                data = &data[n..];
                if self.skip == 0 {
                    if let Some(p) = self.pax.take() {
                        self.next_size = pax_size(&p);
                    }
                }
                continue;
            }
            let n = (512 - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == 512 {
                let h = std::mem::replace(&mut self.header, Vec::with_capacity(512));
                self.on_header(&h)?;
            }
        }
        Ok(())
    }

    fn on_header(&mut self, h: &[u8]) -> io::Result<()> {
        if self.sparse_ext {
            // An old-GNU sparse extension block: more follow while its
            // last flag is set; the entry's data comes after the last.
            self.sparse_ext = h[504] != 0;
            if !self.sparse_ext {
                self.skip = self.pending_data;
            }
            return Ok(());
        }
        if h.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let kind = h[156];
        let size = parse_size(&h[124..136])
            .ok_or_else(|| guard_error("a tar header with a bad size field".into()))?;
        let round = |n: u64| n.div_ceil(512).saturating_mul(512);
        match kind {
            b'L' | b'K' | b'x' | b'g' => {
                if size > self.limits.max_metadata_record {
                    return Err(guard_error(format!(
                        "a tar metadata record of {size} bytes (more than {})",
                        self.limits.max_metadata_record
                    )));
                }
                if kind == b'x' {
                    self.pax = Some(Vec::with_capacity(size as usize));
                    self.pax_left = size;
                }
                self.skip = round(size);
            }
            _ => {
                self.entries += 1;
                if self.entries > self.limits.max_entries {
                    return Err(guard_error(format!(
                        "more than {} entries",
                        self.limits.max_entries
                    )));
                }
                let data = self.next_size.take().unwrap_or(size);
                // Directories, links and devices carry no data whatever
                // their size field says.
                let data = if matches!(kind, b'1' | b'2' | b'3' | b'4' | b'5' | b'6') {
                    0
                } else {
                    data
                };
                if kind == b'S' && h[482] != 0 {
                    self.sparse_ext = true;
                    self.pending_data = round(data);
                } else {
                    self.skip = round(data);
                }
            }
        }
        Ok(())
    }
}

/// A tar size field: octal digits (space/NUL padded) or, with the high
/// bit of the first byte set, big-endian base-256.
fn parse_size(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(f[0] & 0x7f);
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(f).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The `size` of a PAX record set ("<len> size=<n>\n" lines).
fn pax_size(p: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(p).ok()?;
    text.lines().find_map(|l| {
        let (_, kv) = l.split_once(' ')?;
        kv.strip_prefix("size=")?.parse().ok()
    })
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        if self.total > self.limits.max_bytes {
            return Err(guard_error(format!(
                "more than {} bytes uncompressed",
                self.limits.max_bytes
            )));
        }
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

/// The `tar` crate reports escapes as plain `io::Error`s; keep them apart from disk failures.
fn classify_tar_error(path: &Path, e: io::Error) -> UnpackError {
    if let Some(m) = guard_message(&e) {
        return UnpackError::Unsafe(m);
    }
    // The tar crate's wrapper says only "failed to unpack"; name the cause.
    let mut msg = e.to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> =
        e.get_ref().and_then(|x| x.source());
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
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
mod tests;
