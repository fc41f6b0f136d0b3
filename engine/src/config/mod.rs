//! Model configuration: parsing and validating Hugging Face `config.json`.
//!
//! Accepts `deepseek_v3` and `deepseek_v2` (here) and the GQA families `llama`, `mistral`,
//! `mixtral`, `qwen3`, `qwen3_moe`, `gemma3_text` (`families.rs`), in both schemas found in the
//! wild: the original one (top-level `rope_theta` and `rope_scaling`) and the transformers-5 one
//! (`rope_parameters`). Every value is checked once here; model code trusts [`ModelConfig`].
//! Architectures differ only in the knobs of one [`ModelConfig`].

mod families;

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// Which published architecture the checkpoint declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    DeepseekV2,
    DeepseekV3,
    Llama,
    Mistral,
    Mixtral,
    Qwen3,
    Qwen3Moe,
    Gemma3Text,
}

/// Every `model_type` this crate loads.
pub const MODEL_TYPES: &[&str] = &[
    "deepseek_v3",
    "deepseek_v2",
    "llama",
    "mistral",
    "mixtral",
    "qwen3",
    "qwen3_moe",
    "gemma3_text",
];

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::DeepseekV2 => "deepseek_v2",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Mixtral => "mixtral",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Gemma3Text => "gemma3_text",
        }
    }

    fn from_model_type(s: &str) -> Option<Arch> {
        Some(match s {
            "deepseek_v3" => Arch::DeepseekV3,
            "deepseek_v2" => Arch::DeepseekV2,
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "mixtral" => Arch::Mixtral,
            "qwen3" => Arch::Qwen3,
            "qwen3_moe" => Arch::Qwen3Moe,
            "gemma3_text" => Arch::Gemma3Text,
            _ => return None,
        })
    }
}

/// Multi-head Latent Attention dimensions.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query compression; `None` means a direct `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaConfig {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// Grouped-query attention: MHA when `num_key_value_heads` equals the query heads, MQA at 1.
#[derive(Clone, Debug, PartialEq)]
pub struct GqaConfig {
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Multiplies `q · k`: `head_dim^-0.5`, or Gemma's `query_pre_attn_scalar^-0.5`.
    pub scale: f32,
}

/// The attention of every layer.
#[derive(Clone, Debug, PartialEq)]
pub enum AttentionConfig {
    /// Multi-head Latent Attention (DeepSeek-V2/V3).
    Mla(MlaConfig),
    /// MHA / GQA / MQA with a per-head key and value cache.
    Gqa(GqaConfig),
}

impl AttentionConfig {
    /// The MLA dimensions, for code that only serves MLA models.
    pub fn mla(&self) -> Option<&MlaConfig> {
        match self {
            AttentionConfig::Mla(m) => Some(m),
            AttentionConfig::Gqa(_) => None,
        }
    }

    /// Floats cached per token per layer: MLA's latent and roped key, or GQA's keys and values.
    pub fn kv_row(&self) -> usize {
        match self {
            AttentionConfig::Mla(m) => m.kv_lora_rank + m.qk_rope_head_dim,
            AttentionConfig::Gqa(g) => 2 * g.num_key_value_heads * g.head_dim,
        }
    }
}

/// The FFN activation (the gate of the gated linear unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU.
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
}

/// Where the RMSNorms sit and how their scale applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NormStyle {
    /// Scale by `1 + weight` (Gemma) instead of `weight`.
    pub unit_offset: bool,
    /// Norms after attention and after the FFN too (Gemma 3's four norms per layer).
    pub sandwich: bool,
}

/// How the gate turns logits into scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

/// How the gate picks experts from scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    /// DeepSeek-V3: scores plus `e_score_correction_bias` pick the groups (by the sum of each
    /// group's top two) and the experts; the unbiased scores become the weights.
    NoAuxTc,
    /// Plain top-k over all experts.
    Greedy,
    /// DeepSeek-V2: groups ranked by their best expert score, then top-k inside the kept groups.
    GroupLimitedGreedy,
}

