//! `switchyard generate`: one generation, in this process (`--model`) or through a router's
//! gRPC API (`--router`), with the same flags either way.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use switchyard_engine::generate::{self, GenerateOptions, GenerateRequest, SamplingParams};
use switchyard_engine::model::{AttentionMode, CausalLm, LoadOptions};
use switchyard_engine::tokenizer::TextTokenizer;
use switchyard_proto::v1::{GenerateRequest as Wire, GenerateResponse};
use switchyard_router::experts::DispatchOptions;
use switchyard_router::node::{Experts, RouterNode};
use switchyard_router::request::{Prompt, RawRequest};
use switchyard_router::scheduler::Event;
use switchyard_router::server::ServingOptions;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["model", "router"])))]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt_ids", "prompt"])))]
pub struct GenerateArgs {
    /// Checkpoint directory (Hugging Face layout): generate in this process.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// A router's address (`host:port`): generate through the cluster instead.
    #[arg(long, env = "SWITCHYARD_ROUTER", conflicts_with_all = ["dump_logits"])]
    router: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `1,17,42`.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// Prompt as text (tokenized with the model's tokenizer, begin-of-sentence added).
    #[arg(long)]
    prompt: Option<String>,
    /// Print text as it is generated instead of all at the end.
    #[arg(long, conflicts_with_all = ["json", "dump_logits"])]
    stream: bool,
    /// The API key of a router started with --api-key.
    #[arg(long, env = "SWITCHYARD_API_KEY")]
    api_key: Option<String>,
    /// With --router: connect over TLS, trusting the CA certificate (PEM) in this file (a
    /// router started with --tls-cert).
    #[arg(long, env = "SWITCHYARD_TLS_CA", requires = "router")]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name to check the router's certificate for (default: the host of
    /// --router).
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object (`token_ids`, `text`, `finish_reason`, timings) instead of text.
    #[arg(long)]
    json: bool,
    /// Write the logits at every prompt position to this safetensors file (tensor `logits`, f32,
    /// `[prompt_len, vocab]`).
    #[arg(long)]
    dump_logits: Option<PathBuf>,
}

/// How tokens are picked.
#[derive(clap::Args, Debug)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Drop tokens less likely than min-p × the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Penalise tokens already in the prompt or output (transformers' rule; 1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Subtract this from the logits of tokens already generated (OpenAI's rule; 0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtract this × the count of each token already generated (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Sampling seed; the same seed gives the same tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Also stop at these token ids.
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    /// Stop when the text contains this string (repeatable); it is left out of the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Report each token's logprob and this many alternatives (JSON output).
    #[arg(long)]
    logprobs: Option<u32>,
    /// Add BIAS to token ID's logit before sampling, as OpenAI's logit_bias (comma-separated
    /// ID:BIAS pairs, BIAS in [-100, 100]; -100 bans the token).
    #[arg(long, value_delimiter = ',', value_parser = parse_bias, allow_hyphen_values = true)]
    logit_bias: Vec<(u32, f32)>,
}

/// `ID:BIAS`, as `--logit-bias` takes it.
fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s
        .split_once(':')
        .ok_or_else(|| format!("expected ID:BIAS (e.g. 46:-100), got {s:?}"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("the token id must be an integer >= 0, got {id:?}"))?;
    let bias = bias
        .trim()
        .parse()
        .map_err(|_| format!("the bias must be a number, got {bias:?}"))?;
    Ok((id, bias))
}

impl SamplingArgs {
    fn raw(&self, prompt: Prompt) -> RawRequest {
        RawRequest {
            max_tokens: Some(self.max_new_tokens as u64),
            temperature: Some(self.temperature),
            top_k: Some(self.top_k as i64),
            top_p: Some(self.top_p),
            min_p: Some(self.min_p),
            repetition_penalty: Some(self.repetition_penalty),
            presence_penalty: Some(self.presence_penalty),
            frequency_penalty: Some(self.frequency_penalty),
            seed: Some(self.seed),
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            logit_bias: self.logit_bias.clone(),
            ..RawRequest::new(prompt)
        }
    }

    fn wire(&self, prompt_ids: Vec<u32>, prompt: String) -> anyhow::Result<Wire> {
        Ok(Wire {
            prompt_ids,
            prompt,
            max_new_tokens: u32::try_from(self.max_new_tokens)
                .context("--max-new-tokens is too large")?,
            temperature: self.temperature,
            top_k: u32::try_from(self.top_k).context("--top-k is too large")?,
            top_p: Some(self.top_p),
            min_p: Some(self.min_p),
            repetition_penalty: Some(self.repetition_penalty),
            presence_penalty: Some(self.presence_penalty),
            frequency_penalty: Some(self.frequency_penalty),
            seed: Some(self.seed),
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.clone(),
            stop: self.stop.clone(),
            logprobs: self.logprobs,
            logit_bias: self.logit_bias.iter().copied().collect(),
            ..Default::default()
        })
    }
}

