//! Device ops, each the twin of a CPU op (named on each): RMSNorm, RoPE, embedding lookup, the
//! MoE gate's routing, greedy sampling, temperature softmax, and MLA decode attention over the
//! latent cache. Activations stay on the device between ops; every op checks the sizes it is
//! given before it launches, so a wrong shape is an error, never an out-of-bounds access.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::config::{MoeConfig, RopeStyle, ScoringFunc, TopkMethod};
use crate::cuda::{Gpu, block_per, i32_of, launch_config};
use crate::error::{EngineError, Result};
use crate::model::gate::{Gate, Routing};
use crate::model::rope::Rope;
use crate::tensor::Tensor;

/// A buffer too small for the op is a shape error naming it.
fn need(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(EngineError::Shape(format!(
            "{what} holds {have} elements, the op needs {need}"
        )));
    }
    Ok(())
}

impl Gpu {
    /// RMSNorm of each row of `x: [rows, dim]`, in place (CPU: `cpu::ops::rms_norm_inplace`;
    /// Gemma's `1 + w` is folded into the weight at load, as on the CPU).
    pub fn rms_norm(
        &self,
        x: &mut CudaSlice<f32>,
        rows: usize,
        weight: &CudaSlice<f32>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        need("x", x.len(), rows * dim)?;
        need("weight", weight.len(), dim)?;
        let dim = i32_of(dim, "dim")?;
        // SAFETY: one block per row reads and writes its `dim` elements (sizes checked above).
        unsafe {
            self.launch()
                .rms_norm_f32(block_per(rows, 1)?, x, weight, dim, eps)
        }
    }

