//! Boot smoke test: husk-vmm loads the project's guest kernel and the kernel's banner and early
//! boot messages reach the serial log.
//!
//! On PVM hosts (no VT-x/SVM) the guest kernel runs through KVM's instruction emulator: the
//! bzImage's zstd decompressor dies on SHLX (BMI2; PVM does not intercept CPUID, so the
//! feature cannot be hidden), so this test boots the ELF vmlinux extracted from the bzImage
//! (linux-loader's ELF path) with `clearcpuid=`/`noxsave` on the command line, and only
//! checks early boot within a time budget. It prints how far the kernel got.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use husk_vmm::builder::launch;
use husk_vmm::config::VmConfig;

fn find_kernel() -> PathBuf {
    if let Ok(p) = std::env::var("HUSK_GUEST_KERNEL") {
        return p.into();
    }
    let project = Path::new("/var/lib/husk/guest/vmlinuz");
    if project.exists() {
        return project.into();
    }
    // Fallback while the project image is being built: the Debian cloud kernel extracted with
    // `apt-get download linux-image-6.12.*-cloud-amd64 && dpkg -x` under /tmp/husk-kernel.
    let boot = Path::new("/tmp/husk-kernel/root/boot");
    if let Ok(rd) = std::fs::read_dir(boot) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("vmlinuz-") {
                return e.path();
            }
        }
    }
    panic!(
        "no guest kernel: set HUSK_GUEST_KERNEL, build /var/lib/husk/guest/vmlinuz, or extract \
         linux-image-6.12-cloud-amd64's kernel under /tmp/husk-kernel/root/boot"
    );
}

/// The ELF vmlinux inside a zstd-compressed bzImage (the `zstd` tool decompresses it).
fn extract_vmlinux(bz: &Path, out: &Path) {
    let data = std::fs::read(bz).unwrap();
    let magic = [0x28, 0xb5, 0x2f, 0xfd];
    let mut start = 0;
    while let Some(i) = data[start..].windows(4).position(|w| w == magic) {
        let at = start + i;
        let mut child = Command::new("zstd")
            .args(["-d", "-c", "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("zstd (apt-get install zstd)");
        let mut stdin = child.stdin.take().unwrap();
        let payload = data[at..].to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&payload);
        });
        let output = child.wait_with_output().unwrap();
        let _ = writer.join();
        if output.stdout.starts_with(b"\x7fELF") {
            std::fs::write(out, &output.stdout).unwrap();
            return;
        }
        start = at + 1;
    }
    panic!("{} holds no zstd-compressed ELF kernel", bz.display());
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
    let kernel = find_kernel();
    let vmlinux = dir.path().join("vmlinux");
    extract_vmlinux(&kernel, &vmlinux);
    let mut cmdline = String::from(
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 noxsave \
         clearcpuid=cx16,bmi1,bmi2,avx,avx2,xsave,aes,pclmulqdq,rdrand,rdseed,adx,sha_ni",
    );
    let khz = host_tsc_khz();
    if khz > 0 {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let initrd = Path::new("/var/lib/husk/guest/initrd.img");
    let cfg = VmConfig {
        id: "boot-smoke".into(),
        kernel: vmlinux,
        initrd: initrd.exists().then(|| initrd.to_owned()),
        cmdline,
        vcpus: 1,
        memory_mib: 256,
        serial_log: Some(dir.path().join("serial.log")),
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
        "boot smoke: {} after {:.1} s ({} lines on the console), outcome {:?}; last line: {last}",
        kernel.display(),
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
