//! End-to-end test of `husk-vsock` under QEMU (TCG) with a real Linux guest.
//!
//! Needs `qemu-system-x86_64` and qboot. The guest kernel and its vsock modules are the
//! project's (husk-guest-image's cached kernel tree, downloaded through apt if `make guest-image`
//! has not already). Missing pieces fail the test loudly. The guest's /init is
//! `vmm/tests/guest` (built here as a static binary): it echoes on vsock port 1024 and takes
//! commands over a connection it opens to host port 1023.
//!
//! Run with `--nocapture` to see throughput figures.

use std::fs;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[path = "guest/src/xorshift.rs"]
mod xorshift;

/// VMs are CPU hungry under TCG: run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
static VM_SEQ: AtomicU32 = AtomicU32::new(0);

const MIB: u64 = 1024 * 1024;
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
/// The modules the guest init loads, as `/lib/modules/<name>.ko`.
const MODULES: [&str; 4] = [
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// The test data: 64 MiB of the xorshift stream the guest also generates (seed 42). Streams
/// are checked byte for byte against it.
const PATTERN_SEED: u64 = 42;
const PATTERN_LEN: usize = 64 * 1024 * 1024;

fn pattern() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let mut v = vec![0u8; PATTERN_LEN];
        let mut st = PATTERN_SEED;
        xorshift::fill(&mut st, &mut v);
        v
    })
}