/// What a generation produced, however it ran.
#[derive(Default)]
struct Output {
    token_ids: Vec<u32>,
    text: String,
    logprobs: Vec<serde_json::Value>,
    finish_reason: String,
    prompt_tokens: usize,
}

impl Output {
    /// Records one token, printing its text at once with `--stream`. `logprob` is the token's
    /// and its alternatives `(id, logprob)`, when asked for.
    fn token(
        &mut self,
        id: u32,
        text: &str,
        logprob: Option<(f32, Vec<(u32, f32)>)>,
        stream: bool,
    ) {
        if stream {
            show(text);
        }
        self.token_ids.push(id);
        self.text.push_str(text);
        if let Some((lp, top)) = logprob {
            self.logprobs
                .push(serde_json::json!({"id": id, "logprob": lp, "top": top}));
        }
    }
}

/// Prints pieces of text as they come (`--stream`).
fn show(piece: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(piece.as_bytes());
    let _ = out.flush();
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let Some(model_dir) = &args.model else {
        return run_remote(&args);
    };
    let load_start = Instant::now();
    let model = CausalLm::load(model_dir, &LoadOptions::default())
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let tokenizer = TextTokenizer::from_dir(model_dir)
        .with_context(|| format!("loading the tokenizer of {}", model_dir.display()))?
        .map(Arc::new);
    let load_s = load_start.elapsed().as_secs_f64();
    if args.dump_logits.is_some() {
        return run_dump(&args, &model, tokenizer.as_deref(), load_s);
    }
    let prompt = match &args.prompt {
        Some(text) => Prompt::Text(text.clone()),
        None => Prompt::Ids(args.prompt_ids.clone()),
    };
    let options = ServingOptions {
        model_name: String::new(),
        metrics_auth: false,
        api_tls: None,
        api_key: None,
        kv_cache_bytes: 64 << 30,
        block_size: 16,
        max_batch_size: 1,
        max_batch_tokens: 4096,
        max_waiting: 1,
        step_retry: switchyard_router::server::DEFAULT_STEP_RETRY,
        default_max_tokens: args.sampling.max_new_tokens.max(1),
        max_model_len: None,
        metrics: switchyard_router::metrics::RouterMetrics::new(),
    };
    let node = RouterNode::start(
        model,
        tokenizer,
        Experts::InProcess,
        DispatchOptions::default(),
        &options,
    )?;
    let state = node.state();
    let start = Instant::now();
    let mut stream = state.submit(args.sampling.raw(prompt))?;
    let mut out = Output {
        prompt_tokens: stream.prompt_tokens,
        ..Default::default()
    };
    while let Some(event) = stream.events.blocking_recv() {
        match event {
            Event::Token { id, text, logprobs } => {
                out.token(id, &text, logprobs.map(|l| (l.logprob, l.top)), args.stream);
            }
            Event::Finished { text, reason, .. } => {
                if args.stream {
                    show(&text);
                }
                out.text.push_str(&text);
                out.finish_reason = reason.as_str().into();
                break;
            }
            Event::Failed(e) => bail!("{e}"),
        }
    }
    report(&args, &out, Some(load_s), start.elapsed().as_secs_f64(), "");
    Ok(())
}

/// `--dump-logits`: the engine's batch generation, which keeps every prompt position's logits.
fn run_dump(
    args: &GenerateArgs,
    model: &CausalLm,
    tokenizer: Option<&TextTokenizer>,
    load_s: f64,
) -> anyhow::Result<()> {
    let prompt = match (&args.prompt, tokenizer) {
        (Some(text), Some(t)) => t.encode(text, true)?,
        (Some(_), None) => bail!("--prompt needs the model's tokenizer.json; use --prompt-ids"),
        (None, _) => args.prompt_ids.clone(),
    };
    let s = &args.sampling;
    let request = GenerateRequest {
        prompt,
        max_new_tokens: s.max_new_tokens,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
            logit_bias: s.logit_bias.clone(),
        },
        ignore_eos: s.ignore_eos,
        stop_token_ids: s.stop_token_ids.clone(),
    };
    let start = Instant::now();
    let options = GenerateOptions {
        prompt_logits: true,
        attention: AttentionMode::Auto,
    };
    let mut outputs = generate::generate(model, std::slice::from_ref(&request), options)?;
    let gen_s = start.elapsed().as_secs_f64();
    let Some(out) = outputs.pop() else {
        bail!("generation returned no output")
    };
    if let (Some(path), Some(logits)) = (&args.dump_logits, &out.prompt_logits) {
        let data: Vec<u8> = logits
            .as_f32()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            logits.shape().to_vec(),
            &data,
        )?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file([("logits", view)], Some(meta), path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let text = tokenizer
        .map(|t| t.decode(&out.token_ids))
        .transpose()?
        .unwrap_or_default();
    let output = Output {
        prompt_tokens: request.prompt.len(),
        token_ids: out.token_ids,
        text,
        logprobs: Vec::new(),
        finish_reason: out.finish_reason.as_str().into(),
    };
    report(args, &output, Some(load_s), gen_s, "");
    Ok(())
}

