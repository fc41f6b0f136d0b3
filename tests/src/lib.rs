//! `switchyard-tests`: end-to-end tests of whole clusters (in `tests/`), and the sandbox they
//! share: expert workers as in-process gRPC servers on ephemeral loopback ports, shut down
//! when the sandbox drops.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_expert_worker::{ExpertSpec, ExpertWorker, service};
use tokio::sync::oneshot;

/// A running in-process expert worker.
#[derive(Debug)]
pub struct LocalWorker {
    pub addr: String,
    pub worker: Arc<ExpertWorker>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// Expert workers serving one checkpoint, on 127.0.0.1 ephemeral ports.
#[derive(Debug)]
pub struct Sandbox {
    pub workers: Vec<LocalWorker>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Sandbox {
    /// Starts one worker per spec, each holding the experts its spec names.
    pub fn start(model: &Path, specs: &[&str]) -> Sandbox {
        Self::start_with(model, specs, |w| w)
    }

    /// Like [`Sandbox::start`], with each worker adjusted before it serves.
    pub fn start_with(
        model: &Path,
        specs: &[&str],
        adjust: impl Fn(ExpertWorker) -> ExpertWorker,
    ) -> Sandbox {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime starts");
        let mut workers = Vec::new();
        for spec in specs {
            let spec: ExpertSpec = spec.parse().expect("valid expert spec");
            let worker = Arc::new(adjust(
                ExpertWorker::load(model, &spec).expect("worker loads"),
            ));
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .expect("bind an ephemeral loopback port");
            let addr = listener.local_addr().expect("bound address").to_string();
            let (tx, rx) = oneshot::channel::<()>();
            runtime.spawn(service::serve(worker.clone(), listener, async {
                let _ = rx.await;
            }));
            workers.push(LocalWorker {
                addr,
                worker,
                shutdown: Some(tx),
            });
        }
        Sandbox {
            workers,
            runtime: Some(runtime),
        }
    }

    /// Stops worker `i` (its server drains and closes), as a crash would for its clients.
    pub fn stop_worker(&mut self, i: usize) {
        if let Some(tx) = self.workers.get_mut(i).and_then(|w| w.shutdown.take()) {
            let _ = tx.send(());
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.addr.clone()).collect()
    }

    /// Runs async test code (e.g. a raw gRPC client) on the sandbox's runtime.
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .block_on(fut)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(tx) = w.shutdown.take() {
                let _ = tx.send(());
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}
