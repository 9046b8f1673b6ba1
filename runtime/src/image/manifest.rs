//! Manifest fetches with a size bound.
//!
//! `oci-client` reads a manifest response whole into memory, however large
//! the registry says it is, or however long a chunked body runs: an image
//! reference naming a hostile registry could make huskd allocate without
//! end. Manifests are therefore fetched here, with the `oci-client` client
//! only doing the token exchange (and caching the token for the blob pulls
//! that follow): a declared length over the limit is refused before the
//! body is read, and the body is read chunk by chunk and dropped at the
//! first byte past the limit. Layers and configs still go through
//! `oci-client`'s streaming blob API, bounded by their descriptors.

use oci_client::client::linux_amd64_resolver;
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::{
    OciImageManifest, OciManifest, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{Reference, RegistryOperation};
use sha2::{Digest, Sha256};

use super::error::Error;
use super::registry::map_error;

const ACCEPT: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// How much of an error response is kept for the message.
const ERROR_BODY_BYTES: usize = 1024;

/// One registry's manifest endpoint, as a pull sees it.
pub(crate) struct ManifestSource<'a> {
    pub client: &'a oci_client::Client,
    pub http: &'a reqwest::Client,
    pub auth: &'a OciAuth,
    /// `http` or `https`, as the store's insecure-registry list says.
    pub scheme: &'a str,
    pub max_bytes: u64,
    /// For messages: the image as the user named it and the endpoint host.
    pub image: &'a str,
    pub registry: &'a str,
}

impl ManifestSource<'_> {
    /// The linux/amd64 image manifest of `oref`, its digest, and the digest
    /// of the index it was chosen from (if `oref` names an index).
    pub async fn image_manifest(
        &self,
        oref: &Reference,
    ) -> Result<(OciImageManifest, String, Option<String>), Error> {
        let token = self.token(oref).await?;
        let (manifest, digest) = self.fetch(oref, token.as_deref()).await?;
        let index = match manifest {
            OciManifest::Image(m) => return Ok((m, digest, None)),
            OciManifest::ImageIndex(i) => i,
        };
        let chosen = linux_amd64_resolver(&index.manifests).ok_or_else(|| Error::NotFound {
            image: self.image.to_string(),
            registry: self.registry.to_string(),
            detail: "the image index has no linux/amd64 manifest".into(),
        })?;
        match self
            .fetch(&oref.clone_with_digest(chosen.clone()), token.as_deref())
            .await?
        {
            (OciManifest::Image(m), _) => Ok((m, chosen, Some(digest))),
            (OciManifest::ImageIndex(_), _) => Err(self.unsupported(format!(
                "{chosen}: an image index where an image manifest was expected"
            ))),
        }
    }

    /// Logs in as `oci-client` would (anonymous, basic, or a bearer token
    /// from the registry's token service) and returns the header value.
    async fn token(&self, oref: &Reference) -> Result<Option<String>, Error> {
        self.client
            .store_auth_if_needed(oref.resolve_registry(), self.auth)
            .await;
        let bearer = self
            .client
            .auth(oref, self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| map_error(e, self.image, self.registry))?;
        Ok(match (bearer, self.auth) {
            (Some(t), _) => Some(format!("Bearer {t}")),
            (None, OciAuth::Bearer(t)) => Some(format!("Bearer {t}")),
            (None, OciAuth::Basic(u, p)) => {
                use base64::Engine;
                let raw = format!("{u}:{p}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
            }
            (None, OciAuth::Anonymous) => None,
        })
    }

    async fn fetch(
        &self,
        oref: &Reference,
        authorization: Option<&str>,
    ) -> Result<(OciManifest, String), Error> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{}{}",
            self.scheme,
            oref.resolve_registry(),
            oref.repository(),
            oref.digest().or(oref.tag()).unwrap_or("latest"),
            oref.namespace()
                .map(|ns| format!("?ns={ns}"))
                .unwrap_or_default(),
        );
        let mut req = self.http.get(&url).header("Accept", ACCEPT.join(", "));
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        let oci = |e: OciDistributionError| map_error(e, self.image, self.registry);
        let mut res = req
            .send()
            .await
            .map_err(|e| oci(OciDistributionError::RequestError(e)))?;
        let status = res.status();
        if !status.is_success() {
            let body = self
                .read_bounded(&mut res, ERROR_BODY_BYTES as u64, true)
                .await?;
            return Err(oci(OciDistributionError::ServerError {
                code: status.as_u16(),
                url,
                message: String::from_utf8_lossy(&body).trim().to_string(),
            }));
        }
        let header_digest = res
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = self.read_bounded(&mut res, self.max_bytes, false).await?;
        let digest = format!("sha256:{:x}", Sha256::digest(&body));
        for want in [oref.digest(), header_digest.as_deref()]
            .into_iter()
            .flatten()
        {
            // A digest of another algorithm cannot be checked against
            // sha256; the reference's own digest must be sha256 (checked
            // when it was parsed), the header's is advisory.
            if want.starts_with("sha256:") && want != digest {
                return Err(oci(OciDistributionError::DigestError(
                    DigestError::VerificationError {
                        expected: want.to_string(),
                        actual: digest,
                    },
                )));
            }
        }
        let manifest: OciManifest = serde_json::from_slice(&body)
            .map_err(|e| self.unsupported(format!("manifest {digest}: {e}")))?;
        Ok((manifest, digest))
    }

    /// The body, at most `max` bytes; past that, an error (or, for an error
    /// response whose text is only a courtesy, the first `max` bytes).
    async fn read_bounded(
        &self,
        res: &mut reqwest::Response,
        max: u64,
        truncate: bool,
    ) -> Result<Vec<u8>, Error> {
        let too_big = |size: String| {
            self.unsupported(format!(
                "manifest of {size}: over the limit of {max} bytes (max_manifest_bytes)"
            ))
        };
        if let Some(n) = res.content_length().filter(|&n| n > max) {
            if !truncate {
                return Err(too_big(format!("{n} bytes")));
            }
        }
        let mut body = Vec::new();
        loop {
            let chunk = res.chunk().await.map_err(|e| {
                map_error(
                    OciDistributionError::RequestError(e),
                    self.image,
                    self.registry,
                )
            })?;
            let Some(chunk) = chunk else {
                return Ok(body);
            };
            let room = (max as usize).saturating_sub(body.len());
            if chunk.len() > room {
                if truncate {
                    body.extend_from_slice(&chunk[..room]);
                    return Ok(body);
                }
                return Err(too_big("more than that".into()));
            }
            body.extend_from_slice(&chunk);
        }
    }

    fn unsupported(&self, detail: String) -> Error {
        Error::Unsupported {
            image: self.image.to_string(),
            registry: self.registry.to_string(),
            detail,
        }
    }
}
