//! Inputs and CPU references shared by the kernel tests: `gpu.rs` (on a device) and
//! `kernels_on_cpu.rs` (the same kernels run on the CPU). Each test file uses part of it.

#![allow(dead_code)]

use switchyard_engine::config::{
    Llama3Scaling, MoeConfig, MoeLayers, MoeNaming, RopeConfig, RopeScaling, RopeStyle,
    ScoringFunc, TopkMethod, YarnConfig,
};
use switchyard_engine::model::mla::latent_attention;
use switchyard_engine::model::rope::Rope;

/// Values in [-1, 1) with 24 bits of resolution (splitmix64), so ties are as rare as in real
/// activations and routing has no accidental near-ties.
pub fn pseudo(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let mut z = (i ^ (u64::from(seed) << 32)).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The largest |a − b| over two slices of equal length.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// RoPE layouts and scalings to test: DeepSeek's interleaved YaRN, Llama 3's rotate-half with
/// llama3 scaling, and a plain wider one.
pub fn rope_cases() -> Vec<Rope> {
    let yarn = RopeScaling::Yarn(YarnConfig {
        factor: 40.0,
        original_max_position_embeddings: 4096,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: 1.0,
        mscale_all_dim: 1.0,
        attention_factor: None,
    });
    let llama3 = RopeScaling::Llama3(Llama3Scaling {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    [
        (RopeStyle::Interleaved, yarn, 64),
        (RopeStyle::Half, llama3, 64),
        (RopeStyle::Half, RopeScaling::Linear(4.0), 128),
    ]
    .into_iter()
    .map(|(style, scaling, dim)| {
        Rope::new(
            &RopeConfig {
                theta: 10_000.0,
                scaling,
                style,
            },
            dim,
        )
    })
    .collect()
}

/// Positions to rotate at, up to far past the original context.
pub const ROPE_POSITIONS: [i32; 5] = [0, 1, 17, 4095, 100_000];

/// `x: [positions, heads, stride]` with dims `offset..offset + rope.dim()` of each head
/// rotated on the CPU.
pub fn rope_reference(
    rope: &Rope,
    x: &[f32],
    heads: usize,
    stride: usize,
    offset: usize,
) -> Vec<f32> {
    let mut want = x.to_vec();
    for (t, &p) in ROPE_POSITIONS.iter().enumerate() {
        for h in 0..heads {
            let at = (t * heads + h) * stride + offset;
            rope.apply(&mut want[at..at + rope.dim()], p as usize);
        }
    }
    want
}

pub fn moe(experts: usize, k: usize, groups: usize, topk_group: usize) -> MoeConfig {
    MoeConfig {
        n_routed_experts: experts,
        n_shared_experts: 0,
        moe_intermediate_size: 8,
        num_experts_per_tok: k,
        n_group: groups,
        topk_group,
        routed_scaling_factor: 1.0,
        norm_topk_prob: false,
        scoring_func: ScoringFunc::Softmax,
        topk_method: TopkMethod::Greedy,
        layers: MoeLayers::DeepSeek {
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
        },
        naming: MoeNaming::DEEPSEEK,
    }
}

/// Every gate flavour: DeepSeek-V3 (sigmoid, bias, top-2-sum groups), DeepSeek-V2 (softmax,
/// best-score groups), Qwen3-MoE, Mixtral, and groups with greedy selection (ignored).
pub fn gate_flavours() -> Vec<(&'static str, MoeConfig)> {
    vec![
        (
            "deepseek-v3",
            MoeConfig {
                scoring_func: ScoringFunc::Sigmoid,
                topk_method: TopkMethod::NoAuxTc,
                norm_topk_prob: true,
                routed_scaling_factor: 2.5,
                ..moe(256, 8, 8, 4)
            },
        ),
        (
            "deepseek-v2",
            MoeConfig {
                topk_method: TopkMethod::GroupLimitedGreedy,
                routed_scaling_factor: 16.0,
                ..moe(160, 6, 8, 3)
            },
        ),
        ("qwen3-moe", moe(128, 8, 1, 1)),
        (
            "mixtral",
            MoeConfig {
                norm_topk_prob: true,
                ..moe(8, 2, 1, 1)
            },
        ),
        ("greedy-with-groups", moe(64, 4, 4, 1)),
    ]
}

/// The correction bias a flavour's gate carries, if any.
pub fn gate_bias(c: &MoeConfig) -> Option<Vec<f32>> {
    (c.topk_method == TopkMethod::NoAuxTc).then(|| {
        pseudo(c.n_routed_experts, 99)
            .iter()
            .map(|v| v * 0.1)
            .collect()
    })
}

/// MLA decode over a paged latent cache: sequences of 1, 17 and 300 rows in scrambled blocks,
/// with the CPU's absorbed-form attention as the reference.
pub struct MlaCase {
    pub heads: usize,
    pub rank: usize,
    pub rope: usize,
    pub block: usize,
    pub ctx_lens: Vec<usize>,
    /// `[blocks · block, rank + rope]`
    pub rows: Vec<f32>,
    pub tables: Vec<Vec<u32>>,
    pub q_abs: Vec<f32>,
    pub q_pe: Vec<f32>,
    pub scale: f32,
    /// `[seqs, heads, rank]`
    pub want: Vec<f32>,
}

impl MlaCase {
    pub fn new() -> MlaCase {
        let (heads, rank, rope, block) = (4usize, 64usize, 16usize, 16usize);
        let width = rank + rope;
        let ctx_lens = vec![1usize, 17, 300];
        let needed: Vec<usize> = ctx_lens.iter().map(|c| c.div_ceil(block)).collect();
        let total_blocks = needed.iter().sum::<usize>() + 3;
        let rows = pseudo(total_blocks * block * width, 31);
        // Blocks handed out in a scrambled order.
        let mut free: Vec<u32> = (0..total_blocks as u32)
            .map(|b| (b * 7) % total_blocks as u32)
            .collect();
        let tables: Vec<Vec<u32>> = needed.iter().map(|&n| free.drain(..n).collect()).collect();
        let seqs = ctx_lens.len();
        let q_abs = pseudo(seqs * heads * rank, 41);
        let q_pe = pseudo(seqs * heads * rope, 43);
        let scale = 0.1;
        let mut want = vec![0.0f32; seqs * heads * rank];
        let mut scores = vec![0.0f32; 300];
        for s in 0..seqs {
            let row = |l: usize| {
                let at = (tables[s][l / block] as usize * block + l % block) * width;
                &rows[at..at + width]
            };
            for h in 0..heads {
                let q = (s * heads + h) * rank;
                let qp = (s * heads + h) * rope;
                latent_attention(
                    &q_abs[q..q + rank],
                    &q_pe[qp..qp + rope],
                    ctx_lens[s],
                    row,
                    scale,
                    &mut scores,
                    &mut want[q..q + rank],
                );
            }
        }
        MlaCase {
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
        }
    }
}
