//! The fault-injection suite: real `switchyard` processes on loopback (a coordinator, expert
//! workers, a router) under a closed loop of concurrent greedy streams whose tokens are known,
//! while a fault is injected. Each scenario prints its figures — requests sent, succeeded,
//! failed by code, the longest latency, time to recovery — and checks what it must: exact
//! tokens, only retryable failures, bounded latency, no panic in any node's log.
//!
//! `SWITCHYARD_CHAOS_BASELINE=1` first runs each scenario as the router behaved before it
//! tolerated faults (`--hedge-after-p99 0 --expert-deadline-p99 0 --step-retry-ms 0`: a fixed
//! 10 s expert deadline, no hedges, a step that lost a worker fails its requests), printing
//! its figures beside the checked run's.
//! `SWITCHYARD_CHAOS_LOGS=DIR` keeps every node's log there.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_proto::v1::GenerateRequest;
use switchyard_proto::v1::inference_service_client::InferenceServiceClient;

mod common;
use common::{Child, spawn_node_logged, status, switchyard, synth_tiny, wait_settled};

const PROMPTS: [&[u32]; 4] = [
    &[1, 17, 42, 5, 9, 11, 300],
    &[7, 8, 9],
    &[250, 3, 99, 12, 6],
    &[42, 42, 17],
];
const NEW_TOKENS: u32 = 8;
const CLIENTS: usize = 4;
/// How long a stopped worker stays stopped.
const STOP_FOR: Duration = Duration::from_secs(20);
/// Load before and after the fault.
const CALM: Duration = Duration::from_secs(3);
/// No request may take longer in any scenario (its own timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(40);

/// Scenarios share the two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// One request's fate.
#[derive(Debug)]
struct Outcome {
    started: Instant,
    latency: Duration,
    /// `None`: it succeeded.
    code: Option<tonic::Code>,
    exact: bool,
}

/// Clients re-submitting their prompt until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(router: &str, want: &[Vec<u32>]) -> Load {
        Load::start_n(router, want, CLIENTS)
    }

    fn start_n(router: &str, want: &[Vec<u32>], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|i| {
                let (stop, url) = (stop.clone(), format!("http://{router}"));
                let (prompt, want) = (PROMPTS[i % PROMPTS.len()], want[i % want.len()].clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let mut client = InferenceServiceClient::connect(url).await.unwrap();
                        let mut out = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            let request = GenerateRequest {
                                prompt_ids: prompt.to_vec(),
                                max_new_tokens: NEW_TOKENS,
                                ignore_eos: true,
                                timeout_ms: REQUEST_TIMEOUT.as_millis() as u32,
                                ..Default::default()
                            };
                            let started = Instant::now();
                            let result = tokio::time::timeout(
                                REQUEST_TIMEOUT + Duration::from_secs(5),
                                client.generate_unary(request),
                            )
                            .await;
                            let latency = started.elapsed();
                            let (code, exact) = match result {
                                Ok(Ok(r)) => (None, r.into_inner().token_ids == want),
                                Ok(Err(status)) => (Some(status.code()), true),
                                Err(_) => (Some(tonic::Code::DeadlineExceeded), true),
                            };
                            if code.is_some() {
                                // A failed request is retried by the client, not in a spin.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            out.push(Outcome {
                                started,
                                latency,
                                code,
                                exact,
                            });
                        }
                        out
                    })
                })
            })
            .collect();
        Load { stop, clients }
    }

    fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    }
}

/// What a scenario prints and checks.
#[derive(Debug)]
struct Figures {
    sent: usize,
    succeeded: usize,
    failed: BTreeMap<String, usize>,
    inexact: usize,
    longest: Duration,
    p50: Duration,
    /// From the fault to the first success of a request started after it.
    recovery: Option<Duration>,
}

