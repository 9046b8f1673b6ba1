//! husk-agent: PID 1 of every husk pod VM. It sets the VM up, then manages
//! the pod's containers (youki's libcontainer) on the host's behalf over the
//! protocol in `husk-proto`.

pub mod cgroup;
pub mod container;
pub mod error;
pub mod logging;
pub mod network;
pub mod pid1;
pub mod reaper;
pub mod server;
pub mod service;
pub mod spec;
pub mod stdio;
