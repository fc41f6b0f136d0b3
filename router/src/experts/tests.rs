//! The pool without sockets: real expert workers behind the memory transport, faults
//! injected, placement versions switched while steps run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchyard_engine::model::{
    CausalLm, ExpertExecutor, ExpertSelection, ForwardOptions, LoadOptions, LogitsFor, SeqInput,
};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_engine::{ModelConfig, Tensor};
use switchyard_expert_worker::{ExpertSpec, ExpertWorker};
use switchyard_proto::WorkerId;
use switchyard_proto::v1::{
    self, Dtype, ExpertHolders, ForwardRequest, InfoResponse, LayerPlacement, PlacementMap,
    WorkerAddress,
};

use super::transport::{Fault, LocalWorker};
use super::{DispatchOptions, ExpertPool, Labels, MemoryTransport};
use crate::error::RouterError;
use crate::metrics::{ReasonLabel, WorkerLabel};

impl LocalWorker for ExpertWorker {
    fn forward(&self, request: &ForwardRequest) -> Result<v1::Tensor, tonic::Status> {
        ExpertWorker::forward(self, request).map_err(tonic::Status::from)
    }

    fn info(&self) -> InfoResponse {
        ExpertWorker::info(self)
    }
}

const PROMPT: &[u32] = &[1, 17, 42, 99, 3, 250, 7, 8];

struct Fixture {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    config: ModelConfig,
    router: CausalLm,
    want: Vec<f32>,
    net: MemoryTransport,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    synth::synth(
        dir.path(),
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::F32,
            seed: 11,
            ..Default::default()
        },
    )
    .unwrap();
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
    Fixture {
        config: local.config().clone(),
        dir: dir.path().to_path_buf(),
        _dir: dir,
        router,
        want,
        net: MemoryTransport::new(),
    }
}

impl Fixture {
    /// A worker holding `spec` at `addr` on the memory network.
    fn serve(&self, addr: &str, spec: &str) -> Arc<ExpertWorker> {
        let spec: ExpertSpec = spec.parse().unwrap();
        let w = Arc::new(ExpertWorker::load(&self.dir, &spec).unwrap());
        self.net.serve(addr, w.clone());
        w
    }

    fn options(&self) -> DispatchOptions {
        DispatchOptions {
            wire_dtype: Dtype::F32,
            deadline: Duration::from_millis(500),
            ..Default::default()
        }
    }

    fn coordinated(&self) -> Arc<ExpertPool> {
        ExpertPool::new(
            &self.config,
            Arc::new(self.net.clone()),
            self.options(),
            Labels::WorkerId,
        )
        .unwrap()
    }

    fn check(&self, pool: &ExpertPool) -> Result<(), RouterError> {
        let step = pool.step()?;
        let got = try_logits(&self.router, &step)?;
        let diff = max_diff(&got, &self.want);
        assert!(diff <= 1e-5, "max |Δ| = {diff:e}");
        Ok(())
    }
}

fn try_logits(model: &CausalLm, experts: &dyn ExpertExecutor) -> Result<Vec<f32>, RouterError> {
    let mut cache = model.new_cache(PROMPT.len());
    let out = model
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
        .map_err(|e| match e {
            switchyard_engine::EngineError::Executor(e) => match e.downcast::<RouterError>() {
                Ok(e) => *e,
                Err(e) => RouterError::Runtime(e.to_string()),
            },
            e => RouterError::Engine(e),
        })?;
    Ok(out.logits.into_f32_vec())
}

