//! Continuous batching over a paged KV cache.
//!
//! One thread owns the running batch. Between steps it takes in new requests, drops the ones
//! whose client went away or whose deadline passed, and plans the next step under a token
//! budget: one token for every decoding sequence first, then prefill chunks (so a long prompt
//! never stalls running decodes), then new sequences while cache blocks and batch slots last.
//! When a growing sequence finds no free block, the youngest running sequence is preempted —
//! its blocks freed, its prompt and output recomputed later — rather than anything failing.
//! Blocks go back to the pool on finish, cancel, error and preemption.
//!
//! A step that fails for want of an expert worker (one gone, stopped or not yet re-placed) is
//! not the requests' fault: its sequences go back to the front of the queue with their tokens
//! and are recomputed once the scheduler has backed off, for up to
//! [`SchedulerConfig::step_retry`] each, so a worker lost without a replica delays requests by
//! the time its experts take to be placed again instead of failing them.
//!
//! Admission control sits in front: at most `max_waiting` requests wait; past that a request
//! is refused at once with a retry hint, so memory stays bounded however hard clients push.

mod sequence;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use switchyard_engine::model::{BlockPool, KvLayout, SeqInput};
use switchyard_engine::sampling::TokenLogprobs;
use switchyard_engine::tokenizer::TextTokenizer;
use tokio::sync::mpsc as async_mpsc;
use tracing::{debug, warn};

use crate::backend::Backend;
use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::request::ValidRequest;
use sequence::{Sequence, StepOutcome};

/// Why a sequence stopped: `Length` (`max_tokens` reached) or `Stop` (an end-of-sequence
/// token, a stop token id or a stop string) — the engine's own type.
pub use switchyard_engine::generate::FinishReason;

/// What a request's stream carries.
#[derive(Clone, Debug)]
pub enum Event {
    /// One generated token and the text that is now safe to show (may be empty while a
    /// multi-byte character or a possible stop string is incomplete).
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The last event of a finished request: text held back until now, why it finished and
    /// token counts.
    Finished {
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The last event of a failed request.
    Failed(Arc<RouterError>),
}

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at most.
    pub max_batch_size: usize,
    /// Tokens per step at most (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Requests waiting for a batch slot at most; more are refused.
    pub max_waiting: usize,
    /// KV cache blocks in the pool.
    pub kv_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// How long a sequence whose steps keep failing for want of an expert worker is retried
    /// before it fails with the step's error; zero fails it at once.
    pub step_retry: Duration,
}

/// The first pause after a step failed for want of a worker; it doubles per failed step.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between retried steps.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);

/// A step failure another attempt can fix: an expert worker unreachable, too slow, or no
/// placement to dispatch with yet. Anything else (a bug, a bad request) fails its sequences.
fn worth_retrying(e: &RouterError) -> bool {
    match e {
        RouterError::Worker { code, .. } => matches!(
            code,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        RouterError::Connect { .. } | RouterError::NoPlacement(_) => true,
        _ => false,
    }
}

impl SchedulerConfig {
    pub fn check(&self) -> Result<(), RouterError> {
        let positive = [
            ("max_batch_size", self.max_batch_size),
            ("max_batch_tokens", self.max_batch_tokens),
            ("kv_blocks", self.kv_blocks),
            ("block_size", self.block_size),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(RouterError::invalid(field, "must be >= 1, got 0"));
            }
        }
        if self.max_batch_tokens < self.max_batch_size {
            return Err(RouterError::invalid(
                "max_batch_tokens",
                format!(
                    "must be >= max_batch_size ({}) so every decoding sequence fits a step, got {}",
                    self.max_batch_size, self.max_batch_tokens
                ),
            ));
        }
        Ok(())
    }
}

/// A live view of the scheduler, for health, info and metrics.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub blocks_used: AtomicUsize,
    pub blocks_total: AtomicUsize,
    pub preemptions: AtomicUsize,
    pub steps: AtomicUsize,
}

/// The receiving end of one request. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestStream {
    pub id: u64,
    pub prompt_tokens: usize,
    pub events: async_mpsc::UnboundedReceiver<Event>,
}

enum Msg {
    Submit(Box<Sequence>),
}

