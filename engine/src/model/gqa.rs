//! Grouped-query attention: MHA, GQA and MQA over a per-KV-head cache, with QK-Norm and sliding
//! windows — the attention of Llama, Qwen3, Gemma 3, Mistral, Mixtral.
//!
//! The cache row of a token in a layer is its roped keys then its values, KV heads only
//! (`[2, kv_heads, head_dim]`); query head `h` reads KV head `h / (heads / kv_heads)`.

use crate::checkpoint::Checkpoint;
use crate::config::{GqaConfig, ModelConfig};
use crate::cpu::ops;
use crate::error::{EngineError, Result};
use crate::model::attention::{SeqSpan, SharedRows};
use crate::model::cache::KvCache;
use crate::model::linear::{Linear, RmsNorm};
use crate::model::rope::Rope;
use crate::tensor::{Tensor, concat_rows};

#[derive(Debug)]
pub struct GqaAttention {
    /// q, k and v stacked: `[(heads + 2 · kv_heads) · head_dim, hidden]`.
    qkv: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    rope: Rope,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    /// Tokens a query sees, itself included (sliding-window layers).
    window: Option<usize>,
}

impl GqaAttention {
    /// Loads `{prefix}.{q,k,v,o}_proj` (and `q_norm`, `k_norm`) of layer `layer`.
    pub fn new(
        config: &ModelConfig,
        g: &GqaConfig,
        ck: &Checkpoint,
        prefix: &str,
        layer: usize,
    ) -> Result<GqaAttention> {
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        let (kv_heads, d) = (g.num_key_value_heads, g.head_dim);
        let q = ck.load_weight(&format!("{prefix}.q_proj.weight"), &[heads * d, h])?;
        let k = ck.load_weight(&format!("{prefix}.k_proj.weight"), &[kv_heads * d, h])?;
        let v = ck.load_weight(&format!("{prefix}.v_proj.weight"), &[kv_heads * d, h])?;
        let norm = |name: &str| {
            RmsNorm::load_styled(
                ck,
                &format!("{prefix}.{name}.weight"),
                d,
                config.rms_norm_eps,
                config.norm.unit_offset,
            )
        };
        Ok(GqaAttention {
            qkv: Linear::new(concat_rows(&[&q, &k, &v])?)?,
            o: Linear::load(ck, &format!("{prefix}.o_proj.weight"), h, heads * d)?,
            q_norm: g.qk_norm.then(|| norm("q_norm")).transpose()?,
            k_norm: g.qk_norm.then(|| norm("k_norm")).transpose()?,
            rope: Rope::new(config.rope_of(layer), d),
            heads,
            kv_heads,
            head_dim: d,
            scale: g.scale,
            window: config.window(layer),
        })
    }

    /// Floats per cached token: keys then values of the KV heads.
    pub fn kv_row(&self) -> usize {
        2 * self.kv_heads * self.head_dim
    }

    /// `x: [tokens, hidden] → [tokens, hidden]`. Writes each sequence's new keys and values
    /// into its cache at `layer` (`caches[i]` belongs to `spans[i]` and has room for them).
    pub fn forward(
        &self,
        x: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let (tokens, _) = x.dims2()?;
        if spans.len() != caches.len() {
            return Err(EngineError::Shape(format!(
                "attention: {} spans but {} caches",
                spans.len(),
                caches.len()
            )));
        }
        let d = self.head_dim;
        let (q_width, kv_width) = (self.heads * d, self.kv_heads * d);
        let stride = q_width + 2 * kv_width;
        // [tokens, (heads + 2 · kv_heads) · head_dim]
        let mut qkv = self.qkv.forward(x)?;
        let qkv_d = qkv.as_f32_mut()?;
        let mut cs = vec![0.0f32; d];
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            for t in 0..span.len {
                let pos = span.pos0 + t;
                let row = &mut qkv_d[(span.start + t) * stride..(span.start + t + 1) * stride];
                self.rope.cos_sin(pos, &mut cs);
                let (q, kv) = row.split_at_mut(q_width);
                for head in q.chunks_exact_mut(d) {
                    if let Some(n) = &self.q_norm {
                        n.forward_inplace(head);
                    }
                    self.rope.apply_cos_sin(head, &cs);
                }
                for head in kv[..kv_width].chunks_exact_mut(d) {
                    if let Some(n) = &self.k_norm {
                        n.forward_inplace(head);
                    }
                    self.rope.apply_cos_sin(head, &cs);
                }
                cache.row_mut(layer, pos).copy_from_slice(kv);
            }
        }
        let qkv_d = &*qkv_d;
        // [tokens, heads · head_dim]
        let mut attn = vec![0.0f32; tokens * q_width];
        let out = SharedRows(attn.as_mut_ptr());
        let caches: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
        let group = self.heads / self.kv_heads;
        // One task per (sequence, query head): each writes its own columns of its own rows.
        crate::cpu::pool::global().run(spans.len() * self.heads, &|task| {
            let (s, head) = (task / self.heads, task % self.heads);
            let (span, cache) = (&spans[s], caches[s]);
            let kv_head = head / group;
            let (k_off, v_off) = (kv_head * d, kv_width + kv_head * d);
            let mut scores = Vec::with_capacity(span.pos0 + span.len);
            for t in 0..span.len {
                let row = span.start + t;
                let pos = span.pos0 + t;
                let first = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let q = &qkv_d[row * stride + head * d..row * stride + (head + 1) * d];
                scores.clear();
                scores.extend(
                    (first..=pos)
                        .map(|j| ops::dot(q, &cache.row(layer, j)[k_off..k_off + d]) * self.scale),
                );
                ops::softmax_inplace(&mut scores);
                // SAFETY: this task alone writes columns head*d..(head+1)*d of the span's rows.
                let o = unsafe { out.slice(row * q_width + head * d, d) };
                for (j, &p) in (first..=pos).zip(&scores) {
                    ops::axpy(o, p, &cache.row(layer, j)[v_off..v_off + d]);
                }
            }
        });
        self.o.forward(&Tensor::from_f32(&[tokens, q_width], attn)?)
    }

    /// Bytes of weights held.
    pub fn size_in_bytes(&self) -> usize {
        self.qkv.size_in_bytes() + self.o.size_in_bytes()
    }
}
