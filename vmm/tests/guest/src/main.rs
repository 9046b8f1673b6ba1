//! /init of the vsock test VM (see ../vsock_qemu.rs).
//!
//! Loads the vsock modules, echoes every stream accepted on vsock port 1024 (half-close aware:
//! after the peer's EOF it finishes sending and then shuts down its own write side), and
//! connects to host port 1023 for commands, one per line:
//! - `SEND <port> <bytes> <seed>`: connect to host `<port>`, send `<bytes>` of the
//!   xorshift64 stream seeded with `<seed>`, then close;
//! - `POWEROFF`: power the VM off.
//!
//! No crates: a handful of libc calls are declared by hand so the test needs no registry.

mod xorshift;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SOCK_CLOEXEC: i32 = 0o2000000;
const VMADDR_CID_ANY: u32 = u32::MAX;
const HOST_CID: u32 = 2;
const SHUT_WR: i32 = 1;
const SYS_FINIT_MODULE: i64 = 313;
const RB_POWER_OFF: i32 = 0x4321_fedc;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept4(fd: i32, addr: *mut SockaddrVm, len: *mut u32, flags: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
    fn close(fd: i32) -> i32;
    fn syscall(n: i64, ...) -> i64;
    fn reboot(cmd: i32) -> i32;
    fn sync();
}

fn addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port,
        cid,
        flags: 0,
        zero: [0; 3],
    }
}

fn err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn load_module(path: &str) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: finit_module reads the module from a valid open fd; the params string is a
    // NUL-terminated static.
    let r = unsafe { syscall(SYS_FINIT_MODULE, f.as_raw_fd(), c"".as_ptr(), 0) };
    if r != 0 {
        return Err(err(&format!("finit_module {path}")));
    }
    Ok(())
}

fn vsock_connect(cid: u32, port: u32) -> Result<File, String> {
    // SAFETY: plain syscalls on fds we own; the address lives across the call.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(err("socket"));
        }
        let a = addr(cid, port);
        if connect(fd, &a, std::mem::size_of::<SockaddrVm>() as u32) != 0 {
            let e = err(&format!("connect {cid}:{port}"));
            close(fd);
            return Err(e);
        }
        Ok(File::from_raw_fd(fd))
    }
}

fn echo(mut s: File) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = s.write_all(&buf[..n]) {
                    println!("guest: echo write: {e}");
                    return;
                }
            }
            Err(e) => {
                println!("guest: echo read: {e}");
                return;
            }
        }
    }
    // SAFETY: shutdown on the fd `s` owns.
    unsafe { shutdown(s.as_raw_fd(), SHUT_WR) };
}

fn listen_echo(port: u32) -> Result<(), String> {
    // SAFETY: plain syscalls on an fd we own; accepted fds are handed to File.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(err("socket"));
        }
        let a = addr(VMADDR_CID_ANY, port);
        if bind(fd, &a, std::mem::size_of::<SockaddrVm>() as u32) != 0 {
            return Err(err("bind"));
        }
        if listen(fd, 64) != 0 {
            return Err(err("listen"));
        }
        std::thread::spawn(move || loop {
            let c = accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), SOCK_CLOEXEC);
            if c < 0 {
                println!("guest: {}", err("accept"));
                continue;
            }
            let s = File::from_raw_fd(c);
            std::thread::spawn(move || echo(s));
        });
    }
    Ok(())
}

fn send(port: u32, mut bytes: u64, seed: u64) -> Result<(), String> {
    let mut s = vsock_connect(HOST_CID, port)?;
    let mut state = seed;
    let mut buf = vec![0u8; 256 * 1024];
    while bytes > 0 {
        let n = (bytes as usize).min(buf.len());
        xorshift::fill(&mut state, &mut buf[..n]);
        s.write_all(&buf[..n]).map_err(|e| format!("send: {e}"))?;
        bytes -= n as u64;
    }
    Ok(())
}

fn poweroff() -> ! {
    // SAFETY: we are PID 1 and done; the kernel powers the machine off.
    unsafe {
        sync();
        reboot(RB_POWER_OFF);
    }
    std::process::exit(0)
}

fn run() -> Result<(), String> {
    for m in [
        "virtio_mmio",
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
    ] {
        load_module(&format!("/lib/modules/{m}.ko"))?;
    }
    listen_echo(1024)?;
    println!("HUSK-VSOCK-GUEST: listening on 1024");
    // The transport binds asynchronously after virtio_mmio probes; retry until it is there.
    let start = Instant::now();
    let ctl = loop {
        match vsock_connect(HOST_CID, 1023) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    println!("HUSK-VSOCK-GUEST: control connected");
    let mut w = ctl.try_clone().map_err(|e| e.to_string())?;
    let _ = w.write_all(b"READY\n");
    for line in BufReader::new(ctl).lines() {
        let line = line.map_err(|e| format!("control: {e}"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["SEND", port, bytes, seed] => {
                let (port, bytes, seed) = (
                    port.parse().map_err(|_| "bad port")?,
                    bytes.parse().map_err(|_| "bad bytes")?,
                    seed.parse().map_err(|_| "bad seed")?,
                );
                let mut w2 = w.try_clone().map_err(|e| e.to_string())?;
                std::thread::spawn(move || {
                    let r = send(port, bytes, seed);
                    let _ = writeln!(w2, "SENT {port} {}", r.err().unwrap_or_default());
                });
            }
            ["POWEROFF"] => poweroff(),
            _ => println!("guest: unknown command {line:?}"),
        }
    }
    println!("HUSK-VSOCK-GUEST: control closed");
    poweroff()
}

fn main() {
    if let Err(e) = run() {
        println!("HUSK-VSOCK-GUEST: error: {e}");
    }
    poweroff()
}
