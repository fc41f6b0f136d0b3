//! The OpenAI-compatible HTTP API (axum): `/v1/completions`, `/v1/chat/completions` (both
//! with `stream: true` as server-sent events), `/v1/models` and `/v1/models/{id}`, vLLM's
//! `/tokenize`, `/detokenize` and `/version`, `/health`, `/metrics`, `/v1/expert_load`. Every
//! other path or method gets an OpenAI-shaped JSON error.
//!
//! Requests become [`crate::request::RawRequest`]s and go through the same validation and
//! scheduler as gRPC. A client that closes its connection drops the response stream, which
//! cancels its sequence at the next step.

pub mod openai;

use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use switchyard_engine::sampling::TokenLogprobs;
use tokio::net::TcpListener;
use tracing::instrument;

use crate::error::RouterError;
use crate::scheduler::{Event, RequestStream};
use crate::server::ServingState;
use openai::{
    ChatRequest, CompletionRequest, DetokenizeRequest, ErrorBody, TokenizeRequest, UsageOut,
};

/// Request bodies larger than this are refused (413).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// An error as OpenAI shapes it, with the status from the shared error table.
/// Shared, because one failed step fails several requests with the same error.
struct ApiError(Arc<RouterError>);

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        ApiError(Arc::new(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(ErrorBody::from_error(&self.0))).into_response();
        if let RouterError::Overloaded { retry_after_s, .. } = *self.0 {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The HTTP routes over `state`.
pub fn router(state: ServingState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/version", get(version))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/expert_load", get(expert_load))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the HTTP API on `listener` until `shutdown` resolves; from then on `/health` says
/// 503 while the requests in flight finish.
pub async fn serve(
    state: ServingState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let draining = state.clone();
    let shutdown = async move {
        shutdown.await;
        draining.start_draining();
    };
    let failed = |e: std::io::Error| RouterError::Runtime(format!("http serving failed: {e}"));
    match state.api_tls.clone() {
        Some(tls) => {
            let listener = tls.listener(listener).map_err(failed)?;
            axum::serve(listener, router(state))
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(failed)
        }
        None => axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(failed),
    }
}

fn authorize(state: &ServingState, headers: &HeaderMap) -> Result<(), ApiError> {
    let h = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if state.authorized(h(header::AUTHORIZATION), x_api_key) {
        Ok(())
    } else {
        Err(RouterError::Unauthenticated.into())
    }
}

/// A request body, read up to [`MAX_BODY_BYTES`]; a longer one is refused with the JSON error
/// every other refusal has (axum's own rejection is plain text).
struct Body(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(RouterError::BodyTooLarge {
                    limit: MAX_BODY_BYTES,
                }
                .into())
            }
            Err(e) => Err(RouterError::invalid("body", e.body_text()).into()),
        }
    }
}

/// Parses a JSON body, naming the field that is wrong.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, RouterError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path != "." {
            return RouterError::invalid(path, e.into_inner().to_string());
        }
        // A `#[serde(flatten)]`ed struct is deserialized from a buffer, which hides the path of
        // its fields: parse the flattened sampling fields alone to find which one is wrong.
        let de = &mut serde_json::Deserializer::from_slice(body);
        match serde_path_to_error::deserialize::<_, openai::SamplingFields>(de) {
            Err(inner) if inner.path().to_string() != "." => {
                RouterError::invalid(inner.path().to_string(), inner.into_inner().to_string())
            }
            _ => RouterError::invalid("body", e.into_inner().to_string()),
        }
    })
}

/// What `/v1/completions` makes of a body before the scheduler sees it (the fuzz targets'
/// entry point too): the request, or the error naming the field.
pub fn parse_completion(body: &[u8]) -> Result<crate::request::RawRequest, RouterError> {
    parse::<CompletionRequest>(body)?.into_raw()
}

/// [`parse_completion`] for `/v1/chat/completions`.
pub fn parse_chat(body: &[u8]) -> Result<crate::request::RawRequest, RouterError> {
    parse::<ChatRequest>(body)?.into_raw()
}

