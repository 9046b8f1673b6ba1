//! The guest kernel package, unpacked once into the cache and shared.
//!
//! [`kernel_tree`] is the one place that turns the apt kernel package into
//! files: the image build reads its modules from it, tests boot its kernel and
//! load its modules, and husk-vmm boots its uncompressed `vmlinux` on hosts
//! where the bzImage's decompressor cannot run (PVM without VT-x/SVM, see
//! `extract_vmlinux`). Each tree lives in `<cache>/kernels/<deb sha256>.v<N>/`,
//! is built in a private directory and renamed into place when complete, and
//! is never modified afterwards, so any number of processes can ask for it at
//! once.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::{apt, modules, Error, DEFAULT_CACHE_DIR, DEFAULT_KERNEL_PACKAGE};

/// Bump when the layout of an unpacked tree changes; it is part of the
/// directory name, so old trees are ignored, never reinterpreted.
pub const KERNEL_TREE_FORMAT: u32 = 1;

/// Marker written last into a complete tree; describes it.
pub const KERNEL_TREE_MARKER: &str = "kernel.json";

/// File name of the extracted ELF kernel in a tree.
pub const VMLINUX_FILE: &str = "vmlinux";

/// Which kernel package, and where to cache it.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Cache root; the .deb goes to `debs/`, the unpacked tree to `kernels/`.
    pub cache_dir: PathBuf,
    /// apt package to resolve (a meta package is followed to the real one).
    pub kernel_package: String,
}

impl Default for KernelOptions {
    /// The kernel and cache `make guest-image` uses.
    fn default() -> Self {
        KernelOptions {
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            kernel_package: DEFAULT_KERNEL_PACKAGE.to_string(),
        }
    }
}

