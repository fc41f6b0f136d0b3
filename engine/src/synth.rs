//! Random-weight checkpoints in the real Hugging Face layout (`switchyard synth`).
//!
//! Weights cannot be downloaded here, so every test and benchmark runs on checkpoints written
//! by this module: `config.json`, `generation_config.json` and safetensors (sharded with an
//! index past `shard_bytes`) with the exact tensor names of DeepSeek-V3 on the Hub — the very
//! files the loader reads for a real model. Tensors are generated lazily while being written,
//! so memory stays at one tensor whatever the checkpoint size, and each tensor's values depend
//! only on the seed and its name.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use rand_distr::{Distribution, StandardNormal};
use serde_json::{Value, json};

use crate::config::{AttentionConfig, ModelConfig, TopkMethod};
use crate::dtype::{self, DType, F8E4M3_MAX};
use crate::error::{EngineError, Result};
use crate::model::mlp::PROJECTIONS;

/// Built-in model shapes: DeepSeek's, then the GQA families' — real dimensions where the name
/// is a published model's, small shapes of the same architecture otherwise, and `tiny-*` test
/// shapes.
pub const PRESETS: &[&str] = &[
    "tiny",
    "mini",
    "deepseek-v3",
    "llama-3.2-1b",
    "qwen3-0.6b",
    "gemma3-1b",
    "qwen3-moe",
    "mixtral-mini",
    "mistral-mini",
    "tiny-llama",
    "tiny-qwen3",
    "tiny-qwen3-moe",
    "tiny-gemma3",
    "tiny-mistral",
    "tiny-mixtral",
];

/// Element type of the written weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthDType {
    F32,
    Bf16,
    /// DeepSeek-V3's layout: linear weights in FP8 e4m3 with 128×128 block `weight_scale_inv`;
    /// embeddings, norms, gate and LM head in bf16.
    Fp8,
}

impl std::str::FromStr for SynthDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(SynthDType::F32),
            "bf16" => Ok(SynthDType::Bf16),
            "fp8" => Ok(SynthDType::Fp8),
            other => Err(format!("must be one of f32, bf16, fp8; got {other:?}")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub preset: String,
    pub dtype: SynthDType,
    pub seed: u64,
    /// Override `num_hidden_layers`.
    pub layers: Option<usize>,
    /// Override `n_routed_experts`.
    pub experts: Option<usize>,
    /// Refuse to write more than this many bytes.
    pub max_bytes: u64,
    /// Start a new shard past this many bytes.
    pub shard_bytes: u64,
    /// Make the gate prefer some experts: each MoE layer's `e_score_correction_bias` gains
    /// `skew / (rank + 1)` (a Zipf shape) over a seeded ranking of its experts. 0 is none.
    pub expert_skew: f32,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::Bf16,
            seed: 0,
            layers: None,
            experts: None,
            max_bytes: 32 << 30,
            shard_bytes: 4 << 30,
            expert_skew: 0.0,
        }
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub parameters: u64,
    pub bytes: u64,
    pub files: Vec<PathBuf>,
}

