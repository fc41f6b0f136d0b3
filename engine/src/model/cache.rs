//! The paged KV cache.
//!
//! Per layer and token, MLA caches only the normed compressed latent (`kv_lora_rank`) and the
//! roped shared key (`qk_rope_head_dim`) — never per-head keys and values; GQA caches the roped
//! keys and the values of the KV heads only (`2 × num_key_value_heads × head_dim`). Rows live in
//! fixed-size blocks of `block_size` tokens, so a server can hand blocks out of a bounded
//! [`BlockPool`], admit requests by free blocks, and get every block back when a sequence
//! finishes, is cancelled or preempted — no fragmentation, no reallocation while a sequence
//! grows.
//!
//! Layers fall in two groups, each with its own block table: full-attention layers keep every
//! position; sliding-window layers only the last `window`, so their blocks that fall out of
//! every future query's window go back (to the pool, or are freed) as the sequence grows, and
//! their cache stays bounded by the window whatever the context. A block of a group holds the
//! rows of all the group's layers for its tokens. The pool counts in *layer blocks* (one
//! layer's rows for `block_size` tokens); a group's block costs as many as it has layers.

use std::sync::Arc;

use crate::error::{EngineError, Result};

/// Block size of caches made outside a server (`CausalLm::new_cache`).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

const FULL: usize = 0;
const WINDOWED: usize = 1;

/// The shape of a model's cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    /// Floats per token per layer: MLA's latent then roped key, or GQA's keys then values.
    pub row: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Tokens a sliding-window layer sees (itself included); `None` when no layer slides.
    window: Option<usize>,
    /// Per layer: its group (full or windowed) and its index inside the group.
    slots: Arc<[(usize, usize)]>,
    /// Layers per group.
    group_layers: [usize; 2],
}

impl KvLayout {
    /// Every layer keeps every position.
    pub fn new(layers: usize, row: usize, block_size: usize) -> KvLayout {
        KvLayout::with_window(layers, row, block_size, None, &[])
    }

    /// Layers `l` with `sliding[l]` keep only the last `window` positions.
    pub fn with_window(
        layers: usize,
        row: usize,
        block_size: usize,
        window: Option<usize>,
        sliding: &[bool],
    ) -> KvLayout {
        let mut group_layers = [0, 0];
        let slots = (0..layers)
            .map(|l| {
                let g = if window.is_some() && sliding.get(l).copied().unwrap_or(false) {
                    WINDOWED
                } else {
                    FULL
                };
                group_layers[g] += 1;
                (g, group_layers[g] - 1)
            })
            .collect();
        KvLayout {
            layers,
            row,
            block_size,
            window: window.filter(|_| group_layers[WINDOWED] > 0),
            slots,
            group_layers,
        }
    }

    /// Floats per token per layer.
    pub fn row(&self) -> usize {
        self.row
    }

    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// Bytes of one layer block: one layer's rows for `block_size` tokens (the pool's unit).
    pub fn block_bytes(&self) -> usize {
        self.block_size * self.row * std::mem::size_of::<f32>()
    }

    /// Layer blocks one sequence needs at most for `tokens` tokens fed in chunks of at most
    /// `chunk` tokens (its sliding-window layers give back what no query can see any more).
    pub fn blocks_for(&self, tokens: usize, chunk: usize) -> usize {
        let blocks = tokens.div_ceil(self.block_size);
        self.group_layers[FULL] * blocks
            + self.group_layers[WINDOWED] * blocks.min(self.window_blocks(chunk))
    }

    /// Most tokens one sequence fed in chunks of at most `chunk` tokens can hold in `blocks`
    /// layer blocks (`usize::MAX` when every layer slides: the cache stops growing).
    pub fn max_tokens(&self, blocks: usize, chunk: usize) -> usize {
        let windowed = self.group_layers[WINDOWED] * self.window_blocks(chunk);
        match self.group_layers[FULL] {
            0 if blocks >= windowed => usize::MAX,
            0 => 0,
            full => blocks.saturating_sub(windowed) / full * self.block_size,
        }
    }

