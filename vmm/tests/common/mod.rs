//! Test guests: a tiny x86-64 assembler for the handful of instructions the test drivers need,
//! and a minimal ELF64 wrapper so the guests go through the same linux-loader ELF path and
//! 64-bit boot set-up as a vmlinux.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const COM1: u16 = 0x3f8;
/// BAR0 of the virtio-pci device in slot 1, the one device a virtio test guest has; its
/// modern layout (virtio 1.x, 4.1.4): common config at 0, notify at 0x3000, device config
/// at 0x2000.
pub const VIRTIO_BAR: u64 = 0xc000_4000;
pub use husk_testkit::guest::LOAD_ADDR;
/// Data blobs are placed this far after the code.
const DATA_OFFSET: usize = 0x8000;

pub struct Asm {
    code: Vec<u8>,
    data: Vec<u8>,
}

impl Default for Asm {
    fn default() -> Self {
        Self::new()
    }
}

impl Asm {
    pub fn new() -> Self {
        Asm {
            code: Vec::new(),
            data: Vec::new(),
        }
    }

    fn emit(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }

    /// Places bytes in the image's data area; returns their guest address.
    pub fn data(&mut self, bytes: &[u8]) -> u64 {
        let addr = LOAD_ADDR + (DATA_OFFSET + self.data.len()) as u64;
        self.data.extend_from_slice(bytes);
        addr
    }

    fn mov_rdi(&mut self, v: u64) -> &mut Self {
        self.emit(&[0x48, 0xbf]).emit(&v.to_le_bytes())
    }

    fn mov_rsi(&mut self, v: u64) -> &mut Self {
        self.emit(&[0x48, 0xbe]).emit(&v.to_le_bytes())
    }

    fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.emit(&[0x66, 0xba]).emit(&port.to_le_bytes())
    }

    pub fn store8(&mut self, addr: u64, v: u8) -> &mut Self {
        self.mov_rdi(addr).emit(&[0xc6, 0x07, v])
    }

    pub fn store16(&mut self, addr: u64, v: u16) -> &mut Self {
        self.mov_rdi(addr)
            .emit(&[0x66, 0xc7, 0x07])
            .emit(&v.to_le_bytes())
    }

    pub fn store32(&mut self, addr: u64, v: u32) -> &mut Self {
        self.mov_rdi(addr)
            .emit(&[0xc7, 0x07])
            .emit(&v.to_le_bytes())
    }

    pub fn store64(&mut self, addr: u64, v: u64) -> &mut Self {
        self.store32(addr, v as u32)
            .store32(addr + 4, (v >> 32) as u32)
    }

    /// eax = zero-extended byte/word/dword at addr.
    pub fn load8(&mut self, addr: u64) -> &mut Self {
        self.mov_rdi(addr).emit(&[0x0f, 0xb6, 0x07])
    }
    pub fn load16(&mut self, addr: u64) -> &mut Self {
        self.mov_rdi(addr).emit(&[0x0f, 0xb7, 0x07])
    }
    pub fn load32(&mut self, addr: u64) -> &mut Self {
        self.mov_rdi(addr).emit(&[0x8b, 0x07])
    }

    /// Spins until the 16-bit value at addr equals v.
    pub fn wait16_eq(&mut self, addr: u64, v: u16) -> &mut Self {
        let top = self.code.len();
        self.load16(addr);
        self.emit(&[0x3d]).emit(&u32::from(v).to_le_bytes());
        let rel = top as i64 - (self.code.len() as i64 + 6);
        self.emit(&[0x0f, 0x85]).emit(&(rel as i32).to_le_bytes())
    }

    /// Spins until (byte at addr) & mask != 0.
    pub fn wait8_any(&mut self, addr: u64, mask: u8) -> &mut Self {
        let top = self.code.len();
        self.load8(addr);
        self.emit(&[0xa8, mask]);
        let rel = top as i64 - (self.code.len() as i64 + 6);
        self.emit(&[0x0f, 0x84]).emit(&(rel as i32).to_le_bytes())
    }

    pub fn out8(&mut self, port: u16, v: u8) -> &mut Self {
        self.mov_dx(port).emit(&[0xb0, v, 0xee])
    }

    pub fn out32(&mut self, port: u16, v: u32) -> &mut Self {
        self.mov_dx(port)
            .emit(&[0xb8])
            .emit(&v.to_le_bytes())
            .emit(&[0xef])
    }

    /// eax = in32(port)
    pub fn in32(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port).emit(&[0xed])
    }

    /// mov [addr], eax
    pub fn store_eax(&mut self, addr: u64) -> &mut Self {
        self.mov_rdi(addr).emit(&[0x89, 0x07])
    }

    /// `rep outsb`: the `len` bytes at `addr` to `port`, one I/O exit per byte.
    pub fn out_bytes(&mut self, port: u16, addr: u64, len: u64) -> &mut Self {
        self.mov_dx(port)
            .mov_rsi(addr)
            .emit(&[0x48, 0xb9])
            .emit(&len.to_le_bytes())
            .emit(&[0xf3, 0x6e])
    }

    pub fn print(&mut self, s: &str) -> &mut Self {
        for b in s.bytes() {
            self.out8(COM1, b);
        }
        self
    }

    /// Prints `n` bytes at addr as lowercase hex, in memory order.
    pub fn print_hex(&mut self, addr: u64, n: usize) -> &mut Self {
        let table = self.data(b"0123456789abcdef");
        for i in 0..n as u64 {
            self.mov_rsi(table);
            self.load8(addr + i);
            self.emit(&[0x89, 0xc1]); // mov ecx, eax
            self.emit(&[0xc1, 0xe8, 0x04]); // shr eax, 4
            self.emit(&[0x0f, 0xb6, 0x04, 0x06]); // movzx eax, byte [rsi+rax]
            self.mov_dx(COM1).emit(&[0xee]);
            self.emit(&[0x83, 0xe1, 0x0f]); // and ecx, 0xf
            self.emit(&[0x0f, 0xb6, 0x04, 0x0e]); // movzx eax, byte [rsi+rcx]
            self.emit(&[0xee]);
        }
        self
    }

    /// CPUID(leaf, subleaf); stores eax, ebx, ecx, edx at addr..addr+16.
    pub fn cpuid(&mut self, leaf: u32, subleaf: u32, addr: u64) -> &mut Self {
        self.emit(&[0xb8]).emit(&leaf.to_le_bytes());
        self.emit(&[0xb9]).emit(&subleaf.to_le_bytes());
        self.emit(&[0x0f, 0xa2]);
        self.mov_rdi(addr);
        // mov [rdi], eax; mov [rdi+4], ebx; mov [rdi+8], ecx; mov [rdi+12], edx
        self.emit(&[
            0x89, 0x07, 0x89, 0x5f, 0x04, 0x89, 0x4f, 0x08, 0x89, 0x57, 0x0c,
        ])
    }

    /// Loads the IDT descriptor at addr and executes UD2: with an empty IDT this triple-faults.
    pub fn lidt_ud2(&mut self, addr: u64) -> &mut Self {
        self.mov_rdi(addr).emit(&[0x0f, 0x01, 0x1f, 0x0f, 0x0b])
    }

    /// Driver initialisation up to feature negotiation (virtio 1.x, 3.1.1): reset,
    /// ACKNOWLEDGE, DRIVER.
    pub fn virtio_reset_ack(&mut self) -> &mut Self {
        self.store8(VIRTIO_BAR + 0x14, 0)
            .store8(VIRTIO_BAR + 0x14, 1)
            .store8(VIRTIO_BAR + 0x14, 3)
    }

    /// Sets up split queue `idx` (8 entries) on the given rings and enables it.
    pub fn virtio_queue(&mut self, idx: u16, desc: u64, avail: u64, used: u64) -> &mut Self {
        self.store16(VIRTIO_BAR + 0x16, idx)
            .store16(VIRTIO_BAR + 0x18, 8)
            .store64(VIRTIO_BAR + 0x20, desc)
            .store64(VIRTIO_BAR + 0x28, avail)
            .store64(VIRTIO_BAR + 0x30, used)
            .store16(VIRTIO_BAR + 0x1c, 1)
    }

    /// Resets the machine through the i8042 (how the VM ends), then halts.
    pub fn reset(&mut self) -> &mut Self {
        self.out8(0x64, 0xfe).emit(&[0xf4, 0xeb, 0xfd])
    }

    pub fn image(&self) -> Vec<u8> {
        assert!(self.code.len() < DATA_OFFSET, "test guest code too large");
        let mut img = self.code.clone();
        img.resize(DATA_OFFSET, 0x90);
        img.extend_from_slice(&self.data);
        img
    }
}

pub use husk_testkit::guest::elf;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("husk-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM config for a test guest.
pub fn guest_config(dir: &TempDir, asm: &Asm) -> husk_vmm::config::VmConfig {
    let kernel = dir.path().join("guest.elf");
    std::fs::write(&kernel, elf(&asm.image())).unwrap();
    husk_vmm::config::VmConfig {
        id: "test".into(),
        kernel,
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
        memory_mib: 64,
        serial_log: Some(dir.path().join("serial.log")),
        serial_log_max_bytes: None,
        control_socket: None,
        pid_file: None,
        hide_emulator_unsupported_cpuid: None,
        devices: Default::default(),
    }
}

/// Launches `cfg`, waits up to 120 s for the guest to reset the machine and returns the VM
/// with the guest's serial log.
pub fn run_to_reset(
    dir: &TempDir,
    cfg: &husk_vmm::config::VmConfig,
) -> (husk_vmm::builder::Vmm, String) {
    let mut vmm = husk_vmm::builder::launch(cfg).expect("launch");
    let out = vmm
        .wait(Some(std::time::Duration::from_secs(120)))
        .expect("guest did not finish within 120 s");
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    assert_eq!(
        out.reason,
        husk_vmm::vstate::vcpu::VcpuStop::Reset,
        "log:\n{log}"
    );
    (vmm, log)
}
