//! The whole decoder: embeddings, layers, final norm and LM head, over a batch of sequences.
//!
//! One definition for every supported architecture: a layer is `norm → attention (MLA or GQA)
//! → residual → norm → FFN (dense or MoE) → residual`, with Gemma's extra norms after attention
//! and FFN, embedding scale and logit soft-capping as knobs of [`ModelConfig`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checkpoint::{Checkpoint, WeightFormat};
use crate::config::{AttentionConfig, ModelConfig};
use crate::cpu::ops;
use crate::error::{EngineError, Result};
use crate::model::cache::{DEFAULT_BLOCK_SIZE, KvCache, KvLayout};
use crate::model::experts::RoutedExperts;
use crate::model::gate::{Gate, Routing};
use crate::model::gqa::GqaAttention;
use crate::model::linear::{Linear, Projection, RmsNorm};
use crate::model::mla::{AttentionMode, MlaAttention, SeqSpan};
use crate::model::mlp::Mlp;
use crate::model::moe::{ExpertExecutor, Moe, MoeStarted};
use crate::model::pipeline::{micro_batches_for, split_balanced};
use crate::model::rope::Rope;
use crate::model::shard::Parallel;
use crate::tensor::{CpuStorage, Tensor};

/// The LM head's name among the projections.
const LM_HEAD: &str = "lm_head";

/// Which routed experts a process loads.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ExpertSelection {
    /// Every expert of every MoE layer (single-process inference).
    #[default]
    All,
    /// None: they live on expert workers.
    None,
    /// Only these experts of these layers.
    Only(BTreeMap<usize, BTreeSet<u32>>),
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub experts: ExpertSelection,
    /// How FP8 linear weights are held.
    pub weights: WeightFormat,
}

/// One sequence of a batch: its new tokens and its cache.
#[derive(Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Which positions get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogitsFor {
    /// The last new token of each sequence: `[sequences, vocab]`.
    #[default]
    Last,
    /// Every new token: `[tokens, vocab]`.
    All,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardOptions {
    pub logits: LogitsFor,
    pub attention: AttentionMode,
    /// Keep each MoE layer's routing in the output.
    pub record_routing: bool,
    /// Split the batch into this many micro-batches of about equal tokens (0 or 1: none), so
    /// one's routed experts are in flight while another's attention runs. Each holds whole
    /// sequences, so there are at most as many as sequences.
    pub micro_batches: usize,
    /// Split only steps of at least this many tokens (0: any step of 2+ sequences). Below it
    /// routed-expert GEMMs are bound by reading the experts' weights, which every
    /// micro-batch reads again, so a split costs more than it overlaps.
    pub micro_batch_min_tokens: usize,
}

/// Where a forward pass's time went, summed over layers.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardTimings {
    pub attention: Duration,
    pub dense_ffn: Duration,
    pub gate: Duration,
    /// Routed experts: local compute, or dispatch and wait for remote workers.
    pub experts: Duration,
    pub shared_expert: Duration,
    /// Embedding, norms, residuals, final norm and LM head.
    pub other: Duration,
}

#[derive(Debug)]
pub struct ForwardOutput {
    pub logits: Tensor,
    /// `(layer, routing)` per MoE layer when asked for.
    pub routing: Vec<(usize, Routing)>,
    pub timings: ForwardTimings,
}

#[derive(Debug)]
enum Ffn {
    Dense(Mlp),
    Moe(Box<Moe>),
}

// One per layer, built once and never moved in the forward pass: the variants' sizes differ
// by a few hundred bytes of handles, not by the weights (those are on the heap or device).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Attention {
    Mla(MlaAttention),
    Gqa(GqaAttention),
}

