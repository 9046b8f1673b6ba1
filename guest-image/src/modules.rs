//! Kernel module selection: resolve husk's module list against `modules.dep`
//! into a load order (dependencies first), and decompress the `.ko` files so
//! the agent can load them with `finit_module` without relying on in-kernel
//! decompression.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Modules husk's guest needs, in the order the agent should ask for them.
/// Dependencies (e.g. `net_failover`, `failover` for `virtio_net`) are pulled in
/// from `modules.dep` even when not listed; listing them documents the intent.
/// `virtio_rng` is built in on some kernels: a built-in module is skipped.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "overlay",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_rng",
];

/// One module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleEntry {
    /// Canonical module name (`-` replaced by `_`), e.g. `virtio_rng`.
    pub name: String,
    /// Path relative to `/lib/modules/<release>/` as listed in modules.dep,
    /// e.g. `kernel/drivers/virtio/virtio_mmio.ko.xz`.
    pub source_rel: String,
    /// Path relative to `/lib/modules/<release>/` after decompression
    /// (the compression suffix removed), e.g. `kernel/drivers/virtio/virtio_mmio.ko`.
    pub rel: String,
}

/// The outcome of resolving the requested module list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Modules to load, dependencies first.
    pub load_order: Vec<ModuleEntry>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

/// Canonical module name: kmod treats `-` and `_` as the same character.
pub fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a path like `kernel/drivers/char/hw_random/virtio-rng.ko.xz`.
fn name_of_path(rel: &str) -> Option<String> {
    let file = rel.rsplit('/').next()?;
    let stem = file.split_once(".ko").map(|(s, _)| s)?;
    (!stem.is_empty()).then(|| canonical_name(stem))
}

/// The path a module has once decompressed.
fn decompressed_rel(rel: &str) -> String {
    for suffix in [".xz", ".zst", ".gz"] {
        if let Some(stripped) = rel.strip_suffix(suffix) {
            return stripped.to_string();
        }
    }
    rel.to_string()
}

/// Parsed `modules.dep`: module name -> (path, direct-or-transitive deps as paths).
#[derive(Debug, Default)]
pub struct ModulesDep {
    by_name: BTreeMap<String, (String, Vec<String>)>,
    name_by_path: BTreeMap<String, String>,
}

impl ModulesDep {
    /// Parses the text of a `modules.dep` file (`path: dep dep ...` per line).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut dep = ModulesDep::default();
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || Error::BadModulesDep {
                line: lineno + 1,
                text: line.to_string(),
            };
            let (path, deps) = line.split_once(':').ok_or_else(bad)?;
            let path = path.trim().to_string();
            let name = name_of_path(&path).ok_or_else(bad)?;
            let deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            dep.name_by_path.insert(path.clone(), name.clone());
            dep.by_name.insert(name, (path, deps));
        }
        Ok(dep)
    }

    /// Resolves `requested` into a load order with every module after its
    /// dependencies. The order is a depth-first post-order walk in request
    /// order, so it is fully determined by the inputs. Names found in
    /// `builtin` (from `modules.builtin`) are reported, not loaded; a name in
    /// neither is an error.
    pub fn resolve(
        &self,
        requested: &[String],
        builtin: &BTreeSet<String>,
        release: &str,
    ) -> Result<Resolved, Error> {
        let mut out = Resolved {
            load_order: Vec::new(),
            builtin: Vec::new(),
        };
        let mut done = BTreeSet::new();
        for want in requested {
            let name = canonical_name(want);
            if self.by_name.contains_key(&name) {
                let mut visiting = Vec::new();
                self.visit(&name, &mut visiting, &mut done, &mut out.load_order)?;
            } else if builtin.contains(&name) {
                if !out.builtin.contains(&name) {
                    out.builtin.push(name);
                }
            } else {
                return Err(Error::ModuleNotFound {
                    module: want.clone(),
                    release: release.to_string(),
                });
            }
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        visiting: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<ModuleEntry>,
    ) -> Result<(), Error> {
        if done.contains(name) {
            return Ok(());
        }
        if visiting.iter().any(|n| n == name) {
            visiting.push(name.to_string());
            return Err(Error::ModuleCycle {
                chain: visiting.join(" -> "),
            });
        }
        let (path, deps) = self
            .by_name
            .get(name)
            .ok_or_else(|| Error::ModuleNotFound {
                module: name.to_string(),
                release: String::new(),
            })?;
        visiting.push(name.to_string());
        for dep_path in deps {
            let dep_name = self.name_by_path.get(dep_path).cloned().ok_or_else(|| {
                Error::BadModuleDependency {
                    module: name.to_string(),
                    dependency: dep_path.clone(),
                }
            })?;
            self.visit(&dep_name, visiting, done, order)?;
        }
        visiting.pop();
        done.insert(name.to_string());
        order.push(ModuleEntry {
            name: name.to_string(),
            source_rel: path.clone(),
            rel: decompressed_rel(path),
        });
        Ok(())
    }
}

/// Parses `modules.builtin` (one `kernel/.../name.ko` per line) into names.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| name_of_path(l.trim()))
        .collect()
}