    /// Rotates dims `offset .. offset + rope.dim()` of every head of `x: [tokens, heads,
    /// stride]` in place, token `t` at position `positions[t]` (CPU: [`Rope::apply`]).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        rope: &GpuRope,
        tokens: usize,
        heads: usize,
        stride: usize,
        offset: usize,
    ) -> Result<()> {
        if offset + 2 * rope.half > stride {
            return Err(EngineError::Shape(format!(
                "rotating dims {offset}..{} of heads {stride} wide",
                offset + 2 * rope.half
            )));
        }
        let pairs = tokens * heads * rope.half;
        if pairs == 0 {
            return Ok(());
        }
        need("x", x.len(), tokens * heads * stride)?;
        need("positions", positions.len(), tokens)?;
        let cfg = launch_config(pairs)?;
        // SAFETY: one thread per (token, head, pair) inside the checked sizes.
        unsafe {
            self.launch().rope_f32(
                cfg,
                x,
                positions,
                &rope.inv_freq,
                i32_of(tokens, "tokens")?,
                i32_of(heads, "heads")?,
                i32_of(stride, "stride")?,
                i32_of(offset, "offset")?,
                i32_of(rope.half, "rope pairs")?,
                rope.factor,
                i32::from(rope.interleaved),
            )
        }
    }

    /// Rows of a bf16 table `[vocab, hidden]` for `ids`, times `scale`, as f32 `[ids, hidden]`
    /// (CPU: the embedding lookup; Gemma passes √hidden).
    pub fn embed(
        &self,
        table: &CudaSlice<u16>,
        vocab: usize,
        hidden: usize,
        ids: &[u32],
        scale: f32,
    ) -> Result<CudaSlice<f32>> {
        need("table", table.len(), vocab * hidden)?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::input(
                "input_ids",
                format!("token id {bad} is past the vocabulary of {vocab}"),
            ));
        }
        let mut out = self.zeros::<f32>(ids.len() * hidden)?;
        if ids.is_empty() || hidden == 0 {
            return Ok(out);
        }
        let ids_i: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
        let ids_dev = self.upload(&ids_i)?;
        let (n, h) = (i32_of(ids.len(), "ids")?, i32_of(hidden, "hidden")?);
        let cfg = launch_config(ids.len() * hidden)?;
        // SAFETY: reads rows ids[r] < vocab of the table, writes ids·hidden elements.
        unsafe {
            self.launch()
                .embed_bf16(cfg, table, &ids_dev, &mut out, n, h, scale)
        }?;
        Ok(out)
    }

    /// The greedy token of each row of `logits: [rows, vocab]`, the first maximum on ties
    /// (CPU: `sampling::argmax`).
    pub fn argmax_rows(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
    ) -> Result<Vec<u32>> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        if vocab == 0 {
            return Err(EngineError::Shape("argmax over an empty vocabulary".into()));
        }
        need("logits", logits.len(), rows * vocab)?;
        let mut ids = self.zeros::<i32>(rows)?;
        let v = i32_of(vocab, "vocab")?;
        // SAFETY: one block per row reads its `vocab` logits and writes one id.
        unsafe {
            self.launch()
                .argmax_rows(block_per(rows, 1)?, logits, v, &mut ids)
        }?;
        let host = self.download(&ids)?;
        Ok(host[..rows].iter().map(|&i| i as u32).collect())
    }

    /// `softmax(logits / temperature)` of each row of `x: [rows, vocab]`, in place (CPU:
    /// `cpu::ops::softmax_inplace` of the scaled row).
    pub fn softmax_rows(
        &self,
        x: &mut CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
    ) -> Result<()> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(EngineError::input(
                "temperature",
                format!("must be a positive number for a softmax, got {temperature}"),
            ));
        }
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        need("x", x.len(), rows * vocab)?;
        let v = i32_of(vocab, "vocab")?;
        // SAFETY: one block per row reads and writes its `vocab` elements.
        unsafe {
            self.launch()
                .softmax_rows(block_per(rows, 1)?, x, v, temperature)
        }
    }

    /// Decode attention of one query token per sequence over an MLA layer's latent cache, in
    /// the weight-absorbed form (CPU: [`crate::model::mla::latent_attention`]).
    /// `q_abs: [seqs, heads, rank]` (the no-rope query through W_UK), `q_pe: [seqs, heads,
    /// rope]`; sequence `s` attends its first `ctx_lens[s]` cached rows through the block table
    /// `tables[s]`. Returns the attended latents, `[seqs, heads, rank]`.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_decode(
        &self,
        q_abs: &CudaSlice<f32>,
        q_pe: &CudaSlice<f32>,
        cache: &LatentCache,
        tables: &[Vec<u32>],
        ctx_lens: &[usize],
        heads: usize,
        scale: f32,
    ) -> Result<CudaSlice<f32>> {
        let seqs = ctx_lens.len();
        if tables.len() != seqs {
            return Err(EngineError::Shape(format!(
                "{} block tables for {seqs} sequences",
                tables.len()
            )));
        }
        let mut out = self.zeros::<f32>(seqs * heads * cache.rank)?;
        if seqs == 0 || heads == 0 {
            return Ok(out);
        }
        need("q_abs", q_abs.len(), seqs * heads * cache.rank)?;
        need("q_pe", q_pe.len(), seqs * heads * cache.rope)?;
        for (s, (table, &ctx)) in tables.iter().zip(ctx_lens).enumerate() {
            if ctx == 0 {
                return Err(EngineError::Shape(format!(
                    "sequence {s} has no cached rows to attend"
                )));
            }
            if table.len() * cache.block < ctx {
                return Err(EngineError::Shape(format!(
                    "sequence {s}: {} blocks of {} rows for a context of {ctx}",
                    table.len(),
                    cache.block
                )));
            }
            if let Some(&bad) = table.iter().find(|&&b| b as usize >= cache.blocks) {
                return Err(EngineError::Shape(format!(
                    "sequence {s}: block {bad} is past the cache's {} blocks",
                    cache.blocks
                )));
            }
        }
        let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let max_ctx = ctx_lens.iter().copied().max().unwrap_or(1);
        let mut flat = vec![0i32; seqs * max_blocks];
        for (row, table) in flat.chunks_exact_mut(max_blocks).zip(tables) {
            for (dst, &b) in row.iter_mut().zip(table) {
                *dst = b as i32;
            }
        }
        let lens: Vec<i32> = ctx_lens
            .iter()
            .map(|&c| i32_of(c, "context"))
            .collect::<Result<_>>()?;
        let tables_dev = self.upload(&flat)?;
        let lens_dev = self.upload(&lens)?;
        let mut scratch = self.zeros::<f32>(seqs * heads * max_ctx)?;
        let cfg = block_per(heads, seqs)?;
        // SAFETY: one block per (head, sequence); rows come from checked block tables, the
        // scratch holds max_ctx scores per (sequence, head), queries and output sizes checked.
        unsafe {
            self.launch().mla_decode(
                cfg,
                q_abs,
                q_pe,
                &cache.rows,
                &tables_dev,
                &lens_dev,
                &mut scratch,
                &mut out,
                i32_of(heads, "heads")?,
                i32_of(cache.rank, "rank")?,
                i32_of(cache.rope, "rope")?,
                i32_of(cache.block, "block")?,
                i32_of(max_blocks, "blocks per table")?,
                i32_of(max_ctx, "context")?,
                scale,
            )
        }?;
        Ok(out)
    }
}

