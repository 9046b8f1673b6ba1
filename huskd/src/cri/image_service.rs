//! CRI ImageService over the image store.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use tonic::{Request, Response, Status};

use super::errors::image_error;
use super::Husk;
use husk_runtime::image::{Image, RegistryAuth, RemoveOutcome};

#[derive(Debug, Clone)]
pub struct CriImages {
    pub husk: Arc<Husk>,
}

async fn traced<T>(
    method: &'static str,
    image: &str,
    fut: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("cri", method, image = %super::validation::printable(image));
    super::instrument::in_span(span, fut).await
}

/// The image reference of a request, "" when absent (for spans and checks).
fn image_name(spec: Option<&cri::ImageSpec>) -> String {
    spec.map(|s| s.image.clone()).unwrap_or_default()
}

fn image_spec_ref(spec: Option<&cri::ImageSpec>) -> Result<String, Status> {
    let r = image_name(spec);
    if r.is_empty() {
        return Err(Status::invalid_argument("image.image is empty"));
    }
    Ok(r)
}

/// The CRI view of a stored image. `uid`/`username` follow the image's
/// User the way kubelet expects (numeric uid, or a name).
fn to_cri(img: &Image) -> cri::Image {
    let user = img.config.user.clone().unwrap_or_default();
    let user_part = user.split(':').next().unwrap_or("");
    let (uid, username) = match user_part.parse::<i64>() {
        Ok(n) => (Some(cri::Int64Value { value: n }), String::new()),
        Err(_) => (None, user_part.to_string()),
    };
    cri::Image {
        id: img.id.0.clone(),
        repo_tags: img.repo_tags.clone(),
        repo_digests: img.repo_digests.clone(),
        size: img.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: img.id.0.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// Runs a pull on its own thread with a current-thread runtime.
///
/// `ImageStore::pull`'s future is not provably `Send` (rustc's
/// higher-ranked lifetime limitation with the borrowed per-layer closures
/// in `buffer_unordered`), and tonic handlers must be `Send`; a dedicated
/// thread does not need the future to be `Send`. Remove once the store's
/// future is `Send`.
async fn pull_off_thread(
    husk: Arc<Husk>,
    reference: String,
    auth: Option<RegistryAuth>,
) -> Result<Image, Status> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("husk-pull".into())
        .spawn(move || {
            let _e = span.enter();
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Status::internal(format!("starting a pull runtime: {e}")))
                .and_then(|rt| {
                    rt.block_on(husk.images.pull(&reference, auth.as_ref()))
                        .map_err(|e| image_error(&e))
                });
            let _ = tx.send(r);
        })
        .map_err(|e| Status::internal(format!("starting a pull thread: {e}")))?;
    rx.await
        .map_err(|_| Status::internal("the pull thread ended without an answer"))?
}

#[tonic::async_trait]
impl ImageService for CriImages {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .unwrap_or_default();
        traced("ListImages", &filter, async {
            let images = if filter.is_empty() {
                self.husk.images.list()
            } else {
                self.husk
                    .images
                    .status(&filter)
                    .map_err(|e| image_error(&e))?
                    .into_iter()
                    .collect()
            };
            Ok(cri::ListImagesResponse {
                images: images.iter().map(to_cri).collect(),
            })
        })
        .await
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let r = image_name(req.image.as_ref());
        traced("ImageStatus", &r, async {
            let r = image_spec_ref(req.image.as_ref())?;
            let img = self.husk.images.status(&r).map_err(|e| image_error(&e))?;
            let mut info = std::collections::HashMap::new();
            if req.verbose {
                if let Some(i) = &img {
                    let v = serde_json::json!({
                        "manifestDigest": i.manifest_digest,
                        "layers": i.layers,
                        "config": i.config,
                    });
                    info.insert("info".to_string(), v.to_string());
                }
            }
            // An absent image is not an error: kubelet asks before pulling.
            Ok(cri::ImageStatusResponse {
                image: img.as_ref().map(to_cri),
                info,
            })
        })
        .await
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let r = image_name(req.image.as_ref());
        traced("PullImage", &r, async {
            let r = image_spec_ref(req.image.as_ref())?;
            let auth = req.auth.map(|a| RegistryAuth {
                username: a.username,
                password: a.password,
                auth: a.auth,
                server_address: a.server_address,
                identity_token: a.identity_token,
                registry_token: a.registry_token,
            });
            let img = pull_off_thread(self.husk.clone(), r, auth)
                .await
                .map_err(|s| {
                    // Name the request field for an unusable reference.
                    if s.code() == tonic::Code::InvalidArgument {
                        Status::invalid_argument(format!("image.image: {}", s.message()))
                    } else {
                        s
                    }
                })?;
            Ok(cri::PullImageResponse {
                image_ref: img.id.0,
            })
        })
        .await
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let req = req.into_inner();
        let r = image_name(req.image.as_ref());
        traced("RemoveImage", &r, async {
            let r = image_spec_ref(req.image.as_ref())?;
            let containers = self.husk.state.containers();
            let in_use =
                |id: &husk_runtime::image::ImageId| containers.iter().any(|c| c.image_id == id.0);
            match self
                .husk
                .images
                .remove(&r, &in_use)
                .map_err(|e| image_error(&e))?
            {
                RemoveOutcome::Removed(_) | RemoveOutcome::NotFound => {
                    Ok(cri::RemoveImageResponse {})
                }
            }
        })
        .await
    }

    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        traced("ImageFsInfo", "", async {
            let fs = self.husk.images.fs_info().map_err(|e| image_error(&e))?;
            let usage = cri::FilesystemUsage {
                timestamp: super::now_ns(),
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: fs.mountpoint.display().to_string(),
                }),
                used_bytes: Some(cri::UInt64Value {
                    value: fs.used_bytes,
                }),
                inodes_used: Some(cri::UInt64Value {
                    value: fs.used_inodes,
                }),
            };
            Ok(cri::ImageFsInfoResponse {
                image_filesystems: vec![usage],
                container_filesystems: vec![],
            })
        })
        .await
    }
}
