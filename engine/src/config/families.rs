//! The grouped-query-attention families: `llama`, `mistral`, `mixtral`, `qwen3`, `qwen3_moe`,
//! `gemma3_text`.
//!
//! Each becomes the same [`ModelConfig`] as DeepSeek with other knobs set: GQA instead of MLA,
//! rotate-half RoPE, QK-Norm, sliding windows, Gemma's norms and scales, a softmax top-k gate.
//! Defaults are those of the transformers config classes, so a `config.json` that leaves a value
//! out means what it means there.

use serde_json::Value;

use super::*;

/// Which attention layers slide, as transformers spells it in `layer_types`.
fn layer_types(field: &str, types: &[String], layers: usize) -> Result<Vec<bool>> {
    if types.len() != layers {
        return Err(EngineError::config(
            field,
            format!(
                "must name one type per layer (num_hidden_layers = {layers}), got {}",
                types.len()
            ),
        ));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "full_attention" => Ok(false),
            "sliding_attention" => Ok(true),
            other => Err(EngineError::config(
                format!("{field}[{i}]"),
                format!("must be \"full_attention\" or \"sliding_attention\", got {other:?}"),
            )),
        })
        .collect()
}

fn positive_f32(field: &str, value: Option<f64>) -> Result<Option<f32>> {
    match value {
        None => Ok(None),
        Some(v) if v > 0.0 && v.is_finite() => Ok(Some(v as f32)),
        Some(v) => Err(EngineError::config(
            field,
            format!("must be a positive number or null, got {v}"),
        )),
    }
}

