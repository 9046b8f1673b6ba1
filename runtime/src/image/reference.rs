//! Image reference parsing and normalisation, with the same results as containerd's
//! `reference/docker.ParseDockerRef` (what kubelet and crictl expect back in `repo_tags`):
//! `busybox` -> `docker.io/library/busybox:latest`; a reference with a digest drops its tag.

use super::error::{Error, Result};
use oci_client::Reference;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    /// Parses and normalises `s`; the error names `s`.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidReference {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty reference".into()));
        }
        if s.trim() != s || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace".into()));
        }
        let parsed: Reference = s.parse().map_err(|e| invalid(format!("{e}")))?;
        let inner = match parsed.digest() {
            Some(d) => Reference::with_digest(
                parsed.registry().to_string(),
                parsed.repository().to_string(),
                d.to_string(),
            ),
            None => parsed,
        };
        if inner.registry().is_empty() || inner.repository().is_empty() {
            return Err(invalid("missing registry or repository".into()));
        }
        // The distribution grammar (which containerd enforces): lowercase path components of
        // alphanumerics joined by single separators.
        let component_ok = |c: &str| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&x| {
                    x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-')
                })
        };
        if !inner.repository().split('/').all(component_ok) {
            return Err(invalid(format!(
                "repository {:?} must be lowercase alphanumerics and separators",
                inner.repository()
            )));
        }
        Ok(ImageRef { inner })
    }

    /// Registry host (with port), e.g. `docker.io`, `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// Repository path inside the registry, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, if the reference is not by digest.
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The digest, if the reference is by digest.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// `registry/repository` (the name without tag or digest).
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry(), self.repository())
    }

    /// The full normalised form: `registry/repository:tag` or `registry/repository@digest`.
    pub fn normalized(&self) -> String {
        match (self.digest(), self.tag()) {
            (Some(d), _) => format!("{}@{}", self.name(), d),
            (None, Some(t)) => format!("{}:{}", self.name(), t),
            (None, None) => self.name(),
        }
    }

    /// The same repository and tag/digest on another registry host (a mirror).
    pub(crate) fn on_host(&self, host: &str) -> Reference {
        match (self.digest(), self.tag()) {
            (Some(d), _) => Reference::with_digest(
                host.to_string(),
                self.repository().to_string(),
                d.to_string(),
            ),
            (None, t) => Reference::with_tag(
                host.to_string(),
                self.repository().to_string(),
                t.unwrap_or("latest").to_string(),
            ),
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.normalized())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_containerd() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
            ("foo/bar", "docker.io/foo/bar:latest"),
            ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
            ("localhost/x", "localhost/x:latest"),
            ("127.0.0.1:5000/busybox:v1", "127.0.0.1:5000/busybox:v1"),
            (
                "busybox:1@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                ImageRef::parse(input).unwrap().normalized(),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn rejects_bad_references_naming_them() {
        for bad in [
            "",
            "Busybox",
            "UPPER/case",
            "busybox:",
            "a b",
            "busybox@sha256:abc",
            ":tag",
            "x/../y",
            "x//y",
            "-x",
        ] {
            let err = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidReference { reference, .. } if reference == bad),
                "{bad}: {err}"
            );
            assert_eq!(err.kind(), super::super::error::ErrorKind::InvalidArgument);
        }
    }
}
