//! huskd: the husk CRI server.

#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use huskd::config::{HuskdConfig, DEFAULT_CONFIG_PATH, DEFAULT_CONFIG_TOML};
use huskd::cri::image_service::CriImages;
use huskd::cri::runtime_service::CriRuntime;
use huskd::cri::Husk;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;

/// CRI message limit: kubelet allows 16 MiB responses (ListContainers on a
/// busy node, ExecSync output).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "huskd",
    version,
    about = "husk CRI server: every pod in its own microVM"
)]
struct Args {
    /// Configuration file (TOML). Default: /etc/husk/config.toml if it exists,
    /// else built-in defaults.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the default configuration (commented TOML) and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return Ok(());
    }
    let (config, from) =
        HuskdConfig::load(args.config.as_deref()).context("loading the huskd configuration")?;
    init_tracing(&config.log_level);
    match &from {
        Some(p) => tracing::info!(config = %p.display(), "configuration loaded"),
        None => tracing::info!("no {DEFAULT_CONFIG_PATH}; using built-in defaults"),
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(serve(config))
}

fn init_tracing(default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only on a terminal: journald and log files get text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn serve(config: HuskdConfig) -> anyhow::Result<()> {
    let listen = config.listen.clone();
    let (husk, report) = Husk::open(config).await.context("opening huskd state")?;
    tracing::info!(
        pods = report.pods,
        containers = report.containers,
        quarantined = report.quarantined.len(),
        "state loaded"
    );
    for (path, why) in &report.quarantined {
        tracing::warn!(path = %path.display(), %why, "unreadable record moved aside");
    }
    tracing::info!(accel = husk.probe.accel.as_str(), reason = %husk.probe.reason, "hypervisor probe");
    for h in husk.handlers.values() {
        match &h.hypervisor {
            Ok(hv) => {
                tracing::info!(handler = %h.name, hypervisor = hv.description(), vcpus = h.config.vcpus, memory_mib = h.config.memory_mib, "runtime handler")
            }
            Err(e) => tracing::warn!(handler = %h.name, error = %e, "runtime handler unusable"),
        }
    }

    if let Some(dir) = listen.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&listen) {
        Ok(()) => tracing::info!(socket = %listen.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", listen.display()))
        }
    }
    let listener =
        UnixListener::bind(&listen).with_context(|| format!("binding {}", listen.display()))?;
    std::fs::set_permissions(&listen, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", listen.display()))?;

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down, leaving pod VMs running"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down, leaving pod VMs running"),
        }
    };
    let runtime = RuntimeServiceServer::new(CriRuntime { husk: husk.clone() })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let images = ImageServiceServer::new(CriImages { husk: husk.clone() })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    tracing::info!(socket = %listen.display(), version = env!("CARGO_PKG_VERSION"), "huskd serving CRI v1");
    let r = tonic::transport::Server::builder()
        .layer(huskd::cri::errors::DeadlineLayer)
        .add_service(runtime)
        .add_service(images)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&listen);
    // Pod VMs outlive huskd (like containerd's shims): they keep running and
    // the next huskd adopts them. Their processes are in their own sessions,
    // so neither a terminal's SIGINT nor huskd's exit reaches them.
    husk.detach_all().await;
    match husk_runtime::network::release_netns_dir(&husk.cni) {
        Ok(true) => tracing::debug!("no pod network left: netns directory released"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "releasing the netns directory"),
    }
    tracing::info!("huskd stopped; pod VMs left running for the next huskd");
    r.context("serving gRPC")
}
