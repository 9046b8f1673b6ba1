//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs, the
//! IOAPIC and how ISA and PCI interrupts are wired. Written by hand because it is a few fixed
//! little-endian records and no maintained crate produces it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_START, IOAPIC_PINS, IOAPIC_START};

const PCI_BUS: u8 = 0;
const ISA_BUS: u8 = 1;

/// A PCI interrupt wired to an IOAPIC pin: (device number on bus 0, IOAPIC pin).
#[derive(Debug, Clone, Copy)]
pub struct PciIrq {
    pub device: u8,
    pub pin: u8,
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn io_interrupt(kind: u8, flags: u16, bus: u8, bus_irq: u8, ioapic: u8, pin: u8) -> [u8; 8] {
    let f = flags.to_le_bytes();
    [3, kind, f[0], f[1], bus, bus_irq, ioapic, pin]
}

/// Builds the table bytes (floating pointer first, then the configuration table).
pub fn build(cpu_count: u8, pci_irqs: &[PciIrq], base: u64) -> Vec<u8> {
    let ioapic_id = cpu_count;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpu_count {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = cpu; // local APIC id
        e[2] = 0x14; // local APIC version
        e[3] = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    for (id, name) in [(PCI_BUS, b"PCI   "), (ISA_BUS, b"ISA   ")] {
        let mut e = [0u8; 8];
        e[0] = 1;
        e[1] = id;
        e[2..8].copy_from_slice(name);
        entries.extend_from_slice(&e);
        count += 1;
    }
    let mut e = [0u8; 8];
    e[0] = 2;
    e[1] = ioapic_id;
    e[2] = 0x11;
    e[3] = 1;
    e[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    // ISA IRQs 0-15 identity-mapped to IOAPIC pins; IRQ 0 through the PIC as ExtINT.
    entries.extend_from_slice(&io_interrupt(3, 0, ISA_BUS, 0, ioapic_id, 0));
    count += 1;
    for irq in 1..16u8 {
        entries.extend_from_slice(&io_interrupt(0, 0, ISA_BUS, irq, ioapic_id, irq));
        count += 1;
    }
    // PCI INTA# of each device: active high, edge triggered. Edge matches irqfd, which injects
    // an edge; virtio's ISR read-to-clear makes lost level semantics harmless.
    for p in pci_irqs {
        if u32::from(p.pin) < IOAPIC_PINS {
            entries.extend_from_slice(&io_interrupt(
                0,
                0x5,
                PCI_BUS,
                p.device << 2,
                ioapic_id,
                p.pin,
            ));
            count += 1;
        }
    }
    // Local interrupts: LINT0 ExtINT, LINT1 NMI, to all local APICs.
    for (kind, lint) in [(3u8, 0u8), (1, 1)] {
        entries.extend_from_slice(&[4, kind, 0, 0, ISA_BUS, 0, 0xff, lint]);
        count += 1;
    }

    let table_addr = base + 16;
    let mut header = [0u8; 44];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header[6] = 4;
    header[8..16].copy_from_slice(b"HUSK    ");
    header[16..28].copy_from_slice(b"HUSK-VMM    ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(APIC_START as u32).to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1;
    fp[9] = 4;
    fp[10] = checksum(&fp);
    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table of {0} bytes does not fit in the EBDA")]
    TooBig(usize),
    #[error("writing the MP table: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Writes the MP table into the EBDA.
pub fn setup_mptable(
    mem: &GuestMemoryMmap,
    cpu_count: u8,
    pci_irqs: &[PciIrq],
) -> Result<(), MptableError> {
    let bytes = build(cpu_count, pci_irqs, EBDA_START);
    if bytes.len() > (super::layout::LOW_MEM_END - EBDA_START) as usize {
        return Err(MptableError::TooBig(bytes.len()));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero() {
        let b = build(2, &[PciIrq { device: 1, pin: 5 }], EBDA_START);
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(b[0..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let len = u16::from_le_bytes([b[20], b[21]]) as usize;
        assert_eq!(len, b.len() - 16);
        assert_eq!(b[16..].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    }
}
