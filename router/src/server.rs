//! The router node's client APIs over one scheduler: gRPC `switchyard.v1.InferenceService`
//! (with `grpc.health.v1` and server reflection) here, the OpenAI-compatible HTTP API in
//! [`crate::http`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use switchyard_engine::ModelConfig;
use switchyard_engine::sampling::TokenLogprobs;
use switchyard_engine::tokenizer::TextTokenizer;
use switchyard_proto::health::Health;
use switchyard_proto::v1::inference_service_server::{InferenceService, InferenceServiceServer};
use switchyard_proto::v1::{
    ExpertLoadRequest, ExpertLoadResponse, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, GeneratedToken, ModelInfoRequest, ModelInfoResponse, TokenLogprob,
    TokenizeRequest, TokenizeResponse, Usage,
};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::backend::Backend;
use crate::error::RouterError;
use crate::expert_load::{ExpertLoad, LoadSnapshot};
use crate::metrics::{ImbalanceLabel, RouterMetrics};
use crate::request::{self, Limits, Prompt, RawRequest, ValidRequest};
use crate::scheduler::{Event, RequestStream, Scheduler, SchedulerConfig};

/// Everything the client APIs share: the scheduler, the tokenizer, the limits requests are
/// checked against, and the API key.
#[derive(Clone)]
pub struct ServingState {
    pub scheduler: Scheduler,
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub limits: Limits,
    pub config: Arc<ModelConfig>,
    /// When set, client APIs require it (`authorization: Bearer KEY`); health stays open.
    pub api_key: Option<Arc<str>>,
    /// `/metrics` requires the API key too (`--metrics-auth`).
    pub metrics_auth: bool,
    /// TLS for both client APIs (`--tls-cert` / `--tls-key`).
    pub api_tls: Option<crate::api_tls::ApiTls>,
    pub metrics: Arc<RouterMetrics>,
    /// Tokens per expert and worker (absent for backends that do not count them).
    pub expert_load: Option<Arc<ExpertLoad>>,
    backend: Arc<dyn Backend>,
    /// Set once shutdown begins: health turns NOT_SERVING before work stops being taken.
    draining: Arc<AtomicBool>,
}

/// How a router serves: names, limits and the scheduler's sizes.
#[derive(Clone, Debug)]
pub struct ServingOptions {
    /// The name clients use for the model.
    pub model_name: String,
    pub api_key: Option<String>,
    /// Require the API key on `/metrics` as well (it is open by default, like health).
    pub metrics_auth: bool,
    /// Serve the client APIs over TLS with this certificate.
    pub api_tls: Option<crate::api_tls::ApiTls>,
    /// Memory for the paged KV cache.
    pub kv_cache_bytes: u64,
    pub block_size: usize,
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_waiting: usize,
    /// `max_tokens` for requests that give none.
    pub default_max_tokens: usize,
    /// Prompt + output tokens a request may reach, below the model's own
    /// `max_position_embeddings` (vLLM's `--max-model-len`); `None`: the model's.
    pub max_model_len: Option<usize>,
    /// How long a request whose steps fail for want of an expert worker is re-queued and
    /// retried before it fails (see [`SchedulerConfig::step_retry`]).
    pub step_retry: std::time::Duration,
    /// Where the router's metrics go (share it with the dispatcher's options).
    pub metrics: Arc<RouterMetrics>,
}

/// The default of [`ServingOptions::step_retry`]: a lease and a re-placement of small experts.
pub const DEFAULT_STEP_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for ServingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingState")
            .field("model", &self.limits.model_name)
            .field("scheduler", &self.scheduler)
            .finish()
    }
}