    /// Blocks a sliding-window layer holds at most while a chunk of `chunk` tokens goes in at
    /// position `len`: from block `⌊(len + 1 − window) / bs⌋` to `⌈(len + chunk) / bs⌉`.
    fn window_blocks(&self, chunk: usize) -> usize {
        self.window
            .map_or(usize::MAX, |w| (w + chunk.max(1) - 1) / self.block_size + 2)
    }

    /// Cache bytes per token with no window bound, all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers * self.row * std::mem::size_of::<f32>()
    }

    fn group_block_floats(&self, group: usize) -> usize {
        self.group_layers[group] * self.block_size * self.row
    }
}

/// One block of one group: `[group layers, block_size, row]` floats.
pub type KvBlock = Box<[f32]>;

fn new_block(layout: &KvLayout, group: usize) -> KvBlock {
    vec![0.0f32; layout.group_block_floats(group)].into_boxed_slice()
}

/// A sequence's cache: per group, its blocks in position order, and how many tokens it holds.
#[derive(Debug)]
pub struct KvCache {
    layout: KvLayout,
    /// `[full, windowed]` block tables.
    blocks: [Vec<KvBlock>; 2],
    /// Leading windowed blocks given back (out of every window): windowed block `i` holds
    /// positions of block `dropped + i`.
    dropped: usize,
    len: usize,
    /// Whether a forward pass may allocate blocks itself (caches outside a pool).
    growable: bool,
}

impl KvCache {
    /// A cache that allocates its own blocks as it grows.
    pub fn new(layout: KvLayout) -> KvCache {
        KvCache {
            layout,
            blocks: [Vec::new(), Vec::new()],
            dropped: 0,
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

    /// Position blocks each group's table reaches (held or given back).
    fn reach(&self, group: usize) -> usize {
        match group {
            WINDOWED => self.dropped + self.blocks[WINDOWED].len(),
            _ => self.blocks[FULL].len(),
        }
    }

    fn groups(&self) -> impl Iterator<Item = usize> + '_ {
        [FULL, WINDOWED]
            .into_iter()
            .filter(|&g| self.layout.group_layers[g] > 0)
    }

    /// Tokens the blocks held can take.
    pub fn capacity(&self) -> usize {
        self.groups().map(|g| self.reach(g)).min().unwrap_or(0) * self.layout.block_size
    }

    /// Layer blocks held.
    pub fn num_blocks(&self) -> usize {
        self.groups()
            .map(|g| self.blocks[g].len() * self.layout.group_layers[g])
            .sum()
    }

    /// More layer blocks needed before `new_tokens` more tokens fit.
    pub fn blocks_needed(&self, new_tokens: usize) -> usize {
        let target = (self.len + new_tokens).div_ceil(self.layout.block_size);
        self.groups()
            .map(|g| target.saturating_sub(self.reach(g)) * self.layout.group_layers[g])
            .sum()
    }

    /// Takes off the windowed blocks no future query can see: the next query sits at position
    /// `len` and sees from `len + 1 - window` on.
    fn take_expired(&mut self) -> Vec<KvBlock> {
        let Some(window) = self.layout.window else {
            return Vec::new();
        };
        let expired = (self.len + 1).saturating_sub(window) / self.layout.block_size;
        let n = expired
            .saturating_sub(self.dropped)
            .min(self.blocks[WINDOWED].len());
        self.dropped += n;
        self.blocks[WINDOWED].drain(..n).collect()
    }

    /// Makes room for `new_tokens` more tokens: a growable cache frees what slid out of its
    /// windows and allocates, a pooled one must already hold the blocks.
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
        drop(self.take_expired());
        let target = (self.len + new_tokens).div_ceil(self.layout.block_size);
        for g in [FULL, WINDOWED] {
            if self.layout.group_layers[g] > 0 {
                while self.reach(g) < target {
                    let block = new_block(&self.layout, g);
                    self.blocks[g].push(block);
                }
            }
        }
        Ok(())
    }

    /// Block index and offset of `pos` in `layer`.
    fn offset(&self, layer: usize, pos: usize) -> (usize, usize, usize) {
        let bs = self.layout.block_size;
        let (group, index) = self.layout.slots[layer];
        let block = pos / bs - if group == WINDOWED { self.dropped } else { 0 };
        (group, block, (index * bs + pos % bs) * self.layout.row)
    }

