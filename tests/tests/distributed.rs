//! Router + expert workers over gRPC give what the single-process engine gives.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use switchyard_engine::generate::{self, GenerateOptions, GenerateRequest};
use switchyard_engine::model::{
    CausalLm, ExpertSelection, ForwardOptions, LoadOptions, LogitsFor, SeqInput,
};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_proto::v1::Dtype;
use switchyard_router::ExpertPool;
use switchyard_router::experts::{CallMode, DispatchOptions};
use switchyard_router::metrics::WorkerLabel;
use switchyard_tests::Sandbox;

const PROMPT: &[u32] = &[1, 17, 42, 99, 3, 250, 7, 7, 311];

fn tiny_f32(dir: &Path) {
    synth::synth(
        dir,
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::F32,
            seed: 11,
            ..Default::default()
        },
    )
    .unwrap();
}

fn logits(
    model: &CausalLm,
    experts: Option<&ExpertPool>,
) -> (Vec<f32>, Vec<(usize, switchyard_engine::model::Routing)>) {
    let mut cache = model.new_cache(PROMPT.len());
    let opts = ForwardOptions {
        logits: LogitsFor::All,
        record_routing: true,
        ..Default::default()
    };
    let mut seqs = [SeqInput {
        tokens: PROMPT,
        cache: &mut cache,
    }];
    let out = match experts {
        Some(e) => model.forward_with(&mut seqs, &opts, &e.step().unwrap()),
        None => model.forward(&mut seqs, &opts),
    }
    .unwrap();
    (out.logits.into_f32_vec(), out.routing)
}

fn greedy(model: &CausalLm, experts: Option<&ExpertPool>) -> Vec<u32> {
    let req = GenerateRequest {
        prompt: PROMPT.to_vec(),
        max_new_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let out = match experts {
        Some(e) => generate::generate_with(
            model,
            std::slice::from_ref(&req),
            GenerateOptions::default(),
            &e.step().unwrap(),
        ),
        None => generate::generate(
            model,
            std::slice::from_ref(&req),
            GenerateOptions::default(),
        ),
    }
    .unwrap();
    out[0].token_ids.clone()
}

#[test]
fn router_with_1_2_and_4_workers_matches_the_single_process_engine() {
    let dir = tempfile::tempdir().unwrap();
    tiny_f32(dir.path());
    let local = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
    let (want_logits, _) = logits(&local, None);
    let want_tokens = greedy(&local, None);
    let router = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        router.routed_expert_bytes(),
        0,
        "the router holds no routed experts"
    );

    let splits: [&[&str]; 4] = [
        // One worker: every token's experts on it.
        &["all"],
        &["0-7", "8-15"],
        &["0-3", "4-7", "8-11", "12-15"],
        // Interleaved, so each token's experts spread over all four workers.
        &["0,4,8,12", "1,5,9,13", "2,6,10,14", "3,7,11,15"],
    ];
    let runs = splits
        .iter()
        .flat_map(|s| [(s, CallMode::Unary), (s, CallMode::Stream)]);
    for (specs, call_mode) in runs {
        let sandbox = Sandbox::start(dir.path(), specs);
        let remote = ExpertPool::connect_static(
            router.config(),
            &sandbox.addrs(),
            DispatchOptions {
                wire_dtype: Dtype::F32,
                call_mode,
                ..Default::default()
            },
        )
        .unwrap();
        let (got, _) = logits(&router, Some(&remote));
        let diff = got
            .iter()
            .zip(&want_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff <= 1e-5,
            "{specs:?} {call_mode:?}: max |Δ logits| = {diff:e}"
        );
        assert_eq!(
            greedy(&router, Some(&remote)),
            want_tokens,
            "{specs:?} {call_mode:?}"
        );
    }
}

