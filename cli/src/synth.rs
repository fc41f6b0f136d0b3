use std::path::PathBuf;

use anyhow::Context;
use switchyard_engine::synth::{self, SynthDType, SynthOptions};

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Model shape. DeepSeek: `tiny` (tests), `mini` (the 810 M benchmark model),
    /// `deepseek-v3` (the real dimensions; shrink with --layers / --experts). Other families:
    /// `llama-3.2-1b`, `qwen3-0.6b`, `gemma3-1b` (real dimensions), `qwen3-moe` (128 experts,
    /// top 8, small body), `mixtral-mini`, `mistral-mini`, and `tiny-llama`, `tiny-qwen3`,
    /// `tiny-qwen3-moe`, `tiny-gemma3`, `tiny-mistral`, `tiny-mixtral` for tests.
    #[arg(long, env = "SWITCHYARD_PRESET")]
    preset: String,
    /// Output directory (created if missing).
    #[arg(long, env = "SWITCHYARD_SYNTH_OUT")]
    out: PathBuf,
    /// Weight type: f32, bf16, or fp8 (e4m3 with 128×128 block scales, as DeepSeek-V3 ships).
    #[arg(long, env = "SWITCHYARD_SYNTH_DTYPE", default_value = "bf16")]
    dtype: SynthDType,
    /// Random seed; the same seed writes the same weights.
    #[arg(long, env = "SWITCHYARD_SYNTH_SEED", default_value_t = 0)]
    seed: u64,
    /// Override the number of layers.
    #[arg(long, env = "SWITCHYARD_SYNTH_LAYERS")]
    layers: Option<usize>,
    /// Override the number of routed experts per MoE layer.
    #[arg(long, env = "SWITCHYARD_SYNTH_EXPERTS")]
    experts: Option<usize>,
    /// Refuse to write a checkpoint larger than this many bytes.
    #[arg(long, env = "SWITCHYARD_SYNTH_MAX_BYTES", default_value_t = 32 << 30)]
    max_bytes: u64,
    /// Largest shard file in bytes; past it the checkpoint is sharded with an index.
    #[arg(long, env = "SWITCHYARD_SYNTH_SHARD_BYTES", default_value_t = 4 << 30)]
    shard_bytes: u64,
    /// Make the gate prefer some experts, as trained models do: each MoE layer's routing bias
    /// gains `S / (rank + 1)` over a seeded ranking of its experts (Zipf-shaped). 0 is none;
    /// 0.5 already makes a few experts per layer several times hotter than the mean.
    #[arg(long, env = "SWITCHYARD_SYNTH_EXPERT_SKEW", default_value_t = 0.0)]
    expert_skew: f32,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let options = SynthOptions {
        preset: args.preset,
        dtype: args.dtype,
        seed: args.seed,
        layers: args.layers,
        experts: args.experts,
        max_bytes: args.max_bytes,
        shard_bytes: args.shard_bytes.max(1),
        expert_skew: args.expert_skew,
    };
    let summary = synth::synth(&args.out, &options).with_context(|| {
        format!(
            "synthesising {:?} into {}",
            options.preset,
            args.out.display()
        )
    })?;
    println!(
        "wrote {} ({:.1} M parameters, {:.1} MiB in {} files)",
        args.out.display(),
        summary.parameters as f64 / 1e6,
        summary.bytes as f64 / (1 << 20) as f64,
        summary.files.len()
    );
    Ok(())
}
