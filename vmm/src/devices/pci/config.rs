//! Type-0 configuration space with a write mask, capabilities, and fixed BARs.

/// A memory BAR placed by the VMM.
#[derive(Debug, Clone, Copy)]
pub struct PciBar {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
}

pub struct ConfigSpace {
    regs: [u32; 64],
    wmask: [u32; 64],
    bars: Vec<PciBar>,
    next_cap: usize,
    last_cap: Option<usize>,
}

const REG_COMMAND: usize = 1;
const REG_BAR0: usize = 4;
const REG_CAP_PTR: usize = 13;
const REG_INTERRUPT: usize = 15;
const STATUS_CAP_LIST: u32 = 1 << 20;

impl ConfigSpace {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vendor: u16,
        device: u16,
        class: u8,
        subclass: u8,
        prog_if: u8,
        revision: u8,
        subsys_vendor: u16,
        subsys_id: u16,
    ) -> Self {
        let mut regs = [0u32; 64];
        let mut wmask = [0u32; 64];
        regs[0] = u32::from(vendor) | (u32::from(device) << 16);
        regs[2] = u32::from(revision)
            | (u32::from(prog_if) << 8)
            | (u32::from(subclass) << 16)
            | (u32::from(class) << 24);
        regs[11] = u32::from(subsys_vendor) | (u32::from(subsys_id) << 16);
        // Command: I/O, memory, bus master, interrupt disable are writable.
        wmask[REG_COMMAND] = 0x0000_0407;
        // Interrupt line is writable (pin is not).
        wmask[REG_INTERRUPT] = 0x0000_00ff;
        ConfigSpace {
            regs,
            wmask,
            bars: Vec::new(),
            next_cap: 0x40,
            last_cap: None,
        }
    }

    /// INTx: pin A wired to `line` (the IOAPIC pin / GSI).
    pub fn set_interrupt(&mut self, line: u8) {
        self.regs[REG_INTERRUPT] = u32::from(line) | (1 << 8);
    }

    /// A 64-bit, non-prefetchable memory BAR at `index` (uses `index` and `index + 1`).
    /// `size` must be a power of two and `addr` aligned to it.
    pub fn add_bar64(&mut self, index: usize, addr: u64, size: u64) {
        debug_assert!(size.is_power_of_two() && addr % size == 0 && index < 5);
        let r = REG_BAR0 + index;
        self.regs[r] = (addr as u32) | 0x4;
        self.regs[r + 1] = (addr >> 32) as u32;
        self.wmask[r] = !(size as u32 - 1) & !0xf;
        self.wmask[r + 1] = !((size - 1) >> 32) as u32;
        self.bars.push(PciBar { index, addr, size });
    }

    pub fn bars(&self) -> &[PciBar] {
        &self.bars
    }

    /// Appends a capability whose body (after the 2-byte id/next header) is `body`.
    /// Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let off = self.next_cap;
        let len = (2 + body.len() + 3) & !3;
        let mut bytes = vec![0u8; len];
        bytes[0] = id;
        bytes[2..2 + body.len()].copy_from_slice(body);
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(off + i, *b);
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, off as u8),
            None => {
                self.regs[REG_CAP_PTR] = off as u32;
                self.regs[REG_COMMAND] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(off);
        self.next_cap = off + len;
        off
    }

    fn set_byte(&mut self, off: usize, b: u8) {
        let (r, s) = (off / 4, (off % 4) * 8);
        self.regs[r] = (self.regs[r] & !(0xff << s)) | (u32::from(b) << s);
    }

    pub fn read(&self, reg: usize, offset: usize, data: &mut [u8]) {
        let v = self
            .regs
            .get(reg)
            .copied()
            .unwrap_or(0xffff_ffff)
            .to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let Some(&mask) = self.wmask.get(reg) else {
            return;
        };
        if offset + data.len() > 4 {
            return;
        }
        let mut v = self.regs[reg].to_le_bytes();
        let m = mask.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let j = offset + i;
            v[j] = (v[j] & !m[j]) | (b & m[j]);
        }
        let new = u32::from_le_bytes(v);
        if let Some(bar) = self
            .bars
            .iter()
            .find(|b| reg == REG_BAR0 + b.index || reg == REG_BAR0 + b.index + 1)
        {
            // Sizing writes all ones and reads back the mask; anything else that is not the
            // VMM's address would move the BAR, which this bus does not support: keep the
            // address and say so.
            let all_ones = data.iter().all(|b| *b == 0xff);
            let expected = if reg == REG_BAR0 + bar.index {
                (bar.addr as u32) | 0x4
            } else {
                (bar.addr >> 32) as u32
            };
            if !all_ones && new != expected {
                crate::guest_warn!(reg, new, "guest tried to move a PCI BAR; ignored");
                self.regs[reg] = expected;
                return;
            }
        }
        self.regs[reg] = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_and_restore() {
        let mut c = ConfigSpace::new(0x1af4, 0x1044, 0xff, 0, 0, 1, 0x1af4, 0x40);
        c.add_bar64(0, 0xc000_4000, 0x4000);
        let mut d = [0u8; 4];
        c.write(4, 0, &[0xff; 4]);
        c.read(4, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_c004);
        c.write(4, 0, &0xc000_4000u32.to_le_bytes());
        c.read(4, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xc000_4004);
        // Relocation is refused.
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        c.read(4, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xc000_4004);
        // Out-of-range register and read-only id.
        c.write(0, 0, &[0, 0, 0, 0]);
        c.read(0, 0, &mut d);
        assert_eq!(d, [0xf4, 0x1a, 0x44, 0x10]);
        c.read(200, 0, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn capability_chain() {
        let mut c = ConfigSpace::new(0x1af4, 0x1044, 0xff, 0, 0, 1, 0x1af4, 0x40);
        let a = c.add_capability(0x09, &[14, 1, 0, 0]);
        let b = c.add_capability(0x09, &[14, 2, 0, 0]);
        let mut d = [0u8; 1];
        c.read(13, 0, &mut d);
        assert_eq!(d[0] as usize, a);
        c.read(a / 4, 1, &mut d);
        assert_eq!(d[0] as usize, b);
    }
}
