//! What the command-line tests share: the binary, synthetic models, node processes that are
//! killed when dropped, and the coordinator's view of a cluster.

// Each test binary uses some of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(with_cluster_tls(args))
        .env("SWITCHYARD_THREADS", "2")
        .output()
        .expect("the switchyard binary runs")
}

/// Worker certificates in [`cluster_certs`]: more than any test starts.
pub const WORKER_CERTS: usize = 128;

/// A cluster CA and node certificates (`switchyard certs`), issued once per test binary and
/// kept for its life: `coordinator`, `router-0..3`, `worker-0..127`, `admin`.
pub fn cluster_certs() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["certs", "--out"])
            .arg(dir.path().join("certs"))
            .args(["--workers", &WORKER_CERTS.to_string(), "--routers", "4"])
            .output()
            .expect("switchyard certs runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
    .join("certs")
    .leak()
}

/// The flags that give node `name` its certificate from [`cluster_certs`].
pub fn tls_flags(name: &str) -> Vec<String> {
    let dir = cluster_certs();
    let path = |f: String| dir.join(f).to_str().expect("UTF-8 paths").to_string();
    vec![
        "--cluster-ca".into(),
        path("ca.pem".into()),
        "--cert".into(),
        path(format!("{name}.pem")),
        "--key".into(),
        path(format!("{name}.key")),
    ]
}

/// `args` with a node certificate of the command's role added (each worker its own), unless
/// they already say how cluster links run: every node started by hand needs one.
pub fn with_cluster_tls(args: &[&str]) -> Vec<String> {
    static NEXT_WORKER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if args
        .iter()
        .any(|a| *a == "--insecure-cluster" || *a == "--cluster-ca" || *a == "--help")
    {
        return out;
    }
    let name = match args.first().copied() {
        Some("coordinator") => "coordinator".to_string(),
        Some("router") => "router-0".to_string(),
        Some("status" | "rebalance") => "admin".to_string(),
        Some("worker") => {
            let n = NEXT_WORKER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert!(n < WORKER_CERTS, "more workers than certificates");
            format!("worker-{n}")
        }
        _ => return out,
    };
    out.extend(tls_flags(&name));
    out
}

pub fn synth_tiny(dir: &Path, dtype: &str) {
    let out = switchyard(&[
        "synth",
        "--preset",
        "tiny",
        "--out",
        dir.to_str().expect("temp paths are UTF-8"),
        "--dtype",
        dtype,
        "--seed",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `switchyard ARGS` and waits (at most 30 s) for its `listening on ADDR` line.
pub fn spawn_node(args: &[&str]) -> (Child, String) {
    spawn_node_with(args, std::process::Stdio::null())
}

/// [`spawn_node`], with the node's log (stderr) appended to `log`.
pub fn spawn_node_logged(args: &[&str], log: &Path) -> (Child, String) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("the log file opens");
    spawn_node_with(args, file.into())
}

fn spawn_node_with(args: &[&str], stderr: std::process::Stdio) -> (Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(with_cluster_tls(args))
        .env("SWITCHYARD_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("the switchyard binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let child = Child(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the node reports its address within 30 s");
    let addr = line
        .split_whitespace()
        .nth(2)
        .expect("`listening on ADDR ...`")
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{line}");
    (child, addr)
}

/// `switchyard status --coordinator ADDR --json`.
pub fn status(coordinator: &str) -> serde_json::Value {
    let out = switchyard(&["status", "--coordinator", coordinator, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits (bounded) until `workers` workers hold a live placement nothing older is kept for.
pub fn wait_settled(coordinator: &str, workers: usize, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = status(coordinator);
        let ws = s["workers"].as_array().unwrap();
        let live = s["live_version"].as_u64().unwrap();
        if ws.len() == workers
            && live > 0
            && s["target_version"].as_u64() == Some(live)
            && s["retain_from"].as_u64() == Some(live)
            && ws
                .iter()
                .all(|w| w["draining"] == false && w["loaded_version"].as_u64() == Some(live))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not settled within 60 s: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
