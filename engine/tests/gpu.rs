//! The CUDA backend against the CPU backend (feature `cuda`). Without a usable device every
//! test prints `SKIPPED` with the reason and returns; `tests/gpu/run.sh` runs them on a GPU.

#![cfg(feature = "cuda")]
// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use switchyard_engine::checkpoint::Checkpoint;
use switchyard_engine::config::MoeNaming;
use switchyard_engine::cuda::{Gpu, GpuExperts};
use switchyard_engine::model::experts::{ExpertGroup, RoutedExperts};
use switchyard_engine::synth::{self, SynthOptions};
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

fn pseudo(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

/// Routed experts of a `tiny` bf16 layer on the device give the CPU's combined rows within
/// bf16 rounding of the activations (both paths round them at the same points).
#[test]
fn gpu_experts_match_cpu_experts() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    synth::synth(dir.path(), &SynthOptions::default()).unwrap();
    let config = ModelConfig::from_dir(dir.path()).unwrap();
    let moe = config.moe.clone().unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let experts: BTreeSet<u32> = (0..moe.n_routed_experts as u32).collect();
    let (h, i) = (config.hidden_size, moe.moe_intermediate_size);
    let cpu = RoutedExperts::load(&ck, &MoeNaming::DEEPSEEK, 1, &experts, h, i).unwrap();
    let dev = GpuExperts::load(gpu, &ck, &MoeNaming::DEEPSEEK, 1, &experts, h, i).unwrap();
    for tokens in [1usize, 7, 64] {
        let x = Tensor::from_f32(&[tokens, h], pseudo(tokens * h, tokens as u32)).unwrap();
        // Each token to 4 experts, spread over all of them, with uneven weights.
        let mut groups: Vec<ExpertGroup> = (0..moe.n_routed_experts as u32)
            .map(|e| ExpertGroup {
                expert: e,
                ..Default::default()
            })
            .collect();
        for t in 0..tokens {
            for j in 0..4 {
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

/// An expert the device does not hold is a named error, as on the CPU.
#[test]
fn gpu_experts_refuse_an_expert_they_do_not_hold() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    synth::synth(dir.path(), &SynthOptions::default()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
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
