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
    pub pause: Arc<PauseState>,
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

/// Pause/resume of all vCPUs: a vCPU that sees `paused` parks outside KVM_RUN (its state
/// stays in KVM) until resumed or stopped.
#[derive(Default)]
pub struct PauseState {
    inner: std::sync::Mutex<PauseInner>,
    cond: std::sync::Condvar,
    threads: std::sync::Mutex<Vec<libc::pthread_t>>,
}

#[derive(Default)]
struct PauseInner {
    paused: bool,
    parked: usize,
}

impl PauseState {
    fn park_if_paused(&self, stop: &AtomicBool) {
        let mut g = crate::devices::bus::lock(&self.inner);
        if !g.paused {
            return;
        }
        g.parked += 1;
        self.cond.notify_all();
        while g.paused && !stop.load(Ordering::SeqCst) {
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked -= 1;
        self.cond.notify_all();
    }

    fn kick_all(&self) {
        for t in crate::devices::bus::lock(&self.threads).iter() {
            // SAFETY: the list only holds threads that have not been joined yet
            // (`forget_threads` empties it, under this lock, before any join), so every id is
            // valid; the kick signal's handler does nothing.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Parks all `count` vCPUs; returns false if they did not all park within `timeout`.
    pub fn pause(&self, count: usize, timeout: std::time::Duration) -> bool {
        crate::devices::bus::lock(&self.inner).paused = true;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if crate::devices::bus::lock(&self.inner).parked >= count {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            // Repeated because a kick can land just before a vCPU enters KVM_RUN.
            self.kick_all();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    pub fn resume(&self) {
        crate::devices::bus::lock(&self.inner).paused = false;
        self.cond.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        crate::devices::bus::lock(&self.inner).paused
    }

    /// Must be called before joining the vCPU threads.
    pub fn forget_threads(&self) {
        crate::devices::bus::lock(&self.threads).clear();
    }

    /// Wakes parked vCPUs so they can see `stop`.
    pub fn wake(&self) {
        let _g = crate::devices::bus::lock(&self.inner);
        self.cond.notify_all();
    }
}

fn run_loop(vcpu: &mut Vcpu, ctx: &VcpuContext) -> VcpuStop {
    loop {
        ctx.pause.park_if_paused(&ctx.stop);
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

fn lock_threads(p: &PauseState) -> std::sync::MutexGuard<'_, Vec<libc::pthread_t>> {
    crate::devices::bus::lock(&p.threads)
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
        let pause = ctx.pause.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let why = run_loop(&mut vcpu, &ctx);
                tracing::debug!(vcpu = index, "stopped: {why:?}");
                let _ = ctx.events.send((index, why));
            })?;
        // Registered from here, not from the thread, so that `forget_threads` (called before
        // join) can never miss one.
        lock_threads(&pause).push(std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread));
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