impl Attention {
    fn size_in_bytes(&self) -> usize {
        match self {
            Attention::Mla(a) => a.size_in_bytes(),
            Attention::Gqa(a) => a.size_in_bytes(),
        }
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    /// On the attention output before the residual add (Gemma 3).
    post_attn_norm: Option<RmsNorm>,
    /// Before the FFN (`post_attention_layernorm` in pre-norm models, Gemma's
    /// `pre_feedforward_layernorm`).
    pre_ffn_norm: RmsNorm,
    /// On the FFN output before the residual add (Gemma 3).
    post_ffn_norm: Option<RmsNorm>,
    ffn: Ffn,
}

#[derive(Debug)]
pub struct CausalLm {
    config: ModelConfig,
    /// `[vocab, hidden]`; `None` with tied embeddings, whose rows are read from the LM head's
    /// (re-laid) weight instead of keeping the table twice.
    embed: Option<Tensor>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// The cache's shape at [`DEFAULT_BLOCK_SIZE`]; checked against every sequence's cache.
    kv_layout: KvLayout,
}

impl CausalLm {
    /// Loads the model from a checkpoint directory.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<CausalLm> {
        let config = ModelConfig::from_dir(dir)?;
        let mut ck = Checkpoint::open(dir)?;
        ck.set_weight_format(options.weights)?;
        CausalLm::new(config, &ck, options)
    }

