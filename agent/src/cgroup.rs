//! Reading a container's cgroup: stats and the OOM-kill counter, on cgroup
//! v2 (the guest) and v1 (hosts like the one the integration tests run on).
//! Writing limits goes through libcgroups (see `container.rs`).

use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Unified hierarchy at /sys/fs/cgroup (the guest).
    V2,
    /// One hierarchy per controller at /sys/fs/cgroup/<controller> (legacy or
    /// hybrid hosts; libcgroups also uses v1 there).
    V1,
}

#[derive(Debug, Clone)]
pub struct Cgroups {
    pub mode: Mode,
    root: PathBuf,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_ns: u64,
    pub memory_usage_bytes: u64,
    pub memory_working_set_bytes: u64,
    pub memory_rss_bytes: u64,
    pub pids: u64,
}

impl Cgroups {
    pub fn detect() -> Self {
        let mode = match nix::sys::statfs::statfs(CGROUP_ROOT) {
            Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Mode::V2,
            _ => Mode::V1,
        };
        Cgroups {
            mode,
            root: PathBuf::from(CGROUP_ROOT),
        }
    }

    /// Directory of `cg` (absolute from the hierarchy root) for `controller`
    /// (ignored on v2).
    pub fn dir(&self, controller: &str, cg: &Path) -> PathBuf {
        let rel = cg.strip_prefix("/").unwrap_or(cg);
        match self.mode {
            Mode::V2 => self.root.join(rel),
            Mode::V1 => self.root.join(controller).join(rel),
        }
    }

    fn read(&self, controller: &str, cg: &Path, file: &str) -> std::io::Result<String> {
        std::fs::read_to_string(self.dir(controller, cg).join(file))
    }

    pub fn stats(&self, cg: &Path) -> std::io::Result<Stats> {
        match self.mode {
            Mode::V2 => {
                let cpu = self.read("", cg, "cpu.stat")?;
                let mem_current = self.read("", cg, "memory.current")?;
                let mem_stat = self.read("", cg, "memory.stat")?;
                let pids = self.read("", cg, "pids.current")?;
                Ok(stats_v2(&cpu, &mem_current, &mem_stat, &pids))
            }
            Mode::V1 => {
                let cpu = self.read("cpuacct", cg, "cpuacct.usage")?;
                let usage = self.read("memory", cg, "memory.usage_in_bytes")?;
                let mem_stat = self.read("memory", cg, "memory.stat")?;
                let pids = self.read("pids", cg, "pids.current")?;
                Ok(stats_v1(&cpu, &usage, &mem_stat, &pids))
            }
        }
    }

    /// How many times the kernel's OOM killer has killed a task of this
    /// cgroup; None when the cgroup (or the counter) is gone.
    pub fn oom_kills(&self, cg: &Path) -> Option<u64> {
        let (controller, file) = match self.mode {
            Mode::V2 => ("", "memory.events"),
            Mode::V1 => ("memory", "memory.oom_control"),
        };
        keyed(&self.read(controller, cg, file).ok()?, "oom_kill")
    }
}

/// Value of `key` in a flat-keyed cgroup file ("key value" per line).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}

fn single(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

pub fn stats_v2(cpu_stat: &str, memory_current: &str, memory_stat: &str, pids: &str) -> Stats {
    let usage = single(memory_current);
    Stats {
        cpu_usage_ns: keyed(cpu_stat, "usage_usec")
            .unwrap_or(0)
            .saturating_mul(1000),
        memory_usage_bytes: usage,
        memory_working_set_bytes: usage
            .saturating_sub(keyed(memory_stat, "inactive_file").unwrap_or(0)),
        memory_rss_bytes: keyed(memory_stat, "anon").unwrap_or(0),
        pids: single(pids),
    }
}

pub fn stats_v1(cpuacct_usage: &str, usage_in_bytes: &str, memory_stat: &str, pids: &str) -> Stats {
    let usage = single(usage_in_bytes);
    // total_* include descendants; a container's cgroup has none, but
    // prefer them when present the way cAdvisor does.
    let inactive =
        keyed(memory_stat, "total_inactive_file").or_else(|| keyed(memory_stat, "inactive_file"));
    let rss = keyed(memory_stat, "total_rss").or_else(|| keyed(memory_stat, "rss"));
    Stats {
        cpu_usage_ns: single(cpuacct_usage),
        memory_usage_bytes: usage,
        memory_working_set_bytes: usage.saturating_sub(inactive.unwrap_or(0)),
        memory_rss_bytes: rss.unwrap_or(0),
        pids: single(pids),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2() {
        let cpu = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n";
        let stat = "anon 4096\nfile 8192\nkernel 100\nactive_file 4096\ninactive_file 4096\n";
        let s = stats_v2(cpu, "20480\n", stat, "3\n");
        assert_eq!(
            s,
            Stats {
                cpu_usage_ns: 1_500_000,
                memory_usage_bytes: 20480,
                memory_working_set_bytes: 16384,
                memory_rss_bytes: 4096,
                pids: 3
            }
        );
    }

    #[test]
    fn v2_inactive_larger_than_usage_saturates() {
        let s = stats_v2("", "100", "inactive_file 200\n", "");
        assert_eq!(s.memory_working_set_bytes, 0);
        assert_eq!(s.cpu_usage_ns, 0);
        assert_eq!(s.pids, 0);
    }

    #[test]
    fn v1() {
        let stat = "cache 100\nrss 50\ninactive_file 10\ntotal_cache 100\ntotal_rss 60\ntotal_inactive_file 20\n";
        let s = stats_v1("123456789\n", "1000\n", stat, "2\n");
        assert_eq!(s.cpu_usage_ns, 123_456_789);
        assert_eq!(s.memory_usage_bytes, 1000);
        assert_eq!(s.memory_working_set_bytes, 980);
        assert_eq!(s.memory_rss_bytes, 60);
        assert_eq!(s.pids, 2);
    }

    #[test]
    fn keyed_lines() {
        let events = "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(1));
        assert_eq!(keyed(events, "nope"), None);
        assert_eq!(keyed("oom_kill x\n", "oom_kill"), None);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n";
        assert_eq!(keyed(v1, "oom_kill"), Some(4));
    }

    #[test]
    fn dirs() {
        let v2 = Cgroups {
            mode: Mode::V2,
            root: PathBuf::from("/sys/fs/cgroup"),
        };
        assert_eq!(
            v2.dir("memory", Path::new("/husk/c1")),
            PathBuf::from("/sys/fs/cgroup/husk/c1")
        );
        let v1 = Cgroups {
            mode: Mode::V1,
            root: PathBuf::from("/sys/fs/cgroup"),
        };
        assert_eq!(
            v1.dir("memory", Path::new("/husk/c1")),
            PathBuf::from("/sys/fs/cgroup/memory/husk/c1")
        );
    }
}