/// An unpacked kernel package. Every path is inside `root`; treat them as
/// read only (they are shared with other processes).
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// The package's files as `dpkg-deb -x` leaves them (`boot/`, `lib/`, `usr/`).
    pub root: PathBuf,
    /// The bzImage, `boot/vmlinuz-<release>`.
    pub vmlinuz: PathBuf,
    /// The ELF kernel inside the bzImage (see [`extract_vmlinux`]).
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>`, with the `modules.dep` that depmod generated.
    pub modules_dir: PathBuf,
    /// Kernel release (`uname -r` in the guest).
    pub release: String,
    /// The apt package the tree was unpacked from.
    pub package: apt::KernelPackage,
    /// True when the cache already held the tree.
    pub cached: bool,
}

impl KernelTree {
    /// Resolves module names against this kernel's `modules.dep` and
    /// `modules.builtin` into a load order, dependencies first; paths in
    /// the result are relative to [`KernelTree::modules_dir`].
    pub fn resolve_modules(&self, names: &[String]) -> Result<modules::Resolved, Error> {
        let dep_path = self.modules_dir.join("modules.dep");
        let dep_text = std::fs::read_to_string(&dep_path).map_err(|e| Error::io(&dep_path, e))?;
        let builtin_path = self.modules_dir.join("modules.builtin");
        let builtin_text =
            std::fs::read_to_string(&builtin_path).map_err(|e| Error::io(&builtin_path, e))?;
        modules::ModulesDep::parse(&dep_text)?.resolve(
            names,
            &modules::parse_builtin(&builtin_text),
            &self.release,
        )
    }

    /// Reads a resolved module as an uncompressed ELF object.
    pub fn read_module(&self, module: &modules::ModuleEntry) -> Result<Vec<u8>, Error> {
        modules::read_decompressed(&self.modules_dir.join(&module.source_rel))
    }
}

/// What the marker records; checked before a cached tree is reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TreeMarker {
    format: u32,
    package: String,
    version: String,
    deb_sha256: String,
    release: String,
    vmlinuz_size: u64,
    vmlinux_size: u64,
}

/// Returns the unpacked kernel package for `opts`, downloading (verified
/// against apt's index) and unpacking it first if the cache lacks it.
pub fn kernel_tree(opts: &KernelOptions) -> Result<KernelTree, Error> {
    let pkg = apt::resolve(&opts.kernel_package)?;
    tree_for(&pkg, &opts.cache_dir)
}

/// The tree for an already resolved package.
pub(crate) fn tree_for(pkg: &apt::KernelPackage, cache_dir: &Path) -> Result<KernelTree, Error> {
    let kernels = cache_dir.join("kernels");
    std::fs::create_dir_all(&kernels).map_err(|e| Error::io(&kernels, e))?;
    crate::sweep_stale(&kernels, &[".unpack-"]);
    let dir = kernels.join(format!("{}.v{KERNEL_TREE_FORMAT}", pkg.sha256));
    match open_tree(&dir, pkg) {
        Ok(tree) => return Ok(tree),
        Err(why) if dir.exists() => {
            tracing::warn!(dir = %dir.display(), %why, "cached kernel tree is damaged; unpacking again");
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Err(_) => {}
    }
    let deb = apt::fetch(pkg, &cache_dir.join("debs"))?;
    let staging = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&kernels)
        .map_err(|e| Error::io(&kernels, e))?;
    let release = unpack_kernel(&deb, staging.path(), &pkg.package)?;
    let vmlinuz = staging
        .path()
        .join("boot")
        .join(format!("vmlinuz-{release}"));
    let vmlinux = staging.path().join(VMLINUX_FILE);
    extract_vmlinux(&vmlinuz, &vmlinux)?;
    let marker = TreeMarker {
        format: KERNEL_TREE_FORMAT,
        package: pkg.package.clone(),
        version: pkg.version.clone(),
        deb_sha256: pkg.sha256.clone(),
        release,
        vmlinuz_size: file_size(&vmlinuz)?,
        vmlinux_size: file_size(&vmlinux)?,
    };
    // Serialising plain data cannot fail.
    let json = serde_json::to_vec_pretty(&marker).unwrap_or_default();
    crate::write_synced(&staging.path().join(KERNEL_TREE_MARKER), &json)?;
    // tempfile creates the directory 0700; the tree is meant to be read.
    std::fs::set_permissions(
        staging.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| Error::io(staging.path(), e))?;
    crate::sync_dir(staging.path())?;
    let staged = staging.keep();
    match std::fs::rename(&staged, &dir) {
        Ok(()) => crate::sync_dir(&kernels)?,
        Err(e) => {
            // Another process unpacked the same package first; both trees
            // come from the same verified .deb, so ours is discarded.
            let _ = std::fs::remove_dir_all(&staged);
            if !dir.join(KERNEL_TREE_MARKER).is_file() {
                return Err(Error::io(&dir, e));
            }
        }
    }
    let mut tree = open_tree(&dir, pkg).map_err(|detail| Error::BadKernelPackage {
        package: pkg.package.clone(),
        detail: format!("unpacked tree {} is unusable: {detail}", dir.display()),
    })?;
    tree.cached = false;
    tracing::info!(dir = %dir.display(), release = %tree.release, "kernel package unpacked");
    Ok(tree)
}

fn file_size(path: &Path) -> Result<u64, Error> {
    Ok(std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len())
}

/// Opens a complete tree. Checks the marker and the sizes of the two kernel
/// files, not digests: the tree only appears, by an atomic rename, once
/// complete and was unpacked from a verified .deb; hashing ~70 MB on every
/// call would guard only against someone editing the cache.
fn open_tree(dir: &Path, pkg: &apt::KernelPackage) -> Result<KernelTree, String> {
    let marker_path = dir.join(KERNEL_TREE_MARKER);
    let text =
        std::fs::read(&marker_path).map_err(|e| format!("{}: {e}", marker_path.display()))?;
    let marker: TreeMarker =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", marker_path.display()))?;
    if marker.format != KERNEL_TREE_FORMAT || marker.deb_sha256 != pkg.sha256 {
        return Err(format!(
            "{} describes another tree (format {}, .deb {})",
            marker_path.display(),
            marker.format,
            marker.deb_sha256
        ));
    }
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{}", marker.release));
    let vmlinux = dir.join(VMLINUX_FILE);
    for (path, size) in [
        (&vmlinuz, marker.vmlinuz_size),
        (&vmlinux, marker.vmlinux_size),
    ] {
        let len = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if len != size {
            return Err(format!(
                "{} is {len} bytes, {} says {size}",
                path.display(),
                KERNEL_TREE_MARKER,
            ));
        }
    }
    let modules_dir = dir.join("lib/modules").join(&marker.release);
    let dep = modules_dir.join("modules.dep");
    if !dep.is_file() {
        return Err(format!("{} is missing", dep.display()));
    }
    Ok(KernelTree {
        root: dir.to_path_buf(),
        vmlinuz,
        vmlinux,
        modules_dir,
        release: marker.release,
        package: pkg.clone(),
        cached: true,
    })
}

/// Extracts the kernel package into `root`, runs depmod, and returns the
/// kernel release (the single directory under `lib/modules`).
fn unpack_kernel(deb: &Path, root: &Path, package: &str) -> Result<String, Error> {
    apt::run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(root),
        "dpkg-deb",
        "dpkg",
    )?;
    let bad = |detail: String| Error::BadKernelPackage {
        package: package.to_string(),
        detail,
    };
    let mods = root.join("lib/modules");
    let mut releases = Vec::new();
    for entry in std::fs::read_dir(&mods).map_err(|e| bad(format!("no lib/modules ({e})")))? {
        let entry = entry.map_err(|e| Error::io(&mods, e))?;
        releases.push(entry.file_name().to_string_lossy().into_owned());
    }
    let [release] = releases.as_slice() else {
        return Err(bad(format!(
            "expected one kernel release under lib/modules, found {releases:?}"
        )));
    };
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(bad(format!("no boot/vmlinuz-{release}")));
    }
    // The package ships no modules.dep; it is generated on install by
    // depmod, which we run against the unpacked tree instead.
    apt::run(
        Command::new("depmod").arg("-b").arg(root).arg(release),
        "depmod",
        "kmod",
    )?;
    Ok(release.clone())
}

/// Largest vmlinux accepted; the size comes from the bzImage, which may be
/// damaged, so it must not size an allocation unchecked.
const MAX_VMLINUX: u64 = 1 << 30;

/// Writes the ELF kernel (`vmlinux`) held compressed inside the bzImage at
/// `bzimage` to `out` (through a temporary file renamed into place).
///
/// The payload is located through the boot protocol header
/// (`payload_offset`/`payload_length`, protocol 2.08+), not by scanning for
/// a magic number. Its last four bytes are the uncompressed size (Linux's
/// build appends it for every compressor; for gzip it is the member's own
/// ISIZE), which the output must match. gzip, xz and zstd payloads are
/// supported (Debian's 6.12 kernels use zstd).
pub fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), Error> {
    let data = std::fs::read(bzimage).map_err(|e| Error::io(bzimage, e))?;
    let elf = decompress_payload(&data).map_err(|detail| Error::BadBzImage {
        path: bzimage.to_path_buf(),
        detail,
    })?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".vmlinux.")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    std::io::Write::write_all(tmp.as_file_mut(), &elf).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(out).map_err(|e| Error::io(out, e.error))?;
    Ok(())
}

fn le_u32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The decompressed payload of a bzImage, or why there is none.
fn decompress_payload(data: &[u8]) -> Result<Vec<u8>, String> {
    // Offsets from the x86 boot protocol (Documentation/arch/x86/boot.rst).
    if data.len() < 0x250 {
        return Err(format!("{} bytes is too short for a bzImage", data.len()));
    }
    if &data[0x202..0x206] != b"HdrS" {
        return Err("no boot protocol header (HdrS magic at 0x202)".to_string());
    }
    let version = u16::from_le_bytes([data[0x206], data[0x207]]);
    if version < 0x0208 {
        return Err(format!(
            "boot protocol {}.{:02} has no payload fields (2.08+ needed)",
            version >> 8,
            version & 0xff
        ));
    }
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = le_u32(data, 0x248).unwrap_or_default() as usize;
    let length = le_u32(data, 0x24c).unwrap_or_default() as usize;
    let start = (setup_sects + 1) * 512 + offset;
    let payload = start
        .checked_add(length)
        .and_then(|end| data.get(start..end))
        .filter(|p| p.len() > 4)
        .ok_or_else(|| {
            format!(
                "payload at {start:#x}+{length:#x} lies outside the {} byte file",
                data.len()
            )
        })?;
    let (body, size) = payload.split_at(payload.len() - 4);
    let expected = u64::from(le_u32(size, 0).unwrap_or_default());
    if expected > MAX_VMLINUX {
        return Err(format!("payload claims {expected} bytes uncompressed"));
    }
    // One byte over the expected size is enough to tell it is wrong.
    let limit = expected + 1;
    let mut elf = Vec::with_capacity(expected as usize);
    let read = |r: &mut dyn Read, out: &mut Vec<u8>| r.take(limit).read_to_end(out);
    let result = if body.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        // One frame: what follows the frame is the size, not another frame.
        zstd::stream::read::Decoder::with_buffer(body)
            .map(|d| d.single_frame())
            .and_then(|mut d| read(&mut d, &mut elf))
    } else if body.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        read(&mut liblzma::read::XzDecoder::new(body), &mut elf)
    } else if body.starts_with(&[0x1f, 0x8b]) {
        // The gzip member includes the last four bytes (its ISIZE).
        read(&mut flate2::read::GzDecoder::new(payload), &mut elf)
    } else {
        let magic: Vec<String> = body.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "payload compression with magic {} is not supported (gzip, xz, zstd are)",
            magic.join(" ")
        ));
    };
    result.map_err(|e| format!("decompressing the payload: {e}"))?;
    if elf.len() as u64 != expected {
        return Err(format!(
            "payload decompressed to {} bytes, its size field says {expected}",
            elf.len()
        ));
    }
    if !elf.starts_with(b"\x7fELF") {
        return Err("decompressed payload is not an ELF file".to_string());
    }
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal bzImage: boot sector + one setup sector with the header
    /// fields `decompress_payload` reads, then the payload.
    fn bzimage(payload: &[u8], version: u16) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        // Payload 16 bytes into the protected-mode part, as if after a stub.
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0xcc; 16]);
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0; 32]);
        img
    }

    fn fake_elf() -> Vec<u8> {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..200_000u32).map(|i| (i % 251) as u8));
        elf
    }

    fn with_size(mut compressed: Vec<u8>, size: usize) -> Vec<u8> {
        compressed.extend_from_slice(&(size as u32).to_le_bytes());
        compressed
    }

    #[test]
    fn extracts_zstd_xz_and_gzip_payloads() {
        let elf = fake_elf();
        let zst = with_size(zstd::bulk::compress(&elf, 19).unwrap(), elf.len());
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&elf).unwrap();
            with_size(e.finish().unwrap(), elf.len())
        };
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        for (name, payload) in [("zstd", zst), ("xz", xz), ("gzip", gz)] {
            let bz = dir.path().join(format!("bz-{name}"));
            std::fs::write(&bz, bzimage(&payload, 0x020f)).unwrap();
            let out = dir.path().join(format!("vmlinux-{name}"));
            extract_vmlinux(&bz, &out).unwrap();
            assert!(std::fs::read(&out).unwrap() == elf, "{name}");
        }
        // Only the two outputs and the inputs: no temp files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 6);
    }

    #[test]
    fn rejects_damaged_or_unsupported_images() {
        let elf = fake_elf();
        let good = zstd::bulk::compress(&elf, 3).unwrap();
        let err = |img: Vec<u8>| decompress_payload(&img).unwrap_err();

        assert!(err(vec![0; 4096]).contains("HdrS"));
        assert!(err(bzimage(&with_size(good.clone(), elf.len()), 0x0206)).contains("2.06"));
        // Size field disagrees with the data.
        assert!(
            err(bzimage(&with_size(good.clone(), elf.len() - 1), 0x020f)).contains("size field")
        );
        assert!(
            err(bzimage(&with_size(good.clone(), elf.len() + 7), 0x020f)).contains("size field")
        );
        assert!(err(bzimage(&with_size(good.clone(), 1 << 31), 0x020f)).contains("claims"));
        // Truncated compressed data.
        let mut cut = good[..good.len() / 2].to_vec();
        cut = with_size(cut, elf.len());
        assert!(err(bzimage(&cut, 0x020f)).contains("decompressing"));
        // Payload past the end of the file.
        let mut img = bzimage(&with_size(good.clone(), elf.len()), 0x020f);
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(err(img).contains("outside"));
        // bzip2 is not supported.
        assert!(
            err(bzimage(&with_size(b"BZh91AY&SY".to_vec(), 100), 0x020f)).contains("42 5a 68 39")
        );
        // Decompresses, but not to an ELF file.
        let text = b"not an elf at all".repeat(10);
        let not_elf = with_size(zstd::bulk::compress(&text, 3).unwrap(), text.len());
        assert!(err(bzimage(&not_elf, 0x020f)).contains("not an ELF"));

        let dir = tempfile::tempdir().unwrap();
        let bz = dir.path().join("bz");
        std::fs::write(&bz, vec![0; 100]).unwrap();
        let e = extract_vmlinux(&bz, &dir.path().join("out")).unwrap_err();
        assert!(matches!(e, Error::BadBzImage { .. }), "{e}");
        assert!(!dir.path().join("out").exists());
    }
}
