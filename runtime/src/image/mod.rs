//! husk's image store: pulls images from OCI / Docker v2 registries, keeps them content-addressed
//! on the host, and prepares overlayfs root filesystems for containers. The CRI `ImageService`
//! of `huskd` is a thin wrapper over [`ImageStore`].
//!
//! On-disk layout (all writes are temp-file + rename, so a crash leaves either the old or the
//! new state; `tmp/` is emptied on open, as are records' temporaries in `meta/`):
//!
//! ```text
//! <root>/images/blobs/sha256/<hex>     compressed layer blobs and image configs, verified
//! <root>/images/layers/<hex>/fs/       one unpacked layer, named by its diff_id (overlay lower dir)
//! <root>/images/layers/<hex>/usage.json  bytes / inodes of that layer
//! <root>/images/meta/<hex>.json        one image record, named by the image id (config digest)
//! <root>/images/tmp/                   downloads and unpacks in progress
//! <root>/rootfs/<container-id>/        upper/, work/ and rootfs.json of a prepared container rootfs
//! ```
//!
//! Layers are keyed by diff_id rather than chain id: an overlay lower dir holds only its own
//! layer's changes, so the same diff stacked on different parents is the same directory.
//!
//! Removal: [`ImageStore::remove`] refuses an image the caller reports in use (`in_use`), like
//! containerd refuses to delete an image whose snapshots are active. Independently, a layer is
//! deleted only when no image record, no prepared container rootfs and no pull in progress
//! references it, so a mounted rootfs never loses its lower dirs; a layer kept alive only by
//! a rootfs is deleted when that rootfs is released.

mod error;
mod flight;
mod manifest;
mod pull;
mod reference;
mod registry;
mod rootfs;
mod store;
mod unpack;

pub use error::{Error, ErrorKind, Result};
pub use pull::PullStats;
pub use reference::ImageRef;
pub use registry::RegistryAuth;
pub use rootfs::RootfsMount;
pub use store::{
    FsInfo, Image, ImageConfig, ImageId, ImageLimits, ImageStore, ImageStoreConfig, Layer,
    RemoveOutcome,
};
pub use unpack::LayerLimits;
