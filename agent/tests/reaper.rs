//! The reaper must never take an exit status that someone holding the fork
//! lock waits for with waitpid(pid), the way libcontainer waits for its
//! intermediate process, while it keeps reaping everything else.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use husk_agent::reaper::Reaper;
use nix::sys::wait::WaitStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitpid_under_the_fork_lock_never_loses_its_status() {
    let reaper = Reaper::new();
    reaper.start().unwrap();

    // Noise: children nobody waits for, exiting all the time, so the reaper
    // gets SIGCHLD while the loop below waits for its own children.
    let stop = Arc::new(AtomicBool::new(false));
    let spawned = Arc::new(AtomicUsize::new(0));
    let noise = {
        let (stop, spawned) = (Arc::clone(&stop), Arc::clone(&spawned));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Dropping a Child does not wait for it: only the reaper can.
                #[allow(clippy::zombie_processes)]
                if Command::new("true").spawn().is_ok() {
                    spawned.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    for i in 0..200 {
        let guard = reaper.fork_lock().await;
        // std's Command::status is fork + waitpid(pid): ECHILD here would
        // mean the reaper stole the status.
        let status =
            tokio::task::spawn_blocking(|| Command::new("sh").args(["-c", "exit 7"]).status())
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("iteration {i}: waitpid lost its child: {e}"));
        assert_eq!(status.code(), Some(7), "iteration {i}");
        drop(guard);
        reaper.kick();
    }

    // Exits of registered pids reach their callback, with the status.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for code in [0, 1, 42] {
        let guard = reaper.fork_lock().await;
        // The reaper waits for it, not std.
        #[allow(clippy::zombie_processes)]
        let child = Command::new("sh")
            .args(["-c", &format!("exit {code}")])
            .spawn()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let tx = tx.clone();
        reaper.register(
            &guard,
            pid,
            Box::new(move |st: WaitStatus| tx.send((pid, st)).unwrap()),
        );
        drop(guard);
        let (p, st) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p, pid);
        assert_eq!(st, WaitStatus::Exited(pid, code));
    }

    stop.store(true, Ordering::Relaxed);
    noise.join().unwrap();
    // The noise children were reaped too: none is left as a zombie.
    tokio::time::sleep(Duration::from_millis(300)).await;
    reaper.kick();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let zombies = zombie_children();
    assert!(
        spawned.load(Ordering::Relaxed) > 50,
        "the noise thread hardly ran"
    );
    assert!(zombies.is_empty(), "unreaped children: {zombies:?}");
}

fn zombie_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next());
        if state == Some("Z") && ppid == Some(me.as_str()) {
            out.push(e.file_name().to_string_lossy().parse().unwrap_or(0));
        }
    }
    out
}
