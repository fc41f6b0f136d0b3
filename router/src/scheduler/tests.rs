//! Scheduler behaviour on a fake model: logits depend only on the last token and its
//! position, so a wrong token, position or recompute shows up as a different output.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use switchyard_engine::model::KvLayout;
use switchyard_engine::sampling::SamplingParams;

use super::*;

const VOCAB: usize = 64;

#[derive(Default)]
struct Fake {
    /// Panic in the step that sees this token.
    panic_on: Option<u32>,
    /// Sleep per step, to let requests pile up.
    step_delay: Duration,
    /// Tokens per step, in order.
    steps: Mutex<Vec<Vec<usize>>>,
    eos: Vec<u32>,
    /// Fail this many steps (the next ones) as a lost expert worker would.
    lose_worker_for: AtomicUsize,
}

fn next_token(last: u32, pos: usize) -> u32 {
    ((last as usize * 7 + pos * 3 + 1) % VOCAB) as u32
}

impl Backend for Fake {
    fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout::new(1, 4, block_size)
    }
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }
    fn step(&self, seqs: &mut [SeqInput<'_>]) -> Result<crate::backend::StepOutput, RouterError> {
        std::thread::sleep(self.step_delay);
        if self
            .lose_worker_for
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(RouterError::Worker {
                worker: switchyard_proto::WorkerId(3),
                addr: "127.0.0.1:1".into(),
                layer: 1,
                code: tonic::Code::Unavailable,
                message: "connection refused".into(),
            });
        }
        if let Some(t) = self.panic_on
            && seqs.iter().any(|s| s.tokens.contains(&t))
        {
            panic!("fake model bug");
        }
        let mut logits = vec![0.0f32; seqs.len() * VOCAB];
        let mut sizes = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            sizes.push(s.tokens.len());
            s.cache.reserve(s.tokens.len())?;
            s.cache.commit(s.tokens.len());
            let last = *s.tokens.last().unwrap();
            logits[i * VOCAB + next_token(last, s.cache.len()) as usize] = 5.0;
        }
        self.steps.lock().unwrap().push(sizes);
        Ok(crate::backend::StepOutput {
            logits,
            ..Default::default()
        })
    }
}

fn config(kv_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_size: 8,
        max_batch_tokens: 32,
        max_waiting: 4096,
        kv_blocks,
        block_size: 4,
        step_retry: Duration::from_secs(5),
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> ValidRequest {
    ValidRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        ignore_eos: false,
        stop_token_ids: Vec::new(),
        stop: Vec::new(),
        logprobs: None,
        deadline: None,
        timeout: None,
    }
}

/// The greedy output the fake model gives.
fn expected(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut last = *prompt.last().unwrap();
    let mut out = Vec::new();
    for pos in prompt.len()..prompt.len() + max_tokens {
        last = next_token(last, pos);
        out.push(last);
    }
    out
}

/// Token ids and the final event of a stream.
fn collect(mut s: RequestStream) -> (Vec<u32>, Event) {
    let mut ids = Vec::new();
    loop {
        match s
            .events
            .blocking_recv()
            .expect("stream ended without a final event")
        {
            Event::Token { id, .. } => ids.push(id),
            last => return (ids, last),
        }
    }
}

fn wait_idle(s: &Scheduler) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let st = s.stats();
        if st.running.load(Ordering::Relaxed) == 0
            && st.waiting.load(Ordering::Relaxed) == 0
            && s.waiting.load(Ordering::Relaxed) == 0
        {
            // One more step boundary so the stats are current.
            std::thread::sleep(Duration::from_millis(20));
            if st.running.load(Ordering::Relaxed) == 0 {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("scheduler did not go idle");
}

fn start(fake: Fake, config: SchedulerConfig) -> (Arc<Fake>, Scheduler) {
    let fake = Arc::new(fake);
    let s = Scheduler::start(fake.clone(), None, config, RouterMetrics::new()).unwrap();
    (fake, s)
}

#[test]
fn concurrent_requests_give_their_one_at_a_time_outputs() {
    let (_, s) = start(Fake::default(), config(64));
    let mut rng = StdRng::seed_from_u64(1);
    let reqs: Vec<(Vec<u32>, usize)> = (0..40)
        .map(|_| {
            let len = rng.random_range(1..30);
            let prompt = (0..len)
                .map(|_| rng.random_range(0..VOCAB as u32))
                .collect();
            (prompt, rng.random_range(1..20))
        })
        .collect();
    let streams: Vec<_> = reqs
        .iter()
        .map(|(p, n)| s.submit(request(p.clone(), *n)).unwrap())
        .collect();
    for ((p, n), stream) in reqs.iter().zip(streams) {
        let (ids, last) = collect(stream);
        assert_eq!(ids, expected(p, *n));
        match last {
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                assert_eq!(reason, FinishReason::Length);
                assert_eq!((prompt_tokens, completion_tokens), (p.len(), *n));
            }
            other => panic!("{other:?}"),
        }
    }
    wait_idle(&s);
    assert_eq!(s.stats().blocks_used.load(Ordering::Relaxed), 0);
}

