//! Registry access: endpoints (mirrors, insecure hosts), credentials, clients and the mapping of
//! `oci-client` errors to the store's typed errors.

use super::error::Error;
use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth as OciAuth;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Registry credentials, shaped like CRI's `AuthConfig`. Empty fields are unset.
///
/// Precedence: `registry_token` (sent as a bearer token), then `identity_token` (sent as the
/// Basic-auth password, user `username` or `<token>`, as docker does for registries that accept
/// it), then `username`/`password`, then `auth` (base64 `user:password`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
    pub auth: String,
    pub server_address: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("server_address", &self.server_address)
            .field("secrets", &"<redacted>")
            .finish()
    }
}

impl RegistryAuth {
    fn to_oci(&self, registry: &str, image: &str) -> Result<OciAuth, Error> {
        if !self.registry_token.is_empty() {
            return Ok(OciAuth::Bearer(self.registry_token.clone()));
        }
        if !self.identity_token.is_empty() {
            let user = if self.username.is_empty() {
                "<token>".to_string()
            } else {
                self.username.clone()
            };
            return Ok(OciAuth::Basic(user, self.identity_token.clone()));
        }
        if !self.username.is_empty() {
            return Ok(OciAuth::Basic(self.username.clone(), self.password.clone()));
        }
        if !self.auth.is_empty() {
            let bad = |detail: &str| Error::Unauthenticated {
                image: image.to_string(),
                registry: registry.to_string(),
                detail: format!("malformed auth field: {detail}"),
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .map_err(|_| bad("not base64"))?;
            let text = String::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
            let (u, p) = text.split_once(':').ok_or_else(|| bad("no ':'"))?;
            return Ok(OciAuth::Basic(u.to_string(), p.to_string()));
        }
        Ok(OciAuth::Anonymous)
    }

    fn is_empty(&self) -> bool {
        self.registry_token.is_empty()
            && self.identity_token.is_empty()
            && self.username.is_empty()
            && self.auth.is_empty()
    }
}

/// One place to pull an image from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `host[:port]` put in place of the image's registry.
    pub host: String,
    /// A mirror (not the image's own registry).
    pub mirror: bool,
}

/// Parses a mirror endpoint URL (`http://host:port`, `https://host`, `host:port`) into the host
/// and whether it is plain HTTP. Paths other than `/` or `/v2` are refused: the mirror keeps the
/// repository path of the image.
pub(crate) fn parse_endpoint(url: &str) -> Result<(String, bool), Error> {
    let bad = |why: &str| Error::InvalidArgument(format!("mirror endpoint {url:?}: {why}"));
    let (http, rest) = if let Some(r) = url.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (false, r)
    } else if url.contains("://") {
        return Err(bad("scheme must be http or https"));
    } else {
        (false, url)
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !matches!(path, "" | "/" | "/v2" | "/v2/") {
        return Err(bad("a path prefix is not supported"));
    }
    if host.is_empty()
        || host
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')))
    {
        return Err(bad("invalid host"));
    }
    Ok((host.to_string(), http))
}

/// Shared registry clients. `oci-client` remembers the first credentials it sees per registry
/// host, so one client per distinct credential set is kept (anonymous shared by all); each keeps
/// its connection pool and token cache.
pub(crate) struct Clients {
    protocol: ClientProtocol,
    clients: Mutex<HashMap<[u8; 32], oci_client::Client>>,
    /// For manifests (`super::manifest`), built on first use.
    http: std::sync::OnceLock<reqwest::Client>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const USER_AGENT: &str = concat!("husk/", env!("CARGO_PKG_VERSION"));

const MAX_CACHED_CLIENTS: usize = 64;

impl Clients {
    pub fn new(http_hosts: Vec<String>) -> Self {
        Clients {
            protocol: ClientProtocol::HttpsExcept(http_hosts),
            clients: Mutex::new(HashMap::new()),
            http: std::sync::OnceLock::new(),
        }
    }

    /// `http` for the registries configured insecure, else `https`.
    pub fn scheme(&self, host: &str) -> &'static str {
        match &self.protocol {
            ClientProtocol::Http => "http",
            ClientProtocol::HttpsExcept(hosts) if hosts.iter().any(|h| h == host) => "http",
            _ => "https",
        }
    }

