//! Finding, downloading and verifying the kernel package through apt.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::Error;

/// A concrete kernel package as apt describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// The name that was asked for (often a meta package).
    pub requested: String,
    /// The package holding the kernel image, e.g. `linux-image-6.12.117+deb12-cloud-amd64`.
    pub package: String,
    /// Its version, e.g. `6.12.117-1~deb12u1`.
    pub version: String,
    /// `Filename:` from the archive index (pool path).
    pub filename: String,
    /// SHA256 of the .deb from the archive index (lowercase hex).
    pub sha256: String,
    /// Size of the .deb from the archive index.
    pub size: u64,
}

/// Runs a tool, mapping "not installed" and failures to errors naming it.
pub(crate) fn run(
    cmd: &mut Command,
    tool: &'static str,
    package: &'static str,
) -> Result<String, Error> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ToolMissing { tool, package }
        } else {
            Error::ToolFailed {
                tool,
                detail: e.to_string(),
            }
        }
    })?;
    if !out.status.success() {
        return Err(Error::ToolFailed {
            tool,
            detail: format!(
                "{:?} exited with {}: {}",
                cmd,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| Error::ToolFailed {
        tool,
        detail: "output is not UTF-8".to_string(),
    })
}

/// The first stanza of `apt-cache show`, as (field, value) pairs.
/// Continuation lines are dropped: no field we read spans lines.
pub fn parse_first_stanza(text: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !fields.is_empty() {
                break;
            }
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            fields.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    fields
}

fn field<'a>(stanza: &'a [(String, String)], name: &str) -> Option<&'a str> {
    stanza
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// If `depends` pins another `linux-image-*` package to an exact version,
/// this is a meta package: returns that (name, version).
pub fn meta_target(depends: &str) -> Option<(String, String)> {
    depends.split(',').find_map(|alt| {
        // Only unconditional dependencies (no `|` alternatives) count.
        if alt.contains('|') {
            return None;
        }
        let alt = alt.trim();
        let (name, rest) = alt.split_once(' ')?;
        let name = name.split(':').next()?; // strip a `:any` arch qualifier
        let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
        (name.starts_with("linux-image-") && !version.is_empty())
            .then(|| (name.to_string(), version.to_string()))
    })
}

/// The first `apt-cache show` stanza for `spec` (`name` or `name=version`);
/// `--no-all-versions` limits a bare name to apt's candidate version.
fn show(spec: &str) -> Result<Vec<(String, String)>, Error> {
    let text = run(
        Command::new("apt-cache")
            .args(["show", "--no-all-versions"])
            .arg(spec),
        "apt-cache",
        "apt",
    )
    .map_err(|e| match e {
        Error::ToolFailed { .. } => Error::PackageNotFound {
            package: spec.to_string(),
        },
        other => other,
    })?;
    let stanza = parse_first_stanza(&text);
    if field(&stanza, "Package").is_none() || field(&stanza, "Version").is_none() {
        return Err(Error::PackageNotFound {
            package: spec.to_string(),
        });
    }
    Ok(stanza)
}

/// Resolves `requested` (a meta package or a concrete one) to the package
/// that holds the kernel, following exact-version `linux-image-*`
/// dependencies of meta packages. Each `apt-cache` run loads apt's whole
/// cache (~0.4 s CPU), so this makes as few as it can: one per level.
pub fn resolve(requested: &str) -> Result<KernelPackage, Error> {
    let mut stanza = show(requested)?;
    // Meta packages are one level deep in Debian; a few levels tolerate
    // transitional packages without looping forever on a broken index.
    for _ in 0..4 {
        let name = field(&stanza, "Package").unwrap_or_default().to_string();
        let version = field(&stanza, "Version").unwrap_or_default().to_string();
        if let Some((next, next_version)) = field(&stanza, "Depends").and_then(meta_target) {
            stanza = show(&format!("{next}={next_version}"))?;
            continue;
        }
        let missing = |what: &str| Error::BadPackageIndex {
            package: format!("{name}={version}"),
            detail: format!("no {what} field in `apt-cache show`"),
        };
        let sha256 = field(&stanza, "SHA256").ok_or_else(|| missing("SHA256"))?;
        let filename = field(&stanza, "Filename").ok_or_else(|| missing("Filename"))?;
        let size = field(&stanza, "Size")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| missing("Size"))?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadPackageIndex {
                package: format!("{name}={version}"),
                detail: format!("SHA256 `{sha256}` is not a SHA-256 digest"),
            });
        }
        return Ok(KernelPackage {
            requested: requested.to_string(),
            package: name,
            version,
            filename: filename.to_string(),
            sha256: sha256.to_ascii_lowercase(),
            size,
        });
    }
    Err(Error::BadPackageIndex {
        package: requested.to_string(),
        detail: "too many levels of meta packages".to_string(),
    })
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Returns the path of the verified .deb in `debs_dir`, downloading it with
/// `apt-get download` when it is absent or does not match the index.
pub fn fetch(pkg: &KernelPackage, debs_dir: &Path) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(debs_dir).map_err(|e| Error::io(debs_dir, e))?;
    let base = pkg
        .filename
        .rsplit('/')
        .next()
        .filter(|b| b.ends_with(".deb") && !b.starts_with('.'))
        .ok_or_else(|| Error::BadPackageIndex {
            package: pkg.package.clone(),
            detail: format!("Filename `{}` does not name a .deb", pkg.filename),
        })?;
    let dest = debs_dir.join(base);
    if dest.exists() {
        if sha256_file(&dest)? == pkg.sha256 {
            tracing::debug!(path = %dest.display(), "kernel package already downloaded");
            return Ok(dest);
        }
        tracing::warn!(path = %dest.display(), "cached kernel package does not match the apt index; downloading again");
    }
    // Download into a private directory and rename only after verifying, so a
    // half-written or wrong file never sits under the final name.
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(debs_dir)
        .map_err(|e| Error::io(debs_dir, e))?;
    run(
        Command::new("apt-get")
            .current_dir(tmp.path())
            // We already run in a private directory; apt's `_apt` user cannot
            // write there and would only print a warning and fall back.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{}={}", pkg.package, pkg.version)),
        "apt-get",
        "apt",
    )
    .map_err(|e| match e {
        Error::ToolFailed { detail, .. } => Error::DownloadFailed {
            package: format!("{}={}", pkg.package, pkg.version),
            detail,
        },
        other => other,
    })?;
    let mut debs = Vec::new();
    for entry in std::fs::read_dir(tmp.path()).map_err(|e| Error::io(tmp.path(), e))? {
        let entry = entry.map_err(|e| Error::io(tmp.path(), e))?;
        if entry.file_name().to_string_lossy().ends_with(".deb") {
            debs.push(entry.path());
        }
    }
    let [got] = debs.as_slice() else {
        return Err(Error::DownloadFailed {
            package: format!("{}={}", pkg.package, pkg.version),
            detail: format!(
                "expected one .deb from apt-get download, found {}",
                debs.len()
            ),
        });
    };
    let actual = sha256_file(got)?;
    if actual != pkg.sha256 {
        return Err(Error::ChecksumMismatch {
            path: got.clone(),
            expected: pkg.sha256.clone(),
            actual,
        });
    }
    std::fs::rename(got, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_package_dependency() {
        assert_eq!(
            meta_target("linux-image-6.12.117+deb12-cloud-amd64 (= 6.12.117-1~deb12u1)"),
            Some((
                "linux-image-6.12.117+deb12-cloud-amd64".to_string(),
                "6.12.117-1~deb12u1".to_string()
            ))
        );
        // A concrete kernel package depends on tools, not on another image.
        assert_eq!(
            meta_target("kmod, initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"),
            None
        );
        assert_eq!(meta_target("linux-image-foo (>= 1) "), None);
    }

    #[test]
    fn first_stanza_only() {
        let text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nVersion: 2\n";
        let s = parse_first_stanza(text);
        assert_eq!(field(&s, "package"), Some("a"));
        assert_eq!(field(&s, "Version"), Some("1"));
        assert_eq!(s.len(), 3);
    }
}
