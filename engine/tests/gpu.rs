//! The CUDA backend against the CPU backend (feature `cuda`). Without a usable device every
//! test prints `SKIPPED` with the reason and returns; `tests/gpu/run.sh` runs them on a GPU.

#![cfg(feature = "cuda")]
// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use common::{MlaCase, ROPE_POSITIONS, gate_bias, gate_flavours, max_diff, moe, pseudo};
use half::bf16;
use switchyard_engine::checkpoint::Checkpoint;
use switchyard_engine::config::{MoeConfig, MoeNaming};
use switchyard_engine::cpu::ops;
use switchyard_engine::cuda::{Gpu, GpuExperts, GpuGate, GpuGroup, GpuRope, LatentCache};
use switchyard_engine::model::experts::{ExpertGroup, RoutedExperts};
use switchyard_engine::model::gate::Gate;
use switchyard_engine::model::mlp::Mlp;
use switchyard_engine::model::{CausalLm, ForwardOptions, LoadOptions, SeqInput};
use switchyard_engine::sampling::argmax;
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_engine::tensor::Compute;
use switchyard_engine::{ModelConfig, Tensor};

fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIPPED (no usable CUDA device): {e}");
            None
        }
    }
}

/// A `tiny` DeepSeek checkpoint (kept alive by the returned directory), its config and MoE
/// config, opened.
fn tiny() -> (tempfile::TempDir, ModelConfig, MoeConfig, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    synth::synth(dir.path(), &SynthOptions::default()).unwrap();
    let config = ModelConfig::from_dir(dir.path()).unwrap();
    let moe = config.moe.clone().unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    (dir, config, moe, ck)
}

/// Routed experts of a `tiny` bf16 layer on the device give the CPU's combined rows within
/// bf16 rounding of the activations (both paths round them at the same points).
#[test]
fn gpu_experts_match_cpu_experts() {
    let Some(gpu) = gpu() else { return };
    let (_dir, config, moe, ck) = tiny();
    let experts: BTreeSet<u32> = (0..moe.n_routed_experts as u32).collect();
    let (h, i) = (config.hidden_size, moe.moe_intermediate_size);
    let cpu = RoutedExperts::load(&ck, &MoeNaming::DEEPSEEK, 1, &experts, h, i).unwrap();
    let dev = GpuExperts::load(gpu, &ck, &MoeNaming::DEEPSEEK, 1, &experts, h, i).unwrap();
    for tokens in [1usize, 7, 64, 300] {
        let x = Tensor::from_f32(&[tokens, h], pseudo(tokens * h, tokens as u32)).unwrap();
        // Each token to 4 experts, spread over all of them, with uneven weights.
        let mut groups: Vec<ExpertGroup> = (0..moe.n_routed_experts as u32)
            .map(|e| ExpertGroup {
                expert: e,
                ..Default::default()
            })
            .collect();
        for t in 0..tokens {
            // Tokens past 64 go to fewer experts, so row counts differ between experts.
            for j in 0..if t < 64 { 4 } else { 1 + t % 3 } {
                let e = (t * 5 + j * 3) % moe.n_routed_experts;
                groups[e].rows.push(t as u32);
                groups[e].weights.push(0.1 + 0.2 * j as f32);
            }
        }
        groups.retain(|g| !g.rows.is_empty());
        let want = cpu.forward_groups(&x, &groups).unwrap().into_f32_vec();
        let got = dev.forward_groups(&x, &groups).unwrap().into_f32_vec();
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = want
            .iter()
            .zip(&got)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("gpu experts, {tokens} tokens: max |Δ| {diff:e} of max |y| {scale:e}");
        assert!(
            diff <= 1e-2 * scale.max(1.0),
            "{tokens} tokens: max |Δ| = {diff:e}"
        );
    }
}

