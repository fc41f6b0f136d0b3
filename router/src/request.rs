//! Request validation: every client request (gRPC or HTTP) becomes a [`RawRequest`] and is
//! checked once, here, into a [`ValidRequest`] the scheduler can run without further checks.
//! Errors name the field, the limit and the value given.

use std::time::{Duration, Instant};

use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::tokenizer::{ChatMessage, TextTokenizer};

use crate::error::RouterError;

/// Stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Bytes per stop string.
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// Stop token ids per request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// Alternatives per token with logprobs.
pub const MAX_LOGPROBS: u32 = 20;
/// Tokens one request's `logit_bias` may name.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Bytes of prompt text (or chat messages) per request.
pub const MAX_PROMPT_BYTES: usize = 4 << 20;

/// What the prompt is given as.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Ids(Vec<u32>),
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// A request as a client sent it, API-independent. `None` means "not given".
#[derive(Clone, Debug, PartialEq)]
pub struct RawRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Alternatives per token; `Some(0)` is the chosen token's logprob alone.
    pub logprobs: Option<u32>,
    pub timeout: Option<Duration>,
    /// `(token, bias)` added to the token's logit (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl RawRequest {
    pub fn new(prompt: Prompt) -> RawRequest {
        RawRequest {
            model: None,
            prompt,
            max_tokens: None,
            temperature: None,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            presence_penalty: None,
            frequency_penalty: None,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            timeout: None,
            logit_bias: Vec::new(),
        }
    }
}

/// What a request is checked against.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The name clients use for the model.
    pub model_name: String,
    pub vocab_size: usize,
    /// Prompt + output tokens (the model's `max_position_embeddings`).
    pub max_context: usize,
    /// Tokens one sequence's cache can hold at most (the whole KV pool).
    pub max_cached_tokens: usize,
    /// `max_tokens` when a request gives none (capped by what the context leaves).
    pub default_max_tokens: usize,
}

/// A request that passed every check.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub deadline: Option<Instant>,
    pub timeout: Option<Duration>,
}

fn finite_in(
    field: &str,
    value: Option<f32>,
    default: f32,
    ok: impl Fn(f32) -> bool,
    rule: &str,
) -> Result<f32, RouterError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && ok(v) => Ok(v),
        Some(v) => Err(RouterError::invalid(field, format!("{rule}, got {v}"))),
    }
}

