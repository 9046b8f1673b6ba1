//! Locating the external parts a sandbox needs (binaries, guest image), with
//! errors that say what is missing and how to get it.

use std::path::{Path, PathBuf};

/// Hint for parts `scripts/install-deps` installs.
pub const HINT_INSTALL_DEPS: &str = "run scripts/install-deps (as root)";
/// Hint for parts `make build` produces.
pub const HINT_MAKE_BUILD: &str =
    "run `make build` (builds husk-vmm, husk-vsock and the guest image)";

/// Hint for the guest kernel and initrd.
pub const HINT_GUEST_IMAGE: &str =
    "run `make guest-image` (husk-guest-image build --agent <static husk-agent>)";

/// A required binary or file does not exist.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{component} not found (looked at: {looked}); {hint}")]
pub struct MissingComponent {
    pub component: &'static str,
    pub looked: String,
    pub hint: &'static str,
}

/// Finds an executable: the explicit path if given (it must exist), else
/// `name` on PATH, else in `extra_dirs`.
pub fn find_binary(
    component: &'static str,
    name: &str,
    explicit: Option<&Path>,
    extra_dirs: &[PathBuf],
    hint: &'static str,
) -> Result<PathBuf, MissingComponent> {
    if let Some(p) = explicit {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(MissingComponent {
                component,
                looked: p.display().to_string(),
                hint,
            })
        };
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut looked = Vec::new();
    for dir in path_dirs.iter().chain(extra_dirs) {
        let cand = dir.join(name);
        if is_executable(&cand) {
            return Ok(cand);
        }
        looked.push(cand.display().to_string());
    }
    Err(MissingComponent {
        component,
        looked: format!("{name} on PATH, {}", looked.join(", ")),
        hint,
    })
}

/// Checks that a regular file exists.
pub fn require_file(
    component: &'static str,
    path: &Path,
    hint: &'static str,
) -> Result<PathBuf, MissingComponent> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(MissingComponent {
            component,
            looked: path.display().to_string(),
            hint,
        })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Directories where husk's own binaries may sit besides PATH: next to the
/// running executable (huskd and husk-vsock are built into the same
/// directory) and the install prefixes.
pub fn husk_binary_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("HUSK_BIN_DIR") {
        v.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            v.push(d.to_path_buf());
            // Test binaries live in target/<profile>/deps.
            if d.ends_with("deps") {
                if let Some(p) = d.parent() {
                    v.push(p.to_path_buf());
                }
            }
        }
    }
    v.push("/usr/local/libexec/husk".into());
    v.push("/usr/libexec/husk".into());
    v.push("/usr/local/bin".into());
    v
}

/// The guest kernel and initramfs.
#[derive(Debug, Clone, Default)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Where `husk-guest-image` installs by default.
pub const DEFAULT_GUEST_DIR: &str = "/var/lib/husk/guest";

impl GuestImage {
    /// `dir`/vmlinuz and `dir`/initrd.img, both required.
    pub fn from_dir(dir: &Path) -> Result<Self, MissingComponent> {
        const HINT: &str = HINT_GUEST_IMAGE;
        Ok(Self {
            kernel: require_file("guest kernel", &dir.join("vmlinuz"), HINT)?,
            initrd: require_file("guest initrd", &dir.join("initrd.img"), HINT)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_part_and_hint() {
        let e = find_binary(
            "QEMU",
            "qemu-does-not-exist",
            None,
            &[PathBuf::from("/nonexistent")],
            HINT_INSTALL_DEPS,
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("QEMU not found"), "{s}");
        assert!(s.contains("/nonexistent/qemu-does-not-exist"), "{s}");
        assert!(s.contains("install-deps"), "{s}");
        let e = find_binary("x", "sh", Some(Path::new("/nope/sh")), &[], "h").unwrap_err();
        assert_eq!(e.looked, "/nope/sh");
        assert_eq!(
            find_binary("sh", "sh", None, &[], "h")
                .unwrap()
                .file_name()
                .unwrap(),
            "sh"
        );
    }

    #[test]
    fn guest_image_missing() {
        let d = tempfile::tempdir().unwrap();
        let e = GuestImage::from_dir(d.path()).unwrap_err();
        assert_eq!(e.component, "guest kernel");
    }
}
