//! huskd's records of pods and containers, persisted under
//! `<root>/state/{pods,containers}/<id>.json` so that a restarted huskd
//! lists, stops and removes what the previous one created.
//!
//! Every write goes to a temporary file in the same directory, is fsynced,
//! renamed over the record and the directory fsynced: after a crash a
//! record is either the old or the new version, never a torn one.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use k8s_cri::v1::{ContainerConfig, PodSandboxConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use husk_runtime::sandbox::SandboxRecord;

/// Pod sandbox state as CRI knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    Ready,
    NotReady,
}

/// Container state as CRI knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// What huskd remembers about a pod sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub config: PodSandboxConfig,
    /// The handler actually used (the default's name for "").
    pub runtime_handler: String,
    pub state: PodState,
    pub created_at_ns: i64,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The hypervisor description at start ("qemu (tcg): ...").
    pub hypervisor: String,
    /// Host processes of the VM as (role, pid), to clean up after a crash.
    pub pids: Vec<(String, u32)>,
    /// The sandbox directory under `state`.
    pub sandbox_dir: PathBuf,
    /// Why the pod is NotReady, when huskd knows.
    #[serde(default)]
    pub reason: String,
    /// The pod network as CNI set it up; kept after stop so that
    /// RemovePodSandbox (and a huskd restart) can release it again.
    #[serde(default)]
    pub network: Option<husk_runtime::network::PodNetwork>,
    /// What a later huskd needs to adopt the running sandbox (its backend's
    /// VM record and virtiofsd); `None` once the pod is stopped, and in
    /// records of older huskd versions, whose pods are not adopted.
    #[serde(default)]
    pub sandbox: Option<SandboxRecord>,
}

/// What huskd remembers about a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub config: ContainerConfig,
    /// The image as the caller asked for it.
    pub image_ref: String,
    /// The resolved image id (`sha256:...`).
    pub image_id: String,
    pub state: ContainerState,
    pub created_at_ns: i64,
    pub started_at_ns: i64,
    pub finished_at_ns: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// Absolute path of the CRI log file ("" when the pod has no log dir).
    pub log_path: PathBuf,
    /// Host bind mounts made for this container's CRI mounts.
    pub host_mounts: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("encoding {kind} record {id}: {source}")]
    Encode {
        kind: &'static str,
        id: String,
        source: serde_json::Error,
    },
}

#[derive(Debug, Default)]
struct Records {
    pods: BTreeMap<String, PodRecord>,
    containers: BTreeMap<String, ContainerRecord>,
}

/// The records, in memory and on disk. Methods persist first and update
/// memory only when the disk write succeeded.
#[derive(Debug)]
pub struct StateStore {
    pods_dir: PathBuf,
    containers_dir: PathBuf,
    records: Mutex<Records>,
}

/// Records that could not be read at load time (moved aside, not lost).
#[derive(Debug, Default)]
pub struct LoadReport {
    pub pods: usize,
    pub containers: usize,
    pub quarantined: Vec<(PathBuf, String)>,
}

impl StateStore {
    /// Opens (creating) `<root>/state` and loads every record. Unreadable
    /// records are renamed to `*.corrupt` and reported.
    pub fn open(root: &Path) -> Result<(Self, LoadReport), StateError> {
        let base = root.join("state");
        let pods_dir = base.join("pods");
        let containers_dir = base.join("containers");
        for d in [&pods_dir, &containers_dir] {
            fs::create_dir_all(d).map_err(|source| StateError::Io {
                what: "creating",
                path: d.clone(),
                source,
            })?;
        }
        let mut report = LoadReport::default();
        let pods: BTreeMap<String, PodRecord> = load_dir(&pods_dir, &mut report)?;
        let containers: BTreeMap<String, ContainerRecord> = load_dir(&containers_dir, &mut report)?;
        report.pods = pods.len();
        report.containers = containers.len();
        let store = Self {
            pods_dir,
            containers_dir,
            records: Mutex::new(Records { pods, containers }),
        };
        Ok((store, report))
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn put_pod(&self, rec: PodRecord) -> Result<(), StateError> {
        write_record(&self.pods_dir, "pod", &rec.id, &rec)?;
        self.lock().pods.insert(rec.id.clone(), rec);
        Ok(())
    }

    pub fn put_container(&self, rec: ContainerRecord) -> Result<(), StateError> {
        write_record(&self.containers_dir, "container", &rec.id, &rec)?;
        self.lock().containers.insert(rec.id.clone(), rec);
        Ok(())
    }

    /// Applies `f` to a pod record and persists it; `None` if absent.
    pub fn update_pod(
        &self,
        id: &str,
        f: impl FnOnce(&mut PodRecord),
    ) -> Result<Option<PodRecord>, StateError> {
        let Some(mut rec) = self.pod(id) else {
            return Ok(None);
        };
        f(&mut rec);
        self.put_pod(rec.clone())?;
        Ok(Some(rec))
    }

    pub fn update_container(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerRecord),
    ) -> Result<Option<ContainerRecord>, StateError> {
        let Some(mut rec) = self.container(id) else {
            return Ok(None);
        };
        f(&mut rec);
        self.put_container(rec.clone())?;
        Ok(Some(rec))
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), StateError> {
        remove_record(&self.pods_dir, id)?;
        self.lock().pods.remove(id);
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), StateError> {
        remove_record(&self.containers_dir, id)?;
        self.lock().containers.remove(id);
        Ok(())
    }

