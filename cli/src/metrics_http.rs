//! `/metrics` over HTTP on a listener of its own (`--metrics-listen`): for nodes whose API is
//! gRPC only (workers, the coordinator), and for routers with or without their HTTP API.

use std::future::Future;
use std::sync::Arc;

use axum::http::header;
use axum::routing::get;

/// `--metrics-listen`: binds `addr` (if given), serves `render()` there until Ctrl-C or
/// SIGTERM, and returns the ` · metrics ADDR` part of the node's listening line (empty
/// without an address).
pub async fn listen(
    addr: Option<std::net::SocketAddr>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> anyhow::Result<String> {
    use anyhow::Context;
    let Some(addr) = addr else {
        return Ok(String::new());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-listen {addr}"))?;
    let line = format!(" · metrics {}", listener.local_addr()?);
    tokio::spawn(serve(listener, render, crate::shutdown_signal()));
    Ok(line)
}

/// Serves `render()` at `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
