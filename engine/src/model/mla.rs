//! Multi-head Latent Attention (DeepSeek-V2/V3), and the blocked causal attention routine
//! prefill shares with GQA (`attend_blocks`).
//!
//! The cache holds the normed latent `c` and the roped shared key per token. Prefill may use
//! the expanded form (per-head keys and values from `kv_b_proj`); decode uses the absorbed form:
//! the query's no-rope part is folded through W_UK into latent space, attention runs over the
//! latents directly, and W_UV is applied once to the attended latent.

use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::config::{MlaConfig, ModelConfig};
use crate::cpu::{self, ops};
use crate::error::{EngineError, Result};
use crate::model::cache::KvCache;
use crate::model::linear::{Linear, Projection, RmsNorm};
use crate::model::rope::Rope;
use crate::model::shard::Parallel;
use crate::tensor::Tensor;

/// Queries of a prefill chunk whose attention runs as one pair of GEMMs (MLA's expanded form and
/// GQA): small enough that the causal mask's skipped keys matter on long prompts, big enough
/// that the per-block overhead does not show on short ones (Qwen3-0.6B, one run: 1,024-token
/// prefill 240-260 -> 359-360 tok/s; 128 tokens unchanged within noise; 32 was ~4% slower at
/// 128 tokens).
pub(crate) const QUERY_BLOCK: usize = 64;

/// One head's attention for a chunk of `len` queries over keys `[n, dk]` and values `[n, dv]`
/// (contiguous rows): per block of [`QUERY_BLOCK`] queries, `P = softmax(mask(Q Kᵀ · scale))`
/// and `O = P V` over only the keys the block sees — under the causal mask that skips nearly
/// half the products of a long chunk. `visible(t)` is the key range `lo..hi` query `t` sees
/// (both ends non-decreasing in `t`), `query(t, buf)` appends query `t` to `buf`, and
/// `out(t, row)` takes output row `t`.
pub(crate) fn attend_blocks(
    len: usize,
    (keys, dk): (&[f32], usize),
    (values, dv): (&[f32], usize),
    scale: f32,
    visible: impl Fn(usize) -> (usize, usize),
    mut query: impl FnMut(usize, &mut Vec<f32>),
    mut out: impl FnMut(usize, &[f32]),
) -> Result<()> {
    let (mut q, mut scores, mut v_t, mut o) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t0 in (0..len).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(len - t0);
        // The block's first query sees the earliest key, its last the latest.
        let (lo, _) = visible(t0);
        let (_, hi) = visible(t0 + rows - 1);
        let n = hi - lo;
        q.clear();
        for t in t0..t0 + rows {
            query(t, &mut q);
        }
        // [rows, n]
        scores.clear();
        scores.resize(rows * n, 0.0);
        cpu::matmul_t_f32(&q, rows, dk, &keys[lo * dk..hi * dk], &mut scores)?;
        for (r, row) in scores.chunks_exact_mut(n).enumerate() {
            let (a, b) = visible(t0 + r);
            let (a, b) = (a - lo, b - lo);
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            let seen = &mut row[a..b];
            for s in seen.iter_mut() {
                *s *= scale;
            }
            ops::softmax_inplace(seen);
        }
        // Vᵀ of the block's keys: [dv, n]
        v_t.clear();
        v_t.resize(dv * n, 0.0);
        for (j, vr) in values[lo * dv..hi * dv].chunks_exact(dv).enumerate() {
            for (i, &x) in vr.iter().enumerate() {
                v_t[i * n + j] = x;
            }
        }
        // [rows, dv]
        o.clear();
        o.resize(rows * dv, 0.0);
        cpu::matmul_t_f32(&scores, rows, n, &v_t, &mut o)?;
        for (r, row) in o.chunks_exact(dv).enumerate() {
            out(t0 + r, row);
        }
    }
    Ok(())
}

/// How attention over the cache is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// Expanded for prefill chunks, absorbed for single-token decode.
    #[default]
    Auto,
    Expanded,
    Absorbed,
}

/// The absorbed form's core for one query of one head (`q_abs = W_UKᵀ q_nope`): over `ctx`
/// cached rows (`row(l)`: the latent `c_l`, then the roped shared key `k_l`),
/// `score_l = (q_abs · c_l + q_pe · k_l) · scale` and `out = Σ_l softmax(score)_l · c_l`.
/// `scores` holds at least `ctx` values; `out` is as long as `q_abs`.
pub fn latent_attention<'a>(
    q_abs: &[f32],
    q_pe: &[f32],
    ctx: usize,
    row: impl Fn(usize) -> &'a [f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let rank = q_abs.len();
    for (l, s) in scores[..ctx].iter_mut().enumerate() {
        let (c, kr) = row(l).split_at(rank);
        *s = (ops::dot(q_abs, c) + ops::dot(q_pe, kr)) * scale;
    }
    ops::softmax_inplace(&mut scores[..ctx]);
    out.fill(0.0);
    for (l, &p) in scores[..ctx].iter().enumerate() {
        ops::axpy(out, p, &row(l)[..rank]);
    }
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