/// 200 while the router can serve (scheduler running, every routed expert placed, not
/// shutting down); 503 with the reason otherwise — what readiness probes and load balancers
/// act on.
async fn health(State(state): State<ServingState>) -> impl IntoResponse {
    let s = state.scheduler.stats();
    let ready = state.ready();
    let body = json!({
        "status": if ready.is_ok() { "ok" } else { "unavailable" },
        "reason": ready.as_ref().err(),
        "warning": state.warning(),
        "model": state.limits.model_name,
        "waiting": s.waiting.load(Ordering::Relaxed),
        "running": s.running.load(Ordering::Relaxed),
    });
    let code = if ready.is_ok() {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

/// Every router metric as Prometheus text.
async fn metrics(
    State(state): State<ServingState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if state.metrics_auth {
        authorize(&state, &headers)?;
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.render_metrics(),
    ))
}

#[derive(Debug, serde::Deserialize)]
struct LoadQuery {
    #[serde(default)]
    reset: bool,
}

/// Tokens per (layer, expert) and per worker over the window; `?reset=true` starts a new one.
async fn expert_load(
    State(state): State<ServingState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<LoadQuery>,
) -> Result<axum::Json<crate::expert_load::LoadSnapshot>, ApiError> {
    authorize(&state, &headers)?;
    Ok(axum::Json(state.expert_load(q.reset)?))
}

/// The served model as `/v1/models` lists it.
fn model_card(state: &ServingState) -> Value {
    json!({
        "id": state.limits.model_name,
        "object": "model",
        "created": unix_now(),
        "owned_by": "switchyard",
        "max_model_len": state.limits.max_context,
        "vocab_size": state.limits.vocab_size,
    })
}

async fn models(
    State(state): State<ServingState>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": [model_card(&state)],
    })))
}

async fn model(
    State(state): State<ServingState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    check_model(&state, Some(id.as_str()))?;
    Ok(axum::Json(model_card(&state)))
}

/// `model`, when given and not empty, must be the served one.
fn check_model(state: &ServingState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !m.is_empty() && m != state.limits.model_name => {
            Err(RouterError::UnknownModel {
                given: m.to_owned(),
                served: state.limits.model_name.clone(),
            }
            .into())
        }
        _ => Ok(()),
    }
}

fn need_tokenizer<'s>(
    state: &'s ServingState,
    field: &str,
) -> Result<&'s switchyard_engine::tokenizer::TextTokenizer, ApiError> {
    state.tokenizer.as_deref().ok_or_else(|| {
        RouterError::invalid(
            field,
            "needs a tokenizer, and this model has none (no tokenizer.json)",
        )
        .into()
    })
}

/// vLLM's `/tokenize`: the ids of a prompt, or of chat messages rendered as
/// `/v1/chat/completions` renders them.
#[instrument(skip_all)]
async fn tokenize(
    State(state): State<ServingState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let req: TokenizeRequest = parse(&body)?;
    check_model(&state, req.model.as_deref())?;
    let invalid = |field: &str, e: switchyard_engine::EngineError| {
        ApiError::from(RouterError::invalid(field, e.to_string()))
    };
    let tokens = match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            state.tokenize("prompt", &prompt, req.add_special_tokens.unwrap_or(true))?
        }
        (None, Some(messages)) => {
            let t = need_tokenizer(&state, "messages")?;
            let text = t
                .apply_chat_template(
                    &openai::messages_of(messages)?,
                    req.add_generation_prompt.unwrap_or(true),
                )
                .map_err(|e| invalid("messages", e))?;
            t.encode(&text, req.add_special_tokens.unwrap_or(false))
                .map_err(|e| invalid("messages", e))?
        }
        (Some(_), Some(_)) | (None, None) => {
            return Err(
                RouterError::invalid("prompt", "give `prompt` or `messages`, one of them").into(),
            );
        }
    };
    let mut out = json!({
        "count": tokens.len(),
        "max_model_len": state.limits.max_context,
        "tokens": tokens,
    });
    if req.return_token_strs {
        out["token_strs"] = tokens.iter().map(|&t| state.token_text(t)).collect();
    }
    Ok(axum::Json(out))
}

/// vLLM's `/detokenize`: the text of token ids.
#[instrument(skip_all)]
async fn detokenize(
    State(state): State<ServingState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let req: DetokenizeRequest = parse(&body)?;
    check_model(&state, req.model.as_deref())?;
    if let Some(&bad) = req
        .tokens
        .iter()
        .find(|&&t| t as usize >= state.limits.vocab_size)
    {
        return Err(RouterError::invalid(
            "tokens",
            format!(
                "token ids must be < vocab_size ({}), got {bad}",
                state.limits.vocab_size
            ),
        )
        .into());
    }
    let text = need_tokenizer(&state, "tokens")?
        .decode(&req.tokens)
        .map_err(|e| ApiError::from(RouterError::invalid("tokens", e.to_string())))?;
    Ok(axum::Json(json!({ "prompt": text })))
}