/// Prints the result: one JSON object, the text (for text prompts) or the ids.
fn report(args: &GenerateArgs, out: &Output, load_s: Option<f64>, gen_s: f64, via: &str) {
    if args.json {
        let mut json = serde_json::json!({
            "prompt_ids": args.prompt_ids,
            "prompt_tokens": out.prompt_tokens,
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "generate_seconds": gen_s,
        });
        if let Some(l) = load_s {
            json["load_seconds"] = serde_json::json!(l);
        }
        if args.sampling.logprobs.is_some() {
            json["logprobs"] = serde_json::json!(out.logprobs);
        }
        println!("{json}");
        return;
    }
    if args.stream {
        println!();
    } else if args.prompt.is_some() {
        println!("{}", out.text);
    } else {
        let ids: Vec<String> = out.token_ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    eprintln!(
        "{} tokens in {gen_s:.3}s ({}){via}{}",
        out.token_ids.len(),
        out.finish_reason,
        load_s.map_or_else(String::new, |l| format!(", model loaded in {l:.2}s"))
    );
}

/// `--router` as a URL: `https://` with `--tls-ca`, whatever scheme was given.
fn router_url(router: &str, tls: bool) -> String {
    let hostport = router.split_once("://").map_or(router, |(_, rest)| rest);
    format!("{}://{hostport}", if tls { "https" } else { "http" })
}

/// `--router`: the same request through a router's streaming gRPC API.
fn run_remote(args: &GenerateArgs) -> anyhow::Result<()> {
    use switchyard_proto::v1::inference_service_client::InferenceServiceClient;

    let router = args.router.as_deref().unwrap_or_default();
    let request = args.sampling.wire(
        args.prompt_ids.clone(),
        args.prompt.clone().unwrap_or_default(),
    )?;
    let url = router_url(router, args.tls_ca.is_some());
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("--router {router}"))?;
    if let Some(ca) = &args.tls_ca {
        let pem =
            std::fs::read(ca).with_context(|| format!("reading --tls-ca {}", ca.display()))?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem));
        if let Some(name) = &args.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls).context("--tls-ca")?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    let out = runtime.block_on(async {
        let channel = endpoint.connect().await.map_err(|e| {
            anyhow::anyhow!(
                "connecting to the router at {url}: {}",
                switchyard_proto::client::connect_error(&e)
            )
        })?;
        let mut client = InferenceServiceClient::new(channel);
        let mut request = tonic::Request::new(request);
        if let Some(key) = &args.api_key {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}").parse().context("--api-key")?,
            );
        }
        request.set_timeout(Duration::from_secs(600));
        let mut stream = client
            .generate(request)
            .await
            .map_err(|s| anyhow::anyhow!("router returned {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let mut out = Output::default();
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("router returned {:?}: {}", s.code(), s.message()))?
        {
            if let Some(t) = msg.token {
                let top = t.top_logprobs.iter().map(|a| (a.id, a.logprob)).collect();
                out.token(t.id, &t.text, t.logprob.map(|lp| (lp, top)), args.stream);
            }
            if !msg.finish_reason.is_empty() {
                if args.stream {
                    show(&msg.text);
                }
                out.text.push_str(&msg.text);
                out.finish_reason = msg.finish_reason;
                out.prompt_tokens = msg.usage.map_or(0, |u| u.prompt_tokens as usize);
            }
        }
        anyhow::Ok(out)
    })?;
    report(
        args,
        &out,
        None,
        start.elapsed().as_secs_f64(),
        &format!(" via {router}"),
    );
    Ok(())
}

/// One `GenerateUnary` call to the router at `router` (`host:port` or a URL).
pub fn generate_via_router(router: &str, request: Wire) -> anyhow::Result<GenerateResponse> {
    use switchyard_proto::v1::inference_service_client::InferenceServiceClient;

    let url = router_url(router, false);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = InferenceServiceClient::connect(url.clone())
            .await
            .with_context(|| format!("connecting to the router at {url}"))?;
        let reply = client
            .generate_unary(request)
            .await
            .map_err(|s| anyhow::anyhow!("router returned {:?}: {}", s.code(), s.message()))?;
        anyhow::Ok(reply.into_inner())
    })
}

/// Prints a router's reply as `generate` does: one JSON object, or the ids.
pub fn print_remote(
    router: &str,
    prompt_ids: &[u32],
    reply: &GenerateResponse,
    seconds: f64,
    json: bool,
) {
    if json {
        let json = serde_json::json!({
            "prompt_ids": prompt_ids,
            "token_ids": reply.token_ids,
            "text": reply.text,
            "finish_reason": reply.finish_reason,
            "generate_seconds": seconds,
        });
        println!("{json}");
    } else {
        let ids: Vec<String> = reply.token_ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
        eprintln!(
            "{} tokens in {seconds:.3}s ({}) via {router}",
            reply.token_ids.len(),
            reply.finish_reason
        );
    }
}
