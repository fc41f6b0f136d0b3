//! The gRPC [`Transport`]: one client per worker, TCP_NODELAY, a deadline on every call.

use std::time::Duration;

use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{ForwardRequest, InfoRequest, InfoResponse};
use tonic::transport::{Channel, Endpoint};

use crate::dispatch::{ForwardFuture, Transport, WorkerId};
use crate::error::RouterError;

#[derive(Clone, Debug)]
struct Worker {
    addr: String,
    client: ExpertServiceClient<Channel>,
}

/// Clients for a fixed pool of workers, keyed by [`WorkerId`] (their index in the address list).
#[derive(Clone, Debug)]
pub struct GrpcTransport {
    workers: Vec<Worker>,
    deadline: Duration,
}

fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl GrpcTransport {
    /// Connects to every worker (must run inside a tokio runtime, which then drives the
    /// connections).
    pub async fn connect(
        addrs: &[String],
        deadline: Duration,
        max_message_bytes: usize,
    ) -> Result<GrpcTransport, RouterError> {
        let mut workers = Vec::with_capacity(addrs.len());
        for (i, addr) in addrs.iter().enumerate() {
            let connect_error = |reason: String| RouterError::Connect {
                worker: WorkerId(i as u32),
                addr: addr.clone(),
                reason,
            };
            let channel = Endpoint::from_shared(url(addr))
                .map_err(|e| connect_error(e.to_string()))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| connect_error(e.to_string()))?;
            let client = ExpertServiceClient::new(channel)
                .max_decoding_message_size(max_message_bytes + (1 << 20))
                .max_encoding_message_size(max_message_bytes + (1 << 20));
            workers.push(Worker {
                addr: addr.clone(),
                client,
            });
        }
        Ok(GrpcTransport { workers, deadline })
    }

    pub fn worker_ids(&self) -> Vec<WorkerId> {
        (0..self.workers.len() as u32).map(WorkerId).collect()
    }

    /// What each worker holds.
    pub async fn infos(&self) -> Result<Vec<(WorkerId, InfoResponse)>, RouterError> {
        let mut out = Vec::with_capacity(self.workers.len());
        for (i, w) in self.workers.iter().enumerate() {
            let mut req = tonic::Request::new(InfoRequest {});
            req.set_timeout(self.deadline);
            let info = w
                .client
                .clone()
                .info(req)
                .await
                .map_err(|s| RouterError::Connect {
                    worker: WorkerId(i as u32),
                    addr: w.addr.clone(),
                    reason: format!("Info failed: {s}"),
                })?;
            out.push((WorkerId(i as u32), info.into_inner()));
        }
        Ok(out)
    }
}

impl Transport for GrpcTransport {
    fn forward(&self, worker: WorkerId, request: ForwardRequest) -> ForwardFuture {
        let target = self.workers.get(worker.0 as usize).cloned();
        let deadline = self.deadline;
        Box::pin(async move {
            let layer = request.layer as usize;
            let Some(Worker { addr, mut client }) = target else {
                return Err(RouterError::Placement(format!(
                    "no worker {worker} in the pool"
                )));
            };
            let mut req = tonic::Request::new(request);
            req.set_timeout(deadline);
            let reply = client.forward(req).await.map_err(|s| RouterError::Worker {
                worker,
                addr: addr.clone(),
                layer,
                code: s.code(),
                message: s.message().to_string(),
            })?;
            reply
                .into_inner()
                .output
                .ok_or_else(|| RouterError::Worker {
                    worker,
                    addr,
                    layer,
                    code: tonic::Code::Internal,
                    message: "reply without output".into(),
                })
        })
    }
}