/// Which layers carry routed experts.
#[derive(Clone, Debug, PartialEq)]
pub enum MoeLayers {
    /// DeepSeek: from `first_k_dense_replace` on, every `moe_layer_freq`-th layer.
    DeepSeek {
        first_k_dense_replace: usize,
        moe_layer_freq: usize,
    },
    /// Qwen3-MoE / Mixtral: layer `l` is sparse when `(l + 1) % sparse_step == 0` and it is not
    /// in `mlp_only_layers`.
    Sparse {
        sparse_step: usize,
        mlp_only_layers: Vec<usize>,
    },
}

/// Tensor names of a checkpoint's MoE blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeNaming {
    /// The block under `model.layers.{l}`: `mlp` or Mixtral's `block_sparse_moe`.
    pub block: &'static str,
    /// An expert's gate, up and down projections: `gate_proj`, `up_proj`, `down_proj` or
    /// Mixtral's `w1`, `w3`, `w2`.
    pub projections: [&'static str; 3],
}

impl MoeNaming {
    pub const DEEPSEEK: MoeNaming = MoeNaming {
        block: "mlp",
        projections: ["gate_proj", "up_proj", "down_proj"],
    };
    pub const MIXTRAL: MoeNaming = MoeNaming {
        block: "block_sparse_moe",
        projections: ["w1", "w3", "w2"],
    };

    /// `model.layers.{layer}.{block}`: the gate is `{this}.gate`, expert `e` is
    /// `{this}.experts.{e}`.
    pub fn block_prefix(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.block)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub moe_intermediate_size: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub layers: MoeLayers,
    pub naming: MoeNaming,
}

/// YaRN context extension parameters (as DeepSeek-V3 uses them).
#[derive(Clone, Debug, PartialEq)]
pub struct YarnConfig {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
    /// Explicit cos/sin scale; derived from `mscale` / `mscale_all_dim` when absent.
    pub attention_factor: Option<f64>,
}

/// Llama 3.1's frequency scaling (`rope_type: llama3`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by the factor (`rope_type: linear`).
    Linear(f64),
    Yarn(YarnConfig),
    Llama3(Llama3Scaling),
}

