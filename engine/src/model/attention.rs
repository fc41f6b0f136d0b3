//! Multi-head Latent Attention (DeepSeek-V2/V3).
//!
//! The cache holds the normed latent `c` and the roped shared key per token. Prefill may use
//! the expanded form (per-head keys and values from `kv_b_proj`); decode uses the absorbed form:
//! the query's no-rope part is folded through W_UK into latent space, attention runs over the
//! latents directly, and W_UV is applied once to the attended latent.

use std::sync::Arc;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cpu::{self, ops};
use crate::error::{EngineError, Result};
use crate::model::cache::LayerKv;
use crate::model::linear::{Linear, RmsNorm};
use crate::model::rope::Rope;
use crate::tensor::Tensor;

/// How attention over the cache is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// Expanded for prefill chunks, absorbed for single-token decode.
    #[default]
    Auto,
    Expanded,
    Absorbed,
}

#[derive(Debug)]
enum QProj {
    Lora { a: Linear, norm: RmsNorm, b: Linear },
    Direct(Linear),
}

/// The tokens of one sequence inside a batch: rows `start..start + len` of the activations, at
/// positions `pos0..pos0 + len`.
#[derive(Clone, Copy, Debug)]
pub struct SeqSpan {
    pub start: usize,
    pub len: usize,
    pub pos0: usize,
}

#[derive(Debug)]
pub struct MlaAttention {
    q: QProj,
    kv_a: Linear,
    kv_norm: RmsNorm,
    /// Per head: W_UK `[nope, kv_lora]` and W_UV `[v, kv_lora]`, split out of `kv_b_proj`.
    w_uk: Vec<Tensor>,
    w_uv: Vec<Tensor>,
    o: Linear,
    rope: Arc<Rope>,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    v_dim: usize,
    kv_lora: usize,
    scale: f32,
}

impl MlaAttention {
    pub fn new(
        config: &ModelConfig,
        ck: &Checkpoint,
        prefix: &str,
        rope: Arc<Rope>,
    ) -> Result<MlaAttention> {
        let a = &config.attention;
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        let qk = a.qk_head_dim();
        let q = match a.q_lora_rank {
            Some(r) => QProj::Lora {
                a: Linear::load(ck, &format!("{prefix}.q_a_proj.weight"), r, h)?,
                norm: RmsNorm::load(
                    ck,
                    &format!("{prefix}.q_a_layernorm.weight"),
                    r,
                    config.rms_norm_eps,
                )?,
                b: Linear::load(ck, &format!("{prefix}.q_b_proj.weight"), heads * qk, r)?,
            },
            None => QProj::Direct(Linear::load(
                ck,
                &format!("{prefix}.q_proj.weight"),
                heads * qk,
                h,
            )?),
        };
        let kv_b = ck.load_weight(
            &format!("{prefix}.kv_b_proj.weight"),
            &[heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank],
        )?;
        let per_head = a.qk_nope_head_dim + a.v_head_dim;
        let mut w_uk = Vec::with_capacity(heads);
        let mut w_uv = Vec::with_capacity(heads);
        for head in 0..heads {
            let r0 = head * per_head;
            w_uk.push(kv_b.narrow_rows(r0, r0 + a.qk_nope_head_dim)?);
            w_uv.push(kv_b.narrow_rows(r0 + a.qk_nope_head_dim, r0 + per_head)?);
        }
        Ok(MlaAttention {
            q,
            kv_a: Linear::load(
                ck,
                &format!("{prefix}.kv_a_proj_with_mqa.weight"),
                a.kv_lora_rank + a.qk_rope_head_dim,
                h,
            )?,
            kv_norm: RmsNorm::load(
                ck,
                &format!("{prefix}.kv_a_layernorm.weight"),
                a.kv_lora_rank,
                config.rms_norm_eps,
            )?,
            w_uk,
            w_uv,
            o: Linear::load(
                ck,
                &format!("{prefix}.o_proj.weight"),
                h,
                heads * a.v_head_dim,
            )?,
            rope,
            heads,
            nope: a.qk_nope_head_dim,
            rope_dim: a.qk_rope_head_dim,
            v_dim: a.v_head_dim,
            kv_lora: a.kv_lora_rank,
            scale: config.softmax_scale(),
        })
    }

