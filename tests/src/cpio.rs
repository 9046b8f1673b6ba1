//! Tiny uncompressed newc initramfs images for tests that boot a guest with
//! an /init of their own. The kernel needs no more than the `cpio` crate
//! writes: newc headers, and nlink 1 on every entry so no two are taken for
//! hard links of each other; no padding to 512 after the trailer (the
//! guest image's own initramfs has none either).

use std::io::Write;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpio {
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> &mut Self {
        let header = cpio::newc::Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1);
        self.ino += 1;
        let size = u32::try_from(data.len()).expect("a test initramfs file over 4 GiB");
        let mut w = header.write(&mut self.buf, size);
        // Writing into a Vec cannot fail.
        w.write_all(data).unwrap();
        w.finish().unwrap();
        self
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0))
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(name, S_IFREG | mode, data, (0, 0))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, S_IFLNK | 0o777, target.as_bytes(), (0, 0))
    }

    pub fn chardev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(name, S_IFCHR | 0o600, &[], (major, minor))
    }

    pub fn finish(mut self) -> Vec<u8> {
        cpio::newc::trailer(&mut self.buf).unwrap();
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn entries_read_back_with_their_modes_and_devices() {
        let mut c = Cpio::new();
        c.dir("dev").chardev("dev/console", 5, 1).dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n")
            .symlink("bin/sh", "busybox");
        let archive = c.finish();
        assert_eq!(&archive[..6], b"070701", "newc magic");

        let mut rest = &archive[..];
        let mut seen = Vec::new();
        loop {
            let mut r = cpio::newc::Reader::new(rest).unwrap();
            let e = r.entry();
            if e.is_trailer() {
                break;
            }
            let (name, mode, nlink, rdev) = (
                e.name().to_string(),
                e.mode(),
                e.nlink(),
                (e.rdev_major(), e.rdev_minor()),
            );
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            seen.push((name, mode, nlink, rdev, data));
            rest = r.finish().unwrap();
        }
        let want = vec![
            ("dev".to_string(), 0o040755, 1, (0, 0), vec![]),
            ("dev/console".to_string(), 0o020600, 1, (5, 1), vec![]),
            ("bin".to_string(), 0o040755, 1, (0, 0), vec![]),
            (
                "init".to_string(),
                0o100755,
                1,
                (0, 0),
                b"#!/bin/sh\n".to_vec(),
            ),
            (
                "bin/sh".to_string(),
                0o120777,
                1,
                (0, 0),
                b"busybox".to_vec(),
            ),
        ];
        assert_eq!(seen, want);
    }
}