/// A RoPE table on the device: each pair's frequency (scaling applied), the cos/sin factor and
/// the layout, taken from the CPU's [`Rope`].
#[derive(Debug)]
pub struct GpuRope {
    inv_freq: CudaSlice<f32>,
    half: usize,
    factor: f32,
    interleaved: bool,
}

impl GpuRope {
    pub fn new(gpu: &Gpu, rope: &Rope) -> Result<GpuRope> {
        Ok(GpuRope {
            inv_freq: gpu.upload(rope.inv_freq())?,
            half: rope.inv_freq().len(),
            factor: rope.attention_factor(),
            interleaved: rope.style() == RopeStyle::Interleaved,
        })
    }

    /// Rotated dims per head.
    pub fn dim(&self) -> usize {
        2 * self.half
    }
}

/// The latent cache of one MLA layer on the device: `[blocks · block, rank + rope]` f32 rows,
/// each the normed latent then the roped shared key, addressed through per-sequence block
/// tables as in the CPU's paged cache.
#[derive(Debug)]
pub struct LatentCache {
    rows: CudaSlice<f32>,
    blocks: usize,
    block: usize,
    rank: usize,
    rope: usize,
}

impl LatentCache {
    /// A cache holding `rows` (`[blocks · block, rank + rope]`, from the host).
    pub fn from_rows(
        gpu: &Gpu,
        rows: &[f32],
        block: usize,
        rank: usize,
        rope: usize,
    ) -> Result<LatentCache> {
        let width = rank + rope;
        if block == 0 || width == 0 || !rows.len().is_multiple_of(block * width) {
            return Err(EngineError::Shape(format!(
                "{} cache values are not whole blocks of {block} rows of {width}",
                rows.len()
            )));
        }
        Ok(LatentCache {
            rows: gpu.upload(rows)?,
            blocks: rows.len() / (block * width),
            block,
            rank,
            rope,
        })
    }
}

/// The deepest groups and widest expert sets the routing kernel holds per thread.
const MAX_EXPERTS: usize = 512;
const MAX_GROUPS: usize = 64;

/// The MoE gate on the device: f32 logits through cuBLAS, then one routing thread per token
/// (CPU: [`Gate`]). Produces the same [`Routing`] the expert layer consumes.
#[derive(Debug)]
pub struct GpuGate {
    gpu: Arc<Gpu>,
    /// `[experts, hidden]` f32.
    weight: CudaSlice<f32>,
    /// The correction bias, or one unused zero.
    bias: CudaSlice<f32>,
    has_bias: bool,
    config: MoeConfig,
    hidden: usize,
}

impl GpuGate {
    /// The CPU gate's weight, bias and configuration, on the device.
    pub fn from_gate(gpu: Arc<Gpu>, gate: &Gate) -> Result<GpuGate> {
        let (_, hidden) = gate.weight().dims2()?;
        GpuGate::new(
            gpu,
            gate.config(),
            gate.weight().as_f32()?,
            hidden,
            gate.bias(),
        )
    }