    pub fn pod(&self, id: &str) -> Option<PodRecord> {
        self.lock().pods.get(id).cloned()
    }

    pub fn container(&self, id: &str) -> Option<ContainerRecord> {
        self.lock().containers.get(id).cloned()
    }

    pub fn pods(&self) -> Vec<PodRecord> {
        self.lock().pods.values().cloned().collect()
    }

    pub fn containers(&self) -> Vec<ContainerRecord> {
        self.lock().containers.values().cloned().collect()
    }

    pub fn containers_of(&self, pod_id: &str) -> Vec<ContainerRecord> {
        self.lock()
            .containers
            .values()
            .filter(|c| c.pod_id == pod_id)
            .cloned()
            .collect()
    }

    /// Resolves a full id or a unique prefix (as crictl users type them).
    pub fn resolve_pod(&self, id: &str) -> Resolved {
        resolve(self.lock().pods.keys(), id)
    }

    pub fn resolve_container(&self, id: &str) -> Resolved {
        resolve(self.lock().containers.keys(), id)
    }
}

/// Result of an id lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Found(String),
    NotFound,
    Ambiguous(usize),
}

fn resolve<'a>(keys: impl Iterator<Item = &'a String>, id: &str) -> Resolved {
    let mut found = None;
    let mut n = 0;
    for k in keys {
        if k == id {
            return Resolved::Found(k.clone());
        }
        if k.starts_with(id) {
            n += 1;
            found = Some(k.clone());
        }
    }
    match (n, found) {
        (1, Some(k)) => Resolved::Found(k),
        (0, _) => Resolved::NotFound,
        _ => Resolved::Ambiguous(n),
    }
}

fn load_dir<T: DeserializeOwned>(
    dir: &Path,
    report: &mut LoadReport,
) -> Result<BTreeMap<String, T>, StateError> {
    let mut out = BTreeMap::new();
    let rd = fs::read_dir(dir).map_err(|source| StateError::Io {
        what: "reading",
        path: dir.into(),
        source,
    })?;
    for entry in rd {
        let entry = entry.map_err(|source| StateError::Io {
            what: "reading",
            path: dir.into(),
            source,
        })?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if husk_runtime::files::is_temporary(entry.file_name().as_os_str()) {
            // An interrupted write; the record it was replacing is intact.
            let _ = fs::remove_file(&path);
            continue;
        }
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(rec) => {
                out.insert(id.to_string(), rec);
            }
            Err(why) => {
                let aside = path.with_extension("json.corrupt");
                let _ = fs::rename(&path, &aside);
                report.quarantined.push((aside, why));
            }
        }
    }
    Ok(out)
}

/// Atomically replaces `<dir>/<id>.json`.
fn write_record<T: Serialize>(
    dir: &Path,
    kind: &'static str,
    id: &str,
    rec: &T,
) -> Result<(), StateError> {
    let json = serde_json::to_vec_pretty(rec).map_err(|source| StateError::Encode {
        kind,
        id: id.into(),
        source,
    })?;
    atomic_write(&dir.join(format!("{id}.json")), &json)
}

/// Replaces `path` atomically and durably ([`husk_runtime::files::write_atomic`]).
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<(), StateError> {
    husk_runtime::files::write_atomic(path, data).map_err(|e| StateError::Io {
        what: e.op,
        path: e.path,
        source: e.source,
    })
}

