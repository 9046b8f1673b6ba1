//! Root filesystems made of Debian's busybox-static: one binary that runs
//! anywhere (a guest's rootfs has no libc), with a symlink per applet.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Debian's busybox-static.
pub fn path() -> Result<&'static Path> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("busybox not found: apt-get install busybox-static (scripts/install-deps)")
}

/// A bare root: `dirs`, `bin/busybox` and a symlink in `bin` for each of
/// `applets`; for tests that must see exactly what they put there.
pub fn minimal_rootfs(root: &Path, dirs: &[&str], applets: &[&str]) -> Result<()> {
    std::fs::create_dir_all(root.join("bin"))?;
    for d in dirs {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = path()?;
    std::fs::copy(busybox, root.join("bin/busybox"))
        .with_context(|| format!("copying {}", busybox.display()))?;
    link_applets(root, applets.iter().copied())
}

/// A root a container runtime can run anything busybox has in: every
/// applet, root's passwd and group entries, and the directories an OCI
/// runtime mounts onto.
pub fn rootfs(dir: &Path) -> Result<()> {
    let busybox = path()?;
    let out = std::process::Command::new(busybox).arg("--list").output()?;
    if !out.status.success() {
        bail!("busybox --list failed");
    }
    // A dynamically linked busybox would not run in the guest's rootfs.
    let ldd = std::process::Command::new("file").arg(busybox).output();
    if let Ok(o) = ldd {
        if String::from_utf8_lossy(&o.stdout).contains("dynamically linked") {
            bail!(
                "{} is dynamically linked: install busybox-static",
                busybox.display()
            );
        }
    }
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox"))?;
    let list = String::from_utf8_lossy(&out.stdout);
    link_applets(
        dir,
        list.lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/')),
    )?;
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

fn link_applets<'a>(root: &Path, applets: impl Iterator<Item = &'a str>) -> Result<()> {
    for applet in applets {
        let link = root.join("bin").join(applet);
        // An entry already there is kept, so a root can be built over again.
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_rootfs_has_only_what_was_asked() {
        let d = tempfile::tempdir().unwrap();
        minimal_rootfs(d.path(), &["proc", "tmp"], &["sh", "echo"]).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(d.path().join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["busybox", "echo", "sh"]);
        assert!(d.path().join("proc").is_dir() && d.path().join("tmp").is_dir());
        assert!(!d.path().join("etc").exists());
    }
}