    /// The cached row of `pos` in `layer`: `[row]`. For a sliding-window layer, `pos` must be
    /// inside the window of a query at or after `len()`.
    pub(crate) fn row(&self, layer: usize, pos: usize) -> &[f32] {
        let (g, b, off) = self.offset(layer, pos);
        &self.blocks[g][b][off..off + self.layout.row]
    }

    pub(crate) fn row_mut(&mut self, layer: usize, pos: usize) -> &mut [f32] {
        let (g, b, off) = self.offset(layer, pos);
        let row = self.layout.row;
        &mut self.blocks[g][b][off..off + row]
    }

    /// Counts `tokens` more positions as cached, after their rows were written (the model's
    /// forward pass does this).
    pub fn commit(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Bytes held by the cache's blocks.
    pub fn size_in_bytes(&self) -> usize {
        self.num_blocks() * self.layout.block_bytes()
    }
}

/// A bounded set of cache blocks shared by the sequences of one server. Blocks are allocated
/// on first use up to the bound and recycled afterwards, so memory never exceeds
/// `total × block_bytes` (counted in layer blocks).
#[derive(Debug)]
pub struct BlockPool {
    layout: KvLayout,
    /// Layer blocks the pool may hold.
    total: usize,
    /// Layer blocks allocated so far (in use or free).
    allocated: usize,
    /// Free blocks per group.
    free: [Vec<KvBlock>; 2],
}

impl BlockPool {
    /// A pool of `total_blocks` layer blocks.
    pub fn new(layout: KvLayout, total_blocks: usize) -> BlockPool {
        BlockPool {
            layout,
            total: total_blocks,
            allocated: 0,
            free: [Vec::new(), Vec::new()],
        }
    }

    /// As many layer blocks as fit in `bytes`.
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
        self.allocated - self.free_units(FULL) - self.free_units(WINDOWED)
    }

    fn free_units(&self, group: usize) -> usize {
        self.free[group].len() * self.layout.group_layers[group]
    }

    /// A block of `group`: a free one, or a new one within the bound (dropping free blocks of
    /// the other group to make room).
    fn take(&mut self, group: usize) -> KvBlock {
        if let Some(b) = self.free[group].pop() {
            return b;
        }
        let cost = self.layout.group_layers[group];
        let other = 1 - group;
        while self.allocated + cost > self.total && self.free[other].pop().is_some() {
            self.allocated -= self.layout.group_layers[other];
        }
        self.allocated += cost;
        new_block(&self.layout, group)
    }

    /// Gives `cache` the blocks for `new_tokens` more tokens, all or none, after taking back
    /// what slid out of its windows. Returns whether it did.
    pub fn grow(&mut self, cache: &mut KvCache, new_tokens: usize) -> bool {
        let expired = cache.take_expired();
        self.free[WINDOWED].extend(expired);
        if cache.blocks_needed(new_tokens) > self.free_blocks() {
            return false;
        }
        let target = (cache.len + new_tokens).div_ceil(self.layout.block_size);
        for g in [FULL, WINDOWED] {
            if self.layout.group_layers[g] > 0 {
                while cache.reach(g) < target {
                    let block = self.take(g);
                    cache.blocks[g].push(block);
                }
            }
        }
        true
    }

    /// Takes every block back from `cache` and empties it.
    pub fn release(&mut self, cache: &mut KvCache) {
        for g in [FULL, WINDOWED] {
            self.free[g].append(&mut cache.blocks[g]);
        }
        cache.dropped = 0;
        cache.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout::new(2, 6, 4)
    }

    /// Layers 0 and 2 slide over 5 tokens, layer 1 sees everything; blocks of 2 tokens.
    fn windowed() -> KvLayout {
        KvLayout::with_window(3, 2, 2, Some(5), &[true, false, true])
    }

    #[test]
    fn rows_of_different_layers_and_blocks_do_not_overlap() {
        let mut c = KvCache::new(layout());
        c.reserve(9).unwrap();
        assert_eq!(c.num_blocks(), 6);
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
        let mut pool = BlockPool::new(layout(), 4);
        assert!(pool.grow(&mut c, 5));
        assert_eq!(pool.free_blocks(), 0);
        c.reserve(5).unwrap();
        c.commit(5);
        // Three more tokens fit in the second block; a fourth needs blocks the pool lacks.
        assert!(pool.grow(&mut c, 3));
        assert!(!pool.grow(&mut c, 4));
        assert_eq!(c.num_blocks(), 4);
        pool.release(&mut c);
        assert_eq!((pool.free_blocks(), c.len(), c.num_blocks()), (4, 0, 0));
    }