async fn version() -> axum::Json<Value> {
    axum::Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

/// What the 404 body lists.
const SERVED: &str = "/v1/completions, /v1/chat/completions, /v1/models, /v1/models/{id}, \
     /tokenize, /detokenize, /version, /health, /metrics, /v1/expert_load";

async fn no_route(method: Method, uri: Uri) -> ApiError {
    RouterError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
        served: SERVED,
    }
    .into()
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    RouterError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .into()
}

/// One request's id and creation time, as both response kinds carry them.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    /// A response's id, creation time and model; logs the request with its sequence number
    /// and the client's `user`.
    fn new(prefix: &str, stream: &RequestStream, state: &ServingState, user: Option<&str>) -> Meta {
        let meta = Meta {
            id: response_id(prefix),
            created: unix_now(),
            model: state.limits.model_name.clone(),
        };
        tracing::info!(
            id = %meta.id,
            sequence = stream.id,
            user = user.unwrap_or(""),
            prompt_tokens = stream.prompt_tokens,
            "request accepted"
        );
        meta
    }
}

/// `PREFIX-` and 32 random hex digits, as OpenAI and vLLM shape response ids, so ids from
/// several routers or restarts do not collide.
fn response_id(prefix: &str) -> String {
    static RNG: OnceLock<Mutex<StdRng>> = OnceLock::new();
    let rng = RNG.get_or_init(|| {
        // RandomState's keys come from the OS's random source.
        Mutex::new(StdRng::seed_from_u64(
            RandomState::new().hash_one(SystemTime::now()),
        ))
    });
    let v: u128 = rng.lock().unwrap_or_else(|e| e.into_inner()).random();
    format!("{prefix}-{v:032x}")
}

/// Everything a finished request produced.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<(u32, Option<TokenLogprobs>)>,
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn collect(mut stream: RequestStream) -> Result<Collected, ApiError> {
    let mut out = Collected::default();
    while let Some(event) = stream.events.recv().await {
        match event {
            Event::Token { id, text, logprobs } => {
                out.text.push_str(&text);
                out.tokens.push((id, logprobs));
            }
            Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                out.text.push_str(&text);
                out.finish_reason = reason.as_str();
                out.prompt_tokens = prompt_tokens;
                out.completion_tokens = completion_tokens;
                return Ok(out);
            }
            Event::Failed(e) => {
                return Err(ApiError(e));
            }
        }
    }
    Err(RouterError::ShuttingDown.into())
}

/// Completions-style logprobs of some tokens.
fn completion_logprobs(state: &ServingState, tokens: &[(u32, Option<TokenLogprobs>)]) -> Value {
    let mut texts = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    for (id, lp) in tokens {
        texts.push(state.token_text(*id));
        lps.push(lp.as_ref().map(|l| l.logprob));
        tops.push(lp.as_ref().map(|l| {
            l.top
                .iter()
                .map(|&(t, p)| (state.token_text(t), json!(p)))
                .collect::<serde_json::Map<String, Value>>()
        }));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops})
}

/// Chat-style logprobs of some tokens.
fn chat_logprobs(state: &ServingState, tokens: &[(u32, Option<TokenLogprobs>)]) -> Value {
    let entry = |id: u32, logprob: f32| json!({"token": state.token_text(id), "logprob": logprob, "bytes": state.token_bytes(id)});
    let content: Vec<Value> = tokens
        .iter()
        .filter_map(|(id, lp)| {
            let lp = lp.as_ref()?;
            let mut e = entry(*id, lp.logprob);
            e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(t, p)| entry(t, p)).collect());
            Some(e)
        })
        .collect();
    json!({"content": content})
}