/// Checks `raw` and turns its prompt into token ids.
pub fn validate(
    raw: RawRequest,
    limits: &Limits,
    tokenizer: Option<&TextTokenizer>,
) -> Result<ValidRequest, RouterError> {
    if let Some(model) = &raw.model
        && !model.is_empty()
        && *model != limits.model_name
    {
        return Err(RouterError::UnknownModel {
            given: model.clone(),
            served: limits.model_name.clone(),
        });
    }
    let need_tokenizer = |field: &str| {
        tokenizer.ok_or_else(|| {
            RouterError::invalid(
                field,
                "needs a tokenizer, and this model has none (no tokenizer.json): send token ids",
            )
        })
    };
    let prompt = match raw.prompt {
        Prompt::Ids(ids) => ids,
        Prompt::Text(text) => {
            if text.is_empty() {
                return Err(RouterError::invalid("prompt", "must not be empty"));
            }
            if text.len() > MAX_PROMPT_BYTES {
                return Err(RouterError::invalid(
                    "prompt",
                    format!("must be <= {MAX_PROMPT_BYTES} bytes, got {}", text.len()),
                ));
            }
            need_tokenizer("prompt")?
                .encode(&text, true)
                .map_err(|e| RouterError::invalid("prompt", e.to_string()))?
        }
        Prompt::Chat(messages) => {
            if messages.is_empty() {
                return Err(RouterError::invalid("messages", "must not be empty"));
            }
            let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
            if bytes > MAX_PROMPT_BYTES {
                return Err(RouterError::invalid(
                    "messages",
                    format!("must be <= {MAX_PROMPT_BYTES} bytes in all, got {bytes}"),
                ));
            }
            let t = need_tokenizer("messages")?;
            let text = t
                .apply_chat_template(&messages, true)
                .map_err(|e| RouterError::invalid("messages", e.to_string()))?;
            // The template writes the special tokens itself.
            t.encode(&text, false)
                .map_err(|e| RouterError::invalid("messages", e.to_string()))?
        }
    };
    if prompt.is_empty() {
        return Err(RouterError::invalid("prompt", "must not be empty"));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= limits.vocab_size) {
        return Err(RouterError::invalid(
            "prompt_ids",
            format!(
                "token ids must be < vocab_size ({}), got {bad}",
                limits.vocab_size
            ),
        ));
    }
    let context = limits.max_context.min(limits.max_cached_tokens);
    if prompt.len() >= context {
        return Err(RouterError::invalid(
            "prompt",
            format!(
                "must leave room for one new token: prompt has {} tokens, the context holds {context}",
                prompt.len()
            ),
        ));
    }
    let room = context - prompt.len();
    let max_tokens = match raw.max_tokens {
        None => limits.default_max_tokens.min(room),
        Some(0) => return Err(RouterError::invalid("max_tokens", "must be >= 1, got 0")),
        Some(n) if usize::try_from(n).map_or(true, |n| n > room) => {
            return Err(RouterError::invalid(
                "max_tokens",
                format!(
                    "prompt ({}) + max_tokens ({n}) must be <= {context} (the context{}), got {}",
                    prompt.len(),
                    if limits.max_cached_tokens < limits.max_context {
                        " the KV cache can hold"
                    } else {
                        " length"
                    },
                    // u128: `max_tokens` may be u64::MAX, and the sum must not wrap.
                    prompt.len() as u128 + u128::from(n)
                ),
            ));
        }
        Some(n) => n as usize,
    };
    let temperature = finite_in(
        "temperature",
        raw.temperature,
        1.0,
        |v| v >= 0.0,
        "must be >= 0",
    )?;
    let top_p = finite_in(
        "top_p",
        raw.top_p,
        1.0,
        |v| v > 0.0 && v <= 1.0,
        "must be in (0, 1]",
    )?;
    let min_p = finite_in(
        "min_p",
        raw.min_p,
        0.0,
        |v| (0.0..=1.0).contains(&v),
        "must be in [0, 1]",
    )?;
    let repetition_penalty = finite_in(
        "repetition_penalty",
        raw.repetition_penalty,
        1.0,
        |v| v > 0.0,
        "must be > 0",
    )?;
    let presence_penalty = finite_in(
        "presence_penalty",
        raw.presence_penalty,
        0.0,
        |v| (-2.0..=2.0).contains(&v),
        "must be in [-2, 2]",
    )?;
    let frequency_penalty = finite_in(
        "frequency_penalty",
        raw.frequency_penalty,
        0.0,
        |v| (-2.0..=2.0).contains(&v),
        "must be in [-2, 2]",
    )?;
    let top_k = match raw.top_k {
        None | Some(0) | Some(-1) => 0,
        Some(k) if k > 0 => (k as usize).min(limits.vocab_size),
        Some(k) => {
            return Err(RouterError::invalid(
                "top_k",
                format!("must be >= 1, or 0 / -1 for no cut, got {k}"),
            ));
        }
    };
    if raw.stop.len() > MAX_STOP_STRINGS {
        return Err(RouterError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                raw.stop.len()
            ),
        ));
    }
    for (i, s) in raw.stop.iter().enumerate() {
        if s.is_empty() {
            return Err(RouterError::invalid(
                format!("stop[{i}]"),
                "must not be empty",
            ));
        }
        if s.len() > MAX_STOP_STRING_BYTES {
            return Err(RouterError::invalid(
                format!("stop[{i}]"),
                format!("must be <= {MAX_STOP_STRING_BYTES} bytes, got {}", s.len()),
            ));
        }
    }
    if !raw.stop.is_empty() {
        need_tokenizer("stop")?;
    }
    if raw.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(RouterError::invalid(
            "stop_token_ids",
            format!(
                "at most {MAX_STOP_TOKEN_IDS} ids, got {}",
                raw.stop_token_ids.len()
            ),
        ));
    }
    if let Some(&bad) = raw
        .stop_token_ids
        .iter()
        .find(|&&t| t as usize >= limits.vocab_size)
    {
        return Err(RouterError::invalid(
            "stop_token_ids",
            format!("must be < vocab_size ({}), got {bad}", limits.vocab_size),
        ));
    }
    if let Some(n) = raw.logprobs
        && n > MAX_LOGPROBS
    {
        return Err(RouterError::invalid(
            "logprobs",
            format!("must be <= {MAX_LOGPROBS}, got {n}"),
        ));
    }
    if raw.logit_bias.len() > MAX_LOGIT_BIAS {
        return Err(RouterError::invalid(
            "logit_bias",
            format!(
                "at most {MAX_LOGIT_BIAS} tokens, got {}",
                raw.logit_bias.len()
            ),
        ));
    }
    for &(id, bias) in &raw.logit_bias {
        if id as usize >= limits.vocab_size {
            return Err(RouterError::invalid(
                "logit_bias",
                format!(
                    "token ids must be < vocab_size ({}), got {id}",
                    limits.vocab_size
                ),
            ));
        }
        if !(bias.is_finite() && (-100.0..=100.0).contains(&bias)) {
            return Err(RouterError::invalid(
                format!("logit_bias[{id}]"),
                format!("must be in [-100, 100], got {bias}"),
            ));
        }
    }
    let deadline = match raw.timeout {
        Some(t) if t.is_zero() => {
            return Err(RouterError::invalid("timeout", "must be > 0, got 0"));
        }
        Some(t) => Instant::now().checked_add(t),
        None => None,
    };
    Ok(ValidRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed: raw.seed.unwrap_or_else(rand_seed),
            logit_bias: raw.logit_bias,
        },
        ignore_eos: raw.ignore_eos,
        stop_token_ids: raw.stop_token_ids,
        stop: raw.stop,
        logprobs: raw.logprobs.map(|n| n as usize),
        deadline,
        timeout: raw.timeout,
    })
}

