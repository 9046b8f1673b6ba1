//! Tiny guests for tests and the benchmark: wraps a flat x86-64 image in an ELF64 executable
//! so it goes through the same loader and 64-bit boot set-up as a vmlinux.

/// Where test guests are linked.
pub const LOAD_ADDR: u64 = 0x20_0000;

/// An ELF64 executable with one PT_LOAD segment holding `image` at `LOAD_ADDR`, entry at its
/// first byte.
pub fn elf(image: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // file offset
    ph[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&(image.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(image.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(image);
    f
}

/// `out 0x3f8, 'X'` then spin forever (`jmp $`): a guest whose first instruction is visible.
pub const MARK_AND_SPIN: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'X', // mov al, 'X'
    0xee, // out dx, al
    0xeb, 0xfe, // jmp $
];
