//! Single-process generation over a batch of sequences: one prefill pass for all prompts, then
//! batched decode steps over the latent cache, with greedy or seeded sampling.

use crate::error::{EngineError, Result};
use crate::model::{
    AttentionMode, CausalLm, ExpertExecutor, ForwardOptions, KvCache, LogitsFor, SeqInput,
};
use crate::tensor::Tensor;

pub use crate::sampling::{Sampler, SamplingParams, argmax};

#[derive(Clone, Debug, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past the model's EOS tokens.
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// `[prompt_len, vocab]` when asked for.
    pub prompt_logits: Option<Tensor>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GenerateOptions {
    pub prompt_logits: bool,
    pub attention: AttentionMode,
}

/// Validates one request against the model; errors name the field, the limit and the value.
pub fn validate(model: &CausalLm, r: &GenerateRequest) -> Result<()> {
    let c = model.config();
    if r.prompt.is_empty() {
        return Err(EngineError::input("prompt_ids", "must not be empty"));
    }
    if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(EngineError::input(
            "prompt_ids",
            format!(
                "token ids must be < vocab_size ({}), got {bad}",
                c.vocab_size
            ),
        ));
    }
    let total = r.prompt.len() + r.max_new_tokens;
    if total > c.max_position_embeddings {
        return Err(EngineError::input(
            "max_new_tokens",
            format!(
                "prompt ({}) + max_new_tokens ({}) must be <= max_position_embeddings ({}), got {total}",
                r.prompt.len(),
                r.max_new_tokens,
                c.max_position_embeddings
            ),
        ));
    }
    let s = &r.sampling;
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(EngineError::input(
            "temperature",
            format!("must be >= 0, got {}", s.temperature),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(EngineError::input(
            "top_p",
            format!("must be in (0, 1], got {}", s.top_p),
        ));
    }
    Ok(())
}

/// Generates for every request as one batch, with this process's own experts.
pub fn generate(
    model: &CausalLm,
    requests: &[GenerateRequest],
    options: GenerateOptions,
) -> Result<Vec<GenerateOutput>> {
    generate_with(model, requests, options, model)
}

/// Generates for every request as one batch; routed experts go to `experts`.
pub fn generate_with(
    model: &CausalLm,
    requests: &[GenerateRequest],
    options: GenerateOptions,
    experts: &dyn ExpertExecutor,
) -> Result<Vec<GenerateOutput>> {
    for r in requests {
        validate(model, r)?;
    }
    let vocab = model.config().vocab_size;
    let eos = &model.config().eos_token_ids;
    let mut caches: Vec<KvCache> = requests
        .iter()
        .map(|r| model.new_cache(r.prompt.len() + r.max_new_tokens))
        .collect();
    let mut samplers: Vec<Sampler> = requests
        .iter()
        .map(|r| Sampler::new(r.sampling.clone(), &r.prompt))
        .collect();
    let mut outputs: Vec<GenerateOutput> = requests
        .iter()
        .map(|_| GenerateOutput {
            token_ids: Vec::new(),
            finish_reason: FinishReason::Length,
            prompt_logits: None,
        })
        .collect();
    let mut done: Vec<bool> = requests.iter().map(|r| r.max_new_tokens == 0).collect();

    // Prefill every prompt in one pass.
    let logits_for = if options.prompt_logits {
        LogitsFor::All
    } else {
        LogitsFor::Last
    };
    let fwd = ForwardOptions {
        logits: logits_for,
        attention: options.attention,
        ..Default::default()
    };
    let mut inputs: Vec<SeqInput<'_>> = requests
        .iter()
        .zip(caches.iter_mut())
        .map(|(r, cache)| SeqInput {
            tokens: &r.prompt,
            cache,
        })
        .collect();
    let out = model.forward_with(&mut inputs, &fwd, experts)?;
    drop(inputs);
    let logits = out.logits.as_f32()?;
    let mut next: Vec<u32> = Vec::with_capacity(requests.len());
    let mut row = 0;
    for (i, r) in requests.iter().enumerate() {
        let last = match logits_for {
            LogitsFor::All => {
                let n = r.prompt.len();
                outputs[i].prompt_logits = Some(Tensor::from_f32(
                    &[n, vocab],
                    logits[row * vocab..(row + n) * vocab].to_vec(),
                )?);
                row += n;
                row - 1
            }
            LogitsFor::Last => {
                row += 1;
                row - 1
            }
        };
        next.push(samplers[i].sample(&logits[last * vocab..(last + 1) * vocab]));
    }

    let decode = ForwardOptions {
        logits: LogitsFor::Last,
        attention: options.attention,
        ..Default::default()
    };
    loop {
        // Record the sampled tokens and decide who continues.
        let mut active = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            if done[i] {
                continue;
            }
            let t = next[i];
            outputs[i].token_ids.push(t);
            let stop = (!r.ignore_eos && eos.contains(&t)) || r.stop_token_ids.contains(&t);
            if stop {
                outputs[i].finish_reason = FinishReason::Stop;
                done[i] = true;
            } else if outputs[i].token_ids.len() >= r.max_new_tokens {
                done[i] = true;
            } else {
                active.push(i);
            }
        }
        if active.is_empty() {
            break;
        }
        let step_tokens: Vec<[u32; 1]> = active.iter().map(|&i| [next[i]]).collect();
        let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(active.len());
        let mut rest: &mut [KvCache] = &mut caches;
        let mut offset = 0;
        for (j, &i) in active.iter().enumerate() {
            let (_, tail) = rest.split_at_mut(i - offset);
            let (cache, tail) = tail
                .split_first_mut()
                .ok_or_else(|| EngineError::Shape("cache index".into()))?;
            inputs.push(SeqInput {
                tokens: &step_tokens[j],
                cache,
            });
            rest = tail;
            offset = i + 1;
        }
        let out = model.forward_with(&mut inputs, &decode, experts)?;
        let logits = out.logits.as_f32()?;
        for (j, &i) in active.iter().enumerate() {
            next[i] = samplers[i].sample(&logits[j * vocab..(j + 1) * vocab]);
        }
    }
    Ok(outputs)
}