/// A layer's shared expert on the device (held as one expert, applied to chosen rows with
/// unit weights, as a GPU worker runs it) gives the CPU MLP's rows.
#[test]
fn gpu_shared_expert_matches_cpu_mlp() {
    let Some(gpu) = gpu() else { return };
    let (_dir, config, moe, ck) = tiny();
    let (h, i) = (
        config.hidden_size,
        moe.moe_intermediate_size * moe.n_shared_experts,
    );
    let prefix = format!("{}.shared_experts", moe.naming.block_prefix(1));
    let cpu = Mlp::new(&ck, &prefix, h, i).unwrap();
    let dev = GpuExperts::load_mlp(gpu, &ck, &prefix, 1, h, i).unwrap();
    let tokens = 9;
    let x = Tensor::from_f32(&[tokens, h], pseudo(tokens * h, 77)).unwrap();
    let rows = vec![0u32, 3, 4, 8];
    let group = ExpertGroup {
        expert: 0,
        rows: rows.clone(),
        weights: vec![1.0; rows.len()],
    };
    let got = dev.forward_groups(&x, &[group]).unwrap().into_f32_vec();
    let want = cpu.forward(&x).unwrap().into_f32_vec();
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for t in 0..tokens {
        let (w, g) = (&want[t * h..(t + 1) * h], &got[t * h..(t + 1) * h]);
        if rows.contains(&(t as u32)) {
            let d = max_diff(w, g);
            assert!(d <= 1e-2 * scale.max(1.0), "row {t}: max |Δ| {d:e}");
        } else {
            assert!(g.iter().all(|&v| v == 0.0), "row {t} was not asked for");
        }
    }
}

/// A model whose projections, dense FFNs, shared experts, MoE gates and LM head run on the
/// device (`router --device cuda:N`) gives the host model's logits and greedy tokens: DeepSeek
/// (MLA, sigmoid gate with groups, shared experts) in bf16 and f32, Llama (GQA, tied
/// embeddings), Gemma 3 (GeGLU) and Qwen3-MoE (softmax gate) in bf16.
#[test]
fn offloaded_model_matches_the_host_model() {
    let Some(gpu) = gpu() else { return };
    matches_the_host_model(&Compute::Cuda(gpu), "offloaded");
}

/// The same over two GPUs (`router --device cuda:0,1`): queries and output projections split
/// by heads, MLPs by their intermediate slice, the LM head by vocabulary, partial sums reduced
/// over NCCL. Needs two devices and libnccl.
#[test]
fn model_split_over_two_gpus_matches_the_host_model() {
    if gpu().is_none() {
        return;
    }
    let group = match GpuGroup::open(&[0, 1]) {
        Ok(group) => group,
        Err(e) => {
            eprintln!("SKIPPED (no two CUDA devices with NCCL): {e}");
            return;
        }
    };
    matches_the_host_model(&Compute::CudaGroup(group), "split over cuda:0,1");
}

fn matches_the_host_model(compute: &Compute, how: &str) {
    for (preset, dtype) in [
        ("tiny", SynthDType::Bf16),
        ("tiny", SynthDType::F32),
        ("tiny-llama", SynthDType::Bf16),
        ("tiny-gemma3", SynthDType::Bf16),
        ("tiny-qwen3-moe", SynthDType::Bf16),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let options = SynthOptions {
            preset: preset.into(),
            dtype,
            ..Default::default()
        };
        synth::synth(dir.path(), &options).unwrap();
        let host = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
        let mut dev = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
        dev.offload(compute).unwrap();
        let prompt = [1u32, 17, 42, 5, 9, 100, 3];
        let run = |model: &CausalLm| {
            let mut cache = model.new_cache(prompt.len() + 4);
            let mut logits = Vec::new();
            let mut tokens = prompt.to_vec();
            let mut fed = 0;
            for _ in 0..4 {
                let out = model
                    .forward(
                        &mut [SeqInput {
                            tokens: &tokens[fed..],
                            cache: &mut cache,
                        }],
                        &ForwardOptions::default(),
                    )
                    .unwrap()
                    .logits
                    .into_f32_vec();
                fed = tokens.len();
                tokens.push(argmax(&out) as u32);
                logits.extend(out);
            }
            (logits, tokens)
        };
        let (want, want_tokens) = run(&host);
        let (got, got_tokens) = run(&dev);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&want, &got);
        eprintln!("{preset} {dtype:?} {how}: logits max |Δ| {d:e} of {scale:e}");
        assert!(d <= 1e-2 * scale.max(1.0), "{preset} {dtype:?}: {d:e}");
        assert_eq!(want_tokens, got_tokens, "{preset} {dtype:?}");
    }
}

