use super::*;

#[test]
fn ids() {
    assert!(validate_id("x", "abc-DEF_1.2").is_ok());
    assert!(validate_id("x", "").is_err());
    assert!(validate_id("x", "..").is_err());
    assert!(validate_id("x", "a/b").is_err());
    assert!(validate_id("x", &"a".repeat(65)).is_err());
    assert!(validate_id("x", &"a".repeat(64)).is_ok());
}

#[test]
fn console_tail_is_bounded_and_clean() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c");
    let mut s = String::new();
    for i in 0..100 {
        s.push_str(&format!("line {i}\x1b[0m\r\n"));
    }
    std::fs::write(&p, s).unwrap();
    let t = console_tail(&p, 20);
    let lines: Vec<_> = t.lines().collect();
    assert_eq!(lines.len(), 20);
    assert_eq!(lines[0], "line 80[0m");
    assert_eq!(lines[19], "line 99[0m");
    assert!(console_tail(&d.path().join("none"), 5).contains("no file at"));
    let mut s = String::from("boot\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n");
    for i in 0..30 {
        s.push_str(&format!("[ 1.0]  frame {i}\n"));
    }
    std::fs::write(&p, s).unwrap();
    let t = console_tail(&p, 20);
    assert!(
        t.starts_with(
            "[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n...\n[ 1.0]  frame 10"
        ),
        "{t}"
    );
}

/// A bind-mounted directory under a sandbox dir survives removal of the
/// sandbox dir: the mount is undone first, the host files stay.
#[test]
fn remove_dir_unmounts_first() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("keep"), "x").unwrap();
    let sb = d.path().join("sb");
    let target = sb.join("share/containers/c/rootfs");
    std::fs::create_dir_all(&target).unwrap();
    mounts::bind(&src, &target).unwrap();
    assert!(target.join("keep").exists());
    remove_sandbox_dir(&sb).unwrap();
    assert!(!sb.exists());
    assert!(src.join("keep").exists());
}

/// The guest's view of the share refuses every change to the directories
/// huskd later mounts on or removes (no planted symlink, rename or new
/// entry), while what is mounted over it stays writable.
#[test]
fn share_is_read_only_for_the_guest_except_its_data_mounts() {
    let d = tempfile::tempdir().unwrap();
    let sb = d.path().join("sb");
    std::fs::create_dir(&sb).unwrap();
    let paths = SandboxPaths::new(&sb);
    share::create(&paths).unwrap();
    let rootfs_rw = paths.container_rw("c").join("rootfs");
    std::fs::create_dir_all(&rootfs_rw).unwrap();
    let rootfs = paths.container("c").join("rootfs");
    assert!(
        rootfs.is_dir(),
        "made on the writable side, seen in the share"
    );
    std::fs::create_dir(paths.share_rw.join("pod")).unwrap();
    for f in ["hosts", "resolv.conf"] {
        std::fs::write(paths.share_rw.join("pod").join(f), "x").unwrap();
    }
    share::make_guest_writable(&paths, Path::new("pod/hosts")).unwrap();

    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    let c = paths.container("c");
    erofs(std::fs::remove_dir(&rootfs), "rmdir rootfs");
    erofs(
        std::fs::rename(&rootfs, c.join("moved")),
        "rename rootfs away",
    );
    erofs(
        std::os::unix::fs::symlink("/", c.join("mounts")),
        "plant a symlink",
    );
    erofs(
        std::fs::create_dir(c.join("mounts")),
        "mkdir in a container dir",
    );
    erofs(
        std::fs::rename(&paths.containers, paths.share.join("x")),
        "rename containers",
    );
    erofs(
        std::fs::write(paths.share.join("pod/resolv.conf"), "y"),
        "write resolv.conf",
    );
    std::fs::write(paths.share.join("pod/hosts"), "10.0.0.1 added\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(paths.share_rw.join("pod/hosts")).unwrap(),
        "10.0.0.1 added\n"
    );

    // A rootfs mounted on its mount point is writable through the share.
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    mounts::bind(&src, &rootfs).unwrap();
    std::fs::write(rootfs.join("data"), "ok").unwrap();
    assert!(src.join("data").exists());
    // The mount point cannot be removed from the writable side while mounted.
    let e = std::fs::remove_dir_all(paths.container_rw("c")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    assert!(rootfs.join("data").exists());

    remove_sandbox_dir(&sb).unwrap();
    assert!(!sb.exists());
    assert_eq!(std::fs::read_to_string(src.join("data")).unwrap(), "ok");
}