/// The `config.json` of a GQA-family preset, or `None` for DeepSeek's.
fn gqa_preset(name: &str) -> Option<Value> {
    let (arch, model_type, specific) = match name {
        "llama-3.2-1b" => (
            "LlamaForCausalLM",
            "llama",
            json!({"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "tie_word_embeddings": true,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        ),
        "qwen3-0.6b" => (
            "Qwen3ForCausalLM",
            "qwen3",
            json!({"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": true,
                "use_sliding_window": false, "sliding_window": null, "max_window_layers": 28}),
        ),
        "gemma3-1b" => (
            "Gemma3ForCausalLM",
            "gemma3_text",
            json!({"vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
                "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                "sliding_window": 512, "sliding_window_pattern": 6,
                "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
                "final_logit_softcapping": null, "attn_logit_softcapping": null,
                "tie_word_embeddings": true}),
        ),
        // Qwen3-30B-A3B's gate (128 experts, top 8, renormalised) on a small body.
        "qwen3-moe" => (
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            json!({"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536,
                "moe_intermediate_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8,
                "num_key_value_heads": 2, "head_dim": 64, "num_experts": 128,
                "num_experts_per_tok": 8, "norm_topk_prob": true, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": false,
                "use_sliding_window": false, "sliding_window": null}),
        ),
        // Mixtral's gate (8 experts, top 2) on a small body.
        "mixtral-mini" => (
            "MixtralForCausalLM",
            "mixtral",
            json!({"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 1792,
                "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
                "head_dim": 64, "num_local_experts": 8, "num_experts_per_tok": 2,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                "rope_theta": 1000000.0, "sliding_window": null, "tie_word_embeddings": false}),
        ),
        "mistral-mini" => (
            "MistralForCausalLM",
            "mistral",
            json!({"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
                "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
                "head_dim": 64, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false}),
        ),
        "tiny-llama" => (
            "LlamaForCausalLM",
            "llama",
            json!({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "tie_word_embeddings": true,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        ),
        "tiny-qwen3" => (
            "Qwen3ForCausalLM",
            "qwen3",
            json!({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": true}),
        ),
        "tiny-qwen3-moe" => (
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            json!({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "num_experts": 16,
                "num_experts_per_tok": 4, "norm_topk_prob": true, "decoder_sparse_step": 1,
                "mlp_only_layers": [0], "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": false}),
        ),
        "tiny-gemma3" => (
            "Gemma3ForCausalLM",
            "gemma3_text",
            json!({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                "sliding_window": 8, "sliding_window_pattern": 3, "query_pre_attn_scalar": 16,
                "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true}),
        ),
        "tiny-mistral" => (
            "MistralForCausalLM",
            "mistral",
            json!({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "sliding_window": 8, "tie_word_embeddings": false}),
        ),
        "tiny-mixtral" => (
            "MixtralForCausalLM",
            "mixtral",
            json!({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                "sliding_window": null, "tie_word_embeddings": false}),
        ),
        _ => return None,
    };
    // Special tokens at 0 and 1, where the synthetic tokenizer puts them.
    let mut config = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "use_cache": true,
        "torch_dtype": "bfloat16",
    });
    if let (Some(c), Some(s)) = (config.as_object_mut(), specific.as_object()) {
        c.extend(s.clone());
    }
    Some(config)
}

/// The `config.json` of a preset: DeepSeek's in its original schema, the others as their
/// published `config.json` files spell them.
pub fn preset_config(name: &str) -> Result<Value> {
    if let Some(config) = gqa_preset(name) {
        return Ok(config);
    }
    let base = json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "moe_layer_freq": 1,
        "n_shared_experts": 1,
        "norm_topk_prob": true,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "routed_scaling_factor": 2.5,
        "use_cache": true,
        "torch_dtype": "bfloat16",
    });
    let specific = match name {
        "tiny" => json!({
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1,
            "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 16,
            "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "q_lora_rank": 32,
            "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "max_position_embeddings": 4096, "rope_scaling": null,
        }),
        "mini" => json!({
            "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
            "moe_intermediate_size": 512, "num_hidden_layers": 8, "first_k_dense_replace": 1,
            "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
            "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "q_lora_rank": 384,
            "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
            "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        }),
        "deepseek-v3" => json!({
            "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3,
            "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
            "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        }),
        other => {
            return Err(EngineError::input(
                "preset",
                format!("must be one of {}; got {other:?}", PRESETS.join(", ")),
            ));
        }
    };
    let mut config = base;
    if let (Some(c), Some(s)) = (config.as_object_mut(), specific.as_object()) {
        c.extend(s.clone());
    }
    Ok(config)
}

#[derive(Clone, Copy, Debug)]
enum Init {
    /// N(0, 1/fan_in): keeps activations at unit scale through each linear.
    Linear { fan_in: usize },
    /// Embeddings: N(0, 1).
    Embedding,
    /// Norm scales: uniform in [0.8, 1.2].
    Norm,
    /// Gemma's norms store `scale - 1`: uniform in [-0.2, 0.2].
    NormOffset,
    /// `e_score_correction_bias`: uniform in [0, 0.1] — nonzero, so selection ≠ weighting —
    /// plus `skew / (rank + 1)` over a seeded ranking of the experts.
    RoutingBias { skew: f32 },
    /// A softmax gate's weight: as `Linear`, each expert's row then scaled by
    /// `1 + skew / (rank + 1)` over a seeded ranking — a larger row gives wider logits, which
    /// land in the top-k more often.
    GateRows { fan_in: usize, skew: f32 },
}

#[derive(Clone, Debug)]
struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
    /// Written as FP8 with block scales when the checkpoint is FP8.
    quantizable: bool,
}

fn specs(c: &ModelConfig, expert_skew: f32) -> Vec<Spec> {
    let h = c.hidden_size;
    let heads = c.num_attention_heads;
    let mut out = Vec::new();
    let linear =
        |out: &mut Vec<Spec>, name: String, rows: usize, cols: usize, quantizable: bool| {
            out.push(Spec {
                name,
                shape: vec![rows, cols],
                init: Init::Linear { fan_in: cols },
                quantizable,
            });
        };
    let norm_init = if c.norm.unit_offset {
        Init::NormOffset
    } else {
        Init::Norm
    };
    let norm = |out: &mut Vec<Spec>, name: String, dim: usize| {
        out.push(Spec {
            name,
            shape: vec![dim],
            init: norm_init,
            quantizable: false,
        });
    };
    let mlp = |out: &mut Vec<Spec>, prefix: String, [g, u, d]: [&str; 3], inter: usize| {
        for (name, shape, fan_in) in [
            (g, vec![inter, h], h),
            (u, vec![inter, h], h),
            (d, vec![h, inter], inter),
        ] {
            out.push(Spec {
                name: format!("{prefix}.{name}.weight"),
                shape,
                init: Init::Linear { fan_in },
                quantizable: true,
            });
        }
    };
    out.push(Spec {
        name: "model.embed_tokens.weight".into(),
        shape: vec![c.vocab_size, h],
        init: Init::Embedding,
        quantizable: false,
    });
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        norm(&mut out, format!("{p}.input_layernorm.weight"), h);
        let s = format!("{p}.self_attn");
        match &c.attention {
            AttentionConfig::Mla(a) => {
                match a.q_lora_rank {
                    Some(r) => {
                        linear(&mut out, format!("{s}.q_a_proj.weight"), r, h, true);
                        norm(&mut out, format!("{s}.q_a_layernorm.weight"), r);
                        let rows = heads * a.qk_head_dim();
                        linear(&mut out, format!("{s}.q_b_proj.weight"), rows, r, true);
                    }
                    None => {
                        let rows = heads * a.qk_head_dim();
                        linear(&mut out, format!("{s}.q_proj.weight"), rows, h, true);
                    }
                }
                let kv_a = a.kv_lora_rank + a.qk_rope_head_dim;
                linear(
                    &mut out,
                    format!("{s}.kv_a_proj_with_mqa.weight"),
                    kv_a,
                    h,
                    true,
                );
                norm(
                    &mut out,
                    format!("{s}.kv_a_layernorm.weight"),
                    a.kv_lora_rank,
                );
                let kv_b = heads * (a.qk_nope_head_dim + a.v_head_dim);
                linear(
                    &mut out,
                    format!("{s}.kv_b_proj.weight"),
                    kv_b,
                    a.kv_lora_rank,
                    true,
                );
                linear(
                    &mut out,
                    format!("{s}.o_proj.weight"),
                    h,
                    heads * a.v_head_dim,
                    true,
                );
            }
            AttentionConfig::Gqa(g) => {
                let (q, kv) = (heads * g.head_dim, g.num_key_value_heads * g.head_dim);
                linear(&mut out, format!("{s}.q_proj.weight"), q, h, true);
                linear(&mut out, format!("{s}.k_proj.weight"), kv, h, true);
                linear(&mut out, format!("{s}.v_proj.weight"), kv, h, true);
                linear(&mut out, format!("{s}.o_proj.weight"), h, q, true);
                if g.qk_norm {
                    norm(&mut out, format!("{s}.q_norm.weight"), g.head_dim);
                    norm(&mut out, format!("{s}.k_norm.weight"), g.head_dim);
                }
            }
        }
        norm(&mut out, format!("{p}.post_attention_layernorm.weight"), h);
        if c.norm.sandwich {
            norm(&mut out, format!("{p}.pre_feedforward_layernorm.weight"), h);
            norm(
                &mut out,
                format!("{p}.post_feedforward_layernorm.weight"),
                h,
            );
        }
        match (&c.moe, c.is_moe_layer(l)) {
            (Some(m), true) => {
                let block = m.naming.block_prefix(l);
                let biased = m.topk_method == TopkMethod::NoAuxTc;
                out.push(Spec {
                    name: format!("{block}.gate.weight"),
                    shape: vec![m.n_routed_experts, h],
                    init: if biased || expert_skew == 0.0 {
                        Init::Linear { fan_in: h }
                    } else {
                        Init::GateRows {
                            fan_in: h,
                            skew: expert_skew,
                        }
                    },
                    quantizable: false,
                });
                if biased {
                    out.push(Spec {
                        name: format!("{block}.gate.e_score_correction_bias"),
                        shape: vec![m.n_routed_experts],
                        init: Init::RoutingBias { skew: expert_skew },
                        quantizable: false,
                    });
                }
                for e in 0..m.n_routed_experts {
                    mlp(
                        &mut out,
                        format!("{block}.experts.{e}"),
                        m.naming.projections,
                        m.moe_intermediate_size,
                    );
                }
                if m.n_shared_experts > 0 {
                    mlp(
                        &mut out,
                        format!("{block}.shared_experts"),
                        PROJECTIONS,
                        m.moe_intermediate_size * m.n_shared_experts,
                    );
                }
            }
            _ => mlp(
                &mut out,
                format!("{p}.mlp"),
                PROJECTIONS,
                c.intermediate_size,
            ),
        }
    }
    norm(&mut out, "model.norm.weight".into(), h);
    if !c.tie_word_embeddings {
        linear(&mut out, "lm_head.weight".into(), c.vocab_size, h, false);
    }
    out
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    let mut h: u64 = 0xcbf29ce484222325 ^ seed.wrapping_mul(0x9e3779b97f4a7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn generate(spec: &Spec, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(name_seed(seed, &spec.name));
    let n: usize = spec.shape.iter().product();
    match spec.init {
        Init::Linear { fan_in } => {
            let std = (1.0 / fan_in as f64).sqrt() as f32;
            (0..n)
                .map(|_| Distribution::<f32>::sample(&StandardNormal, &mut rng) * std)
                .collect()
        }
        Init::Embedding => (0..n)
            .map(|_| Distribution::<f32>::sample(&StandardNormal, &mut rng))
            .collect(),
        Init::Norm => (0..n).map(|_| rng.random_range(0.8f32..1.2)).collect(),
        Init::NormOffset => (0..n).map(|_| rng.random_range(-0.2f32..0.2)).collect(),
        Init::GateRows { fan_in, skew } => {
            let std = (1.0 / fan_in as f64).sqrt() as f32;
            let mut w: Vec<f32> = (0..n)
                .map(|_| Distribution::<f32>::sample(&StandardNormal, &mut rng) * std)
                .collect();
            let rows = n / fan_in.max(1);
            let mut rank: Vec<usize> = (0..rows).collect();
            rank.shuffle(&mut rng);
            for (r, &e) in rank.iter().enumerate() {
                let scale = 1.0 + skew / (r + 1) as f32;
                w[e * fan_in..(e + 1) * fan_in]
                    .iter_mut()
                    .for_each(|v| *v *= scale);
            }
            w
        }
        Init::RoutingBias { skew } => {
            let mut bias: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..0.1)).collect();
            if skew != 0.0 {
                // A seeded ranking per layer, so each layer has its own hot experts.
                let mut rank: Vec<usize> = (0..n).collect();
                rank.shuffle(&mut rng);
                for (r, &e) in rank.iter().enumerate() {
                    bias[e] += skew / (r + 1) as f32;
                }
            }
            bias
        }
    }
}

/// Block-quantises a `[rows, cols]` matrix: FP8 codes and `[⌈rows/128⌉, ⌈cols/128⌉]` scales
/// (`weight_scale_inv`, the factor that dequantises).
pub fn quantize_fp8_blocks(
    data: &[f32],
    rows: usize,
    cols: usize,
    block: usize,
) -> (Vec<u8>, Vec<f32>) {
    let (br, bc) = (rows.div_ceil(block), cols.div_ceil(block));
    let mut scales = vec![0.0f32; br * bc];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / block) * bc + c / block];
            *s = s.max(data[r * cols + c].abs());
        }
    }
    for s in scales.iter_mut() {
        *s = if *s > 0.0 { *s / F8E4M3_MAX } else { 1.0 };
    }
    let codes = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            dtype::f32_to_f8e4m3(data[i] / scales[(r / block) * bc + c / block])
        })
        .collect();
    (codes, scales)
}

const FP8_BLOCK: usize = 128;

/// A tensor whose bytes are generated when the writer asks for them.
struct LazyTensor {
    spec: Spec,
    /// What to produce from the spec's values.
    part: Part,
    dtype: DType,
    shape: Vec<usize>,
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Values,
    Fp8Codes,
    Fp8Scales,
}

impl LazyTensor {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

impl safetensors::View for &LazyTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let values = generate(&self.spec, self.seed);
        let bytes = match self.part {
            Part::Values => match self.dtype {
                DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                    .collect(),
            },
            Part::Fp8Codes | Part::Fp8Scales => {
                let (rows, cols) = (self.spec.shape[0], self.spec.shape[1]);
                let (codes, scales) = quantize_fp8_blocks(&values, rows, cols, FP8_BLOCK);
                if self.part == Part::Fp8Codes {
                    codes
                } else {
                    scales.iter().flat_map(|v| v.to_le_bytes()).collect()
                }
            }
        };
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.byte_len()
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Writes a complete random checkpoint of `options.preset` into `out`.
pub fn synth(out: &Path, options: &SynthOptions) -> Result<SynthSummary> {
    let mut config = preset_config(&options.preset)?;
    if let Some(obj) = config.as_object_mut() {
        if let Some(layers) = options.layers {
            obj.insert("num_hidden_layers".into(), json!(layers));
        }
        if let Some(experts) = options.experts {
            let key = match obj.get("model_type").and_then(Value::as_str) {
                Some("qwen3_moe") => "num_experts",
                Some("mixtral") => "num_local_experts",
                _ => "n_routed_experts",
            };
            obj.insert(key.into(), json!(experts));
        }
        match options.dtype {
            SynthDType::F32 => {
                obj.insert("torch_dtype".into(), json!("float32"));
            }
            SynthDType::Bf16 => {}
            SynthDType::Fp8 => {
                obj.insert(
                    "quantization_config".into(),
                    json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                        "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}),
                );
            }
        }
    }
    let parsed = ModelConfig::from_json_str(&config.to_string())?;
    if !(options.expert_skew.is_finite() && options.expert_skew >= 0.0) {
        return Err(EngineError::input(
            "expert_skew",
            format!("must be >= 0, got {}", options.expert_skew),
        ));
    }
    if options.expert_skew > 0.0 && parsed.moe.is_none() {
        return Err(EngineError::input(
            "expert_skew",
            format!(
                "needs routed experts; preset {:?} is dense, got {}",
                options.preset, options.expert_skew
            ),
        ));
    }
    let mut tensors = Vec::new();
    for spec in specs(&parsed, options.expert_skew) {
        let fp8 = options.dtype == SynthDType::Fp8 && spec.quantizable;
        let shape = spec.shape.clone();
        if fp8 {
            let scale_shape = vec![shape[0].div_ceil(FP8_BLOCK), shape[1].div_ceil(FP8_BLOCK)];
            let scale_name = format!("{}_scale_inv", spec.name);
            tensors.push((
                spec.name.clone(),
                LazyTensor {
                    spec: spec.clone(),
                    part: Part::Fp8Codes,
                    dtype: DType::F8E4M3,
                    shape,
                    seed: options.seed,
                },
            ));
            tensors.push((
                scale_name,
                LazyTensor {
                    spec,
                    part: Part::Fp8Scales,
                    dtype: DType::F32,
                    shape: scale_shape,
                    seed: options.seed,
                },
            ));
        } else {
            let dtype = match (options.dtype, spec.init) {
                (SynthDType::F32, _) | (_, Init::RoutingBias { .. }) => DType::F32,
                _ => DType::Bf16,
            };
            tensors.push((
                spec.name.clone(),
                LazyTensor {
                    spec,
                    part: Part::Values,
                    dtype,
                    shape,
                    seed: options.seed,
                },
            ));
        }
    }
    let total: u64 = tensors.iter().map(|(_, t)| t.byte_len() as u64).sum();
    if total > options.max_bytes {
        return Err(EngineError::Synth(format!(
            "preset {:?} with {} layers and {} routed experts is {} parameters, {} on disk, over the {} limit; \
             shrink it with --layers N and/or --experts N (or raise --max-bytes)",
            options.preset,
            parsed.num_hidden_layers,
            parsed.moe.as_ref().map_or(0, |m| m.n_routed_experts),
            parsed.parameter_count(),
            human_bytes(total),
            human_bytes(options.max_bytes),
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| EngineError::io(out, e))?;
    let write_json = |name: &str, value: &Value| -> Result<PathBuf> {
        let path = out.join(name);
        let text =
            serde_json::to_string_pretty(value).map_err(|e| EngineError::Synth(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| EngineError::io(&path, e))?;
        Ok(path)
    };
    let mut files = vec![
        write_json("config.json", &config)?,
        write_json(
            "generation_config.json",
            &json!({"bos_token_id": parsed.bos_token_id, "eos_token_id": parsed.eos_token_ids.first(), "do_sample": false}),
        )?,
    ];
    // A byte-level BPE the size of the vocabulary, so text works end to end. It puts the
    // begin/end-of-sentence tokens at ids 0 and 1, which is what every preset declares.
    if parsed.vocab_size >= 260
        && parsed.bos_token_id == Some(0)
        && parsed.eos_token_ids.first() == Some(&1)
    {
        crate::tokenizer::write_synthetic(out, parsed.vocab_size, options.seed)?;
        files.push(out.join("tokenizer.json"));
        files.push(out.join("tokenizer_config.json"));
    }
    // Split into shards by size, keeping order.
    let mut shards: Vec<Vec<&(String, LazyTensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in &tensors {
        let len = t.1.byte_len() as u64;
        if current > 0 && current + len > options.shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += len;
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    if shards.len() == 1 {
        let path = out.join(crate::checkpoint::SINGLE_FILE);
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.clone(), t)),
            Some(metadata),
            &path,
        )
        .map_err(|e| EngineError::Synth(format!("writing {}: {e}", path.display())))?;
        files.push(path);
    } else {
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let path = out.join(&file);
            safetensors::serialize_to_file(
                shard.iter().map(|(n, t)| (n.clone(), t)),
                Some(metadata.clone()),
                &path,
            )
            .map_err(|e| EngineError::Synth(format!("writing {}: {e}", path.display())))?;
            for (name, _) in shard {
                weight_map.insert(name.clone(), json!(file));
            }
            files.push(path);
        }
        files.push(write_json(
            crate::checkpoint::INDEX_FILE,
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?);
    }
    Ok(SynthSummary {
        parameters: parsed.parameter_count(),
        bytes: total,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mini_preset_has_the_benchmark_shape() {
        let c = ModelConfig::from_json_str(&preset_config("mini").unwrap().to_string()).unwrap();
        let params = c.parameter_count() as f64 / 1e6;
        assert!((params - 810.0).abs() < 5.0, "{params} M");
        assert_eq!(c.moe_layers().len(), 7);
    }

    #[test]
    fn every_preset_is_a_valid_config_and_the_real_ones_have_their_size() {
        for name in PRESETS {
            let c = ModelConfig::from_json_str(&preset_config(name).unwrap().to_string())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let billions = c.parameter_count() as f64 / 1e9;
            let want = match *name {
                "llama-3.2-1b" => 1.236,
                "qwen3-0.6b" => 0.596,
                "gemma3-1b" => 1.0,
                _ => continue,
            };
            assert!((billions - want).abs() < 0.01, "{name}: {billions} B");
        }
    }

    #[test]
    fn family_presets_write_what_their_loader_reads() {
        for name in [
            "tiny-llama",
            "tiny-qwen3",
            "tiny-qwen3-moe",
            "tiny-gemma3",
            "tiny-mistral",
            "tiny-mixtral",
        ] {
            let dir = tempfile::tempdir().unwrap();
            synth(
                dir.path(),
                &SynthOptions {
                    preset: name.into(),
                    ..Default::default()
                },
            )
            .unwrap();
            let model = crate::model::CausalLm::load(dir.path(), &Default::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut cache = model.new_cache(4);
            let out = model
                .forward(
                    &mut [crate::model::SeqInput {
                        tokens: &[0, 5, 9, 300],
                        cache: &mut cache,
                    }],
                    &Default::default(),
                )
                .unwrap();
            assert!(out.logits.as_f32().unwrap().iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn expert_skew_needs_routed_experts() {
        let dir = tempfile::tempdir().unwrap();
        let err = synth(
            dir.path(),
            &SynthOptions {
                preset: "tiny-llama".into(),
                expert_skew: 0.5,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expert_skew") && err.contains("0.5"), "{err}");
    }

    #[test]
    fn expert_skew_skews_softmax_gated_routing_too() {
        // Mixtral's softmax gate has no bias: the skew scales gate rows instead. Route many
        // random hidden rows through layer 0's gate and compare the busiest expert's share.
        let share_of_busiest = |skew: f32| {
            let dir = tempfile::tempdir().unwrap();
            synth(
                dir.path(),
                &SynthOptions {
                    preset: "tiny-mixtral".into(),
                    dtype: SynthDType::F32,
                    expert_skew: skew,
                    ..Default::default()
                },
            )
            .unwrap();
            let config = ModelConfig::from_dir(dir.path()).unwrap();
            let moe = config.moe.clone().unwrap();
            let ck = crate::checkpoint::Checkpoint::open(dir.path()).unwrap();
            let layer = config.moe_layers()[0];
            let name = format!("{}.gate.weight", moe.naming.block_prefix(layer));
            let (experts, h) = (moe.n_routed_experts, config.hidden_size);
            let w = ck.load_weight(&name, &[experts, h]).unwrap();
            let mut rng = StdRng::seed_from_u64(3);
            let mut counts = vec![0usize; experts];
            for _ in 0..2000 {
                let x: Vec<f32> = (0..h)
                    .map(|_| Distribution::<f32>::sample(&StandardNormal, &mut rng))
                    .collect();
                let mut logits: Vec<(f32, usize)> = (0..experts)
                    .map(|e| {
                        let row = &w.as_f32().unwrap()[e * h..(e + 1) * h];
                        (row.iter().zip(&x).map(|(a, b)| a * b).sum(), e)
                    })
                    .collect();
                logits.sort_by(|a, b| b.0.total_cmp(&a.0));
                for &(_, e) in logits.iter().take(moe.num_experts_per_tok) {
                    counts[e] += 1;
                }
            }
            *counts.iter().max().unwrap() as f64 / counts.iter().sum::<usize>() as f64
        };
        let (flat, skewed) = (share_of_busiest(0.0), share_of_busiest(2.0));
        assert!(
            skewed > flat * 1.3,
            "busiest expert's share {flat} -> {skewed}"
        );
    }

    #[test]
    fn full_deepseek_v3_refuses_with_a_size_message() {
        let dir = tempfile::tempdir().unwrap();
        let err = synth(
            dir.path(),
            &SynthOptions {
                preset: "deepseek-v3".into(),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--layers") && err.contains("TiB"), "{err}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing written"
        );
    }

    #[test]
    fn unknown_preset_names_the_choices() {
        let err = preset_config("huge").unwrap_err().to_string();
        assert!(
            err.contains("preset") && err.contains("tiny") && err.contains("huge"),
            "{err}"
        );
    }

    #[test]
    fn fp8_block_quantisation_round_trips_within_e4m3_precision() {
        let data: Vec<f32> = (0..300 * 130)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (codes, scales) = quantize_fp8_blocks(&data, 300, 130, 128);
        assert_eq!(scales.len(), 3 * 2);
        for (i, &v) in data.iter().enumerate() {
            let (r, c) = (i / 130, i % 130);
            let back = dtype::f8e4m3_to_f32(codes[i]) * scales[(r / 128) * 2 + c / 128];
            assert!((back - v).abs() <= v.abs() / 16.0 + 1e-6, "{v} -> {back}");
        }
    }
}