    pub fn new(config: ModelConfig, ck: &Checkpoint, options: &LoadOptions) -> Result<CausalLm> {
        let h = config.hidden_size;
        let mla_rope = Arc::new(Rope::new(&config.rope, config.rope_dim()));
        let embed = ck.load_weight("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let norm = |name: &str| {
            RmsNorm::load_styled(ck, name, h, config.rms_norm_eps, config.norm.unit_offset)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let ffn = match (&config.moe, config.is_moe_layer(l)) {
                (Some(moe), true) => {
                    let chosen: BTreeSet<u32> = match &options.experts {
                        ExpertSelection::All => (0..moe.n_routed_experts as u32).collect(),
                        ExpertSelection::None => BTreeSet::new(),
                        ExpertSelection::Only(map) => map.get(&l).cloned().unwrap_or_default(),
                    };
                    if let Some(&bad) = chosen.iter().find(|&&e| e as usize >= moe.n_routed_experts)
                    {
                        return Err(EngineError::input(
                            "experts",
                            format!(
                                "expert {bad} of layer {l} is out of range (the model has {})",
                                moe.n_routed_experts
                            ),
                        ));
                    }
                    let block = moe.naming.block_prefix(l);
                    let shared = if moe.n_shared_experts > 0 {
                        Some(Mlp::new(
                            ck,
                            &format!("{block}.shared_experts"),
                            h,
                            moe.moe_intermediate_size * moe.n_shared_experts,
                        )?)
                    } else {
                        None
                    };
                    Ffn::Moe(Box::new(Moe {
                        gate: Gate::new(moe, ck, &format!("{block}.gate"), h)?,
                        experts: RoutedExperts::load(
                            ck,
                            &moe.naming,
                            l,
                            &chosen,
                            h,
                            moe.moe_intermediate_size,
                        )?,
                        shared,
                    }))
                }
                _ => Ffn::Dense(Mlp::load(
                    ck,
                    &format!("{p}.mlp"),
                    crate::model::mlp::PROJECTIONS,
                    h,
                    config.intermediate_size,
                    config.hidden_act,
                )?),
            };
            let attn_prefix = format!("{p}.self_attn");
            let attn = match &config.attention {
                AttentionConfig::Mla(a) => Attention::Mla(MlaAttention::new(
                    &config,
                    a,
                    ck,
                    &attn_prefix,
                    mla_rope.clone(),
                )?),
                AttentionConfig::Gqa(g) => {
                    Attention::Gqa(GqaAttention::new(&config, g, ck, &attn_prefix, l)?)
                }
            };
            let sandwich = config.norm.sandwich;
            layers.push(DecoderLayer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                attn,
                post_attn_norm: sandwich
                    .then(|| norm(&format!("{p}.post_attention_layernorm.weight")))
                    .transpose()?,
                pre_ffn_norm: if sandwich {
                    norm(&format!("{p}.pre_feedforward_layernorm.weight"))?
                } else {
                    norm(&format!("{p}.post_attention_layernorm.weight"))?
                },
                post_ffn_norm: sandwich
                    .then(|| norm(&format!("{p}.post_feedforward_layernorm.weight")))
                    .transpose()?,
                ffn,
            });
        }
        let (embed, lm_head) = if config.tie_word_embeddings {
            (None, Linear::new(embed)?)
        } else {
            (
                Some(embed),
                Linear::load(ck, "lm_head.weight", config.vocab_size, h)?,
            )
        };
        let kv_layout = KvLayout::with_window(
            layers.len(),
            config.attention.kv_row(),
            DEFAULT_BLOCK_SIZE,
            config.sliding_window,
            &config.sliding_layers,
        );
        Ok(CausalLm {
            norm: norm("model.norm.weight")?,
            config,
            embed,
            layers,
            lm_head,
            kv_layout,
        })
    }

    /// Moves the model's projections, dense FFNs, shared experts, MoE gates and LM head onto
    /// `compute` (`router --device cuda:N`, or split over `cuda:0,1,…`, the gates on the
    /// first GPU); attention over the cache, norms, RoPE and sampling stay on the host, and routed experts stay where they were
    /// loaded (expert workers hold theirs on their own devices). A tied LM head keeps its host
    /// copy as the embedding table. Over a group of GPUs every split is checked before the
    /// first weight moves.
    pub fn offload(&mut self, compute: &crate::tensor::Compute) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let crate::tensor::Compute::CudaGroup(group) = compute {
            self.check_split(group.gpus().len())?;
        }
        for layer in &mut self.layers {
            if let Ffn::Moe(moe) = &mut layer.ffn {
                moe.gate.offload(compute)?;
            }
        }
        let mut table = None;
        for (prefix, p) in self.projections() {
            let lm_head = p.name == LM_HEAD;
            let host = p.offload(compute, &prefix)?;
            if lm_head {
                table = host;
            }
        }
        if let Some(table) = table
            && self.embed.is_none()
        {
            self.embed = Some(table);
        }
        Ok(())
    }

    /// Checks that every projection [`offload`](Self::offload) moves splits over `ranks`
    /// GPUs (each rank whole heads, a non-empty slice of every MLP), naming the first that
    /// does not.
    pub fn check_split(&mut self, ranks: usize) -> Result<()> {
        for (prefix, p) in self.projections() {
            p.check_split(ranks, &prefix)?;
        }
        Ok(())
    }

    /// Every projection that moves to a device, after the prefix naming it in errors.
    fn projections(&mut self) -> Vec<(String, Projection<'_>)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let attn = match &mut layer.attn {
                Attention::Mla(a) => a.projections(),
                Attention::Gqa(a) => a.projections(),
            };
            let prefix = format!("model.layers.{i}.self_attn.");
            out.extend(attn.into_iter().map(|p| (prefix.clone(), p)));
            let (prefix, mlp) = match &mut layer.ffn {
                Ffn::Dense(mlp) => (format!("model.layers.{i}.mlp."), mlp),
                Ffn::Moe(moe) => match &mut moe.shared {
                    Some(shared) => (format!("model.layers.{i}.mlp.shared_experts."), shared),
                    None => continue,
                },
            };
            out.extend(mlp.projections().into_iter().map(|p| (prefix.clone(), p)));
        }
        let vocab = Parallel::Columns { granule: 1 };
        out.push((
            String::new(),
            Projection::new(&mut self.lm_head, vocab, LM_HEAD),
        ));
        out
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The shape of this model's cache blocks (built once; a copy shares its layer table).
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        let mut layout = self.kv_layout.clone();
        layout.block_size = block_size;
        layout
    }

    /// An empty, growable cache with room for `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let mut cache = KvCache::new(self.kv_layout(DEFAULT_BLOCK_SIZE));
        // A growable cache cannot fail to reserve.
        let _ = cache.reserve(capacity);
        cache
    }

    /// Bytes of weights held (routed experts included where loaded).
    pub fn size_in_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn.size_in_bytes()
                    + match &l.ffn {
                        Ffn::Dense(m) => m.size_in_bytes(),
                        Ffn::Moe(m) => {
                            m.experts.size_in_bytes()
                                + m.shared.as_ref().map_or(0, Mlp::size_in_bytes)
                        }
                    }
            })
            .sum();
        layers + self.embed.as_ref().map_or(0, Tensor::size_in_bytes) + self.lm_head.size_in_bytes()
    }

    /// Bytes of routed-expert weights held.
    pub fn routed_expert_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                Ffn::Moe(m) => m.experts.size_in_bytes(),
                Ffn::Dense(_) => 0,
            })
            .sum()
    }

    /// Runs a batch with this process's own experts.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        options: &ForwardOptions,
    ) -> Result<ForwardOutput> {
        self.forward_with(seqs, options, self)
    }

    /// Runs a batch; routed experts go to `executor`.
    pub fn forward_with(
        &self,
        seqs: &mut [SeqInput<'_>],
        options: &ForwardOptions,
        executor: &dyn ExpertExecutor,
    ) -> Result<ForwardOutput> {
        let h = self.config.hidden_size;
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.tokens.is_empty() {
                return Err(EngineError::input(
                    format!("sequences[{i}].tokens"),
                    "must not be empty",
                ));
            }
            if let Some(&bad) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(EngineError::input(
                    format!("sequences[{i}].tokens"),
                    format!(
                        "token id must be < vocab_size ({}), got {bad}",
                        self.config.vocab_size
                    ),
                ));
            }
            let end = s.cache.len() + s.tokens.len();
            if end > self.config.max_position_embeddings {
                return Err(EngineError::input(
                    format!("sequences[{i}].tokens"),
                    format!(
                        "context must be <= max_position_embeddings ({}), got {end}",
                        self.config.max_position_embeddings
                    ),
                ));
            }
            let layout = s.cache.layout();
            if *layout != self.kv_layout(layout.block_size) {
                return Err(EngineError::input(
                    format!("sequences[{i}].cache"),
                    format!("has layout {layout:?}, which is not this model's"),
                ));
            }
            s.cache.reserve(s.tokens.len())?;
        }
        let start = Instant::now();
        let mut timings = ForwardTimings::default();
        let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
        let mut rest: &mut [SeqInput<'_>] = seqs;
        let mut batches = Vec::new();
        let k = micro_batches_for(&lens, options.micro_batches, options.micro_batch_min_tokens);
        for n in split_balanced(&lens, k) {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            batches.push(self.micro_batch(head)?);
        }
        // The schedule: every micro-batch starts layer 0; then, layer by layer, each one
        // finishes layer l (waits for its experts) and starts layer l + 1 (attention, gate,
        // expert calls sent) while the next one's experts for layer l are still in flight.
        // With one micro-batch this is the plain layer loop.
        let mut routing: BTreeMap<usize, Routing> = BTreeMap::new();
        if !self.layers.is_empty() {
            for mb in &mut batches {
                self.layer_start(0, mb, options, executor, &mut timings)?;
            }
            for l in 0..self.layers.len() {
                for mb in &mut batches {
                    self.layer_finish(l, mb, options, executor, &mut timings, &mut routing)?;
                    if l + 1 < self.layers.len() {
                        self.layer_start(l + 1, mb, options, executor, &mut timings)?;
                    }
                }
            }
        }
        // [rows, hidden]: the rows that get logits, every micro-batch's in order.
        let mut rows = Vec::new();
        let mut n_rows = 0;
        for mb in &mut batches {
            for s in mb.seqs.iter_mut() {
                s.cache.commit(s.tokens.len());
            }
            let xd = mb.x.as_f32()?;
            match options.logits {
                LogitsFor::All => {
                    rows.extend_from_slice(xd);
                    n_rows += xd.len() / h;
                }
                LogitsFor::Last => {
                    for span in &mb.spans {
                        let r = span.start + span.len - 1;
                        rows.extend_from_slice(&xd[r * h..(r + 1) * h]);
                        n_rows += 1;
                    }
                }
            }
        }
        let x = Tensor::from_f32(&[n_rows, h], rows)?;
        let normed = self.norm.forward(&x)?;
        let mut logits = self.lm_head.forward(&normed)?;
        if let Some(cap) = self.config.final_logit_softcapping {
            ops::softcap_inplace(logits.as_f32_mut()?, cap);
        }
        let accounted = timings.attention
            + timings.dense_ffn
            + timings.gate
            + timings.experts
            + timings.shared_expert;
        timings.other = start.elapsed().saturating_sub(accounted);
        Ok(ForwardOutput {
            logits,
            routing: routing.into_iter().collect(),
            timings,
        })
    }

    /// A micro-batch of `seqs`: their spans and embedded tokens.
    fn micro_batch<'s, 'a, 'e>(
        &self,
        seqs: &'s mut [SeqInput<'a>],
    ) -> Result<MicroBatch<'s, 'a, 'e>> {
        let mut spans = Vec::with_capacity(seqs.len());
        let mut tokens = 0;
        for s in seqs.iter() {
            spans.push(SeqSpan {
                start: tokens,
                len: s.tokens.len(),
                pos0: s.cache.len(),
            });
            tokens += s.tokens.len();
        }
        // [tokens, hidden]
        let x = self.embed_tokens(seqs.iter().flat_map(|s| s.tokens.iter().copied()), tokens)?;
        Ok(MicroBatch {
            seqs,
            spans,
            x,
            moe: None,
        })
    }

    /// Layer `l` up to its FFN: attention and its residual, then a dense FFN whole, or an MoE
    /// block's gate with its routed experts started.
    fn layer_start<'e>(
        &self,
        l: usize,
        mb: &mut MicroBatch<'_, '_, 'e>,
        options: &ForwardOptions,
        executor: &'e dyn ExpertExecutor,
        timings: &mut ForwardTimings,
    ) -> Result<()> {
        let layer = &self.layers[l];
        let normed = layer.input_norm.forward(&mb.x)?;
        let mut caches: Vec<&mut KvCache> = mb.seqs.iter_mut().map(|s| &mut *s.cache).collect();
        let t = Instant::now();
        let mut attn = match &layer.attn {
            Attention::Mla(a) => {
                a.forward(&normed, &mb.spans, &mut caches, l, options.attention)?
            }
            Attention::Gqa(a) => a.forward(&normed, &mb.spans, &mut caches, l)?,
        };
        timings.attention += t.elapsed();
        if let Some(n) = &layer.post_attn_norm {
            n.forward_inplace(attn.as_f32_mut()?);
        }
        add_inplace(&mut mb.x, &attn)?;
        let normed = layer.pre_ffn_norm.forward(&mb.x)?;
        match &layer.ffn {
            Ffn::Dense(m) => {
                let t = Instant::now();
                let out = m.forward(&normed)?;
                timings.dense_ffn += t.elapsed();
                layer.add_ffn(&mut mb.x, out)?;
            }
            Ffn::Moe(m) => {
                let started = m.start(l, &normed, executor)?;
                mb.moe = Some((normed, started));
            }
        }
        Ok(())
    }

    /// Finishes layer `l` of `mb`: an MoE block's shared expert, the wait for its routed
    /// experts, and the FFN's residual (nothing for a dense layer, done in `layer_start`).
    fn layer_finish(
        &self,
        l: usize,
        mb: &mut MicroBatch<'_, '_, '_>,
        options: &ForwardOptions,
        executor: &dyn ExpertExecutor,
        timings: &mut ForwardTimings,
        routing: &mut BTreeMap<usize, Routing>,
    ) -> Result<()> {
        let layer = &self.layers[l];
        let (Ffn::Moe(m), Some((normed, started))) = (&layer.ffn, mb.moe.take()) else {
            return Ok(());
        };
        let (out, r, mt) = m.finish(&normed, started, executor)?;
        timings.gate += mt.gate;
        timings.experts += mt.experts;
        timings.shared_expert += mt.shared_expert;
        if options.record_routing {
            match routing.get_mut(&l) {
                // Micro-batches come in token order: their routings concatenate.
                Some(all) => {
                    all.ids.extend_from_slice(&r.ids);
                    all.weights.extend_from_slice(&r.weights);
                }
                None => {
                    routing.insert(l, r);
                }
            }
        }
        layer.add_ffn(&mut mb.x, out)
    }

    fn embed_tokens(&self, ids: impl Iterator<Item = u32>, tokens: usize) -> Result<Tensor> {
        let h = self.config.hidden_size;
        let mut out = Vec::with_capacity(tokens * h);
        // Tied embeddings read the LM head's weight; `offload` keeps a host copy in `embed`.
        let table = self
            .embed
            .as_ref()
            .or(self.lm_head.host_weight())
            .ok_or_else(|| EngineError::Shape("no host embedding table".into()))?;
        match table.cpu_storage() {
            CpuStorage::Bf16Packed(p) => {
                for id in ids {
                    p.row_into(id as usize, &mut out);
                }
            }
            // Embedding tables load through `load_weight`, which widens FP8.
            CpuStorage::Fp8Packed(_) => {
                return Err(EngineError::Shape(
                    "the embedding table is FP8; it is loaded as bf16".into(),
                ));
            }
            CpuStorage::F32(e) => {
                for id in ids {
                    out.extend_from_slice(&e[id as usize * h..(id as usize + 1) * h]);
                }
            }
            CpuStorage::Bf16(e) => {
                for id in ids {
                    out.extend(
                        e[id as usize * h..(id as usize + 1) * h]
                            .iter()
                            .map(|v| f32::from(*v)),
                    );
                }
            }
        }
        if let Some(scale) = self.config.embed_scale {
            for v in &mut out {
                *v *= scale;
            }
        }
        Tensor::from_f32(&[tokens, h], out)
    }
}