#[test]
fn preemption_recomputes_and_keeps_the_output() {
    // 12 blocks of 4 tokens: eight 20-token sequences cannot all stay cached.
    let (_, s) = start(Fake::default(), config(12));
    let reqs: Vec<Vec<u32>> = (0..8).map(|i| vec![i as u32 + 1; 6]).collect();
    let streams: Vec<_> = reqs
        .iter()
        .map(|p| s.submit(request(p.clone(), 14)).unwrap())
        .collect();
    for (p, stream) in reqs.iter().zip(streams) {
        assert_eq!(collect(stream).0, expected(p, 14));
    }
    assert!(s.stats().preemptions.load(Ordering::Relaxed) > 0);
    wait_idle(&s);
    assert_eq!(s.stats().blocks_used.load(Ordering::Relaxed), 0);
}

#[test]
fn chunked_prefill_keeps_running_decodes_going() {
    let (fake, s) = start(
        Fake {
            step_delay: Duration::from_millis(1),
            ..Default::default()
        },
        SchedulerConfig {
            max_batch_tokens: 16,
            ..config(200)
        },
    );
    let short = s.submit(request(vec![3], 30)).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let long = s.submit(request(vec![5; 300], 1)).unwrap();
    assert_eq!(collect(short).0, expected(&[3], 30));
    assert_eq!(collect(long).0, expected(&[5; 300], 1));
    let steps = fake.steps.lock().unwrap();
    assert!(steps.iter().all(|s| s.iter().sum::<usize>() <= 16));
    // While the long prompt was being prefilled in chunks, the short one decoded beside it.
    let mixed = steps
        .iter()
        .filter(|s| s.len() == 2 && s.contains(&1) && s.iter().any(|&n| n > 1))
        .count();
    assert!(mixed >= 5, "{steps:?}");
}

