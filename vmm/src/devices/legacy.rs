//! The one piece of the i8042 keyboard controller a Linux guest uses: the CPU reset command,
//! which is how `reboot=k` guests (and husk's agent) end the VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::bus::BusDevice;

pub const I8042_PORT: u16 = 0x60;
pub const I8042_LEN: u64 = 5;
const CMD_RESET_CPU: u8 = 0xfe;

/// Raises `reset` when the guest pulses the reset line.
pub struct I8042 {
    reset: Arc<AtomicBool>,
}

impl I8042 {
    pub fn new(reset: Arc<AtomicBool>) -> Self {
        I8042 { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the guest's reset path
        // does not wait.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&CMD_RESET_CPU) {
            self.reset.store(true, Ordering::SeqCst);
        }
    }
}
