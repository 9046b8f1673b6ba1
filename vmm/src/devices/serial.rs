//! The 8250 UART on COM1 (vm-superio), written to a size-capped log. The last bytes written are
//! kept so that a guest crash can be reported with the console's last lines.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{lock, BusDevice};
use crate::console_log::CappedLog;

const TAIL_BYTES: usize = 16 * 1024;

/// An interrupt line backed by a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The last bytes of console output, shared with the VMM for crash reports.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    fn push(&self, buf: &[u8]) {
        let mut t = lock(&self.0);
        t.extend(buf.iter().copied());
        let excess = t.len().saturating_sub(TAIL_BYTES);
        t.drain(..excess);
    }

    /// The last `n` lines of console output.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let t = lock(&self.0);
        let bytes: Vec<u8> = t.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }

    /// Everything still held.
    pub fn contents(&self) -> String {
        let t = lock(&self.0);
        String::from_utf8_lossy(&t.iter().copied().collect::<Vec<_>>()).into_owned()
    }
}

/// Console sink: the log file plus the tail buffer.
pub struct ConsoleOut {
    file: Option<CappedLog>,
    tail: ConsoleTail,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.push(buf);
        if let Some(f) = self.file.as_mut() {
            // A full disk must not stall the vCPU thread: drop console output instead.
            if let Err(e) = f.write_all(buf) {
                crate::guest_warn!("console log write failed: {e}");
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// COM1 on the port I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, file: Option<CappedLog>, tail: ConsoleTail) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), ConsoleOut { file, tail }),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                crate::guest_warn!("serial write: {e:?}");
            }
        }
    }
}