/// The handle servers hold: submits requests to the scheduler thread. Cloning is cheap; the
/// thread ends when the last handle is dropped and nothing is left to run.
#[derive(Clone, Debug)]
pub struct Scheduler {
    tx: mpsc::Sender<Msg>,
    waiting: Arc<AtomicUsize>,
    next_id: Arc<AtomicUsize>,
    config: SchedulerConfig,
    /// The shape of the pool's blocks, which every sequence's cache takes.
    layout: KvLayout,
    stats: Arc<SchedulerStats>,
    metrics: Arc<RouterMetrics>,
    running: Arc<AtomicBool>,
}

/// Clears its flag when dropped.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Scheduler {
    /// Starts the scheduler thread over `backend`.
    pub fn start(
        backend: Arc<dyn Backend>,
        tokenizer: Option<Arc<TextTokenizer>>,
        config: SchedulerConfig,
        metrics: Arc<RouterMetrics>,
    ) -> Result<Scheduler, RouterError> {
        config.check()?;
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(SchedulerStats::default());
        stats
            .blocks_total
            .store(config.kv_blocks, Ordering::Relaxed);
        let layout = backend.kv_layout(config.block_size);
        let pool = BlockPool::new(layout.clone(), config.kv_blocks);
        let running = Arc::new(AtomicBool::new(true));
        let step_loop = StepLoop {
            backend,
            tokenizer,
            config,
            pool,
            rx,
            waiting_count: waiting.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: stats.clone(),
            metrics: metrics.clone(),
            paused_until: None,
            failed_in_a_row: 0,
        };
        let flag = running.clone();
        std::thread::Builder::new()
            .name("switchyard-scheduler".into())
            .spawn(move || {
                // Cleared however the loop ends, a panic included: health reads it.
                let _running = ClearOnDrop(flag);
                step_loop.run();
            })
            .map_err(|e| RouterError::Runtime(format!("starting the scheduler thread: {e}")))?;
        Ok(Scheduler {
            tx,
            waiting,
            next_id: Arc::new(AtomicUsize::new(1)),
            config,
            layout,
            stats,
            metrics,
            running,
        })
    }

    /// Whether the scheduler thread is still running steps.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn stats(&self) -> &Arc<SchedulerStats> {
        &self.stats
    }

    /// Queues a request. Refused with `Overloaded` when `max_waiting` requests already wait.
    pub fn submit(&self, request: ValidRequest) -> Result<RequestStream, RouterError> {
        let limit = self.config.max_waiting;
        if self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < limit).then_some(w + 1)
            })
            .is_err()
        {
            self.metrics.outcome("rejected");
            return Err(RouterError::Overloaded {
                waiting: self.waiting.load(Ordering::Acquire),
                limit,
                retry_after_s: 1,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let (events_tx, events) = async_mpsc::unbounded_channel();
        let prompt_tokens = request.prompt.len();
        let seq = Sequence::new(id, request, self.layout.clone(), events_tx);
        if self.tx.send(Msg::Submit(Box::new(seq))).is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(RouterError::ShuttingDown);
        }
        Ok(RequestStream {
            id,
            prompt_tokens,
            events,
        })
    }
}

/// The scheduler thread's state: the loop that plans and runs steps.
struct StepLoop {
    backend: Arc<dyn Backend>,
    tokenizer: Option<Arc<TextTokenizer>>,
    config: SchedulerConfig,
    pool: BlockPool,
    rx: mpsc::Receiver<Msg>,
    /// Requests submitted and not yet admitted (shared with the handles for admission).
    waiting_count: Arc<AtomicUsize>,
    /// Not running: new requests in arrival order, preempted ones at the front.
    waiting: VecDeque<Sequence>,
    /// Running, oldest first.
    running: Vec<Sequence>,
    stats: Arc<SchedulerStats>,
    metrics: Arc<RouterMetrics>,
    /// No step before this: the last ones failed for want of a worker.
    paused_until: Option<Instant>,
    /// Steps failed in a row for want of a worker (sets the pause).
    failed_in_a_row: u32,
}