/// A seed for requests that give none: different per request.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            model_name: "mini".into(),
            vocab_size: 100,
            max_context: 64,
            max_cached_tokens: 1000,
            default_max_tokens: 16,
        }
    }

    fn ids() -> RawRequest {
        RawRequest::new(Prompt::Ids(vec![1, 2, 3]))
    }

    /// Every rule: (what is wrong, the request, the field the error must name, a fragment).
    #[test]
    fn every_rule_names_field_limit_and_value() {
        type Case = (&'static str, RawRequest, &'static str, &'static str);
        let with = |f: &dyn Fn(&mut RawRequest)| {
            let mut r = ids();
            f(&mut r);
            r
        };
        let cases: Vec<Case> = vec![
            (
                "empty prompt",
                RawRequest::new(Prompt::Ids(vec![])),
                "prompt",
                "must not be empty",
            ),
            (
                "empty chat",
                RawRequest::new(Prompt::Chat(vec![])),
                "messages",
                "must not be empty",
            ),
            (
                "empty text",
                RawRequest::new(Prompt::Text(String::new())),
                "prompt",
                "must not be empty",
            ),
            (
                "id past vocab",
                RawRequest::new(Prompt::Ids(vec![1, 100])),
                "prompt_ids",
                "got 100",
            ),
            (
                "prompt fills context",
                RawRequest::new(Prompt::Ids(vec![1; 64])),
                "prompt",
                "64 tokens",
            ),
            (
                "too long",
                with(&|r| r.max_tokens = Some(62)),
                "max_tokens",
                "got 65",
            ),
            (
                "max_tokens at u64::MAX does not wrap",
                with(&|r| r.max_tokens = Some(u64::MAX)),
                "max_tokens",
                "got 18446744073709551618",
            ),
            (
                "zero max_tokens",
                with(&|r| r.max_tokens = Some(0)),
                "max_tokens",
                "got 0",
            ),
            (
                "negative temperature",
                with(&|r| r.temperature = Some(-0.5)),
                "temperature",
                "got -0.5",
            ),
            (
                "nan temperature",
                with(&|r| r.temperature = Some(f32::NAN)),
                "temperature",
                "got NaN",
            ),
            (
                "top_p 0",
                with(&|r| r.top_p = Some(0.0)),
                "top_p",
                "(0, 1], got 0",
            ),
            (
                "top_p > 1",
                with(&|r| r.top_p = Some(1.5)),
                "top_p",
                "got 1.5",
            ),
            (
                "min_p > 1",
                with(&|r| r.min_p = Some(2.0)),
                "min_p",
                "got 2",
            ),
            ("top_k -2", with(&|r| r.top_k = Some(-2)), "top_k", "got -2"),
            (
                "repetition 0",
                with(&|r| r.repetition_penalty = Some(0.0)),
                "repetition_penalty",
                "got 0",
            ),
            (
                "presence 3",
                with(&|r| r.presence_penalty = Some(3.0)),
                "presence_penalty",
                "got 3",
            ),
            (
                "frequency -3",
                with(&|r| r.frequency_penalty = Some(-3.0)),
                "frequency_penalty",
                "got -3",
            ),
            (
                "too many stops",
                with(&|r| r.stop = vec!["x".into(); 17]),
                "stop",
                "got 17",
            ),
            (
                "empty stop",
                with(&|r| r.stop = vec![String::new()]),
                "stop[0]",
                "must not be empty",
            ),
            (
                "long stop",
                with(&|r| r.stop = vec!["x".repeat(300)]),
                "stop[0]",
                "got 300",
            ),
            (
                "stop id past vocab",
                with(&|r| r.stop_token_ids = vec![7, 1000]),
                "stop_token_ids",
                "got 1000",
            ),
            (
                "too many stop ids",
                with(&|r| r.stop_token_ids = vec![1; 65]),
                "stop_token_ids",
                "got 65",
            ),
            (
                "logprobs 21",
                with(&|r| r.logprobs = Some(21)),
                "logprobs",
                "got 21",
            ),
            (
                "logit_bias past vocab",
                with(&|r| r.logit_bias = vec![(3, 1.0), (99999, 5.0)]),
                "logit_bias",
                "got 99999",
            ),
            (
                "logit_bias too strong",
                with(&|r| r.logit_bias = vec![(46, -101.0)]),
                "logit_bias[46]",
                "got -101",
            ),
            (
                "logit_bias too long",
                with(&|r| r.logit_bias = (0..1025).map(|i| (i % 100, 1.0)).collect()),
                "logit_bias",
                "got 1025",
            ),
            (
                "zero timeout",
                with(&|r| r.timeout = Some(Duration::ZERO)),
                "timeout",
                "got 0",
            ),
            (
                "text without tokenizer",
                RawRequest::new(Prompt::Text("hi".into())),
                "prompt",
                "tokenizer",
            ),
            (
                "stop without tokenizer",
                with(&|r| r.stop = vec!["\n".into()]),
                "stop",
                "tokenizer",
            ),
            (
                "huge text",
                RawRequest::new(Prompt::Text("x".repeat(MAX_PROMPT_BYTES + 1))),
                "prompt",
                "bytes",
            ),
        ];
        for (what, raw, field, fragment) in cases {
            let err = validate(raw, &limits(), None).expect_err(what);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{field}`")), "{what}: {msg}");
            assert!(msg.contains(fragment), "{what}: {msg}");
        }
    }

    #[test]
    fn unknown_model_is_not_found() {
        let mut r = ids();
        r.model = Some("gpt-4".into());
        let err = validate(r, &limits(), None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(err.to_string().contains("gpt-4") && err.to_string().contains("mini"));
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let v = validate(ids(), &limits(), None).unwrap();
        assert_eq!(v.max_tokens, 16);
        assert_eq!(v.sampling.temperature, 1.0);
        assert_eq!(v.sampling.top_p, 1.0);
        // The default is capped by what the context leaves.
        let mut r = RawRequest::new(Prompt::Ids(vec![1; 60]));
        r.model = Some("mini".into());
        assert_eq!(validate(r, &limits(), None).unwrap().max_tokens, 4);
    }

    #[test]
    fn the_kv_pool_caps_the_context() {
        let mut l = limits();
        l.max_cached_tokens = 10;
        let mut r = ids();
        r.max_tokens = Some(8);
        let err = validate(r, &l, None).unwrap_err().to_string();
        assert!(err.contains("KV cache"), "{err}");
    }
}