#[test]
fn overload_is_refused_and_nothing_admitted_is_lost() {
    let (_, s) = start(
        Fake {
            step_delay: Duration::from_millis(2),
            ..Default::default()
        },
        SchedulerConfig {
            max_waiting: 4,
            max_batch_size: 2,
            max_batch_tokens: 8,
            ..config(64)
        },
    );
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        match s.submit(request(vec![i % 60 + 1], 5)) {
            Ok(stream) => accepted.push((i, stream)),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                assert!(e.to_string().contains("limit 4"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0);
    for (i, stream) in accepted {
        assert_eq!(collect(stream).0, expected(&[i % 60 + 1], 5));
    }
    wait_idle(&s);
}

#[test]
fn stop_tokens_and_eos_end_a_sequence_unless_ignored() {
    let prompt = vec![9u32];
    let out = expected(&prompt, 10);
    let (_, s) = start(
        Fake {
            eos: vec![out[3]],
            ..Default::default()
        },
        config(32),
    );
    let (ids, last) = collect(s.submit(request(prompt.clone(), 10)).unwrap());
    assert_eq!(ids, out[..4]);
    assert!(matches!(
        last,
        Event::Finished {
            reason: FinishReason::Stop,
            ..
        }
    ));
    let mut r = request(prompt.clone(), 10);
    r.ignore_eos = true;
    r.stop_token_ids = vec![out[6]];
    let (ids, _) = collect(s.submit(r).unwrap());
    assert_eq!(ids, out[..7]);
}

#[test]
fn deadline_fails_the_request_and_frees_its_blocks() {
    let (_, s) = start(
        Fake {
            step_delay: Duration::from_millis(5),
            ..Default::default()
        },
        config(32),
    );
    let mut r = request(vec![1], 1000);
    r.timeout = Some(Duration::from_millis(30));
    r.deadline = Some(Instant::now() + Duration::from_millis(30));
    let (ids, last) = collect(s.submit(r).unwrap());
    assert!(!ids.is_empty() && ids.len() < 100);
    match last {
        Event::Failed(e) => assert_eq!(e.code(), tonic::Code::DeadlineExceeded),
        other => panic!("{other:?}"),
    }
    wait_idle(&s);
    assert_eq!(s.stats().blocks_used.load(Ordering::Relaxed), 0);
}

/// Thousands of requests with random lengths, clients that vanish at random points and random
/// deadlines, on a pool small enough to preempt: every block comes back, every request that
/// kept its client ends with exactly one final event.
#[test]
fn random_lifecycles_never_leak_blocks() {
    let (_, s) = start(Fake::default(), config(24));
    let mut rng = StdRng::seed_from_u64(7);
    let mut finished = 0;
    let mut cancelled = 0;
    for _wave in 0..40 {
        let mut streams = Vec::new();
        for _ in 0..50 {
            let len = rng.random_range(1..24);
            let prompt: Vec<u32> = (0..len)
                .map(|_| rng.random_range(0..VOCAB as u32))
                .collect();
            let max_tokens = rng.random_range(1..40);
            let mut r = request(prompt.clone(), max_tokens);
            if rng.random_range(0..10) == 0 {
                let t = Duration::from_micros(rng.random_range(0..3000));
                r.timeout = Some(t);
                r.deadline = Some(Instant::now() + t);
            }
            let cancel_after = (rng.random_range(0..4) == 0).then(|| rng.random_range(0..10));
            streams.push((prompt, max_tokens, cancel_after, s.submit(r).unwrap()));
        }
        for (prompt, max_tokens, cancel_after, mut stream) in streams {
            let mut ids = Vec::new();
            loop {
                if cancel_after.is_some_and(|n| ids.len() >= n) {
                    drop(stream);
                    cancelled += 1;
                    break;
                }
                match stream.events.blocking_recv().expect("a final event") {
                    Event::Token { id, .. } => ids.push(id),
                    Event::Finished { .. } => {
                        assert_eq!(ids, expected(&prompt, max_tokens));
                        finished += 1;
                        break;
                    }
                    Event::Failed(e) => {
                        assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
                        break;
                    }
                }
            }
        }
    }
    wait_idle(&s);
    assert_eq!(s.stats().blocks_used.load(Ordering::Relaxed), 0);
    assert!(finished > 1000 && cancelled > 100, "{finished} {cancelled}");
    assert!(s.stats().preemptions.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_panicking_step_fails_its_batch_and_serving_goes_on() {
    let (_, s) = start(
        Fake {
            panic_on: Some(63),
            ..Default::default()
        },
        config(32),
    );
    let (_, last) = collect(s.submit(request(vec![63], 4)).unwrap());
    match last {
        Event::Failed(e) => {
            assert_eq!(e.code(), tonic::Code::Unavailable);
            assert!(e.to_string().contains("fake model bug"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // The scheduler is still there, and the failed sequence's blocks are back.
    assert_eq!(
        collect(s.submit(request(vec![5], 4)).unwrap()).0,
        expected(&[5], 4)
    );
    wait_idle(&s);
    assert_eq!(s.stats().blocks_used.load(Ordering::Relaxed), 0);
}

#[test]
fn steps_that_lose_a_worker_are_retried_and_the_outputs_are_unchanged() {
    let metrics = RouterMetrics::new();
    let fake = Arc::new(Fake {
        step_delay: Duration::from_millis(1),
        ..Default::default()
    });
    let s = Scheduler::start(fake.clone(), None, config(64), metrics.clone()).unwrap();
    // 40 steps of 1 ms at least: the failures land mid-generation.
    let reqs: Vec<(Vec<u32>, usize)> = (0..6).map(|i| (vec![i + 1; 3 + i as usize], 40)).collect();
    let streams: Vec<_> = reqs
        .iter()
        .map(|(p, n)| s.submit(request(p.clone(), *n)).unwrap())
        .collect();
    // Five steps in a row fail, mid-generation for some: each time the batch waits, backs off
    // (50, 100, 200, 400, 800 ms at most 1 s) and is recomputed from its tokens.
    std::thread::sleep(Duration::from_millis(5));
    fake.lose_worker_for.store(5, Ordering::Release);
    let started = Instant::now();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out: Vec<_> = streams.into_iter().map(collect).collect();
        let _ = done_tx.send(out);
    });
    let out = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the retried requests finish");
    for ((prompt, n), (ids, last)) in reqs.iter().zip(out) {
        assert!(matches!(last, Event::Finished { .. }), "{last:?}");
        assert_eq!(ids, expected(prompt, *n));
    }
    assert!(started.elapsed() >= Duration::from_millis(50 + 100 + 200 + 400));
    assert_eq!(metrics.retried_steps.get(), 5);
    wait_idle(&s);
    assert_eq!(s.stats().blocks_used.load(Ordering::Relaxed), 0);
}

#[test]
fn a_request_whose_steps_keep_losing_a_worker_fails_with_that_error_after_its_budget() {
    let fake = Fake::default();
    fake.lose_worker_for.store(usize::MAX, Ordering::Release);
    let (_, s) = start(
        fake,
        SchedulerConfig {
            step_retry: Duration::from_millis(300),
            ..config(64)
        },
    );
    let started = Instant::now();
    let (ids, last) = collect(s.submit(request(vec![1, 2], 4)).unwrap());
    assert!(ids.is_empty());
    match last {
        Event::Failed(e) => {
            assert_eq!(e.code(), tonic::Code::Unavailable);
            assert!(e.to_string().contains("w3"), "{e}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // With no budget it fails at the first lost step.
    let fake = Fake::default();
    fake.lose_worker_for.store(usize::MAX, Ordering::Release);
    let (_, s) = start(
        fake,
        SchedulerConfig {
            step_retry: Duration::ZERO,
            ..config(64)
        },
    );
    let (_, last) = collect(s.submit(request(vec![1, 2], 4)).unwrap());
    assert!(matches!(last, Event::Failed(_)), "{last:?}");
}