    #[test]
    fn pool_memory_bound_counts_whole_blocks() {
        let l = layout();
        let pool = BlockPool::with_memory(l.clone(), (l.block_bytes() * 3 + 1) as u64);
        assert_eq!(pool.total_blocks(), 3);
    }

    /// Decodes `tokens` one at a time through a pooled cache, writing each position's rows the
    /// way attention does and reading back every row a query may see.
    fn decode(pool: &mut BlockPool, c: &mut KvCache, tokens: usize) -> usize {
        let mut peak = 0;
        for _ in 0..tokens {
            assert!(pool.grow(c, 1), "grow at {}", c.len());
            let pos = c.len();
            for layer in 0..3 {
                c.row_mut(layer, pos).fill((layer * 1000 + pos) as f32);
            }
            c.commit(1);
            for layer in 0..3 {
                let first = if layer == 1 {
                    0
                } else {
                    (pos + 1).saturating_sub(5)
                };
                for p in first..=pos {
                    assert_eq!(c.row(layer, p)[0], (layer * 1000 + p) as f32);
                }
            }
            peak = peak.max(c.num_blocks());
        }
        peak
    }

    #[test]
    fn sliding_window_layers_hold_a_bounded_number_of_blocks() {
        let l = windowed();
        let mut pool = BlockPool::new(l.clone(), 1000);
        let mut c = KvCache::pooled(l.clone());
        decode(&mut pool, &mut c, 100);
        // The full layer holds all 50 blocks; each sliding layer at most ⌈5/2⌉ + 1 of them.
        assert_eq!(c.blocks[FULL].len(), 50);
        assert!(
            c.blocks[WINDOWED].len() <= 4,
            "{}",
            c.blocks[WINDOWED].len()
        );
        assert!(c.num_blocks() <= l.blocks_for(100, 1));
        assert_eq!(pool.used_blocks(), c.num_blocks());
        pool.release(&mut c);
        assert_eq!(pool.used_blocks(), 0);
    }

    #[test]
    fn a_pool_sized_for_the_bound_serves_any_length_when_every_layer_slides() {
        let l = KvLayout::with_window(2, 2, 2, Some(5), &[true, true]);
        assert_eq!(l.max_tokens(l.blocks_for(1000, 1), 1), usize::MAX);
        let mut pool = BlockPool::new(l.clone(), l.blocks_for(1000, 1));
        let mut c = KvCache::pooled(l);
        for _ in 0..500 {
            assert!(pool.grow(&mut c, 1));
            c.commit(1);
        }
        assert_eq!(c.len(), 500);
    }

    #[test]
    fn growable_caches_free_what_slid_out_of_the_window() {
        let mut c = KvCache::new(windowed());
        for _ in 0..40 {
            c.reserve(1).unwrap();
            c.commit(1);
        }
        assert!(c.blocks[WINDOWED].len() <= 4);
        assert_eq!(c.blocks[FULL].len(), 20);
    }

    #[test]
    fn free_blocks_of_one_group_make_room_for_the_other() {
        // One sliding layer that sees only its own token, one full layer; one token per block.
        let l = KvLayout::with_window(2, 1, 1, Some(1), &[true, false]);
        let mut pool = BlockPool::new(l.clone(), 4);
        let mut a = KvCache::pooled(l.clone());
        assert!(pool.grow(&mut a, 2));
        pool.release(&mut a);
        // Free now: two full-layer blocks and two sliding-layer blocks. A sequence that decodes
        // needs ever more full-layer blocks and one sliding block: free sliding blocks are
        // dropped to make room, never past the bound.
        let mut b = KvCache::pooled(l);
        for _ in 0..3 {
            assert!(pool.grow(&mut b, 1));
            b.commit(1);
            assert!(pool.allocated <= pool.total);
        }
        assert_eq!((b.blocks[FULL].len(), b.blocks[WINDOWED].len()), (3, 1));
        assert!(!pool.grow(&mut b, 1));
        assert!(pool.allocated <= pool.total);
    }
}
