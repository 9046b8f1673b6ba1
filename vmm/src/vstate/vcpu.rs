//! vCPU threads: configure registers for the boot protocol, run KVM_RUN, dispatch port and MMIO
//! exits to the buses, and report why the VM stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::regs;
use crate::devices::bus::Bus;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked to reset (i8042 reset, triple fault after a requested reboot, or
    /// KVM_SYSTEM_EVENT reset): husk treats reboot and poweroff as "the VM is done".
    Reset,
    /// KVM_SYSTEM_EVENT shutdown.
    Shutdown,
    /// The VMM asked the vCPU to stop.
    Stopped,
    /// Something the guest cannot recover from.
    Crash(String),
}

/// Kicks a vCPU out of KVM_RUN. The handler does nothing: delivery alone makes KVM_RUN
/// return EINTR.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), noop_handler) {
            tracing::error!("registering the vCPU kick signal handler: {e}");
        }
    });
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Vcpu, kvm_ioctls::Error> {
        Ok(Vcpu {
            index,
            fd: vm.create_vcpu(u64::from(index))?,
        })
    }

    /// CPUID, MSRs, LAPIC for every vCPU; registers only for the boot vCPU (the others wait
    /// for INIT/SIPI from the guest in the in-kernel LAPIC).
    pub fn configure(
        &self,
        kvm: &Kvm,
        cpuid: &CpuId,
        entry: Option<u64>,
    ) -> Result<(), regs::RegsError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(|e| regs::RegsError::Kvm("SET_CPUID2", e))?;
        regs::setup_msrs(kvm, &self.fd)?;
        regs::setup_lint(&self.fd)?;
        if let Some(entry) = entry {
            regs::setup_regs(&self.fd, entry)?;
            regs::setup_sregs(&self.fd)?;
            regs::setup_fpu(&self.fd)?;
        }
        Ok(())
    }
}

/// Shared state each vCPU thread needs.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub reset: Arc<AtomicBool>,
    pub stop: Arc<AtomicBool>,
    pub events: Sender<(u8, VcpuStop)>,
    /// For crash diagnostics (the instruction bytes at a failing rip).
    pub mem: vm_memory::GuestMemoryMmap,
}

/// Up to 16 bytes at `rip`, assuming the identity mapping the boot set-up installs (true for
/// the boot code and decompressor, where emulation failures happen on PVM hosts).
fn insn_bytes(mem: &vm_memory::GuestMemoryMmap, rip: u64) -> String {
    use vm_memory::Bytes;
    let mut b = [0u8; 16];
    match mem.read_slice(&mut b, vm_memory::GuestAddress(rip)) {
        Ok(()) => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "unavailable".into(),
    }
}

fn run_loop(vcpu: &mut Vcpu, ctx: &VcpuContext) -> VcpuStop {
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            return VcpuStop::Stopped;
        }
        if ctx.reset.load(Ordering::SeqCst) {
            return VcpuStop::Reset;
        }
        match vcpu.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !ctx.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                VcpuExit::IoOut(port, data) => {
                    ctx.pio.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.mmio.read(addr, data) {
                        tracing::debug!("unclaimed MMIO read at {addr:#x}");
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !ctx.mmio.write(addr, data) {
                        tracing::debug!("unclaimed MMIO write at {addr:#x}");
                    }
                }
                VcpuExit::Hlt => return VcpuStop::Shutdown,
                VcpuExit::Shutdown => {
                    return VcpuStop::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into())
                }
                VcpuExit::SystemEvent(kind, _) => {
                    return match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::Shutdown,
                        other => VcpuStop::Crash(format!("system event {other}")),
                    }
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return VcpuStop::Crash(format!(
                        "VM entry failed: hardware reason {reason:#x} on cpu {cpu}"
                    ))
                }
                VcpuExit::InternalError => {
                    let rip = vcpu.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return VcpuStop::Crash(format!(
                        "KVM internal error (emulation failure?) at rip {rip:#x}, bytes {}",
                        insn_bytes(&ctx.mem, rip)
                    ));
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                other => {
                    return VcpuStop::Crash(format!("unexpected vCPU exit {other:?}"));
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return VcpuStop::Crash(format!("KVM_RUN: {e}")),
        }
    }
}

pub struct VcpuHandle {
    pub index: u8,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the vCPU thread.
    pub fn spawn(mut vcpu: Vcpu, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
        install_kick_handler();
        let index = vcpu.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let why = run_loop(&mut vcpu, &ctx);
                tracing::debug!(vcpu = index, "stopped: {why:?}");
                let _ = ctx.events.send((index, why));
            })?;
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
        })
    }

    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                let _ = t.kill(kick_signal());
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