    /// The HTTP client for manifest fetches: the same timeouts and user
    /// agent as the `oci-client` clients, one connection pool for all.
    pub fn http(&self, image: &str, registry: &str) -> Result<reqwest::Client, Error> {
        if let Some(c) = self.http.get() {
            return Ok(c.clone());
        }
        let c = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| Error::Registry {
                image: image.to_string(),
                registry: registry.to_string(),
                detail: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(self.http.get_or_init(|| c).clone())
    }

    /// Client and oci-client credentials for pulling `image` from `endpoint`. Credentials are
    /// sent to the image's own registry, and to a mirror only when `server_address` names it.
    pub fn get(
        &self,
        endpoint: &Endpoint,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<(oci_client::Client, OciAuth), Error> {
        let auth = auth.filter(|a| {
            !a.is_empty()
                && (!endpoint.mirror || server_host(&a.server_address) == Some(&endpoint.host))
        });
        let oci_auth = match auth {
            Some(a) => a.to_oci(&endpoint.host, image)?,
            None => OciAuth::Anonymous,
        };
        let key = credential_key(&endpoint.host, &oci_auth);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok((c.clone(), oci_auth));
        }
        if clients.len() >= MAX_CACHED_CLIENTS {
            clients.clear();
        }
        let config = ClientConfig {
            protocol: self.protocol.clone(),
            platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: USER_AGENT,
            ..Default::default()
        };
        let client = oci_client::Client::try_from(config).map_err(|e| Error::Registry {
            image: image.to_string(),
            registry: endpoint.host.clone(),
            detail: format!("cannot build HTTP client: {e}"),
        })?;
        clients.insert(key, client.clone());
        Ok((client, oci_auth))
    }
}

fn server_host(server_address: &str) -> Option<&str> {
    let s = server_address
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let s = s.split('/').next().unwrap_or("");
    (!s.is_empty()).then_some(s)
}

fn credential_key(host: &str, auth: &OciAuth) -> [u8; 32] {
    let mut h = Sha256::new();
    match auth {
        OciAuth::Anonymous => h.update(b"anon"),
        OciAuth::Basic(u, p) => {
            h.update(b"basic\0");
            h.update(host.as_bytes());
            h.update(b"\0");
            h.update(u.as_bytes());
            h.update(b"\0");
            h.update(p.as_bytes());
        }
        OciAuth::Bearer(t) => {
            h.update(b"bearer\0");
            h.update(host.as_bytes());
            h.update(b"\0");
            h.update(t.as_bytes());
        }
    }
    h.finalize().into()
}

/// Maps an `oci-client` error for `image` at `registry` to a typed error.
pub(crate) fn map_error(e: OciDistributionError, image: &str, registry: &str) -> Error {
    let image = image.to_string();
    let registry = registry.to_string();
    use OciDistributionError as E;
    match e {
        E::RequestError(err) => Error::Unavailable {
            image,
            registry,
            detail: error_chain(&err),
        },
        E::IoError(err) => map_io(err, &image, &registry, "blob"),
        E::AuthenticationFailure(detail) => Error::Unauthenticated {
            image,
            registry,
            detail,
        },
        E::UnauthorizedError { url } => Error::Unauthenticated {
            image,
            registry,
            detail: format!("401 Unauthorized for {url}"),
        },
        E::RegistryError { envelope, url } => {
            let detail = format!("{url}: {envelope}");
            match envelope.errors.first().map(|e| &e.code) {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::ManifestBlobUnknown,
                ) => Error::NotFound {
                    image,
                    registry,
                    detail,
                },
                Some(OciErrorCode::Unauthorized) => Error::Unauthenticated {
                    image,
                    registry,
                    detail,
                },
                Some(OciErrorCode::Denied) => Error::PermissionDenied {
                    image,
                    registry,
                    detail,
                },
                Some(OciErrorCode::Toomanyrequests) => Error::Unavailable {
                    image,
                    registry,
                    detail,
                },
                Some(OciErrorCode::NameInvalid) => Error::InvalidReference {
                    reference: image,
                    reason: format!("registry {registry} rejects the name: {detail}"),
                },
                _ => Error::Registry {
                    image,
                    registry,
                    detail,
                },
            }
        }
        E::ServerError { code, url, message } => {
            let detail = format!("HTTP {code} for {url}: {message}");
            match code {
                404 => Error::NotFound {
                    image,
                    registry,
                    detail,
                },
                401 => Error::Unauthenticated {
                    image,
                    registry,
                    detail,
                },
                403 => Error::PermissionDenied {
                    image,
                    registry,
                    detail,
                },
                408 | 429 | 500..=599 => Error::Unavailable {
                    image,
                    registry,
                    detail,
                },
                _ => Error::Registry {
                    image,
                    registry,
                    detail,
                },
            }
        }
        E::DigestError(d) => digest_error(d, &image, &registry, "manifest"),
        E::ImageManifestNotFoundError(detail) => Error::NotFound {
            image,
            registry,
            detail,
        },
        e @ (E::UnsupportedMediaTypeError(_)
        | E::UnsupportedSchemaVersionError(_)
        | E::VersionedParsingError(_)
        | E::ManifestParsingError(_)
        | E::IncompatibleLayerMediaTypeError(_)
        | E::ImageIndexParsingNoPlatformResolverError
        | E::ManifestEncodingError(_)
        | E::JsonError(_)) => Error::Unsupported {
            image,
            registry,
            detail: e.to_string(),
        },
        other => Error::Registry {
            image,
            registry,
            detail: other.to_string(),
        },
    }
}