    /// `x: [tokens, hidden] → [tokens, hidden]`. Appends each sequence's new latents to its
    /// cache (`caches[i]` belongs to `spans[i]`).
    pub fn forward(
        &self,
        x: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&mut LayerKv],
        mode: AttentionMode,
    ) -> Result<Tensor> {
        let (tokens, _) = x.dims2()?;
        if spans.len() != caches.len() {
            return Err(EngineError::Shape(format!(
                "attention: {} spans but {} caches",
                spans.len(),
                caches.len()
            )));
        }
        let qk = self.nope + self.rope_dim;
        // [tokens, heads * qk]
        let mut q = match &self.q {
            QProj::Lora { a, norm, b } => {
                let mut qa = a.forward(x)?;
                norm.forward_inplace(qa.as_f32_mut()?);
                b.forward(&qa)?
            }
            QProj::Direct(p) => p.forward(x)?,
        };
        // [tokens, kv_lora + rope]
        let ckv = self.kv_a.forward(x)?;
        let ckv = ckv.as_f32()?;
        let qd = q.as_f32_mut()?;
        let row_width = self.kv_lora + self.rope_dim;
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            for t in 0..span.len {
                let row = span.start + t;
                let pos = span.pos0 + t;
                for head in 0..self.heads {
                    let off = row * self.heads * qk + head * qk + self.nope;
                    self.rope.apply(&mut qd[off..off + self.rope_dim], pos);
                }
                let c = &ckv[row * row_width..(row + 1) * row_width];
                let start = cache.latent.len();
                cache.latent.extend_from_slice(&c[..self.kv_lora]);
                self.kv_norm.forward_inplace(&mut cache.latent[start..]);
                let start = cache.k_rope.len();
                cache.k_rope.extend_from_slice(&c[self.kv_lora..]);
                self.rope.apply(&mut cache.k_rope[start..], pos);
            }
        }
        let q = &*qd;
        // [tokens, heads * v]
        let mut attn = vec![0.0f32; tokens * self.heads * self.v_dim];
        let mut outputs: Vec<(usize, Vec<f32>)> = spans
            .par_iter()
            .zip(caches.par_iter())
            .map(|(span, cache)| {
                let expanded = match mode {
                    AttentionMode::Auto => span.len > 1,
                    AttentionMode::Expanded => true,
                    AttentionMode::Absorbed => false,
                };
                let out = if expanded {
                    self.attend_expanded(q, span, cache)
                } else {
                    self.attend_absorbed(q, span, cache)
                };
                out.map(|o| (span.start, o))
            })
            .collect::<Result<_>>()?;
        let width = self.heads * self.v_dim;
        for (start, out) in outputs.drain(..) {
            attn[start * width..start * width + out.len()].copy_from_slice(&out);
        }
        self.o.forward(&Tensor::from_f32(&[tokens, width], attn)?)
    }

    fn q_row<'a>(&self, q: &'a [f32], row: usize, head: usize) -> (&'a [f32], &'a [f32]) {
        let qk = self.nope + self.rope_dim;
        let off = row * self.heads * qk + head * qk;
        (&q[off..off + self.nope], &q[off + self.nope..off + qk])
    }

    /// Per-head keys and values expanded from the latents: returns `[span.len, heads * v]`.
    fn attend_expanded(&self, q: &[f32], span: &SeqSpan, cache: &LayerKv) -> Result<Vec<f32>> {
        let ctx = span.pos0 + span.len;
        let latent = Tensor::from_f32(
            &[ctx, self.kv_lora],
            cache.latent[..ctx * self.kv_lora].to_vec(),
        )?;
        let width = self.heads * self.v_dim;
        let mut out = vec![0.0f32; span.len * width];
        let mut scores = vec![0.0f32; ctx];
        for head in 0..self.heads {
            // [ctx, nope] and [ctx, v]
            let mut k_nope = vec![0.0f32; ctx * self.nope];
            cpu::matmul_t(latent.as_f32()?, ctx, &self.w_uk[head], &mut k_nope)?;
            let mut v = vec![0.0f32; ctx * self.v_dim];
            cpu::matmul_t(latent.as_f32()?, ctx, &self.w_uv[head], &mut v)?;
            for t in 0..span.len {
                let (qn, qr) = self.q_row(q, span.start + t, head);
                let visible = span.pos0 + t + 1;
                for (l, s) in scores[..visible].iter_mut().enumerate() {
                    let kr = &cache.k_rope[l * self.rope_dim..(l + 1) * self.rope_dim];
                    *s = (ops::dot(qn, &k_nope[l * self.nope..(l + 1) * self.nope])
                        + ops::dot(qr, kr))
                        * self.scale;
                }
                ops::softmax_inplace(&mut scores[..visible]);
                let o =
                    &mut out[t * width + head * self.v_dim..t * width + (head + 1) * self.v_dim];
                for (l, &p) in scores[..visible].iter().enumerate() {
                    ops::axpy(o, p, &v[l * self.v_dim..(l + 1) * self.v_dim]);
                }
            }
        }
        Ok(out)
    }

    /// Weight-absorbed attention over the latents: returns `[span.len, heads * v]`.
    fn attend_absorbed(&self, q: &[f32], span: &SeqSpan, cache: &LayerKv) -> Result<Vec<f32>> {
        let ctx = span.pos0 + span.len;
        let width = self.heads * self.v_dim;
        let mut out = vec![0.0f32; span.len * width];
        let mut scores = vec![0.0f32; ctx];
        let mut q_abs = vec![0.0f32; self.kv_lora];
        let mut o_lat = vec![0.0f32; self.kv_lora];
        for t in 0..span.len {
            let visible = span.pos0 + t + 1;
            for head in 0..self.heads {
                let (qn, qr) = self.q_row(q, span.start + t, head);
                // q_abs = W_UKᵀ q_nope: [kv_lora]
                q_abs.fill(0.0);
                cpu::matmul_nn_rows(qn, 1, self.nope, &self.w_uk[head], 0, &mut q_abs)?;
                for (l, s) in scores[..visible].iter_mut().enumerate() {
                    let c = &cache.latent[l * self.kv_lora..(l + 1) * self.kv_lora];
                    let kr = &cache.k_rope[l * self.rope_dim..(l + 1) * self.rope_dim];
                    *s = (ops::dot(&q_abs, c) + ops::dot(qr, kr)) * self.scale;
                }
                ops::softmax_inplace(&mut scores[..visible]);
                o_lat.fill(0.0);
                for (l, &p) in scores[..visible].iter().enumerate() {
                    ops::axpy(
                        &mut o_lat,
                        p,
                        &cache.latent[l * self.kv_lora..(l + 1) * self.kv_lora],
                    );
                }
                // out_h = W_UV o_lat: [v]
                let o =
                    &mut out[t * width + head * self.v_dim..t * width + (head + 1) * self.v_dim];
                cpu::matmul_t(&o_lat, 1, &self.w_uv[head], o)?;
            }
        }
        Ok(out)
    }

    /// Bytes of weights held.
    pub fn size_in_bytes(&self) -> usize {
        let q = match &self.q {
            QProj::Lora { a, b, .. } => a.size_in_bytes() + b.size_in_bytes(),
            QProj::Direct(p) => p.size_in_bytes(),
        };
        q + self.kv_a.size_in_bytes()
            + self
                .w_uk
                .iter()
                .chain(&self.w_uv)
                .map(Tensor::size_in_bytes)
                .sum::<usize>()
            + self.o.size_in_bytes()
    }
}