impl ServingState {
    /// Sizes the KV pool from the options and starts the scheduler over `backend`.
    pub fn start(
        backend: Arc<dyn Backend>,
        config: Arc<ModelConfig>,
        tokenizer: Option<Arc<TextTokenizer>>,
        o: &ServingOptions,
    ) -> Result<ServingState, RouterError> {
        if o.block_size == 0 {
            return Err(RouterError::invalid("kv_block_size", "must be >= 1, got 0"));
        }
        let max_context = match o.max_model_len {
            None => config.max_position_embeddings,
            Some(n) if (2..=config.max_position_embeddings).contains(&n) => n,
            Some(n) => {
                return Err(RouterError::invalid(
                    "max_model_len",
                    format!(
                        "must be in 2..={} (the model's max_position_embeddings), got {n}",
                        config.max_position_embeddings
                    ),
                ));
            }
        };
        let layout = backend.kv_layout(o.block_size);
        let kv_blocks = usize::try_from(o.kv_cache_bytes / layout.block_bytes().max(1) as u64)
            .unwrap_or(usize::MAX);
        let one_block = layout.blocks_for(o.block_size, o.max_batch_tokens);
        if kv_blocks < one_block {
            return Err(RouterError::invalid(
                "kv_cache_memory",
                format!(
                    "must hold at least one block of every layer ({} bytes: {} tokens × {} bytes), got {}",
                    one_block * layout.block_bytes(),
                    o.block_size,
                    layout.bytes_per_token(),
                    o.kv_cache_bytes
                ),
            ));
        }
        let expert_load = backend.expert_load();
        let scheduler = Scheduler::start(
            backend.clone(),
            tokenizer.clone(),
            SchedulerConfig {
                max_batch_size: o.max_batch_size,
                max_batch_tokens: o.max_batch_tokens,
                max_waiting: o.max_waiting,
                kv_blocks,
                block_size: o.block_size,
                step_retry: o.step_retry,
            },
            o.metrics.clone(),
        )?;
        Ok(ServingState {
            scheduler,
            limits: Limits {
                model_name: o.model_name.clone(),
                vocab_size: config.vocab_size,
                max_context,
                max_cached_tokens: layout.max_tokens(kv_blocks, o.max_batch_tokens),
                default_max_tokens: o.default_max_tokens.max(1),
            },
            tokenizer,
            config,
            api_key: o.api_key.as_deref().map(Arc::from),
            metrics_auth: o.metrics_auth,
            api_tls: o.api_tls.clone(),
            metrics: o.metrics.clone(),
            expert_load,
            backend,
            draining: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Whether this router can serve requests now, and why not: its scheduler runs, its
    /// routed experts have a placement that covers them all, and it is not shutting down.
    pub fn ready(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining: the router is shutting down".into());
        }
        if !self.scheduler.is_running() {
            return Err("the scheduler has stopped".into());
        }
        self.backend.ready()
    }

    /// What an operator should know while the router still serves, if anything.
    pub fn warning(&self) -> Option<String> {
        self.backend.warning()
    }

    /// Starts shutting down: from now on health says NOT_SERVING.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The expert-load window as JSON-ready data; `reset` starts a new window.
    pub fn expert_load(&self, reset: bool) -> Result<LoadSnapshot, RouterError> {
        let load = self.expert_load.as_ref().ok_or_else(|| {
            RouterError::invalid("expert_load", "this router does not count expert load")
        })?;
        Ok(load.snapshot(reset))
    }

    /// The Prometheus text of every router metric, the expert-load imbalance gauges refreshed.
    pub fn render_metrics(&self) -> String {
        if let Some(load) = &self.expert_load {
            for l in load.snapshot(false).layers {
                for (over, value) in [
                    ("expert", l.expert_imbalance),
                    ("worker", l.worker_imbalance),
                ] {
                    if let Some(v) = value {
                        self.metrics
                            .imbalance
                            .get_or_create(&ImbalanceLabel {
                                layer: l.layer as u32,
                                over,
                            })
                            .set(v);
                    }
                }
            }
        }
        self.metrics.render()
    }

    /// Validates and queues one request.
    pub fn submit(&self, raw: RawRequest) -> Result<RequestStream, RouterError> {
        let valid = self
            .validate(raw)
            .inspect_err(|_| self.metrics.outcome("invalid"))?;
        self.scheduler.submit(valid)
    }

    pub fn validate(&self, raw: RawRequest) -> Result<ValidRequest, RouterError> {
        request::validate(raw, &self.limits, self.tokenizer.as_deref())
    }

    /// Checks an `authorization: Bearer KEY` (or `x-api-key: KEY`) header value.
    pub fn authorized(&self, authorization: Option<&str>, x_api_key: Option<&str>) -> bool {
        self.api_key
            .as_deref()
            .is_none_or(|key| key_matches(key, authorization, x_api_key))
    }

    pub fn model_info(&self) -> ModelInfoResponse {
        let c = &self.config;
        let moe = c.moe.as_ref();
        let sc = self.scheduler.config();
        ModelInfoResponse {
            model: self.limits.model_name.clone(),
            model_type: c.arch.model_type().into(),
            vocab_size: c.vocab_size as u32,
            max_context: self.limits.max_context as u32,
            num_layers: c.num_hidden_layers as u32,
            num_routed_experts: moe.map_or(0, |m| m.n_routed_experts as u32),
            experts_per_token: moe.map_or(0, |m| m.num_experts_per_tok as u32),
            eos_token_ids: c.eos_token_ids.clone(),
            has_tokenizer: self.tokenizer.is_some(),
            has_chat_template: self
                .tokenizer
                .as_ref()
                .is_some_and(|t| t.has_chat_template()),
            kv_cache_blocks: sc.kv_blocks as u32,
            kv_block_size: sc.block_size as u32,
            max_batch_size: sc.max_batch_size as u32,
        }
    }

    /// The ids of `text` (the request's `field`), within the prompt size limit.
    pub fn tokenize(
        &self,
        field: &str,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, RouterError> {
        let t = self.tokenizer.as_ref().ok_or_else(|| {
            RouterError::invalid(field, "needs a tokenizer, and this model has none")
        })?;
        if text.len() > request::MAX_PROMPT_BYTES {
            return Err(RouterError::invalid(
                field,
                format!(
                    "must be <= {} bytes, got {}",
                    request::MAX_PROMPT_BYTES,
                    text.len()
                ),
            ));
        }
        t.encode(text, add_special_tokens)
            .map_err(|e| RouterError::invalid(field, e.to_string()))
    }

    /// A token's text for clients (empty without a tokenizer).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .as_ref()
            .map(|t| t.token_text(id))
            .unwrap_or_default()
    }

    /// A token's own bytes (empty without a tokenizer), which may be part of a character.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.tokenizer
            .as_ref()
            .map(|t| t.token_bytes(id).to_vec())
            .unwrap_or_default()
    }

    fn wire_logprobs(&self, lp: &TokenLogprobs) -> Vec<TokenLogprob> {
        lp.top
            .iter()
            .map(|&(id, logprob)| TokenLogprob {
                id,
                text: self.token_text(id),
                logprob,
            })
            .collect()
    }
}

/// Whether an `authorization: Bearer KEY` or `x-api-key: KEY` header value carries `key`
/// (compared in constant time).
pub fn key_matches(key: &str, authorization: Option<&str>, x_api_key: Option<&str>) -> bool {
    let bearer = authorization.and_then(|v| v.strip_prefix("Bearer "));
    [bearer, x_api_key]
        .into_iter()
        .flatten()
        .any(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of H M S m u n).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A wire request as the API-independent [`RawRequest`].
fn raw_from_wire(req: GenerateRequest, header_timeout: Option<Duration>) -> RawRequest {
    let prompt = if req.prompt_ids.is_empty() && !req.prompt.is_empty() {
        Prompt::Text(req.prompt)
    } else {
        Prompt::Ids(req.prompt_ids)
    };
    let field_timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms.into()));
    let mut logit_bias: Vec<(u32, f32)> = req.logit_bias.into_iter().collect();
    logit_bias.sort_unstable_by_key(|&(id, _)| id);
    RawRequest {
        model: Some(req.model),
        max_tokens: (req.max_new_tokens > 0).then_some(req.max_new_tokens.into()),
        temperature: Some(req.temperature),
        top_k: Some(req.top_k.into()),
        top_p: req.top_p,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        seed: req.seed,
        stop: req.stop,
        stop_token_ids: req.stop_token_ids,
        ignore_eos: req.ignore_eos,
        logprobs: req.logprobs,
        logit_bias,
        timeout: match (field_timeout, header_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
        ..RawRequest::new(prompt)
    }
}

/// The gRPC inference service.
#[derive(Debug, Clone)]
pub struct InferenceApi {
    state: ServingState,
}

impl InferenceApi {
    pub fn new(state: ServingState) -> Self {
        InferenceApi { state }
    }

