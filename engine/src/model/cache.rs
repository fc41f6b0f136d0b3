//! The latent KV cache of one sequence: per layer, only the normed compressed latent
//! (`kv_lora_rank`) and the roped shared key (`qk_rope_head_dim`) of every token — never the
//! per-head keys and values.

/// One layer's cache rows.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// `[len, kv_lora_rank]`
    pub latent: Vec<f32>,
    /// `[len, qk_rope_head_dim]`
    pub k_rope: Vec<f32>,
}

/// A sequence's cache across all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> KvCache {
        KvCache {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
        }
    }

    /// Reserves room for `tokens` positions so decode does not reallocate.
    pub fn with_capacity(
        num_layers: usize,
        tokens: usize,
        kv_lora_rank: usize,
        rope_dim: usize,
    ) -> KvCache {
        KvCache {
            layers: (0..num_layers)
                .map(|_| LayerKv {
                    latent: Vec::with_capacity(tokens * kv_lora_rank),
                    k_rope: Vec::with_capacity(tokens * rope_dim),
                })
                .collect(),
            len: 0,
        }
    }

    /// Tokens cached (committed after a full forward pass).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn commit(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Bytes held by the cache.
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.latent.len() + l.k_rope.len()) * 4)
            .sum()
    }
}
