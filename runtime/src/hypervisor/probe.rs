//! Host capability probing: is there hardware virtualization behind
//! /dev/kvm, and what is the host's TSC rate (needed on the guest kernel
//! command line under TCG).

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm (VT-x or SVM).
    Kvm,
    /// QEMU's software CPU emulation.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host offers, and a one-line human explanation of the choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelProbe {
    pub accel: Accel,
    /// e.g. "qemu (tcg): /dev/kvm has no hardware virtualization (PVM)".
    pub reason: String,
    /// The host fact alone, e.g. "/dev/kvm has no hardware virtualization
    /// (PVM)", for backends that phrase their own reason.
    pub why: String,
}

/// Facts the decision is made from; split out so the decision is testable.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub dev_kvm: bool,
    /// The cpu flags line of /proc/cpuinfo has vmx or svm.
    pub hw_virt_flag: bool,
    /// The kvm_pvm module is loaded (/sys/module/kvm_pvm).
    pub pvm: bool,
}

impl HostFacts {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            dev_kvm: Path::new("/dev/kvm").exists(),
            hw_virt_flag: cpuinfo_has_hw_virt(&cpuinfo),
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

/// True if the first `flags` line of a /proc/cpuinfo text lists vmx or svm.
pub fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "flags").then_some(v)
        })
        .is_some_and(|flags| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Chooses the accelerator QEMU should use.
pub fn decide(facts: &HostFacts) -> AccelProbe {
    let (accel, why) = if !facts.dev_kvm {
        (Accel::Tcg, "/dev/kvm is missing".to_string())
    } else if !facts.hw_virt_flag {
        let what = if facts.pvm {
            " (PVM)"
        } else {
            " (no vmx/svm in /proc/cpuinfo)"
        };
        (
            Accel::Tcg,
            format!("/dev/kvm has no hardware virtualization{what}"),
        )
    } else {
        (
            Accel::Kvm,
            "/dev/kvm with hardware virtualization".to_string(),
        )
    };
    AccelProbe {
        accel,
        reason: format!("qemu ({}): {why}", accel.as_str()),
        why,
    }
}

/// Probes this host.
pub fn probe_accel() -> AccelProbe {
    decide(&HostFacts::read())
}

/// The host TSC rate in kHz, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscRate {
    pub khz: u64,
    pub source: TscSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    /// The kernel's "Refined TSC clocksource calibration" log line.
    KernelRefined,
    /// The kernel's "tsc: Detected ... MHz processor" log line.
    KernelDetected,
    /// Measured here: RDTSC against CLOCK_MONOTONIC_RAW.
    Measured,
}

/// The host TSC rate, read once per process.
///
/// Under TCG the guest reads the host's TSC, so the guest needs the host's
/// rate. Preferred source: what the host kernel itself settled on, from its
/// log (the refined calibration if present, it is measured against a
/// reference clock over about a second; else the boot-time value, which
/// comes from CPUID/the hypervisor when the CPU has tsc_known_freq).
/// /proc/cpuinfo's "cpu MHz" is not used: with cpufreq it is the current
/// core clock, not the TSC. The kernel log can have wrapped on a long-lived
/// host, so the fallback measures the TSC against CLOCK_MONOTONIC_RAW for
/// 20 ms, which is within ~0.1% and ample for tsc_early_khz (the guest
/// refines its clocksource later anyway).
pub fn host_tsc_rate() -> Option<TscRate> {
    static RATE: OnceLock<Option<TscRate>> = OnceLock::new();
    *RATE.get_or_init(|| {
        let r = read_kmsg()
            .and_then(|log| tsc_from_kernel_log(&log))
            .or_else(measure_tsc);
        match r {
            Some(r) => tracing::info!(khz = r.khz, source = ?r.source, "host TSC rate"),
            None => tracing::warn!("host TSC rate unknown"),
        }
        r
    })
}

/// Extracts the TSC rate from kernel log text (dmesg or /dev/kmsg records).
pub fn tsc_from_kernel_log(log: &str) -> Option<TscRate> {
    let mut detected = None;
    let mut refined = None;
    for line in log.lines() {
        if let Some(rest) = after(line, "Refined TSC clocksource calibration: ") {
            refined = parse_mhz_to_khz(rest).or(refined);
        } else if let Some(rest) = after(line, "tsc: Detected ") {
            if let Some(mhz) = rest.strip_suffix(" MHz processor") {
                detected = parse_mhz_to_khz(mhz).or(detected);
            }
        }
    }
    refined
        .map(|khz| TscRate {
            khz,
            source: TscSource::KernelRefined,
        })
        .or(detected.map(|khz| TscRate {
            khz,
            source: TscSource::KernelDetected,
        }))
}

