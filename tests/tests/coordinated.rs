//! A cluster run by the coordinator: workers register and load what placement gives them, the
//! router's expert pool follows the live placement, a lost worker's experts move to the
//! survivors, and broken placement watches heal.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_engine::ModelConfig;
use switchyard_engine::model::{CausalLm, ExpertExecutor, ExpertSelection, LoadOptions};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_proto::v1::Dtype;
use switchyard_router::ExpertPool;
use switchyard_router::experts::DispatchOptions;
use switchyard_tests::Cluster;

const PROMPT: &[u32] = &[1, 17, 42, 99, 3, 250, 7];

fn logits(model: &CausalLm, experts: &dyn ExpertExecutor) -> Vec<f32> {
    switchyard_tests::prompt_logits(model, experts, PROMPT)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

struct Setup {
    _dir: tempfile::TempDir,
    config: ModelConfig,
    router: CausalLm,
    want: Vec<f32>,
    cluster: Cluster,
}

fn setup(workers: usize) -> Setup {
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
    let router = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    let cluster = Cluster::start(dir.path(), 1, Duration::from_millis(1000), workers);
    Setup {
        _dir: dir,
        config,
        router,
        want,
        cluster,
    }
}

fn follow(s: &Setup) -> Arc<ExpertPool> {
    let options = DispatchOptions {
        wire_dtype: Dtype::F32,
        ..Default::default()
    };
    ExpertPool::coordinated(
        &s.config,
        s.cluster.coordinator_addr(),
        options,
        Duration::from_secs(20),
    )
    .unwrap()
}

/// Waits (bounded) until `pool` dispatches with the coordinator's live version.
fn wait_caught_up(s: &Setup, pool: &ExpertPool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live = s.cluster.placement().live.map(|l| l.version);
        if live == Some(pool.version()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the router is on {} and the live version is {live:?}",
            pool.version()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn held(s: &Setup, i: usize) -> usize {
    s.cluster.workers[i]
        .worker
        .holding()
        .values()
        .map(|e| e.len())
        .sum()
}

#[test]
fn router_follows_the_coordinator_through_a_worker_loss_and_a_coordinator_restart() {
    let mut s = setup(2);
    let pool = follow(&s);
    // Wait until placement has spread the experts over both workers and that is live.
    s.cluster.wait_settled(1, Duration::from_secs(20));
    wait_caught_up(&s, &pool, "first placement");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(held(&s, 0) == 16 && held(&s, 1) == 16) {
        assert!(
            Instant::now() < deadline,
            "placement did not settle: {} / {}",
            held(&s, 0),
            held(&s, 1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = pool.version();
    let route = pool.route().unwrap();
    assert_eq!(route.links.len(), 2);
    // The pool's ids are the coordinator's.
    let ids: Vec<u32> = s
        .cluster
        .placement()
        .live
        .unwrap()
        .workers
        .iter()
        .map(|w| w.worker_id)
        .collect();
    assert_eq!(route.links.keys().map(|w| w.0).collect::<Vec<_>>(), ids);
    let diff = max_diff(&logits(&s.router, &pool.step().unwrap()), &s.want);
    assert!(diff <= 1e-5, "before the loss: max |Δ| = {diff:e}");

    // Lose one worker.
    s.cluster.kill_worker(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.version() == first || pool.route().unwrap().links.len() != 1 {
        assert!(
            Instant::now() < deadline,
            "no new live placement within 20 s of losing a worker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The survivor holds every expert of every MoE layer, and the router uses only it.
    s.cluster.wait_settled(1, Duration::from_secs(20));
    assert_eq!(held(&s, 0), 2 * 16);
    let diff = max_diff(&logits(&s.router, &pool.step().unwrap()), &s.want);
    assert!(diff <= 1e-5, "after the loss: max |Δ| = {diff:e}");

    // Restart the coordinator on the same address. Meanwhile the router keeps serving on its
    // last placement; afterwards the worker re-registers with its old id and a new version
    // goes live.
    let before_id = s.cluster.workers[0].agent.worker_id();
    s.cluster.restart_coordinator();
    let during = pool.version();
    let diff = max_diff(&logits(&s.router, &pool.step().unwrap()), &s.want);
    assert!(
        diff <= 1e-5,
        "with the coordinator restarting: max |Δ| = {diff:e}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.version() == during {
        assert!(
            Instant::now() < deadline,
            "no live placement from the restarted coordinator within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        s.cluster.workers[0].agent.worker_id(),
        before_id,
        "the id survived"
    );
    let diff = max_diff(&logits(&s.router, &pool.step().unwrap()), &s.want);
    assert!(
        diff <= 1e-5,
        "after the coordinator restart: max |Δ| = {diff:e}"
    );
}

#[test]
fn dropped_placement_watches_reconnect_and_new_versions_still_go_live() {
    let mut s = setup(2);
    let pool = follow(&s);
    s.cluster.wait_settled(1, Duration::from_secs(20));
    wait_caught_up(&s, &pool, "first placement");
    // Every watch — both workers' and the router's — ends as on a broken connection.
    s.cluster.coordinator().drop_watchers();
    std::thread::sleep(Duration::from_millis(300));
    // A joining worker takes a share from both: the new version goes live only once both old
    // workers, too, have seen it on their reconnected watches and loaded it.
    let before = pool.version();
    s.cluster.add_worker();
    s.cluster.wait_for(
        "a version with the new worker",
        Duration::from_secs(20),
        |u| {
            u.live.as_ref().is_some_and(|l| l.version > before)
                && u.live.as_ref().map(|l| l.workers.len()) == Some(3)
        },
    );
    s.cluster.wait_settled(1, Duration::from_secs(20));
    wait_caught_up(&s, &pool, "after the watches dropped");
    assert!(pool.version() > before);
    assert_eq!(pool.route().unwrap().links.len(), 3);
    for i in 0..3 {
        assert!(held(&s, i) > 0, "worker {i} holds nothing");
    }
    let diff = max_diff(&logits(&s.router, &pool.step().unwrap()), &s.want);
    assert!(
        diff <= 1e-5,
        "after the watches dropped: max |Δ| = {diff:e}"
    );
}

#[test]
fn a_worker_that_cannot_load_its_experts_is_placed_on_nothing() {
    let mut s = setup(1);
    let pool = follow(&s);
    s.cluster.wait_settled(1, Duration::from_secs(20));
    // A checkpoint of the same model whose tensors are gone: it opens, but no expert loads.
    let broken = tempfile::tempdir().unwrap();
    std::fs::copy(
        s._dir.path().join("config.json"),
        broken.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        broken.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"model.norm.weight": "gone.safetensors"}}"#,
    )
    .unwrap();
    let b = s.cluster.add_worker_from(broken.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        let status = s.cluster.status();
        if let Some(w) = status.workers.iter().find(|w| !w.load_error.is_empty()) {
            break w.load_error.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the failed load was never reported: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(error.contains("cannot load placement version"), "{error}");
    // Its experts go back to the healthy worker, which serves them all.
    s.cluster.wait_settled(1, Duration::from_secs(20));
    wait_caught_up(&s, &pool, "after the failed load");
    let live = s.cluster.placement().live.unwrap();
    assert_eq!(live.workers.len(), 1, "{live:?}");
    assert_eq!(
        s.cluster.status().workers.len(),
        2,
        "the broken worker stays a member"
    );
    assert!(held(&s, b) == 0);
    let diff = max_diff(&logits(&s.router, &pool.step().unwrap()), &s.want);
    assert!(diff <= 1e-5, "after the failed load: max |Δ| = {diff:e}");
}

#[test]
fn a_router_that_cannot_switch_retries_says_why_and_switches_once_it_can() {
    let mut s = setup(1);
    // Shared experts on the workers, but the only worker lacks them: no switch can succeed.
    let options = DispatchOptions {
        wire_dtype: Dtype::F32,
        shared_on_workers: true,
        ..Default::default()
    };
    let pool = ExpertPool::new(
        &s.config,
        Arc::new(switchyard_router::experts::GrpcTransport::new(
            options.max_message_bytes,
            options.call_mode,
            options.links.clone(),
        )),
        options,
        switchyard_router::experts::Labels::WorkerId,
    )
    .unwrap();
    switchyard_router::experts::follow::start(&pool, s.cluster.coordinator_addr(), "r-test");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.options().metrics.placement_switch_failures.get() < 2 {
        assert!(Instant::now() < deadline, "no retried switch within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let why = pool.switch_error().unwrap();
    assert!(why.contains("--with-shared-expert"), "{why}");
    assert!(pool.ready().is_err(), "no placement yet");
    // A worker that has them joins and the other dies: the retried switch goes through.
    s.cluster.add_shared_worker();
    s.cluster.kill_worker(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.route().is_none() {
        assert!(
            Instant::now() < deadline,
            "never switched: {:?}",
            pool.switch_error()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pool.switch_error(), None);
    let diff = max_diff(&logits(&s.router, &pool.step().unwrap()), &s.want);
    assert!(diff <= 1e-5, "max |Δ| = {diff:e}");
}
