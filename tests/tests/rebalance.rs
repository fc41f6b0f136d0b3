//! Online rebalancing under load, in one test process: a coordinator, three workers and a
//! router serving 16 concurrent greedy streams on a tiny model whose gate prefers some
//! experts. The router's load reports reach the coordinator; rebalances move experts while the
//! streams run. Every request must finish with exactly the single-process tokens, no expert
//! call may fail, and the predicted worker imbalance must fall.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchyard_coordinator::placement;
use switchyard_coordinator::service::Balancing;
use switchyard_engine::model::{CausalLm, ExpertSelection, LoadOptions};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_proto::v1::Dtype;
use switchyard_router::experts::DispatchOptions;
use switchyard_router::node::{Experts, RouterNode};
use switchyard_router::request::{Prompt, RawRequest};
use switchyard_router::server::ServingState;
use switchyard_tests::Cluster;

mod common;
use common::{failed_calls, serving};

const STREAMS: u32 = 16;
const REQUEST_BOUND: Duration = Duration::from_secs(15);

fn request(i: u32) -> RawRequest {
    let prompt: Vec<u32> = (0..4 + i % 7)
        .map(|j| (i * 37 + j * 13) % 500 + 1)
        .collect();
    RawRequest {
        max_tokens: Some(10),
        temperature: Some(0.0),
        ignore_eos: true,
        timeout: Some(REQUEST_BOUND),
        ..RawRequest::new(Prompt::Ids(prompt))
    }
}

fn run(state: &ServingState, i: u32) -> Result<Vec<u32>, String> {
    common::tokens(state, request(i))
}

#[test]
fn rebalances_under_load_lose_no_request_and_lower_the_imbalance() {
    let dir = tempfile::tempdir().unwrap();
    synth::synth(
        dir.path(),
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::F32,
            seed: 5,
            expert_skew: 2.0,
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
    let want: Vec<Vec<u32>> = (0..STREAMS)
        .map(|i| run(single.state(), i).unwrap())
        .collect();
    drop(single);

    let cluster = Cluster::start_balancing(
        dir.path(),
        1,
        Duration::from_millis(600),
        3,
        Balancing {
            redundant: 2,
            load_half_life: Duration::ZERO,
            interval: None,
            max_moves: 6,
            threshold: 0.0,
        },
    );
    cluster.wait_settled(1, Duration::from_secs(30));
    let options = serving();
    let metrics = options.metrics.clone();
    let model = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    let node = RouterNode::start(
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
        &options,
    )
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let (tx, report) = std::sync::mpsc::channel::<Result<(), String>>();
    for i in 0..STREAMS {
        let (state, stop, done, want, tx) = (
            node.state().clone(),
            stop.clone(),
            done.clone(),
            want[i as usize].clone(),
            tx.clone(),
        );
        std::thread::spawn(move || {
            let mut outcome = Ok(());
            while !stop.load(Ordering::Relaxed) {
                match run(&state, i) {
                    Ok(got) if got == want => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(got) => {
                        outcome = Err(format!("stream {i}: {got:?}, single process {want:?}"));
                        break;
                    }
                    Err(e) => {
                        outcome = Err(format!("stream {i} failed: {e}"));
                        break;
                    }
                }
            }
            let _ = tx.send(outcome);
        });
    }

    // The router's reports bring the load to the coordinator.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.status().load_tokens < 500.0 {
        assert!(Instant::now() < deadline, "no load reached the coordinator");
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = placement::mean_imbalance(
        &cluster
            .status()
            .balance
            .iter()
            .map(|l| (l.layer, l.before))
            .collect(),
    );
    let mut applied = 0;
    for round in 0..4 {
        let out = match cluster.coordinator().rebalance_now(false, None, None) {
            Ok(out) => out,
            Err(e) => panic!("round {round}: {}", e.message()),
        };
        assert!(out.rebalance.moves <= 6, "{} moves", out.rebalance.moves);
        let Some(version) = out.version else { break };
        applied += 1;
        cluster.wait_for(
            "the rebalanced placement live",
            Duration::from_secs(30),
            |u| u.live.as_ref().is_some_and(|l| l.version >= version),
        );
        // Some traffic on the new placement before the next round.
        let at = done.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while done.load(Ordering::Relaxed) < at + STREAMS as usize {
            assert!(
                Instant::now() < deadline,
                "streams stalled after a rebalance"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(applied >= 1, "a skewed load was never rebalanced");
    let status = cluster.status();
    let last =
        placement::mean_imbalance(&status.balance.iter().map(|l| (l.layer, l.before)).collect());
    assert!(last < first, "predicted imbalance {first} -> {last}");
    assert_eq!(status.rebalances, applied);

    stop.store(true, Ordering::Relaxed);
    for _ in 0..STREAMS {
        report
            .recv_timeout(REQUEST_BOUND + Duration::from_secs(10))
            .expect("a stream is stuck")
            .unwrap();
    }
    assert_eq!(failed_calls(&metrics), 0, "a rebalance failed expert calls");
    assert!(metrics.dispatch.placement_switches.get() >= applied);
    eprintln!(
        "rebalance: {applied} rebalances, predicted imbalance {first:.3} -> {last:.3}, {} requests",
        done.load(Ordering::Relaxed)
    );
    drop(node);
}