impl Figures {
    fn of(outcomes: &[Outcome], fault_at: Instant) -> Figures {
        let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
        latencies.sort();
        let mut failed = BTreeMap::new();
        for o in outcomes {
            if let Some(code) = o.code {
                *failed.entry(format!("{code:?}")).or_default() += 1;
            }
        }
        Figures {
            sent: outcomes.len(),
            succeeded: outcomes.iter().filter(|o| o.code.is_none()).count(),
            failed,
            inexact: outcomes.iter().filter(|o| !o.exact).count(),
            longest: latencies.last().copied().unwrap_or_default(),
            p50: latencies
                .get(latencies.len() / 2)
                .copied()
                .unwrap_or_default(),
            recovery: outcomes
                .iter()
                .filter(|o| o.code.is_none() && o.started > fault_at)
                .map(|o| o.started + o.latency - fault_at)
                .min(),
        }
    }

    fn print(&self, scenario: &str, setting: &str) {
        println!(
            "chaos {scenario} ({setting}): {} sent, {} succeeded, failed {:?}, {} inexact, \
             longest {:.2} s, p50 {:.3} s, recovery {}",
            self.sent,
            self.succeeded,
            self.failed,
            self.inexact,
            self.longest.as_secs_f64(),
            self.p50.as_secs_f64(),
            self.recovery
                .map_or("-".into(), |r| format!("{:.2} s", r.as_secs_f64()))
        );
    }
}

/// A coordinated cluster on loopback: `workers` workers, `replicas` copies of each expert.
struct Cluster {
    coordinator: Child,
    /// The coordinator's address and command line, to restart it where it was.
    coordinator_addr: String,
    coordinator_args: Vec<String>,
    workers: Vec<Child>,
    _router: Option<Child>,
    router: String,
    model: String,
    logs: Vec<std::path::PathBuf>,
    log_dir: std::path::PathBuf,
}

impl Cluster {
    fn start(model: &str, logs: &Path, workers: usize, replicas: u32, tail: &[&str]) -> Cluster {
        let log = |name: &str| logs.join(format!("{name}.log"));
        let replicas = replicas.to_string();
        let mut coordinator_args: Vec<String> = [
            "coordinator",
            "--model",
            model,
            "--replicas",
            &replicas,
            "--lease-ms",
            "1000",
            "--listen",
        ]
        .map(String::from)
        .to_vec();
        let args: Vec<&str> = coordinator_args.iter().map(String::as_str).collect();
        let (coordinator, c) =
            spawn_node_logged(&[&args[..], &["127.0.0.1:0"]].concat(), &log("coordinator"));
        coordinator_args.push(c.clone());
        let mut cluster = Cluster {
            coordinator,
            coordinator_addr: c.clone(),
            coordinator_args,
            workers: Vec::new(),
            _router: None,
            router: String::new(),
            model: model.to_string(),
            logs: vec![log("coordinator"), log("router")],
            log_dir: logs.to_path_buf(),
        };
        for _ in 0..workers {
            cluster.add_worker();
        }
        wait_settled(&c, workers, "start");
        let base = [
            "router",
            "--model",
            model,
            "--coordinator",
            &c,
            "--listen",
            "127.0.0.1:0",
            "--wire-dtype",
            "f32",
        ];
        let (router, r) = spawn_node_logged(&[&base[..], tail].concat(), &log("router"));
        cluster._router = Some(router);
        cluster.router = r;
        cluster
    }

    /// Starts one more worker, which registers with the coordinator.
    fn add_worker(&mut self) {
        let log = self
            .log_dir
            .join(format!("worker-{}.log", self.workers.len()));
        let (worker, _) = spawn_node_logged(
            &[
                "worker",
                "--model",
                &self.model,
                "--coordinator",
                &self.coordinator_addr,
                "--listen",
                "127.0.0.1:0",
            ],
            &log,
        );
        self.workers.push(worker);
        self.logs.push(log);
    }

