//! Whether a host process still runs, and which process a pid names, read
//! from `/proc/<pid>/stat`.
//!
//! A zombie (`Z`) or dead (`X`) entry counts as gone: the process has
//! exited and only its parent's wait is missing, so nothing is left to
//! signal or to wait for.

/// Field 22 (starttime, clock ticks after boot) of `/proc/<pid>/stat`. It
/// tells a process from a later one that got the same pid. `None` if the
/// process is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    parse_stat(&read_stat(pid)?)?.start_time
}

/// Whether `pid` names a process that has not exited.
pub fn is_alive(pid: u32) -> bool {
    read_stat(pid).and_then(|s| parse_stat(&s)).is_some()
}

fn read_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

struct Stat {
    start_time: Option<u64>,
}

/// `None` for an exited process (or text that is not a stat line).
fn parse_stat(stat: &str) -> Option<Stat> {
    // The command name (field 2) may hold spaces and ')': fields from 3
    // (state) on follow its last ')'.
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    if matches!(f.next()?, "Z" | "X") {
        return None;
    }
    // starttime (22) is the 20th field from the state (3).
    Some(Stat {
        start_time: f.nth(18).and_then(|s| s.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line with fields 3 to 22 after `comm`; `state` is field 3,
    /// starttime (22) is 4242.
    fn stat(comm: &str, state: &str) -> String {
        format!(
            "123 ({comm}) {state} 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4242 1000 10"
        )
    }

    #[test]
    fn start_time_after_the_last_paren() {
        let s = parse_stat(&stat("sleep", "S")).unwrap();
        assert_eq!(s.start_time, Some(4242));
        let s = parse_stat(&stat("a) R (b", "S")).unwrap();
        assert_eq!(s.start_time, Some(4242));
    }

    #[test]
    fn exited_states_are_gone() {
        assert!(parse_stat(&stat("x", "Z")).is_none());
        assert!(parse_stat(&stat("x", "X")).is_none());
        assert!(parse_stat(&stat("x", "R")).is_some());
        assert!(parse_stat(&stat("x", "D")).is_some());
        assert!(parse_stat("").is_none());
    }

    #[test]
    fn this_process_lives_and_no_process_has_pid_max() {
        let me = std::process::id();
        assert!(is_alive(me));
        assert!(start_time(me).is_some());
        // Above any pid_max the kernel allows (2^22).
        assert!(!is_alive(u32::MAX));
        assert!(start_time(u32::MAX).is_none());
    }

    #[test]
    fn zombie_is_not_alive() {
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        // Not waited for yet: it turns into a zombie when it exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while is_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!is_alive(pid));
        assert!(start_time(pid).is_none());
        child.wait().unwrap();
    }
}
