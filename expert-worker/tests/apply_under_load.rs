//! Placement changes while calls run: the worker swaps expert sets under concurrent `forward`
//! calls without blocking either side, and every call computes on a whole set.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchyard_engine::ModelConfig;
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_expert_worker::ExpertWorker;
use switchyard_proto::codec;
use switchyard_proto::v1::{Dtype, ForwardRequest};

fn tiny(dir: &std::path::Path) -> ModelConfig {
    synth::synth(
        dir,
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::F32,
            seed: 5,
            ..Default::default()
        },
    )
    .unwrap();
    ModelConfig::from_dir(dir).unwrap()
}

/// Every MoE layer holding `experts`.
fn assignment(
    config: &ModelConfig,
    experts: std::ops::Range<u32>,
) -> BTreeMap<usize, BTreeSet<u32>> {
    config
        .moe_layers()
        .into_iter()
        .map(|l| (l, experts.clone().collect()))
        .collect()
}

/// Three rows on experts 0–3 of `layer`, which both placements of the test hold.
fn call(layer: usize, hidden: usize) -> ForwardRequest {
    let x: Vec<f32> = (0..3 * hidden)
        .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5)
        .collect();
    ForwardRequest {
        layer: layer as u32,
        hidden: Some(codec::encode(&x, &[3, hidden], Dtype::F32)),
        offsets: vec![0, 2, 3, 5],
        expert_ids: vec![0, 1, 2, 1, 3],
        weights: vec![0.5, 0.25, 1.0, 0.75, 0.125],
        reply_dtype: Dtype::F32 as i32,
        ..Default::default()
    }
}

#[test]
fn placements_applied_in_a_loop_never_block_or_break_concurrent_calls() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny(dir.path());
    let layer = config.moe_layers()[0];
    let (a, b) = (assignment(&config, 0..8), assignment(&config, 0..4));
    let b = {
        // b keeps experts 0–3 and gains 12–15: every apply loads and drops something.
        let mut b = b;
        for experts in b.values_mut() {
            experts.extend(12..16);
        }
        b
    };
    let worker = Arc::new(ExpertWorker::empty(dir.path()).unwrap());
    worker.apply(&a).unwrap();
    let want = worker.forward(&call(layer, config.hidden_size)).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for _ in 0..8 {
        let (worker, stop, calls, want, done) = (
            worker.clone(),
            stop.clone(),
            calls.clone(),
            want.clone(),
            done_tx.clone(),
        );
        let hidden = config.hidden_size;
        std::thread::spawn(move || {
            let mut result = Ok(());
            while !stop.load(Ordering::Relaxed) {
                match worker.forward(&call(layer, hidden)) {
                    Ok(got) if got == want => {}
                    Ok(_) => result = Err("a call returned other numbers".to_string()),
                    Err(e) => result = Err(format!("a call failed: {e}")),
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            let _ = done.send(result);
        });
    }
    let (apply_tx, apply_rx) = std::sync::mpsc::channel();
    {
        let (worker, stop, a, b) = (worker.clone(), stop.clone(), a.clone(), b.clone());
        std::thread::spawn(move || {
            let mut applied = 0usize;
            let mut result = Ok(());
            while !stop.load(Ordering::Relaxed) {
                let next = if applied.is_multiple_of(2) { &b } else { &a };
                if let Err(e) = worker.apply(next) {
                    result = Err(e.to_string());
                    break;
                }
                applied += 1;
            }
            let _ = apply_tx.send(result.map(|()| applied));
        });
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    // A deadlock shows as a thread that never reports, bounded here instead of hanging.
    let deadline = Instant::now() + Duration::from_secs(30);
    for _ in 0..8 {
        let left = deadline.saturating_duration_since(Instant::now());
        done_rx
            .recv_timeout(left)
            .expect("a calling thread is stuck")
            .unwrap();
    }
    let applied = apply_rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .expect("the applying thread is stuck")
        .unwrap();
    assert!(applied >= 4, "only {applied} placements applied in 3 s");
    assert!(calls.load(Ordering::Relaxed) >= 8, "calls did not run");
    // The last set applied is what the worker holds and reports.
    let last = if applied % 2 == 1 { &b } else { &a };
    assert_eq!(&worker.holding(), last);
    let info_experts: usize = worker.info().layers.iter().map(|l| l.experts.len()).sum();
    assert_eq!(
        info_experts,
        last.values().map(BTreeSet::len).sum::<usize>()
    );
}