fn after<'a>(line: &'a str, pat: &str) -> Option<&'a str> {
    line.find(pat).map(|i| &line[i + pat.len()..])
}

/// "2596.124 MHz" or "2596.124" -> 2596124.
fn parse_mhz_to_khz(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches("MHz").trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 3 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u64 = int.parse().ok()?;
    let mut frac_khz: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..3 {
        frac_khz *= 10;
    }
    let khz = int.checked_mul(1000)?.checked_add(frac_khz)?;
    (khz > 0).then_some(khz)
}

/// Reads the kernel ring buffer without blocking (root only).
fn read_kmsg() -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut out = String::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // A record is "prio,seq,ts,flags;message\n".
                let rec = String::from_utf8_lossy(&buf[..n]);
                if let Some((_, msg)) = rec.split_once(';') {
                    out.push_str(msg.lines().next().unwrap_or(""));
                    out.push('\n');
                }
            }
            // EPIPE: the record we were at was overwritten; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    Some(out)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc() -> Option<TscRate> {
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC has no memory effects and exists on every x86_64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    let t0 = Instant::now();
    let c0 = rdtsc();
    std::thread::sleep(Duration::from_millis(20));
    let c1 = rdtsc();
    let ns = t0.elapsed().as_nanos() as u64;
    let khz = c1.checked_sub(c0)?.checked_mul(1_000_000)? / ns.max(1);
    (khz > 0).then_some(TscRate {
        khz,
        source: TscSource::Measured,
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc() -> Option<TscRate> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_tcg_on_pvm() {
        let p = decide(&HostFacts {
            dev_kvm: true,
            hw_virt_flag: false,
            pvm: true,
        });
        assert_eq!(p.accel, Accel::Tcg);
        assert_eq!(
            p.reason,
            "qemu (tcg): /dev/kvm has no hardware virtualization (PVM)"
        );
        let p = decide(&HostFacts {
            dev_kvm: false,
            hw_virt_flag: true,
            pvm: false,
        });
        assert_eq!(p.accel, Accel::Tcg);
        assert_eq!(p.reason, "qemu (tcg): /dev/kvm is missing");
        let p = decide(&HostFacts {
            dev_kvm: true,
            hw_virt_flag: true,
            pvm: false,
        });
        assert_eq!(p.accel, Accel::Kvm);
    }

    #[test]
    fn cpuinfo_flags() {
        let ci = "processor\t: 0\nflags\t\t: fpu vme tsc svm_lock\nbugs\t: \n";
        assert!(!cpuinfo_has_hw_virt(ci));
        assert!(cpuinfo_has_hw_virt("flags\t: fpu vmx sse\n"));
        assert!(cpuinfo_has_hw_virt("flags : svm\n"));
        assert!(!cpuinfo_has_hw_virt(""));
    }

    #[test]
    fn this_host_is_tcg() {
        // The development and CI machines are PVM hosts (see ENVIRONMENT.md).
        let p = probe_accel();
        if !HostFacts::read().hw_virt_flag {
            assert_eq!(p.accel, Accel::Tcg, "{}", p.reason);
        }
    }

    #[test]
    fn kernel_log_parsing() {
        let log = "[    0.000058] tsc: Detected 2596.124 MHz processor\n\
                   [    0.3] clocksource: refined-jiffies: mask: 0xffffffff\n";
        assert_eq!(
            tsc_from_kernel_log(log),
            Some(TscRate {
                khz: 2_596_124,
                source: TscSource::KernelDetected
            })
        );
        let log = "tsc: Detected 2000.000 MHz processor\n\
                   tsc: Refined TSC clocksource calibration: 1999.97 MHz\n";
        assert_eq!(
            tsc_from_kernel_log(log),
            Some(TscRate {
                khz: 1_999_970,
                source: TscSource::KernelRefined
            })
        );
        assert_eq!(tsc_from_kernel_log("tsc: Detected x MHz processor"), None);
        assert_eq!(parse_mhz_to_khz("3000"), Some(3_000_000));
        assert_eq!(parse_mhz_to_khz("1.5"), Some(1500));
        assert_eq!(parse_mhz_to_khz("-1"), None);
        assert_eq!(parse_mhz_to_khz("99999999999999999999"), None);
    }

    #[test]
    fn measured_agrees_with_kernel() {
        let m = measure_tsc().expect("rdtsc");
        let k = host_tsc_rate().expect("rate");
        let diff = m.khz.abs_diff(k.khz) as f64 / k.khz as f64;
        assert!(diff < 0.02, "measured {} vs {:?}", m.khz, k);
    }
}
