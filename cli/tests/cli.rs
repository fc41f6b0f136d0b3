//! The command-line contract, through the real binary.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{Child, cluster_certs, spawn_node, status, switchyard, synth_tiny, wait_settled};

#[test]
fn generate_json_prints_the_generated_token_ids() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "bf16");
    let model = dir.path().to_str().unwrap();
    let args = [
        "generate",
        "--model",
        model,
        "--prompt-ids",
        "1,17,42",
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];
    let out = switchyard(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let ids = json["token_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 16);
    assert!(ids.iter().all(|t| t.as_u64().unwrap() < 512));
    assert_eq!(json["finish_reason"], "length");
    // Greedy is deterministic across processes.
    let again: serde_json::Value = serde_json::from_slice(&switchyard(&args).stdout).unwrap();
    assert_eq!(again["token_ids"], json["token_ids"]);
}

#[test]
fn dump_logits_writes_prompt_logits_as_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "f32");
    let dump = dir.path().join("logits.safetensors");
    let out = switchyard(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt-ids",
        "1,17,42,7",
        "--max-new-tokens",
        "2",
        "--ignore-eos",
        "--json",
        "--dump-logits",
        dump.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&dump).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let logits = st.tensor("logits").unwrap();
    assert_eq!(logits.dtype(), safetensors::Dtype::F32);
    assert_eq!(logits.shape(), &[4, 512]);
    // The last prompt position's argmax is the first generated token.
    let last: Vec<f32> = logits.data()[3 * 512 * 4..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let argmax = (0..512)
        .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["token_ids"][0].as_u64().unwrap(), argmax as u64);
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "bf16");
    let model = dir.path().to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["generate", "--model", model, "--prompt-ids", "1,9999"],
            "vocab_size (512), got 9999",
        ),
        (
            &[
                "generate",
                "--model",
                model,
                "--prompt-ids",
                "1",
                "--temperature",
                "-1",
            ],
            "temperature",
        ),
        (
            &[
                "generate",
                "--model",
                "/nonexistent/model",
                "--prompt-ids",
                "1",
            ],
            "/nonexistent/model",
        ),
        (
            &["synth", "--preset", "deepseek-v3", "--out", model],
            "--layers",
        ),
    ];
    for (args, needle) in cases {
        let out = switchyard(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        // A cause is said once, not once per layer of the error chain.
        assert!(
            stderr.matches("(os error").count() <= 1,
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn bench_reports_throughput_and_memory_as_json() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "bf16");
    let out = switchyard(&[
        "bench",
        "--model",
        dir.path().to_str().unwrap(),
        "--batch",
        "1,3",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["batch"], 3);
    assert!(
        rows.iter()
            .all(|r| r["decode_tok_s"].as_f64().unwrap() > 0.0
                && r["prefill_tok_s"].as_f64().unwrap() > 0.0)
    );
    assert!(json["peak_rss_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn threads_size_the_compute_pool_the_benchmark_reports() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "bf16");
    for threads in ["1", "3"] {
        let out = switchyard(&[
            "--threads",
            threads,
            "bench",
            "--model",
            dir.path().to_str().unwrap(),
            "--batch",
            "1",
            "--prompt-len",
            "4",
            "--gen-len",
            "2",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["threads"].to_string(), threads, "--threads {threads}");
    }
    let out = switchyard(&["--threads", "0", "bench", "--model", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`--threads` must be >= 1, got 0"));
}

/// A child process killed (and reaped) when dropped, so a failing test leaves no orphans.
/// A static cluster of real processes: one worker per expert spec, and a router over them
/// (with `router_flags` added). Returns the workers, their addresses, the router and its address.
fn static_cluster(
    model: &str,
    specs: &[&str],
    router_flags: &[&str],
) -> (Vec<Child>, Vec<String>, Child, String) {
    let (workers, addrs): (Vec<Child>, Vec<String>) = specs
        .iter()
        .map(|spec| {
            spawn_node(&[
                "worker",
                "--model",
                model,
                "--experts",
                spec,
                "--listen",
                "127.0.0.1:0",
            ])
        })
        .unzip();
    let list = addrs.join(",");
    let base = [
        "router",
        "--model",
        model,
        "--workers",
        &list,
        "--listen",
        "127.0.0.1:0",
    ];
    let (router, r) = spawn_node(&[&base[..], router_flags].concat());
    (workers, addrs, router, r)
}

#[test]
fn generation_through_router_and_worker_processes_matches_local() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "f32");
    let model = dir.path().to_str().unwrap();
    // Metrics on a listener of their own, without the HTTP API.
    let metrics = format!("127.0.0.1:{}", free_port());
    let (_workers, addrs, _router, r) = static_cluster(
        model,
        &["0-9", "10-15"],
        &["--wire-dtype", "f32", "--metrics-listen", &metrics],
    );
    let a0 = addrs[0].clone();
    let flags = [
        "--prompt-ids",
        "1,17,42,5",
        "--max-new-tokens",
        "10",
        "--ignore-eos",
        "--json",
    ];
    let remote = switchyard(&[&["generate", "--router", &r][..], &flags[..]].concat());
    assert!(
        remote.status.success(),
        "{}",
        String::from_utf8_lossy(&remote.stderr)
    );
    let local = switchyard(&[&["generate", "--model", model][..], &flags[..]].concat());
    let ids = |o: &Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone()
    };
    assert_eq!(ids(&remote), ids(&local));
    let (code, text) = http(&metrics, "GET", "/metrics", "");
    assert_eq!(code, 200, "{text}");
    for series in [
        "switchyard_requests_total{outcome=\"length\"} 1",
        "switchyard_requests_total{outcome=\"failed\"} 0",
        "switchyard_build_info{version=",
    ] {
        assert!(text.contains(series), "{series}: {text}");
    }
    // A router whose workers cannot hold every expert refuses to start, naming what is missing.
    let out = switchyard(&[
        "router",
        "--model",
        model,
        "--workers",
        &a0,
        "--listen",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("on no worker"),
        "{stderr}"
    );
}

#[test]
fn text_prompts_stream_and_need_the_key_through_a_router_process() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "f32");
    let model = dir.path().to_str().unwrap();
    let (_workers, _addrs, _router, r) = static_cluster(
        model,
        &["0-15"],
        &["--api-key", "k3y", "--wire-dtype", "f32"],
    );
    let flags = [
        "--prompt",
        "Hello experts",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
    ];
    let run = |extra: &[&str]| {
        switchyard(&[&["generate", "--router", &r][..], &flags[..], extra].concat())
    };
    let json = run(&["--api-key", "k3y", "--json"]);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 12);
    // The same text locally, and streamed it prints the same text.
    let local =
        switchyard(&[&["generate", "--model", model][..], &flags[..], &["--json"]].concat());
    let lv: serde_json::Value = serde_json::from_slice(&local.stdout).unwrap();
    assert_eq!(lv["text"], v["text"]);
    assert_eq!(lv["token_ids"], v["token_ids"]);
    let streamed = run(&["--api-key", "k3y", "--stream"]);
    assert!(streamed.status.success());
    assert_eq!(
        String::from_utf8_lossy(&streamed.stdout).trim_end_matches('\n'),
        v["text"].as_str().unwrap()
    );
    let denied = run(&[]);
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert_eq!(denied.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
}

#[test]
fn up_brings_a_cluster_up_generates_through_it_and_stops_it() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let out = switchyard(&[
        "up",
        "--workers",
        "2",
        "--routers",
        "2",
        "--router-addr",
        "127.0.0.1:0",
        "--cache-dir",
        cache_dir,
        "--demo-prompt-ids",
        "1,17,42",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let remote: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let model = cache.path().join("models/tiny-bf16-seed0");
    let local = switchyard(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "1,17,42",
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    let local: serde_json::Value = serde_json::from_slice(&local.stdout).unwrap();
    assert_eq!(remote["token_ids"], local["token_ids"]);
}

/// Every family through `up`: MoE presets (Qwen3-MoE, Mixtral) with a coordinator and workers,
/// dense ones (Llama, Qwen3, Gemma 3, Mistral) on the router alone; the tokens are what the
/// single-process engine generates from the same checkpoint.
#[test]
fn up_serves_every_model_family() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    for preset in [
        "tiny-qwen3-moe",
        "tiny-mixtral",
        "tiny-llama",
        "tiny-qwen3",
        "tiny-gemma3",
        "tiny-mistral",
    ] {
        let out = switchyard(&[
            "up",
            "--preset",
            preset,
            "--workers",
            "2",
            "--router-addr",
            "127.0.0.1:0",
            "--cache-dir",
            cache_dir,
            "--demo-prompt-ids",
            "1,17,42",
            "--json",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{preset}: {stderr}");
        let dense = stderr.contains("dense model, no expert workers");
        assert_eq!(
            dense,
            !preset.contains("moe") && !preset.contains("mixtral"),
            "{stderr}"
        );
        let remote: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let model = cache.path().join(format!("models/{preset}-bf16-seed0"));
        let local = switchyard(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            "1,17,42",
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--json",
        ]);
        let local: serde_json::Value = serde_json::from_slice(&local.stdout).unwrap();
        assert_eq!(remote["token_ids"], local["token_ids"], "{preset}");
    }
}

/// `--device cuda:N` on a machine (or build) without CUDA fails at start-up with the device
/// named and the reason, never a panic; a malformed device names the value.
#[test]
fn a_cuda_device_without_cuda_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "bf16");
    let model = dir.path().to_str().unwrap();
    for args in [
        &[
            "worker",
            "--model",
            model,
            "--experts",
            "all",
            "--device",
            "cuda:0",
            "--listen",
            "127.0.0.1:0",
        ][..],
        &[
            "router",
            "--model",
            model,
            "--device",
            "cuda:0",
            "--listen",
            "127.0.0.1:0",
        ][..],
        &[
            "up",
            "--router-device",
            "cuda:0",
            "--model",
            model,
            "--router-addr",
            "127.0.0.1:0",
        ][..],
        &[
            "up",
            "--gpus",
            "0",
            "--model",
            model,
            "--router-addr",
            "127.0.0.1:0",
        ][..],
        &[
            "router",
            "--model",
            model,
            "--device",
            "cuda:0,1",
            "--listen",
            "127.0.0.1:0",
        ][..],
        &[
            "up",
            "--router-device",
            "cuda:0,1",
            "--model",
            model,
            "--router-addr",
            "127.0.0.1:0",
        ][..],
    ] {
        let out = switchyard(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("cuda:0"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("--features cuda") || stderr.contains("not present"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let out = switchyard(&[
        "worker",
        "--model",
        model,
        "--experts",
        "all",
        "--device",
        "gpu7",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("gpu7"), "{stderr}");
    let out = switchyard(&["router", "--model", model, "--device", "cuda:1,1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cuda:1 appears twice"),
        "{stderr}"
    );
}

/// A child's output, line by line, from a thread of its own.
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// SIGTERM to `child`, then its exit status, within 30 s.
fn sigterm_and_wait(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not stop within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `up` with two workers on loopback and `extra` flags; its stderr, line by line.
fn up_on_loopback(
    cache: &Path,
    extra: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut up = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["up", "--workers", "2", "--router-addr", "127.0.0.1:0"])
        .args(extra)
        .arg("--cache-dir")
        .arg(cache)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(up.stderr.take().unwrap());
    (up, rx)
}

#[test]
fn sigterm_to_up_stops_every_node() {
    let cache = tempfile::tempdir().unwrap();
    let (mut up, rx) = up_on_loopback(cache.path(), &[]);
    let mut pids = Vec::new();
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("up reports its nodes");
        if let Some(pid) = line.split(" · ").find_map(|p| p.strip_prefix("pid ")) {
            pids.push(pid.parse::<i32>().unwrap());
        }
        if line.starts_with("serving") {
            break;
        }
    }
    assert_eq!(pids.len(), 4, "a coordinator, two workers and a router");
    let status = sigterm_and_wait(&mut up, "up");
    assert!(status.success(), "{status}");
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "node {pid} outlived `up`");
    }
}

#[test]
fn plan_sizes_a_deepseek_v3_cluster_and_refuses_one_that_does_not_fit() {
    let out = switchyard(&[
        "plan",
        "--model",
        "deepseek-v3",
        "--workers",
        "32",
        "--worker-memory",
        "80GiB",
        "--dtype",
        "fp8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 58 MoE layers x 256 experts over 32 workers.
    assert_eq!(plan["experts_per_worker"]["min"], 464);
    assert_eq!(plan["experts_per_worker"]["max"], 464);
    assert_eq!(plan["latent_kv_bytes_per_token"], 70_272);
    // Routers: ~17 B parameters (FP8 projections, bf16 embeddings) leave ~60 GiB of 80 for
    // latent cache; 256 sequences × 4096 tokens need two.
    let kv = plan["latent_kv_tokens_per_router"].as_u64().unwrap();
    assert!((800_000..1_000_000).contains(&kv), "{plan}");
    assert_eq!(plan["routers_for_target"], 2, "{plan}");
    let out = switchyard(&[
        "plan",
        "--model",
        "deepseek-v3",
        "--workers",
        "4",
        "--worker-memory",
        "80GiB",
        "--dtype",
        "fp8",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not fit") && stderr.contains("14848"),
        "{stderr}"
    );
}

#[test]
fn a_killed_worker_fails_requests_clearly_and_quickly() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "bf16");
    let model = dir.path().to_str().unwrap();
    let (mut workers, addrs, _router, r) = static_cluster(
        model,
        &["0-7", "8-15"],
        &["--expert-deadline-ms", "2000", "--step-retry-ms", "1000"],
    );
    let a1 = addrs[1].clone();
    let flags = [
        "generate",
        "--router",
        &r,
        "--prompt-ids",
        "1,17,42,5,9,11",
        "--max-new-tokens",
        "4",
        "--json",
    ];
    assert!(
        switchyard(&flags).status.success(),
        "the healthy cluster serves"
    );
    let _ = workers[1].0.kill();
    let _ = workers[1].0.wait();
    let start = std::time::Instant::now();
    let out = switchyard(&flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Unavailable") && stderr.contains(&a1),
        "{stderr}"
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(15),
        "took {:?}",
        start.elapsed()
    );
}

/// A free loopback port: bound by the OS from the ephemeral range, then released.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn up_starts_the_cluster_a_cluster_file_describes() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "f32");
    let file = dir.path().join("cluster.toml");
    let text = format!(
        "model = {:?}\nlease_ms = 1000\n[coordinator]\nhost = \"a\"\naddr = \"127.0.0.1:{}\"\n\
         [[workers]]\nhost = \"a\"\naddr = \"127.0.0.1:{}\"\nmemory = \"1GiB\"\n\
         [[workers]]\nhost = \"a\"\naddr = \"127.0.0.1:{}\"\nmemory = \"1GiB\"\n\
         [[routers]]\nhost = \"a\"\naddr = \"127.0.0.1:{}\"\n",
        dir.path().to_str().unwrap(),
        free_port(),
        free_port(),
        free_port(),
        free_port()
    );
    std::fs::write(&file, text).unwrap();
    let out = switchyard(&[
        "up",
        "--cluster",
        file.to_str().unwrap(),
        "--host",
        "a",
        "--cluster-certs",
        cluster_certs().to_str().unwrap(),
        "--demo-prompt-ids",
        "1,17,42",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local = switchyard(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt-ids",
        "1,17,42",
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    let ids = |o: &Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone()
    };
    assert_eq!(ids(&out), ids(&local));
    // A host the file places nothing on is an error, not an empty cluster.
    let out = switchyard(&[
        "up",
        "--cluster",
        file.to_str().unwrap(),
        "--host",
        "b",
        "--insecure-cluster",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("places no node"),
        "{stderr}"
    );
}

#[test]
fn a_coordinated_cluster_of_processes_serves_through_a_drain_a_join_and_a_kill() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "f32");
    let model = dir.path().to_str().unwrap();
    let prompt = "1,17,42,5,9,11,300";
    let local = switchyard(&[
        "generate",
        "--model",
        model,
        "--prompt-ids",
        prompt,
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ]);
    let want: serde_json::Value = serde_json::from_slice(&local.stdout).unwrap();
    let (_coordinator, c) = spawn_node(&[
        "coordinator",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--replicas",
        "2",
        "--lease-ms",
        "1000",
    ]);
    let worker = || {
        spawn_node(&[
            "worker",
            "--model",
            model,
            "--coordinator",
            &c,
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout-s",
            "20",
        ])
        .0
    };
    let mut workers: Vec<Child> = (0..3).map(|_| worker()).collect();
    wait_settled(&c, 3, "start");
    let (_router, r) = spawn_node(&[
        "router",
        "--model",
        model,
        "--coordinator",
        &c,
        "--listen",
        "127.0.0.1:0",
        "--wire-dtype",
        "f32",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done, r, want) = (
                stop.clone(),
                done.clone(),
                r.clone(),
                want["token_ids"].clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = switchyard(&[
                        "generate",
                        "--router",
                        &r,
                        "--prompt-ids",
                        prompt,
                        "--max-new-tokens",
                        "8",
                        "--ignore-eos",
                        "--json",
                    ]);
                    if !out.status.success() {
                        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
                    }
                    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    if got["token_ids"] != want {
                        return Err(format!("{} != {want}", got["token_ids"]));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    // A drain: SIGTERM, and the worker leaves by itself once routers have moved on.
    // SAFETY: signalling our own child by pid; it has not been reaped.
    unsafe {
        libc::kill(workers[0].0.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = workers[0].0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the drained worker did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(exit.success(), "the drained worker exited with {exit}");
    workers.push(worker());
    wait_settled(&c, 3, "after the drain and the join");
    // A kill: the replicas serve until the lease runs out and the experts are re-placed.
    let _ = workers[1].0.kill();
    let _ = workers[1].0.wait();
    workers.push(worker());
    wait_settled(&c, 3, "after the kill");
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap().unwrap();
    }
    assert!(done.load(Ordering::Relaxed) >= 4, "too few requests ran");
    let s = status(&c);
    assert_eq!(s["routers"].as_array().unwrap().len(), 1, "{s}");
}

#[test]
fn a_worker_whose_drain_cannot_finish_still_stops_on_sigterm_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), "bf16");
    let model = dir.path().to_str().unwrap();
    let (_coordinator, c) =
        spawn_node(&["coordinator", "--model", model, "--listen", "127.0.0.1:0"]);
    let sigterm = |child: &Child| {
        // SAFETY: signalling our own child by pid; it has not been reaped.
        unsafe {
            libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM);
        }
    };
    let wait_exit = |child: &mut Child, limit: std::time::Duration| {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(start.elapsed() < limit, "still running after {limit:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // The only worker: nobody can take its experts, so its drain can never complete.
    for (drain, second_signal) in [("1", false), ("60", true)] {
        let (mut worker, _) = spawn_node(&[
            "worker",
            "--model",
            model,
            "--coordinator",
            &c,
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout-s",
            drain,
        ]);
        wait_settled(&c, 1, "the worker placed");
        sigterm(&worker);
        if second_signal {
            std::thread::sleep(std::time::Duration::from_millis(300));
            sigterm(&worker);
            let (status, took) = wait_exit(&mut worker, std::time::Duration::from_secs(5));
            assert_eq!(status.code(), Some(130), "a second signal exits at once");
            assert!(took < std::time::Duration::from_secs(5));
        } else {
            let (status, took) = wait_exit(&mut worker, std::time::Duration::from_secs(10));
            assert!(status.success(), "{status}");
            assert!(
                took >= std::time::Duration::from_millis(900),
                "left before its drain limit"
            );
        }
        // Gone from the coordinator: at once when it could say so, else a lease later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !status(&c)["workers"].as_array().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker never left"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[test]
fn plan_with_a_load_file_predicts_the_imbalance_of_each_plan() {
    let dir = tempfile::tempdir().unwrap();
    // mini: 7 MoE layers × 64 experts; a Zipf-shaped load, hot experts spread over layers.
    let load: Vec<Vec<u64>> = (0..7)
        .map(|l| {
            (0..64)
                .map(|e| 10_000 / (((e * 7 + l * 13) % 64) + 1) as u64)
                .collect()
        })
        .collect();
    let path = dir.path().join("load.json");
    std::fs::write(&path, serde_json::to_string(&load).unwrap()).unwrap();
    let file = path.to_str().unwrap();
    let plan = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "plan",
            "--model",
            "mini",
            "--workers",
            "4",
            "--worker-memory",
            "8GiB",
            "--redundant-experts",
            "8",
            "--max-moves",
            "100",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = switchyard(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let r = plan(&["--load", file]);
    let mean = |k: &str| r[k]["mean"].as_f64().unwrap();
    assert!(mean("planned_for_load") < mean("blind"), "{r}");
    assert!(mean("rebalanced") < mean("blind"), "{r}");
    assert!(r["rebalanced"]["moves_from_blind"].as_u64().unwrap() <= 100);
    assert_eq!(r["layers"].as_array().unwrap().len(), 7);
    assert_eq!(r["in_force"]["planned_for"], "blind", "{r}");
    // The load drifts (the hot experts of each layer shift by one): the plan made for the
    // old load is in force, and the rebalance starts from it.
    let drifted: Vec<Vec<u64>> = load
        .iter()
        .map(|row| (0..64).map(|e| row[(e + 1) % 64]).collect())
        .collect();
    let second = dir.path().join("drifted.json");
    std::fs::write(&second, serde_json::to_string(&drifted).unwrap()).unwrap();
    let d = plan(&["--load", second.to_str().unwrap(), "--previous-load", file]);
    assert_eq!(d["in_force"]["planned_for"], "previous_load", "{d}");
    let dmean = |k: &str| d[k]["mean"].as_f64().unwrap();
    assert!(dmean("in_force") < dmean("blind"), "{d}");
    assert!(dmean("rebalanced") < dmean("in_force"), "{d}");
    assert!(d["rebalanced"]["moves"].as_u64().unwrap() <= 100, "{d}");
    // A load of the wrong shape is refused, naming what is wrong.
    std::fs::write(&path, "[[1, 2, 3]]").unwrap();
    let out = switchyard(&[
        "plan",
        "--model",
        "mini",
        "--workers",
        "4",
        "--worker-memory",
        "8GiB",
        "--load",
        file,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 layers") && stderr.contains("7 MoE layers"),
        "{stderr}"
    );
}

#[test]
fn rebalance_acts_on_the_load_a_router_process_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = switchyard(&[
        "synth",
        "--preset",
        "tiny",
        "--out",
        dir.path().to_str().unwrap(),
        "--dtype",
        "f32",
        "--expert-skew",
        "2.0",
    ]);
    assert!(out.status.success());
    let model = dir.path().to_str().unwrap();
    let (_coordinator, c) = spawn_node(&[
        "coordinator",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--lease-ms",
        "600",
        "--redundant-experts",
        "2",
        "--load-half-life",
        "0",
    ]);
    // Before any placement: a clear refusal.
    let out = switchyard(&["rebalance", "--coordinator", &c, "--dry-run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Unavailable"), "{stderr}");
    let _workers: Vec<Child> = (0..2)
        .map(|_| {
            spawn_node(&[
                "worker",
                "--model",
                model,
                "--coordinator",
                &c,
                "--listen",
                "127.0.0.1:0",
            ])
            .0
        })
        .collect();
    wait_settled(&c, 2, "start");
    let (_router, r) = spawn_node(&[
        "router",
        "--model",
        model,
        "--coordinator",
        &c,
        "--listen",
        "127.0.0.1:0",
    ]);
    let out = switchyard(&[
        "generate",
        "--router",
        &r,
        "--prompt-ids",
        "1,17,42,5,9,11,300,4,4,8",
        "--max-new-tokens",
        "24",
        "--ignore-eos",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The router's next report carries the counts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while status(&c)["load_tokens"].as_f64().unwrap_or(0.0) <= 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no load reached the coordinator"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let s = status(&c);
    assert_eq!(s["imbalance"].as_array().unwrap().len(), 2, "{s}");
    let out = switchyard(&[
        "rebalance",
        "--coordinator",
        &c,
        "--dry-run",
        "--threshold",
        "0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dry["version"], serde_json::Value::Null, "{dry}");
    assert_eq!(dry["layers"].as_array().unwrap().len(), 2);
    let before = s["live_version"].as_u64().unwrap();
    assert_eq!(status(&c)["target_version"].as_u64(), Some(before));
    // The skewed gate makes some experts hot: a rebalance pays.
    assert_eq!(dry["applied"], true, "{dry}");
    assert!(
        dry["mean_imbalance_after"].as_f64() < dry["mean_imbalance_before"].as_f64(),
        "{dry}"
    );
    let out = switchyard(&[
        "rebalance",
        "--coordinator",
        &c,
        "--threshold",
        "0",
        "--json",
    ]);
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = done["version"].as_u64().unwrap();
    assert!(v > before, "{done}");
    wait_settled(&c, 2, "rebalanced");
    let out = switchyard(&["rebalance", "--coordinator", &c, "--threshold=-1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("threshold") && stderr.contains("-1"),
        "{stderr}"
    );
}

/// One HTTP/1.1 exchange over a fresh connection: the status code and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with(addr, method, path, body, "")
}

/// [`http`] with extra header lines (each ending in `\r\n`).
fn http_with(addr: &str, method: &str, path: &str, body: &str, headers: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[test]
fn serve_takes_vllm_s_command_line_and_host_names() {
    let cache = tempfile::tempdir().unwrap();
    // Bad input is refused before any node starts, naming what was typed.
    for (args, expect) in [
        (
            vec!["serve", "no-such-model"],
            "neither a directory nor a preset",
        ),
        (
            vec!["serve", "tiny", "--host", "no such host!"],
            "--host/--port",
        ),
        (
            vec!["up", "--http-addr", "8000"],
            "bare port 8000 (try 127.0.0.1:8000)",
        ),
        (
            vec!["serve", "tiny", "--tensor-parallel-size", "0"],
            ">= 1, got 0",
        ),
    ] {
        let out = switchyard(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let mut serve = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "serve",
            "tiny",
            "--host",
            "localhost",
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--workers",
            "1",
            "--served-model-name",
            "my-model",
            "--max-model-len",
            "32",
            "--max-num-seqs",
            "4",
            "--max-num-batched-tokens",
            "256",
            "--cache-dir",
        ])
        .arg(cache.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(serve.stdout.take().unwrap());
    let http_addr = loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("serve prints its HTTP address");
        if let Some(a) = line.strip_prefix("http ") {
            break a.trim_start_matches("http://").to_string();
        }
    };
    assert!(http_addr.starts_with("127.0.0.1:"), "{http_addr}");
    let (code, models) = http(&http_addr, "GET", "/v1/models", "");
    assert_eq!(code, 200, "{models}");
    assert!(models.contains("\"my-model\""), "{models}");
    // --max-model-len caps prompt + output below the model's 131072 positions.
    let (code, body) = http(
        &http_addr,
        "POST",
        "/v1/completions",
        r#"{"model": "my-model", "prompt": [1, 2, 3], "max_tokens": 40}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("max_tokens") && body.contains("32"), "{body}");
    let (code, body) = http(
        &http_addr,
        "POST",
        "/v1/completions",
        r#"{"model": "my-model", "prompt": [1, 2, 3], "max_tokens": 4}"#,
    );
    assert_eq!(code, 200, "{body}");
    let status = sigterm_and_wait(&mut serve, "serve");
    assert!(status.success(), "{status}");
}

#[test]
fn sigterm_while_up_starts_stops_every_node_without_an_error() {
    let cache = tempfile::tempdir().unwrap();
    // Workers too small for any expert: the router waits for a placement that never comes,
    // so the signal lands while the cluster is starting.
    let (mut up, rx) = up_on_loopback(cache.path(), &["--worker-memory", "1KiB"]);
    let mut pids = Vec::new();
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("up says which nodes start");
        seen.push(line.clone());
        if let Some(pid) = line
            .split("starting (pid ")
            .nth(1)
            .and_then(|p| p.strip_suffix(')'))
        {
            pids.push(pid.parse::<i32>().unwrap());
        }
        if line.starts_with("router: starting") {
            break;
        }
    }
    assert_eq!(pids.len(), 4, "{seen:?}");
    let began = std::time::Instant::now();
    let status = sigterm_and_wait(&mut up, "up");
    assert_eq!(status.code(), Some(143), "{status}");
    assert!(
        began.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        !rest.iter().any(|l| l.starts_with("error")),
        "no error text: {rest:?}"
    );
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "node {pid} outlived `up`");
    }
}

#[test]
fn metrics_auth_puts_every_node_s_metrics_behind_the_api_key_and_leaves_health_open() {
    let cache = tempfile::tempdir().unwrap();
    let (mut up, rx) = up_on_loopback(
        cache.path(),
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--api-key",
            "sekrit",
            "--metrics-auth",
        ],
    );
    let (mut http_api, mut metrics) = (None, Vec::new());
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("up reports its nodes");
        if let Some(addr) = line.split(" · ").find_map(|p| p.strip_prefix("http ")) {
            http_api = Some(addr.trim().to_string());
        }
        if let Some(m) = line
            .split(" · ")
            .find_map(|p| p.strip_prefix("metrics http://"))
        {
            metrics.push(m.trim().trim_end_matches("/metrics").to_string());
        }
        if line.starts_with("serving") {
            break;
        }
    }
    let http_api = http_api.expect("the router's HTTP address");
    // The coordinator's and the workers' metrics listeners, and the router's HTTP API.
    assert_eq!(metrics.len(), 3, "{metrics:?}");
    for addr in metrics.iter().chain([&http_api]) {
        let (code, body) = http(addr, "GET", "/metrics", "");
        assert_eq!(code, 401, "{addr}: {body}");
        let (code, body) = http_with(addr, "GET", "/metrics", "", "x-api-key: wrong\r\n");
        assert_eq!(code, 401, "{addr}: {body}");
        let (code, body) = http_with(
            addr,
            "GET",
            "/metrics",
            "",
            "authorization: Bearer sekrit\r\n",
        );
        assert_eq!(code, 200, "{addr}: {body}");
        assert!(body.contains("switchyard_"), "{addr}: {body}");
        let (code, body) = http(addr, "GET", "/health", "");
        assert_eq!(code, 200, "{addr}: health stays open: {body}");
    }
    assert!(sigterm_and_wait(&mut up, "up").success());
}

#[test]
fn client_apis_over_tls_serve_clients_that_trust_the_issuing_ca() {
    let cache = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().join("tls");
    let out = switchyard(&[
        "certs",
        "--out",
        dir.to_str().unwrap(),
        "--api-name",
        "127.0.0.1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |f: &str| dir.join(f).to_str().unwrap().to_string();
    // Asking for a generation in plaintext from a TLS router is refused before anything starts.
    let out = switchyard(&[
        "up",
        "--tls-cert",
        &file("api.pem"),
        "--tls-key",
        &file("api.key"),
        "--demo-prompt-ids",
        "1,2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--tls-ca"),
        "{stderr}"
    );
    let (mut up, rx) = up_on_loopback(
        cache.path(),
        &[
            "--tls-cert",
            &file("api.pem"),
            "--tls-key",
            &file("api.key"),
        ],
    );
    let mut router = None;
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("up reports its nodes");
        if line.starts_with("router · pid") {
            router = line.split(" · ").nth(2).map(|a| a.trim().to_string());
        }
        if line.starts_with("serving") {
            break;
        }
    }
    let router = router.expect("the router's address");
    let generate = |extra: &[&str]| {
        switchyard(
            &[
                &[
                    "generate",
                    "--router",
                    router.as_str(),
                    "--prompt-ids",
                    "1,17,42",
                    "--max-new-tokens",
                    "4",
                    "--ignore-eos",
                    "--json",
                ][..],
                extra,
            ]
            .concat(),
        )
    };
    let ok = generate(&["--tls-ca", &file("ca.pem")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ids = serde_json::from_slice::<serde_json::Value>(&ok.stdout).unwrap()["token_ids"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(ids, 4);
    // Plaintext, and TLS trusting another CA, both fail clearly.
    let plain = generate(&[]);
    assert!(!plain.status.success());
    let other = tempfile::tempdir().unwrap();
    let other_dir = other.path().join("tls");
    assert!(
        switchyard(&["certs", "--out", other_dir.to_str().unwrap()])
            .status
            .success()
    );
    let foreign = generate(&["--tls-ca", other_dir.join("ca.pem").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&foreign.stderr);
    assert!(
        !foreign.status.success() && stderr.contains("connecting to the router"),
        "{stderr}"
    );
    assert!(sigterm_and_wait(&mut up, "up").success());
}