impl StepLoop {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(msg) => self.take(msg),
                    Err(_) => return,
                }
            }
            while let Ok(msg) = self.rx.try_recv() {
                self.take(msg);
            }
            self.reap(Instant::now());
            if let Some(until) = self.paused_until {
                let now = Instant::now();
                if now < until {
                    // Still taking requests and cancels while backing off.
                    match self.rx.recv_timeout(until - now) {
                        Ok(msg) => self.take(msg),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    continue;
                }
                self.paused_until = None;
            }
            let plan = self.plan();
            self.publish_stats();
            if plan.iter().all(|&n| n == 0) {
                if !self.waiting.is_empty() && self.running.is_empty() {
                    // Cannot happen for validated requests (each fits the pool alone); fail the
                    // head rather than spin.
                    if let Some(seq) = self.waiting.pop_front() {
                        self.unqueue(&seq);
                        seq.fail(RouterError::Runtime(
                            "request does not fit the KV cache".into(),
                        ));
                    }
                }
                continue;
            }
            self.step(&plan);
            self.publish_stats();
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Submit(seq) => self.waiting.push_back(*seq),
        }
    }

    /// Marks a sequence as no longer waiting for admission.
    fn unqueue(&self, seq: &Sequence) {
        if !seq.admitted {
            self.waiting_count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Drops sequences whose client went away, fails those past their deadline.
    fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].gone(now) {
                let mut seq = self.running.remove(i);
                self.release(&mut seq);
                self.metrics.outcome(seq.end_reason(now));
                seq.expire(now);
            } else {
                i += 1;
            }
        }
        let waiting = std::mem::take(&mut self.waiting);
        for mut seq in waiting {
            if seq.gone(now) {
                self.unqueue(&seq);
                self.release(&mut seq);
                self.metrics.outcome(seq.end_reason(now));
                seq.expire(now);
            } else {
                self.waiting.push_back(seq);
            }
        }
    }

    fn release(&mut self, seq: &mut Sequence) {
        self.pool.release(&mut seq.cache);
    }

    /// Tokens each running sequence feeds this step (parallel to `running`); admits and
    /// preempts as needed.
    fn plan(&mut self) -> Vec<usize> {
        let mut budget = self.config.max_batch_tokens;
        let mut plan = vec![0; self.running.len()];
        // Decodes first, then prefill chunks, oldest first within each.
        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() {
                let pending = self.running[i].pending();
                if budget == 0 || plan[i] > 0 || pending == 0 || (pending == 1) != decode_pass {
                    i += 1;
                    continue;
                }
                let n = pending.min(budget);
                if self.grow(i, n, &mut plan) {
                    plan[i] = n;
                    budget -= n;
                    i += 1;
                }
                // else: sequence i itself was preempted; the next one now sits at index i.
            }
        }
        // Admit waiting sequences while slots, budget and blocks last.
        while budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let n = seq.pending().min(budget);
            if !self.pool.grow(&mut seq.cache, n) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            self.unqueue(&seq);
            if !seq.admitted {
                self.metrics.prompt_tokens.inc_by(seq.prompt_len() as u64);
            }
            seq.admitted = true;
            self.running.push(seq);
            plan.push(n);
            budget -= n;
        }
        plan
    }

    /// Gives running sequence `i` blocks for `n` tokens, preempting the youngest sequences
    /// (never an older one) until it fits. Returns false when `i` itself had to go.
    fn grow(&mut self, i: usize, n: usize, plan: &mut Vec<usize>) -> bool {
        loop {
            if self.pool.grow(&mut self.running[i].cache, n) {
                return true;
            }
            let youngest = self.running.len() - 1;
            let mut victim = self.running.remove(youngest);
            plan.remove(youngest);
            // Back to waiting with an empty cache, recomputed on re-admission; its sampler
            // keeps its state, so the output continues unchanged.
            self.release(&mut victim);
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
            self.metrics.preemptions.inc();
            debug!(request = victim.id, "preempted for cache blocks");
            self.waiting.push_front(victim);
            if youngest == i {
                return false;
            }
        }
    }

    fn step(&mut self, plan: &[usize]) {
        let started = Instant::now();
        let result = {
            let mut inputs: Vec<SeqInput<'_>> = self
                .running
                .iter_mut()
                .zip(plan)
                .filter(|(_, n)| **n > 0)
                .filter_map(|(seq, &n)| seq.input(n))
                .collect();
            // A bug in a step must not take the scheduler (and every request) down with it:
            // the batch fails with an internal error and serving goes on.
            let backend = &self.backend;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.step(&mut inputs)))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(RouterError::Runtime(format!(
                        "internal error: a step panicked: {what}"
                    )))
                })
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let vocab = self.backend.vocab_size();
        let scheduled = plan.iter().filter(|&&n| n > 0).count();
        let m = self.metrics.clone();
        m.step_tokens.observe(plan.iter().sum::<usize>() as f64);
        match result {
            Ok(out) if out.logits.len() == scheduled * vocab => {
                let t = &out.timings;
                for (phase, d) in [
                    ("attention", t.attention),
                    ("dense_ffn", t.dense_ffn),
                    ("gate", t.gate),
                    ("experts", t.experts),
                    ("shared_expert", t.shared_expert),
                    ("other", t.other),
                ] {
                    m.phase(phase, d.as_secs_f64());
                }
                let logits = out.logits;
                let sampling = Instant::now();
                let mut row = 0;
                let mut finished = Vec::new();
                for (i, &n) in plan.iter().enumerate() {
                    if n == 0 {
                        continue;
                    }
                    let seq = &mut self.running[i];
                    let outcome = seq.advance(
                        &logits[row * vocab..(row + 1) * vocab],
                        self.tokenizer.as_deref(),
                        self.backend.eos_token_ids(),
                        &m,
                    );
                    row += 1;
                    if outcome != StepOutcome::Continue {
                        finished.push(i);
                    }
                }
                for &i in finished.iter().rev() {
                    let mut seq = self.running.remove(i);
                    self.release(&mut seq);
                }
                m.phase("sampling", sampling.elapsed().as_secs_f64());
                self.failed_in_a_row = 0;
                m.step_duration.observe(started.elapsed().as_secs_f64());
                debug!(
                    sequences = scheduled,
                    tokens = plan.iter().sum::<usize>(),
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "step"
                );
            }
            Ok(out) => self.fail_scheduled(
                plan,
                RouterError::Runtime(format!(
                    "step returned {} logits for {scheduled} sequences of vocab {vocab}",
                    out.logits.len()
                )),
            ),
            Err(e) if worth_retrying(&e) => self.retry_scheduled(plan, e),
            Err(e) => {
                warn!(error = %e, sequences = scheduled, "step failed");
                self.fail_scheduled(plan, e);
            }
        }
    }

    /// After a step failed for want of a worker: its sequences go back to the front of the
    /// queue (their caches hold a half-written step, so they are recomputed from their tokens,
    /// as after a preemption), except those retried for longer than `step_retry`, which fail;
    /// and no step runs for a pause that doubles with each such failure in a row.
    fn retry_scheduled(&mut self, plan: &[usize], error: RouterError) {
        let now = Instant::now();
        let budget = self.config.step_retry;
        let error = Arc::new(error);
        let (mut retried, mut failed) = (0, 0);
        for i in (0..plan.len()).rev() {
            if plan[i] == 0 {
                continue;
            }
            let mut seq = self.running.remove(i);
            self.release(&mut seq);
            let since = *seq.failing_since.get_or_insert(now);
            if now.duration_since(since) < budget {
                retried += 1;
                self.waiting.push_front(seq);
            } else {
                failed += 1;
                self.metrics.outcome("failed");
                seq.fail_shared(error.clone());
            }
        }
        self.metrics.retried_steps.inc();
        if retried == 0 {
            // Nothing waits for a retry: the requests not in this step need no pause.
            warn!(error = %error, failed, "step failed for want of an expert worker; its sequences are past --step-retry-ms");
            return;
        }
        let pause = RETRY_PAUSE
            .saturating_mul(1 << self.failed_in_a_row.min(10))
            .min(RETRY_PAUSE_MAX);
        self.failed_in_a_row += 1;
        self.paused_until = Some(now + pause);
        warn!(error = %error, retried, failed, pause_ms = pause.as_millis() as u64, "step failed for want of an expert worker; its sequences wait and are recomputed");
    }

    /// Fails every sequence of a failed step: its cache holds a half-written step.
    fn fail_scheduled(&mut self, plan: &[usize], error: RouterError) {
        let error = Arc::new(error);
        for i in (0..plan.len()).rev() {
            if plan[i] > 0 {
                let mut seq = self.running.remove(i);
                self.release(&mut seq);
                self.metrics.outcome("failed");
                seq.fail_shared(error.clone());
            }
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.waiting.store(self.waiting.len(), Ordering::Relaxed);
        s.running.store(self.running.len(), Ordering::Relaxed);
        s.blocks_used
            .store(self.pool.used_blocks(), Ordering::Relaxed);
        let m = &self.metrics;
        m.queue_depth.set(self.waiting.len() as i64);
        m.running.set(self.running.len() as i64);
        m.kv_blocks_used.set(self.pool.used_blocks() as i64);
        m.kv_blocks_free.set(self.pool.free_blocks() as i64);
    }
}

#[cfg(test)]
mod tests;
