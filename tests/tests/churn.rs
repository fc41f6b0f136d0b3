//! Membership changes under load, in one test process: a coordinator, three workers (two
//! copies of every expert) and a router serving 16 concurrent greedy streams while workers
//! are added, drained away and killed-and-replaced, ten times over. Every request must finish
//! with exactly the single-process tokens, within a bound, and no expert call may be lost.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchyard_engine::model::{CausalLm, ExpertSelection, LoadOptions};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_proto::v1::Dtype;
use switchyard_router::experts::DispatchOptions;
use switchyard_router::metrics::ReasonLabel;
use switchyard_router::node::{Experts, RouterNode};
use switchyard_router::request::{Prompt, RawRequest};
use switchyard_router::server::{ServingOptions, ServingState};
use switchyard_tests::Cluster;

mod common;
use common::{failed_calls, serving};

const STREAMS: u32 = 16;
const ROUNDS: usize = 10;
/// No request may take longer, whatever the cluster is doing.
const REQUEST_BOUND: Duration = Duration::from_secs(15);

fn request(i: u32) -> RawRequest {
    let prompt: Vec<u32> = (0..3 + i % 9)
        .map(|j| (i * 31 + j * 17) % 500 + 1)
        .collect();
    RawRequest {
        max_tokens: Some(12),
        temperature: Some(0.0),
        ignore_eos: true,
        timeout: Some(REQUEST_BOUND),
        ..RawRequest::new(Prompt::Ids(prompt))
    }
}

fn run(state: &ServingState, i: u32) -> Result<Vec<u32>, String> {
    common::tokens(state, request(i))
}

/// Greedy streams, each re-submitting its request until stopped and checking every answer.
struct Streams {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    report: std::sync::mpsc::Receiver<Result<Duration, String>>,
}

