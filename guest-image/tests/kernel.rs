//! The shared kernel tree against the real Debian kernel package (needs apt
//! with the package in its lists, dpkg-deb and depmod; the .deb is taken from
//! /var/cache/husk/debs when `make guest-image` already fetched it).

use std::path::Path;

use husk_guest_image::kernel::{KERNEL_TREE_MARKER, VMLINUX_FILE};
use husk_guest_image::{extract_vmlinux, kernel_tree, KernelOptions, DEFAULT_CACHE_DIR};

/// Seeds a fresh cache with the already downloaded .deb (it is verified
/// against apt's index before use anyway), to spare a 34 MB download.
fn fresh_cache(dir: &Path) -> KernelOptions {
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    if let Ok(rd) = std::fs::read_dir(Path::new(DEFAULT_CACHE_DIR).join("debs")) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".deb") {
                std::fs::copy(e.path(), debs.join(e.file_name())).unwrap();
            }
        }
    }
    KernelOptions {
        cache_dir: dir.to_path_buf(),
        ..KernelOptions::default()
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn kernel_tree_is_unpacked_once_shared_and_repaired() {
    let work = tempfile::tempdir().unwrap();
    let opts = fresh_cache(work.path());

    // Three callers at once on an empty cache: all get the same complete tree.
    let trees: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| kernel_tree(&opts))).collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    let tree = &trees[0];
    for t in &trees {
        assert_eq!(t.root, tree.root);
        assert_eq!(t.release, tree.release);
    }
    let kernels = work.path().join("kernels");
    // One tree, no work directories left behind by the losers of the race.
    assert_eq!(
        entries(&kernels),
        [format!("{}.v1", tree.package.sha256)],
        "{}",
        kernels.display()
    );
    assert!(tree.release.starts_with("6.12."), "{}", tree.release);
    assert_eq!(
        tree.vmlinuz,
        tree.root.join(format!("boot/vmlinuz-{}", tree.release))
    );
    assert_eq!(
        tree.modules_dir,
        tree.root.join("lib/modules").join(&tree.release)
    );
    assert!(tree.modules_dir.join("modules.dep").is_file());
    assert!(tree.root.join(KERNEL_TREE_MARKER).is_file());

    // The ELF kernel is the one inside this bzImage: x86-64, and it carries
    // this release's banner.
    let vmlinux = std::fs::read(&tree.vmlinux).unwrap();
    assert_eq!(tree.vmlinux, tree.root.join(VMLINUX_FILE));
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    assert_eq!(vmlinux[4], 2, "ELFCLASS64");
    assert_eq!(
        u16::from_le_bytes([vmlinux[18], vmlinux[19]]),
        62,
        "EM_X86_64"
    );
    assert!(vmlinux.len() as u64 > std::fs::metadata(&tree.vmlinuz).unwrap().len());
    assert!(contains(
        &vmlinux,
        format!("Linux version {} ", tree.release).as_bytes()
    ));
    let again = work.path().join("vmlinux-again");
    extract_vmlinux(&tree.vmlinuz, &again).unwrap();
    assert!(std::fs::read(&again).unwrap() == vmlinux);

    // Modules resolve through the generated modules.dep and decompress.
    let wanted: Vec<String> = ["virtio_mmio", "vmw_vsock_virtio_transport", "overlay"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let resolved = tree.resolve_modules(&wanted).unwrap();
    let names: Vec<&str> = resolved
        .load_order
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "virtio_mmio",
            "vsock",
            "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport",
            "overlay"
        ]
    );
    for m in &resolved.load_order {
        assert!(tree.read_module(m).unwrap().starts_with(b"\x7fELF"));
    }

    // The second call finds it.
    let cached = kernel_tree(&opts).unwrap();
    assert!(cached.cached);
    assert_eq!(cached.root, tree.root);

    // A damaged tree (truncated vmlinux) is noticed and unpacked again.
    std::fs::write(&tree.vmlinux, b"\x7fELF").unwrap();
    let repaired = kernel_tree(&opts).unwrap();
    assert!(!repaired.cached);
    assert!(std::fs::read(&repaired.vmlinux).unwrap() == vmlinux);
    assert_eq!(entries(&kernels).len(), 1);
}

#[test]
fn unknown_kernel_package_is_an_error() {
    let work = tempfile::tempdir().unwrap();
    let opts = KernelOptions {
        cache_dir: work.path().to_path_buf(),
        kernel_package: "linux-image-husk-does-not-exist".into(),
    };
    let err = kernel_tree(&opts).unwrap_err().to_string();
    assert!(
        err.contains("linux-image-husk-does-not-exist") && err.contains("install-deps"),
        "{err}"
    );
}
