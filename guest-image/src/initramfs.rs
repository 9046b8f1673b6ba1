//! Deterministic newc initramfs: entries sorted by path, parents first, every
//! timestamp 0, owner root, inode numbers assigned in that sorted order, and
//! compressors configured so they embed no time or file name.

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::Error;

/// How the initramfs is compressed. The kernel supports all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain cpio: nothing to decompress in the guest.
    None,
    /// gzip, level 9, no name, mtime 0. The bytes depend on flate2's
    /// backend (miniz_oxide here); a workspace build that switches flate2 to
    /// zlib through feature unification would produce different, equally
    /// valid output under the same key.
    Gzip,
    /// zstd level 19, single-threaded, with the content size in the frame.
    Zstd,
}

impl Compression {
    /// Name used on the command line and in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => Err(Error::BadCompression(other.to_string())),
        }
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// The file tree of an initramfs, keyed by path components so that sorting
/// puts every directory right before its contents.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    nodes: BTreeMap<Vec<String>, Node>,
}

fn components(path: &str) -> Result<Vec<String>, Error> {
    let parts: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    if parts.is_empty() || parts.iter().any(|c| c == "." || c == "..") {
        return Err(Error::BadArchivePath(path.to_string()));
    }
    Ok(parts)
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, path: &str, node: Node) -> Result<(), Error> {
        let parts = components(path)?;
        // Create missing parents so the archive never relies on the kernel
        // creating them implicitly.
        for i in 1..parts.len() {
            let parent = parts[..i].to_vec();
            match self.nodes.get(&parent) {
                Some(Node::Dir { .. }) => {}
                Some(_) => return Err(Error::BadArchivePath(path.to_string())),
                None => {
                    self.nodes.insert(parent, Node::Dir { mode: 0o755 });
                }
            }
        }
        match self.nodes.get(&parts) {
            Some(existing) if existing == &node => Ok(()),
            Some(Node::Dir { .. }) if matches!(node, Node::Dir { .. }) => Ok(()),
            Some(_) => Err(Error::DuplicateArchivePath(path.to_string())),
            None => {
                self.nodes.insert(parts, node);
                Ok(())
            }
        }
    }

    /// Adds a directory (and its parents) with the given permission bits.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), Error> {
        self.add(
            path,
            Node::Dir {
                mode: perm & 0o7777,
            },
        )
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), Error> {
        if u32::try_from(data.len()).is_err() {
            return Err(Error::FileTooLarge(path.to_string()));
        }
        self.add(
            path,
            Node::File {
                mode: perm & 0o7777,
                data,
            },
        )
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<(), Error> {
        self.add(
            path,
            Node::CharDev {
                mode: perm & 0o7777,
                major,
                minor,
            },
        )
    }

    /// Paths in archive order (for reports and tests).
    pub fn paths(&self) -> Vec<String> {
        self.nodes.keys().map(|k| k.join("/")).collect()
    }

    /// Writes the tree as an uncompressed newc archive.
    pub fn to_cpio(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        // Inode numbers are positions in sorted order: stable for the same
        // tree, unique within the archive (nlink 1 for files, so the kernel
        // never treats two entries as hard links).
        for (ino, (parts, node)) in (1u32..).zip(&self.nodes) {
            let name = parts.join("/");
            let base = cpio::newc::Builder::new(&name)
                .ino(ino)
                .uid(0)
                .gid(0)
                .mtime(0)
                .dev_major(0)
                .dev_minor(0);
            let (builder, data): (_, &[u8]) = match node {
                Node::Dir { mode } => (base.mode(S_IFDIR | mode).nlink(2), &[]),
                Node::File { mode, data } => (base.mode(S_IFREG | mode).nlink(1), data),
                Node::CharDev { mode, major, minor } => (
                    base.mode(S_IFCHR | mode)
                        .nlink(1)
                        .rdev_major(*major)
                        .rdev_minor(*minor),
                    &[],
                ),
            };
            let size = u32::try_from(data.len()).map_err(|_| Error::FileTooLarge(name.clone()))?;
            let mut w = builder.write(&mut out, size);
            w.write_all(data).map_err(Error::Archive)?;
            w.finish().map_err(Error::Archive)?;
        }
        cpio::newc::trailer(&mut out).map_err(Error::Archive)?;
        Ok(out)
    }
}

