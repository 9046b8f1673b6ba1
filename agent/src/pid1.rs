//! What the agent does as PID 1 of the VM before it serves: the basic
//! filesystems, cgroup v2, kernel modules, loopback; and powering off.

use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use tracing::{error, info, warn};

const MODULES_LIST: &str = "/etc/husk/modules.load";

pub fn is_pid1() -> bool {
    nix::unistd::getpid().as_raw() == 1
}

fn mounted_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|s| {
            s.lines()
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    if mounted_points().iter().any(|m| m == target) {
        return Ok(());
    }
    std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .with_context(|| format!("mounting {fstype} at {target}"))
}

/// pivot_root(2) refuses to run when the caller's root is the initial
/// rootfs (it has no parent mount), and libcontainer pivots into every
/// container's root. So when the agent runs straight from the initramfs it
/// bind-mounts / onto itself and moves into that mount (the same steps as
/// switch_root, without copying anything). Returns whether containers may
/// pivot_root; if this fails, they fall back to no-pivot (MS_MOVE + chroot).
pub fn leave_initial_rootfs() -> bool {
    let on_ram = match nix::sys::statfs::statfs("/") {
        Ok(s) => {
            let t = s.filesystem_type();
            // ramfs's magic (linux/magic.h); neither nix nor libc names it.
            const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6);
            t == RAMFS_MAGIC || t == nix::sys::statfs::TMPFS_MAGIC
        }
        Err(e) => {
            warn!("statfs /: {e}");
            false
        }
    };
    if !on_ram {
        return true;
    }
    match switch_to_bind_root() {
        Ok(()) => {
            info!("moved off the initial rootfs into a bind mount of it");
            true
        }
        Err(e) => {
            error!("leaving the initial rootfs: {e:#}; containers will use no-pivot");
            false
        }
    }
}

fn switch_to_bind_root() -> Result<()> {
    let target = "/.husk-root";
    std::fs::create_dir_all(target).context("creating /.husk-root")?;
    mount(
        Some("/"),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("bind-mounting / onto /.husk-root")?;
    nix::unistd::chdir(target).context("chdir /.husk-root")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("moving the bind mount to /")?;
    nix::unistd::chroot(".").context("chroot")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

/// Mounts what every Linux userland expects, plus cgroup2 with controllers
/// delegated to child cgroups (container cgroups live below /husk).
pub fn setup_filesystems() -> Result<()> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !Path::new("/proc/self").exists() {
        std::fs::create_dir_all("/proc").context("creating /proc")?;
        mount(Some("proc"), "/proc", Some("proc"), common, None::<&str>)
            .context("mounting /proc")?;
    }
    mount_fs("sysfs", "/sys", "sysfs", common, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    // With a private devpts instance, /dev/ptmx must lead to it.
    let _ = std::fs::remove_file("/dev/ptmx");
    if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
        warn!("/dev/ptmx -> pts/ptmx: {e}");
    }
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        common,
        Some("nsdelegate"),
    )?;
    enable_controllers(Path::new("/sys/fs/cgroup"))?;
    Ok(())
}

/// Enables every available controller husk uses in `dir`'s children.
pub fn enable_controllers(dir: &Path) -> Result<()> {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers"))
        .context("reading cgroup.controllers")?;
    let available: Vec<&str> = available.split_whitespace().collect();
    for ctl in ["cpu", "cpuset", "io", "memory", "pids", "hugetlb"] {
        if !available.contains(&ctl) {
            continue;
        }
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{ctl}")) {
            warn!("enabling cgroup controller {ctl}: {e}");
        }
    }
    info!(
        "cgroup controllers enabled: {}",
        std::fs::read_to_string(dir.join("cgroup.subtree_control"))
            .unwrap_or_default()
            .trim()
    );
    Ok(())
}

/// Points stdin/stdout/stderr at /dev/console (the serial console the host
/// captures).
pub fn console_stdio() {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        Ok(f) => {
            for fd in 0..=2 {
                // SAFETY: dup2 onto the standard fds; `f` stays open for the
                // duration of the call and is closed afterwards.
                unsafe { libc::dup2(f.as_raw_fd(), fd) };
            }
        }
        Err(e) => eprintln!("husk-agent: opening /dev/console: {e}"),
    }
}

/// Loads the modules listed in /etc/husk/modules.load, one absolute path of
/// an uncompressed .ko per line, in dependency order.
pub fn load_modules() {
    let list = match std::fs::read_to_string(MODULES_LIST) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!("{MODULES_LIST} absent: no modules to load");
            return;
        }
        Err(e) => {
            error!("reading {MODULES_LIST}: {e}");
            return;
        }
    };
    for path in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match load_module(Path::new(path)) {
            Ok(()) => info!("loaded module {path}"),
            Err(e) => error!("loading module {path}: {e:#}"),
        }
    }
}

fn load_module(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).context("open")?;
    let params = c"";
    // SAFETY: finit_module reads the module from the fd and the NUL-terminated
    // parameter string, both alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(e).context("finit_module");
    }
    Ok(())
}

/// Brings the loopback interface up.
pub fn loopback_up() -> Result<()> {
    // SAFETY: a plain socket(2) call; the fd is owned right away.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: sock is a fresh fd nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass,
    // which lives across both calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo");
        }
    }
    Ok(())
}

/// Set on the kernel command line by huskd's builtin backend (husk-vmm).
const BUILTIN_VMM_PARAM: &str = "husk.vmm=builtin";

/// How PID 1 ends the VM under the VMM that `cmdline` (/proc/cmdline) names.
///
/// husk-vmm has no ACPI, so a power-off has no power-off method: the kernel
/// turns it into a halt and the VM idles forever. husk-vmm ends the VM on
/// a reset instead (the guest runs with `reboot=k`: the i8042 reset line), so
/// there the agent reboots. QEMU (microvm with ACPI) powers off normally.
pub fn end_vm_mode(cmdline: &str) -> nix::sys::reboot::RebootMode {
    use nix::sys::reboot::RebootMode;
    if cmdline.split_whitespace().any(|p| p == BUILTIN_VMM_PARAM) {
        RebootMode::RB_AUTOBOOT
    } else {
        RebootMode::RB_POWER_OFF
    }
}

/// Syncs and ends the VM (power-off, or a reset under husk-vmm, see
/// [`end_vm_mode`]). PID 1 must never just exit (the kernel would panic);
/// exiting is the last resort if the reboot call itself fails.
pub fn power_off() -> ! {
    let mode = end_vm_mode(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    info!("powering off ({mode:?})");
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(mode);
    error!("reboot({mode:?}) failed: {e:?}");
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::reboot::RebootMode;

    #[test]
    fn end_vm_mode_follows_the_kernel_command_line() {
        assert_eq!(
            end_vm_mode("console=ttyS0 reboot=k panic=-1 husk.vmm=builtin quiet\n"),
            RebootMode::RB_AUTOBOOT
        );
        assert_eq!(
            end_vm_mode("console=ttyS0 panic=-1 quiet\n"),
            RebootMode::RB_POWER_OFF
        );
        assert_eq!(end_vm_mode("husk.vmm=builtinx"), RebootMode::RB_POWER_OFF);
        assert_eq!(end_vm_mode(""), RebootMode::RB_POWER_OFF);
    }
}
