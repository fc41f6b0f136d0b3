//! Clients of the coordinator that every node opens the same way: TCP_NODELAY, a connect
//! timeout, errors as text for the logs of the reconnect loops that call these.

use std::time::Duration;

use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::backoff::url;
use crate::v1::coordinator_service_client::CoordinatorServiceClient;
use crate::v1::{PlacementUpdate, WatchPlacementRequest};

/// A client of the coordinator at `addr` (`host:port` or a URL).
pub async fn coordinator(addr: &str) -> Result<CoordinatorServiceClient<Channel>, String> {
    let channel = Endpoint::from_shared(url(addr))
        .map_err(|e| format!("bad coordinator address {addr}: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(CoordinatorServiceClient::new(channel))
}

/// The coordinator's placement updates, from the current one on.
pub async fn watch_placement(addr: &str) -> Result<Streaming<PlacementUpdate>, String> {
    coordinator(addr)
        .await?
        .watch_placement(WatchPlacementRequest {})
        .await
        .map(|s| s.into_inner())
        .map_err(|s| s.to_string())
}