impl Streams {
    fn start(state: &ServingState, want: &[Vec<u32>]) -> Streams {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (report_tx, report) = std::sync::mpsc::channel();
        for i in 0..STREAMS {
            let (state, stop, done, want, tx) = (
                state.clone(),
                stop.clone(),
                done.clone(),
                want[i as usize].clone(),
                report_tx.clone(),
            );
            std::thread::spawn(move || {
                let mut outcome = Ok(Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    match run(&state, i) {
                        Ok(got) if got == want => {}
                        Ok(got) => {
                            outcome = Err(format!("stream {i}: {got:?}, single process {want:?}"));
                            break;
                        }
                        Err(e) => {
                            outcome = Err(format!("stream {i} failed: {e}"));
                            break;
                        }
                    }
                    let took = start.elapsed();
                    if let Ok(longest) = &mut outcome {
                        *longest = (*longest).max(took);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                let _ = tx.send(outcome);
            });
        }
        Streams { stop, done, report }
    }

    /// Stops the streams (bounded) and returns the requests answered and the longest one.
    fn finish(self) -> (usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let mut longest = Duration::ZERO;
        for _ in 0..STREAMS {
            let outcome = self
                .report
                .recv_timeout(REQUEST_BOUND + Duration::from_secs(10))
                .expect("a stream is stuck");
            longest = longest.max(outcome.unwrap());
        }
        (self.done.load(Ordering::Relaxed), longest)
    }
}

/// The tiny model, the single-process tokens of every stream's request, and its directory.
fn reference(seed: u64) -> (tempfile::TempDir, Vec<Vec<u32>>) {
    let dir = tempfile::tempdir().unwrap();
    synth::synth(
        dir.path(),
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::F32,
            seed,
            ..Default::default()
        },
    )
    .unwrap();
    let local = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
    let single = RouterNode::start(
        local,
        None,
        Experts::InProcess,
        DispatchOptions::default(),
        &serving(),
    )
    .unwrap();
    let want = (0..STREAMS)
        .map(|i| run(single.state(), i).unwrap())
        .collect();
    (dir, want)
}

/// A router following `cluster`'s coordinator.
fn router(dir: &std::path::Path, cluster: &Cluster, options: &ServingOptions) -> RouterNode {
    let model = CausalLm::load(
        dir,
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    RouterNode::start(
        model,
        None,
        Experts::Coordinator {
            addr: cluster.coordinator_addr().to_string(),
            wait: Duration::from_secs(20),
        },
        DispatchOptions {
            wire_dtype: Dtype::F32,
            deadline: Duration::from_secs(2),
            ..Default::default()
        },
        options,
    )
    .unwrap()
}

#[test]
fn streams_finish_with_single_process_tokens_while_workers_join_leave_and_die() {
    let (dir, want) = reference(21);
    let mut cluster = Cluster::start(dir.path(), 2, Duration::from_millis(1000), 3);
    cluster.wait_settled(2, Duration::from_secs(30));
    let options = serving();
    let metrics = options.metrics.clone();
    let node = router(dir.path(), &cluster, &options);
    let state = node.state().clone();
    let streams = Streams::start(&state, &want);

    let settle = Duration::from_secs(30);
    let churn_start = Instant::now();
    for round in 0..ROUNDS {
        // Added.
        cluster.add_worker();
        cluster.wait_for("the new worker placed", settle, |u| {
            u.live.as_ref().is_some_and(|l| l.workers.len() == 4)
        });
        cluster.wait_settled(2, settle);
        // Removed: the oldest running worker drains away, as on SIGTERM.
        let oldest = cluster.running()[0];
        assert!(
            cluster.drain_worker(oldest, Duration::from_secs(20)),
            "round {round}: the drain did not complete"
        );
        cluster.wait_settled(2, settle);
        // Replaced: one dies without a word, a new one takes its place.
        let victim = cluster.running()[0];
        let gone = cluster.workers[victim].addr.clone();
        cluster.kill_worker(victim);
        cluster.add_worker();
        cluster.wait_for("the dead worker re-placed", settle, |u| {
            u.live.as_ref().is_some_and(|l| {
                l.workers.len() == 3 && l.workers.iter().all(|w| w.address != gone)
            })
        });
        cluster.wait_settled(2, settle);
    }
    let churn = churn_start.elapsed();
    let (requests, longest) = streams.finish();
    assert!(
        requests >= STREAMS as usize * ROUNDS,
        "only {requests} requests in {churn:?}"
    );
    assert!(longest < REQUEST_BOUND, "a request took {longest:?}");
    // Every failed expert call was re-planned and answered: nothing lost.
    let m = &metrics.dispatch;
    let retried: u64 = ["worker_lost", "expert_moved"]
        .iter()
        .map(|&reason| m.retried_calls.get_or_create(&ReasonLabel { reason }).get())
        .sum();
    let failed = failed_calls(&metrics);
    assert_eq!(failed, retried, "failed expert calls that were not re-sent");
    assert!(m.placement_switches.get() as usize >= 3 * ROUNDS);
    eprintln!(
        "churn: {ROUNDS} rounds in {churn:?}, {requests} requests, longest {longest:?}, {failed} calls failed and re-sent, {} placement switches",
        m.placement_switches.get()
    );
    drop(node);
}

#[test]
fn scale_down_by_drain_fails_no_call_even_without_replicas() {
    let (dir, want) = reference(22);
    let mut cluster = Cluster::start(dir.path(), 1, Duration::from_millis(1000), 3);
    cluster.wait_settled(1, Duration::from_secs(30));
    let options = serving();
    let metrics = options.metrics.clone();
    let node = router(dir.path(), &cluster, &options);
    let streams = Streams::start(node.state(), &want);
    for _ in 0..2 {
        let oldest = cluster.running()[0];
        assert!(cluster.drain_worker(oldest, Duration::from_secs(20)));
        cluster.add_worker();
        cluster.wait_for("the new worker placed", Duration::from_secs(30), |u| {
            u.live.as_ref().is_some_and(|l| l.workers.len() == 3)
        });
        cluster.wait_settled(1, Duration::from_secs(30));
    }
    let (requests, longest) = streams.finish();
    assert!(requests >= STREAMS as usize, "only {requests} requests");
    assert!(longest < REQUEST_BOUND, "a request took {longest:?}");
    assert_eq!(failed_calls(&metrics), 0, "a drain failed expert calls");
    drop(node);
}
