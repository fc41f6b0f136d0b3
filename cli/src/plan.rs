use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use switchyard_coordinator::capacity::{self, WeightDType};
use switchyard_coordinator::placement::{
    self, Plan, Problem, RebalanceOptions, Slot, WorkerId, WorkerSpec,
};
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
    /// Extra copies per MoE layer beyond one of each expert, for the experts with the most
    /// load per copy (DeepSeek's redundant experts); replaces `--replicas` when given.
    #[arg(long)]
    redundant_experts: Option<usize>,
    /// Observed expert load to plan for: the `/v1/expert_load` JSON of a router, or a
    /// `[layers][experts]` array of token counts (MoE layers in order). Prints the predicted
    /// per-layer worker imbalance of the load-blind plan, of a plan made for the load, and of
    /// the blind plan rebalanced within `--max-moves`.
    #[arg(long, value_name = "FILE.json")]
    load: Option<std::path::PathBuf>,
    /// Memory each router gives to its weights and latent KV cache, e.g. `80GiB`.
    #[arg(long, default_value = "80GiB", value_parser = capacity::parse_bytes)]
    router_memory: u64,
    /// Sequences in flight the cluster should hold, to size the routers.
    #[arg(long, default_value_t = 256)]
    target_batch: u64,
    /// Tokens of context each of them may reach.
    #[arg(long, default_value_t = 4096)]
    context_len: u64,
    /// With --load: expert copies the rebalance from the plan in force may load.
    #[arg(long, default_value_t = 64, requires = "load")]
    max_moves: usize,
    /// With --load: the load the plan in force was made for (same formats as --load), so the
    /// rebalance and the moves start from that plan instead of the load-blind one — how the
    /// plan follows a load that drifts.
    #[arg(long, value_name = "FILE.json", requires = "load")]
    previous_load: Option<std::path::PathBuf>,
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
        replicas: if args.redundant_experts.is_some() {
            1
        } else {
            args.replicas
        },
        redundant: args.redundant_experts.unwrap_or(0),
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
    if let Some(path) = &args.load {
        let load = read_load(path, &layers, moe.n_routed_experts)?;
        let in_force = match &args.previous_load {
            Some(prev) => {
                let load =
                    read_load(prev, &layers, moe.n_routed_experts).context("--previous-load")?;
                let plan = placement::plan(&Problem {
                    load,
                    ..problem.clone()
                })?;
                InForce {
                    plan,
                    from: "previous_load",
                }
            }
            None => InForce {
                plan: plan.clone(),
                from: "blind",
            },
        };
        return print_balance(&problem, &plan, &in_force, load, args.max_moves, args.json);
    }
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
    let router_weights = capacity::router_weight_bytes(&config, args.dtype);
    let router_kv_tokens = args.router_memory.saturating_sub(router_weights) / kv_per_token.max(1);
    let wanted_tokens = args.target_batch.saturating_mul(args.context_len);
    let routers = (router_kv_tokens > 0).then(|| wanted_tokens.div_ceil(router_kv_tokens).max(1));
    // What a worker has left is room for redundant experts (the KV cache lives on routers).
    let spare_slots = left_min / expert_bytes.max(1);
    let spare_per_layer = spare_slots * args.workers as u64 / layers.len().max(1) as u64;
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
                "router_weight_bytes": router_weights,
                "router_memory": args.router_memory,
                "latent_kv_tokens_per_router": router_kv_tokens,
                "routers_for_target": routers,
                "target_batch": args.target_batch,
                "context_len": args.context_len,
                "spare_expert_slots_per_worker_min": spare_slots,
                "redundant_experts_per_layer_room": spare_per_layer,
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
        "memory left: {spare_slots} more expert copies per worker → room for about {spare_per_layer} redundant experts per MoE layer (--redundant-experts)"
    );
    match routers {
        Some(n) => println!(
            "routers: {} weights each ({:?}), {kv_per_token} B of latent KV cache per token → {router_kv_tokens} tokens in {} · {} sequences × {} tokens take {n} router{}",
            gib(router_weights as f64),
            args.dtype,
            gib(args.router_memory as f64),
            args.target_batch,
            args.context_len,
            if n == 1 { "" } else { "s" }
        ),
        None => println!(
            "routers: {} weights each ({:?}) leave no room for KV cache in --router-memory {}",
            gib(router_weights as f64),
            args.dtype,
            gib(args.router_memory as f64)
        ),
    }
    println!(
        "wire: a token visits {visited:.2} workers per MoE layer on average → {wire:.0} B per token per MoE layer (bf16, both directions)"
    );
    Ok(())
}