/// An expert the device does not hold is a named error, as on the CPU.
#[test]
fn gpu_experts_refuse_an_expert_they_do_not_hold() {
    let Some(gpu) = gpu() else { return };
    let (_dir, _, _, ck) = tiny();
    let dev = GpuExperts::load(gpu, &ck, &MoeNaming::DEEPSEEK, 1, &[0, 1].into(), 64, 32).unwrap();
    let x = Tensor::from_f32(&[1, 64], vec![0.5; 64]).unwrap();
    let groups = [ExpertGroup {
        expert: 5,
        rows: vec![0],
        weights: vec![1.0],
    }];
    let err = dev.forward_groups(&x, &groups).unwrap_err().to_string();
    assert!(err.contains("expert 5"), "{err}");
}

/// Tolerances: f32 kernels against f32 CPU code differ only by summation order and by the
/// device's `expf` / `sincosf` (within 2 ulp), so 1e-5 relative to the values' scale.
const F32_TOL: f32 = 1e-5;

#[test]
fn rms_norm_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, dim) = (5, 1000);
    let x = pseudo(rows * dim, 3);
    let w = pseudo(dim, 11);
    let mut want = x.clone();
    ops::rms_norm_inplace(&mut want, &w, 1e-6);
    let mut dev = gpu.upload(&x).unwrap();
    let w_dev = gpu.upload(&w).unwrap();
    gpu.rms_norm(&mut dev, rows, &w_dev, dim, 1e-6).unwrap();
    let got = gpu.download(&dev).unwrap();
    let d = max_diff(&want, &got[..rows * dim]);
    eprintln!("rms_norm: max |Δ| {d:e}");
    assert!(d <= F32_TOL * 4.0, "{d:e}");
}

#[test]
fn rope_matches_cpu_for_each_layout_and_scaling() {
    let Some(gpu) = gpu() else { return };
    let (heads, offset) = (3, 2);
    for rope in common::rope_cases() {
        let dim = rope.dim();
        let stride = offset + dim + 3;
        let tokens = ROPE_POSITIONS.len();
        let x = pseudo(tokens * heads * stride, dim as u32);
        let want = common::rope_reference(&rope, &x, heads, stride, offset);
        let table = GpuRope::new(&gpu, &rope).unwrap();
        let mut dev = gpu.upload(&x).unwrap();
        let pos = gpu.upload(&ROPE_POSITIONS).unwrap();
        gpu.rope(&mut dev, &pos, &table, tokens, heads, stride, offset)
            .unwrap();
        let got = gpu.download(&dev).unwrap();
        let d = max_diff(&want, &got[..want.len()]);
        eprintln!("rope {:?} dim {dim}: max |Δ| {d:e}", rope.style());
        assert!(d <= 1e-4, "{:?}: {d:e}", rope.style());
    }
}

#[test]
fn embedding_rows_match_the_bf16_table() {
    let Some(gpu) = gpu() else { return };
    let (vocab, h) = (1000, 96);
    let table: Vec<u16> = pseudo(vocab * h, 5)
        .iter()
        .map(|v| bf16::from_f32(*v).to_bits())
        .collect();
    let ids = [0u32, 999, 17, 17, 500];
    let scale = (h as f32).sqrt();
    let dev = gpu.upload(&table).unwrap();
    let got = gpu
        .download(&gpu.embed(&dev, vocab, h, &ids, scale).unwrap())
        .unwrap();
    for (r, &id) in ids.iter().enumerate() {
        for c in 0..h {
            let want = bf16::from_bits(table[id as usize * h + c]).to_f32() * scale;
            assert_eq!(got[r * h + c], want, "row {r} col {c}");
        }
    }
    let err = gpu
        .embed(&dev, vocab, h, &[1000], 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("input_ids") && err.contains("1000"), "{err}");
}