    fn submit(&self, request: Request<GenerateRequest>) -> Result<RequestStream, RouterError> {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        self.state
            .submit(raw_from_wire(request.into_inner(), timeout))
    }

    fn token(&self, id: u32, text: String, logprobs: Option<&TokenLogprobs>) -> GeneratedToken {
        GeneratedToken {
            id,
            text,
            logprob: logprobs.map(|l| l.logprob),
            top_logprobs: logprobs.map_or_else(Vec::new, |l| self.state.wire_logprobs(l)),
        }
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    type GenerateStream = GenerateStream;

    #[instrument(skip_all)]
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let mut stream = self.submit(request)?;
        let api = self.clone();
        // Dropping this stream (the client went away) drops the receiver, which cancels the
        // request at the next step.
        let out = async_stream::stream! {
            while let Some(event) = stream.events.recv().await {
                match event {
                    Event::Token { id, text, logprobs } => {
                        yield Ok(GenerateStreamResponse {
                            token: Some(api.token(id, text, logprobs.as_ref())),
                            ..Default::default()
                        });
                    }
                    Event::Finished { text, reason, prompt_tokens, completion_tokens } => {
                        yield Ok(GenerateStreamResponse {
                            token: None,
                            finish_reason: reason.as_str().into(),
                            usage: Some(Usage {
                                prompt_tokens: prompt_tokens as u32,
                                completion_tokens: completion_tokens as u32,
                            }),
                            text,
                        });
                        break;
                    }
                    Event::Failed(e) => {
                        yield Err(Status::new(e.code(), e.to_string()));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(out)))
    }

    #[instrument(skip_all)]
    async fn generate_unary(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let mut stream = self.submit(request)?;
        let mut reply = GenerateResponse {
            prompt_tokens: stream.prompt_tokens as u32,
            ..Default::default()
        };
        while let Some(event) = stream.events.recv().await {
            match event {
                Event::Token { id, text, logprobs } => {
                    reply.token_ids.push(id);
                    reply.text.push_str(&text);
                    reply.tokens.push(self.token(id, text, logprobs.as_ref()));
                }
                Event::Finished {
                    text,
                    reason,
                    completion_tokens,
                    ..
                } => {
                    reply.text.push_str(&text);
                    reply.finish_reason = reason.as_str().into();
                    reply.completion_tokens = completion_tokens as u32;
                    return Ok(Response::new(reply));
                }
                Event::Failed(e) => return Err(Status::new(e.code(), e.to_string())),
            }
        }
        Err(RouterError::ShuttingDown.into())
    }

    #[instrument(skip_all)]
    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let req = request.into_inner();
        if !req.model.is_empty() && req.model != self.state.limits.model_name {
            return Err(RouterError::UnknownModel {
                given: req.model,
                served: self.state.limits.model_name.clone(),
            }
            .into());
        }
        let ids = self
            .state
            .tokenize("text", &req.text, req.add_special_tokens)?;
        Ok(Response::new(TokenizeResponse {
            count: ids.len() as u32,
            tokens: ids.iter().map(|&id| self.state.token_text(id)).collect(),
            ids,
        }))
    }

    #[instrument(skip_all)]
    async fn model_info(
        &self,
        _request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new(self.state.model_info()))
    }

