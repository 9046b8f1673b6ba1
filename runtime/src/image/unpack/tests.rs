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
        let u = unpack_layer(&blob_path, &dest, &LayerLimits::default()).unwrap();
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
    let u = unpack_stream(&tar[..], dir.path(), &LayerLimits::default()).unwrap();
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
        let res = unpack_stream(&tar[..], layer.path(), &LayerLimits::default());
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
    unpack_stream(&tar[..], dir.path(), &LayerLimits::default()).unwrap();
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
    let res = unpack_stream(&tar[..1000], dir.path(), &LayerLimits::default());
    assert!(res.is_err());
}

/// `.wh.`, `.wh..` and `.wh...` would white out the entry's own
/// directory or its parent: at the top of a layer, the directory that
/// holds every layer of every image.
#[test]
fn whiteouts_naming_no_file_are_refused() {
    for bad in [".wh.", ".wh..", ".wh...", "a/.wh..", "a/.wh..."] {
        let layer = tempfile::tempdir().unwrap();
        let dest = layer.path().join("fs");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(layer.path().join("sibling"), "keep").unwrap();
        let tar = build(&[
            ("a/", tar::EntryType::Directory, b"", None),
            (bad, tar::EntryType::Regular, b"", None),
        ]);
        let res = unpack_stream(&tar[..], &dest, &LayerLimits::default());
        assert!(matches!(res, Err(UnpackError::Unsafe(_))), "{bad}: {res:?}");
        assert!(
            layer.path().join("sibling").exists(),
            "{bad} removed a sibling"
        );
    }
}

fn limits(max_bytes: u64, max_entries: u64, max_metadata_record: u64) -> LayerLimits {
    LayerLimits {
        max_bytes,
        max_entries,
        max_metadata_record,
    }
}

/// A decompression bomb: 64 MiB of zeros in a few kilobytes of gzip,
/// against a 16 MiB limit; refused while reading, nothing kept.
#[test]
fn decompression_bomb_is_refused() {
    let zeros = vec![0u8; 64 << 20];
    let tar = build(&[("big", tar::EntryType::Regular, &zeros, None)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < 1 << 20);
    let d = tempfile::tempdir().unwrap();
    let blob = d.path().join("blob");
    std::fs::write(&blob, &gz).unwrap();
    let dest = d.path().join("fs");
    std::fs::create_dir(&dest).unwrap();
    let res = unpack_layer(&blob, &dest, &limits(16 << 20, 100, 1 << 20));
    match res {
        Err(UnpackError::Unsafe(m)) => assert!(m.contains("bytes uncompressed"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn too_many_entries_are_refused() {
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let entries: Vec<_> = names
        .iter()
        .map(|n| (n.as_str(), tar::EntryType::Regular, &b"x"[..], None))
        .collect();
    let tar = build(&entries);
    let d = tempfile::tempdir().unwrap();
    let res = unpack_stream(&tar[..], d.path(), &limits(1 << 30, 20, 1 << 20));
    match res {
        Err(UnpackError::Unsafe(m)) => assert!(m.contains("more than 20 entries"), "{m}"),
        other => panic!("{other:?}"),
    }
    let d = tempfile::tempdir().unwrap();
    assert!(unpack_stream(&tar[..], d.path(), &limits(1 << 30, 50, 1 << 20)).is_ok());
}

/// A GNU long-name record and a PAX record larger than the limit are
/// refused before the tar crate reads them into memory; ones within it
/// (a long path, a PAX size override) unpack as before.
#[test]
fn oversized_metadata_records_are_refused() {
    let long = format!("{}file", "dir/".repeat(30));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
    let pax: Vec<(&str, &[u8])> = vec![("comment", &[b'c'; 4000][..])];
    b.append_pax_extensions(pax).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "after-pax", &b"abc"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let d = tempfile::tempdir().unwrap();
    unpack_stream(&tar[..], d.path(), &limits(1 << 30, 100, 8192)).unwrap();
    assert_eq!(std::fs::read(d.path().join(&long)).unwrap(), b"hello");
    assert_eq!(std::fs::read(d.path().join("after-pax")).unwrap(), b"abc");
    let d = tempfile::tempdir().unwrap();
    match unpack_stream(&tar[..], d.path(), &limits(1 << 30, 100, 256)) {
        Err(UnpackError::Unsafe(m)) => assert!(m.contains("metadata record"), "{m}"),
        other => panic!("{other:?}"),
    }
}