/// The attention output, written by several tasks at once, each to its own (row, head) slices.
#[derive(Clone, Copy)]
pub(crate) struct SharedRows(pub(crate) *mut f32);

// SAFETY: tasks write disjoint element ranges (see `MlaAttention::forward` and
// `GqaAttention::forward`).
unsafe impl Send for SharedRows {}
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// # Safety
    /// `start..start + len` must be in bounds and written by no other task.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[derive(Debug)]
pub struct MlaAttention {
    q: QProj,
    kv_a: Linear,
    kv_norm: RmsNorm,
    /// Per head: W_UK `[nope, kv_lora]` and W_UV `[v, kv_lora]`, split out of `kv_b_proj`.
    w_uk: Vec<Tensor>,
    w_uv: Vec<Tensor>,
    /// W_UV widened to f32, for the expanded form's `V = latent · W_UVᵀ` in f32.
    w_uv_f32: Vec<Vec<f32>>,
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
        a: &MlaConfig,
        ck: &Checkpoint,
        prefix: &str,
        rope: Arc<Rope>,
    ) -> Result<MlaAttention> {
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
        let w_uv_f32 = w_uv.iter().map(|t| t.to_f32().into_f32_vec()).collect();
        Ok(MlaAttention {
            q,
            w_uv_f32,
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

    /// `x: [tokens, hidden] → [tokens, hidden]`. Writes each sequence's new latents into its
    /// cache at `layer` (`caches[i]` belongs to `spans[i]` and has room for them).
    pub fn forward(
        &self,
        x: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&mut KvCache],
        layer: usize,
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
        // cos and sin of one position, shared by every head's query and the key.
        let mut cs = vec![0.0f32; self.rope_dim];
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            for t in 0..span.len {
                let row = span.start + t;
                let pos = span.pos0 + t;
                self.rope.cos_sin(pos, &mut cs);
                for head in 0..self.heads {
                    let off = row * self.heads * qk + head * qk + self.nope;
                    self.rope
                        .apply_cos_sin(&mut qd[off..off + self.rope_dim], &cs);
                }
                let c = &ckv[row * row_width..(row + 1) * row_width];
                let dst = cache.row_mut(layer, pos);
                dst.copy_from_slice(c);
                let (latent, k_rope) = dst.split_at_mut(self.kv_lora);
                self.kv_norm.forward_inplace(latent);
                self.rope.apply_cos_sin(k_rope, &cs);
            }
        }
        let q = &*qd;
        let width = self.heads * self.v_dim;
        // [tokens, heads * v]
        let mut attn = vec![0.0f32; tokens * width];
        let out = SharedRows(attn.as_mut_ptr());
        let caches: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
        // The expanded form reads each sequence's latents as one matrix.
        let latents: Vec<Option<Tensor>> = spans
            .iter()
            .zip(&caches)
            .map(|(span, cache)| {
                let expanded = match mode {
                    AttentionMode::Auto => span.len > 1,
                    AttentionMode::Expanded => true,
                    AttentionMode::Absorbed => false,
                };
                let ctx = span.pos0 + span.len;
                expanded
                    .then(|| {
                        let mut latent = Vec::with_capacity(ctx * self.kv_lora);
                        for pos in 0..ctx {
                            latent.extend_from_slice(&cache.row(layer, pos)[..self.kv_lora]);
                        }
                        Tensor::from_f32(&[ctx, self.kv_lora], latent)
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let failure = std::sync::Mutex::new(None);
        // One task per (sequence, head): heads are independent and write disjoint columns.
        crate::cpu::pool::global().run(spans.len() * self.heads, &|task| {
            let (s, head) = (task / self.heads, task % self.heads);
            let result = match &latents[s] {
                Some(latent) => {
                    self.attend_expanded(q, &spans[s], caches[s], layer, latent, head, out, width)
                }
                None => self.attend_absorbed(q, &spans[s], caches[s], layer, head, out, width),
            };
            if let Err(e) = result
                && let Ok(mut f) = failure.lock()
            {
                f.get_or_insert(e);
            }
        });
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
        self.o.forward(&Tensor::from_f32(&[tokens, width], attn)?)
    }

    fn q_row<'a>(&self, q: &'a [f32], row: usize, head: usize) -> (&'a [f32], &'a [f32]) {
        let qk = self.nope + self.rope_dim;
        let off = row * self.heads * qk + head * qk;
        (&q[off..off + self.nope], &q[off + self.nope..off + qk])
    }

    /// One head over one sequence with per-head keys and values expanded from the latents
    /// (`latent: [ctx, kv_lora]`), through [`attend_blocks`]. Writes `out[row, head * v..]` for
    /// the span's rows.
    #[allow(clippy::too_many_arguments)]
    fn attend_expanded(
        &self,
        q: &[f32],
        span: &SeqSpan,
        cache: &KvCache,
        layer: usize,
        latent: &Tensor,
        head: usize,
        out: SharedRows,
        width: usize,
    ) -> Result<()> {
        let ctx = span.pos0 + span.len;
        let (qk, vd) = (self.nope + self.rope_dim, self.v_dim);
        let lat = latent.as_f32()?;
        // Keys of this head: [ctx, nope + rope], the expanded no-rope part beside the shared key.
        let mut k_nope = vec![0.0f32; ctx * self.nope];
        cpu::matmul_t(lat, ctx, &self.w_uk[head], &mut k_nope)?;
        let mut keys = Vec::with_capacity(ctx * qk);
        for l in 0..ctx {
            keys.extend_from_slice(&k_nope[l * self.nope..(l + 1) * self.nope]);
            keys.extend_from_slice(&cache.row(layer, l)[self.kv_lora..]);
        }
        // Values of this head, V = latent · W_UVᵀ in f32: [ctx, v]
        let mut values = vec![0.0f32; ctx * vd];
        cpu::matmul_t_f32(lat, ctx, self.kv_lora, &self.w_uv_f32[head], &mut values)?;
        attend_blocks(
            span.len,
            (&keys, qk),
            (&values, vd),
            self.scale,
            |t| (0, span.pos0 + t + 1),
            |t, buf| {
                let (qn, qr) = self.q_row(q, span.start + t, head);
                buf.extend_from_slice(qn);
                buf.extend_from_slice(qr);
            },
            |t, src| {
                let row = span.start + t;
                // SAFETY: this task alone writes columns head*v..(head+1)*v of the span's rows.
                let dst = unsafe { out.slice(row * width + head * vd, vd) };
                dst.copy_from_slice(src);
            },
        )
    }

    /// One head over one sequence, weight-absorbed: attention runs over the latents directly.
    /// Writes `out[row, head * v..]` for the span's rows.
    #[allow(clippy::too_many_arguments)]
    fn attend_absorbed(
        &self,
        q: &[f32],
        span: &SeqSpan,
        cache: &KvCache,
        layer: usize,
        head: usize,
        out: SharedRows,
        width: usize,
    ) -> Result<()> {
        let ctx = span.pos0 + span.len;
        let mut scores = vec![0.0f32; ctx];
        let mut q_abs = vec![0.0f32; self.kv_lora];
        let mut o_lat = vec![0.0f32; self.kv_lora];
        for t in 0..span.len {
            let row = span.start + t;
            let visible = span.pos0 + t + 1;
            let (qn, qr) = self.q_row(q, row, head);
            // q_abs = W_UKᵀ q_nope: [kv_lora]
            q_abs.fill(0.0);
            cpu::matmul_nn_rows(qn, 1, self.nope, &self.w_uk[head], 0, &mut q_abs)?;
            latent_attention(
                &q_abs,
                qr,
                visible,
                |l| cache.row(layer, l),
                self.scale,
                &mut scores,
                &mut o_lat,
            );
            // out_h = W_UV o_lat: [v]
            // SAFETY: this task alone writes columns head*v..(head+1)*v of the span's rows.
            let o = unsafe { out.slice(row * width + head * self.v_dim, self.v_dim) };
            cpu::matmul_t(&o_lat, 1, &self.w_uv[head], o)?;
        }
        Ok(())
    }

    /// The projections that move to a device (`router --device`), with how each splits over
    /// several GPUs: the queries and the output projection by heads (the output's partial
    /// sums reduced over NCCL), the low-rank projections by columns. The per-head W_UK /
    /// W_UV, used by attention over the cache, stay on the host with it.
    pub fn projections(&mut self) -> Vec<Projection<'_>> {
        let by_head = Parallel::Columns {
            granule: self.nope + self.rope_dim,
        };
        let columns = Parallel::Columns { granule: 1 };
        let mut out = match &mut self.q {
            QProj::Lora { a, b, .. } => vec![
                Projection::new(a, columns, "q_a_proj"),
                Projection::new(b, by_head, "q_b_proj"),
            ],
            QProj::Direct(p) => vec![Projection::new(p, by_head, "q_proj")],
        };
        out.push(Projection::new(
            &mut self.kv_a,
            columns,
            "kv_a_proj_with_mqa",
        ));
        let heads = Parallel::Rows {
            granule: self.v_dim,
        };
        out.push(Projection::new(&mut self.o, heads, "o_proj"));
        out
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
