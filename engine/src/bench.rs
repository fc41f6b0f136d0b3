//! The single-process speed benchmark behind `switchyard bench`: prefill and decode throughput
//! per batch size, and peak memory.

use std::time::Instant;

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::model::{CausalLm, ExpertExecutor, ForwardOptions, KvCache, LogitsFor, SeqInput};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub batch_sizes: Vec<usize>,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub seed: u64,
    /// Micro-batches per step (see `ForwardOptions::micro_batches`; 0 or 1: none).
    pub micro_batches: usize,
    /// Split only steps of at least this many tokens (`ForwardOptions::micro_batch_min_tokens`).
    pub micro_batch_min_tokens: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// Prompt tokens per second over the batch's prefill pass.
    pub prefill_tok_s: f64,
    pub prefill_ms: f64,
    /// Generated tokens per second over all sequences of the batch.
    pub decode_tok_s: f64,
    /// Mean time of one decode step (one token for every sequence).
    pub decode_step_ms: f64,
    /// Of a decode step, the time spent starting routed experts and blocked waiting for them
    /// (all of their compute when they run in this process).
    pub decode_expert_wait_ms: f64,
    /// Per decode step, what the probe given to [`run_probed`] counted (e.g. the remote
    /// workers' compute), when one was given.
    pub decode_probe_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    /// The CPU kernel set in use (`avx512-bf16`, `avx512`, `avx2`, `portable`).
    pub kernels: &'static str,
    pub weights_bytes: usize,
    pub rows: Vec<BenchRow>,
    /// Peak resident memory of the process (VmHWM), when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Peak resident set size of this process, from `/proc/self/status` (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs prefill then `gen_len` greedy decode steps for each batch size, on random prompts.
pub fn run(model: &CausalLm, options: &BenchOptions) -> Result<BenchReport> {
    run_with(model, options, model)
}

/// Like [`run`], with the routed experts run by `experts` (e.g. remote workers).
pub fn run_with(
    model: &CausalLm,
    options: &BenchOptions,
    experts: &dyn ExpertExecutor,
) -> Result<BenchReport> {
    run_probed(model, options, experts, None)
}

/// Like [`run_with`]; `probe` reads a running total of seconds (the workers' busy time, say),
/// sampled around each batch's decode steps and reported per step.
pub fn run_probed(
    model: &CausalLm,
    options: &BenchOptions,
    experts: &dyn ExpertExecutor,
    probe: Option<&dyn Fn() -> f64>,
) -> Result<BenchReport> {
    let c = model.config();
    if options.prompt_len == 0 {
        return Err(EngineError::input("prompt_len", "must be >= 1, got 0"));
    }
    if options.prompt_len + options.gen_len > c.max_position_embeddings {
        return Err(EngineError::input(
            "gen_len",
            format!(
                "prompt_len + gen_len must be <= max_position_embeddings ({}), got {}",
                c.max_position_embeddings,
                options.prompt_len + options.gen_len
            ),
        ));
    }
    if let Some(&b) = options.batch_sizes.iter().find(|&&b| b == 0) {
        return Err(EngineError::input(
            "batch",
            format!("batch sizes must be >= 1, got {b}"),
        ));
    }
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut rows = Vec::new();
    for &batch in &options.batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..options.prompt_len)
                    .map(|_| rng.random_range(0..c.vocab_size as u32))
                    .collect()
            })
            .collect();
        let mut caches: Vec<KvCache> = (0..batch)
            .map(|_| model.new_cache(options.prompt_len + options.gen_len))
            .collect();
        let fwd = ForwardOptions {
            logits: LogitsFor::Last,
            micro_batches: options.micro_batches,
            micro_batch_min_tokens: options.micro_batch_min_tokens,
            ..Default::default()
        };

        let start = Instant::now();
        let mut inputs: Vec<SeqInput<'_>> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, cache)| SeqInput { tokens: p, cache })
            .collect();
        let out = model.forward_with(&mut inputs, &fwd, experts)?;
        let prefill = start.elapsed().as_secs_f64();
        drop(inputs);

        let vocab = c.vocab_size;
        let mut next: Vec<[u32; 1]> = out
            .logits
            .as_f32()?
            .chunks_exact(vocab)
            .map(|row| [crate::generate::argmax(row) as u32])
            .collect();
        let probed = probe.map(|p| p());
        let mut expert_wait = std::time::Duration::ZERO;
        let start = Instant::now();
        for _ in 0..options.gen_len {
            let mut inputs: Vec<SeqInput<'_>> = next
                .iter()
                .zip(caches.iter_mut())
                .map(|(t, cache)| SeqInput { tokens: t, cache })
                .collect();
            let out = model.forward_with(&mut inputs, &fwd, experts)?;
            drop(inputs);
            expert_wait += out.timings.experts;
            for (n, row) in next
                .iter_mut()
                .zip(out.logits.as_f32()?.chunks_exact(vocab))
            {
                n[0] = crate::generate::argmax(row) as u32;
            }
        }
        let decode = start.elapsed().as_secs_f64();
        let per_step = |seconds: f64| {
            if options.gen_len == 0 {
                0.0
            } else {
                seconds * 1e3 / options.gen_len as f64
            }
        };
        let decode_probe_ms = probe.zip(probed).map(|(p, before)| per_step(p() - before));
        rows.push(BenchRow {
            decode_expert_wait_ms: per_step(expert_wait.as_secs_f64()),
            decode_probe_ms,
            batch,
            prompt_len: options.prompt_len,
            gen_len: options.gen_len,
            prefill_tok_s: (batch * options.prompt_len) as f64 / prefill,
            prefill_ms: prefill * 1e3,
            decode_tok_s: if options.gen_len == 0 {
                0.0
            } else {
                (batch * options.gen_len) as f64 / decode
            },
            decode_step_ms: if options.gen_len == 0 {
                0.0
            } else {
                decode * 1e3 / options.gen_len as f64
            },
        });
    }
    Ok(BenchReport {
        threads: crate::cpu::pool::global().threads(),
        kernels: crate::cpu::matmul::kernels(),
        weights_bytes: model.size_in_bytes(),
        rows,
        peak_rss_bytes: peak_rss_bytes(),
    })
}