/// Reads a module file and returns the uncompressed ELF object.
pub fn read_decompressed(path: &Path) -> Result<Vec<u8>, Error> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let name = path.to_string_lossy();
    let decode_err = |e: std::io::Error| Error::Decompress {
        path: path.to_path_buf(),
        source: e,
    };
    let data = if name.ends_with(".ko.xz") {
        let mut out = Vec::new();
        liblzma::read::XzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(decode_err)?;
        out
    } else if name.ends_with(".ko.zst") {
        zstd::stream::decode_all(&raw[..]).map_err(decode_err)?
    } else if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(decode_err)?;
        out
    } else {
        raw
    };
    if !data.starts_with(b"\x7fELF") {
        return Err(Error::Decompress {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "decompressed module is not an ELF object",
            ),
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/overlayfs/overlay.ko.xz:
kernel/drivers/virtio/virtio_mmio.ko.xz:
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/net/vmw_vsock/vsock.ko.xz:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz
kernel/drivers/char/hw_random/virtio-rng.ko.zst:
kernel/unrelated/foo.ko:
";

    fn names(r: &Resolved) -> Vec<&str> {
        r.load_order.iter().map(|m| m.name.as_str()).collect()
    }

    fn req(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn position(r: &Resolved, name: &str) -> usize {
        r.load_order.iter().position(|m| m.name == name).unwrap()
    }

    #[test]
    fn dependencies_come_first_and_each_module_once() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let r = dep
            .resolve(
                &req(&["virtio_net", "vmw_vsock_virtio_transport", "vsock"]),
                &BTreeSet::new(),
                "r",
            )
            .unwrap();
        assert_eq!(
            names(&r),
            [
                "failover",
                "net_failover",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
            ]
        );
        // Every module after all of its dependencies.
        for m in &r.load_order {
            let (_, deps) = &dep.by_name[&m.name];
            for d in deps {
                let dn = &dep.name_by_path[d];
                assert!(
                    position(&r, dn) < position(&r, &m.name),
                    "{dn} before {}",
                    m.name
                );
            }
        }
        assert_eq!(r.load_order.len(), 6);
    }

    #[test]
    fn exact_order_for_the_default_list() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let r = dep
            .resolve(&req(DEFAULT_MODULES), &BTreeSet::new(), "r")
            .unwrap();
        assert_eq!(
            names(&r),
            [
                "virtio_mmio",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "overlay",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng",
            ]
        );
        let rng = r.load_order.last().unwrap();
        assert_eq!(
            rng.source_rel,
            "kernel/drivers/char/hw_random/virtio-rng.ko.zst"
        );
        assert_eq!(rng.rel, "kernel/drivers/char/hw_random/virtio-rng.ko");
        assert!(r.builtin.is_empty());
    }

    #[test]
    fn dependency_pulled_in_even_when_not_requested() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let r = dep
            .resolve(&req(&["virtio-net"]), &BTreeSet::new(), "r")
            .unwrap();
        assert_eq!(names(&r), ["failover", "net_failover", "virtio_net"]);
    }

    #[test]
    fn builtin_is_skipped_and_unknown_is_an_error() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let builtin = parse_builtin(
            "kernel/drivers/char/hw_random/rng-core.ko\nkernel/fs/fuse/virtiofs.ko\n",
        );
        let r = dep
            .resolve(&req(&["virtiofs", "overlay"]), &builtin, "r")
            .unwrap();
        assert_eq!(names(&r), ["overlay"]);
        assert_eq!(r.builtin, ["virtiofs"]);
        let err = dep
            .resolve(&req(&["no_such_mod"]), &builtin, "6.12.0-test")
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no_such_mod") && msg.contains("6.12.0-test"),
            "{msg}"
        );
    }

    #[test]
    fn cycles_and_dangling_dependencies_are_errors() {
        let cyc = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        let err = cyc
            .resolve(&req(&["a"]), &BTreeSet::new(), "r")
            .unwrap_err();
        assert!(matches!(err, Error::ModuleCycle { .. }), "{err}");
        let dangling = ModulesDep::parse("a.ko: gone.ko\n").unwrap();
        let err = dangling
            .resolve(&req(&["a"]), &BTreeSet::new(), "r")
            .unwrap_err();
        assert!(err.to_string().contains("gone.ko"), "{err}");
        assert!(matches!(
            ModulesDep::parse("no colon here").unwrap_err(),
            Error::BadModulesDep { line: 1, .. }
        ));
    }

    #[test]
    fn decompresses_all_supported_formats() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let elf = b"\x7fELF fake module body".to_vec();
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::bulk::compress(&elf, 3).unwrap();
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        for (name, data) in [
            ("a.ko.xz", xz),
            ("b.ko.zst", zst),
            ("c.ko.gz", gz),
            ("d.ko", elf.clone()),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            assert_eq!(read_decompressed(&p).unwrap(), elf, "{name}");
        }
        let p = dir.path().join("bad.ko.xz");
        std::fs::write(&p, b"not xz").unwrap();
        assert!(read_decompressed(&p)
            .unwrap_err()
            .to_string()
            .contains("bad.ko.xz"));
    }
}
