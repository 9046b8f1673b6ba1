//! A private CNI network for one huskd under test: a conflist with Debian's
//! real plugins (bridge + host-local + portmap) on a bridge and subnet of
//! its own, with host-local's store in a temp dir, so tests neither see nor
//! touch the host's CNI state.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{ensure, Context, Result};

/// Debian's containernetworking-plugins.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";
/// Network name in the conflist (host-local keys its store by it).
pub const NETWORK_NAME: &str = "husk-test";

static NEXT: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub struct TestCniNetwork {
    pub conf_dir: PathBuf,
    /// host-local's `dataDir`.
    pub ipam_dir: PathBuf,
    pub bridge: String,
    /// The bridge's address, the pods' gateway.
    pub gateway: Ipv4Addr,
    /// x.y.z.0/24.
    pub subnet: String,
}

impl TestCniNetwork {
    /// Writes the conflist under `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // A /24 per instance from 10.209.0.0/16, varied by pid so that test
        // binaries run one after another do not reuse one while the kernel
        // still holds a route of the last.
        let third = ((pid % 200) + n * 7) % 250 + 1;
        let gateway = Ipv4Addr::new(10, 209, third as u8, 1);
        let subnet = format!("10.209.{third}.0/24");
        let bridge = format!("hkt{}{}", pid % 100_000, n % 100);
        let conf_dir = dir.join("net.d");
        let ipam_dir = dir.join("ipam");
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::create_dir_all(&ipam_dir)?;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK_NAME,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet, "gateway": gateway.to_string()}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": ipam_dir,
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::write(
            conf_dir.join("10-husk-test.conflist"),
            serde_json::to_vec_pretty(&conf)?,
        )?;
        Ok(Self {
            conf_dir,
            ipam_dir,
            bridge,
            gateway,
            subnet,
        })
    }

    /// The `[cni]` section of a huskd config using this network.
    pub fn toml(&self) -> String {
        format!(
            "[cni]\nconf_dir = {:?}\nbin_dirs = [{:?}]\n",
            self.conf_dir, DEBIAN_CNI_BIN
        )
    }

    /// Addresses host-local still has allocated.
    pub fn allocations(&self) -> Vec<String> {
        let dir = self.ipam_dir.join(NETWORK_NAME);
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            // host-local's own bookkeeping files.
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// Fails naming what is left of pod networking: IP allocations, veths
    /// on the bridge.
    pub fn assert_released(&self) -> Result<()> {
        let allocs = self.allocations();
        ensure!(allocs.is_empty(), "host-local allocations left: {allocs:?}");
        let out = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.bridge])
            .output()
            .context("running ip link")?;
        let links = String::from_utf8_lossy(&out.stdout);
        ensure!(
            links.trim().is_empty(),
            "links left on bridge {}: {links}",
            self.bridge
        );
        Ok(())
    }
}

impl Drop for TestCniNetwork {
    /// The bridge plugin creates the bridge and never deletes it.
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
