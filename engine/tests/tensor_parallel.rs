//! Splitting the router's projections over several GPUs (`router --device cuda:0,1,…`), the
//! parts a machine without GPUs can check: every family's projections split over whole heads
//! and non-empty MLP slices, and a split that cannot is refused before anything moves, naming
//! the projection. The device path itself is checked in `gpu.rs`
//! (`model_split_over_two_gpus_matches_the_host_model`); the arithmetic of the shards in
//! `model::shard`'s unit tests.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use switchyard_engine::model::{CausalLm, LoadOptions};
use switchyard_engine::synth::{self, SynthOptions};

fn load(preset: &str) -> (tempfile::TempDir, CausalLm) {
    let dir = tempfile::tempdir().unwrap();
    let options = SynthOptions {
        preset: preset.into(),
        ..Default::default()
    };
    synth::synth(dir.path(), &options).unwrap();
    let model = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
    (dir, model)
}

#[test]
fn every_family_splits_over_two_gpus() {
    for preset in synth::PRESETS.iter().filter(|p| p.starts_with("tiny")) {
        let (_dir, mut model) = load(preset);
        for ranks in [1, 2] {
            model
                .check_split(ranks)
                .unwrap_or_else(|e| panic!("{preset} over {ranks}: {e}"));
        }
    }
}

#[test]
fn a_split_without_a_head_for_every_gpu_names_the_projection() {
    let (_dir, mut model) = load("tiny");
    let heads = model.config().num_attention_heads;
    let err = model.check_split(heads + 1).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.") && err.contains(&format!("{} GPUs", heads + 1)),
        "{err}"
    );
    // One GPU per head is the most the attention splits over, and it does.
    model.check_split(heads).unwrap();
}
