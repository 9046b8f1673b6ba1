//! A CRI client over huskd's unix socket, for tests and tools.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects a channel to a unix socket (the URI is a placeholder; tonic
/// needs one).
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = socket.to_path_buf();
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// Both CRI clients on one channel.
pub async fn clients(
    socket: &Path,
) -> Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>), tonic::transport::Error> {
    let ch = connect(socket).await?;
    Ok((
        RuntimeServiceClient::new(ch.clone()),
        ImageServiceClient::new(ch),
    ))
}
