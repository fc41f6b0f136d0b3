//! The paged KV cache.
//!
//! Per layer and token, MLA caches only the normed compressed latent (`kv_lora_rank`) and the
//! roped shared key (`qk_rope_head_dim`) — never per-head keys and values; GQA caches the roped
//! keys and the values of the KV heads only (`2 × num_key_value_heads × head_dim`). Rows live in
//! fixed-size blocks of `block_size` tokens (all layers of those tokens in one block), so a
//! server can hand blocks out of a bounded [`BlockPool`], admit requests by free blocks, and
//! get every block back when a sequence finishes, is cancelled or preempted — no fragmentation,
//! no reallocation while a sequence grows.

use crate::error::{EngineError, Result};

/// Block size of caches made outside a server (`CausalLm::new_cache`).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The shape of one cache block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    /// Floats per token per layer: MLA's latent then roped key, or GQA's keys then values.
    pub row: usize,
    /// Tokens per block.
    pub block_size: usize,
}

impl KvLayout {
    /// Floats per token per layer.
    pub fn row(&self) -> usize {
        self.row
    }

    /// Floats per block: `[layers, block_size, row]`.
    pub fn block_floats(&self) -> usize {
        self.layers * self.block_size * self.row()
    }

    pub fn block_bytes(&self) -> usize {
        self.block_floats() * std::mem::size_of::<f32>()
    }

    /// Blocks that hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Cache bytes per token, all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers * self.row() * std::mem::size_of::<f32>()
    }
}

/// One block: `[layers, block_size, row]` floats.
pub type KvBlock = Box<[f32]>;

fn new_block(layout: &KvLayout) -> KvBlock {
    vec![0.0f32; layout.block_floats()].into_boxed_slice()
}

/// A sequence's cache: its blocks in position order and how many tokens they hold.
#[derive(Debug)]
pub struct KvCache {
    layout: KvLayout,
    blocks: Vec<KvBlock>,
    len: usize,
    /// Whether a forward pass may allocate blocks itself (caches outside a pool).
    growable: bool,
}

impl KvCache {
    /// A cache that allocates its own blocks as it grows.
    pub fn new(layout: KvLayout) -> KvCache {
        KvCache {
            layout,
            blocks: Vec::new(),
            len: 0,
            growable: true,
        }
    }