fn logits(model: &CausalLm, experts: &dyn ExpertExecutor) -> Vec<f32> {
    try_logits(model, experts).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A placement map over the tiny model's two MoE layers (1, 2) and 16 experts: `holders(e)`
/// gives expert `e`'s workers, `addrs` every worker's address.
fn map(version: u64, addrs: &[(u32, &str)], holders: impl Fn(u32) -> Vec<u32>) -> PlacementMap {
    PlacementMap {
        version,
        workers: addrs
            .iter()
            .map(|&(id, addr)| WorkerAddress {
                worker_id: id,
                address: addr.into(),
            })
            .collect(),
        layers: [1, 2]
            .iter()
            .map(|&layer| LayerPlacement {
                layer,
                experts: (0..16)
                    .map(|e| ExpertHolders {
                        worker_ids: holders(e),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn block_on<T>(pool: &ExpertPool, fut: impl std::future::Future<Output = T> + Send + 'static) -> T
where
    T: Send + 'static,
{
    super::wait_on(&pool.handle(), fut).unwrap()
}

fn switch(pool: &Arc<ExpertPool>, m: PlacementMap) -> Result<bool, RouterError> {
    let p = pool.clone();
    block_on(pool, async move { p.switch(&m).await })
}

#[test]
fn a_new_version_connects_only_new_workers_and_drops_only_gone_ones() {
    let f = fixture();
    f.serve("a", "0-7");
    f.serve("b", "8-15");
    f.serve("c", "all");
    let pool = f.coordinated();
    assert!(pool.step().is_err(), "no route before the first placement");
    assert!(pool.ready().is_err());
    let v1 = map(10, &[(3, "a"), (5, "b")], |e| {
        vec![if e < 8 { 3 } else { 5 }]
    });
    assert!(switch(&pool, v1.clone()).unwrap());
    f.check(&pool).unwrap();
    let first = pool.route().unwrap();
    assert_eq!(
        first.links.keys().copied().collect::<Vec<_>>(),
        [WorkerId(3), WorkerId(5)]
    );
    // An old or equal version changes nothing.
    assert!(!switch(&pool, v1).unwrap());
    // v2: worker 5 goes, worker 7 (at c) comes, worker 3 stays — with the very same link.
    let v2 = map(11, &[(3, "a"), (7, "c")], |e| {
        if e < 8 { vec![3, 7] } else { vec![7] }
    });
    assert!(switch(&pool, v2).unwrap());
    let second = pool.route().unwrap();
    assert_eq!(
        second.links.keys().copied().collect::<Vec<_>>(),
        [WorkerId(3), WorkerId(7)]
    );
    assert!(Arc::ptr_eq(
        &first.links[&WorkerId(3)],
        &second.links[&WorkerId(3)]
    ));
    assert_eq!(pool.version(), 11);
    f.check(&pool).unwrap();
    // A map naming a worker at a new address gets a new link for it.
    let v3 = map(12, &[(3, "c"), (7, "c")], |e| {
        if e < 8 { vec![3] } else { vec![7] }
    });
    assert!(switch(&pool, v3).unwrap());
    assert_eq!(pool.route().unwrap().links[&WorkerId(3)].addr(), "c");
    let m = &pool.options().metrics;
    assert_eq!(m.placement_version.get(), 12);
    assert_eq!(m.placement_switches.get(), 3);
}

#[test]
fn a_map_that_misses_experts_is_refused_and_the_old_route_stays() {
    let f = fixture();
    f.serve("a", "all");
    let pool = f.coordinated();
    switch(&pool, map(1, &[(0, "a")], |_| vec![0])).unwrap();
    let err = switch(
        &pool,
        map(2, &[(0, "a")], |e| if e == 3 { vec![] } else { vec![0] }),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("1:3") && err.contains("2 routed experts"),
        "{err}"
    );
    assert_eq!(pool.version(), 1);
    f.check(&pool).unwrap();
}

#[test]
fn calls_to_a_lost_worker_go_to_replicas_and_are_counted() {
    let f = fixture();
    f.serve("a", "all");
    f.serve("b", "all");
    let pool = f.coordinated();
    switch(&pool, map(1, &[(0, "a"), (1, "b")], |_| vec![0, 1])).unwrap();
    f.check(&pool).unwrap();
    let b_before = f.net.calls("b");
    assert!(
        f.net.calls("a") > 0 && b_before > 0,
        "replicas share an expert's tokens"
    );
    f.net.stop("a");
    f.check(&pool).unwrap();
    assert!(f.net.calls("b") > b_before);
    let m = &pool.options().metrics;
    let lost = m
        .retried_calls
        .get_or_create(&ReasonLabel {
            reason: "worker_lost",
        })
        .get();
    let failed = m
        .failed_calls
        .get_or_create(&WorkerLabel { worker: "0".into() })
        .get();
    assert!(
        lost > 0 && lost == failed,
        "{lost} retried, {failed} failed"
    );
}

#[test]
fn a_hung_worker_costs_one_deadline_then_its_replica_answers() {
    let f = fixture();
    f.serve("a", "all");
    f.serve("b", "all");
    let pool = f.coordinated();
    switch(&pool, map(1, &[(0, "a"), (1, "b")], |_| vec![0, 1])).unwrap();
    f.net.set_fault("a", Some(Fault::Hang));
    let start = Instant::now();
    f.check(&pool).unwrap();
    // Two MoE layers, each waiting one 500 ms deadline for the hung worker.
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn with_no_replica_the_error_names_the_worker_and_keeps_its_code() {
    let f = fixture();
    f.serve("a", "0-7");
    f.serve("b", "8-15");
    let pool = f.coordinated();
    switch(
        &pool,
        map(1, &[(0, "a"), (1, "b")], |e| vec![u32::from(e >= 8)]),
    )
    .unwrap();
    f.net.set_fault("b", Some(Fault::Hang));
    let err = f.check(&pool).unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert_eq!(err.http_status(), 504);
    assert!(err.to_string().contains("w1 (b)"), "{err}");
    f.net.set_fault("b", None);
    f.net.stop("b");
    let err = f.check(&pool).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert_eq!(err.http_status(), 503);
    // A malformed call is not retried elsewhere: it would fail anywhere.
    f.net
        .set_fault("a", Some(Fault::Fail(tonic::Code::InvalidArgument)));
    let calls_b = f.net.calls("b");
    assert!(f.check(&pool).is_err());
    assert_eq!(
        f.net.calls("b"),
        calls_b + 1,
        "b got its own call, no retry"
    );
}

#[test]
fn a_call_that_finds_its_expert_moved_is_re_planned_on_the_newest_version() {
    let f = fixture();
    let a = f.serve("a", "all");
    f.serve("b", "all");
    let pool = f.coordinated();
    switch(&pool, map(1, &[(0, "a")], |_| vec![0])).unwrap();
    // A step begins on version 1; meanwhile version 2 moves experts 8-15 to b and a drops
    // them (as it may once no router reports version 1 — here, too early, on purpose).
    let step = pool.step().unwrap();
    switch(
        &pool,
        map(2, &[(0, "a"), (1, "b")], |e| vec![u32::from(e >= 8)]),
    )
    .unwrap();
    a.apply(
        &[1usize, 2]
            .into_iter()
            .map(|l| (l, (0..8).collect()))
            .collect::<BTreeMap<_, _>>(),
    )
    .unwrap();
    let got = logits(&f.router, &step);
    assert!(max_diff(&got, &f.want) <= 1e-5);
    let moved = pool
        .options()
        .metrics
        .retried_calls
        .get_or_create(&ReasonLabel {
            reason: "expert_moved",
        })
        .get();
    assert!(moved > 0);
}

#[test]
fn steps_keep_running_while_versions_switch_under_them() {
    let f = fixture();
    f.serve("a", "all");
    f.serve("b", "all");
    f.serve("c", "all");
    let pool = f.coordinated();
    switch(&pool, map(1, &[(0, "a")], |_| vec![0])).unwrap();
    let stop = AtomicBool::new(false);
    let steps = AtomicUsize::new(0);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..4 {
            let done = done_tx.clone();
            let (f, pool, stop, steps) = (&f, &pool, &stop, &steps);
            s.spawn(move || {
                let mut result = Ok(());
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = f.check(pool) {
                        result = Err(e.to_string());
                        break;
                    }
                    steps.fetch_add(1, Ordering::Relaxed);
                }
                let _ = done.send(result);
            });
        }
        // Placements rotate over three workers, each version naming two of them.
        let names = ["a", "b", "c"];
        let mut version = 1;
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            version += 1;
            let (x, y) = ((version % 3) as u32, ((version + 1) % 3) as u32);
            let addrs = [(x, names[x as usize]), (y, names[y as usize])];
            switch(
                &pool,
                map(version, &addrs, |e| vec![if e % 2 == 0 { x } else { y }]),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        // Bounded: a deadlock fails here instead of hanging.
        for _ in 0..4 {
            done_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("a stepping thread is stuck")
                .unwrap();
        }
        assert!(version > 20, "only {version} versions in 2 s");
    });
    assert!(steps.load(Ordering::Relaxed) >= 4);
}

#[test]
fn static_workers_are_labelled_by_address_and_checked_against_the_model() {
    let f = fixture();
    f.serve("10.0.0.1:1", "0-7");
    f.serve("10.0.0.2:1", "8-15");
    let addrs = vec!["10.0.0.1:1".to_string(), "10.0.0.2:1".to_string()];
    let pool =
        ExpertPool::from_workers(&f.config, Arc::new(f.net.clone()), &addrs, f.options()).unwrap();
    f.check(&pool).unwrap();
    let step = pool.step().unwrap();
    assert_eq!(step.label(WorkerId(1)), "10.0.0.2:1");
    let rows = pool
        .options()
        .metrics
        .rows_sent
        .get_or_create(&WorkerLabel {
            worker: "10.0.0.1:1".into(),
        })
        .get();
    assert!(rows > 0);
    // Missing an expert: refused at start-up, naming it.
    let err =
        ExpertPool::from_workers(&f.config, Arc::new(f.net.clone()), &addrs[..1], f.options())
            .unwrap_err()
            .to_string();
    assert!(err.contains("1:8"), "{err}");
    // Shared experts on the workers, which lack them: refused, naming the flag.
    let options = DispatchOptions {
        shared_on_workers: true,
        ..f.options()
    };
    let err = ExpertPool::from_workers(&f.config, Arc::new(f.net.clone()), &addrs, options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--with-shared-expert"), "{err}");
}

#[test]
fn rows_of_a_layer_are_summed_from_every_worker_once() {
    // One layer dispatched directly: the pool's sum equals the workers' combined rows.
    let f = fixture();
    let a = f.serve("a", "0-7");
    let b = f.serve("b", "8-15");
    let pool = f.coordinated();
    switch(
        &pool,
        map(1, &[(0, "a"), (1, "b")], |e| vec![u32::from(e >= 8)]),
    )
    .unwrap();
    let hidden = f.config.hidden_size;
    let x: Vec<f32> = (0..2 * hidden)
        .map(|i| (i % 7) as f32 / 7.0 - 0.4)
        .collect();
    let routing = switchyard_engine::model::Routing {
        k: 2,
        ids: vec![1, 9, 2, 3],
        weights: vec![0.5, 0.5, 0.25, 0.75],
    };
    let step = pool.step().unwrap();
    let out = step
        .run(
            1,
            &Tensor::from_f32(&[2, hidden], x.clone()).unwrap(),
            &routing,
        )
        .unwrap();
    let call = |w: &ExpertWorker, rows: &[usize], ids: Vec<u32>, weights: Vec<f32>, offsets| {
        let data: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * hidden..(r + 1) * hidden].to_vec())
            .collect();
        let reply = w
            .forward(&ForwardRequest {
                layer: 1,
                hidden: Some(switchyard_proto::codec::encode(
                    &data,
                    &[rows.len(), hidden],
                    Dtype::F32,
                )),
                offsets,
                expert_ids: ids,
                weights,
                reply_dtype: Dtype::F32 as i32,
                ..Default::default()
            })
            .unwrap();
        switchyard_proto::codec::decode("o", &reply, 1 << 30).unwrap()
    };
    let from_a = call(
        &a,
        &[0, 1],
        vec![1, 2, 3],
        vec![0.5, 0.25, 0.75],
        vec![0, 1, 3],
    );
    let from_b = call(&b, &[0], vec![9], vec![0.5], vec![0, 1]);
    let got = out.as_f32().unwrap();
    for j in 0..hidden {
        assert_eq!(got[j], from_a[j] + from_b[j]);
        assert_eq!(got[hidden + j], from_a[hidden + j]);
    }
}

#[test]
fn micro_batched_steps_through_the_pool_equal_the_unsplit_step() {
    let f = fixture();
    f.serve("a", "0-7");
    f.serve("b", "8-15");
    let pool = f.coordinated();
    switch(
        &pool,
        map(1, &[(0, "a"), (1, "b")], |e| vec![u32::from(e >= 8)]),
    )
    .unwrap();
    let prompts: [&[u32]; 4] = [&PROMPT[..5], &PROMPT[..2], PROMPT, &PROMPT[1..4]];
    let run = |k: usize| {
        let mut caches: Vec<_> = prompts
            .iter()
            .map(|p| f.router.new_cache(p.len()))
            .collect();
        let mut seqs: Vec<SeqInput<'_>> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, cache)| SeqInput { tokens: p, cache })
            .collect();
        let step = pool.step().unwrap();
        f.router
            .forward_with(
                &mut seqs,
                &ForwardOptions {
                    logits: LogitsFor::All,
                    micro_batches: k,
                    ..Default::default()
                },
                &step,
            )
            .unwrap()
            .logits
            .into_f32_vec()
    };
    let one = run(1);
    for k in [2, 3, 4] {
        let diff = max_diff(&one, &run(k));
        assert!(diff <= 1e-5, "{k} micro-batches: max |Δ| = {diff:e}");
    }
}

/// A pool whose calls may wait up to 10 s, hedged after 3 × p99 (at least 10 ms), with
/// deadlines adapting down to `deadline_min`: so a test can tell a hedge from an adapted
/// deadline, and either from the fixed one.
fn tail_pool(f: &Fixture, deadline_min: Duration) -> Arc<ExpertPool> {
    ExpertPool::new(
        &f.config,
        Arc::new(f.net.clone()),
        DispatchOptions {
            deadline: Duration::from_secs(10),
            tail: super::tail::TailOptions {
                hedge_min: Duration::from_millis(10),
                deadline_min,
                ..Default::default()
            },
            ..f.options()
        },
        Labels::WorkerId,
    )
    .unwrap()
}

/// Workers `a` and `b` each holding every expert, behind a warm [`tail_pool`] whose
/// adaptive deadline cannot fall below 2 s.
fn replicated_and_warm() -> (Fixture, Arc<ExpertPool>) {
    let f = fixture();
    f.serve("a", "all");
    f.serve("b", "all");
    let pool = tail_pool(&f, Duration::from_secs(2));
    switch(&pool, map(1, &[(0, "a"), (1, "b")], |_| vec![0, 1])).unwrap();
    warm_up(&f, &pool);
    (f, pool)
}

/// Steps until every size class the calls use has a p99 (bounded).
fn warm_up(f: &Fixture, pool: &ExpertPool) {
    for _ in 0..3 * super::tail::MIN_SAMPLES {
        f.check(pool).unwrap();
    }
}

fn hedges(pool: &ExpertPool, outcome: &'static str) -> u64 {
    pool.options()
        .metrics
        .hedges
        .get_or_create(&crate::metrics::OutcomeLabel { outcome })
        .get()
}

/// Waits (bounded) until `pool` holds no suspect worker.
fn wait_unsuspected(pool: &ExpertPool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !pool.suspect_workers().is_empty() {
        assert!(
            Instant::now() < until,
            "still suspect: {:?}",
            pool.suspect_workers()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stalled_worker_is_hedged_to_its_replica_not_waited_for() {
    let (f, pool) = replicated_and_warm();
    assert_eq!(hedges(&pool, "won"), 0, "no hedge while calls are quick");
    f.net.set_fault("a", Some(Fault::Hang));
    let start = Instant::now();
    f.check(&pool).unwrap();
    let took = start.elapsed();
    // The fixed deadline is 10 s and the adaptive floor 2 s: the hedge answered first.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(hedges(&pool, "won") >= 1);
    assert_eq!(pool.suspect_workers(), [WorkerId(0)].into());
    // While suspect, its calls go to the replica at once: no hedge, no wait.
    let won = hedges(&pool, "won");
    let a_calls = f.net.calls("a");
    for _ in 0..5 {
        f.check(&pool).unwrap();
    }
    assert_eq!((hedges(&pool, "won"), f.net.calls("a")), (won, a_calls));
    // Once it answers a probe, it takes calls again.
    f.net.set_fault("a", None);
    wait_unsuspected(&pool);
    f.check(&pool).unwrap();
    assert!(f.net.calls("a") > a_calls);
}

#[test]
fn a_slow_original_that_answers_after_its_hedge_is_not_added_twice() {
    let (f, pool) = replicated_and_warm();
    // Slow, not stopped: the original answers too, after its hedge did.
    f.net
        .set_fault("a", Some(Fault::Delay(Duration::from_millis(150))));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..3 {
            let done = done_tx.clone();
            let (f, pool) = (&f, &pool);
            s.spawn(move || {
                let mut result = Ok(());
                for _ in 0..4 {
                    // Exact logits: a reply added twice would show.
                    if let Err(e) = f.check(pool) {
                        result = Err(e.to_string());
                        break;
                    }
                    // Keep `a` in play: the probe answers (slowly), and a may be hedged again.
                    wait_unsuspected(pool);
                }
                let _ = done.send(result);
            });
        }
        for _ in 0..3 {
            done_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a stepping thread is stuck")
                .unwrap();
        }
    });
    assert!(hedges(&pool, "won") >= 1, "the delayed worker was hedged");
}

#[test]
fn with_no_replica_a_stalled_worker_fails_at_the_adaptive_deadline() {
    let f = fixture();
    f.serve("a", "0-7");
    f.serve("b", "8-15");
    let pool = tail_pool(&f, Duration::from_millis(300));
    switch(
        &pool,
        map(1, &[(0, "a"), (1, "b")], |e| vec![u32::from(e >= 8)]),
    )
    .unwrap();
    warm_up(&f, &pool);
    f.net.set_fault("b", Some(Fault::Hang));
    let start = Instant::now();
    let err = f.check(&pool).unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    // The adaptive deadline (its 300 ms floor) ended it, not the fixed 10 s one; the retry
    // found no other holder.
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(hedges(&pool, "no_replica") >= 1);
    // The worker recovers: a probe clears it and calls go to it again.
    f.net.set_fault("b", None);
    wait_unsuspected(&pool);
    f.check(&pool).unwrap();
}

#[test]
fn a_stalled_worker_and_a_failing_replica_leave_the_third_holder_to_answer() {
    let f = fixture();
    f.serve("a", "all");
    f.serve("b", "all");
    f.serve("c", "all");
    let pool = tail_pool(&f, Duration::from_millis(300));
    switch(
        &pool,
        map(1, &[(0, "a"), (1, "b"), (2, "c")], |_| vec![0, 1, 2]),
    )
    .unwrap();
    warm_up(&f, &pool);
    // a stalls; its hedge goes to b and c, and b's part fails; a's call then ends at its
    // deadline, and the failover must send everything to c alone.
    f.net.set_fault("a", Some(Fault::Hang));
    f.net
        .set_fault("b", Some(Fault::Fail(tonic::Code::Unavailable)));
    f.check(&pool).unwrap();
    f.net.set_fault("b", None);
    f.net.set_fault("a", None);
}