/// Every gate flavour picks the CPU's experts in the CPU's order, with its weights.
#[test]
fn gate_routing_matches_cpu_for_every_flavour() {
    let Some(gpu) = gpu() else { return };
    let hidden = 48;
    let tokens = 37;
    for (name, config) in gate_flavours() {
        let e = config.n_routed_experts;
        let w = pseudo(e * hidden, e as u32);
        let bias = gate_bias(&config);
        let cpu = Gate::from_parts(
            &config,
            Tensor::from_f32(&[e, hidden], w.clone()).unwrap(),
            bias.clone(),
        )
        .unwrap();
        let dev = GpuGate::from_gate(gpu.clone(), &cpu).unwrap();
        // From the same logits: the same experts, the same order, the same weights.
        let logits: Vec<f32> = pseudo(tokens * e, 7).iter().map(|v| v * 4.0).collect();
        let want = cpu.route_logits(&logits);
        let got = dev
            .route_logits(&gpu.upload(&logits).unwrap(), tokens)
            .unwrap();
        assert_eq!(want.ids, got.ids, "{name}: experts");
        let d = max_diff(&want.weights, &got.weights);
        eprintln!("gate {name}: same experts, weights max |Δ| {d:e}");
        assert!(d <= F32_TOL * config.routed_scaling_factor, "{name}: {d:e}");
        // The device's f32 GEMM gives the logits within summation order of an f64 product,
        // and `forward` is that GEMM then the routing above.
        let x = pseudo(tokens * hidden, 21);
        let x_dev = gpu.upload(&x).unwrap();
        let mut logits_dev = gpu.zeros::<f32>(tokens * e).unwrap();
        gpu.gemm_f32(
            &x_dev,
            tokens,
            hidden,
            &gpu.upload(&w).unwrap(),
            e,
            &mut logits_dev,
        )
        .unwrap();
        let got_logits = gpu.download(&logits_dev).unwrap();
        for t in 0..tokens {
            for j in 0..e {
                let want: f64 = (0..hidden)
                    .map(|c| f64::from(x[t * hidden + c]) * f64::from(w[j * hidden + c]))
                    .sum();
                let d = (got_logits[t * e + j] as f64 - want).abs();
                assert!(
                    d <= 1e-5 * hidden as f64,
                    "{name}: logit [{t}, {j}] off by {d:e}"
                );
            }
        }
        let routed = dev.forward(&x_dev, tokens).unwrap();
        assert_eq!(
            routed,
            dev.route_logits(&logits_dev, tokens).unwrap(),
            "{name}"
        );
    }
    // Shapes the kernel cannot hold are refused at construction.
    let err = GpuGate::new(gpu.clone(), &moe(1024, 8, 1, 1), &[], 4, None).unwrap_err();
    assert!(err.to_string().contains("1024 experts"), "{err}");
}

#[test]
fn argmax_and_softmax_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, vocab) = (4, 50_000);
    let mut logits = pseudo(rows * vocab, 13);
    // Ties: the first maximum wins, as on the CPU.
    logits[17] = 9.0;
    logits[40_000] = 9.0;
    logits[vocab + 49_999] = 5.0;
    logits[2 * vocab..3 * vocab].fill(-3.0);
    let dev = gpu.upload(&logits).unwrap();
    let got = gpu.argmax_rows(&dev, rows, vocab).unwrap();
    let want: Vec<u32> = logits
        .chunks_exact(vocab)
        .map(|r| argmax(r) as u32)
        .collect();
    assert_eq!(got, want);
    assert_eq!(&got[..3], &[17, 49_999, 0]);

    for temperature in [1.0f32, 0.7] {
        let mut want = logits.clone();
        for row in want.chunks_exact_mut(vocab) {
            row.iter_mut().for_each(|v| *v /= temperature);
            ops::softmax_inplace(row);
        }
        let mut dev = gpu.upload(&logits).unwrap();
        gpu.softmax_rows(&mut dev, rows, vocab, temperature)
            .unwrap();
        let got = gpu.download(&dev).unwrap();
        let d = max_diff(&want, &got[..want.len()]);
        eprintln!("softmax T={temperature}: max |Δ| {d:e}");
        assert!(d <= 2e-6, "{d:e}");
    }
}

