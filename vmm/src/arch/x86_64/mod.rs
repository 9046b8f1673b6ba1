//! x86_64 guest set-up: memory map, kernel loading (bzImage or ELF vmlinux through
//! linux-loader), zero page with the E820 map, MP table.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::path::Path;

use layout::*;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {0}: {1}")]
    Open(String, std::io::Error),
    #[error("loading the kernel: {0}")]
    Loader(#[from] linux_loader::loader::Error),
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("initramfs of {0} bytes does not fit below the kernel's limit")]
    InitrdTooBig(u64),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("E820 map too large")]
    E820,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// `boot_params` is plain data; linux-loader does not mark it `ByteValued`.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a repr(C, packed) struct of integers and arrays of integers, valid for
// any bit pattern.
unsafe impl ByteValued for ZeroPage {}

/// RAM ranges for `size` bytes of guest memory, skipping the MMIO hole below 4 GiB.
pub fn memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// What the vCPUs need to start the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
}

/// Loads kernel (+ initramfs) and writes command line and zero page.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let open = |p: &Path| File::open(p).map_err(|e| BootError::Open(p.display().to_string(), e));
    let mut kf = open(kernel)?;
    let mut magic = [0u8; 4];
    {
        use std::io::{Read, Seek};
        kf.read_exact(&mut magic)
            .map_err(|e| BootError::Open(kernel.display().to_string(), e))?;
        kf.rewind()
            .map_err(|e| BootError::Open(kernel.display().to_string(), e))?;
    }
    let (entry, setup_header) = if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut kf, Some(GuestAddress(HIMEM_START)))?;
        (r.kernel_load.raw_value(), r.setup_header)
    } else {
        let r = BzImage::load(mem, None, &mut kf, Some(GuestAddress(HIMEM_START)))?;
        // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
        (r.kernel_load.raw_value() + 0x200, r.setup_header)
    };

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE)?;
    cl.insert_str(cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)?;

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;

    let low_end = mem
        .iter()
        .map(|r| r.last_addr().raw_value() + 1)
        .filter(|&end| end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0);
    if let Some(path) = initrd {
        let mut f = open(path)?;
        let size = f
            .metadata()
            .map_err(|e| BootError::Open(path.display().to_string(), e))?
            .len();
        let max = if params.hdr.initrd_addr_max != 0 {
            u64::from(params.hdr.initrd_addr_max) + 1
        } else {
            0x3800_0000
        };
        let top = low_end.min(max);
        let start = top
            .checked_sub(size)
            .map(|s| s & !0xfff)
            .filter(|&s| s >= HIMEM_START)
            .ok_or(BootError::InitrdTooBig(size))?;
        mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)
            .map_err(BootError::Memory)?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820: Vec<(u64, u64, u32)> = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, LOW_MEM_END - EBDA_START, E820_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.last_addr().raw_value() + 1;
        if end > start {
            e820.push((start, end - start, E820_RAM));
        }
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::E820);
    }
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_START))?;
    Ok(BootInfo { entry })
}
