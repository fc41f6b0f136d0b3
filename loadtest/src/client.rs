//! The two ways to reach a router: its gRPC API (streaming `Generate`) or its OpenAI-compatible
//! HTTP API (streamed `/v1/completions`). Both time every token as it arrives.

use std::time::{Duration, Instant};

use switchyard_proto::v1::inference_service_client::InferenceServiceClient;
use switchyard_proto::v1::{ExpertLoadRequest, GenerateRequest, ModelInfoRequest};
use tonic::transport::Channel;

use crate::LoadtestError;
use crate::stats::LoadSnapshot;
use crate::workload::{PromptSpec, WorkItem};

/// What one request did.
#[derive(Clone, Debug, Default)]
pub struct RequestRecord {
    /// Seconds from the start of the measured run to the send.
    pub started_s: f64,
    /// `None` on success; else the error kind (`UNAVAILABLE`, `http 429`, …).
    pub error: Option<String>,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub ttft_ms: Option<f64>,
    /// Gaps between consecutive tokens.
    pub itl_ms: Vec<f64>,
    pub e2e_ms: f64,
}

/// Sampling settings every request carries.
#[derive(Clone, Debug)]
pub struct RequestSettings {
    pub temperature: f32,
    pub ignore_eos: bool,
    pub timeout: Duration,
    pub api_key: Option<String>,
}

#[derive(Clone, Debug)]
pub enum Target {
    Grpc(InferenceServiceClient<Channel>),
    Http {
        client: reqwest::Client,
        base: String,
    },
}