    #[instrument(skip_all)]
    async fn expert_load(
        &self,
        request: Request<ExpertLoadRequest>,
    ) -> Result<Response<ExpertLoadResponse>, Status> {
        let snapshot = self.state.expert_load(request.get_ref().reset)?;
        let json = serde_json::to_string(&snapshot)
            .map_err(|e| Status::internal(format!("serialising the expert load: {e}")))?;
        Ok(Response::new(ExpertLoadResponse { json }))
    }
}

/// The service name health reports on.
pub const SERVICE: &str = "switchyard.v1.InferenceService";

/// Serves the gRPC API on `listener` (TCP_NODELAY) until `shutdown` resolves. Health follows
/// [`ServingState::ready`]; when `shutdown` resolves the router turns NOT_SERVING first, then
/// stops taking new calls and finishes the ones in flight.
pub async fn serve(
    state: ServingState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RouterError> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (health, health_service) = Health::new(SERVICE).await;
    health.set(state.ready()).await;
    let checked = state.clone();
    let monitor = health.watch(Duration::from_millis(250), move || checked.ready());
    let draining = state.clone();
    let shutdown = async move {
        shutdown.await;
        draining.start_draining();
        health.drain().await;
        health.close().await;
    };
    let auth = state.clone();
    let tls = state.api_tls.clone();
    let api = InferenceServiceServer::with_interceptor(
        InferenceApi::new(state),
        move |req: Request<()>| {
            let header = |name: &str| req.metadata().get(name).and_then(|v| v.to_str().ok());
            if auth.authorized(header("authorization"), header("x-api-key")) {
                Ok(req)
            } else {
                Err(RouterError::Unauthenticated.into())
            }
        },
    );
    let mut server = match &tls {
        Some(t) => tonic::transport::Server::builder()
            .tls_config(t.grpc())
            .map_err(|e| RouterError::Runtime(format!("TLS for the gRPC API: {e}")))?,
        None => tonic::transport::Server::builder(),
    };
    let result = server
        .add_service(health_service)
        .add_optional_service(switchyard_proto::reflection::v1())
        .add_optional_service(switchyard_proto::reflection::v1alpha())
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| RouterError::Runtime(format!("serving failed: {e}")));
    monitor.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_units() {
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("5x"), None);
        assert_eq!(grpc_timeout(""), None);
    }
}
