//! Builds a VM from a `VmConfig` and runs it: memory, kernel, devices, vCPUs.
//! This is also the Rust API huskd can drive instead of the binary (`launch`).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::cpuid::{self, Accel};
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::{self as arch, mptable, regs};
use crate::config::VmConfig;
use crate::console_log::CappedLog;
use crate::devices::bus::Bus;
use crate::devices::legacy::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::pci::{self, PciBus};
use crate::devices::serial::{ConsoleTail, SerialDevice};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::transport::pci::{SharedVirtioPci, VirtioPciDevice, BAR_SIZE};
use crate::devices::virtio::vsock::device::Vsock;
use crate::devices::virtio::vsock::MuxerConfig;
use crate::event_loop::EventLoop;
use crate::vstate::vcpu::{Vcpu, VcpuContext, VcpuHandle, VcpuStop};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("VM: {0}")]
    Vm(#[from] VmError),
    #[error("boot set-up: {0}")]
    Boot(#[from] arch::BootError),
    #[error("registers: {0}")]
    Regs(#[from] regs::RegsError),
    #[error("CPUID: {0}")]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    #[error("creating vCPU {0}: {1}")]
    Vcpu(u8, kvm_ioctls::Error),
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    #[error("virtio transport: {0}")]
    Transport(#[from] crate::devices::virtio::transport::pci::TransportError),
    #[error("serial console log {0}: {1}")]
    SerialLog(String, std::io::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("KVM {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("virtio-net: {0}")]
    Net(#[from] crate::devices::virtio::net::NetError),
    #[error("virtio-fs: {0}")]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    #[error("virtio-vsock: {0}")]
    Vsock(crate::devices::virtio::vsock::MuxerError),
    #[error("{0} is not implemented in husk-vmm yet")]
    Unsupported(&'static str),
    #[error("out of {0}")]
    Exhausted(&'static str),
}

/// How the VM ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub reason: VcpuStop,
    /// Last lines of the serial console (for crash reports).
    pub console_tail: Vec<String>,
}

impl Outcome {
    pub fn is_crash(&self) -> bool {
        matches!(self.reason, VcpuStop::Crash(_))
    }
}

pub use husk_vmm_api::VmState;

/// Asks a running VM to stop from another thread (the control socket).
#[derive(Clone)]
pub struct StopHandle(Sender<(u8, VcpuStop)>);

impl StopHandle {
    pub fn request_stop(&self) {
        let _ = self.0.send((u8::MAX, VcpuStop::Stopped));
    }
}

/// Parks and unparks all vCPUs. Devices keep running (their queues simply see no new work);
/// guest time as seen through kvm-clock keeps advancing.
#[derive(Clone)]
pub struct PauseHandle {
    state: Arc<crate::vstate::vcpu::PauseState>,
    vcpus: usize,
}

impl PauseHandle {
    /// Returns false if the vCPUs did not all park within a second.
    pub fn pause(&self) -> bool {
        self.state.pause(self.vcpus, Duration::from_secs(1))
    }

    pub fn resume(&self) {
        self.state.resume()
    }

    pub fn is_paused(&self) -> bool {
        self.state.is_paused()
    }
}

/// Allocates IOAPIC pins for PCI devices (COM1 keeps 4; 8 is left for an RTC).
struct GsiAllocator(u32);

impl GsiAllocator {
    fn next(&mut self) -> Option<u32> {
        while self.0 == COM1_GSI || self.0 == 8 {
            self.0 += 1;
        }
        if self.0 >= IOAPIC_PINS {
            return None;
        }
        self.0 += 1;
        Some(self.0 - 1)
    }
}

pub struct Vmm {
    pub id: String,
    vm: Vm,
    accel: Accel,
    pending: Vec<Vcpu>,
    handles: Vec<VcpuHandle>,
    ctx: VcpuContext,
    events: Receiver<(u8, VcpuStop)>,
    event_loop: Arc<EventLoop>,
    event_thread: Option<JoinHandle<()>>,
    console: ConsoleTail,
    virtio: Vec<(u32, SharedVirtioPci)>,
    rng_rejected: Option<Arc<AtomicU64>>,
    state: VmState,
    started: Option<Instant>,
    outcome: Option<Outcome>,
    cfg: VmConfig,
}

impl Vmm {
    /// Creates the VM and everything in it; no guest code runs until `start`.
    pub fn build(cfg: &VmConfig) -> Result<Vmm, BuildError> {
        crate::config::validate(cfg)?;
        let accel = Accel::detect();
        let regions = arch::memory_regions(cfg.memory_mib << 20);
        let vm = Vm::new(&regions, cfg.vcpus)?;
        regs::write_boot_tables(&vm.mem)?;
        let boot = arch::load_kernel(&vm.mem, &cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline)?;

        let event_loop = EventLoop::new()?;
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let reset = Arc::new(AtomicBool::new(false));

        let console = ConsoleTail::default();
        let log = match &cfg.serial_log {
            Some(p) => Some(
                CappedLog::open(
                    p,
                    cfg.serial_log_max_bytes
                        .unwrap_or(husk_vmm_api::config::DEFAULT_SERIAL_LOG_MAX_BYTES),
                )
                .map_err(|e| BuildError::SerialLog(p.display().to_string(), e))?,
            ),
            None => None,
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK)?;
        vm.fd
            .register_irqfd(&serial_irq, COM1_GSI)
            .map_err(|e| BuildError::Kvm("IRQFD", e))?;
        pio.insert(
            Arc::new(Mutex::new(SerialDevice::new(
                serial_irq,
                log,
                console.clone(),
            ))),
            u64::from(COM1_PORT),
            8,
        )?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(reset.clone()))),
            u64::from(I8042_PORT),
            I8042_LEN,
        )?;

        let mut pci_bus = PciBus::new();
        let mut gsis = GsiAllocator(5);
        let mut virtio = Vec::new();
        let mut pci_irqs = Vec::new();
        let mut rng_rejected = None;
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        if cfg.devices.rng {
            let rng = Rng::new();
            rng_rejected = Some(rng.rejected_counter());
            devices.push(Box::new(rng));
        }
        if let Some(v) = &cfg.devices.vsock {
            let mc = MuxerConfig::new(v.guest_cid, v.uds_path.clone());
            devices.push(Box::new(Vsock::new(mc).map_err(BuildError::Vsock)?));
        }
        for f in &cfg.devices.fs {
            devices.push(Box::new(Fs::new(&f.tag, &f.socket, vm.memfd.as_raw_fd())?));
        }
        for n in &cfg.devices.net {
            devices.push(Box::new(Net::new(&n.tap, n.mac.as_deref())?));
        }
        for dev in devices {
            let slot = pci_bus
                .next_slot()
                .ok_or(BuildError::Exhausted("PCI slots"))?;
            let gsi = gsis.next().ok_or(BuildError::Exhausted("IOAPIC pins"))?;
            let bar = PCI_MMIO_START + u64::from(slot) * BAR_SIZE;
            let dtype = dev.device_type();
            let d = Arc::new(Mutex::new(VirtioPciDevice::new(
                dev,
                &vm.fd,
                vm.mem.clone(),
                event_loop.clone(),
                bar,
                gsi,
            )?));
            pci_bus.add(slot, d.clone());
            mmio.insert(d.clone(), bar, BAR_SIZE)?;
            pci_irqs.push(mptable::PciIrq {
                device: slot,
                pin: gsi as u8,
            });
            tracing::info!(id = %cfg.id, slot, gsi, bar = format_args!("{bar:#x}"), "virtio-pci device type {dtype}");
            virtio.push((dtype, d));
        }
        pio.insert(
            Arc::new(Mutex::new(pci_bus)),
            u64::from(pci::CONFIG_IO_PORT),
            pci::CONFIG_IO_LEN,
        )?;
        mptable::setup_mptable(&vm.mem, cfg.vcpus, &pci_irqs)?;

        let hide = cfg
            .hide_emulator_unsupported_cpuid
            .unwrap_or(accel == Accel::Pvm);
        let base = cpuid::base_cpuid(&vm.kvm, hide)?;
        let mut pending = Vec::new();
        for i in 0..cfg.vcpus {
            let vcpu = Vcpu::new(&vm.fd, i).map_err(|e| BuildError::Vcpu(i, e))?;
            let c = cpuid::vcpu_cpuid(&base, i, cfg.vcpus);
            vcpu.configure(&vm.kvm, &c, (i == 0).then_some(boot.entry))?;
            pending.push(vcpu);
        }
        let (tx, rx) = channel();
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            reset,
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::default(),
            events: tx,
            mem: vm.mem.clone(),
        };
        tracing::info!(id = %cfg.id, ?accel, hide_cpuid = hide, entry = format_args!("{:#x}", boot.entry), "VM built");
        Ok(Vmm {
            id: cfg.id.clone(),
            vm,
            accel,
            pending,
            handles: Vec::new(),
            ctx,
            events: rx,
            event_loop,
            event_thread: None,
            console,
            virtio,
            rng_rejected,
            state: VmState::Created,
            started: None,
            outcome: None,
            cfg: cfg.clone(),
        })
    }

    /// Starts the device thread and the vCPUs.
    pub fn start(&mut self) -> Result<(), BuildError> {
        if self.state != VmState::Created {
            return Ok(());
        }
        let el = self.event_loop.clone();
        self.event_thread = Some(
            std::thread::Builder::new()
                .name("husk-devices".into())
                .spawn(move || el.run())?,
        );
        self.started = Some(Instant::now());
        for vcpu in self.pending.drain(..) {
            self.handles
                .push(VcpuHandle::spawn(vcpu, self.ctx.clone())?);
        }
        self.state = VmState::Running;
        Ok(())
    }

    /// Waits until the VM stops (guest reset/poweroff/crash or `StopHandle`), at most
    /// `timeout`. Returns `None` on timeout; the VM keeps running then.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<Outcome> {
        if let Some(o) = &self.outcome {
            return Some(o.clone());
        }
        let (_, why) = match timeout {
            Some(t) => match self.events.recv_timeout(t) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => (u8::MAX, VcpuStop::Stopped),
            },
            None => self.events.recv().unwrap_or((u8::MAX, VcpuStop::Stopped)),
        };
        self.stop_all();
        let console_tail = self.console.last_lines(20);
        let reason = match why {
            // panic=-1 reboots: a reboot right after a panic message is a crash.
            VcpuStop::Reset
                if console_tail
                    .iter()
                    .any(|l| l.contains("Kernel panic - not syncing")) =>
            {
                VcpuStop::Crash("guest kernel panic".into())
            }
            other => other,
        };
        if let VcpuStop::Crash(what) = &reason {
            tracing::error!(id = %self.id, "guest crashed: {what}; last console lines:\n{}", console_tail.join("\n"));
        }
        let o = Outcome {
            reason,
            console_tail,
        };
        self.outcome = Some(o.clone());
        Some(o)
    }

    fn stop_all(&mut self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        self.ctx.pause.wake();
        // A kick can race with a vCPU about to enter KVM_RUN; repeat until all are out.
        for _ in 0..1000 {
            if self.handles.iter().all(|h| h.is_finished()) {
                break;
            }
            for h in &self.handles {
                h.kick();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.ctx.pause.forget_threads();
        for h in &mut self.handles {
            h.join();
        }
        self.event_loop.stop();
        if let Some(t) = self.event_thread.take() {
            let _ = t.join();
        }
        self.state = VmState::Stopped;
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.ctx.events.clone())
    }

    /// Pause/resume from another thread (the control socket).
    pub fn pause_handle(&self) -> PauseHandle {
        PauseHandle {
            state: self.ctx.pause.clone(),
            vcpus: usize::from(self.cfg.vcpus),
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    pub fn uptime(&self) -> Option<Duration> {
        self.started.map(|s| s.elapsed())
    }

    /// Guest RAM (for tests, the benchmark, and vhost-user back-ends).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.vm.mem
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm.fd
    }

    pub fn console(&self) -> &ConsoleTail {
        &self.console
    }

    /// Virtio device status bytes, by device type, in PCI slot order.
    pub fn virtio_status(&self) -> Vec<(u32, u8)> {
        self.virtio
            .iter()
            .map(|(t, d)| (*t, crate::devices::virtio::transport::pci::device_status(d)))
            .collect()
    }

    /// Requests the virtio-rng device refused as malformed.
    pub fn rng_rejected(&self) -> u64 {
        self.rng_rejected
            .as_ref()
            .map(|c| c.load(Ordering::SeqCst))
            .unwrap_or(0)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.state == VmState::Running {
            self.stop_all();
        }
    }
}

/// Builds and starts a VM.
pub fn launch(cfg: &VmConfig) -> Result<Vmm, BuildError> {
    let mut vmm = Vmm::build(cfg)?;
    vmm.start()?;
    Ok(vmm)
}
