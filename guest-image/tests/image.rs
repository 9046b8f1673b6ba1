//! End-to-end tests against the real Debian kernel package (apt) and QEMU.
//! They need root, apt with the kernel package in its lists, gcc with a
//! static libc (for the stand-in /init), and qemu-system-x86_64 with qboot.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use husk_guest_image::{build, installed, BuildOptions, Compression, Error};
use husk_testkit::bench::median;

/// Compiles the stand-in /init (tests/fixtures/standin-init.c) statically.
/// `pad` is appended after the ELF (the loader ignores it) to give the
/// initramfs the size of a real agent in the boot-time benchmark.
fn standin(dir: &Path, pad: Option<&Path>) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/standin-init.c");
    let out = dir.join("standin-init");
    let status = Command::new("gcc")
        .args(["-static", "-Os", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc (Debian package gcc, with libc6-dev for a static libc) must be installed");
    assert!(status.success(), "compiling {} failed", src.display());
    if let Some(pad) = pad {
        let mut data = std::fs::read(&out).unwrap();
        data.extend(std::fs::read(pad).unwrap_or_else(|e| panic!("{}: {e}", pad.display())));
        std::fs::write(&out, data).unwrap();
    }
    out
}

fn opts(agent: &Path, cache: &Path, out: &Path, compression: Compression) -> BuildOptions {
    BuildOptions {
        cache_dir: cache.to_path_buf(),
        out_dir: out.to_path_buf(),
        compression,
        ..BuildOptions::new(agent)
    }
}

/// Host TSC rate for `tsc_early_khz=`: under TCG the guest reads the host TSC,
/// and without it the guest can hang calibrating against the PIT.
fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .expect("cpu MHz in /proc/cpuinfo");
    (mhz * 1000.0).round() as u64
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Boot {
    /// Launch to the stand-in's "modules ok" line.
    to_ok: Duration,
    /// Launch to QEMU exiting after the guest powered off.
    total: Duration,
    /// Guest uptime (s) when the stand-in ran, from /proc/uptime.
    guest_uptime: f64,
    /// CPU time (user + system) QEMU used. Under TCG this is the guest's work
    /// and, unlike wall time, barely moves when other processes load the
    /// host. Exact only when no other child of this test process exits
    /// meanwhile (the benchmark runs alone).
    qemu_cpu: Duration,
    /// Guest time (s) from "Trying to unpack rootfs" to "Freeing initrd memory".
    unpack: f64,
    /// Guest time (s) of "Run /init".
    init_at: f64,
    /// QEMU's resident set (KiB) when the guest reported "modules ok".
    qemu_rss_kib: u64,
    output: Vec<String>,
}

/// Guest timestamp of the first kernel log line (as relayed by the stand-in)
/// containing `needle`.
fn klog_time(output: &[String], needle: &str) -> f64 {
    output
        .iter()
        .filter(|l| l.starts_with("standin: klog ") && l.contains(needle))
        .find_map(|l| l.split_once('[')?.1.split_once(']')?.0.trim().parse().ok())
        .unwrap_or_else(|| panic!("no kernel log line `{needle}`:\n{}", output.join("\n")))
}

fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru), 0);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Boots the image; `boost` runs QEMU at nice -19 so that, on a host busy
/// with other work, the benchmark measures the guest rather than the queue.
fn boot(kernel: &Path, initrd: &Path, boost: bool) -> Boot {
    let cpu_before = children_cpu();
    let started = Instant::now();
    let mut cmd = if boost {
        let mut c = Command::new("nice");
        c.args(["-n", "-19", "qemu-system-x86_64"]);
        c
    } else {
        Command::new("qemu-system-x86_64")
    };
    let child = cmd
        .args(["-accel", "tcg", "-M", "microvm,x-option-roms=off"])
        .args([
            "-bios",
            "/usr/share/qemu/qboot.rom",
            "-cpu",
            "max",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet tsc_early_khz={}",
            host_tsc_khz()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (scripts/install-deps)");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send((Instant::now(), line));
        }
    });
    let deadline = started + Duration::from_secs(90);
    let mut output = Vec::new();
    let mut to_ok = None;
    let mut qemu_rss_kib = 0;
    let pid = child.0.id();
    loop {
        let now = Instant::now();
        if now >= deadline {
            panic!(
                "guest did not finish within 90 s; output:\n{}",
                output.join("\n")
            );
        }
        match rx.recv_timeout(deadline - now) {
            Ok((at, line)) => {
                let line = line.trim_end_matches('\r').to_string();
                if line.starts_with("modules ok") {
                    to_ok = Some(at - started);
                    qemu_rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                        .ok()
                        .and_then(|s| {
                            s.lines()
                                .find_map(|l| l.strip_prefix("VmRSS:"))
                                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                        })
                        .unwrap_or(0);
                }
                output.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
        }
    }
    let status = child.0.wait().unwrap();
    let total = started.elapsed();
    let qemu_cpu = children_cpu().saturating_sub(cpu_before);
    reader.join().unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(
        status.success(),
        "qemu exited with {status}: {stderr}\n{}",
        output.join("\n")
    );
    let to_ok = to_ok.unwrap_or_else(|| {
        panic!(
            "no \"modules ok\" from the guest; output:\n{}",
            output.join("\n")
        )
    });
    let guest_uptime = output
        .iter()
        .find_map(|l| {
            l.strip_prefix("standin: uptime ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("guest printed its uptime");
    Boot {
        to_ok,
        total,
        guest_uptime,
        qemu_cpu,
        unpack: klog_time(&output, "Freeing initrd memory")
            - klog_time(&output, "Trying to unpack rootfs"),
        init_at: klog_time(&output, "Run /init"),
        qemu_rss_kib,
        output,
    }
}

/// Decompresses an initrd and lists (name, mode, data) of every entry.
fn entries(initrd: &[u8], how: Compression) -> Vec<(String, u32, Vec<u8>)> {
    let raw = match how {
        Compression::None => initrd.to_vec(),
        Compression::Gzip => {
            let mut v = Vec::new();
            flate2::read::GzDecoder::new(initrd)
                .read_to_end(&mut v)
                .unwrap();
            v
        }
        Compression::Zstd => zstd::stream::decode_all(initrd).unwrap(),
    };
    let mut rest = &raw[..];
    let mut out = Vec::new();
    loop {
        let mut r = cpio::newc::Reader::new(rest).unwrap();
        if r.entry().is_trailer() {
            break;
        }
        let (name, mode) = (r.entry().name().to_string(), r.entry().mode());
        assert_eq!(
            (r.entry().mtime(), r.entry().uid(), r.entry().gid()),
            (0, 0, 0),
            "{name}"
        );
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        out.push((name, mode, data));
        rest = r.finish().unwrap();
    }
    out
}

#[test]
fn image_has_exact_contents_is_deterministic_and_cached() {
    let work = tempfile::tempdir().unwrap();
    let agent = standin(work.path(), None);
    let (cache_a, cache_b) = (work.path().join("cache-a"), work.path().join("cache-b"));
    let (out_a, out_b) = (work.path().join("out-a"), work.path().join("out-b"));

    let first = build(&opts(&agent, &cache_a, &out_a, Compression::Gzip)).unwrap();
    assert!(!first.cached);
    let m = &first.manifest;
    assert!(
        m.kernel.release.starts_with("6.12."),
        "{}",
        m.kernel.release
    );
    assert!(
        m.kernel.release.ends_with("-cloud-amd64"),
        "{}",
        m.kernel.release
    );

    // A leftover from an interrupted build must not matter.
    std::fs::create_dir(cache_a.join("images").join(format!(".build-{}-x", m.key))).unwrap();
    let again = build(&opts(&agent, &cache_a, &out_a, Compression::Gzip)).unwrap();
    assert!(again.cached);
    assert_eq!(again.manifest, *m);

    // A separate cache (only the .deb shared, to spare the download) gives
    // byte-identical output.
    std::fs::create_dir_all(cache_b.join("debs")).unwrap();
    for deb in std::fs::read_dir(cache_a.join("debs")).unwrap() {
        let deb = deb.unwrap();
        std::fs::copy(deb.path(), cache_b.join("debs").join(deb.file_name())).unwrap();
    }
    let other = build(&opts(&agent, &cache_b, &out_b, Compression::Gzip)).unwrap();
    assert!(!other.cached);
    assert_eq!(other.manifest, *m);
    assert_eq!(
        std::fs::read(&first.initrd).unwrap(),
        std::fs::read(&other.initrd).unwrap()
    );
    assert_eq!(
        std::fs::read(out_a.join("manifest.json")).unwrap(),
        std::fs::read(out_b.join("manifest.json")).unwrap()
    );

    // Exactly: /init, the modules, modules.load, mount points, /dev/console.
    let initrd = std::fs::read(&first.initrd).unwrap();
    let list = entries(&initrd, Compression::Gzip);
    let agent_bytes = std::fs::read(&agent).unwrap();
    let rel = &m.kernel.release;
    let mut expected_files = vec!["init".to_string(), "etc/husk/modules.load".to_string()];
    expected_files.extend(
        m.modules
            .iter()
            .map(|x| x.path.trim_start_matches('/').to_string()),
    );
    expected_files.sort();
    let mut files: Vec<String> = list
        .iter()
        .filter(|e| e.1 & 0o170000 == 0o100000)
        .map(|e| e.0.clone())
        .collect();
    files.sort();
    assert_eq!(files, expected_files);
    let init = list.iter().find(|e| e.0 == "init").unwrap();
    assert_eq!(init.2, agent_bytes);
    assert_eq!(init.1, 0o100755);
    let load = list
        .iter()
        .find(|e| e.0 == "etc/husk/modules.load")
        .unwrap();
    let want: String = m.modules.iter().map(|x| format!("{}\n", x.path)).collect();
    assert_eq!(String::from_utf8(load.2.clone()).unwrap(), want);
    for x in &m.modules {
        assert!(
            x.path.starts_with(&format!("/lib/modules/{rel}/kernel/")),
            "{}",
            x.path
        );
        assert!(x.path.ends_with(".ko"), "decompressed: {}", x.path);
        let data = &list.iter().find(|e| e.0 == x.path[1..]).unwrap().2;
        assert!(
            data.starts_with(b"\x7fELF"),
            "{} is an uncompressed ELF",
            x.path
        );
    }
    let names: Vec<&str> = m.modules.iter().map(|x| x.name.as_str()).collect();
    for needed in [
        "virtio_mmio",
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
        "overlay",
        "virtio_net",
        "net_failover",
        "failover",
    ] {
        assert!(names.contains(&needed), "{needed} in {names:?}");
    }
    for dir in ["proc", "sys", "dev", "run", "tmp", "etc"] {
        let e = list.iter().find(|e| e.0 == dir).unwrap();
        assert_eq!(e.1 & 0o170000, 0o040000, "{dir} is a directory");
    }
    let others: Vec<&str> = list
        .iter()
        .filter(|e| e.1 & 0o170000 != 0o100000 && e.1 & 0o170000 != 0o040000)
        .map(|e| e.0.as_str())
        .collect();
    assert_eq!(others, ["dev/console"]);

    let read_back = installed(&out_a).unwrap();
    assert_eq!(read_back.manifest, *m);
    eprintln!(
        "gzip image: initrd {} bytes ({} uncompressed), vmlinuz {} bytes, {} modules",
        m.initrd.size,
        m.initrd_uncompressed_size,
        m.vmlinuz.size,
        m.modules.len()
    );
}

#[test]
fn every_compression_boots_under_qemu_and_loads_all_modules() {
    let work = tempfile::tempdir().unwrap();
    let agent = standin(work.path(), None);
    let cache = work.path().join("cache");
    for how in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let out = work.path().join(format!("out-{how}"));
        let img = build(&opts(&agent, &cache, &out, how)).unwrap();
        let b = boot(&img.kernel, &img.initrd, false);
        let loaded: Vec<&str> = b
            .output
            .iter()
            .filter_map(|l| l.strip_prefix("standin: module ")?.split(' ').next())
            .collect();
        for m in &img.manifest.modules {
            assert!(
                loaded.contains(&m.name.as_str()),
                "{} not in /proc/modules: {}",
                m.name,
                b.output.join("\n")
            );
        }
        let ok = format!("modules ok {}", img.manifest.modules.len());
        assert!(b.output.iter().any(|l| l == &ok), "{}", b.output.join("\n"));
        eprintln!(
            "{how}: initrd {} bytes, launch->modules ok {:.2} s, qemu exit {:.2} s, guest uptime {:.2} s",
            img.manifest.initrd.size,
            b.to_ok.as_secs_f64(),
            b.total.as_secs_f64(),
            b.guest_uptime
        );
    }
}

#[test]
fn unknown_kernel_package_names_it_and_the_fix() {
    let work = tempfile::tempdir().unwrap();
    let mut o = opts(
        Path::new("/bin/busybox"),
        &work.path().join("c"),
        &work.path().join("o"),
        Compression::Gzip,
    );
    o.kernel_package = "linux-image-husk-does-not-exist".to_string();
    let err = build(&o).unwrap_err();
    assert!(matches!(err, Error::PackageNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("linux-image-husk-does-not-exist"), "{msg}");
    assert!(
        msg.contains("scripts/install-deps") && msg.contains("apt-get update"),
        "{msg}"
    );
    assert!(
        !work.path().join("o").exists(),
        "nothing installed on failure"
    );
}

/// Boot-time benchmark used to choose the default compression:
/// `HUSK_BENCH_RUNS` boots per compression (default 5); `HUSK_BENCH_PAD` is a
/// file appended to the stand-in to give /init a real agent's size.
#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn boot_time_by_compression() {
    let runs: usize = std::env::var("HUSK_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let pad = std::env::var_os("HUSK_BENCH_PAD").map(PathBuf::from);
    let work = tempfile::tempdir().unwrap();
    let agent = standin(work.path(), pad.as_deref());
    let cache = work.path().join("cache");
    let mut images = Vec::new();
    for how in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let out = work.path().join(format!("out-{how}"));
        images.push((how, build(&opts(&agent, &cache, &out, how)).unwrap()));
    }
    #[allow(clippy::type_complexity)]
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>)> = images
        .iter()
        .map(|_| (vec![], vec![], vec![], vec![], vec![], vec![]))
        .collect();
    // Interleave compressions so host load drifts affect all of them alike.
    for _ in 0..runs {
        for (i, (_, img)) in images.iter().enumerate() {
            let b = boot(&img.kernel, &img.initrd, true);
            results[i].3.push(b.unpack);
            results[i].4.push(b.init_at);
            results[i].5.push(b.qemu_rss_kib as f64 / 1024.0);
            results[i].0.push(b.to_ok.as_secs_f64());
            results[i].1.push(b.guest_uptime);
            results[i].2.push(b.qemu_cpu.as_secs_f64());
        }
    }
    eprintln!(
        "agent stand-in {} bytes; {runs} boots each",
        std::fs::metadata(&agent).unwrap().len()
    );
    let min = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    for ((how, img), (wall, up, cpu, unpack, init_at, rss)) in images.iter().zip(results) {
        eprintln!(
            "{how:>5}: initrd {:>8} bytes | unpack median {:.3} s min {:.3} s | \
             Run /init median {:.2} s min {:.2} s | \
             launch->modules ok median {:.2} s min {:.2} s | \
             qemu cpu median {:.2} s min {:.2} s | guest uptime median {:.2} s min {:.2} s | \
             qemu rss median {:.1} MiB",
            img.manifest.initrd.size,
            median(&unpack),
            min(&unpack),
            median(&init_at),
            min(&init_at),
            median(&wall),
            min(&wall),
            median(&cpu),
            min(&cpu),
            median(&up),
            min(&up),
            median(&rss),
        );
    }
}