fn remove_record(dir: &Path, id: &str) -> Result<(), StateError> {
    let path = dir.join(format!("{id}.json"));
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io {
            what: "removing",
            path,
            source,
        }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StateError::Io {
            what: "syncing directory",
            path: dir.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_runtime::hypervisor::VmRecord;
    use husk_runtime::process::ProcessIdentity;
    use k8s_cri::v1::{ContainerMetadata, PodSandboxMetadata};

    fn pod(id: &str) -> PodRecord {
        PodRecord {
            id: id.into(),
            config: PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "p".into(),
                    uid: "u".into(),
                    namespace: "ns".into(),
                    attempt: 1,
                }),
                log_directory: "/var/log/pods/x".into(),
                ..Default::default()
            },
            runtime_handler: "husk".into(),
            state: PodState::Ready,
            created_at_ns: 42,
            vcpus: 1,
            memory_mib: 256,
            hypervisor: "qemu (tcg): test".into(),
            pids: vec![("qemu".into(), 1234)],
            sandbox_dir: "/run/husk/sandboxes/x".into(),
            reason: String::new(),
            network: None,
            sandbox: Some(SandboxRecord {
                vm: VmRecord {
                    backend: "qemu".into(),
                    processes: vec![ProcessIdentity {
                        role: "qemu".into(),
                        pid: 1234,
                        start_time: 99,
                    }],
                    state: serde_json::json!({"qmp": "/run/husk/sandboxes/x/qmp.sock"}),
                },
                virtiofsd: ProcessIdentity {
                    role: "virtiofsd".into(),
                    pid: 1235,
                    start_time: 99,
                },
            }),
        }
    }

    fn container(id: &str, pod_id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            pod_id: pod_id.into(),
            config: ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "c".into(),
                    attempt: 0,
                }),
                ..Default::default()
            },
            image_ref: "busybox".into(),
            image_id: "sha256:00".into(),
            state: ContainerState::Created,
            created_at_ns: 1,
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: "/var/log/pods/x/c/0.log".into(),
            host_mounts: vec![],
        }
    }

    #[test]
    fn records_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let (s, r) = StateStore::open(d.path()).unwrap();
            assert_eq!((r.pods, r.containers), (0, 0));
            s.put_pod(pod("aaa1")).unwrap();
            s.put_pod(pod("aaa2")).unwrap();
            s.put_container(container("ccc", "aaa1")).unwrap();
            s.update_container("ccc", |c| c.state = ContainerState::Running)
                .unwrap()
                .unwrap();
            s.remove_pod("aaa2").unwrap();
            s.remove_pod("never-existed").unwrap();
        }
        let (s, r) = StateStore::open(d.path()).unwrap();
        assert_eq!((r.pods, r.containers), (1, 1));
        assert_eq!(s.pod("aaa1").unwrap(), pod("aaa1"));
        assert_eq!(s.container("ccc").unwrap().state, ContainerState::Running);
        assert_eq!(s.containers_of("aaa1").len(), 1);
        // No temporaries left behind.
        let names: Vec<_> = fs::read_dir(d.path().join("state/pods"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["aaa1.json"]);
    }

    #[test]
    fn corrupt_and_interrupted_records() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = StateStore::open(d.path()).unwrap();
        s.put_pod(pod("good")).unwrap();
        drop(s);
        let pods = d.path().join("state/pods");
        fs::write(pods.join("bad.json"), b"{\"id\": ").unwrap();
        fs::write(pods.join(".good.json.tmp99"), b"half").unwrap();
        let (s, r) = StateStore::open(d.path()).unwrap();
        assert_eq!(r.pods, 1);
        assert_eq!(r.quarantined.len(), 1);
        assert!(pods.join("bad.json.corrupt").exists());
        assert!(!pods.join(".good.json.tmp99").exists());
        assert!(s.pod("good").is_some());
    }

    /// A record written before `sandbox` existed still loads (and is not
    /// adopted).
    #[test]
    fn old_pod_record_loads() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = StateStore::open(d.path()).unwrap();
        s.put_pod(pod("old")).unwrap();
        drop(s);
        let path = d.path().join("state/pods/old.json");
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("sandbox").unwrap();
        fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let (s, r) = StateStore::open(d.path()).unwrap();
        assert!(r.quarantined.is_empty(), "{:?}", r.quarantined);
        let p = s.pod("old").unwrap();
        assert!(p.sandbox.is_none());
        assert_eq!(p.pids, pod("old").pids);
    }

    #[test]
    fn prefix_resolution() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = StateStore::open(d.path()).unwrap();
        s.put_pod(pod("abc1")).unwrap();
        s.put_pod(pod("abc2")).unwrap();
        assert_eq!(s.resolve_pod("abc1"), Resolved::Found("abc1".into()));
        assert_eq!(s.resolve_pod("abc"), Resolved::Ambiguous(2));
        assert_eq!(s.resolve_pod("x"), Resolved::NotFound);
        s.remove_pod("abc2").unwrap();
        assert_eq!(s.resolve_pod("ab"), Resolved::Found("abc1".into()));
    }
}
