use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use switchyard_coordinator::capacity::{self, WeightDType};
use switchyard_coordinator::placement::{self, Problem, WorkerId, WorkerSpec};
use switchyard_engine::ModelConfig;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A preset name (`deepseek-v3`, `mini`, `qwen3-moe`, … see `synth --help`) or a
    /// checkpoint directory; only its config is read.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: String,
    /// Expert workers in the cluster.
    #[arg(long)]
    workers: usize,
    /// Memory each worker gives to expert weights, e.g. `80GiB`.
    #[arg(long, value_parser = capacity::parse_bytes)]
    worker_memory: u64,
    /// Copies wanted of each expert (on distinct workers, as capacity allows).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Storage type of the expert weights on the workers.
    #[arg(long, default_value = "bf16")]
    dtype: WeightDType,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

pub fn load_config(model: &str) -> anyhow::Result<ModelConfig> {
    if switchyard_engine::synth::PRESETS.contains(&model) {
        let json = switchyard_engine::synth::preset_config(model)?;
        return Ok(ModelConfig::from_json_str(&json.to_string())?);
    }
    ModelConfig::from_dir(Path::new(model))
        .with_context(|| format!("reading the config of {model}"))
}

fn gib(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    if args.workers == 0 {
        anyhow::bail!("--workers must be >= 1, got 0");
    }
    let config = load_config(&args.model)?;
    let moe = config
        .moe
        .as_ref()
        .context("the model has no routed experts to place")?;
    let expert_bytes = capacity::expert_bytes(&config, args.dtype);
    let layers: Vec<u32> = config.moe_layers().iter().map(|&l| l as u32).collect();
    let problem = Problem {
        layers: layers.clone(),
        experts_per_layer: moe.n_routed_experts as u32,
        expert_bytes,
        workers: (0..args.workers as u32)
            .map(|i| WorkerSpec {
                id: WorkerId(i),
                memory_bytes: args.worker_memory,
            })
            .collect(),
        replicas: args.replicas,
        load: BTreeMap::new(),
        previous: None,
    };
    let plan = placement::plan(&problem).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n{} MoE layers × {} routed experts × {} per expert ({:?}); try more --workers or more --worker-memory{}",
            layers.len(),
            moe.n_routed_experts,
            gib(expert_bytes as f64),
            args.dtype,
            if args.dtype == WeightDType::Fp8 { "" } else { ", or --dtype fp8" }
        )
    })?;
    let by_worker = plan.by_worker();
    let counts: Vec<usize> = (0..args.workers as u32)
        .map(|i| by_worker.get(&WorkerId(i)).map_or(0, Vec::len))
        .collect();
    let (min, max) = (
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
    );
    let copies: usize = plan.holders.values().map(Vec::len).sum();
    let replicas = copies as f64 / plan.holders.len().max(1) as f64;
    let used_max = max as u64 * expert_bytes;
    let left_min = args.worker_memory.saturating_sub(used_max);
    let kv_per_token = capacity::kv_bytes_per_token(&config);
    let kv_tokens = left_min / kv_per_token.max(1);
    let visited = capacity::expected_workers_per_token(args.workers, moe.num_experts_per_tok);
    // One bf16 hidden row to each visited worker and one back.
    let wire = visited * config.hidden_size as f64 * 2.0 * 2.0;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": config.identity(),
                "moe_layers": layers.len(),
                "routed_experts": moe.n_routed_experts,
                "expert_bytes": expert_bytes,
                "workers": args.workers,
                "experts_per_worker": {"min": min, "max": max},
                "copies_per_expert": replicas,
                "expert_memory_per_worker_max": used_max,
                "memory_left_per_worker_min": left_min,
                "latent_kv_bytes_per_token": kv_per_token,
                "latent_kv_tokens_in_left_memory": kv_tokens,
                "expected_workers_per_token_per_layer": visited,
                "wire_bytes_per_token_per_moe_layer": wire,
            }))?
        );
        return Ok(());
    }
    println!(
        "{} · {} MoE layers × {} routed experts · {} per expert ({:?})",
        config.identity(),
        layers.len(),
        moe.n_routed_experts,
        gib(expert_bytes as f64),
        args.dtype
    );
    println!(
        "{} workers × {} for experts, {} cop{} of each expert wanted",
        args.workers,
        gib(args.worker_memory as f64),
        args.replicas,
        if args.replicas == 1 { "y" } else { "ies" }
    );
    println!(
        "experts per worker: {min}–{max} (all layers) · {replicas:.2} copies per expert on average"
    );
    println!(
        "expert memory per worker: up to {} · left: at least {}",
        gib(used_max as f64),
        gib(left_min as f64)
    );
    println!(
        "latent KV cache: {} B per token → {kv_tokens} tokens in the memory left on one worker",
        kv_per_token
    );
    println!(
        "wire: a token visits {visited:.2} workers per MoE layer on average → {wire:.0} B per token per MoE layer (bf16, both directions)"
    );
    Ok(())
}
