//! Clients of the coordinator that every node opens the same way: over the node's cluster
//! links (mutual TLS unless `--insecure-cluster`), TCP_NODELAY, a connect timeout, errors as
//! text for the logs of the reconnect loops that call these.

use std::time::Duration;

use tonic::Streaming;
use tonic::transport::Channel;

use crate::tls::{ClusterLinks, Role};
use crate::v1::coordinator_service_client::CoordinatorServiceClient;
use crate::v1::{PlacementUpdate, WatchPlacementRequest};

/// A client of the coordinator at `addr` (`host:port` or a URL).
pub async fn coordinator(
    addr: &str,
    links: &ClusterLinks,
) -> Result<CoordinatorServiceClient<Channel>, String> {
    let channel = links
        .endpoint(addr, Role::Coordinator)
        .map_err(|e| format!("coordinator {addr}: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| connect_error(&e))?;
    Ok(CoordinatorServiceClient::new(channel))
}

/// The coordinator's placement updates, from the current one on.
pub async fn watch_placement(
    addr: &str,
    links: &ClusterLinks,
) -> Result<Streaming<PlacementUpdate>, String> {
    coordinator(addr, links)
        .await?
        .watch_placement(WatchPlacementRequest {})
        .await
        .map(|s| s.into_inner())
        .map_err(|s| s.to_string())
}

/// A connect error with its causes: tonic's own text is only "transport error", and the
/// reason a TLS handshake failed (an unknown CA, the wrong server name) is further down.
pub fn connect_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