/// Reads a load file: a router's `/v1/expert_load` JSON (layers named by index) or a bare
/// `[layers][experts]` array of counts (the model's MoE layers in order).
pub fn read_load(
    path: &Path,
    layers: &[u32],
    experts: usize,
) -> anyhow::Result<BTreeMap<Slot, f64>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --load {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--load {} is not JSON", path.display()))?;
    let rows: Vec<(u32, Vec<f64>)> = if let Some(snapshot) = value.get("layers") {
        let snapshot: Vec<serde_json::Value> = serde_json::from_value(snapshot.clone())
            .context("--load: `layers` must be an array")?;
        snapshot
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let layer = l["layer"]
                    .as_u64()
                    .with_context(|| format!("--load: `layers[{i}].layer` must be an integer"))?;
                let counts: Vec<f64> =
                    serde_json::from_value(l["experts"].clone()).with_context(|| {
                        format!("--load: `layers[{i}].experts` must be an array of numbers")
                    })?;
                anyhow::Ok((layer as u32, counts))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        let arrays: Vec<Vec<f64>> = serde_json::from_value(value).context(
            "--load must be a router's /v1/expert_load JSON or a [layers][experts] array of numbers",
        )?;
        if arrays.len() != layers.len() {
            anyhow::bail!(
                "--load has {} layers, the model {} MoE layers",
                arrays.len(),
                layers.len()
            );
        }
        layers.iter().copied().zip(arrays).collect()
    };
    let mut load = BTreeMap::new();
    for (layer, counts) in rows {
        if !layers.contains(&layer) {
            anyhow::bail!(
                "--load names layer {layer}, which is not a MoE layer of the model (MoE layers {}..={})",
                layers.first().unwrap_or(&0),
                layers.last().unwrap_or(&0)
            );
        }
        if counts.len() != experts {
            anyhow::bail!(
                "--load: layer {layer} has {} expert counts, the model {experts} routed experts",
                counts.len()
            );
        }
        if let Some(bad) = counts.iter().find(|c| !c.is_finite() || **c < 0.0) {
            anyhow::bail!("--load: layer {layer} has a count of {bad}; counts must be >= 0");
        }
        for (e, c) in counts.into_iter().enumerate() {
            load.insert(
                Slot {
                    layer,
                    expert: e as u32,
                },
                c,
            );
        }
    }
    Ok(load)
}

/// The plan the rebalance starts from: the load-blind one, or one made for `--previous-load`.
struct InForce {
    plan: Plan,
    from: &'static str,
}

/// Prints the predicted worker imbalance for `load` of the load-blind plan, the plan in force
/// (when it is not the blind one), a plan made for the load, and the plan in force rebalanced
/// within `max_moves`.
fn print_balance(
    problem: &Problem,
    blind: &Plan,
    in_force: &InForce,
    load: BTreeMap<Slot, f64>,
    max_moves: usize,
    json: bool,
) -> anyhow::Result<()> {
    let loaded = Problem {
        load,
        ..problem.clone()
    };
    let for_load = placement::plan(&loaded)?;
    let rebalanced = placement::rebalance(
        &Problem {
            previous: Some(in_force.plan.clone()),
            ..loaded.clone()
        },
        &RebalanceOptions {
            max_moves,
            threshold: 0.0,
        },
    )?;
    let blind_im = placement::imbalance(blind, &loaded);
    let force_im = placement::imbalance(&in_force.plan, &loaded);
    let for_load_im = placement::imbalance(&for_load, &loaded);
    let max = |m: &BTreeMap<u32, f64>| m.values().copied().fold(1.0, f64::max);
    let mean = placement::mean_imbalance;
    let for_load_moves = for_load.moves_from(&in_force.plan);
    let drifted = in_force.from != "blind";
    if json {
        let rows: Vec<_> = blind_im
            .keys()
            .map(|l| {
                serde_json::json!({
                    "layer": l, "blind": blind_im[l], "in_force": force_im[l],
                    "planned_for_load": for_load_im[l], "rebalanced": rebalanced.after[l],
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "imbalance": "max / mean predicted tokens per worker, per MoE layer",
                "blind": {"mean": mean(&blind_im), "max": max(&blind_im)},
                "in_force": {"mean": mean(&force_im), "max": max(&force_im),
                    "planned_for": in_force.from},
                "planned_for_load": {"mean": mean(&for_load_im), "max": max(&for_load_im),
                    "moves": for_load_moves, "moves_from_blind": for_load.moves_from(blind)},
                "rebalanced": {"mean": mean(&rebalanced.after), "max": max(&rebalanced.after),
                    "moves": rebalanced.moves, "moves_from_blind": rebalanced.plan.moves_from(blind),
                    "max_moves": max_moves},
                "layers": rows,
            }))?
        );
        return Ok(());
    }
    let from = if drifted {
        "the plan for --previous-load"
    } else {
        "the blind plan"
    };
    println!(
        "predicted worker imbalance (max / mean tokens per worker), mean · worst over {} MoE layers:",
        blind_im.len()
    );
    println!(
        "  load-blind plan      {:.3} · {:.3}",
        mean(&blind_im),
        max(&blind_im)
    );
    if drifted {
        println!(
            "  plan in force        {:.3} · {:.3}  (made for --previous-load)",
            mean(&force_im),
            max(&force_im)
        );
    }
    println!(
        "  planned for the load {:.3} · {:.3}  ({for_load_moves} expert copies moved from {from})",
        mean(&for_load_im),
        max(&for_load_im)
    );
    println!(
        "  rebalanced           {:.3} · {:.3}  ({} moved from {from}, at most {max_moves})",
        mean(&rebalanced.after),
        max(&rebalanced.after),
        rebalanced.moves
    );
    println!(
        "{:>6} {:>8} {:>9} {:>8} {:>11}",
        "layer", "blind", "in force", "planned", "rebalanced"
    );
    for (l, b) in &blind_im {
        println!(
            "{l:>6} {b:>8.3} {:>9.3} {:>8.3} {:>11.3}",
            force_im[l], for_load_im[l], rebalanced.after[l]
        );
    }
    Ok(())
}