/// MLA decode over a paged latent cache ([`MlaCase`]).
#[test]
fn mla_decode_matches_cpu_latent_attention() {
    let Some(gpu) = gpu() else { return };
    let MlaCase {
        heads,
        rank,
        rope,
        block,
        ctx_lens,
        rows,
        tables,
        q_abs,
        q_pe,
        scale,
        want,
    } = MlaCase::new();
    let cache = LatentCache::from_rows(&gpu, &rows, block, rank, rope).unwrap();
    let out = gpu
        .mla_decode(
            &gpu.upload(&q_abs).unwrap(),
            &gpu.upload(&q_pe).unwrap(),
            &cache,
            &tables,
            &ctx_lens,
            heads,
            scale,
        )
        .unwrap();
    let got = gpu.download(&out).unwrap();
    let d = max_diff(&want, &got[..want.len()]);
    eprintln!("mla_decode: max |Δ| {d:e}");
    assert!(d <= 1e-5, "{d:e}");
    // A block table shorter than the context is an error, not a read past it.
    let err = gpu
        .mla_decode(
            &gpu.upload(&q_abs).unwrap(),
            &gpu.upload(&q_pe).unwrap(),
            &cache,
            &[vec![0], vec![1], vec![2]],
            &ctx_lens,
            heads,
            scale,
        )
        .unwrap_err();
    assert!(err.to_string().contains("for a context of 17"), "{err}");
}

/// Throughput of one MoE layer's routed experts at DeepSeek-V3's shape (hidden 7168,
/// intermediate 2048), 32 experts, 1 to 256 rows per expert: the batched GEMMs' TFLOP/s
/// (6 · rows · hidden · intermediate per call, the upload of x and the download included).
/// Run by tests/gpu/run.sh (`--ignored`); prints figures, asserts nothing about speed.
#[test]
#[ignore = "benchmark: run by tests/gpu/run.sh on a GPU machine"]
fn expert_layer_throughput() {
    let Some(gpu) = gpu() else { return };
    let (h, inter, n_exp, k) = (7168usize, 2048usize, 32u32, 8usize);
    let weights = |len: usize, seed: u32| -> Vec<u16> {
        pseudo(len, seed)
            .iter()
            .map(|v| bf16::from_f32(v * 0.02).to_bits())
            .collect()
    };
    let experts = GpuExperts::from_host(
        gpu.clone(),
        3,
        h,
        inter,
        (0..n_exp).map(|e| (e, weights(2 * inter * h, e), weights(h * inter, e + 100))),
    )
    .unwrap();
    let peak = gpu.bf16_peak_tflops();
    eprintln!(
        "device: {} ({} GiB, compute {:?}), dense bf16 peak {}",
        gpu.name(),
        gpu.total_memory() >> 30,
        gpu.compute_capability(),
        peak.map_or("unknown".into(), |p| format!("{p:.0} TFLOP/s"))
    );
    for per_expert in [1usize, 2, 4, 8, 16, 32, 64, 128, 256] {
        // Each token to k consecutive experts: every expert gets exactly `per_expert` rows.
        let tokens = per_expert * n_exp as usize / k;
        let mut groups: Vec<ExpertGroup> = (0..n_exp)
            .map(|e| ExpertGroup {
                expert: e,
                ..Default::default()
            })
            .collect();
        for t in 0..tokens {
            for j in 0..k {
                let e = (t * k + j) % n_exp as usize;
                groups[e].rows.push(t as u32);
                groups[e].weights.push(1.0 / k as f32);
            }
        }
        let x = Tensor::from_f32(&[tokens, h], pseudo(tokens * h, 1)).unwrap();
        experts.forward_groups(&x, &groups).unwrap();
        let iters = 10;
        let start = Instant::now();
        for _ in 0..iters {
            experts.forward_groups(&x, &groups).unwrap();
        }
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        let flops = 6.0 * (tokens * k) as f64 * h as f64 * inter as f64;
        let tflops = flops / secs / 1e12;
        eprintln!(
            "experts: {per_expert:>3} rows/expert ({tokens:>4} tokens, top-{k} of {n_exp}): {:>8.3} ms  {tflops:>7.1} TFLOP/s{}",
            secs * 1e3,
            peak.map_or(String::new(), |p| format!(
                "  ({:.1}% of peak)",
                100.0 * tflops / p
            ))
        );
    }
}