/// Which elements of a head rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`: DeepSeek's layout.
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])`: `rotate_half`, the Llama / Qwen / Gemma / Mistral layout.
    Half,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    pub style: RopeStyle,
}

/// A validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Intermediate size of the dense FFN layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub attention: AttentionConfig,
    pub moe: Option<MoeConfig>,
    pub rope: RopeConfig,
    /// RoPE of the sliding-window layers where it differs from [`rope`](Self::rope) (Gemma 3's
    /// local theta).
    pub rope_local: Option<RopeConfig>,
    /// Tokens a sliding-window layer sees (itself included), and which layers slide.
    pub sliding_window: Option<usize>,
    pub sliding_layers: Vec<bool>,
    pub hidden_act: Activation,
    pub norm: NormStyle,
    /// Embeddings are multiplied by this (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    /// `tanh(logits / cap) · cap` on the LM head's output.
    pub final_logit_softcapping: Option<f32>,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        ModelConfig::from_json_str(&text)
    }

    pub fn from_json_str(text: &str) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| EngineError::config("config.json", format!("is not valid: {e}")))?;
        raw.validate()
    }

    /// Whether layer `layer` has a routed-expert FFN.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| match &m.layers {
            MoeLayers::DeepSeek {
                first_k_dense_replace,
                moe_layer_freq,
            } => layer >= *first_k_dense_replace && layer.is_multiple_of(*moe_layer_freq),
            MoeLayers::Sparse {
                sparse_step,
                mlp_only_layers,
            } => (layer + 1).is_multiple_of(*sparse_step) && !mlp_only_layers.contains(&layer),
        })
    }

    /// The window of layer `layer` if it is a sliding-window layer.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }

    /// The RoPE of layer `layer`.
    pub fn rope_of(&self, layer: usize) -> &RopeConfig {
        match (&self.rope_local, self.window(layer)) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        }
    }

    /// Dimension RoPE rotates per head.
    pub fn rope_dim(&self) -> usize {
        match &self.attention {
            AttentionConfig::Mla(m) => m.qk_rope_head_dim,
            AttentionConfig::Gqa(g) => g.head_dim,
        }
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    /// A short fingerprint of the model's shape, so a router can refuse a worker serving a
    /// different model.
    pub fn identity(&self) -> String {
        format!(
            "{}/h{}/l{}/e{}/v{}",
            self.arch.model_type(),
            self.hidden_size,
            self.num_hidden_layers,
            self.moe.as_ref().map_or(0, |m| m.n_routed_experts),
            self.vocab_size
        )
    }

    /// Softmax scale of attention scores, including YaRN's mscale² correction.
    pub fn softmax_scale(&self) -> f32 {
        let a = match &self.attention {
            AttentionConfig::Mla(m) => m,
            AttentionConfig::Gqa(g) => return g.scale,
        };
        let mut scale = (a.qk_head_dim() as f64).powf(-0.5);
        if let RopeScaling::Yarn(y) = &self.rope.scaling
            && y.mscale_all_dim != 0.0
        {
            let m = yarn_get_mscale(y.factor, y.mscale_all_dim);
            scale *= m * m;
        }
        scale as f32
    }

    /// Parameter count of the whole model.
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let heads = self.num_attention_heads as u64;
        let attn = match &self.attention {
            AttentionConfig::Mla(a) => {
                let qk = a.qk_head_dim() as u64;
                let q = match a.q_lora_rank {
                    Some(r) => h * r as u64 + r as u64 + r as u64 * heads * qk,
                    None => h * heads * qk,
                };
                let kv_lora = a.kv_lora_rank as u64;
                q + h * (kv_lora + a.qk_rope_head_dim as u64)
                    + kv_lora
                    + kv_lora * heads * (a.qk_nope_head_dim + a.v_head_dim) as u64
                    + heads * a.v_head_dim as u64 * h
            }
            AttentionConfig::Gqa(g) => {
                let d = g.head_dim as u64;
                let kv = g.num_key_value_heads as u64;
                2 * h * heads * d + 2 * h * kv * d + if g.qk_norm { 2 * d } else { 0 }
            }
        };
        let norms = if self.norm.sandwich { 4 } else { 2 };
        let mut total =
            self.vocab_size as u64 * h * if self.tie_word_embeddings { 1 } else { 2 } + h;
        for layer in 0..self.num_hidden_layers {
            total += attn + norms * h;
            total += match (&self.moe, self.is_moe_layer(layer)) {
                (Some(m), true) => {
                    let e = m.moe_intermediate_size as u64;
                    let routed = m.n_routed_experts as u64 * 3 * h * e;
                    let shared = m.n_shared_experts as u64 * 3 * h * e;
                    let gate = m.n_routed_experts as u64 * (h + 1);
                    routed + shared + gate
                }
                _ => 3 * h * self.intermediate_size as u64,
            };
        }
        total
    }
}

/// YaRN's attention temperature: `0.1 * mscale * ln(scale) + 1` (1 for scale <= 1).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// `config.json` as written, before validation.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    moe_intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    n_shared_experts: Option<i64>,
    n_routed_experts: Option<i64>,
    routed_scaling_factor: Option<f64>,
    kv_lora_rank: Option<i64>,
    q_lora_rank: Option<i64>,
    qk_rope_head_dim: Option<i64>,
    v_head_dim: Option<i64>,
    qk_nope_head_dim: Option<i64>,
    n_group: Option<i64>,
    topk_group: Option<i64>,
    num_experts_per_tok: Option<i64>,
    first_k_dense_replace: Option<i64>,
    moe_layer_freq: Option<i64>,
    norm_topk_prob: Option<bool>,
    scoring_func: Option<String>,
    topk_method: Option<String>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<i64>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    // The GQA families (see `families`).
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<i64>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<i64>,
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    hidden_activation: Option<String>,
    rope_local_base_freq: Option<f64>,
    partial_rotary_factor: Option<f64>,
    num_experts: Option<i64>,
    num_local_experts: Option<i64>,
    decoder_sparse_step: Option<i64>,
    mlp_only_layers: Option<Vec<i64>>,
}

fn positive(field: &str, value: Option<i64>) -> Result<usize> {
    match value {
        Some(v) if v > 0 => Ok(v as usize),
        Some(v) => Err(EngineError::config(
            field,
            format!("must be a positive integer, got {v}"),
        )),
        None => Err(EngineError::config(field, "is required but missing")),
    }
}

fn positive_or(field: &str, value: Option<i64>, default: usize) -> Result<usize> {
    match value {
        None => Ok(default),
        v => positive(field, v),
    }
}

fn token_ids(field: &str, value: &Option<Value>) -> Result<Vec<u32>> {
    let bad = |v: &Value| {
        EngineError::config(
            field,
            format!("must be a token id or a list of them, got {v}"),
        )
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .map(|v| vec![v])
            .ok_or_else(|| bad(&Value::Number(n.clone()))),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| bad(v))
            })
            .collect(),
        Some(v) => Err(bad(v)),
    }
}

impl RawConfig {
    fn validate(self) -> Result<ModelConfig> {
        let arch = match self.model_type.as_deref() {
            Some(t) => Arch::from_model_type(t).ok_or_else(|| {
                EngineError::config(
                    "model_type",
                    format!("must be one of {}; got {t:?}", MODEL_TYPES.join(", ")),
                )
            })?,
            None => return Err(EngineError::config("model_type", "is required but missing")),
        };
        if !matches!(arch, Arch::DeepseekV2 | Arch::DeepseekV3) {
            return self.validate_gqa_family(arch);
        }
        if let Some(act) = self.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(EngineError::config(
                "hidden_act",
                format!("must be \"silu\", got {act:?}"),
            ));
        }
        let hidden_size = positive("hidden_size", self.hidden_size)?;
        let num_hidden_layers = positive("num_hidden_layers", self.num_hidden_layers)?;
        let num_attention_heads = positive("num_attention_heads", self.num_attention_heads)?;
        let vocab_size = positive("vocab_size", self.vocab_size)?;
        let intermediate_size = positive("intermediate_size", self.intermediate_size)?;
        let q_lora_rank = match self.q_lora_rank {
            None => None,
            v => Some(positive("q_lora_rank", v)?),
        };
        let mla = MlaConfig {
            q_lora_rank,
            kv_lora_rank: positive("kv_lora_rank", self.kv_lora_rank)?,
            qk_nope_head_dim: positive("qk_nope_head_dim", self.qk_nope_head_dim)?,
            qk_rope_head_dim: positive("qk_rope_head_dim", self.qk_rope_head_dim)?,
            v_head_dim: positive("v_head_dim", self.v_head_dim)?,
        };
        if !mla.qk_rope_head_dim.is_multiple_of(2) {
            return Err(EngineError::config(
                "qk_rope_head_dim",
                format!("must be even, got {}", mla.qk_rope_head_dim),
            ));
        }

        let moe = match self.n_routed_experts {
            None | Some(0) => None,
            n => Some(self.moe_config(arch, n)?),
        };

        let max_position_embeddings = positive_or(
            "max_position_embeddings",
            self.max_position_embeddings,
            4096,
        )?;
        let rope = self.rope_config(max_position_embeddings, RopeStyle::Interleaved)?;
        let rms_norm_eps = self.rms_norm_eps()?;
        let (bos, eos_token_ids) = self.special_tokens(vocab_size)?;
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            attention: AttentionConfig::Mla(mla),
            moe,
            rope,
            rope_local: None,
            sliding_window: None,
            sliding_layers: vec![false; num_hidden_layers],
            hidden_act: Activation::Silu,
            norm: NormStyle::default(),
            embed_scale: None,
            final_logit_softcapping: None,
            rms_norm_eps,
            max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id: bos.first().copied(),
            eos_token_ids,
        })
    }

    fn rms_norm_eps(&self) -> Result<f32> {
        let rms_norm_eps = self.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(EngineError::config(
                "rms_norm_eps",
                format!("must be in (0, 1), got {rms_norm_eps}"),
            ));
        }
        Ok(rms_norm_eps as f32)
    }

    /// `(bos, eos)` token ids, each checked against the vocabulary.
    fn special_tokens(&self, vocab_size: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let bos = token_ids("bos_token_id", &self.bos_token_id)?;
        let eos_token_ids = token_ids("eos_token_id", &self.eos_token_id)?;
        for (field, ids) in [("bos_token_id", &bos), ("eos_token_id", &eos_token_ids)] {
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(EngineError::config(
                    field,
                    format!("must be < vocab_size ({vocab_size}), got {id}"),
                ));
            }
        }
        Ok((bos, eos_token_ids))
    }

    fn moe_config(&self, arch: Arch, n_routed: Option<i64>) -> Result<MoeConfig> {
        let n_routed_experts = positive("n_routed_experts", n_routed)?;
        let n_group = positive_or("n_group", self.n_group, 1)?;
        let topk_group = positive_or("topk_group", self.topk_group, 1)?;
        let num_experts_per_tok = positive("num_experts_per_tok", self.num_experts_per_tok)?;
        let default_scoring = match arch {
            Arch::DeepseekV3 => "sigmoid",
            _ => "softmax",
        };
        let scoring_func = match self.scoring_func.as_deref().unwrap_or(default_scoring) {
            "sigmoid" => ScoringFunc::Sigmoid,
            "softmax" => ScoringFunc::Softmax,
            other => {
                return Err(EngineError::config(
                    "scoring_func",
                    format!("must be \"sigmoid\" or \"softmax\", got {other:?}"),
                ));
            }
        };
        let default_method = match arch {
            Arch::DeepseekV3 => "noaux_tc",
            _ => "greedy",
        };
        let topk_method = match self.topk_method.as_deref().unwrap_or(default_method) {
            "noaux_tc" => TopkMethod::NoAuxTc,
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            other => {
                return Err(EngineError::config(
                    "topk_method",
                    format!("must be one of noaux_tc, greedy, group_limited_greedy; got {other:?}"),
                ));
            }
        };
        if !n_routed_experts.is_multiple_of(n_group) {
            return Err(EngineError::config(
                "n_group",
                format!("must divide n_routed_experts ({n_routed_experts}), got {n_group}"),
            ));
        }
        if topk_group > n_group {
            return Err(EngineError::config(
                "topk_group",
                format!("must be <= n_group ({n_group}), got {topk_group}"),
            ));
        }
        let per_group = n_routed_experts / n_group;
        let selectable = match topk_method {
            TopkMethod::Greedy => n_routed_experts,
            _ => topk_group * per_group,
        };
        if num_experts_per_tok > selectable {
            return Err(EngineError::config(
                "num_experts_per_tok",
                format!(
                    "must be <= the experts in the kept groups ({selectable}), got {num_experts_per_tok}"
                ),
            ));
        }
        if topk_method == TopkMethod::NoAuxTc && per_group < 2 {
            return Err(EngineError::config(
                "n_group",
                format!(
                    "must leave at least 2 experts per group for noaux_tc group scores, got {per_group} per group"
                ),
            ));
        }
        let routed_scaling_factor = self.routed_scaling_factor.unwrap_or(1.0);
        if !(routed_scaling_factor.is_finite() && routed_scaling_factor > 0.0) {
            return Err(EngineError::config(
                "routed_scaling_factor",
                format!("must be a positive number, got {routed_scaling_factor}"),
            ));
        }
        Ok(MoeConfig {
            n_routed_experts,
            n_shared_experts: match self.n_shared_experts {
                None | Some(0) => 0,
                v => positive("n_shared_experts", v)?,
            },
            moe_intermediate_size: positive("moe_intermediate_size", self.moe_intermediate_size)?,
            num_experts_per_tok,
            n_group,
            topk_group,
            routed_scaling_factor: routed_scaling_factor as f32,
            norm_topk_prob: self.norm_topk_prob.unwrap_or(arch == Arch::DeepseekV3),
            scoring_func,
            topk_method,
            layers: MoeLayers::DeepSeek {
                first_k_dense_replace: match self.first_k_dense_replace {
                    None | Some(0) => 0,
                    v => positive("first_k_dense_replace", v)?,
                },
                moe_layer_freq: positive_or("moe_layer_freq", self.moe_layer_freq, 1)?,
            },
            naming: MoeNaming::DEEPSEEK,
        })
    }

    fn rope_config(&self, max_position_embeddings: usize, style: RopeStyle) -> Result<RopeConfig> {
        // transformers 5 folds theta and scaling into `rope_parameters`; the original schema keeps
        // `rope_theta` at the top level and the scaling dict in `rope_scaling`.
        let (params, field) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p @ Value::Object(_)), _) => (Some(p), "rope_parameters"),
            (_, Some(s @ Value::Object(_))) => (Some(s), "rope_scaling"),
            (Some(Value::Null) | None, Some(Value::Null) | None) => (None, "rope_scaling"),
            (Some(v), _) => {
                return Err(EngineError::config(
                    "rope_parameters",
                    format!("must be an object, got {v}"),
                ));
            }
            (_, Some(v)) => {
                return Err(EngineError::config(
                    "rope_scaling",
                    format!("must be an object or null, got {v}"),
                ));
            }
        };
        parse_rope(
            params,
            field,
            self.rope_theta,
            10000.0,
            max_position_embeddings,
            style,
        )
    }
}

/// One RoPE parameter dict (`rope_parameters`, `rope_scaling`, or one of Gemma 3's per-layer-type
/// dicts), with `top_theta` the top-level `rope_theta` of the original schema.
fn parse_rope(
    params: Option<&Value>,
    field: &str,
    top_theta: Option<f64>,
    default_theta: f64,
    max_position_embeddings: usize,
    style: RopeStyle,
) -> Result<RopeConfig> {
    {
        let num = |key: &str| -> Result<Option<f64>> {
            match params.and_then(|p| p.get(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    EngineError::config(
                        format!("{field}.{key}"),
                        format!("must be a number, got {v}"),
                    )
                }),
            }
        };
        let theta = match num("rope_theta")?.or(top_theta) {
            Some(t) if t > 0.0 && t.is_finite() => t,
            Some(t) => {
                return Err(EngineError::config(
                    "rope_theta",
                    format!("must be a positive number, got {t}"),
                ));
            }
            None => default_theta,
        };
        let rope_type = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = |at_least: f64| -> Result<f64> {
            match num("factor")? {
                Some(f) if f >= at_least && f.is_finite() => Ok(f),
                Some(f) => Err(EngineError::config(
                    format!("{field}.factor"),
                    format!("must be >= {at_least}, got {f}"),
                )),
                None => Err(EngineError::config(
                    format!("{field}.factor"),
                    format!("is required for {rope_type}"),
                )),
            }
        };
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear(factor(1.0)?),
            "llama3" => {
                let required = |key: &str| -> Result<f64> {
                    match num(key)? {
                        Some(v) if v > 0.0 && v.is_finite() => Ok(v),
                        Some(v) => Err(EngineError::config(
                            format!("{field}.{key}"),
                            format!("must be a positive number, got {v}"),
                        )),
                        None => Err(EngineError::config(
                            format!("{field}.{key}"),
                            "is required for llama3",
                        )),
                    }
                };
                let low_freq_factor = required("low_freq_factor")?;
                let high_freq_factor = required("high_freq_factor")?;
                if high_freq_factor <= low_freq_factor {
                    return Err(EngineError::config(
                        format!("{field}.high_freq_factor"),
                        format!(
                            "must be > low_freq_factor ({low_freq_factor}), got {high_freq_factor}"
                        ),
                    ));
                }
                RopeScaling::Llama3(Llama3Scaling {
                    factor: factor(1.0)?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: required("original_max_position_embeddings")?
                        as usize,
                })
            }
            "yarn" => {
                let factor = factor(1.0)?;
                let original = match num("original_max_position_embeddings")? {
                    Some(v) if v >= 1.0 => v as usize,
                    Some(v) => {
                        return Err(EngineError::config(
                            format!("{field}.original_max_position_embeddings"),
                            format!("must be a positive integer, got {v}"),
                        ));
                    }
                    None => max_position_embeddings,
                };
                RopeScaling::Yarn(YarnConfig {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: num("beta_fast")?.unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.unwrap_or(1.0),
                    mscale: num("mscale")?.unwrap_or(1.0),
                    mscale_all_dim: num("mscale_all_dim")?.unwrap_or(0.0),
                    attention_factor: num("attention_factor")?,
                })
            }
            other => {
                return Err(EngineError::config(
                    format!("{field}.rope_type"),
                    format!(
                        "must be one of \"default\", \"linear\", \"yarn\", \"llama3\"; got {other:?}"
                    ),
                ));
            }
        };
        Ok(RopeConfig {
            theta,
            scaling,
            style,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3_ORIGINAL: &str = r#"{
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
        "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1
    }"#;

    #[test]
    fn parses_the_original_deepseek_v3_schema() {
        let c = ModelConfig::from_json_str(V3_ORIGINAL).unwrap();
        assert_eq!(c.arch, Arch::DeepseekV3);
        assert_eq!(c.attention.mla().unwrap().q_lora_rank, Some(1536));
        let moe = c.moe.as_ref().unwrap();
        assert_eq!(moe.topk_method, TopkMethod::NoAuxTc);
        assert_eq!(moe.scoring_func, ScoringFunc::Sigmoid);
        assert_eq!(c.rope.theta, 10000.0);
        match &c.rope.scaling {
            RopeScaling::Yarn(y) => {
                assert_eq!(y.factor, 40.0);
                assert_eq!(y.original_max_position_embeddings, 4096);
            }
            other => panic!("expected yarn, got {other:?}"),
        }
        assert_eq!(c.moe_layers().len(), 58);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
        // ~671 B parameters.
        let params = c.parameter_count() as f64 / 1e9;
        assert!((params - 671.0).abs() < 2.0, "{params}");
    }

    #[test]
    fn parses_the_transformers_5_rope_parameters_schema() {
        let mut v: Value = serde_json::from_str(V3_ORIGINAL).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("rope_theta");
        obj.remove("rope_scaling");
        obj.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "rope_theta": 5000.0, "factor": 40,
                "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                "mscale": 1.0, "mscale_all_dim": 1.0}),
        );
        let c = ModelConfig::from_json_str(&v.to_string()).unwrap();
        assert_eq!(c.rope.theta, 5000.0);
        assert!(matches!(c.rope.scaling, RopeScaling::Yarn(_)));
        let original = ModelConfig::from_json_str(V3_ORIGINAL).unwrap();
        assert!((c.softmax_scale() - original.softmax_scale()).abs() < 1e-9);
    }

    fn with(key: &str, value: Value) -> String {
        let mut v: Value = serde_json::from_str(V3_ORIGINAL).unwrap();
        v.as_object_mut().unwrap().insert(key.into(), value);
        v.to_string()
    }

    #[test]
    fn invalid_values_name_the_field_and_the_value() {
        let cases = [
            ("hidden_size", serde_json::json!(0), "hidden_size", "0"),
            (
                "model_type",
                serde_json::json!("llama4"),
                "model_type",
                "llama4",
            ),
            ("n_group", serde_json::json!(7), "n_group", "7"),
            ("topk_group", serde_json::json!(9), "topk_group", "9"),
            (
                "num_experts_per_tok",
                serde_json::json!(200),
                "num_experts_per_tok",
                "200",
            ),
            (
                "scoring_func",
                serde_json::json!("relu"),
                "scoring_func",
                "relu",
            ),
            (
                "qk_rope_head_dim",
                serde_json::json!(63),
                "qk_rope_head_dim",
                "63",
            ),
            (
                "rms_norm_eps",
                serde_json::json!(-1.0),
                "rms_norm_eps",
                "-1",
            ),
            (
                "eos_token_id",
                serde_json::json!(999999),
                "eos_token_id",
                "999999",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "yarn", "factor": 0.5}),
                "factor",
                "0.5",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "ntk"}),
                "rope_type",
                "ntk",
            ),
        ];
        for (key, value, field, shown) in cases {
            let err = ModelConfig::from_json_str(&with(key, value))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{key}: {err}");
            assert!(err.contains(shown), "{key}: {err}");
        }
    }

    #[test]
    fn missing_required_field_is_named() {
        let mut v: Value = serde_json::from_str(V3_ORIGINAL).unwrap();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        let err = ModelConfig::from_json_str(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kv_lora_rank") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn deepseek_v2_defaults_to_softmax_greedy() {
        let v2 = r#"{"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
            "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
            "num_attention_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
            "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": null,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
            "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
            "norm_topk_prob": false, "rope_theta": 10000, "rope_scaling": null}"#;
        let c = ModelConfig::from_json_str(v2).unwrap();
        let moe = c.moe.unwrap();
        assert_eq!(moe.scoring_func, ScoringFunc::Softmax);
        assert_eq!(moe.topk_method, TopkMethod::Greedy);
        assert_eq!(c.attention.mla().unwrap().q_lora_rank, None);
        assert_eq!(c.rope.scaling, RopeScaling::None);
    }
}
