//! Refuses a static (crt-static) build that would link libseccomp
//! dynamically: libseccomp-sys links the shared library unless told
//! otherwise, and the resulting static-pie binary crashes at start-up.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBSECCOMP_LINK_TYPE");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let crt_static = features.split(',').any(|f| f == "crt-static");
    let link_type = std::env::var("LIBSECCOMP_LINK_TYPE").unwrap_or_default();
    if crt_static && link_type != "static" {
        panic!(
            "husk-agent: a crt-static build needs libseccomp linked statically: set \
             LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
             (Debian libseccomp-dev ships libseccomp.a)"
        );
    }
}
