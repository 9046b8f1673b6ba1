//! Guest physical memory layout.
//!
//! Low memory holds the boot structures the 64-bit Linux boot protocol expects; RAM above
//! `MMIO_GAP_START` is relocated above 4 GiB so that the PCI BAR window, the IOAPIC and the
//! local APIC live in a hole below 4 GiB.

/// Boot GDT (4 entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (one empty entry: the guest must not take interrupts before it installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT, four page directories (4 GiB in 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Number of page directories, each mapping 1 GiB.
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Extended BIOS data area, where the MP table goes (Linux scans it).
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional low memory.
pub const LOW_MEM_END: u64 = 0xa0000;
/// Where the kernel is loaded (the boot protocol's "high memory").
pub const HIMEM_START: u64 = 0x10_0000;
/// Hole for device memory below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// PCI BAR window, at the start of the hole.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// In-kernel IOAPIC and local APIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) and identity map page for real-mode emulation, inside the hole.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// IOAPIC pins available to devices (KVM's IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;
/// Legacy COM1.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