impl DecoderLayer {
    /// `x += post_ffn_norm(ffn)`: the FFN's residual.
    fn add_ffn(&self, x: &mut Tensor, mut ffn: Tensor) -> Result<()> {
        if let Some(n) = &self.post_ffn_norm {
            n.forward_inplace(ffn.as_f32_mut()?);
        }
        add_inplace(x, &ffn)
    }
}

/// One micro-batch of a forward pass: its sequences, their spans in its rows, its residual
/// stream, and the MoE block in flight between `layer_start` and `layer_finish`.
struct MicroBatch<'s, 'a, 'e> {
    seqs: &'s mut [SeqInput<'a>],
    spans: Vec<SeqSpan>,
    // [tokens, hidden]
    x: Tensor,
    /// The FFN input and the started experts of the MoE layer in flight.
    moe: Option<(Tensor, MoeStarted<'e>)>,
}

fn add_inplace(x: &mut Tensor, y: &Tensor) -> Result<()> {
    for (a, b) in x.as_f32_mut()?.iter_mut().zip(y.as_f32()?) {
        *a += b;
    }
    Ok(())
}

impl ExpertExecutor for CausalLm {
    fn run(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        match self.layers.get(layer).map(|l| &l.ffn) {
            Some(Ffn::Moe(m)) => m.experts.forward(x, routing),
            _ => Err(EngineError::input(
                "layer",
                format!("layer {layer} is not an MoE layer"),
            )),
        }
    }
}