#[test]
fn shared_experts_on_the_workers_give_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    tiny_f32(dir.path());
    let local = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
    let (want_logits, _) = logits(&local, None);
    let router = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    let specs = ["0-3", "4-9", "10-15"];
    let with_shared = Sandbox::start_with(dir.path(), &specs, |w| {
        w.with_shared_experts(dir.path()).unwrap()
    });
    let options = DispatchOptions {
        wire_dtype: Dtype::F32,
        shared_on_workers: true,
        ..Default::default()
    };
    let remote =
        ExpertPool::connect_static(router.config(), &with_shared.addrs(), options.clone()).unwrap();
    let (got, _) = logits(&router, Some(&remote));
    let diff = got
        .iter()
        .zip(&want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff <= 1e-5, "max |Δ logits| = {diff:e}");
    assert_eq!(greedy(&router, Some(&remote)), greedy(&local, None));
    // Workers without the shared expert are refused up front, by name.
    let without = Sandbox::start(dir.path(), &specs);
    let err = ExpertPool::connect_static(router.config(), &without.addrs(), options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--with-shared-expert") && err.contains("layer 1"),
        "{err}"
    );
}

#[test]
fn a_token_crosses_the_wire_once_per_worker_per_layer() {
    let dir = tempfile::tempdir().unwrap();
    tiny_f32(dir.path());
    let router = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    let specs = ["0-7", "8-15"];
    let sandbox = Sandbox::start(dir.path(), &specs);
    let remote = ExpertPool::connect_static(
        router.config(),
        &sandbox.addrs(),
        DispatchOptions::default(),
    )
    .unwrap();
    let (_, routing) = logits(&router, Some(&remote));
    // Expected rows per worker: per layer, tokens with at least one expert on that worker.
    for (w, range) in [(0u32, 0..8u32), (1, 8..16)] {
        let expected: u64 = routing
            .iter()
            .map(|(_, r)| {
                (0..r.tokens())
                    .filter(|&t| r.token(t).any(|(e, _)| range.contains(&e)))
                    .count() as u64
            })
            .sum();
        let chosen: u64 = routing
            .iter()
            .map(|(_, r)| r.ids.iter().filter(|e| range.contains(e)).count() as u64)
            .sum();
        let label = WorkerLabel {
            worker: sandbox.addrs()[w as usize].clone(),
        };
        let sent = remote
            .options()
            .metrics
            .rows_sent
            .get_or_create(&label)
            .get();
        let served = sandbox.workers[w as usize]
            .worker
            .stats
            .rows
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(sent, expected, "worker {w}");
        assert_eq!(served, expected, "worker {w}");
        // Top-4 routing over two workers: some tokens pick several experts on one worker, so
        // deduplication saves rows.
        assert!(
            chosen > expected,
            "worker {w}: {chosen} pairs, {expected} rows"
        );
    }
}

#[test]
fn several_routers_share_one_worker_pool() {
    let dir = tempfile::tempdir().unwrap();
    tiny_f32(dir.path());
    let local = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
    let (want, _) = logits(&local, None);
    let sandbox = Sandbox::start(dir.path(), &["0-7", "8-15"]);
    let router = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    let options = DispatchOptions {
        wire_dtype: Dtype::F32,
        ..Default::default()
    };
    let a = ExpertPool::connect_static(router.config(), &sandbox.addrs(), options.clone()).unwrap();
    let b = ExpertPool::connect_static(router.config(), &sandbox.addrs(), options).unwrap();
    std::thread::scope(|s| {
        for remote in [&a, &b] {
            let (router, want) = (&router, &want);
            s.spawn(move || {
                for _ in 0..3 {
                    let (got, _) = logits(router, Some(remote));
                    let diff = got
                        .iter()
                        .zip(want)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0, f32::max);
                    assert!(diff <= 1e-5, "max |Δ logits| = {diff:e}");
                }
            });
        }
    });
    let calls = |w: usize| {
        sandbox.workers[w]
            .worker
            .stats
            .calls
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Two routers x three passes x two MoE layers, on each worker (every pass visits both).
    assert_eq!((calls(0), calls(1)), (12, 12));
}