/// Compresses an archive. Both compressors are deterministic for the same
/// input and settings: flate2 writes mtime 0 and no file name unless told to,
/// and single-threaded zstd output depends only on level and input.
pub fn compress(cpio: &[u8], how: Compression) -> Result<Vec<u8>, Error> {
    match how {
        Compression::None => Ok(cpio.to_vec()),
        Compression::Gzip => {
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(3)
                .write(Vec::new(), flate2::Compression::best());
            enc.write_all(cpio).map_err(Error::Compress)?;
            enc.finish().map_err(Error::Compress)
        }
        Compression::Zstd => zstd::bulk::compress(cpio, 19).map_err(Error::Compress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.file(
            "etc/husk/modules.load",
            0o644,
            b"/lib/modules/x/a.ko\n".to_vec(),
        )
        .unwrap();
        t.file("init", 0o755, b"\x7fELF agent".to_vec()).unwrap();
        for d in ["proc", "sys", "dev", "run", "tmp", "etc"] {
            t.dir(d, 0o755).unwrap();
        }
        t.file("lib/modules/x/kernel/a.ko", 0o644, vec![7; 1001])
            .unwrap();
        t.char_dev("dev/console", 0o600, 5, 1).unwrap();
        t
    }

    /// Reads back every entry as (name, mode, uid, gid, mtime, ino, data).
    #[allow(clippy::type_complexity)]
    fn read_back(mut archive: &[u8]) -> Vec<(String, u32, u32, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut r = cpio::newc::Reader::new(archive).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            let meta = (
                e.name().to_string(),
                e.mode(),
                e.uid(),
                e.gid(),
                e.mtime(),
                e.ino(),
            );
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            out.push((meta.0, meta.1, meta.2, meta.3, meta.4, meta.5, data));
            archive = r.finish().unwrap();
        }
        out
    }

    #[test]
    fn archive_is_sorted_parents_first_and_normalised() {
        let cpio = sample().to_cpio().unwrap();
        let entries = read_back(&cpio);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/husk",
                "etc/husk/modules.load",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/x",
                "lib/modules/x/kernel",
                "lib/modules/x/kernel/a.ko",
                "proc",
                "run",
                "sys",
                "tmp",
            ]
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!((e.2, e.3, e.4), (0, 0, 0), "{} owner/mtime", e.0);
            assert_eq!(e.5 as usize, i + 1, "{} inode", e.0);
        }
        let init = entries.iter().find(|e| e.0 == "init").unwrap();
        assert_eq!(init.1, 0o100755);
        assert_eq!(init.6, b"\x7fELF agent");
        let console = entries.iter().find(|e| e.0 == "dev/console").unwrap();
        assert_eq!(console.1, 0o020600);
        assert_eq!(cpio.len() % 4, 0);
    }

    #[test]
    fn same_tree_gives_identical_bytes_in_every_compression() {
        // Insertion order must not matter, only content.
        let mut other = Tree::new();
        other.char_dev("dev/console", 0o600, 5, 1).unwrap();
        for d in ["tmp", "run", "etc", "dev", "sys", "proc"] {
            other.dir(d, 0o755).unwrap();
        }
        other
            .file("lib/modules/x/kernel/a.ko", 0o644, vec![7; 1001])
            .unwrap();
        other
            .file("init", 0o755, b"\x7fELF agent".to_vec())
            .unwrap();
        other
            .file(
                "etc/husk/modules.load",
                0o644,
                b"/lib/modules/x/a.ko\n".to_vec(),
            )
            .unwrap();
        let a = sample().to_cpio().unwrap();
        let b = other.to_cpio().unwrap();
        assert_eq!(a, b);
        for how in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let x = compress(&a, how).unwrap();
            let y = compress(&b, how).unwrap();
            assert_eq!(x, y, "{how}");
        }
        // gzip header: no FNAME flag, mtime field zero.
        let gz = compress(&a, Compression::Gzip).unwrap();
        assert_eq!(&gz[3..8], &[0, 0, 0, 0, 0]);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, a);
        let zs = compress(&a, Compression::Zstd).unwrap();
        assert_eq!(zstd::stream::decode_all(&zs[..]).unwrap(), a);
    }

    #[test]
    fn content_change_changes_bytes() {
        let a = sample().to_cpio().unwrap();
        let mut t = sample();
        t.dir("extra", 0o755).unwrap();
        assert_ne!(a, t.to_cpio().unwrap());
    }

    #[test]
    fn rejects_bad_paths_and_conflicts() {
        let mut t = Tree::new();
        assert!(t.file("../escape", 0o644, vec![]).is_err());
        assert!(t.file("", 0o644, vec![]).is_err());
        t.file("a", 0o644, vec![1]).unwrap();
        assert!(matches!(
            t.file("a", 0o644, vec![2]),
            Err(Error::DuplicateArchivePath(_))
        ));
        assert!(t.file("a/b", 0o644, vec![]).is_err());
    }
}