/// Compares `got` with the pattern read cyclically from position `pos`.
fn matches_pattern(got: &[u8], mut pos: usize) -> bool {
    let p = pattern();
    let mut rest = got;
    while !rest.is_empty() {
        let at = pos % p.len();
        let n = rest.len().min(p.len() - at);
        if rest[..n] != p[at..at + n] {
            return false;
        }
        rest = &rest[n..];
        pos += n;
    }
    true
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Guest artefacts

struct Artefacts {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn build_artefacts() -> Artefacts {
    assert!(
        which("qemu-system-x86_64").is_some(),
        "qemu-system-x86_64 is not installed: this test needs QEMU (Debian qemu-system-x86)"
    );
    assert!(
        Path::new(QBOOT).is_file(),
        "{QBOOT} missing (Debian qemu-system-x86)"
    );
    let kernel = husk_guest_image::kernel_tree(&husk_guest_image::KernelOptions::default())
        .unwrap_or_else(|e| {
            panic!("guest kernel from husk-guest-image (see scripts/install-deps): {e}")
        });

    // The guest init, static so the initramfs needs nothing else.
    let guest_target = target_dir().join("vsock-test-guest");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--offline",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &guest_target)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .expect("running cargo for the guest init");
    assert!(st.success(), "building the guest init failed");
    let init =
        fs::read(guest_target.join("x86_64-unknown-linux-gnu/release/husk-vsock-test-guest"))
            .expect("guest init binary");

    let modules: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    let resolved = kernel
        .resolve_modules(&modules)
        .unwrap_or_else(|e| panic!("vsock modules of kernel {}: {e}", kernel.release));
    let mut tree = husk_guest_image::initramfs::Tree::new();
    for d in ["dev", "lib/modules", "proc", "sys"] {
        tree.dir(d, 0o755).unwrap();
    }
    tree.char_dev("dev/console", 0o600, 5, 1).unwrap();
    tree.file("init", 0o755, init).unwrap();
    for m in &resolved.load_order {
        let data = kernel
            .read_module(m)
            .unwrap_or_else(|e| panic!("module {}: {e}", m.name));
        tree.file(&format!("lib/modules/{}.ko", m.name), 0o644, data)
            .unwrap();
    }
    for m in MODULES {
        assert!(
            resolved.load_order.iter().any(|r| r.name == m),
            "{m} is not a module of kernel {} (built in?)",
            kernel.release
        );
    }
    let initrd = target_dir().join("vsock-test-initrd.cpio");
    fs::write(&initrd, tree.to_cpio().expect("initramfs archive")).expect("writing initrd");
    Artefacts {
        kernel: kernel.vmlinuz,
        initrd,
    }
}

fn artefacts() -> &'static Artefacts {
    static A: std::sync::OnceLock<Artefacts> = std::sync::OnceLock::new();
    A.get_or_init(build_artefacts)
}

fn tsc_khz() -> u64 {
    let info = fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .expect("cpu MHz in /proc/cpuinfo");
    (mhz * 1000.0).round() as u64
}

// ---------------------------------------------------------------------------------------------
// One VM: husk-vsock + QEMU

struct Vm {
    dir: PathBuf,
    vhost_sock: PathBuf,
    uds: PathBuf,
    backend: Option<Child>,
    qemu: Option<Child>,
    ctl_listener: UnixListener,
    started: Instant,
}

impl Vm {
    fn boot() -> Vm {
        let a = artefacts();
        let n = VM_SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("husk-vsock-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let vhost_sock = dir.join("vhost.sock");
        let uds = dir.join("vsock.sock");
        let ctl_listener = UnixListener::bind(dir.join("vsock.sock_1023")).unwrap();
        let log = fs::File::create(dir.join("husk-vsock.log")).unwrap();
        let bin = std::env::var_os("HUSK_VSOCK_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_husk-vsock")));
        let backend = Command::new(bin)
            .arg("--socket")
            .arg(&vhost_sock)
            .arg("--uds")
            .arg(&uds)
            .args(["--guest-cid", "3"])
            .env(
                "RUST_LOG",
                std::env::var("HUSK_VSOCK_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning husk-vsock");
        let mut vm = Vm {
            dir,
            vhost_sock,
            uds,
            backend: Some(backend),
            qemu: None,
            ctl_listener,
            started: Instant::now(),
        };
        let t = Instant::now();
        while !vm.vhost_sock.exists() || !vm.uds.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "husk-vsock did not create its sockets"
            );
            if let Some(st) = vm.backend.as_mut().unwrap().try_wait().unwrap() {
                panic!("husk-vsock exited early ({st}): {}", vm.backend_log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let console = fs::File::create(vm.dir.join("console.log")).unwrap();
        let qemu = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-M",
                "microvm,x-option-roms=off,memory-backend=mem",
            ])
            .args(["-bios", QBOOT, "-cpu", "max", "-m", "256", "-smp", "1"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .arg("-chardev")
            .arg(format!("socket,id=vsock,path={}", vm.vhost_sock.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
            .args(["-nographic", "-no-reboot", "-kernel"])
            .arg(&a.kernel)
            .arg("-initrd")
            .arg(&a.initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet tsc_early_khz={}",
                tsc_khz()
            ))
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning qemu-system-x86_64");
        vm.started = Instant::now();
        vm.qemu = Some(qemu);
        vm
    }

    fn backend_log(&self) -> String {
        fs::read_to_string(self.dir.join("husk-vsock.log")).unwrap_or_default()
    }

    fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    fn diag(&self) -> String {
        format!(
            "\n--- console ---\n{}\n--- husk-vsock ---\n{}",
            self.console(),
            self.backend_log()
        )
    }

    /// Accepts the guest's control connection (a guest-initiated connection to host port 1023).
    fn control(&self, timeout: Duration) -> UnixStream {
        let s = accept_timeout(&self.ctl_listener, timeout)
            .unwrap_or_else(|e| panic!("guest control connection: {e}{}", self.diag()));
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let line = read_line(&s).unwrap_or_else(|e| panic!("control READY: {e}{}", self.diag()));
        assert_eq!(line, "READY", "{}", self.diag());
        s
    }

    fn poweroff(&mut self, ctl: &mut UnixStream) {
        ctl.write_all(b"POWEROFF\n").unwrap();
        let st = wait_timeout(self.qemu.as_mut().unwrap(), Duration::from_secs(60))
            .unwrap_or_else(|| panic!("QEMU did not exit after POWEROFF{}", self.diag()));
        self.qemu = None;
        assert!(st.success(), "QEMU exit status {st}{}", self.diag());
        let st = wait_timeout(self.backend.as_mut().unwrap(), Duration::from_secs(10))
            .unwrap_or_else(|| panic!("husk-vsock kept running after QEMU left{}", self.diag()));
        self.backend = None;
        assert!(st.success(), "husk-vsock exit status {st}{}", self.diag());
        assert!(!self.vhost_sock.exists(), "vhost-user socket left behind");
        assert!(!self.uds.exists(), "hybrid vsock socket left behind");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for c in [self.qemu.take(), self.backend.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("VM directory kept for inspection: {}", self.dir.display());
            eprintln!("{}", self.diag());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn wait_timeout(c: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return Some(st);
        }
        if t.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn accept_timeout(l: &UnixListener, timeout: Duration) -> Result<UnixStream, String> {
    l.set_nonblocking(true).unwrap();
    let t = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if t.elapsed() > timeout {
                    return Err("timed out".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn read_line(mut s: &UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&line))),
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Host-initiated connection through the hybrid-vsock handshake.
fn host_connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let line = read_line(&s)?;
    let hp: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("bad answer {line:?}"))?;
    assert!(hp >= 1 << 30, "host port {hp}");
    Ok(s)
}

/// Sends `bytes` of the pattern (starting at `offset`) and reads the echo at the same time,
/// checking it byte for byte; returns the time taken.
fn echo_roundtrip(uds: &Path, bytes: u64, offset: usize) -> Result<Duration, String> {
    let s = host_connect(uds, 1024)?;
    // A stall shows up as a read timeout.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let p = pattern();
        let mut pos = offset;
        let mut left = bytes as usize;
        while left > 0 {
            let at = pos % p.len();
            let n = left.min(128 * 1024).min(p.len() - at);
            w.write_all(&p[at..at + n])
                .map_err(|e| format!("write: {e}"))?;
            left -= n;
            pos += n;
        }
        // Half-close: the guest sees SHUTDOWN SEND and must keep echoing what is in flight.
        w.shutdown(Shutdown::Write).map_err(|e| e.to_string())
    });
    let mut got = 0u64;
    let mut buf = vec![0u8; 128 * 1024];
    let mut r = &s;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !matches_pattern(&buf[..n], offset + got as usize) {
                    return Err(format!(
                        "echoed data differs within bytes {got}..{}",
                        got + n as u64
                    ));
                }
                got += n as u64;
            }
            Err(e) => return Err(format!("read after {got} bytes: {e} (stall?)")),
        }
    }
    let elapsed = t.elapsed();
    writer.join().unwrap()?;
    if got != bytes {
        return Err(format!("echo returned {got} bytes, sent {bytes}"));
    }
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn vsock_qemu_data_paths() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    artefacts();
    pattern();
    let mut vm = Vm::boot();
    let mut ctl = vm.control(Duration::from_secs(120));
    println!(
        "guest-initiated control connection after {:?}",
        vm.started.elapsed()
    );

    // Half-close, small: after our shutdown(Write) the guest still answers, then closes.
    {
        let mut s = host_connect(&vm.uds, 1024).unwrap_or_else(|e| panic!("{e}{}", vm.diag()));
        s.write_all(b"hello, half-closed world").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        assert_eq!(back, "hello, half-closed world");
    }

    // CONNECT to a port nobody listens on: the client socket is closed without OK.
    {
        let t = Instant::now();
        let r = host_connect(&vm.uds, 4444);
        assert!(r.is_err(), "CONNECT to a closed guest port succeeded");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "refusal took {:?}",
            t.elapsed()
        );
    }

    // Guest -> host, 64 MiB one way, over a guest-initiated connection.
    {
        let l = UnixListener::bind(vm.dir.join("vsock.sock_5000")).unwrap();
        let bytes = 64 * MIB;
        let t = Instant::now();
        writeln!(ctl, "SEND 5000 {bytes} {PATTERN_SEED}").unwrap();
        let s = accept_timeout(&l, Duration::from_secs(30)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = 0u64;
        let mut buf = vec![0u8; 128 * 1024];
        let mut r = &s;
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    assert!(
                        matches_pattern(&buf[..n], got as usize),
                        "guest->host data differs within bytes {got}..{}",
                        got + n as u64
                    );
                    got += n as u64;
                }
                Err(e) => panic!("guest->host read after {got} bytes: {e}{}", vm.diag()),
            }
        }
        let d = t.elapsed();
        assert_eq!(got, bytes, "guest->host byte count");
        let line = read_line(&ctl).unwrap();
        assert_eq!(line.trim(), "SENT 5000", "guest sender reported: {line}");
        println!(
            "guest->host 64 MiB one way: {:.1} MB/s ({d:?})",
            mbps(bytes, d)
        );
    }

    // Host-initiated echo, 64 MiB each way at once.
    {
        let d = echo_roundtrip(&vm.uds, 64 * MIB, 0).unwrap_or_else(|e| panic!("{e}{}", vm.diag()));
        println!(
            "echo 64 MiB, 1 connection: {:.1} MB/s each direction ({d:?})",
            mbps(64 * MIB, d)
        );
    }

    // Four such connections concurrently.
    {
        let t = Instant::now();
        let hs: Vec<_> = (0..4u64)
            .map(|i| {
                let uds = vm.uds.clone();
                std::thread::spawn(move || {
                    echo_roundtrip(&uds, 64 * MIB, (i as usize + 1) * 12_345_679)
                })
            })
            .collect();
        for h in hs {
            h.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{e}{}", vm.diag()));
        }
        let d = t.elapsed();
        println!(
            "echo 4 x 64 MiB concurrently: {:.1} MB/s aggregate each direction ({d:?})",
            mbps(4 * 64 * MIB, d)
        );
    }

    vm.poweroff(&mut ctl);
}

#[test]
fn vsock_qemu_repeated_boots_connect() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    artefacts();
    let mut times = Vec::new();
    for i in 0..10 {
        let mut vm = Vm::boot();
        // Poll from launch, ~50 times a second, as a runtime without a readiness signal would.
        let t = Instant::now();
        let mut attempts = 0;
        let s = loop {
            attempts += 1;
            match host_connect(&vm.uds, 1024) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        t.elapsed() < Duration::from_secs(120),
                        "boot {i}: no CONNECT answered in 120 s ({attempts} attempts, last: {e}){}",
                        vm.diag()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let d = t.elapsed();
        drop(s);
        let mut ctl = vm.control(Duration::from_secs(60));
        vm.poweroff(&mut ctl);
        println!("boot {i}: CONNECT answered {d:?} after launch ({attempts} attempts)");
        times.push(d);
    }
    times.sort();
    println!(
        "10 boots: CONNECT answered after median {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