#[test]
fn calls_to_a_lost_worker_fail_over_to_replicas() {
    let dir = tempfile::tempdir().unwrap();
    tiny_f32(dir.path());
    let local = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
    let (want, _) = logits(&local, None);
    let router = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    // Worker 0 holds everything; workers 1 and 2 hold half each: every expert has two copies,
    // which share its tokens.
    let mut sandbox = Sandbox::start(dir.path(), &["all", "0-7", "8-15"]);
    let options = DispatchOptions {
        wire_dtype: Dtype::F32,
        deadline: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let remote = ExpertPool::connect_static(router.config(), &sandbox.addrs(), options).unwrap();
    let (got, _) = logits(&router, Some(&remote));
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5));
    let addrs = sandbox.addrs();
    let rows = |w: usize| {
        let label = WorkerLabel {
            worker: addrs[w].clone(),
        };
        remote
            .options()
            .metrics
            .rows_sent
            .get_or_create(&label)
            .get()
    };
    let before = (rows(0), rows(1), rows(2));
    assert!(
        before.0 > 0 && before.1 > 0 && before.2 > 0,
        "replicas share the tokens: {before:?}"
    );
    sandbox.stop_worker(0);
    let (got, _) = logits(&router, Some(&remote));
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff <= 1e-5, "after failover: max |Δ| = {diff:e}");
    assert!(
        rows(1) > before.1 && rows(2) > before.2,
        "the replicas took over"
    );
}

/// The transformers-made Qwen3-MoE (softmax top-k, no renormalisation, a dense first layer) and
/// Mixtral (`block_sparse_moe`, w1/w2/w3, top 2 renormalised) parity checkpoints, served by a
/// router and two workers: the same logits as the single-process engine and transformers'
/// greedy ids.
#[test]
fn qwen3_moe_and_mixtral_through_router_and_workers_match_transformers() {
    struct Reference {
        prompt_ids: Vec<u32>,
        greedy_ids: Vec<u32>,
    }
    for (name, specs) in [
        ("qwen3_moe_softmax_topk", ["0-7", "8-15"]),
        ("mixtral_top2", ["0-3", "4-7"]),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/parity")
            .join(name);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let ids = |key: &str| -> Vec<u32> {
            json[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let r = Reference {
            prompt_ids: ids("prompt_ids"),
            greedy_ids: ids("greedy_ids"),
        };
        let local = CausalLm::load(&dir, &LoadOptions::default()).unwrap();
        let router = CausalLm::load(
            &dir,
            &LoadOptions {
                experts: ExpertSelection::None,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(router.routed_expert_bytes(), 0, "{name}");
        let sandbox = Sandbox::start(&dir, &specs);
        let remote = ExpertPool::connect_static(
            router.config(),
            &sandbox.addrs(),
            DispatchOptions {
                wire_dtype: Dtype::F32,
                ..Default::default()
            },
        )
        .unwrap();
        let run = |model: &CausalLm, experts: Option<&ExpertPool>| {
            let mut cache = model.new_cache(r.prompt_ids.len());
            let mut seqs = [SeqInput {
                tokens: &r.prompt_ids,
                cache: &mut cache,
            }];
            let opts = ForwardOptions {
                logits: LogitsFor::All,
                ..Default::default()
            };
            match experts {
                Some(e) => model.forward_with(&mut seqs, &opts, &e.step().unwrap()),
                None => model.forward(&mut seqs, &opts),
            }
            .unwrap()
            .logits
            .into_f32_vec()
        };
        let want = run(&local, None);
        let got = run(&router, Some(&remote));
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 1e-5, "{name}: max |Δ logits| = {diff:e}");
        let req = GenerateRequest {
            prompt: r.prompt_ids.clone(),
            max_new_tokens: r.greedy_ids.len(),
            ignore_eos: true,
            ..Default::default()
        };
        let out = generate::generate_with(
            &router,
            std::slice::from_ref(&req),
            GenerateOptions::default(),
            &remote.step().unwrap(),
        )
        .unwrap();
        assert_eq!(out[0].token_ids, r.greedy_ids, "{name}");
    }
}