fn url_of(addr: &str) -> String {
    if addr.contains("://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    }
}

impl Target {
    pub async fn grpc(addr: &str) -> Result<Target, LoadtestError> {
        let url = url_of(addr);
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| LoadtestError::Input(format!("router address {addr:?}: {e}")))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| LoadtestError::Connect(format!("{url}: {e}")))?;
        Ok(Target::Grpc(
            InferenceServiceClient::new(channel).max_decoding_message_size(64 << 20),
        ))
    }

    pub fn http(addr: &str) -> Result<Target, LoadtestError> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| LoadtestError::Connect(e.to_string()))?;
        Ok(Target::Http {
            client,
            base: url_of(addr),
        })
    }

    fn grpc_request<T>(msg: T, s: &RequestSettings) -> Result<tonic::Request<T>, LoadtestError> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(s.timeout);
        if let Some(key) = &s.api_key {
            let v = format!("Bearer {key}")
                .parse()
                .map_err(|_| LoadtestError::Input("the API key is not a valid header".into()))?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }

    fn http_get(&self, path: &str, s: &RequestSettings) -> Option<reqwest::RequestBuilder> {
        match self {
            Target::Http { client, base } => {
                let r = client.get(format!("{base}{path}")).timeout(s.timeout);
                Some(match &s.api_key {
                    Some(k) => r.bearer_auth(k),
                    None => r,
                })
            }
            Target::Grpc(_) => None,
        }
    }

    /// The model's vocabulary size (for random prompts) and name.
    pub async fn model_info(&self, s: &RequestSettings) -> Result<(u32, String), LoadtestError> {
        match self {
            Target::Grpc(c) => {
                let info = c
                    .clone()
                    .model_info(Self::grpc_request(ModelInfoRequest {}, s)?)
                    .await
                    .map_err(|e| LoadtestError::Connect(format!("ModelInfo: {}", e.message())))?
                    .into_inner();
                Ok((info.vocab_size, info.model))
            }
            Target::Http { .. } => {
                let r = self
                    .http_get("/v1/models", s)
                    .ok_or_else(|| LoadtestError::Connect("no HTTP client".into()))?
                    .send()
                    .await
                    .map_err(|e| LoadtestError::Connect(format!("/v1/models: {e}")))?;
                if !r.status().is_success() {
                    return Err(LoadtestError::Connect(format!(
                        "/v1/models returned {}",
                        r.status()
                    )));
                }
                let j: serde_json::Value = r
                    .json()
                    .await
                    .map_err(|e| LoadtestError::Connect(format!("/v1/models: {e}")))?;
                let name = j["data"][0]["id"].as_str().unwrap_or_default().to_string();
                // Switchyard lists the vocabulary with the model; other servers may not.
                let vocab = j["data"][0]["vocab_size"].as_u64().ok_or_else(|| {
                    LoadtestError::Input(
                        "/v1/models does not report vocab_size, so random prompt ids cannot be \
                         drawn: give --dataset"
                            .into(),
                    )
                })?;
                Ok((vocab as u32, name))
            }
        }
    }

    /// The router's expert-load window; `reset` starts a new one.
    pub async fn expert_load(
        &self,
        reset: bool,
        s: &RequestSettings,
    ) -> Result<LoadSnapshot, LoadtestError> {
        let json = match self {
            Target::Grpc(c) => {
                c.clone()
                    .expert_load(Self::grpc_request(ExpertLoadRequest { reset }, s)?)
                    .await
                    .map_err(|e| LoadtestError::Connect(format!("ExpertLoad: {}", e.message())))?
                    .into_inner()
                    .json
            }
            Target::Http { .. } => {
                let path = format!("/v1/expert_load?reset={reset}");
                let r = self
                    .http_get(&path, s)
                    .ok_or_else(|| LoadtestError::Connect("no HTTP client".into()))?
                    .send()
                    .await
                    .map_err(|e| LoadtestError::Connect(format!("{path}: {e}")))?;
                if !r.status().is_success() {
                    return Err(LoadtestError::Connect(format!(
                        "{path} returned {}",
                        r.status()
                    )));
                }
                r.text()
                    .await
                    .map_err(|e| LoadtestError::Connect(format!("{path}: {e}")))?
            }
        };
        serde_json::from_str(&json)
            .map_err(|e| LoadtestError::Connect(format!("expert load JSON: {e}")))
    }

    /// Sends one request and times its tokens.
    pub async fn send(
        &self,
        item: &WorkItem,
        s: &RequestSettings,
        started_s: f64,
    ) -> RequestRecord {
        let start = Instant::now();
        let mut rec = RequestRecord {
            started_s,
            ..Default::default()
        };
        let result = match self {
            Target::Grpc(c) => self.send_grpc(c.clone(), item, s, start, &mut rec).await,
            Target::Http { client, base } => {
                Self::send_http(client, base, item, s, start, &mut rec).await
            }
        };
        rec.e2e_ms = start.elapsed().as_secs_f64() * 1e3;
        if let Err(kind) = result {
            rec.error = Some(kind);
        }
        rec
    }

    fn token_at(rec: &mut RequestRecord, start: Instant, last: &mut Option<Instant>) {
        let now = Instant::now();
        match last {
            None => rec.ttft_ms = Some(now.duration_since(start).as_secs_f64() * 1e3),
            Some(prev) => rec
                .itl_ms
                .push(now.duration_since(*prev).as_secs_f64() * 1e3),
        }
        *last = Some(now);
        rec.output_tokens += 1;
    }

    async fn send_grpc(
        &self,
        mut c: InferenceServiceClient<Channel>,
        item: &WorkItem,
        s: &RequestSettings,
        start: Instant,
        rec: &mut RequestRecord,
    ) -> Result<(), String> {
        let (prompt_ids, prompt) = match &item.prompt {
            PromptSpec::Ids(ids) => (ids.clone(), String::new()),
            PromptSpec::Text(t) => (Vec::new(), t.clone()),
        };
        let msg = GenerateRequest {
            prompt_ids,
            prompt,
            max_new_tokens: item.max_tokens,
            temperature: s.temperature,
            seed: Some(started_s_seed(rec.started_s)),
            ignore_eos: s.ignore_eos,
            ..Default::default()
        };
        let req = Self::grpc_request(msg, s).map_err(|e| e.to_string())?;
        let code = |e: tonic::Status| format!("{:?}", e.code());
        let mut stream = c.generate(req).await.map_err(code)?.into_inner();
        let mut last = None;
        while let Some(m) = stream.message().await.map_err(code)? {
            if m.token.is_some() {
                Self::token_at(rec, start, &mut last);
            }
            if let Some(u) = m.usage {
                rec.prompt_tokens = u.prompt_tokens;
            }
        }
        Ok(())
    }

    async fn send_http(
        client: &reqwest::Client,
        base: &str,
        item: &WorkItem,
        s: &RequestSettings,
        start: Instant,
        rec: &mut RequestRecord,
    ) -> Result<(), String> {
        let prompt = match &item.prompt {
            PromptSpec::Ids(ids) => serde_json::json!(ids),
            PromptSpec::Text(t) => serde_json::json!(t),
        };
        // logprobs: 0 makes every token its own event, so inter-token gaps are per token.
        let body = serde_json::json!({
            "prompt": prompt,
            "max_tokens": item.max_tokens,
            "temperature": s.temperature,
            "ignore_eos": s.ignore_eos,
            "stream": true,
            "stream_options": {"include_usage": true},
            "logprobs": 0,
        });
        let mut r = client
            .post(format!("{base}/v1/completions"))
            .timeout(s.timeout)
            .json(&body);
        if let Some(k) = &s.api_key {
            r = r.bearer_auth(k);
        }
        let mut resp = r.send().await.map_err(|e| {
            if e.is_timeout() {
                "timeout".to_string()
            } else {
                "connect".to_string()
            }
        })?;
        if !resp.status().is_success() {
            return Err(format!("http {}", resp.status().as_u16()));
        }
        let mut buf = String::new();
        let mut last = None;
        loop {
            let chunk = resp.chunk().await.map_err(|_| "stream".to_string())?;
            let Some(chunk) = chunk else {
                return Err("stream ended before [DONE]".into());
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                for line in event.lines() {
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    if data == "[DONE]" {
                        return Ok(());
                    }
                    let v: serde_json::Value =
                        serde_json::from_str(data).map_err(|_| "bad event".to_string())?;
                    if let Some(e) = v.get("error") {
                        return Err(e["type"].as_str().unwrap_or("error").to_string());
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        rec.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as u32;
                        let n = u["completion_tokens"].as_u64().unwrap_or(0) as u32;
                        // Tokens that carried no event still count.
                        rec.output_tokens = rec.output_tokens.max(n);
                    }
                    let tokens = v["choices"][0]["logprobs"]["tokens"]
                        .as_array()
                        .map_or(0, Vec::len);
                    for _ in 0..tokens {
                        Self::token_at(rec, start, &mut last);
                    }
                }
            }
        }
    }
}

/// A per-request seed from its start time, so sampled runs vary but stay reproducible per run.
fn started_s_seed(started_s: f64) -> u64 {
    (started_s * 1e6) as u64
}
