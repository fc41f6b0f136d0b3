//! A cluster run by the coordinator: workers register and load what placement gives them, the
//! router follows the live placement, and a lost worker's experts move to the survivors.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_coordinator::capacity::{self, WeightDType};
use switchyard_coordinator::membership::ModelShape;
use switchyard_coordinator::service::{self as coordinator, CoordinatorNode};
use switchyard_engine::ModelConfig;
use switchyard_engine::model::{
    CausalLm, ExpertSelection, ForwardOptions, LoadOptions, LogitsFor, SeqInput,
};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_expert_worker::agent::{self, Membership};
use switchyard_expert_worker::{ExpertWorker, service as worker_service};
use switchyard_proto::v1::Dtype;
use switchyard_router::coordinated::CoordinatedExperts;
use switchyard_router::dispatch::DispatchOptions;
use tokio::sync::oneshot;

const PROMPT: &[u32] = &[1, 17, 42, 99, 3, 250, 7];

fn logits(model: &CausalLm, experts: &dyn switchyard_engine::model::ExpertExecutor) -> Vec<f32> {
    let mut cache = model.new_cache(PROMPT.len());
    model
        .forward_with(
            &mut [SeqInput {
                tokens: PROMPT,
                cache: &mut cache,
            }],
            &ForwardOptions {
                logits: LogitsFor::All,
                ..Default::default()
            },
            experts,
        )
        .unwrap()
        .logits
        .into_f32_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

struct Node {
    shutdown: Option<oneshot::Sender<()>>,
    agent: Option<tokio::task::JoinHandle<()>>,
    worker: Arc<ExpertWorker>,
}

impl Node {
    fn stop(&mut self) {
        if let Some(a) = self.agent.take() {
            a.abort();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[test]
fn router_follows_the_coordinator_through_a_worker_loss_and_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    synth::synth(
        dir.path(),
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::F32,
            seed: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let config = ModelConfig::from_dir(dir.path()).unwrap();
    let local = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
    let want = logits(&local, &local);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shape = ModelShape {
        identity: config.identity(),
        layers: config.moe_layers().iter().map(|&l| l as u32).collect(),
        experts_per_layer: 16,
        expert_bytes: capacity::expert_bytes(&config, WeightDType::F32),
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let coordinator_addr = listener.local_addr().unwrap().to_string();
    let (stop_coordinator, rx) = oneshot::channel::<()>();
    rt.spawn(coordinator::serve(
        CoordinatorNode::new(shape.clone(), 1, Duration::from_millis(1000)),
        listener,
        async {
            let _ = rx.await;
        },
    ));

    let mut nodes: Vec<Node> = (0..2)
        .map(|_| {
            let worker = Arc::new(ExpertWorker::empty(dir.path()).unwrap());
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let (tx, rx) = oneshot::channel::<()>();
            rt.spawn(worker_service::serve(worker.clone(), listener, async {
                let _ = rx.await;
            }));
            let membership = Membership {
                coordinator: coordinator_addr.clone(),
                advertise: addr,
                memory_bytes: 1 << 40,
                device: "cpu".into(),
                model: config.identity(),
            };
            let agent = rt.spawn(agent::run(worker.clone(), membership));
            Node {
                shutdown: Some(tx),
                agent: Some(agent),
                worker,
            }
        })
        .collect();

    let options = DispatchOptions {
        wire_dtype: Dtype::F32,
        ..Default::default()
    };
    let experts =
        CoordinatedExperts::connect(&config, &coordinator_addr, options, Duration::from_secs(20))
            .unwrap();
    let router = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
        },
    )
    .unwrap();
    // Wait until placement has spread the experts over both workers and that is live.
    let held = |n: &Node| {
        n.worker
            .info()
            .layers
            .iter()
            .map(|l| l.experts.len())
            .sum::<usize>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(held(&nodes[0]) == 16
        && held(&nodes[1]) == 16
        && experts.snapshot().workers().len() == 2)
    {
        assert!(
            Instant::now() < deadline,
            "placement did not settle: {} / {}",
            held(&nodes[0]),
            held(&nodes[1])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = experts.version();
    let diff = max_diff(&logits(&router, &*experts.snapshot()), &want);
    assert!(diff <= 1e-5, "before the loss: max |Δ| = {diff:e}");

    // Lose one worker.
    nodes[1].stop();
    let deadline = Instant::now() + Duration::from_secs(20);
    while experts.version() == first || experts.snapshot().workers().len() != 1 {
        assert!(
            Instant::now() < deadline,
            "no new live placement within 20 s of losing a worker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The survivor holds every expert of every MoE layer, and the router uses only it.
    assert_eq!(held(&nodes[0]), 2 * 16);
    let diff = max_diff(&logits(&router, &*experts.snapshot()), &want);
    assert!(diff <= 1e-5, "after the loss: max |Δ| = {diff:e}");

    // Restart the coordinator on the same address. Meanwhile the router keeps serving on its
    // last placement; afterwards the worker re-registers and a new version goes live.
    let _ = stop_coordinator.send(());
    std::thread::sleep(Duration::from_millis(200));
    let during = experts.version();
    let diff = max_diff(&logits(&router, &*experts.snapshot()), &want);
    assert!(
        diff <= 1e-5,
        "with the coordinator down: max |Δ| = {diff:e}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let listener = loop {
        match rt.block_on(tokio::net::TcpListener::bind(&coordinator_addr)) {
            Ok(l) => break l,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot rebind {coordinator_addr}: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let (stop_coordinator, rx) = oneshot::channel::<()>();
    rt.spawn(coordinator::serve(
        CoordinatorNode::new(shape.clone(), 1, Duration::from_millis(1000)),
        listener,
        async {
            let _ = rx.await;
        },
    ));
    while experts.version() == during {
        assert!(
            Instant::now() < deadline,
            "no live placement from the restarted coordinator within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let diff = max_diff(&logits(&router, &*experts.snapshot()), &want);
    assert!(
        diff <= 1e-5,
        "after the coordinator restart: max |Δ| = {diff:e}"
    );

    for n in &mut nodes {
        n.stop();
    }
    let _ = stop_coordinator.send(());
    drop(experts);
    rt.shutdown_timeout(Duration::from_secs(5));
}
