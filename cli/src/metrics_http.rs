//! `/metrics` and `/health` over HTTP on a listener of their own (`--metrics-listen`): for
//! nodes whose API is gRPC only (workers, the coordinator), and for routers with or without
//! their HTTP API. `/health` is what Kubernetes probes: its gRPC probes speak no TLS, and the
//! cluster's gRPC ports take only TLS.

use std::future::Future;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;

/// `--metrics-auth` for nodes without a client API (workers, the coordinator): the key comes
/// from `--api-key` / `--api-key-file` (the routers' key, typically, from the same Secret).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MetricsAuthArgs {
    /// Require the API key on `/metrics` (`authorization: Bearer KEY` or `x-api-key`);
    /// `/health` stays open for probes.
    #[arg(long, env = "SWITCHYARD_METRICS_AUTH")]
    pub metrics_auth: bool,
    /// The key --metrics-auth asks for.
    #[arg(long, env = "SWITCHYARD_API_KEY", conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// The same, read from a file (trimmed).
    #[arg(long, env = "SWITCHYARD_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
}

impl MetricsAuthArgs {
    /// The key `/metrics` requires, if any.
    pub fn key(&self) -> anyhow::Result<Option<Arc<str>>> {
        if !self.metrics_auth {
            if self.api_key.is_some() || self.api_key_file.is_some() {
                tracing::warn!("an API key was given without --metrics-auth: /metrics stays open");
            }
            return Ok(None);
        }
        let key = match (&self.api_key, &self.api_key_file) {
            (Some(k), _) => k.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading --api-key-file {}: {e}", path.display()))?
                .trim()
                .to_string(),
            (None, None) => anyhow::bail!("--metrics-auth needs --api-key or --api-key-file"),
        };
        if key.is_empty() {
            anyhow::bail!("the API key must not be empty");
        }
        Ok(Some(Arc::from(key)))
    }
}

/// A node's readiness now: Ok, or why not.
pub type Ready = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// `--metrics-listen`: binds `addr` (if given), serves `render()` and `ready()` there until
/// Ctrl-C or SIGTERM, and returns the ` · metrics ADDR` part of the node's listening line
/// (empty without an address).
pub async fn listen(
    addr: Option<std::net::SocketAddr>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    ready: Ready,
    key: Option<Arc<str>>,
) -> anyhow::Result<String> {
    use anyhow::Context;
    let Some(addr) = addr else {
        return Ok(String::new());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-listen {addr}"))?;
    let line = format!(" · metrics {}", listener.local_addr()?);
    tokio::spawn(serve(
        listener,
        render,
        ready,
        key,
        crate::shutdown_signal(),
    ));
    Ok(line)
}

/// Serves `render()` at `/metrics` and `ready()` at `/health` (200, or 503 with the reason)
/// on `listener` until `shutdown` resolves. With a `key`, `/metrics` answers only requests
/// that carry it (`authorization: Bearer KEY` or `x-api-key`); `/health` stays open.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    ready: Ready,
    key: Option<Arc<str>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let health = axum::Router::new().route(
        "/health",
        get(move || {
            let ready = ready.clone();
            async move {
                match ready() {
                    Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                }
            }
        }),
    );
    let app = health.route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let (render, key) = (render.clone(), key.clone());
            async move {
                let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                if let Some(key) = &key
                    && !switchyard_router::server::key_matches(
                        key,
                        h("authorization"),
                        h("x-api-key"),
                    )
                {
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        "/metrics needs the API key (--metrics-auth): `authorization: Bearer KEY` or `x-api-key: KEY`\n".to_string(),
                    );
                }
                (
                    StatusCode::OK,
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
