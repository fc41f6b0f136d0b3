//! Sizing arithmetic for placement: bytes per expert, latent KV cache per token, wire bytes.

use switchyard_engine::ModelConfig;

/// How expert weights are stored on the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    Bf16,
    /// FP8 e4m3 with one f32 scale per 128×128 block, as DeepSeek-V3 ships.
    Fp8,
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(WeightDType::F32),
            "bf16" => Ok(WeightDType::Bf16),
            "fp8" => Ok(WeightDType::Fp8),
            other => Err(format!("must be one of f32, bf16, fp8; got {other:?}")),
        }
    }
}

/// Bytes of one routed expert of one layer (gate, up and down projections).
pub fn expert_bytes(config: &ModelConfig, dtype: WeightDType) -> u64 {
    let (h, i) = match &config.moe {
        Some(m) => (config.hidden_size as u64, m.moe_intermediate_size as u64),
        None => return 0,
    };
    let params = 3 * h * i;
    match dtype {
        WeightDType::F32 => params * 4,
        WeightDType::Bf16 => params * 2,
        WeightDType::Fp8 => params + 3 * h.div_ceil(128) * i.div_ceil(128) * 4,
    }
}

/// Bytes of everything a router holds: the model minus its routed experts (attention, dense
/// FFNs, shared experts, gates, norms, embeddings, LM head). FP8 checkpoints keep embeddings,
/// the LM head and norms in bf16; their projections are counted at one byte plus block scales.
pub fn router_weight_bytes(config: &ModelConfig, dtype: WeightDType) -> u64 {
    let h = config.hidden_size as u64;
    let routed = config.moe.as_ref().map_or(0, |m| {
        config.moe_layers().len() as u64
            * m.n_routed_experts as u64
            * 3
            * h
            * m.moe_intermediate_size as u64
    });
    let params = config.parameter_count().saturating_sub(routed);
    let embeddings = config.vocab_size as u64 * h * if config.tie_word_embeddings { 1 } else { 2 };
    match dtype {
        WeightDType::F32 => params * 4,
        WeightDType::Bf16 => params * 2,
        WeightDType::Fp8 => {
            let projections = params.saturating_sub(embeddings);
            embeddings * 2 + projections + projections.div_ceil(128 * 128) * 4
        }
    }
}

/// Bytes of KV cache per token over all layers in bf16 (MLA: latent + shared rope key; GQA:
/// keys and values of the KV heads).
pub fn kv_bytes_per_token(config: &ModelConfig) -> u64 {
    (config.num_hidden_layers * config.attention.kv_row() * 2) as u64
}

/// Workers a token visits per MoE layer, on average, when its `k` experts fall uniformly over
/// `workers` workers: `W · (1 − (1 − 1/W)^k)`.
pub fn expected_workers_per_token(workers: usize, k: usize) -> f64 {
    let w = workers as f64;
    w * (1.0 - (1.0 - 1.0 / w).powi(k as i32))
}

/// Parses sizes like `80GiB`, `512MB`, `1.5TiB`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 80GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" => 1024.0,
        "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "gb" => 1e9,
        "gib" => 1024.0f64.powi(3),
        "tb" => 1e12,
        "tib" => 1024.0f64.powi(4),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
            ));
        }
    };
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{s:?} must be a non-negative size"));
    }
    Ok((value * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> ModelConfig {
        let json = switchyard_engine::synth::preset_config("deepseek-v3").unwrap();
        ModelConfig::from_json_str(&json.to_string()).unwrap()
    }

    #[test]
    fn deepseek_v3_numbers() {
        let c = v3();
        // 3 x 7168 x 2048 = 44 M parameters: ~44 MB in FP8 plus its block scales.
        assert_eq!(expert_bytes(&c, WeightDType::Bf16), 2 * 44_040_192);
        let fp8 = expert_bytes(&c, WeightDType::Fp8);
        assert!(fp8 > 44_040_192 && fp8 < 44_100_000, "{fp8}");
        // 61 layers x (512 + 64) x 2 bytes = 70,272 bytes per token.
        assert_eq!(kv_bytes_per_token(&c), 70_272);
        // 671 B parameters, 654 B of them routed experts (58 x 256 x 44 M): about 17 B on a
        // router, 34 GB in bf16.
        let router = router_weight_bytes(&c, WeightDType::Bf16);
        assert!((30e9..40e9).contains(&(router as f64)), "{router}");
        assert!(router_weight_bytes(&c, WeightDType::Fp8) < router);
    }

    #[test]
    fn sizes_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_bytes("80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_bytes("1.5 KiB").unwrap(), 1536);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(
            parse_bytes("80 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn expected_workers_per_token_is_between_one_and_k() {
        assert!((expected_workers_per_token(1, 8) - 1.0).abs() < 1e-9);
        let w = expected_workers_per_token(32, 8);
        assert!(w > 7.0 && w < 8.0, "{w}");
    }
}
