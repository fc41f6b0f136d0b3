//! A long prompt in one prefill chunk gives the logits of the same prompt fed in chunks of 7
//! and token by token (the decode path), for every attention variant: GQA with full
//! attention, uniform and interleaved sliding windows smaller than a query block, and MLA.
//! Prefill attention runs per block of queries over only the keys the block sees; a prompt
//! longer than several blocks checks the blocks' bounds and masks.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use switchyard_engine::model::{CausalLm, ForwardOptions, LoadOptions, LogitsFor, SeqInput};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};

/// Logits of every prompt token, feeding the prompt `chunk` tokens at a time.
fn logits(model: &CausalLm, prompt: &[u32], chunk: usize) -> Vec<f32> {
    let mut cache = model.new_cache(prompt.len());
    let options = ForwardOptions {
        logits: LogitsFor::All,
        ..Default::default()
    };
    let mut out = Vec::new();
    for part in prompt.chunks(chunk) {
        let step = model
            .forward(
                &mut [SeqInput {
                    tokens: part,
                    cache: &mut cache,
                }],
                &options,
            )
            .unwrap();
        out.extend(step.logits.into_f32_vec());
    }
    out
}

#[test]
fn one_long_chunk_matches_short_chunks_and_decode() {
    let prompt: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % 500 + 2).collect();
    for preset in [
        "tiny-llama",
        "tiny-mistral",
        "tiny-gemma3",
        "tiny-qwen3",
        "tiny",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let options = SynthOptions {
            preset: preset.into(),
            dtype: SynthDType::F32,
            ..Default::default()
        };
        synth::synth(dir.path(), &options).unwrap();
        let model = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
        let whole = logits(&model, &prompt, prompt.len());
        for chunk in [7, 1] {
            let parts = logits(&model, &prompt, chunk);
            assert_eq!(whole.len(), parts.len());
            let worst = whole
                .iter()
                .zip(&parts)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{preset}, chunks of {chunk}: max |Δ| {worst:e}"
            );
        }
    }
}
