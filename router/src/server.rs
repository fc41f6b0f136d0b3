//! The router node's gRPC API: `switchyard.v1.InferenceService`.

use std::future::Future;
use std::sync::Arc;

use switchyard_engine::EngineError;
use switchyard_engine::generate::{self, GenerateOptions, SamplingParams};
use switchyard_engine::model::DeepseekModel;
use switchyard_proto::v1::inference_service_server::{InferenceService, InferenceServiceServer};
use switchyard_proto::v1::{GenerateRequest, GenerateResponse};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::coordinated::CoordinatedExperts;
use crate::error::RouterError;
use crate::remote::RemoteExperts;

/// Where a router's expert workers come from.
#[derive(Debug, Clone)]
pub enum ExpertSource {
    /// A fixed list of workers.
    Static(Arc<RemoteExperts>),
    /// The coordinator's live placement, followed as it changes.
    Coordinated(Arc<CoordinatedExperts>),
}

impl ExpertSource {
    /// The workers to use for one request.
    pub fn snapshot(&self) -> Arc<RemoteExperts> {
        match self {
            ExpertSource::Static(e) => e.clone(),
            ExpertSource::Coordinated(c) => c.snapshot(),
        }
    }
}

/// The model without its routed experts, and the workers that hold them.
#[derive(Debug, Clone)]
pub struct RouterNode {
    model: Arc<DeepseekModel>,
    experts: ExpertSource,
}

impl RouterNode {
    pub fn new(model: Arc<DeepseekModel>, experts: ExpertSource) -> Self {
        RouterNode { model, experts }
    }

    /// Validates and runs one request (blocking: call off the async threads).
    pub fn generate(&self, req: GenerateRequest) -> Result<GenerateResponse, RouterError> {
        let request = generate::GenerateRequest {
            prompt: req.prompt_ids,
            max_new_tokens: req.max_new_tokens as usize,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_k: req.top_k as usize,
                top_p: req.top_p.unwrap_or(1.0),
                seed: req.seed,
                ..Default::default()
            },
            ignore_eos: req.ignore_eos,
            stop_token_ids: req.stop_token_ids,
        };
        let prompt_tokens = request.prompt.len() as u32;
        // One placement for the whole request: a switch never lands inside a step.
        let experts = self.experts.snapshot();
        let mut out = generate::generate_with(
            &self.model,
            std::slice::from_ref(&request),
            GenerateOptions::default(),
            &*experts,
        )
        .map_err(|e| match e {
            EngineError::Executor(m) => RouterError::Runtime(m),
            e => RouterError::Engine(e),
        })?;
        let out = out
            .pop()
            .ok_or_else(|| RouterError::Runtime("no output".into()))?;
        Ok(GenerateResponse {
            completion_tokens: out.token_ids.len() as u32,
            token_ids: out.token_ids,
            finish_reason: out.finish_reason.as_str().into(),
            prompt_tokens,
        })
    }
}

#[tonic::async_trait]
impl InferenceService for RouterNode {
    #[instrument(skip_all, fields(prompt = request.get_ref().prompt_ids.len()))]
    async fn generate_unary(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let node = self.clone();
        let req = request.into_inner();
        let reply = tokio::task::spawn_blocking(move || node.generate(req))
            .await
            .map_err(|e| Status::internal(format!("generation task failed: {e}")))??;
        Ok(Response::new(reply))
    }
}

/// Serves the inference API on `listener` (TCP_NODELAY) until `shutdown` resolves.
pub async fn serve(
    node: RouterNode,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RouterError> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(switchyard_proto::health::serving("switchyard.v1.InferenceService").await)
        .add_service(InferenceServiceServer::new(node))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| RouterError::Runtime(format!("serving failed: {e}")))
}