    /// `kill -9` of the coordinator, and a new one at the same address after `down_for`.
    fn restart_coordinator(&mut self, down_for: Duration) {
        let _ = self.coordinator.0.kill();
        let _ = self.coordinator.0.wait();
        std::thread::sleep(down_for);
        let args: Vec<&str> = self.coordinator_args.iter().map(String::as_str).collect();
        let log = self.log_dir.join("coordinator.log");
        self.coordinator = spawn_node_logged(&args, &log).0;
    }

    fn kill(&mut self, worker: usize) {
        let _ = self.workers[worker].0.kill();
        let _ = self.workers[worker].0.wait();
    }

    fn signal(&self, worker: usize, signal: libc::c_int) {
        // SAFETY: signalling our own child by pid; it has not been reaped.
        unsafe {
            libc::kill(self.workers[worker].0.id() as libc::pid_t, signal);
        }
    }

    fn assert_no_panic(&self) {
        for log in &self.logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(
                !text.contains("panicked"),
                "{}: {}",
                log.display(),
                text.lines()
                    .filter(|l| l.contains("panicked"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// The tiny model, and each prompt's tokens from one process.
fn model() -> (tempfile::TempDir, Vec<Vec<u32>>) {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "f32");
    let want = PROMPTS
        .iter()
        .map(|p| {
            let ids: Vec<String> = p.iter().map(u32::to_string).collect();
            let out = switchyard(&[
                "generate",
                "--model",
                dir.path().to_str().unwrap(),
                "--prompt-ids",
                &ids.join(","),
                "--max-new-tokens",
                &NEW_TOKENS.to_string(),
                "--ignore-eos",
                "--json",
            ]);
            assert!(out.status.success());
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            serde_json::from_value(v["token_ids"].clone()).unwrap()
        })
        .collect();
    (dir, want)
}

const BASELINE: &[&str] = &[
    "--hedge-after-p99",
    "0",
    "--expert-deadline-p99",
    "0",
    "--step-retry-ms",
    "0",
];

fn baseline_too() -> bool {
    std::env::var_os("SWITCHYARD_CHAOS_BASELINE").is_some_and(|v| v == "1")
}

/// Runs `fault` on a cluster under load, between two calm spells; the figures of the run
/// (after the baseline's, with `SWITCHYARD_CHAOS_BASELINE=1`).
fn scenario(name: &str, workers: usize, replicas: u32, fault: impl Fn(&mut Cluster)) -> Figures {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if baseline_too() {
        run(name, workers, replicas, BASELINE, &fault);
    }
    run(name, workers, replicas, &[], &fault)
}

fn run(
    name: &str,
    workers: usize,
    replicas: u32,
    tail: &[&str],
    fault: &dyn Fn(&mut Cluster),
) -> Figures {
    let (dir, want) = model();
    let model = dir.path().to_str().unwrap();
    let mut cluster = Cluster::start(model, dir.path(), workers, replicas, tail);
    let load = Load::start(&cluster.router, &want);
    std::thread::sleep(CALM);
    let fault_at = Instant::now();
    fault(&mut cluster);
    std::thread::sleep(CALM);
    let outcomes = load.stop();
    let figures = Figures::of(&outcomes, fault_at);
    let setting = if tail.is_empty() { "now" } else { "baseline" };
    figures.print(name, setting);
    if let Some(keep) = std::env::var_os("SWITCHYARD_CHAOS_LOGS") {
        // Where the nodes' logs are kept, one directory per scenario and setting.
        let to = Path::new(&keep).join(format!("{name}-{}", setting.replace(' ', "-")));
        let _ = std::fs::create_dir_all(&to);
        for log in &cluster.logs {
            if let Some(file) = log.file_name() {
                let _ = std::fs::copy(log, to.join(file));
            }
        }
    }
    cluster.assert_no_panic();
    figures
}

/// SIGSTOP of worker 0 for [`STOP_FOR`], then SIGCONT.
fn stop_worker_0(cluster: &mut Cluster) {
    cluster.signal(0, libc::SIGSTOP);
    std::thread::sleep(STOP_FOR);
    cluster.signal(0, libc::SIGCONT);
}

/// Nothing failed, every token was right, and enough requests ran to say so.
fn nothing_failed(f: &Figures) {
    assert!(f.failed.is_empty() && f.inexact == 0, "{f:?}");
    assert!(f.succeeded >= CLIENTS * 10, "too few requests ran: {f:?}");
}

#[test]
fn sigstop_of_a_worker_with_replicas_fails_nothing_and_keeps_latency_low() {
    let f = scenario("sigstop_20s_with_replicas", 3, 2, stop_worker_0);
    nothing_failed(&f);
    // The fixed expert deadline is 10 s: no request came near it.
    assert!(f.longest < Duration::from_secs(3), "{f:?}");
}

#[test]
fn sigstop_of_a_worker_without_replicas_delays_requests_until_its_experts_are_placed_again() {
    let f = scenario("sigstop_20s_without_replicas", 2, 1, stop_worker_0);
    // Calls to the stopped worker end at the adaptive deadline (1 s floor), not the fixed
    // 10 s; the steps wait and are retried (--step-retry-ms) until the lease (1 s) has run
    // out and its experts are placed on the other worker.
    nothing_failed(&f);
    assert!(f.longest < Duration::from_secs(8), "{f:?}");
}

#[test]
fn kill_9_of_a_worker_with_replicas_fails_nothing() {
    let f = scenario("kill_9_with_replicas", 3, 2, |c| {
        c.kill(0);
        // Its experts are copied back to two holders each within lease + load time.
        wait_settled(&c.coordinator_addr, 2, "after the kill");
    });
    nothing_failed(&f);
    assert!(f.longest < Duration::from_secs(3), "{f:?}");
}

#[test]
fn kill_9_of_a_worker_without_replicas_fails_nothing_while_its_experts_are_placed_again() {
    let f = scenario("kill_9_without_replicas", 2, 1, |c| {
        c.kill(0);
        wait_settled(&c.coordinator_addr, 1, "after the kill");
    });
    // Steps that lose the worker wait and are retried: lease (1 s) + placing and loading its
    // experts elsewhere.
    nothing_failed(&f);
    assert!(f.longest < Duration::from_secs(8), "{f:?}");
}

#[test]
fn workers_joining_and_leaving_ten_times_fail_nothing() {
    let f = scenario("join_leave_x10_with_replicas", 2, 2, |c| {
        for round in 0..10 {
            // A join, then a SIGTERM drain of the oldest worker still running.
            c.add_worker();
            wait_settled(&c.coordinator_addr, 3, &format!("round {round}: join"));
            let oldest = c.workers.len() - 3;
            c.signal(oldest, libc::SIGTERM);
            wait_exit(&mut c.workers[oldest], Duration::from_secs(30));
            wait_settled(&c.coordinator_addr, 2, &format!("round {round}: leave"));
        }
    });
    nothing_failed(&f);
    assert!(f.longest < Duration::from_secs(3), "{f:?}");
}

#[test]
fn routers_keep_serving_while_the_coordinator_restarts() {
    let f = scenario("coordinator_kill_9_and_restart", 2, 2, |c| {
        c.restart_coordinator(Duration::from_secs(2));
        // The workers register again and a placement goes live on the new coordinator.
        wait_settled(&c.coordinator_addr, 2, "after the restart");
    });
    nothing_failed(&f);
}

#[test]
fn rogue_workers_without_the_cluster_s_certificate_are_refused_and_change_no_token() {
    let rogue_ca = tempfile::tempdir().unwrap();
    let issued = switchyard(&[
        "certs",
        "--out",
        rogue_ca.path().to_str().unwrap(),
        "--workers",
        "1",
        "--routers",
        "1",
    ]);
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let file = |name: &str| rogue_ca.path().join(name).to_str().unwrap().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("worker-0.pem"), file("worker-0.key"));
    let f = scenario("rogue_workers", 2, 1, |c| {
        let before = status(&c.coordinator_addr);
        // One in plaintext, one with a worker certificate of a CA of its own: both try to
        // join and be sent hidden states. (A direct `Forward` without a router certificate is
        // refused too: tests/tests/cluster_tls.rs.)
        let mut rogues = Vec::new();
        for (name, flags) in [
            ("rogue-plaintext", vec!["--insecure-cluster"]),
            (
                "rogue-foreign-ca",
                vec!["--cluster-ca", &ca, "--cert", &cert, "--key", &key],
            ),
        ] {
            let log = c.log_dir.join(format!("{name}.log"));
            let args = [
                &[
                    "worker",
                    "--model",
                    c.model.as_str(),
                    "--coordinator",
                    c.coordinator_addr.as_str(),
                    "--listen",
                    "127.0.0.1:0",
                ][..],
                &flags[..],
            ]
            .concat();
            let (child, addr) = spawn_node_logged(&args, &log);
            rogues.push((name, child, addr, log));
        }
        // Three leases: long enough for either rogue to have joined, had it been let in.
        std::thread::sleep(Duration::from_secs(3));
        let after = status(&c.coordinator_addr);
        let members: Vec<&str> = after["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["address"].as_str().unwrap())
            .collect();
        for (name, _, addr, log) in &rogues {
            assert!(!members.contains(&addr.as_str()), "{name} joined: {after}");
            let text = std::fs::read_to_string(log).unwrap_or_default();
            // Refused at the TLS handshake (a foreign CA), or its plaintext read as garbage.
            assert!(
                text.contains("coordinator unreachable") || text.contains("registration refused"),
                "{name} was not refused: {text}"
            );
        }
        assert_eq!(members.len(), 2, "{after}");
        assert_eq!(after["live_version"], before["live_version"], "{after}");
        println!(
            "rogue_workers: 2 rogue workers (plaintext; a foreign CA's certificate) refused, 0 joined, live version unchanged"
        );
        c.logs.extend(rogues.iter().map(|r| r.3.clone()));
    });
    nothing_failed(&f);
}

/// Waits (bounded) for a signalled node to exit, successfully.
fn wait_exit(child: &mut Child, within: Duration) {
    let until = Instant::now() + within;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "exited with {status}");
            return;
        }
        assert!(Instant::now() < until, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The resident set of process `pid`, in KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn overload_at_ten_times_the_admission_limit_is_answered_or_refused_and_memory_stays_bounded() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, want) = model();
    let model = dir.path().to_str().unwrap();
    // Admission: 4 running and 4 waiting; 80 clients push 10x that.
    let limits = ["--max-batch-size", "4", "--max-waiting", "4"];
    let cluster = Cluster::start(model, dir.path(), 2, 2, &limits);
    let pid = cluster._router.as_ref().map(|c| c.0.id()).unwrap();
    let warm = Load::start(&cluster.router, &want);
    std::thread::sleep(Duration::from_secs(1));
    warm.stop();
    let idle = rss_kib(pid);
    let started = Instant::now();
    let load = Load::start_n(&cluster.router, &want, 80);
    let mut peak = idle;
    while started.elapsed() < Duration::from_secs(8) {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcomes = load.stop();
    let f = Figures::of(&outcomes, started);
    f.print("overload_10x_admission", "now");
    println!(
        "chaos overload_10x_admission: router RSS idle {} MiB, peak {} MiB",
        idle / 1024,
        peak / 1024
    );
    cluster.assert_no_panic();
    assert_eq!(f.inexact, 0, "{f:?}");
    // Answered, or refused at once with RESOURCE_EXHAUSTED (HTTP 429): nothing admitted is lost.
    assert!(
        f.failed.keys().all(|code| code == "ResourceExhausted"),
        "{f:?}"
    );
    assert!(
        f.failed.contains_key("ResourceExhausted"),
        "never overloaded: {f:?}"
    );
    assert!(f.succeeded >= 40, "{f:?}");
    assert!(
        peak <= 2 * idle,
        "RSS {idle} KiB idle, {peak} KiB under overload"
    );
}
