//! The KVM VM: guest memory (memfd-backed, shareable with vhost-user back-ends), memory slots,
//! in-kernel irqchip and PIT.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    Address, FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM ioctl {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("memfd: {0}")]
    Memfd(std::io::Error),
    #[error("KVM supports at most {max} vCPUs here, {wanted} requested")]
    TooManyVcpus { wanted: u8, max: usize },
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    /// The file behind guest RAM; vhost-user back-ends map it.
    pub memfd: Arc<File>,
}

fn memfd(size: u64) -> Result<File, VmError> {
    let name = c"husk-guest-ram";
    // SAFETY: name is a valid NUL-terminated string; the returned fd is checked and owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(VmError::Memfd)?;
    Ok(file)
}

impl Vm {
    /// Creates the VM with `regions` of RAM (see `arch::x86_64::memory_regions`).
    pub fn new(regions: &[(vm_memory::GuestAddress, usize)], vcpus: u8) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max || vcpus == 0 {
            return Err(VmError::TooManyVcpus { wanted: vcpus, max });
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("CREATE_VM", e))?;
        let total: u64 = regions.iter().map(|r| r.1 as u64).sum();
        let file = Arc::new(memfd(total)?);
        let mut offset = 0u64;
        let mut mmaps = Vec::new();
        for (addr, size) in regions {
            let f = file.try_clone().map_err(VmError::Memfd)?;
            let r = GuestRegionMmap::from_range(*addr, *size, Some(FileOffset::new(f, offset)))
                .map_err(|e| VmError::Memory(e.to_string()))?;
            mmaps.push(r);
            offset += *size as u64;
        }
        let mem =
            GuestMemoryMmap::from_regions(mmaps).map_err(|e| VmError::Memory(e.to_string()))?;
        for (slot, r) in mem.iter().enumerate() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory(e.to_string()))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region maps memory owned by `mem`, which lives as long as the VM
            // (both are dropped together in `Vm`), and slots do not overlap.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(|e| VmError::Ioctl("SET_USER_MEMORY_REGION", e))?;
        }
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|e| VmError::Ioctl("SET_IDENTITY_MAP_ADDR", e))?;
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(|e| VmError::Ioctl("SET_TSS_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Ioctl("CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Ioctl("CREATE_PIT2", e))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            mem,
            memfd: file,
        })
    }
}