impl RawConfig {
    pub(super) fn validate_gqa_family(self, arch: Arch) -> Result<ModelConfig> {
        let gemma = arch == Arch::Gemma3Text;
        let hidden_size = positive("hidden_size", self.hidden_size)?;
        let num_hidden_layers = positive("num_hidden_layers", self.num_hidden_layers)?;
        let num_attention_heads = positive("num_attention_heads", self.num_attention_heads)?;
        let vocab_size = positive("vocab_size", self.vocab_size)?;
        let intermediate_size = positive("intermediate_size", self.intermediate_size)?;
        let num_key_value_heads = positive_or(
            "num_key_value_heads",
            self.num_key_value_heads,
            num_attention_heads,
        )?;
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(EngineError::config(
                "num_key_value_heads",
                format!(
                    "must divide num_attention_heads ({num_attention_heads}), got {num_key_value_heads}"
                ),
            ));
        }
        let default_head_dim = match arch {
            Arch::Qwen3 | Arch::Qwen3Moe => 128,
            Arch::Gemma3Text => 256,
            _ => hidden_size / num_attention_heads,
        };
        let head_dim = positive_or("head_dim", self.head_dim, default_head_dim)?;
        if !head_dim.is_multiple_of(2) {
            return Err(EngineError::config(
                "head_dim",
                format!("must be even, got {head_dim}"),
            ));
        }
        for (field, value) in [
            ("attention_bias", self.attention_bias),
            ("mlp_bias", self.mlp_bias),
        ] {
            if value == Some(true) {
                return Err(EngineError::config(
                    field,
                    "must be false: biased projections are not supported, got true",
                ));
            }
        }
        if let Some(f) = self.partial_rotary_factor
            && f != 1.0
        {
            return Err(EngineError::config(
                "partial_rotary_factor",
                format!("must be 1 (partial RoPE is not supported), got {f}"),
            ));
        }
        let (act_field, act) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(a), _) if gemma => ("hidden_activation", a.as_str()),
            (_, Some(a)) => ("hidden_act", a.as_str()),
            _ if gemma => ("hidden_activation", "gelu_pytorch_tanh"),
            _ => ("hidden_act", "silu"),
        };
        let hidden_act = match act {
            "silu" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => {
                return Err(EngineError::config(
                    act_field,
                    format!("must be \"silu\" or \"gelu_pytorch_tanh\", got {other:?}"),
                ));
            }
        };
        let scale = match (gemma, self.query_pre_attn_scalar) {
            (true, Some(s)) if s > 0.0 && s.is_finite() => s.powf(-0.5) as f32,
            (true, Some(s)) => {
                return Err(EngineError::config(
                    "query_pre_attn_scalar",
                    format!("must be a positive number, got {s}"),
                ));
            }
            (true, None) => 256f64.powf(-0.5) as f32,
            (false, _) => (head_dim as f64).powf(-0.5) as f32,
        };
        let attention = AttentionConfig::Gqa(GqaConfig {
            num_key_value_heads,
            head_dim,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3Text),
            // `attn_logit_softcapping` is Gemma 2's; transformers' Gemma 3 ignores it, and so
            // does this (Gemma 3 configs set it to null).
            scale,
        });

        let (sliding_window, sliding_layers) = self.sliding(arch, num_hidden_layers)?;
        let max_position_embeddings = positive_or(
            "max_position_embeddings",
            self.max_position_embeddings,
            match arch {
                Arch::Llama => 2048,
                Arch::Gemma3Text => 131_072,
                Arch::Qwen3 | Arch::Qwen3Moe => 32_768,
                _ => 4096 * 32,
            },
        )?;
        let (rope, rope_local) = self.gqa_rope(arch, max_position_embeddings)?;
        let moe = match arch {
            Arch::Qwen3Moe => self.qwen3_moe()?,
            Arch::Mixtral => Some(self.mixtral_moe(intermediate_size)?),
            _ => None,
        };
        let rms_norm_eps = match (self.rms_norm_eps, arch) {
            (None, Arch::Mixtral) => 1e-5,
            _ => self.rms_norm_eps()?,
        };
        let (bos, eos_token_ids) = self.special_tokens(vocab_size)?;
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            attention,
            moe,
            rope,
            rope_local,
            sliding_window,
            sliding_layers,
            hidden_act,
            norm: NormStyle {
                unit_offset: gemma,
                sandwich: gemma,
            },
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt() as f32),
            final_logit_softcapping: positive_f32(
                "final_logit_softcapping",
                self.final_logit_softcapping,
            )?,
            rms_norm_eps,
            max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
            bos_token_id: bos.first().copied(),
            eos_token_ids,
        })
    }

    /// The window and which layers use it.
    fn sliding(&self, arch: Arch, layers: usize) -> Result<(Option<usize>, Vec<bool>)> {
        let window = match &self.sliding_window {
            None | Some(Value::Null) => match arch {
                Arch::Gemma3Text => Some(4096),
                Arch::Qwen3 | Arch::Qwen3Moe if self.use_sliding_window == Some(true) => Some(4096),
                _ => None,
            },
            Some(v) => match v.as_i64() {
                Some(w) if w > 0 => Some(w as usize),
                _ => {
                    return Err(EngineError::config(
                        "sliding_window",
                        format!("must be a positive integer or null, got {v}"),
                    ));
                }
            },
        };
        // Qwen3 ignores its `sliding_window` unless `use_sliding_window` is set.
        let window = match arch {
            Arch::Qwen3 | Arch::Qwen3Moe if self.use_sliding_window != Some(true) => None,
            _ => window,
        };
        let Some(window) = window else {
            return Ok((None, vec![false; layers]));
        };
        let which = match (&self.layer_types, arch) {
            (Some(types), _) => layer_types("layer_types", types, layers)?,
            (None, Arch::Gemma3Text) => {
                let pattern =
                    positive_or("sliding_window_pattern", self.sliding_window_pattern, 6)?;
                (0..layers)
                    .map(|i| !(i + 1).is_multiple_of(pattern))
                    .collect()
            }
            (None, Arch::Qwen3 | Arch::Qwen3Moe) => {
                let from = match self.max_window_layers {
                    None => 28,
                    Some(v) if v >= 0 => v as usize,
                    Some(v) => {
                        return Err(EngineError::config(
                            "max_window_layers",
                            format!("must be >= 0, got {v}"),
                        ));
                    }
                };
                (0..layers).map(|i| i >= from).collect()
            }
            (None, _) => vec![true; layers],
        };
        Ok((Some(window), which))
    }

    /// The RoPE of full-attention layers and, where it differs, of sliding-window layers.
    fn gqa_rope(&self, arch: Arch, max_pos: usize) -> Result<(RopeConfig, Option<RopeConfig>)> {
        let style = RopeStyle::Half;
        if arch != Arch::Gemma3Text {
            let default_theta = if arch == Arch::Mixtral { 1e6 } else { 10000.0 };
            let (params, field) = match (&self.rope_parameters, &self.rope_scaling) {
                (Some(p @ Value::Object(_)), _) => (Some(p), "rope_parameters"),
                (_, Some(s @ Value::Object(_))) => (Some(s), "rope_scaling"),
                _ => (None, "rope_scaling"),
            };
            let rope = parse_rope(
                params,
                field,
                self.rope_theta,
                default_theta,
                max_pos,
                style,
            )?;
            return Ok((rope, None));
        }
        // Gemma 3: transformers 5 writes one dict per layer type; older configs give the global
        // theta and scaling at the top level and the local theta as `rope_local_base_freq`.
        match &self.rope_parameters {
            Some(p @ Value::Object(map)) if map.contains_key("full_attention") => {
                let full = parse_rope(
                    p.get("full_attention"),
                    "rope_parameters.full_attention",
                    None,
                    1e6,
                    max_pos,
                    style,
                )?;
                let local = parse_rope(
                    p.get("sliding_attention"),
                    "rope_parameters.sliding_attention",
                    None,
                    10000.0,
                    max_pos,
                    style,
                )?;
                Ok((full, Some(local)))
            }
            params => {
                let (params, field) = match (params, &self.rope_scaling) {
                    (Some(p @ Value::Object(_)), _) => (Some(p), "rope_parameters"),
                    (_, Some(s @ Value::Object(_))) => (Some(s), "rope_scaling"),
                    _ => (None, "rope_scaling"),
                };
                let full = parse_rope(params, field, self.rope_theta, 1e6, max_pos, style)?;
                let local = parse_rope(
                    None,
                    "rope_local_base_freq",
                    self.rope_local_base_freq,
                    10000.0,
                    max_pos,
                    style,
                )?;
                Ok((full, Some(local)))
            }
        }
    }

    fn qwen3_moe(&self) -> Result<Option<MoeConfig>> {
        // The Hub's configs say `num_experts`; transformers 5 writes `num_local_experts`.
        let (field, n) = match (self.num_experts, self.num_local_experts) {
            (Some(n), _) => ("num_experts", Some(n)),
            (None, n) => ("num_local_experts", n),
        };
        let n_routed_experts = match n {
            None | Some(0) => return Ok(None),
            n => positive(field, n)?,
        };
        let mlp_only_layers = self
            .mlp_only_layers
            .iter()
            .flatten()
            .map(|&l| {
                usize::try_from(l).map_err(|_| {
                    EngineError::config("mlp_only_layers", format!("must be >= 0, got {l}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.softmax_moe(
            field,
            n_routed_experts,
            positive("moe_intermediate_size", self.moe_intermediate_size)?,
            self.norm_topk_prob.unwrap_or(false),
            MoeLayers::Sparse {
                sparse_step: positive_or("decoder_sparse_step", self.decoder_sparse_step, 1)?,
                mlp_only_layers,
            },
            MoeNaming::DEEPSEEK,
        )
        .map(Some)
    }

    fn mixtral_moe(&self, intermediate_size: usize) -> Result<MoeConfig> {
        self.softmax_moe(
            "num_local_experts",
            positive_or("num_local_experts", self.num_local_experts, 8)?,
            intermediate_size,
            true,
            MoeLayers::Sparse {
                sparse_step: 1,
                mlp_only_layers: Vec::new(),
            },
            MoeNaming::MIXTRAL,
        )
    }

    /// Softmax over all experts, top-k, optionally renormalised; no groups, no shared expert.
    fn softmax_moe(
        &self,
        experts_field: &str,
        n_routed_experts: usize,
        moe_intermediate_size: usize,
        norm_topk_prob: bool,
        layers: MoeLayers,
        naming: MoeNaming,
    ) -> Result<MoeConfig> {
        let num_experts_per_tok = positive_or("num_experts_per_tok", self.num_experts_per_tok, 2)?;
        if num_experts_per_tok > n_routed_experts {
            return Err(EngineError::config(
                "num_experts_per_tok",
                format!(
                    "must be <= {experts_field} ({n_routed_experts}), got {num_experts_per_tok}"
                ),
            ));
        }
        Ok(MoeConfig {
            n_routed_experts,
            n_shared_experts: 0,
            moe_intermediate_size,
            num_experts_per_tok,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            norm_topk_prob,
            scoring_func: ScoringFunc::Softmax,
            topk_method: TopkMethod::Greedy,
            layers,
            naming,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config.json` of the published models, as downloaded.
    const LLAMA_3_2_1B: &str = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,
        "attention_dropout":0.0,"bos_token_id":128000,"eos_token_id":128001,"head_dim":64,
        "hidden_act":"silu","hidden_size":2048,"initializer_range":0.02,"intermediate_size":8192,
        "max_position_embeddings":131072,"mlp_bias":false,"model_type":"llama",
        "num_attention_heads":32,"num_hidden_layers":16,"num_key_value_heads":8,
        "pretraining_tp":1,"rms_norm_eps":1e-05,"rope_scaling":{"factor":32.0,
        "high_freq_factor":4.0,"low_freq_factor":1.0,"original_max_position_embeddings":8192,
        "rope_type":"llama3"},"rope_theta":500000.0,"tie_word_embeddings":true,
        "torch_dtype":"bfloat16","use_cache":true,"vocab_size":128256}"#;
    const QWEN3_0_6B: &str = r#"{"architectures":["Qwen3ForCausalLM"],"attention_bias":false,
        "attention_dropout":0.0,"bos_token_id":151643,"eos_token_id":151645,"head_dim":128,
        "hidden_act":"silu","hidden_size":1024,"initializer_range":0.02,"intermediate_size":3072,
        "max_position_embeddings":40960,"max_window_layers":28,"model_type":"qwen3",
        "num_attention_heads":16,"num_hidden_layers":28,"num_key_value_heads":8,
        "rms_norm_eps":1e-06,"rope_scaling":null,"rope_theta":1000000,"sliding_window":null,
        "tie_word_embeddings":true,"torch_dtype":"bfloat16","use_cache":true,
        "use_sliding_window":false,"vocab_size":151936}"#;
    const GEMMA_3_1B: &str = r#"{"architectures":["Gemma3ForCausalLM"],"attention_bias":false,
        "attention_dropout":0.0,"attn_logit_softcapping":null,"bos_token_id":2,
        "cache_implementation":"hybrid","eos_token_id":[1,106],"final_logit_softcapping":null,
        "head_dim":256,"hidden_activation":"gelu_pytorch_tanh","hidden_size":1152,
        "initializer_range":0.02,"intermediate_size":6912,"max_position_embeddings":32768,
        "model_type":"gemma3_text","num_attention_heads":4,"num_hidden_layers":26,
        "num_key_value_heads":1,"pad_token_id":0,"query_pre_attn_scalar":256,
        "rms_norm_eps":1e-06,"rope_local_base_freq":10000,"rope_scaling":null,
        "rope_theta":1000000,"sliding_window":512,"sliding_window_pattern":6,
        "torch_dtype":"bfloat16","use_cache":true,"vocab_size":262144}"#;
    const MIXTRAL_8X7B: &str = r#"{"architectures":["MixtralForCausalLM"],
        "attention_dropout":0.0,"bos_token_id":1,"eos_token_id":2,"hidden_act":"silu",
        "hidden_size":4096,"initializer_range":0.02,"intermediate_size":14336,
        "max_position_embeddings":32768,"model_type":"mixtral","num_attention_heads":32,
        "num_experts_per_tok":2,"num_hidden_layers":32,"num_key_value_heads":8,
        "num_local_experts":8,"output_router_logits":false,"rms_norm_eps":1e-05,
        "rope_theta":1e6,"router_aux_loss_coef":0.02,"sliding_window":null,
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","use_cache":true,
        "vocab_size":32000}"#;
    const QWEN3_30B_A3B: &str = r#"{"architectures":["Qwen3MoeForCausalLM"],
        "attention_bias":false,"bos_token_id":151643,"decoder_sparse_step":1,
        "eos_token_id":151645,"head_dim":128,"hidden_act":"silu","hidden_size":2048,
        "intermediate_size":6144,"max_position_embeddings":40960,"max_window_layers":48,
        "mlp_only_layers":[],"model_type":"qwen3_moe","moe_intermediate_size":768,
        "norm_topk_prob":true,"num_attention_heads":32,"num_experts":128,
        "num_experts_per_tok":8,"num_hidden_layers":48,"num_key_value_heads":4,
        "rms_norm_eps":1e-06,"rope_scaling":null,"rope_theta":1000000.0,"sliding_window":null,
        "tie_word_embeddings":false,"use_sliding_window":false,"vocab_size":151936}"#;
    const MISTRAL_7B: &str = r#"{"architectures":["MistralForCausalLM"],"bos_token_id":1,
        "eos_token_id":2,"hidden_act":"silu","hidden_size":4096,"initializer_range":0.02,
        "intermediate_size":14336,"max_position_embeddings":32768,"model_type":"mistral",
        "num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,
        "rms_norm_eps":1e-05,"rope_theta":10000.0,"sliding_window":4096,
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","vocab_size":32000}"#;

    fn gqa(c: &ModelConfig) -> &GqaConfig {
        match &c.attention {
            AttentionConfig::Gqa(g) => g,
            other => panic!("expected GQA, got {other:?}"),
        }
    }

    fn billions(c: &ModelConfig) -> f64 {
        c.parameter_count() as f64 / 1e9
    }

    #[test]
    fn llama_3_2_1b_is_gqa_with_llama3_rope_and_tied_embeddings() {
        let c = ModelConfig::from_json_str(LLAMA_3_2_1B).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        let g = gqa(&c);
        assert_eq!(
            (g.num_key_value_heads, g.head_dim, g.qk_norm),
            (8, 64, false)
        );
        assert_eq!(c.rope.style, RopeStyle::Half);
        assert!(matches!(&c.rope.scaling, RopeScaling::Llama3(l) if l.factor == 32.0));
        assert!(c.tie_word_embeddings && c.moe.is_none() && c.sliding_window.is_none());
        assert_eq!(c.eos_token_ids, vec![128001]);
        assert!((billions(&c) - 1.236).abs() < 0.01, "{}", billions(&c));
    }

    #[test]
    fn qwen3_0_6b_has_qk_norm_and_no_window_unless_asked() {
        let c = ModelConfig::from_json_str(QWEN3_0_6B).unwrap();
        let g = gqa(&c);
        assert_eq!(
            (g.num_key_value_heads, g.head_dim, g.qk_norm),
            (8, 128, true)
        );
        assert_eq!(c.rope.theta, 1e6);
        assert_eq!(c.window(27), None);
        assert!((billions(&c) - 0.596).abs() < 0.01, "{}", billions(&c));
    }

    #[test]
    fn gemma3_1b_slides_five_layers_of_six_with_a_local_theta() {
        let c = ModelConfig::from_json_str(GEMMA_3_1B).unwrap();
        let g = gqa(&c);
        assert_eq!((g.num_key_value_heads, g.qk_norm), (1, true));
        assert_eq!(g.scale, 256f32.powf(-0.5));
        let global: Vec<usize> = (0..26).filter(|&l| c.window(l).is_none()).collect();
        assert_eq!(global, vec![5, 11, 17, 23]);
        assert_eq!(c.window(0), Some(512));
        assert_eq!(c.rope_of(0).theta, 10000.0);
        assert_eq!(c.rope_of(5).theta, 1e6);
        assert_eq!(c.hidden_act, Activation::GeluTanh);
        assert!(c.norm.unit_offset && c.norm.sandwich && c.tie_word_embeddings);
        assert_eq!(c.embed_scale, Some((1152f64).sqrt() as f32));
        assert_eq!(c.eos_token_ids, vec![1, 106]);
        assert!((billions(&c) - 1.0).abs() < 0.01, "{}", billions(&c));
    }

    #[test]
    fn gemma3_transformers_5_schema_has_a_rope_dict_per_layer_type() {
        let mut v: Value = serde_json::from_str(GEMMA_3_1B).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in [
            "rope_theta",
            "rope_local_base_freq",
            "rope_scaling",
            "sliding_window_pattern",
        ] {
            o.remove(k);
        }
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"full_attention": {"rope_type": "linear", "factor": 8.0,
                "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default",
                "rope_theta": 10000.0}}),
        );
        let types: Vec<&str> = (0..26)
            .map(|l| {
                if l % 2 == 0 {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        o.insert("layer_types".into(), serde_json::json!(types));
        let c = ModelConfig::from_json_str(&v.to_string()).unwrap();
        assert_eq!(c.rope.scaling, RopeScaling::Linear(8.0));
        assert_eq!(c.rope_of(0).scaling, RopeScaling::None);
        assert_eq!((c.window(0), c.window(1)), (Some(512), None));
    }

    #[test]
    fn mixtral_is_eight_experts_top_two_renormalised_under_block_sparse_moe() {
        let c = ModelConfig::from_json_str(MIXTRAL_8X7B).unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.n_routed_experts, m.num_experts_per_tok), (8, 2));
        assert_eq!(
            (m.scoring_func, m.topk_method),
            (ScoringFunc::Softmax, TopkMethod::Greedy)
        );
        assert!(m.norm_topk_prob && m.n_shared_experts == 0);
        assert_eq!(m.moe_intermediate_size, 14336);
        assert_eq!(m.naming, MoeNaming::MIXTRAL);
        assert_eq!(c.moe_layers().len(), 32);
        assert!((billions(&c) - 46.7).abs() < 0.1, "{}", billions(&c));
    }

    #[test]
    fn qwen3_moe_is_128_experts_top_8_in_every_layer() {
        let c = ModelConfig::from_json_str(QWEN3_30B_A3B).unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.n_routed_experts, m.num_experts_per_tok), (128, 8));
        assert!(m.norm_topk_prob);
        assert_eq!(m.naming, MoeNaming::DEEPSEEK);
        assert_eq!(c.moe_layers().len(), 48);
        assert!((billions(&c) - 30.5).abs() < 0.2, "{}", billions(&c));
        // transformers 5 writes the expert count as `num_local_experts`.
        let v5 = QWEN3_30B_A3B.replace("\"num_experts\"", "\"num_local_experts\"");
        assert_eq!(ModelConfig::from_json_str(&v5).unwrap().moe, c.moe);
        // mlp_only_layers and decoder_sparse_step pick the dense layers.
        let sparse = QWEN3_30B_A3B
            .replace("\"mlp_only_layers\":[]", "\"mlp_only_layers\":[0]")
            .replace("\"decoder_sparse_step\":1", "\"decoder_sparse_step\":2");
        let c = ModelConfig::from_json_str(&sparse).unwrap();
        assert_eq!(&c.moe_layers()[..3], &[1, 3, 5]);
    }

    #[test]
    fn mistral_slides_every_layer() {
        let c = ModelConfig::from_json_str(MISTRAL_7B).unwrap();
        assert!((0..32).all(|l| c.window(l) == Some(4096)));
        assert!((billions(&c) - 7.24).abs() < 0.02, "{}", billions(&c));
    }

    #[test]
    fn invalid_family_values_name_the_field_and_the_value() {
        let cases = [
            (
                LLAMA_3_2_1B,
                "num_key_value_heads",
                serde_json::json!(5),
                "5",
            ),
            (
                LLAMA_3_2_1B,
                "attention_bias",
                serde_json::json!(true),
                "true",
            ),
            (
                LLAMA_3_2_1B,
                "hidden_act",
                serde_json::json!("relu"),
                "relu",
            ),
            (LLAMA_3_2_1B, "head_dim", serde_json::json!(63), "63"),
            (
                LLAMA_3_2_1B,
                "partial_rotary_factor",
                serde_json::json!(0.5),
                "0.5",
            ),
            (
                LLAMA_3_2_1B,
                "rope_scaling",
                serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                "low_freq_factor",
            ),
            (MISTRAL_7B, "sliding_window", serde_json::json!(0), "0"),
            (
                MISTRAL_7B,
                "layer_types",
                serde_json::json!(["full_attention"]),
                "1",
            ),
            (
                MIXTRAL_8X7B,
                "num_experts_per_tok",
                serde_json::json!(9),
                "9",
            ),
            (
                GEMMA_3_1B,
                "query_pre_attn_scalar",
                serde_json::json!(-1),
                "-1",
            ),
            (
                GEMMA_3_1B,
                "final_logit_softcapping",
                serde_json::json!(0.0),
                "0",
            ),
        ];
        for (base, key, value, shown) in cases {
            let mut v: Value = serde_json::from_str(base).unwrap();
            v.as_object_mut().unwrap().insert(key.into(), value);
            let err = ModelConfig::from_json_str(&v.to_string())
                .unwrap_err()
                .to_string();
            let field = if key == "rope_scaling" { shown } else { key };
            assert!(err.contains(field), "{key}: {err}");
            assert!(err.contains(shown), "{key}: {err}");
        }
    }
}
