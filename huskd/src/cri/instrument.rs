//! One span per CRI call (RuntimeService and ImageService), as containerd's `instrument` wrapper: the
//! method and the pod and container ids, the elapsed time, and failures
//! logged with their gRPC code.

use tonic::{Response, Status};
use tracing::Instrument;

use super::validation;

/// Runs one CRI call inside a span carrying the method and the ids, and
/// logs failures.
pub(super) async fn traced<T>(
    method: &'static str,
    pod: &str,
    container: &str,
    fut: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    // Empty until known: a field recorded later (the pod of a container
    // call, a new id) would otherwise appear twice in the log line.
    let span = tracing::info_span!(
        "cri",
        method,
        pod = tracing::field::Empty,
        container = tracing::field::Empty
    );
    if !pod.is_empty() {
        span.record("pod", validation::printable(pod).as_str());
    }
    if !container.is_empty() {
        span.record("container", validation::printable(container).as_str());
    }
    in_span(span, fut).await
}

/// Awaits `fut` inside `span`, then logs its outcome and elapsed time in
/// the span (debug on success, info with the gRPC code on failure).
pub(super) async fn in_span<T>(
    span: tracing::Span,
    fut: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let started = std::time::Instant::now();
    let r = fut.instrument(span.clone()).await;
    let _e = span.enter();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match &r {
        Ok(_) => tracing::debug!(elapsed_ms = ms, "ok"),
        Err(s) => {
            tracing::info!(elapsed_ms = ms, code = ?s.code(), message = %s.message(), "failed")
        }
    }
    r.map(Response::new)
}