    /// A cache whose blocks come only from a [`BlockPool`]; a forward pass that would outgrow
    /// it fails instead of allocating.
    pub fn pooled(layout: KvLayout) -> KvCache {
        KvCache {
            growable: false,
            ..KvCache::new(layout)
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Tokens cached (committed after a full forward pass).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the blocks held can take.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * self.layout.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// More blocks needed before `new_tokens` more tokens fit.
    pub fn blocks_needed(&self, new_tokens: usize) -> usize {
        self.layout
            .blocks_for(self.len + new_tokens)
            .saturating_sub(self.blocks.len())
    }

    /// Makes room for `new_tokens` more tokens: a growable cache allocates, a pooled one must
    /// already hold the blocks.
    pub fn reserve(&mut self, new_tokens: usize) -> Result<()> {
        let needed = self.blocks_needed(new_tokens);
        if needed == 0 {
            return Ok(());
        }
        if !self.growable {
            return Err(EngineError::input(
                "cache",
                format!(
                    "holds {} tokens with room for {}, {new_tokens} more need {needed} more blocks",
                    self.len,
                    self.capacity()
                ),
            ));
        }
        for _ in 0..needed {
            self.blocks.push(new_block(&self.layout));
        }
        Ok(())
    }

    fn offset(&self, layer: usize, pos: usize) -> (usize, usize) {
        let bs = self.layout.block_size;
        let row = self.layout.row();
        (pos / bs, (layer * bs + pos % bs) * row)
    }

    /// The cached row of `pos` in `layer`: `[row]`.
    pub(crate) fn row(&self, layer: usize, pos: usize) -> &[f32] {
        let (b, off) = self.offset(layer, pos);
        &self.blocks[b][off..off + self.layout.row()]
    }

    pub(crate) fn row_mut(&mut self, layer: usize, pos: usize) -> &mut [f32] {
        let (b, off) = self.offset(layer, pos);
        let row = self.layout.row();
        &mut self.blocks[b][off..off + row]
    }

    /// Counts `tokens` more positions as cached, after their rows were written (the model's
    /// forward pass does this).
    pub fn commit(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Bytes held by the cache's blocks.
    pub fn size_in_bytes(&self) -> usize {
        self.blocks.len() * self.layout.block_bytes()
    }
}

/// A bounded set of cache blocks shared by the sequences of one server. Blocks are allocated
/// on first use up to the bound and recycled afterwards, so memory never exceeds
/// `total × block_bytes`.
#[derive(Debug)]
pub struct BlockPool {
    layout: KvLayout,
    total: usize,
    /// Blocks allocated so far (in use or free).
    allocated: usize,
    free: Vec<KvBlock>,
}

impl BlockPool {
    pub fn new(layout: KvLayout, total_blocks: usize) -> BlockPool {
        BlockPool {
            layout,
            total: total_blocks,
            allocated: 0,
            free: Vec::new(),
        }
    }

    /// As many blocks as fit in `bytes`.
    pub fn with_memory(layout: KvLayout, bytes: u64) -> BlockPool {
        let blocks = bytes / layout.block_bytes().max(1) as u64;
        BlockPool::new(layout, usize::try_from(blocks).unwrap_or(usize::MAX))
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    pub fn free_blocks(&self) -> usize {
        self.total - self.used_blocks()
    }

    pub fn used_blocks(&self) -> usize {
        self.allocated - self.free.len()
    }

    /// Gives `cache` the blocks for `new_tokens` more tokens, all or none. Returns whether it
    /// did.
    pub fn grow(&mut self, cache: &mut KvCache, new_tokens: usize) -> bool {
        let needed = cache.blocks_needed(new_tokens);
        if needed > self.free_blocks() {
            return false;
        }
        for _ in 0..needed {
            let block = match self.free.pop() {
                Some(b) => b,
                None => {
                    self.allocated += 1;
                    new_block(&self.layout)
                }
            };
            cache.blocks.push(block);
        }
        true
    }

    /// Takes every block back from `cache` and empties it.
    pub fn release(&mut self, cache: &mut KvCache) {
        self.free.append(&mut cache.blocks);
        cache.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            layers: 2,
            row: 6,
            block_size: 4,
        }
    }

    #[test]
    fn rows_of_different_layers_and_blocks_do_not_overlap() {
        let mut c = KvCache::new(layout());
        c.reserve(9).unwrap();
        assert_eq!(c.num_blocks(), 3);
        for layer in 0..2 {
            for pos in 0..9 {
                c.row_mut(layer, pos).fill((layer * 100 + pos) as f32);
            }
        }
        for layer in 0..2 {
            for pos in 0..9 {
                assert!(
                    c.row(layer, pos)
                        .iter()
                        .all(|&v| v == (layer * 100 + pos) as f32)
                );
            }
        }
    }

    #[test]
    fn pooled_cache_refuses_to_grow_by_itself() {
        let mut c = KvCache::pooled(layout());
        let err = c.reserve(1).unwrap_err().to_string();
        assert!(err.contains("cache"), "{err}");
        let mut pool = BlockPool::new(layout(), 2);
        assert!(pool.grow(&mut c, 5));
        assert_eq!(pool.free_blocks(), 0);
        c.reserve(5).unwrap();
        c.commit(5);
        // Three more tokens fit in the second block; a fourth needs a block the pool lacks.
        assert!(pool.grow(&mut c, 3));
        assert!(!pool.grow(&mut c, 4));
        assert_eq!(c.num_blocks(), 2);
        pool.release(&mut c);
        assert_eq!((pool.free_blocks(), c.len(), c.num_blocks()), (2, 0, 0));
    }

    #[test]
    fn pool_memory_bound_counts_whole_blocks() {
        let l = layout();
        let pool = BlockPool::with_memory(l, (l.block_bytes() * 3 + 1) as u64);
        assert_eq!(pool.total_blocks(), 3);
    }
}
