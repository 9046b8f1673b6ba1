//! PullImage from a registry that requires credentials (issue 4): a real
//! `docker-registry` with htpasswd auth, a real huskd, and the credentials
//! in CRI's `AuthConfig` in each of the forms kubelet sends them.
//!
//! Needs root and the husk binaries (see tests/src/lib.rs); no VM is booted.

use anyhow::{ensure, Context, Result};
use husk_tests::huskd::{Huskd, HuskdDirs};
use husk_tests::registry::Registry;
use husk_tests::TestEnv;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use tonic::transport::Channel;
use tonic::Code;

const USER: &str = "husk-puller";

fn auth(username: &str, password: &str) -> cri::AuthConfig {
    cri::AuthConfig {
        username: username.into(),
        password: password.into(),
        ..Default::default()
    }
}

/// `auth` is base64 of `user:password`, as in a docker config.json.
fn auth_field(username: &str, password: &str) -> cri::AuthConfig {
    let raw = format!("{username}:{password}");
    cri::AuthConfig {
        auth: base64_encode(raw.as_bytes()),
        ..Default::default()
    }
}

/// Standard base64 with padding; small enough not to need a crate here.
fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn pull(
    img: &mut ImageServiceClient<Channel>,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<cri::PullImageResponse, tonic::Status> {
    img.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        auth,
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner())
}

async fn status(img: &mut ImageServiceClient<Channel>, image: &str) -> Result<Option<cri::Image>> {
    Ok(img
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await?
        .into_inner()
        .image)
}

/// The pull fails as Unauthenticated, naming the registry and the image,
/// and without echoing any secret.
fn expect_denied(
    what: &str,
    r: Result<cri::PullImageResponse, tonic::Status>,
    registry: &str,
    secrets: &[&str],
) -> Result<()> {
    let s = match r {
        Ok(ok) => anyhow::bail!("{what}: pull succeeded: {ok:?}"),
        Err(s) => s,
    };
    ensure!(
        s.code() == Code::Unauthenticated,
        "{what}: code {:?} (want Unauthenticated): {}",
        s.code(),
        s.message()
    );
    ensure!(
        s.message().contains(registry) && s.message().contains("auth/busybox"),
        "{what}: message does not name registry {registry} and the image: {}",
        s.message()
    );
    for secret in secrets {
        ensure!(
            !s.message().contains(secret),
            "{what}: message leaks a secret: {}",
            s.message()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_with_registry_credentials() -> Result<()> {
    let env = TestEnv::from_env()?;
    let password = format!("pw-{}-{}", std::process::id(), std::process::id() * 7919);
    let registry = Registry::start_with_auth(USER, &password)?;
    let host = registry.host();
    let image = registry
        .push_busybox("auth/busybox:1")
        .context("pushing with --dest-creds")?;
    let dirs = HuskdDirs::new(&env, &[host.as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (_, mut img) = huskd.clients().await?;

    let r = async {
        expect_denied(
            "no AuthConfig",
            pull(&mut img, &image, None).await,
            &host,
            &[],
        )?;
        expect_denied(
            "empty AuthConfig",
            pull(&mut img, &image, Some(cri::AuthConfig::default())).await,
            &host,
            &[],
        )?;
        let wrong = format!("{password}-wrong");
        expect_denied(
            "wrong password",
            pull(&mut img, &image, Some(auth(USER, &wrong))).await,
            &host,
            &[&wrong],
        )?;
        expect_denied(
            "wrong password in auth",
            pull(&mut img, &image, Some(auth_field(USER, &wrong))).await,
            &host,
            &[&wrong],
        )?;
        expect_denied(
            "unknown user",
            pull(&mut img, &image, Some(auth("nobody", &password))).await,
            &host,
            &[&password],
        )?;
        ensure!(
            status(&mut img, &image).await?.is_none(),
            "a refused pull stored the image"
        );

        let ok = pull(&mut img, &image, Some(auth(USER, &password)))
            .await
            .context("pull with username/password")?;
        let st = status(&mut img, &image)
            .await?
            .context("ImageStatus after an authenticated pull finds nothing")?;
        ensure!(
            st.id == ok.image_ref && st.repo_tags.contains(&image),
            "ImageStatus {st:?} does not match the pull ({})",
            ok.image_ref
        );

        img.remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await?;
        ensure!(
            status(&mut img, &image).await?.is_none(),
            "image not removed"
        );
        let again = pull(&mut img, &image, Some(auth_field(USER, &password)))
            .await
            .context("pull with the base64 auth field")?;
        ensure!(
            again.image_ref == ok.image_ref,
            "auth-field pull gave {} (was {})",
            again.image_ref,
            ok.image_ref
        );
        ensure!(
            status(&mut img, &image).await?.is_some(),
            "ImageStatus after the auth-field pull finds nothing"
        );
        let log = std::fs::read_to_string(&dirs.log)?;
        ensure!(
            !log.contains(&password),
            "huskd's log contains the password"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if r.is_err() {
        eprintln!("huskd log:\n{}", huskd.log_tail(60));
    }
    r
}