fn digest_error(
    d: oci_client::errors::DigestError,
    image: &str,
    registry: &str,
    what: &str,
) -> Error {
    match d {
        oci_client::errors::DigestError::VerificationError { expected, actual } => {
            Error::DigestMismatch {
                image: image.to_string(),
                registry: registry.to_string(),
                what: what.to_string(),
                expected,
                actual,
            }
        }
        other => Error::Unsupported {
            image: image.to_string(),
            registry: registry.to_string(),
            detail: format!("{what}: {other}"),
        },
    }
}

/// Errors from a blob stream: digest failures are wrapped in `io::Error` by `oci-client`, the
/// rest are connection failures.
pub(crate) fn map_io(err: std::io::Error, image: &str, registry: &str, what: &str) -> Error {
    if err
        .get_ref()
        .is_some_and(|i| i.is::<oci_client::errors::DigestError>())
    {
        let inner = err
            .into_inner()
            .and_then(|i| i.downcast::<oci_client::errors::DigestError>().ok());
        if let Some(d) = inner {
            return digest_error(*d, image, registry, what);
        }
        return Error::Registry {
            image: image.to_string(),
            registry: registry.to_string(),
            detail: format!("{what}: digest error"),
        };
    }
    Error::Unavailable {
        image: image.to_string(),
        registry: registry.to_string(),
        detail: format!("reading {what}: {}", error_chain(&err)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:5000").unwrap(),
            ("127.0.0.1:5000".into(), true)
        );
        assert_eq!(
            parse_endpoint("https://mirror.gcr.io/v2/").unwrap(),
            ("mirror.gcr.io".into(), false)
        );
        assert_eq!(
            parse_endpoint("mirror:443").unwrap(),
            ("mirror:443".into(), false)
        );
        assert!(parse_endpoint("ftp://x").is_err());
        assert!(parse_endpoint("https://x/prefix").is_err());
        assert!(parse_endpoint("https://").is_err());
    }

    #[test]
    fn auth_precedence_and_decoding() {
        let a = RegistryAuth {
            auth: base64::engine::general_purpose::STANDARD.encode("u:p:w"),
            ..Default::default()
        };
        assert_eq!(
            a.to_oci("r", "i").unwrap(),
            OciAuth::Basic("u".into(), "p:w".into())
        );
        let a = RegistryAuth {
            username: "x".into(),
            password: "secretpw".into(),
            registry_token: "t".into(),
            ..Default::default()
        };
        assert_eq!(a.to_oci("r", "i").unwrap(), OciAuth::Bearer("t".into()));
        let bad = RegistryAuth {
            auth: "!!".into(),
            ..Default::default()
        };
        assert!(matches!(
            bad.to_oci("r", "i"),
            Err(Error::Unauthenticated { .. })
        ));
        assert!(!format!("{a:?}").contains("secretpw"));
    }
}
