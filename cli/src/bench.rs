use std::path::PathBuf;

use anyhow::Context;
use switchyard_engine::bench::{self, BenchOptions};
use switchyard_engine::model::{DeepseekModel, LoadOptions};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory (Hugging Face layout).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let model = DeepseekModel::load(&args.model, &LoadOptions::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let report = bench::run(
        &model,
        &BenchOptions {
            batch_sizes: args.batch,
            prompt_len: args.prompt_len,
            gen_len: args.gen_len,
            seed: args.seed,
        },
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model {} · weights {:.1} MiB · {} threads",
        args.model.display(),
        report.weights_bytes as f64 / (1 << 20) as f64,
        report.threads
    );
    println!(
        "{:>6} {:>8} {:>8} {:>14} {:>12} {:>14} {:>14}",
        "batch", "prompt", "gen", "prefill tok/s", "prefill ms", "decode tok/s", "step ms"
    );
    for r in &report.rows {
        println!(
            "{:>6} {:>8} {:>8} {:>14.1} {:>12.1} {:>14.1} {:>14.2}",
            r.batch,
            r.prompt_len,
            r.gen_len,
            r.prefill_tok_s,
            r.prefill_ms,
            r.decode_tok_s,
            r.decode_step_ms
        );
    }
    if let Some(peak) = report.peak_rss_bytes {
        println!(
            "peak memory (RSS): {:.1} MiB",
            peak as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
