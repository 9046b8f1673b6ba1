//! huskd, husk's CRI v1 front-end: the gRPC RuntimeService and
//! ImageService, the persisted pod and container records, the CRI log
//! writer and the configuration. Everything below the CRI (sandboxes,
//! hypervisor backends, the agent client, pod networks, images) is the
//! `husk-runtime` library; data flows one way, from here into it.

#![forbid(unsafe_code)]

pub mod config;
pub mod cri;
/// Container log files in the kubelet format.
pub mod logs;
/// Persisted pod and container records of huskd.
pub mod state;
