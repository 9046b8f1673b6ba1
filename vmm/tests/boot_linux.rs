//! Boot smoke test: husk-vmm loads the project's guest kernel and the kernel's banner and early
//! boot messages reach the serial log.
//!
//! On PVM hosts (no VT-x/SVM) the guest kernel runs through KVM's instruction emulator: the
//! bzImage's zstd decompressor dies on SHLX (BMI2; PVM does not intercept CPUID, so the
//! feature cannot be hidden), so this test boots the ELF vmlinux extracted from the bzImage
//! (linux-loader's ELF path) with `clearcpuid=`/`noxsave` on the command line, and only
//! checks early boot within a time budget. It prints how far the kernel got.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::TempDir;
use husk_guest_image::{kernel_tree, KernelOptions, KernelTree};
use husk_vmm::builder::launch;
use husk_vmm::config::VmConfig;

/// The project's guest kernel, unpacked (with the ELF vmlinux) by husk-guest-image into the
/// cache `make guest-image` fills; downloaded first if the cache lacks it.
fn guest_kernel() -> KernelTree {
    kernel_tree(&KernelOptions::default()).unwrap_or_else(|e| {
        panic!("guest kernel from husk-guest-image (see scripts/install-deps): {e}")
    })
}

/// The initrd `make guest-image` installed ($HUSK_GUEST_DIR, as `make test` sets it), if any:
/// early boot does not need one, but when it is there the test loads it as huskd would.
fn installed_initrd() -> Option<PathBuf> {
    let dir = std::env::var_os("HUSK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(husk_guest_image::DEFAULT_OUT_DIR));
    match husk_guest_image::installed(&dir) {
        Ok(img) => Some(img.initrd),
        Err(husk_guest_image::Error::NotInstalled { .. }) => None,
        Err(e) => panic!("guest image in {}: {e}", dir.display()),
    }
}

fn host_tsc_khz() -> u64 {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(0)
}

/// Printed after the zero page, E820 map, CPUID and MP table have been consumed.
const EARLY_BOOT_DONE: &str = "Booting paravirtualized kernel on KVM";

#[test]
fn guest_kernel_banner_and_early_boot_reach_serial() {
    let dir = TempDir::new("boot");
    let tree = guest_kernel();
    let kernel = tree.vmlinuz.clone();
    let vmlinux = tree.vmlinux.clone();
    let mut cmdline = String::from(
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 noxsave \
         clearcpuid=cx16,bmi1,bmi2,avx,avx2,xsave,aes,pclmulqdq,rdrand,rdseed,adx,sha_ni",
    );
    let khz = host_tsc_khz();
    if khz > 0 {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let initrd = installed_initrd();
    let cfg = VmConfig {
        id: "boot-smoke".into(),
        kernel: vmlinux,
        initrd: initrd.clone(),
        cmdline,
        vcpus: 1,
        memory_mib: 256,
        serial_log: Some(dir.path().join("serial.log")),
        serial_log_max_bytes: None,
        control_socket: None,
        pid_file: None,
        hide_emulator_unsupported_cpuid: None,
        devices: husk_vmm::config::Devices {
            rng: true,
            ..Default::default()
        },
    };
    let budget = Duration::from_secs(
        std::env::var("HUSK_BOOT_BUDGET_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    );
    let t0 = Instant::now();
    let mut vmm = launch(&cfg).expect("launch");
    let log_path = dir.path().join("serial.log");
    // Stop as soon as early boot is visibly done (or the guest stops, or the budget runs out).
    let mut outcome = None;
    while t0.elapsed() < budget {
        outcome = vmm.wait(Some(Duration::from_secs(1)));
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if outcome.is_some() || log.contains(EARLY_BOOT_DONE) {
            break;
        }
    }
    let elapsed = t0.elapsed();
    drop(vmm);
    let log = std::fs::read_to_string(&log_path).unwrap();
    let last = log.lines().last().unwrap_or("");
    eprintln!(
        "boot smoke: {} (initrd {:?}) after {:.1} s ({} lines on the console), outcome {:?}; \
         last line: {last}",
        kernel.display(),
        initrd,
        elapsed.as_secs_f64(),
        log.lines().count(),
        outcome.as_ref().map(|o| &o.reason)
    );
    assert!(
        log.contains("Linux version 6."),
        "no banner; console:\n{log}"
    );
    assert!(
        log.contains("Command line: console=ttyS0"),
        "console:\n{log}"
    );
    assert!(
        log.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "E820 map from the zero page; console:\n{log}"
    );
    assert!(log.contains("Hypervisor detected: KVM"), "console:\n{log}");
    assert!(log.contains(EARLY_BOOT_DONE), "console:\n{log}");
    if let Some(o) = outcome {
        assert!(!o.is_crash(), "guest crashed: {o:?}\nconsole:\n{log}");
    }
}
