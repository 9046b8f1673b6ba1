//! The control socket's server (and a blocking client). The protocol's types are
//! `husk_vmm_api::control`'s, shared with huskd.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::arch::x86_64::cpuid::Accel;
use crate::builder::{PauseHandle, StopHandle, VmState};
use crate::devices::bus::lock;

pub use husk_vmm_api::control::{Reply, Request, Status};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// Shared, updated by the VMM's main thread.
pub struct StatusSource {
    pub id: String,
    pub accel: Accel,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub started: Instant,
    pub state: Mutex<VmState>,
}

impl StatusSource {
    fn snapshot(&self) -> Status {
        Status {
            id: self.id.clone(),
            pid: std::process::id(),
            state: *lock(&self.state),
            accel: match self.accel {
                Accel::Hardware => "kvm (hardware virtualization)".into(),
                Accel::Pvm => "kvm-pvm (instruction emulator)".into(),
            },
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

pub struct ControlServer {
    path: PathBuf,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn handle_conn(stream: UnixStream, status: &StatusSource, stop: &StopHandle, pause: &PauseHandle) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_REQUEST).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            let _ = writeln!(out, "{}", Reply::error("request too long"));
            return;
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Status) => Reply::status(status.snapshot()),
            Ok(Request::Shutdown) => {
                stop.request_stop();
                Reply::ok()
            }
            Ok(Request::Pause) => {
                if pause.pause() {
                    *lock(&status.state) = VmState::Paused;
                    Reply::ok()
                } else {
                    Reply::error("vCPUs did not stop within 1 s")
                }
            }
            Ok(Request::Resume) => {
                pause.resume();
                *lock(&status.state) = VmState::Running;
                Reply::ok()
            }
            Err(e) => Reply::error(format!("bad request: {e}")),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

impl ControlServer {
    /// Binds `path` (mode 0600; a stale socket is replaced) and serves it on a thread.
    pub fn start(
        path: &Path,
        status: Arc<StatusSource>,
        stop: StopHandle,
        pause: PauseHandle,
    ) -> std::io::Result<ControlServer> {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by a live process", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name("husk-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if d.load(Ordering::SeqCst) {
                        return;
                    }
                    match conn {
                        Ok(c) => {
                            let status = status.clone();
                            let stop = stop.clone();
                            let pause = pause.clone();
                            let _ = std::thread::Builder::new()
                                .name("husk-control-conn".into())
                                .spawn(move || handle_conn(c, &status, &stop, &pause));
                        }
                        Err(e) => tracing::warn!("control socket accept: {e}"),
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_owned(),
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Blocking client, for tests and tools: one request, one reply. (huskd has its own, on tokio.)
pub fn request(path: &Path, request: Request) -> std::io::Result<Reply> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.line().as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
