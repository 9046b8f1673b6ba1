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
