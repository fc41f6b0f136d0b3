//! The gRPC face of an [`ExpertWorker`]: `switchyard.v1.ExpertService`.

use std::future::Future;
use std::sync::Arc;

use switchyard_proto::v1::expert_service_server::{ExpertService, ExpertServiceServer};
use switchyard_proto::v1::{ForwardRequest, ForwardResponse, InfoRequest, InfoResponse};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::error::WorkerError;
use crate::worker::ExpertWorker;

#[derive(Debug, Clone)]
pub struct ExpertServiceImpl {
    worker: Arc<ExpertWorker>,
}

impl ExpertServiceImpl {
    pub fn new(worker: Arc<ExpertWorker>) -> Self {
        ExpertServiceImpl { worker }
    }

    /// The tonic service, with message limits from the worker.
    pub fn into_server(self) -> ExpertServiceServer<Self> {
        // Room for the hidden rows plus routing and framing.
        let limit = self.worker.max_message_bytes() + (1 << 20);
        ExpertServiceServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

#[tonic::async_trait]
impl ExpertService for ExpertServiceImpl {
    #[instrument(skip_all, fields(layer = request.get_ref().layer))]
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let worker = self.worker.clone();
        let req = request.into_inner();
        // The experts are CPU work: keep them off the async threads.
        let output = tokio::task::spawn_blocking(move || {
            let out = worker.forward(&req);
            // Between calls the worker waits on the network: let compute threads sleep.
            switchyard_engine::cpu::pool::global().rest();
            out
        })
        .await
        .map_err(|e| Status::internal(format!("expert task failed: {e}")))??;
        Ok(Response::new(ForwardResponse {
            output: Some(output),
        }))
    }

    #[instrument(skip_all)]
    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.worker.info()))
    }
}

/// Serves `worker` on `listener` until `shutdown` resolves.
///
/// TCP_NODELAY is set on every accepted socket: `serve_with_incoming` ignores
/// `Server::tcp_nodelay`, and without it each small reply waits on Nagle's algorithm (~40 ms).
pub async fn serve(
    worker: Arc<ExpertWorker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(ExpertServiceImpl::new(worker).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| WorkerError::Transport(e.to_string()))
}
