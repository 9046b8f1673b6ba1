//! CPUID for the guest: KVM's supported set, with topology filled in per vCPU and, on hosts
//! where the guest runs through KVM's instruction emulator (PVM), the features the emulator
//! cannot execute hidden so that the guest kernel does not pick code paths that use them.
//!
//! Measured on the PVM hosts husk is developed on: the guest's CPUID instruction is NOT
//! intercepted (the host CPU has no CPUID faulting), so the guest sees the host's native CPUID
//! and the table set here has no effect there. On such hosts use the kernel command line
//! (`clearcpuid=`, `noxsave`) instead; on VT-x/SVM hosts this table is what the guest sees.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Features hidden in "emulator-compatible" mode, as (leaf, subleaf, register, mask).
/// Register: 0 eax, 1 ebx, 2 ecx, 3 edx.
const EMULATOR_HIDDEN: &[(u32, u32, u8, u32)] = &[
    // Leaf 1 ECX: PCLMULQDQ, FMA, CX16, SSE4.1, SSE4.2, MOVBE, POPCNT, AES, XSAVE, OSXSAVE,
    // AVX, F16C, RDRAND.
    (
        1,
        0,
        2,
        (1 << 1)
            | (1 << 12)
            | (1 << 13)
            | (1 << 19)
            | (1 << 20)
            | (1 << 22)
            | (1 << 23)
            | (1 << 25)
            | (1 << 26)
            | (1 << 27)
            | (1 << 28)
            | (1 << 29)
            | (1 << 30),
    ),
    // Leaf 7.0 EBX: BMI1, AVX2, BMI2, AVX512F/DQ, RDSEED, ADX, AVX512IFMA, CLFLUSHOPT, CLWB,
    // AVX512PF/ER/CD, SHA, AVX512BW/VL.
    (
        7,
        0,
        1,
        (1 << 3)
            | (1 << 5)
            | (1 << 8)
            | (1 << 16)
            | (1 << 17)
            | (1 << 18)
            | (1 << 19)
            | (1 << 21)
            | (1 << 23)
            | (1 << 24)
            | (1 << 26)
            | (1 << 27)
            | (1 << 28)
            | (1 << 29)
            | (1 << 30)
            | (1u32 << 31),
    ),
    // Leaf 7.0 ECX: AVX512VBMI, WAITPKG, AVX512VBMI2, GFNI, VAES, VPCLMULQDQ, AVX512VNNI,
    // AVX512BITALG, AVX512VPOPCNTDQ, MOVDIRI, MOVDIR64B.
    (
        7,
        0,
        2,
        (1 << 1)
            | (1 << 5)
            | (1 << 6)
            | (1 << 8)
            | (1 << 9)
            | (1 << 10)
            | (1 << 11)
            | (1 << 12)
            | (1 << 14)
            | (1 << 27)
            | (1 << 28),
    ),
    // Leaf 7.0 EDX: AVX512 4VNNIW/4FMAPS, SERIALIZE, AMX, ARCH_CAPABILITIES.
    (
        7,
        0,
        3,
        (1 << 2) | (1 << 3) | (1 << 14) | (1 << 22) | (1 << 24) | (1 << 25) | (1 << 29),
    ),
    // Leaf 0x80000001 ECX: LZCNT/ABM, SSE4A, XOP, FMA4, TBM.
    (
        0x8000_0001,
        0,
        2,
        (1 << 5) | (1 << 6) | (1 << 11) | (1 << 16) | (1 << 21),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    Supported(kvm_ioctls::Error),
}

/// Whether the guest's instructions execute natively (VT-x/SVM) or through KVM's emulator (PVM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization: the guest runs at full speed.
    Hardware,
    /// PVM: a stock guest's privileged code goes through KVM's instruction emulator.
    Pvm,
}

impl Accel {
    /// Detects the accelerator from the host CPU flags.
    pub fn detect() -> Accel {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw {
            Accel::Hardware
        } else {
            Accel::Pvm
        }
    }
}

/// The supported CPUID of this host, filtered once per VM.
pub fn base_cpuid(kvm: &Kvm, hide_for_emulator: bool) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            // Tell the guest it runs under a hypervisor.
            e.ecx |= 1 << 31;
        }
        if hide_for_emulator {
            for &(leaf, sub, reg, mask) in EMULATOR_HIDDEN {
                if e.function == leaf && e.index == sub {
                    match reg {
                        0 => e.eax &= !mask,
                        1 => e.ebx &= !mask,
                        2 => e.ecx &= !mask,
                        _ => e.edx &= !mask,
                    }
                }
            }
            if e.function == 0xd {
                // No XSAVE: no XSAVE state components.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
    }
    Ok(cpuid)
}

/// Per-vCPU CPUID: APIC ids and topology (one core per vCPU, one socket).
pub fn vcpu_cpuid(base: &CpuId, cpu_index: u8, cpu_count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (u32::from(cpu_index) << 24) | (u32::from(cpu_count) << 16) | (8 << 8);
                if cpu_count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(cpu_count.saturating_sub(1)) << 26);
            }
            0xb | 0x1f => {
                // Level 0: SMT (one thread per core); level 1: cores.
                let shift = u32::BITS - u32::from(cpu_count.max(1) - 1).leading_zeros();
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = u32::from(cpu_count);
                        e.ecx = 1 | (2 << 8);
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = u32::from(cpu_index);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulator_mode_hides_features_in_the_table() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let c = base_cpuid(&kvm, true).unwrap();
        for e in c.as_slice() {
            if e.function == 1 {
                assert_eq!(e.ecx & ((1 << 13) | (1 << 26) | (1 << 28)), 0);
                assert_ne!(e.ecx & (1 << 31), 0);
            }
            if e.function == 7 && e.index == 0 {
                assert_eq!(e.ebx & ((1 << 3) | (1 << 5) | (1 << 8)), 0);
            }
            if e.function == 0xd {
                assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
            }
        }
        let v = vcpu_cpuid(&c, 1, 2);
        let leaf1 = v.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2);
    }
}
