//! One request inside the scheduler: its tokens, cache, sampler, and the text it has shown.

use std::sync::Arc;
use std::time::Instant;

use switchyard_engine::model::{KvCache, KvLayout, SeqInput};
use switchyard_engine::sampling::{self, Sampler};
use switchyard_engine::tokenizer::{IncrementalDecoder, TextTokenizer};
use tokio::sync::mpsc::UnboundedSender;

use super::{Event, FinishReason};
use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::request::ValidRequest;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepOutcome {
    Continue,
    Finished,
}

pub(super) struct Sequence {
    pub(super) id: u64,
    req: ValidRequest,
    /// Prompt then output; the last one may not be in the cache yet.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Blocks come from the scheduler's pool.
    pub(super) cache: KvCache,
    sampler: Sampler,
    events: UnboundedSender<Event>,
    detok: IncrementalDecoder,
    /// Decoded text not shown yet: it might begin a stop string.
    held: String,
    /// Whether it has been in the running batch (then it no longer counts as waiting).
    pub(super) admitted: bool,
    arrived: Instant,
    last_token_at: Option<Instant>,
    /// Since when its steps have been failing for want of a worker (cleared by a step that
    /// works): how long it has been retried.
    pub(super) failing_since: Option<Instant>,
}

impl Sequence {
    pub(super) fn new(
        id: u64,
        req: ValidRequest,
        layout: KvLayout,
        events: UnboundedSender<Event>,
    ) -> Sequence {
        let tokens = req.prompt.clone();
        Sequence {
            id,
            prompt_len: tokens.len(),
            sampler: Sampler::new(req.sampling.clone(), &req.prompt),
            tokens,
            req,
            cache: KvCache::pooled(layout),
            events,
            detok: IncrementalDecoder::default(),
            held: String::new(),
            admitted: false,
            arrived: Instant::now(),
            last_token_at: None,
            failing_since: None,
        }
    }

    pub(super) fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The outcome label of a sequence leaving through [`Self::gone`].
    pub(super) fn end_reason(&self, now: Instant) -> &'static str {
        if self.req.deadline.is_some_and(|d| now >= d) && !self.events.is_closed() {
            "deadline"
        } else {
            "cancelled"
        }
    }

    fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Tokens not in the cache yet.
    pub(super) fn pending(&self) -> usize {
        self.tokens.len() - self.cached()
    }

    /// This step's input: the next `n` uncached tokens.
    pub(super) fn input(&mut self, n: usize) -> Option<SeqInput<'_>> {
        let start = self.cached();
        Some(SeqInput {
            tokens: self.tokens.get(start..start + n)?,
            cache: &mut self.cache,
        })
    }

    /// Whether the client went away or the deadline passed.
    pub(super) fn gone(&self, now: Instant) -> bool {
        self.events.is_closed() || self.req.deadline.is_some_and(|d| now >= d)
    }

    /// Tells a client whose deadline passed.
    pub(super) fn expire(self, now: Instant) {
        if let Some(d) = self.req.deadline
            && now >= d
        {
            let waited = self.req.timeout.map_or(0, |t| t.as_millis());
            self.fail(RouterError::DeadlineExceeded(waited));
        }
    }

    pub(super) fn fail(self, error: RouterError) {
        self.fail_shared(Arc::new(error));
    }

    pub(super) fn fail_shared(self, error: Arc<RouterError>) {
        let _ = self.events.send(Event::Failed(error));
    }

    fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// After a step that fed `n` tokens: when the cache has caught up, draws the next token,
    /// streams it and checks the stop conditions.
    pub(super) fn advance(
        &mut self,
        logits: &[f32],
        tokenizer: Option<&TextTokenizer>,
        eos: &[u32],
        metrics: &RouterMetrics,
    ) -> StepOutcome {
        self.failing_since = None;
        if self.pending() > 0 {
            // A prefill chunk that does not finish the prompt: nothing to draw yet.
            return StepOutcome::Continue;
        }
        let token = self.sampler.sample(logits);
        let now = Instant::now();
        match self.last_token_at {
            None => metrics
                .time_to_first_token
                .observe(now.duration_since(self.arrived).as_secs_f64()),
            Some(last) => metrics
                .inter_token_latency
                .observe(now.duration_since(last).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        metrics.generation_tokens.inc();
        let logprobs = self
            .req
            .logprobs
            .map(|n| sampling::logprobs(logits, token, n));
        self.tokens.push(token);
        let stop_token = (!self.req.ignore_eos && eos.contains(&token))
            || self.req.stop_token_ids.contains(&token);
        if let Some(t) = tokenizer {
            let out = &self.tokens[self.prompt_len..];
            match self.detok.next(t, out) {
                Ok(piece) => self.held.push_str(&piece),
                Err(e) => {
                    let _ = self
                        .events
                        .send(Event::Failed(Arc::new(RouterError::Runtime(format!(
                            "detokenizing: {e}"
                        )))));
                    return StepOutcome::Finished;
                }
            }
        }
        let stop_at = find_stop(&self.held, &self.req.stop);
        let reason = if stop_at.is_some() || stop_token {
            Some(FinishReason::Stop)
        } else if self.output().len() >= self.req.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        match reason {
            None => {
                let safe = safe_prefix(&self.held, &self.req.stop);
                let text: String = self.held.drain(..safe).collect();
                let _ = self.events.send(Event::Token {
                    id: token,
                    text,
                    logprobs,
                });
                StepOutcome::Continue
            }
            Some(mut reason) => {
                let _ = self.events.send(Event::Token {
                    id: token,
                    text: String::new(),
                    logprobs,
                });
                match stop_at {
                    Some(at) => self.held.truncate(at),
                    None => {
                        if let Some(t) = tokenizer {
                            let out = &self.tokens[self.prompt_len..];
                            let tail = self.detok.flush(t, out).unwrap_or_default();
                            self.held.push_str(&tail);
                            if let Some(at) = find_stop(&self.held, &self.req.stop) {
                                self.held.truncate(at);
                                reason = FinishReason::Stop;
                            }
                        }
                    }
                }
                metrics.outcome(reason.as_str());
                metrics
                    .request_duration
                    .observe(now.duration_since(self.arrived).as_secs_f64());
                let _ = self.events.send(Event::Finished {
                    text: std::mem::take(&mut self.held),
                    reason,
                    prompt_tokens: self.prompt_len,
                    completion_tokens: self.output().len(),
                });
                StepOutcome::Finished
            }
        }
    }
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// How much of `text` can be shown: all but a tail that might be the start of a stop string.
fn safe_prefix(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for len in (1..s.len().min(text.len() + 1)).rev() {
            if s.is_char_boundary(len) && text.ends_with(&s[..len]) {
                hold = hold.max(len);
                break;
            }
        }
    }
    text.len() - hold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stops = vec!["</end>".to_string(), "\n\n".to_string()];
        assert_eq!(safe_prefix("hello </e", &stops), 6);
        assert_eq!(safe_prefix("hello\n", &stops), 5);
        assert_eq!(safe_prefix("hello", &stops), 5);
        assert_eq!(safe_prefix("", &stops), 0);
        assert_eq!(find_stop("a\n\nb</end>", &stops), Some(1));
        assert_eq!(find_stop("abc", &stops), None);
        // Multi-byte stop strings cut only on character boundaries.
        assert_eq!(safe_prefix("x€", &["€uro".to_string()]), 1);
    }
}