#[instrument(skip_all)]
async fn completions(
    State(state): State<ServingState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let req: CompletionRequest = parse(&body)?;
    let streaming = req.stream;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let wants_logprobs = req.logprobs.is_some();
    let user = req.user.clone();
    let stream = state.submit(req.into_raw()?)?;
    let meta = Meta::new("cmpl", &stream, &state, user.as_deref());
    if !streaming {
        let out = collect(stream).await?;
        let logprobs = wants_logprobs.then(|| completion_logprobs(&state, &out.tokens));
        return Ok(axum::Json(json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "text": out.text,
                "logprobs": logprobs,
                "finish_reason": out.finish_reason,
            }],
            "usage": UsageOut::new(out.prompt_tokens, out.completion_tokens),
        }))
        .into_response());
    }
    let chunk = move |text: String, logprobs: Value, finish: Value, usage: Value| {
        let mut c = json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        });
        if !usage.is_null() {
            c["usage"] = usage;
        }
        c
    };
    let events = sse_events(
        stream,
        state,
        include_usage,
        move |state, part| match part {
            Part::Token { id, text, logprobs } => {
                let lp = if wants_logprobs {
                    completion_logprobs(state, &[(id, logprobs)])
                } else {
                    Value::Null
                };
                Some(chunk(text, lp, Value::Null, Value::Null))
            }
            Part::Finish { text, reason } => {
                Some(chunk(text, Value::Null, json!(reason), Value::Null))
            }
            Part::Usage(u) => {
                let mut c = chunk(String::new(), Value::Null, Value::Null, json!(u));
                c["choices"] = json!([]);
                Some(c)
            }
            Part::Start => None,
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[instrument(skip_all)]
async fn chat_completions(
    State(state): State<ServingState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let req: ChatRequest = parse(&body)?;
    let streaming = req.stream;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let wants_logprobs = req.logprobs;
    let user = req.user.clone();
    let stream = state.submit(req.into_raw()?)?;
    let meta = Meta::new("chatcmpl", &stream, &state, user.as_deref());
    if !streaming {
        let out = collect(stream).await?;
        let logprobs = wants_logprobs.then(|| chat_logprobs(&state, &out.tokens));
        return Ok(axum::Json(json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": logprobs,
                "finish_reason": out.finish_reason,
            }],
            "usage": UsageOut::new(out.prompt_tokens, out.completion_tokens),
        }))
        .into_response());
    }
    let chunk = move |delta: Value, logprobs: Value, finish: Value| {
        json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        })
    };
    let events = sse_events(
        stream,
        state,
        include_usage,
        move |state, part| match part {
            Part::Start => Some(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                Value::Null,
            )),
            Part::Token { id, text, logprobs } => {
                let lp = if wants_logprobs {
                    chat_logprobs(state, &[(id, logprobs)])
                } else {
                    Value::Null
                };
                Some(chunk(json!({"content": text}), lp, Value::Null))
            }
            Part::Finish { text, reason } => {
                let delta = if text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                Some(chunk(delta, Value::Null, json!(reason)))
            }
            Part::Usage(u) => {
                let mut c = chunk(Value::Null, Value::Null, Value::Null);
                c["choices"] = json!([]);
                c["usage"] = json!(u);
                Some(c)
            }
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// What an SSE stream is built from.
enum Part {
    Start,
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    Finish {
        text: String,
        reason: &'static str,
    },
    Usage(UsageOut),
}

/// Turns a request's events into SSE data lines (`render` shapes each as JSON), ending with
/// `[DONE]`; a failure mid-stream becomes an OpenAI error object, then `[DONE]`.
fn sse_events(
    mut stream: RequestStream,
    state: ServingState,
    include_usage: bool,
    render: impl Fn(&ServingState, Part) -> Option<Value> + Send + 'static,
) -> impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>> + Send {
    async_stream::stream! {
        let data = |v: Value| SseEvent::default().data(v.to_string());
        if let Some(v) = render(&state, Part::Start) {
            yield Ok(data(v));
        }
        while let Some(event) = stream.events.recv().await {
            match event {
                Event::Token { id, text, logprobs } => {
                    // Tokens that add no visible text yet are sent when logprobs need them.
                    if text.is_empty() && logprobs.is_none() {
                        continue;
                    }
                    if let Some(v) = render(&state, Part::Token { id, text, logprobs }) {
                        yield Ok(data(v));
                    }
                }
                Event::Finished { text, reason, prompt_tokens, completion_tokens } => {
                    if let Some(v) = render(&state, Part::Finish { text, reason: reason.as_str() }) {
                        yield Ok(data(v));
                    }
                    if include_usage
                        && let Some(v) = render(&state, Part::Usage(UsageOut::new(prompt_tokens, completion_tokens)))
                    {
                        yield Ok(data(v));
                    }
                    break;
                }
                Event::Failed(e) => {
                    yield Ok(data(json!(ErrorBody::from_error(&e))));
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_step_error_keeps_its_status() {
        // One failed step hands the same error to every request in it.
        let shared = Arc::new(RouterError::DeadlineExceeded(250));
        let _other_request = shared.clone();
        let response = ApiError(shared).into_response();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let overloaded = ApiError::from(RouterError::Overloaded {
            waiting: 3,
            limit: 3,
            retry_after_s: 1,
        })
        .into_response();
        assert_eq!(overloaded.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(overloaded.headers()[header::RETRY_AFTER], "1");
    }
}
