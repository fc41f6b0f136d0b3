use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use switchyard_engine::generate::{self, GenerateOptions, GenerateRequest, SamplingParams};
use switchyard_engine::model::{AttentionMode, DeepseekModel, LoadOptions};
use switchyard_proto::v1::{GenerateRequest as Wire, GenerateResponse};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["model", "router"])))]
pub struct GenerateArgs {
    /// Checkpoint directory (Hugging Face layout): generate in this process.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// A router's address (`host:port`): generate through the cluster instead.
    #[arg(long, env = "SWITCHYARD_ROUTER", conflicts_with_all = ["dump_logits"])]
    router: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `1,17,42`.
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object (`token_ids`, `finish_reason`, timings) instead of text.
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
    /// Sampling seed; the same seed gives the same tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Also stop at these token ids.
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let Some(model_dir) = &args.model else {
        return run_remote(&args);
    };
    let load_start = Instant::now();
    let model = DeepseekModel::load(model_dir, &LoadOptions::default())
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let load_s = load_start.elapsed().as_secs_f64();
    let s = &args.sampling;
    let request = GenerateRequest {
        prompt: args.prompt_ids.clone(),
        max_new_tokens: s.max_new_tokens,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            ..Default::default()
        },
        ignore_eos: s.ignore_eos,
        stop_token_ids: s.stop_token_ids.clone(),
    };
    let start = Instant::now();
    let options = GenerateOptions {
        prompt_logits: args.dump_logits.is_some(),
        attention: AttentionMode::Auto,
    };
    let mut outputs = generate::generate(&model, std::slice::from_ref(&request), options)?;
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
    if args.json {
        let json = serde_json::json!({
            "prompt_ids": request.prompt,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason.as_str(),
            "load_seconds": load_s,
            "generate_seconds": gen_s,
        });
        println!("{json}");
    } else {
        let ids: Vec<String> = out.token_ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
        eprintln!(
            "{} tokens in {:.3}s ({}), model loaded in {:.2}s",
            out.token_ids.len(),
            gen_s,
            out.finish_reason.as_str(),
            load_s
        );
    }
    Ok(())
}

/// `--router`: the same request through a router's gRPC API.
fn run_remote(args: &GenerateArgs) -> anyhow::Result<()> {
    let router = args.router.as_deref().unwrap_or_default();
    let s = &args.sampling;
    let request = Wire {
        prompt_ids: args.prompt_ids.clone(),
        max_new_tokens: u32::try_from(s.max_new_tokens).context("--max-new-tokens is too large")?,
        temperature: s.temperature,
        top_k: u32::try_from(s.top_k).context("--top-k is too large")?,
        top_p: Some(s.top_p),
        seed: s.seed,
        ignore_eos: s.ignore_eos,
        stop_token_ids: s.stop_token_ids.clone(),
    };
    let start = Instant::now();
    let reply = generate_via_router(router, request)?;
    print_remote(
        router,
        &args.prompt_ids,
        &reply,
        start.elapsed().as_secs_f64(),
        args.json,
    );
    Ok(())
}

/// One `GenerateUnary` call to the router at `router` (`host:port` or a URL).
pub fn generate_via_router(router: &str, request: Wire) -> anyhow::Result<GenerateResponse> {
    use switchyard_proto::v1::inference_service_client::InferenceServiceClient;

    let url = if router.contains("://") {
        router.to_string()
    } else {
        format!("http://{router}")
    };
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