    /// A gate from its weight `[experts, hidden]` and optional correction bias `[experts]`.
    pub fn new(
        gpu: Arc<Gpu>,
        config: &MoeConfig,
        weight: &[f32],
        hidden: usize,
        bias: Option<&[f32]>,
    ) -> Result<GpuGate> {
        let e = config.n_routed_experts;
        let refuse = |msg: String| Err(EngineError::Shape(format!("gate on the device: {msg}")));
        if e == 0 || e > MAX_EXPERTS {
            return refuse(format!("{e} experts; the kernel takes 1 to {MAX_EXPERTS}"));
        }
        let groups = config.n_group.max(1);
        if groups > MAX_GROUPS || !e.is_multiple_of(groups) {
            return refuse(format!(
                "{groups} expert groups for {e} experts; at most {MAX_GROUPS}, dividing them"
            ));
        }
        if config.num_experts_per_tok == 0 || config.num_experts_per_tok > e {
            return refuse(format!(
                "{} experts per token of {e}",
                config.num_experts_per_tok
            ));
        }
        if config.topk_group > groups {
            return refuse(format!(
                "topk_group {} of {groups} groups",
                config.topk_group
            ));
        }
        need("gate weight", weight.len(), e * hidden)?;
        if let Some(b) = bias
            && b.len() != e
        {
            return refuse(format!("a correction bias of {} for {e} experts", b.len()));
        }
        let bias_dev = match bias {
            Some(b) => gpu.upload(b)?,
            None => gpu.zeros::<f32>(1)?,
        };
        Ok(GpuGate {
            weight: gpu.upload(&weight[..e * hidden])?,
            bias: bias_dev,
            has_bias: bias.is_some(),
            config: config.clone(),
            hidden,
            gpu,
        })
    }

    /// `x: [tokens, hidden]` on the device → routing `[tokens, num_experts_per_tok]`.
    pub fn forward(&self, x: &CudaSlice<f32>, tokens: usize) -> Result<Routing> {
        let e = self.config.n_routed_experts;
        // [tokens, experts]
        let mut logits = self.gpu.zeros::<f32>(tokens * e)?;
        self.gpu
            .gemm_f32(x, tokens, self.hidden, &self.weight, e, &mut logits)?;
        self.route_logits(&logits, tokens)
    }

    /// `x: [tokens, hidden]` on the host: one upload, then [`forward`](Self::forward).
    pub fn forward_host(&self, x: &Tensor) -> Result<Routing> {
        let (tokens, hidden) = x.dims2()?;
        if hidden != self.hidden {
            return Err(EngineError::Shape(format!(
                "gate input has {hidden} columns, the gate takes {}",
                self.hidden
            )));
        }
        if tokens == 0 {
            return self.route_logits(&self.gpu.zeros::<f32>(1)?, 0);
        }
        self.forward(&self.gpu.upload(x.as_f32()?)?, tokens)
    }

    /// Routing from gate logits `[tokens, experts]` already on the device.
    pub fn route_logits(&self, logits: &CudaSlice<f32>, tokens: usize) -> Result<Routing> {
        let c = &self.config;
        let (e, k) = (c.n_routed_experts, c.num_experts_per_tok);
        if tokens == 0 {
            return Ok(Routing {
                k,
                ids: Vec::new(),
                weights: Vec::new(),
            });
        }
        need("logits", logits.len(), tokens * e)?;
        let gpu = &self.gpu;
        let mut ids = gpu.zeros::<i32>(tokens * k)?;
        let mut weights = gpu.zeros::<f32>(tokens * k)?;
        let group_mode: i32 = match c.topk_method {
            _ if c.n_group <= 1 => 0,
            TopkMethod::Greedy => 0,
            TopkMethod::GroupLimitedGreedy => 1,
            TopkMethod::NoAuxTc => 2,
        };
        let cfg = launch_config(tokens)?;
        // SAFETY: one thread per token reads its `experts` logits and writes k ids and weights;
        // the experts and groups fit the kernel's per-thread arrays (checked in `new`).
        unsafe {
            gpu.launch().route_topk(
                cfg,
                logits,
                &self.bias,
                i32::from(self.has_bias),
                i32_of(tokens, "tokens")?,
                i32_of(e, "experts")?,
                i32_of(k, "experts per token")?,
                i32::from(c.scoring_func == ScoringFunc::Softmax),
                group_mode,
                i32_of(c.n_group.max(1), "groups")?,
                i32_of(c.topk_group, "topk_group")?,
                i32::from(c.norm_topk_prob),
                c.routed_scaling_factor,
                &mut ids,
                &mut weights,
            )
        }?;
        let ids = gpu.download(&ids)?;
        let weights = gpu.download(&weights)?;
        Ok(Routing {
            k,
            ids: ids[..tokens * k].iter().map(|&i| i as u32).collect(),
            weights: weights[..tokens * k].to_vec(),
        })
    }
}
