//! The gRPC face of an [`ExpertWorker`]: `switchyard.v1.ExpertService`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::time::Duration;
use switchyard_proto::v1::expert_service_server::{ExpertService, ExpertServiceServer};
use switchyard_proto::v1::{ForwardRequest, ForwardResponse, InfoRequest, InfoResponse};

use switchyard_proto::health::Health;
use switchyard_proto::tls::{ClusterLinks, Role};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::health_server::HealthServer;
use tracing::instrument;

use crate::error::WorkerError;
use crate::worker::ExpertWorker;

#[derive(Debug, Clone)]
pub struct ExpertServiceImpl {
    worker: Arc<ExpertWorker>,
    /// Turns true when serving stops: open call streams end so shutdown does not wait on them.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// Over TLS, only routers may send hidden states (and operators ask for `Info`).
    links: ClusterLinks,
}

impl ExpertServiceImpl {
    pub fn new(worker: Arc<ExpertWorker>, links: ClusterLinks) -> Self {
        ExpertServiceImpl {
            worker,
            closing: Arc::new(tokio::sync::watch::channel(false).0),
            links,
        }
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

/// Runs one call on the blocking pool and lets the compute threads sleep afterwards. The reply
/// says how long the call queued and computed.
async fn run_call(
    worker: Arc<ExpertWorker>,
    req: ForwardRequest,
) -> Result<ForwardResponse, Status> {
    let arrived = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let queued = arrived.elapsed();
        worker.metrics.queue_wait.observe(queued.as_secs_f64());
        let start = std::time::Instant::now();
        let out = worker.forward(&req);
        let computed = start.elapsed();
        if out.is_err() {
            worker.metrics.failed_calls.inc();
        }
        // Between calls the worker waits on the network: let compute threads sleep.
        switchyard_engine::cpu::pool::global().rest();
        out.map(|output| ForwardResponse {
            output: Some(output),
            call_id: req.call_id,
            queue_seconds: queued.as_secs_f64(),
            compute_seconds: computed.as_secs_f64(),
            ..Default::default()
        })
    })
    .await
    .map_err(|e| Status::internal(format!("expert task failed: {e}")))?
    .map_err(Status::from)
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ForwardResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertService for ExpertServiceImpl {
    type ForwardStreamStream = ReplyStream;

    /// Calls are run in arrival order; a failed call is reported in its reply and the stream
    /// stays open.
    #[instrument(skip_all)]
    async fn forward_stream(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.links
            .authorize(&request, &[Role::Router], "ForwardStream")?;
        let mut inbound = request.into_inner();
        let worker = self.worker.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut closing = self.closing.subscribe();
        tokio::spawn(async move {
            // Ends when the router closes its side or goes away, or this worker stops.
            loop {
                let req = tokio::select! {
                    next = inbound.message() => match next {
                        Ok(Some(req)) => req,
                        _ => break,
                    },
                    _ = closing.changed() => break,
                };
                let call_id = req.call_id;
                let reply = match run_call(worker.clone(), req).await {
                    Ok(reply) => reply,
                    Err(status) => ForwardResponse {
                        call_id,
                        error_code: status.code() as i32,
                        error_message: status.message().to_string(),
                        ..Default::default()
                    },
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(skip_all, fields(layer = request.get_ref().layer))]
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        self.links.authorize(&request, &[Role::Router], "Forward")?;
        let reply = run_call(self.worker.clone(), request.into_inner()).await?;
        Ok(Response::new(reply))
    }

    #[instrument(skip_all)]
    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        self.links
            .authorize(&request, &[Role::Router, Role::Admin], "Info")?;
        Ok(Response::new(self.worker.info()))
    }
}

/// Serves `worker` on `listener` until `shutdown` resolves: a worker that holds a fixed set
/// (static `--experts`), SERVING from the start and NOT_SERVING once shutdown begins.
pub async fn serve(
    worker: Arc<ExpertWorker>,
    listener: TcpListener,
    links: ClusterLinks,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let (health, health_service) = Health::new(SERVICE).await;
    let draining = health.clone();
    let shutdown = async move {
        shutdown.await;
        draining.drain().await;
    };
    serve_with(
        worker,
        listener,
        links,
        health,
        health_service,
        || Ok(()),
        shutdown,
    )
    .await
}

/// The service name health reports on.
pub const SERVICE: &str = "switchyard.v1.ExpertService";

/// Serves `worker` on `listener` until `shutdown` resolves, its health following `ready`
/// (checked every 250 ms; a draining `health` stays NOT_SERVING). Whoever resolves `shutdown`
/// drains first (see [`crate::agent::Agent::drain`]); then open call streams end and the
/// server stops once the calls in flight are answered.
///
/// TCP_NODELAY is set on every accepted socket: `serve_with_incoming` ignores
/// `Server::tcp_nodelay`, and without it each small reply waits on Nagle's algorithm (~40 ms).
pub async fn serve_with<H: tonic_health::pb::health_server::Health>(
    worker: Arc<ExpertWorker>,
    listener: TcpListener,
    links: ClusterLinks,
    health: Health,
    health_service: HealthServer<H>,
    ready: impl Fn() -> Result<(), String> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    health.set(ready()).await;
    let monitor = health.watch(Duration::from_millis(250), ready);
    let mut server = links
        .server()
        .map_err(|e| WorkerError::Transport(e.to_string()))?;
    let service = ExpertServiceImpl::new(worker, links);
    let closing = service.closing.clone();
    let shutdown = async move {
        shutdown.await;
        health.drain().await;
        health.close().await;
        closing.send_replace(true);
    };
    let result = server
        .add_service(health_service)
        .add_service(service.into_server())
        .add_optional_service(switchyard_proto::reflection::v1())
        .add_optional_service(switchyard_proto::reflection::v1alpha())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| WorkerError::Transport(e.to_string()));
    monitor.abort();
    result
}
